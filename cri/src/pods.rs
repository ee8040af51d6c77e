//! The CRI's pod sandbox methods over berth-engine's `Sandboxes` service: the request and
//! answer translations, and the CRI's idempotence rules (Stop and Remove of a sandbox that is
//! gone succeed; its status is NOT_FOUND).

use std::collections::HashMap;
use std::sync::Arc;

use berth_core::uds::{Channel, channel};
use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::engine::v1::sandboxes_client::SandboxesClient;
use berth_proto::berth::types::v1 as types;
use berth_proto::cri::runtime::v1 as cri;

use crate::backend::Fut;
use crate::convert::{nanos, not_found_is_none, required_id};

/// The engine's sandbox records, as the CRI pod methods need them.
pub trait SandboxStore: Send + Sync + 'static {
    /// Makes a sandbox.
    fn run(&self, req: pb::RunSandboxRequest) -> Fut<'_, pb::Sandbox>;
    /// Stops sandbox `id`; `false` when there is none.
    fn stop<'a>(&'a self, id: &'a str) -> Fut<'a, bool>;
    /// Removes sandbox `id` and its containers; `false` when there is none.
    fn remove<'a>(&'a self, id: &'a str) -> Fut<'a, bool>;
    /// Sandbox `id` (and the verbose info); `None` when there is none.
    fn get<'a>(&'a self, id: &'a str, verbose: bool) -> Fut<'a, Option<pb::GetSandboxResponse>>;
    /// The sandboxes matching every filter (the engine's keys: id, state, label).
    fn list(&self, filters: Vec<types::Filter>) -> Fut<'_, Vec<pb::Sandbox>>;
}

/// [`SandboxStore`] over berth-engine.
#[derive(Debug, Clone)]
pub struct GrpcSandboxStore {
    client: SandboxesClient<Channel>,
}

impl GrpcSandboxStore {
    /// A store over the engine listening on `engine`.
    pub fn new(engine: &std::path::Path) -> Self {
        Self {
            client: SandboxesClient::new(channel(engine))
                .max_decoding_message_size(crate::MAX_MESSAGE),
        }
    }
}

impl SandboxStore for GrpcSandboxStore {
    fn run(&self, req: pb::RunSandboxRequest) -> Fut<'_, pb::Sandbox> {
        Box::pin(async move {
            self.client
                .clone()
                .run(req)
                .await?
                .into_inner()
                .sandbox
                .ok_or_else(|| Error::internal("berth-engine answered Run without a sandbox"))
        })
    }

    fn stop<'a>(&'a self, id: &'a str) -> Fut<'a, bool> {
        Box::pin(async move {
            let r = self
                .client
                .clone()
                .stop(pb::StopSandboxRequest { id: id.into() })
                .await;
            Ok(not_found_is_none(r.map(tonic::Response::into_inner))?.is_some())
        })
    }

    fn remove<'a>(&'a self, id: &'a str) -> Fut<'a, bool> {
        Box::pin(async move {
            let r = self
                .client
                .clone()
                .remove(pb::RemoveSandboxRequest { id: id.into() })
                .await;
            Ok(not_found_is_none(r.map(tonic::Response::into_inner))?.is_some())
        })
    }

    fn get<'a>(&'a self, id: &'a str, verbose: bool) -> Fut<'a, Option<pb::GetSandboxResponse>> {
        Box::pin(async move {
            let r = self
                .client
                .clone()
                .get(pb::GetSandboxRequest {
                    id: id.into(),
                    verbose,
                })
                .await;
            not_found_is_none(r.map(tonic::Response::into_inner))
        })
    }

    fn list(&self, filters: Vec<types::Filter>) -> Fut<'_, Vec<pb::Sandbox>> {
        Box::pin(async move {
            Ok(self
                .client
                .clone()
                .list(pb::ListSandboxesRequest { filters })
                .await?
                .into_inner()
                .sandboxes)
        })
    }
}

/// The five pod sandbox methods of the RuntimeService.
#[derive(Clone)]
pub struct Pods {
    store: Arc<dyn SandboxStore>,
}

impl std::fmt::Debug for Pods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pods").finish_non_exhaustive()
    }
}

impl Pods {
    /// Pods kept in `store`.
    pub fn new(store: impl SandboxStore) -> Self {
        Self {
            store: Arc::new(store),
        }
    }

    /// The network namespace file of ready sandbox `id`, for port forwarding (the host's for a
    /// host-network pod): `NotFound` for an unknown sandbox, `FailedPrecondition` for one that
    /// is not ready.
    pub async fn netns(&self, id: &str) -> Result<std::path::PathBuf> {
        let Some(got) = self.store.get(id, false).await? else {
            return Err(Error::not_found(format!("pod sandbox {id:?} not found")));
        };
        let sb = got.sandbox.unwrap_or_default();
        if sb.state() != pb::SandboxState::Ready {
            return Err(Error::failed_precondition(format!(
                "pod sandbox {id:?} is not ready"
            )));
        }
        let path = sb.namespaces.map(|n| n.network).unwrap_or_default();
        if path.is_empty() {
            // A host-network pod: its ports are the host's, in this process's namespace.
            return Ok("/proc/self/ns/net".into());
        }
        Ok(path.into())
    }

    /// RunPodSandbox. `pod_cidrs` (UpdateRuntimeConfig's) become the CNI `ipRanges`
    /// capability, as the kubelet's own CNI driver (dockershim) passed the node's pod CIDR.
    pub async fn run(
        &self,
        req: cri::RunPodSandboxRequest,
        pod_cidrs: Vec<String>,
    ) -> Result<cri::RunPodSandboxResponse> {
        let mut run = run_request(req)?;
        if let Some(network) = run.network.as_mut() {
            network.ip_ranges = pod_cidrs;
        }
        let sandbox = self.store.run(run).await?;
        Ok(cri::RunPodSandboxResponse {
            pod_sandbox_id: sandbox.id,
        })
    }

    /// StopPodSandbox: one that is gone is stopped.
    pub async fn stop(
        &self,
        req: cri::StopPodSandboxRequest,
    ) -> Result<cri::StopPodSandboxResponse> {
        let id = required_id(&req.pod_sandbox_id, "pod_sandbox_id")?;
        if !self.store.stop(id).await? {
            tracing::debug!(id, "StopPodSandbox of a sandbox that is gone");
        }
        Ok(cri::StopPodSandboxResponse {})
    }

    /// RemovePodSandbox: the engine removes the pod's containers with it; one that is gone is
    /// removed.
    pub async fn remove(
        &self,
        req: cri::RemovePodSandboxRequest,
    ) -> Result<cri::RemovePodSandboxResponse> {
        let id = required_id(&req.pod_sandbox_id, "pod_sandbox_id")?;
        if !self.store.remove(id).await? {
            tracing::debug!(id, "RemovePodSandbox of a sandbox that is gone");
        }
        Ok(cri::RemovePodSandboxResponse {})
    }

    /// PodSandboxStatus; NOT_FOUND for an unknown id.
    pub async fn status(
        &self,
        req: cri::PodSandboxStatusRequest,
    ) -> Result<cri::PodSandboxStatusResponse> {
        let id = required_id(&req.pod_sandbox_id, "pod_sandbox_id")?;
        let got = self
            .store
            .get(id, req.verbose)
            .await?
            .ok_or_else(|| Error::not_found(format!("pod sandbox {id} not found")))?;
        let sandbox = got
            .sandbox
            .ok_or_else(|| Error::internal("berth-engine answered Get without a sandbox"))?;
        Ok(cri::PodSandboxStatusResponse {
            status: Some(status_of(sandbox)),
            info: if req.verbose {
                got.info
            } else {
                HashMap::new()
            },
            containers_statuses: Vec::new(),
            timestamp: now_nanos(),
        })
    }

    /// ListPodSandbox.
    pub async fn list(
        &self,
        req: cri::ListPodSandboxRequest,
    ) -> Result<cri::ListPodSandboxResponse> {
        let filters = req.filter.map(list_filters).unwrap_or_default();
        let items = self
            .store
            .list(filters)
            .await?
            .into_iter()
            .map(pod_of)
            .collect();
        Ok(cri::ListPodSandboxResponse { items })
    }
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The engine's Run request for a CRI one. What berth cannot honour is refused.
pub fn run_request(req: cri::RunPodSandboxRequest) -> Result<pb::RunSandboxRequest> {
    let config = req
        .config
        .ok_or_else(|| Error::invalid_argument("RunPodSandbox needs a config"))?;
    let metadata = config
        .metadata
        .ok_or_else(|| Error::invalid_argument("the pod sandbox config needs metadata"))?;
    if config.windows.is_some() {
        return Err(Error::invalid_argument(
            "a Windows pod sandbox config cannot run on berth (Linux only)",
        ));
    }
    let linux = config.linux.map(linux_config).transpose()?;
    let network = network_options(&config.annotations)?;
    let port_mappings = config
        .port_mappings
        .into_iter()
        .filter_map(port_mapping)
        .collect::<Result<Vec<_>>>()?;
    Ok(pb::RunSandboxRequest {
        config: Some(pb::SandboxConfig {
            metadata: Some(pb::SandboxMetadata {
                name: metadata.name,
                uid: metadata.uid,
                namespace: metadata.namespace,
                attempt: metadata.attempt,
            }),
            hostname: config.hostname,
            log_directory: config.log_directory,
            dns: config.dns_config.map(|d| pb::SandboxDnsConfig {
                servers: d.servers,
                searches: d.searches,
                options: d.options,
            }),
            port_mappings,
            labels: config.labels,
            annotations: config.annotations,
            linux,
        }),
        runtime_handler: req.runtime_handler,
        network: Some(network),
    })
}

/// The pod annotations kubelet's bandwidth shaping reads (CNI `bandwidth` capability).
const INGRESS_BANDWIDTH: &str = "kubernetes.io/ingress-bandwidth";
const EGRESS_BANDWIDTH: &str = "kubernetes.io/egress-bandwidth";

/// The CNI options a pod's annotations ask for: bandwidth limits, bits per second.
fn network_options(annotations: &HashMap<String, String>) -> Result<pb::SandboxNetworkOptions> {
    let rate = |key: &str| -> Result<u64> {
        let Some(text) = annotations.get(key) else {
            return Ok(0);
        };
        let bits = quantity(text).ok_or_else(|| {
            Error::invalid_argument(format!("annotation {key}: {text:?} is not a quantity"))
        })?;
        // kubelet's own bounds (1k..1P).
        if !(1_000..=1_000_000_000_000_000).contains(&bits) {
            return Err(Error::invalid_argument(format!(
                "annotation {key}: {text:?} is outside 1k..1P"
            )));
        }
        Ok(bits)
    };
    Ok(pb::SandboxNetworkOptions {
        ingress_rate: rate(INGRESS_BANDWIDTH)?,
        egress_rate: rate(EGRESS_BANDWIDTH)?,
        ..Default::default()
    })
}

/// A Kubernetes resource quantity (`10M`, `1.5Gi`, `100000`), rounded up to a whole number.
fn quantity(text: &str) -> Option<u64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: u128 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return None,
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() || frac.len() > 18 {
        return None;
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let scale = 10u128.pow(frac.len() as u32);
    let frac: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    let scaled = whole
        .checked_mul(scale)?
        .checked_add(frac)?
        .checked_mul(multiplier)?;
    u64::try_from(scaled.div_ceil(scale)).ok()
}

/// A CRI port mapping as the engine's; `None` for one without a host port (kubelet's
/// container ports that publish nothing, skipped as containerd skips them).
fn port_mapping(p: cri::PortMapping) -> Option<Result<types::PortMapping>> {
    if p.host_port <= 0 {
        return None;
    }
    let port = |n: i32, what: &str| {
        u16::try_from(n)
            .ok()
            .filter(|n| *n > 0)
            .map(u32::from)
            .ok_or_else(|| Error::invalid_argument(format!("{what} {n} is not a port")))
    };
    let protocol = match cri::Protocol::try_from(p.protocol) {
        Ok(cri::Protocol::Tcp) => types::Protocol::Tcp,
        Ok(cri::Protocol::Udp) => types::Protocol::Udp,
        Ok(cri::Protocol::Sctp) => types::Protocol::Sctp,
        Err(_) => {
            return Some(Err(Error::invalid_argument(format!(
                "unknown port mapping protocol {}",
                p.protocol
            ))));
        }
    };
    Some((|| {
        Ok(types::PortMapping {
            host_ip: p.host_ip,
            host_port: port(p.host_port, "host port")?,
            container_port: port(p.container_port, "container port")?,
            protocol: protocol.into(),
            host_port_end: 0,
        })
    })())
}

/// The CRI's and the engine's NamespaceMode have the same values.
fn namespace_mode(mode: i32) -> Result<i32> {
    match cri::NamespaceMode::try_from(mode) {
        Ok(m) => Ok(m as i32),
        Err(_) => Err(Error::invalid_argument(format!(
            "unknown namespace mode {mode}"
        ))),
    }
}

fn linux_config(l: cri::LinuxPodSandboxConfig) -> Result<pb::SandboxLinux> {
    let security = l.security_context.map(security).transpose()?;
    Ok(pb::SandboxLinux {
        cgroup_parent: l.cgroup_parent,
        sysctls: l.sysctls,
        security,
    })
}

// `seccomp_profile_path` is deprecated but older kubelets still send it.
#[allow(deprecated)]
fn security(s: cri::LinuxSandboxSecurityContext) -> Result<pb::SandboxSecurity> {
    let namespace_options = match s.namespace_options {
        Some(ns) => {
            if let Some(userns) = &ns.userns_options
                && userns.mode != cri::NamespaceMode::Node as i32
            {
                return Err(Error::invalid_argument(
                    "user namespaces for pods are not supported by berth",
                ));
            }
            Some(pb::SandboxNamespaceOptions {
                network: namespace_mode(ns.network)?,
                pid: namespace_mode(ns.pid)?,
                ipc: namespace_mode(ns.ipc)?,
                target_id: ns.target_id,
            })
        }
        None => None,
    };
    let seccomp_profile = match s.seccomp {
        Some(p) => seccomp(p)?,
        None => s.seccomp_profile_path,
    };
    Ok(pb::SandboxSecurity {
        namespace_options,
        privileged: s.privileged,
        run_as_user: s.run_as_user.map(|v| v.value),
        run_as_group: s.run_as_group.map(|v| v.value),
        supplemental_groups: s.supplemental_groups,
        readonly_rootfs: s.readonly_rootfs,
        seccomp_profile,
    })
}

fn seccomp(p: cri::SecurityProfile) -> Result<String> {
    use cri::security_profile::ProfileType;
    match ProfileType::try_from(p.profile_type) {
        Ok(ProfileType::RuntimeDefault) => Ok("runtime/default".into()),
        Ok(ProfileType::Unconfined) => Ok("unconfined".into()),
        Ok(ProfileType::Localhost) if !p.localhost_ref.is_empty() => {
            Ok(format!("localhost/{}", p.localhost_ref))
        }
        Ok(ProfileType::Localhost) => Err(Error::invalid_argument(
            "a Localhost seccomp profile needs localhost_ref",
        )),
        Err(_) => Err(Error::invalid_argument(format!(
            "unknown seccomp profile type {}",
            p.profile_type
        ))),
    }
}

/// CRI list filters as the engine's (id prefix, state, labels).
pub fn list_filters(f: cri::PodSandboxFilter) -> Vec<types::Filter> {
    let filter = |key: &str, value: String| types::Filter {
        key: key.into(),
        value,
    };
    let mut out = Vec::new();
    if !f.id.is_empty() {
        out.push(filter("id", f.id));
    }
    if let Some(state) = f.state {
        let value = match cri::PodSandboxState::try_from(state.state) {
            Ok(cri::PodSandboxState::SandboxReady) => "ready",
            _ => "notready",
        };
        out.push(filter("state", value.into()));
    }
    let mut labels: Vec<_> = f.label_selector.into_iter().collect();
    labels.sort();
    out.extend(
        labels
            .into_iter()
            .map(|(k, v)| filter("label", format!("{k}={v}"))),
    );
    out
}

fn state_of(s: &pb::Sandbox) -> i32 {
    match pb::SandboxState::try_from(s.state) {
        Ok(pb::SandboxState::Ready) => cri::PodSandboxState::SandboxReady as i32,
        _ => cri::PodSandboxState::SandboxNotready as i32,
    }
}

fn metadata_of(c: &pb::SandboxConfig) -> Option<cri::PodSandboxMetadata> {
    c.metadata.as_ref().map(|m| cri::PodSandboxMetadata {
        name: m.name.clone(),
        uid: m.uid.clone(),
        namespace: m.namespace.clone(),
        attempt: m.attempt,
    })
}

/// A list item.
fn pod_of(s: pb::Sandbox) -> cri::PodSandbox {
    let state = state_of(&s);
    let created_at = nanos(s.created.as_ref());
    let config = s.config.unwrap_or_default();
    cri::PodSandbox {
        id: s.id,
        metadata: metadata_of(&config),
        state,
        created_at,
        labels: config.labels,
        annotations: config.annotations,
        runtime_handler: s.runtime_handler,
    }
}

/// The CRI status of a sandbox.
fn status_of(s: pb::Sandbox) -> cri::PodSandboxStatus {
    let state = state_of(&s);
    let created_at = nanos(s.created.as_ref());
    let config = s.config.unwrap_or_default();
    let options = config
        .linux
        .as_ref()
        .and_then(|l| l.security.as_ref())
        .and_then(|sec| sec.namespace_options.as_ref())
        .map(|ns| cri::NamespaceOption {
            network: ns.network,
            pid: ns.pid,
            ipc: ns.ipc,
            target_id: ns.target_id.clone(),
            userns_options: None,
        })
        .unwrap_or_default();
    let network = s.network.unwrap_or_default();
    cri::PodSandboxStatus {
        id: s.id,
        metadata: metadata_of(&config),
        state,
        created_at,
        network: Some(cri::PodSandboxNetworkStatus {
            ip: network.ip,
            additional_ips: network
                .additional_ips
                .into_iter()
                .map(|ip| cri::PodIp { ip })
                .collect(),
        }),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(options),
            }),
        }),
        labels: config.labels,
        annotations: config.annotations,
        runtime_handler: s.runtime_handler,
    }
}

/// The handlers `Status` advertises: berth's default OCI runtime (name ""), which honours
/// recursive read-only mounts (runc with `rro`); pods with user namespaces it does not run.
pub fn runtime_handlers() -> Vec<cri::RuntimeHandler> {
    vec![cri::RuntimeHandler {
        name: String::new(),
        features: Some(cri::RuntimeHandlerFeatures {
            recursive_read_only_mounts: true,
            user_namespaces: false,
        }),
    }]
}

/// Runtime-wide features: the engine applies the strict supplemental groups policy
/// (`HostConfig.strict_supplemental_groups`).
pub fn runtime_features() -> cri::RuntimeFeatures {
    cri::RuntimeFeatures {
        supplemental_groups_policy: true,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use berth_core::ErrorKind;

    use super::*;

    /// Sandboxes in memory; records the requests it got.
    #[derive(Default)]
    struct Fake {
        sandboxes: Mutex<Vec<pb::Sandbox>>,
        runs: Mutex<Vec<pb::RunSandboxRequest>>,
        lists: Mutex<Vec<Vec<types::Filter>>>,
    }

    impl SandboxStore for Arc<Fake> {
        fn run(&self, req: pb::RunSandboxRequest) -> Fut<'_, pb::Sandbox> {
            let n = self.runs.lock().unwrap().len();
            let s = pb::Sandbox {
                id: format!("{n:064x}"),
                config: req.config.clone(),
                state: pb::SandboxState::Ready.into(),
                created: Some(berth_proto::prost_types::Timestamp {
                    seconds: 2,
                    nanos: 5,
                }),
                runtime_handler: req.runtime_handler.clone(),
                network: Some(pb::SandboxNetworkStatus {
                    ip: "10.1.2.3".into(),
                    additional_ips: vec!["fd00::3".into()],
                    ..Default::default()
                }),
                ..Default::default()
            };
            self.runs.lock().unwrap().push(req);
            self.sandboxes.lock().unwrap().push(s.clone());
            Box::pin(async move { Ok(s) })
        }

        fn stop<'a>(&'a self, id: &'a str) -> Fut<'a, bool> {
            let mut all = self.sandboxes.lock().unwrap();
            let hit = all.iter_mut().find(|s| s.id == id);
            let found = hit.is_some();
            if let Some(s) = hit {
                s.state = pb::SandboxState::Notready.into();
            }
            Box::pin(async move { Ok(found) })
        }

        fn remove<'a>(&'a self, id: &'a str) -> Fut<'a, bool> {
            let mut all = self.sandboxes.lock().unwrap();
            let before = all.len();
            all.retain(|s| s.id != id);
            let found = all.len() != before;
            Box::pin(async move { Ok(found) })
        }

        fn get<'a>(
            &'a self,
            id: &'a str,
            verbose: bool,
        ) -> Fut<'a, Option<pb::GetSandboxResponse>> {
            let got = self
                .sandboxes
                .lock()
                .unwrap()
                .iter()
                .find(|s| s.id == id)
                .cloned()
                .map(|s| pb::GetSandboxResponse {
                    sandbox: Some(s),
                    info: if verbose {
                        [("info".to_string(), "{}".to_string())].into()
                    } else {
                        HashMap::new()
                    },
                });
            Box::pin(async move { Ok(got) })
        }

        fn list(&self, filters: Vec<types::Filter>) -> Fut<'_, Vec<pb::Sandbox>> {
            self.lists.lock().unwrap().push(filters);
            let all = self.sandboxes.lock().unwrap().clone();
            Box::pin(async move { Ok(all) })
        }
    }

    fn config(name: &str) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: "u1".into(),
                namespace: "ns".into(),
                attempt: 1,
            }),
            hostname: "h".into(),
            log_directory: "/var/log/pods/x".into(),
            dns_config: Some(cri::DnsConfig {
                servers: vec!["10.0.0.10".into()],
                searches: vec!["svc".into()],
                options: vec!["ndots:5".into()],
            }),
            port_mappings: vec![
                cri::PortMapping {
                    protocol: cri::Protocol::Udp.into(),
                    container_port: 53,
                    host_port: 5353,
                    host_ip: "127.0.0.1".into(),
                },
                // Published nowhere: skipped.
                cri::PortMapping {
                    container_port: 80,
                    ..Default::default()
                },
            ],
            labels: [("app".to_string(), "web".to_string())].into(),
            annotations: [("a".to_string(), "b".to_string())].into(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: "/kubepods/podu1".into(),
                sysctls: [("net.ipv4.ip_forward".to_string(), "1".to_string())].into(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node.into(),
                        pid: cri::NamespaceMode::Container.into(),
                        ipc: cri::NamespaceMode::Pod.into(),
                        ..Default::default()
                    }),
                    run_as_user: Some(cri::Int64Value { value: 1000 }),
                    seccomp: Some(cri::SecurityProfile {
                        profile_type: cri::security_profile::ProfileType::Localhost.into(),
                        localhost_ref: "/p.json".into(),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            windows: None,
        }
    }

    fn pods() -> (Pods, Arc<Fake>) {
        let fake = Arc::new(Fake::default());
        (Pods::new(fake.clone()), fake)
    }

    #[tokio::test]
    async fn run_translates_the_config_and_status_reads_it_back() {
        let (pods, fake) = pods();
        let id = pods
            .run(
                cri::RunPodSandboxRequest {
                    config: Some(config("web")),
                    runtime_handler: "".into(),
                },
                vec!["10.88.0.0/16".into(), "fd00::/64".into()],
            )
            .await
            .unwrap()
            .pod_sandbox_id;
        let run = fake.runs.lock().unwrap()[0].clone();
        assert_eq!(
            run.network.as_ref().unwrap().ip_ranges,
            ["10.88.0.0/16", "fd00::/64"]
        );
        let c = run.config.unwrap();
        assert_eq!(c.metadata.as_ref().unwrap().attempt, 1);
        assert_eq!(c.log_directory, "/var/log/pods/x");
        assert_eq!(c.dns.as_ref().unwrap().options, ["ndots:5"]);
        assert_eq!(c.port_mappings.len(), 1);
        let p = &c.port_mappings[0];
        assert_eq!((p.host_port, p.container_port), (5353, 53));
        assert_eq!(p.protocol, types::Protocol::Udp as i32);
        let linux = c.linux.as_ref().unwrap();
        assert_eq!(linux.cgroup_parent, "/kubepods/podu1");
        assert_eq!(linux.sysctls["net.ipv4.ip_forward"], "1");
        let sec = linux.security.as_ref().unwrap();
        assert_eq!(sec.run_as_user, Some(1000));
        assert_eq!(sec.seccomp_profile, "localhost//p.json");
        let ns = sec.namespace_options.as_ref().unwrap();
        assert_eq!(ns.network, pb::NamespaceMode::Node as i32);
        assert_eq!(ns.pid, pb::NamespaceMode::Container as i32);

        let st = pods
            .status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: true,
            })
            .await
            .unwrap();
        assert!(st.info.contains_key("info"));
        let s = st.status.unwrap();
        assert_eq!(s.state, cri::PodSandboxState::SandboxReady as i32);
        assert_eq!(s.created_at, 2_000_000_005);
        assert_eq!(s.metadata.unwrap().name, "web");
        let net = s.network.unwrap();
        assert_eq!(net.ip, "10.1.2.3");
        assert_eq!(net.additional_ips[0].ip, "fd00::3");
        let opts = s.linux.unwrap().namespaces.unwrap().options.unwrap();
        assert_eq!(opts.network, cri::NamespaceMode::Node as i32);
        assert_eq!(s.labels["app"], "web");
        assert_eq!(s.annotations["a"], "b");
    }

    #[tokio::test]
    async fn stop_and_remove_of_a_sandbox_that_is_gone_succeed_and_status_is_not_found() {
        let (pods, _) = pods();
        let id = || "feedbeef".to_string();
        pods.stop(cri::StopPodSandboxRequest {
            pod_sandbox_id: id(),
        })
        .await
        .unwrap();
        pods.remove(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id(),
        })
        .await
        .unwrap();
        let err = pods
            .status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id(),
                verbose: false,
            })
            .await
            .unwrap_err();
        assert!(err.is(ErrorKind::NotFound), "{err:?}");
        let err = pods
            .stop(cri::StopPodSandboxRequest::default())
            .await
            .unwrap_err();
        assert!(err.is(ErrorKind::InvalidArgument), "{err:?}");
    }

    #[tokio::test]
    async fn stop_makes_notready_and_list_passes_the_filters() {
        let (pods, fake) = pods();
        let id = pods
            .run(
                cri::RunPodSandboxRequest {
                    config: Some(config("a")),
                    runtime_handler: String::new(),
                },
                Vec::new(),
            )
            .await
            .unwrap()
            .pod_sandbox_id;
        pods.stop(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .unwrap();
        let items = pods
            .list(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter {
                    id: id[..6].into(),
                    state: Some(cri::PodSandboxStateValue {
                        state: cri::PodSandboxState::SandboxNotready.into(),
                    }),
                    label_selector: [("app".to_string(), "web".to_string())].into(),
                }),
            })
            .await
            .unwrap()
            .items;
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].state, cri::PodSandboxState::SandboxNotready as i32);
        let sent = fake.lists.lock().unwrap()[0].clone();
        let sent: Vec<_> = sent
            .iter()
            .map(|f| (f.key.as_str(), f.value.as_str()))
            .collect();
        assert_eq!(
            sent,
            [
                ("id", &id[..6]),
                ("state", "notready"),
                ("label", "app=web")
            ]
        );
    }

    #[test]
    fn bandwidth_annotations_become_cni_rates() {
        assert_eq!(quantity("10M"), Some(10_000_000));
        assert_eq!(quantity("1.5Ki"), Some(1536));
        assert_eq!(quantity("100000"), Some(100_000));
        assert_eq!(quantity("0.0001"), Some(1));
        assert_eq!(quantity("10m"), None);
        assert_eq!(quantity(""), None);
        assert_eq!(quantity("."), None);
        let annotations = |v: &str| -> HashMap<String, String> {
            [(INGRESS_BANDWIDTH.to_string(), v.to_string())].into()
        };
        let n = network_options(&annotations("2M")).unwrap();
        assert_eq!((n.ingress_rate, n.egress_rate), (2_000_000, 0));
        for bad in ["fast", "10", "2E"] {
            let err = network_options(&annotations(bad)).unwrap_err();
            assert!(err.is(ErrorKind::InvalidArgument), "{bad}: {err:?}");
        }
    }

    #[test]
    fn what_berth_cannot_honour_is_refused() {
        let with = |f: &dyn Fn(&mut cri::PodSandboxConfig)| {
            let mut c = config("x");
            f(&mut c);
            run_request(cri::RunPodSandboxRequest {
                config: Some(c),
                runtime_handler: String::new(),
            })
        };
        let userns = with(&|c| {
            let sec = c.linux.as_mut().unwrap().security_context.as_mut().unwrap();
            sec.namespace_options.as_mut().unwrap().userns_options =
                Some(cri::UserNamespace::default());
        });
        assert!(userns.unwrap_err().is(ErrorKind::InvalidArgument));
        let windows = with(&|c| c.windows = Some(Default::default()));
        assert!(windows.unwrap_err().is(ErrorKind::InvalidArgument));
        let port = with(&|c| c.port_mappings[0].host_port = 70000);
        assert!(port.unwrap_err().is(ErrorKind::InvalidArgument));
        let no_meta = with(&|c| c.metadata = None);
        assert!(no_meta.unwrap_err().is(ErrorKind::InvalidArgument));
    }
}
