//! The CRI's container methods over berth-engine's `Containers` and `Tasks` services: a CRI
//! container is an engine container created with `HostConfig.sandbox_id`, named as dockershim
//! named them (`k8s_<container>_<pod>_<namespace>_<uid>_<attempt>`, so `docker ps -a` shows it),
//! with the CRI request kept in its `extensions["cri"]` blob (a protobuf `CreateContainerRequest`
//! without the sandbox config) so status and list answer the CRI's own metadata. Stop and Remove
//! of a container that is gone succeed; its status is NOT_FOUND.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use berth_core::uds::{Channel, channel};
use berth_core::{Error, ErrorKind, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::engine::v1::containers_client::ContainersClient;
use berth_proto::berth::engine::v1::sandboxes_client::SandboxesClient;
use berth_proto::berth::engine::v1::tasks_client::TasksClient;
use berth_proto::berth::types::v1 as types;
use berth_proto::cri::runtime::v1 as cri;
use berth_proto::prost::Message;

use crate::backend::Fut;
use crate::convert::{nanos, not_found_is_none, required_id};

/// The key of the CRI blob in a container's extensions.
pub const EXTENSION: &str = "cri";
const EXTENSION_VERSION: u32 = 1;

/// The engine's containers, as the CRI container methods need them.
pub trait ContainerStore: Send + Sync + 'static {
    /// Sandbox `id`; `None` when there is none.
    fn sandbox<'a>(&'a self, id: &'a str) -> Fut<'a, Option<pb::Sandbox>>;
    /// Creates a container.
    fn create(&self, req: pb::CreateContainerRequest) -> Fut<'_, pb::Container>;
    /// Container `id`; `None` when there is none.
    fn get<'a>(&'a self, id: &'a str) -> Fut<'a, Option<pb::Container>>;
    /// Every container, stopped ones too.
    fn list(&self) -> Fut<'_, Vec<pb::Container>>;
    /// Starts container `id`.
    fn start<'a>(&'a self, id: &'a str) -> Fut<'a, ()>;
    /// Stops container `id` (SIGKILL after `timeout` seconds); `false` when there is none.
    fn stop<'a>(&'a self, id: &'a str, timeout: i64) -> Fut<'a, bool>;
    /// Removes container `id`, killing it first; `false` when there is none.
    fn remove<'a>(&'a self, id: &'a str) -> Fut<'a, bool>;
    /// Sets the resources of container `id`.
    fn update<'a>(&'a self, id: &'a str, resources: pb::Resources) -> Fut<'a, ()>;
    /// Reopens the log file of container `id`.
    fn reopen_log<'a>(&'a self, id: &'a str) -> Fut<'a, ()>;
}

/// [`ContainerStore`] over berth-engine.
#[derive(Debug, Clone)]
pub struct GrpcContainerStore {
    containers: ContainersClient<Channel>,
    tasks: TasksClient<Channel>,
    sandboxes: SandboxesClient<Channel>,
}

impl GrpcContainerStore {
    /// A store over the engine listening on `engine`.
    pub fn new(engine: &Path) -> Self {
        let ch = channel(engine);
        Self {
            containers: ContainersClient::new(ch.clone())
                .max_decoding_message_size(crate::MAX_MESSAGE),
            tasks: TasksClient::new(ch.clone()).max_decoding_message_size(crate::MAX_MESSAGE),
            sandboxes: SandboxesClient::new(ch).max_decoding_message_size(crate::MAX_MESSAGE),
        }
    }
}

impl ContainerStore for GrpcContainerStore {
    fn sandbox<'a>(&'a self, id: &'a str) -> Fut<'a, Option<pb::Sandbox>> {
        Box::pin(async move {
            let r = self
                .sandboxes
                .clone()
                .get(pb::GetSandboxRequest {
                    id: id.into(),
                    verbose: false,
                })
                .await;
            Ok(not_found_is_none(r.map(tonic::Response::into_inner))?.and_then(|g| g.sandbox))
        })
    }

    fn create(&self, req: pb::CreateContainerRequest) -> Fut<'_, pb::Container> {
        Box::pin(async move {
            self.containers
                .clone()
                .create(req)
                .await?
                .into_inner()
                .container
                .ok_or_else(|| Error::internal("berth-engine answered Create without a container"))
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> Fut<'a, Option<pb::Container>> {
        Box::pin(async move {
            let r = self
                .containers
                .clone()
                .get(pb::GetContainerRequest {
                    id: id.into(),
                    size: false,
                })
                .await;
            Ok(not_found_is_none(r.map(tonic::Response::into_inner))?.and_then(|g| g.container))
        })
    }

    fn list(&self) -> Fut<'_, Vec<pb::Container>> {
        Box::pin(async move {
            Ok(self
                .containers
                .clone()
                .list(pb::ListContainersRequest {
                    all: true,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .containers)
        })
    }

    fn start<'a>(&'a self, id: &'a str) -> Fut<'a, ()> {
        Box::pin(async move {
            self.tasks
                .clone()
                .start(pb::StartTaskRequest { id: id.into() })
                .await?;
            Ok(())
        })
    }

    fn stop<'a>(&'a self, id: &'a str, timeout: i64) -> Fut<'a, bool> {
        Box::pin(async move {
            let r = self
                .tasks
                .clone()
                .stop(pb::StopTaskRequest {
                    id: id.into(),
                    signal: String::new(),
                    timeout_seconds: Some(timeout.max(0)),
                })
                .await;
            Ok(not_found_is_none(r.map(tonic::Response::into_inner))?.is_some())
        })
    }

    fn remove<'a>(&'a self, id: &'a str) -> Fut<'a, bool> {
        Box::pin(async move {
            let r = self
                .containers
                .clone()
                .delete(pb::DeleteContainerRequest {
                    id: id.into(),
                    force: true,
                    ..Default::default()
                })
                .await;
            Ok(not_found_is_none(r.map(tonic::Response::into_inner))?.is_some())
        })
    }

    fn update<'a>(&'a self, id: &'a str, resources: pb::Resources) -> Fut<'a, ()> {
        Box::pin(async move {
            self.containers
                .clone()
                .update(pb::UpdateContainerRequest {
                    id: id.into(),
                    resources: Some(resources),
                    ..Default::default()
                })
                .await?;
            Ok(())
        })
    }

    fn reopen_log<'a>(&'a self, id: &'a str) -> Fut<'a, ()> {
        Box::pin(async move {
            self.tasks
                .clone()
                .reopen_log(pb::ReopenLogRequest { id: id.into() })
                .await?;
            Ok(())
        })
    }
}

/// The container methods of the RuntimeService.
#[derive(Clone)]
pub struct Containers {
    store: Arc<dyn ContainerStore>,
}

impl std::fmt::Debug for Containers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Containers").finish_non_exhaustive()
    }
}

impl Containers {
    /// Containers kept in `store`.
    pub fn new(store: impl ContainerStore) -> Self {
        Self {
            store: Arc::new(store),
        }
    }

    /// CreateContainer: NOT_FOUND for an unknown pod, FAILED_PRECONDITION for one that is not
    /// ready, ALREADY_EXISTS for a name (and attempt) the pod already has.
    pub async fn create(
        &self,
        req: cri::CreateContainerRequest,
    ) -> Result<cri::CreateContainerResponse> {
        if req.pod_sandbox_id.is_empty() {
            return Err(Error::invalid_argument("pod_sandbox_id is required"));
        }
        let sandbox = self
            .store
            .sandbox(&req.pod_sandbox_id)
            .await?
            .ok_or_else(|| {
                Error::not_found(format!("pod sandbox {} not found", req.pod_sandbox_id))
            })?;
        if sandbox.state != pb::SandboxState::Ready as i32 {
            return Err(Error::failed_precondition(format!(
                "pod sandbox {} is not ready",
                sandbox.id
            )));
        }
        let create = create_request(req, &sandbox)?;
        let name = create.name.clone();
        let container = self.store.create(create).await.map_err(|e| {
            if e.is(ErrorKind::AlreadyExists) {
                Error::already_exists(format!("container name {name} is already in use"))
            } else {
                e
            }
        })?;
        Ok(cri::CreateContainerResponse {
            container_id: container.id,
        })
    }

    /// StartContainer.
    pub async fn start(
        &self,
        req: cri::StartContainerRequest,
    ) -> Result<cri::StartContainerResponse> {
        let id = required_id(&req.container_id, "container_id")?;
        self.cri_container(id).await?;
        self.store.start(id).await?;
        Ok(cri::StartContainerResponse {})
    }

    /// StopContainer: SIGKILL after `timeout` seconds; one that is gone is stopped.
    pub async fn stop(&self, req: cri::StopContainerRequest) -> Result<cri::StopContainerResponse> {
        let id = required_id(&req.container_id, "container_id")?;
        if !self.store.stop(id, req.timeout).await? {
            tracing::debug!(id, "StopContainer of a container that is gone");
        }
        Ok(cri::StopContainerResponse {})
    }

    /// RemoveContainer: one that is gone is removed.
    pub async fn remove(
        &self,
        req: cri::RemoveContainerRequest,
    ) -> Result<cri::RemoveContainerResponse> {
        let id = required_id(&req.container_id, "container_id")?;
        if !self.store.remove(id).await? {
            tracing::debug!(id, "RemoveContainer of a container that is gone");
        }
        Ok(cri::RemoveContainerResponse {})
    }

    /// ContainerStatus; NOT_FOUND for an unknown id or a container that is not a pod's.
    pub async fn status(
        &self,
        req: cri::ContainerStatusRequest,
    ) -> Result<cri::ContainerStatusResponse> {
        let id = required_id(&req.container_id, "container_id")?;
        let (c, blob) = self.cri_container(id).await?;
        Ok(cri::ContainerStatusResponse {
            status: Some(status_of(&c, blob)),
            info: HashMap::new(),
        })
    }

    /// ListContainers: the pods' containers matching the filter.
    pub async fn list(
        &self,
        req: cri::ListContainersRequest,
    ) -> Result<cri::ListContainersResponse> {
        let filter = req.filter.unwrap_or_default();
        let containers = self
            .store
            .list()
            .await?
            .into_iter()
            .filter_map(|c| blob_of(&c).map(|b| container_of(&c, b)))
            .filter(|c| matches(c, &filter))
            .collect();
        Ok(cri::ListContainersResponse { containers })
    }

    /// UpdateContainerResources.
    pub async fn update(
        &self,
        req: cri::UpdateContainerResourcesRequest,
    ) -> Result<cri::UpdateContainerResourcesResponse> {
        let id = required_id(&req.container_id, "container_id")?;
        if req.windows.is_some() {
            return Err(Error::invalid_argument(
                "Windows container resources cannot apply on berth (Linux only)",
            ));
        }
        self.cri_container(id).await?;
        let linux = req.linux.unwrap_or_default();
        let (resources, _) = resources(&linux);
        self.store.update(id, resources).await?;
        Ok(cri::UpdateContainerResourcesResponse {})
    }

    /// ReopenContainerLog.
    pub async fn reopen_log(
        &self,
        req: cri::ReopenContainerLogRequest,
    ) -> Result<cri::ReopenContainerLogResponse> {
        let id = required_id(&req.container_id, "container_id")?;
        self.cri_container(id).await?;
        self.store.reopen_log(id).await?;
        Ok(cri::ReopenContainerLogResponse {})
    }

    /// Container `id` and its CRI request; NOT_FOUND unless it is a pod's.
    async fn cri_container(
        &self,
        id: &str,
    ) -> Result<(pb::Container, cri::CreateContainerRequest)> {
        let c = self
            .store
            .get(id)
            .await?
            .ok_or_else(|| Error::not_found(format!("container {id} not found")))?;
        let blob = blob_of(&c)
            .ok_or_else(|| Error::not_found(format!("container {id} is not a CRI container")))?;
        Ok((c, blob))
    }
}

/// The CRI request kept with container `c`; `None` for a container that is not a pod's.
pub(crate) fn blob_of(c: &pb::Container) -> Option<cri::CreateContainerRequest> {
    let ext = c.extensions.get(EXTENSION)?;
    cri::CreateContainerRequest::decode(ext.data.as_slice()).ok()
}

/// The name dockershim gave a pod's container.
pub fn container_name(meta: &cri::ContainerMetadata, pod: &pb::SandboxMetadata) -> String {
    format!(
        "k8s_{}_{}_{}_{}_{}",
        meta.name, pod.name, pod.namespace, pod.uid, meta.attempt
    )
}

/// The engine's Create request for a CRI one. What berth cannot honour is refused.
pub fn create_request(
    req: cri::CreateContainerRequest,
    sandbox: &pb::Sandbox,
) -> Result<pb::CreateContainerRequest> {
    let config = req
        .config
        .clone()
        .ok_or_else(|| Error::invalid_argument("CreateContainer needs a config"))?;
    let meta = config
        .metadata
        .clone()
        .ok_or_else(|| Error::invalid_argument("the container config needs metadata"))?;
    if meta.name.is_empty() {
        return Err(Error::invalid_argument(
            "the container metadata needs a name",
        ));
    }
    if config.windows.is_some() {
        return Err(Error::invalid_argument(
            "a Windows container config cannot run on berth (Linux only)",
        ));
    }
    if !config.cdi_devices.is_empty() {
        return Err(Error::invalid_argument(
            "CDI devices are not supported by berth",
        ));
    }
    let image = config
        .image
        .as_ref()
        .map(|i| i.image.clone())
        .filter(|i| !i.is_empty())
        .ok_or_else(|| Error::invalid_argument("the container config needs an image"))?;
    let sconf = sandbox.config.clone().unwrap_or_default();
    let pod = sconf.metadata.clone().unwrap_or_default();
    let name = container_name(&meta, &pod);

    let mut labels = config.labels.clone();
    labels.insert("io.kubernetes.container.name".into(), meta.name.clone());
    labels.insert("io.kubernetes.pod.name".into(), pod.name.clone());
    labels.insert("io.kubernetes.pod.namespace".into(), pod.namespace.clone());
    labels.insert("io.kubernetes.pod.uid".into(), pod.uid.clone());
    labels.insert("io.kubernetes.sandbox.id".into(), sandbox.id.clone());
    labels.insert("io.kubernetes.docker.type".into(), "container".into());

    let mut host = pb::HostConfig {
        sandbox_id: sandbox.id.clone(),
        annotations: config.annotations.clone(),
        ..Default::default()
    };
    host.mounts = config
        .mounts
        .iter()
        .map(mount)
        .collect::<Result<Vec<_>>>()?;
    host.devices = config
        .devices
        .iter()
        .map(|d| pb::DeviceMapping {
            path_on_host: d.host_path.clone(),
            path_in_container: d.container_path.clone(),
            cgroup_permissions: if d.permissions.is_empty() {
                "rwm".into()
            } else {
                d.permissions.clone()
            },
        })
        .collect();
    host.log_config = Some(log_config(&sconf.log_directory, &config.log_path)?);

    let mut cfg = pb::ContainerConfig {
        image,
        env: config
            .envs
            .iter()
            .map(|kv| format!("{}={}", kv.key, kv.value))
            .collect(),
        working_dir: config.working_dir.clone(),
        labels,
        tty: config.tty,
        open_stdin: config.stdin,
        stdin_once: config.stdin_once,
        ..Default::default()
    };
    // CRI command replaces the image's entrypoint (and with it its cmd); args replace the cmd.
    if !config.command.is_empty() {
        cfg.entrypoint = Some(types::StringList {
            values: config.command.clone(),
        });
    }
    if !config.command.is_empty() || !config.args.is_empty() {
        cfg.cmd = Some(types::StringList {
            values: config.args.clone(),
        });
    }
    if let Some(linux) = &config.linux {
        if let Some(r) = &linux.resources {
            let (res, oom) = resources(r);
            host.resources = Some(res);
            host.oom_score_adj = oom;
        }
        if let Some(sc) = &linux.security_context {
            security(sc, &mut cfg, &mut host)?;
        }
    }

    let mut blob = req;
    blob.sandbox_config = None;
    let mut extensions = HashMap::new();
    extensions.insert(
        EXTENSION.to_string(),
        types::Extension {
            version: EXTENSION_VERSION,
            data: blob.encode_to_vec(),
        },
    );
    Ok(pb::CreateContainerRequest {
        name,
        config: Some(cfg),
        host_config: Some(host),
        extensions,
        ..Default::default()
    })
}

/// The container's log: `path` under the pod's log directory `dir` (kubelet sends
/// `<name>/<attempt>.log` under `/var/log/pods/<pod>`). A path that would land outside the
/// directory (absolute, or with `..`), or one without a directory to be under, is refused
/// rather than written somewhere kubelet does not look.
fn log_config(dir: &str, path: &str) -> Result<pb::LogConfig> {
    use std::path::Component;
    if path.is_empty() {
        return Ok(pb::LogConfig {
            r#type: "none".into(),
            options: HashMap::new(),
        });
    }
    if dir.is_empty() || !Path::new(dir).is_absolute() {
        return Err(Error::invalid_argument(format!(
            "log path {path:?} needs the pod sandbox's log_directory to be an absolute path (it is {dir:?})"
        )));
    }
    let rel = Path::new(path);
    if path.contains('\0')
        || !rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        || path.ends_with('/')
    {
        return Err(Error::invalid_argument(format!(
            "log path {path:?} must be a file path relative to the pod's log directory, without '..'"
        )));
    }
    let full = Path::new(dir).join(rel);
    Ok(pb::LogConfig {
        r#type: "cri".into(),
        options: HashMap::from([("path".to_string(), full.to_string_lossy().into_owned())]),
    })
}

fn mount(m: &cri::Mount) -> Result<pb::MountSpec> {
    use cri::MountPropagation as P;
    if m.image.is_some() {
        return Err(Error::invalid_argument(
            "image volume mounts are not supported by berth",
        ));
    }
    if !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty() {
        return Err(Error::invalid_argument(
            "id-mapped mounts are not supported by berth",
        ));
    }
    if m.container_path.is_empty() || m.host_path.is_empty() {
        return Err(Error::invalid_argument(
            "a mount needs a container_path and a host_path",
        ));
    }
    let propagation = match P::try_from(m.propagation) {
        Ok(P::PropagationPrivate) => pb::Propagation::Rprivate,
        Ok(P::PropagationHostToContainer) => pb::Propagation::Rslave,
        Ok(P::PropagationBidirectional) => pb::Propagation::Rshared,
        Err(_) => {
            return Err(Error::invalid_argument(format!(
                "unknown mount propagation {}",
                m.propagation
            )));
        }
    };
    if m.recursive_read_only && !m.readonly {
        return Err(Error::invalid_argument(
            "recursive_read_only needs readonly",
        ));
    }
    // A host path that is a symlink mounts what it points to (as containerd does).
    let source = std::fs::canonicalize(&m.host_path)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| m.host_path.clone());
    Ok(pb::MountSpec {
        r#type: pb::MountType::Bind as i32,
        source,
        target: m.container_path.clone(),
        read_only: m.readonly,
        bind: Some(pb::BindOptions {
            propagation: propagation as i32,
            create_host_path: true,
            read_only_force_recursive: m.recursive_read_only,
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn positive(v: i64) -> Option<i64> {
    (v > 0).then_some(v)
}

/// The engine's resources for the CRI's, and the OOM score.
fn resources(r: &cri::LinuxContainerResources) -> (pb::Resources, i32) {
    let res = pb::Resources {
        memory: positive(r.memory_limit_in_bytes),
        memory_swap: positive(r.memory_swap_limit_in_bytes),
        cpu_shares: positive(r.cpu_shares),
        cpu_period: positive(r.cpu_period),
        cpu_quota: positive(r.cpu_quota),
        cpuset_cpus: Some(r.cpuset_cpus.clone()).filter(|s| !s.is_empty()),
        cpuset_mems: Some(r.cpuset_mems.clone()).filter(|s| !s.is_empty()),
        unified: r.unified.clone(),
        hugepage_limits: r
            .hugepage_limits
            .iter()
            .map(|h| pb::HugepageLimit {
                page_size: h.page_size.clone(),
                limit: h.limit,
            })
            .collect(),
        ..Default::default()
    };
    let oom = i32::try_from(r.oom_score_adj).unwrap_or(0);
    (res, oom)
}

fn back_resources(r: &pb::Resources, oom: i32) -> cri::LinuxContainerResources {
    cri::LinuxContainerResources {
        cpu_period: r.cpu_period.unwrap_or(0),
        cpu_quota: r.cpu_quota.unwrap_or(0),
        cpu_shares: r.cpu_shares.unwrap_or(0),
        memory_limit_in_bytes: r.memory.unwrap_or(0),
        memory_swap_limit_in_bytes: r.memory_swap.unwrap_or(0),
        oom_score_adj: i64::from(oom),
        cpuset_cpus: r.cpuset_cpus.clone().unwrap_or_default(),
        cpuset_mems: r.cpuset_mems.clone().unwrap_or_default(),
        unified: r.unified.clone(),
        hugepage_limits: r
            .hugepage_limits
            .iter()
            .map(|h| cri::HugepageLimit {
                page_size: h.page_size.clone(),
                limit: h.limit,
            })
            .collect(),
    }
}

// `seccomp_profile_path` and `apparmor_profile` are deprecated but older kubelets still send them.
#[allow(deprecated)]
fn security(
    sc: &cri::LinuxContainerSecurityContext,
    cfg: &mut pb::ContainerConfig,
    host: &mut pb::HostConfig,
) -> Result<()> {
    use cri::security_profile::ProfileType;
    if let Some(ns) = &sc.namespace_options {
        // NODE is the host's user namespace, what every container gets: kubelets with user
        // namespace support send it for every pod that does not ask for one of its own.
        if let Some(userns) = &ns.userns_options
            && userns.mode != cri::NamespaceMode::Node as i32
        {
            return Err(Error::invalid_argument(
                "user namespaces for pods are not supported by berth",
            ));
        }
        if ns.pid == cri::NamespaceMode::Target as i32 {
            if ns.target_id.is_empty() {
                return Err(Error::invalid_argument(
                    "the TARGET pid namespace mode needs target_id",
                ));
            }
            host.pid_mode = format!("container:{}", ns.target_id);
        }
    }
    // The user: a uid or a name, with the group when one is given.
    let user = match (&sc.run_as_user, sc.run_as_username.as_str()) {
        (Some(u), _) => u.value.to_string(),
        (None, name) => name.to_string(),
    };
    cfg.user = match (&sc.run_as_group, user.is_empty()) {
        (Some(g), false) => format!("{user}:{}", g.value),
        (Some(_), true) => {
            return Err(Error::invalid_argument(
                "run_as_group needs run_as_user or run_as_username",
            ));
        }
        (None, _) => user,
    };
    host.group_add = sc
        .supplemental_groups
        .iter()
        .map(ToString::to_string)
        .collect();
    host.strict_supplemental_groups =
        match cri::SupplementalGroupsPolicy::try_from(sc.supplemental_groups_policy) {
            Ok(cri::SupplementalGroupsPolicy::Merge) => false,
            Ok(cri::SupplementalGroupsPolicy::Strict) => true,
            Err(_) => {
                return Err(Error::invalid_argument(format!(
                    "unknown supplemental groups policy {}",
                    sc.supplemental_groups_policy
                )));
            }
        };
    let seccomp_profile = if sc.privileged {
        "unconfined".to_string()
    } else {
        match &sc.seccomp {
            None => match sc.seccomp_profile_path.as_str() {
                "" | "unconfined" => "unconfined".into(),
                "runtime/default" | "docker/default" => String::new(),
                p => localhost_seccomp(p.strip_prefix("localhost/").unwrap_or(p))?,
            },
            Some(p) => match ProfileType::try_from(p.profile_type) {
                Ok(ProfileType::RuntimeDefault) => String::new(),
                Ok(ProfileType::Unconfined) => "unconfined".into(),
                Ok(ProfileType::Localhost) => localhost_seccomp(&p.localhost_ref)?,
                Err(_) => {
                    return Err(Error::invalid_argument(format!(
                        "unknown seccomp profile type {}",
                        p.profile_type
                    )));
                }
            },
        }
    };
    let apparmor_profile = match &sc.apparmor {
        None => match sc.apparmor_profile.as_str() {
            "" | "runtime/default" => String::new(),
            "unconfined" => "unconfined".into(),
            p => p.strip_prefix("localhost/").unwrap_or(p).to_string(),
        },
        Some(p) => match ProfileType::try_from(p.profile_type) {
            Ok(ProfileType::RuntimeDefault) => String::new(),
            Ok(ProfileType::Unconfined) => "unconfined".into(),
            Ok(ProfileType::Localhost) if !p.localhost_ref.is_empty() => p.localhost_ref.clone(),
            _ => {
                return Err(Error::invalid_argument(
                    "an AppArmor profile needs a known type (and localhost_ref for Localhost)",
                ));
            }
        },
    };
    let caps = sc.capabilities.clone().unwrap_or_default();
    if !caps.add_ambient_capabilities.is_empty() {
        return Err(Error::invalid_argument(
            "ambient capabilities are not supported by berth",
        ));
    }
    let list = |v: &Vec<String>| (!v.is_empty()).then(|| types::StringList { values: v.clone() });
    host.security = Some(pb::SecurityOptions {
        privileged: sc.privileged,
        cap_add: caps.add_capabilities,
        cap_drop: caps.drop_capabilities,
        no_new_privileges: sc.no_new_privs,
        seccomp_profile,
        apparmor_profile,
        read_only_rootfs: sc.readonly_rootfs,
        masked_paths: list(&sc.masked_paths),
        readonly_paths: list(&sc.readonly_paths),
        label_options: Vec::new(),
    });
    Ok(())
}

/// A Localhost seccomp profile: the JSON of the file `path` names on this host.
fn localhost_seccomp(path: &str) -> Result<String> {
    if path.is_empty() {
        return Err(Error::invalid_argument(
            "a Localhost seccomp profile needs localhost_ref",
        ));
    }
    std::fs::read_to_string(path).map_err(|e| {
        Error::invalid_argument(format!("cannot read the seccomp profile {path}: {e}"))
    })
}

fn state_of(c: &pb::Container) -> cri::ContainerState {
    use pb::ContainerStatus as S;
    let status = c.state.as_ref().map_or(0, |s| s.status);
    match S::try_from(status) {
        Ok(S::Created) => cri::ContainerState::ContainerCreated,
        Ok(S::Running | S::Paused | S::Restarting) => cri::ContainerState::ContainerRunning,
        Ok(S::Exited | S::Dead) => cri::ContainerState::ContainerExited,
        _ => cri::ContainerState::ContainerUnknown,
    }
}

fn container_of(c: &pb::Container, blob: cri::CreateContainerRequest) -> cri::Container {
    let config = blob.config.unwrap_or_default();
    cri::Container {
        id: c.id.clone(),
        pod_sandbox_id: blob.pod_sandbox_id,
        metadata: config.metadata,
        image: config.image,
        image_ref: c.image_id.clone(),
        image_id: c.image_id.clone(),
        state: state_of(c) as i32,
        created_at: nanos(c.created.as_ref()),
        labels: config.labels,
        annotations: config.annotations,
    }
}

fn status_of(c: &pb::Container, blob: cri::CreateContainerRequest) -> cri::ContainerStatus {
    let state = state_of(c);
    let st = c.state.clone().unwrap_or_default();
    let config = blob.config.unwrap_or_default();
    let (reason, exit_code) = if state == cri::ContainerState::ContainerExited {
        let reason = if st.oom_killed {
            "OOMKilled"
        } else if st.exit_code == 0 {
            "Completed"
        } else {
            "Error"
        };
        (reason.to_string(), st.exit_code)
    } else {
        (String::new(), 0)
    };
    let host = c.host_config.clone().unwrap_or_default();
    let resources = host
        .resources
        .as_ref()
        .map(|r| back_resources(r, host.oom_score_adj));
    let log_path = host
        .log_config
        .as_ref()
        .and_then(|l| l.options.get("path").cloned())
        .unwrap_or_default();
    let user = c.process_user.as_ref().map(|u| cri::ContainerUser {
        linux: Some(cri::LinuxContainerUser {
            uid: i64::from(u.uid),
            gid: i64::from(u.gid),
            // As containerd answers it (and `id -G` prints it): the primary group first.
            supplemental_groups: std::iter::once(u.gid)
                .chain(u.additional_gids.iter().copied().filter(|g| *g != u.gid))
                .map(i64::from)
                .collect(),
        }),
    });
    cri::ContainerStatus {
        id: c.id.clone(),
        metadata: config.metadata,
        state: state as i32,
        created_at: nanos(c.created.as_ref()),
        started_at: nanos(st.started_at.as_ref()),
        finished_at: if state == cri::ContainerState::ContainerExited {
            nanos(st.finished_at.as_ref())
        } else {
            0
        },
        exit_code,
        image: config.image,
        image_ref: c.image_id.clone(),
        image_id: c.image_id.clone(),
        reason,
        message: st.error,
        labels: config.labels,
        annotations: config.annotations,
        mounts: config.mounts,
        log_path,
        resources: resources.map(|linux| cri::ContainerResources {
            linux: Some(linux),
            windows: None,
        }),
        user,
    }
}

fn matches(c: &cri::Container, f: &cri::ContainerFilter) -> bool {
    if !f.id.is_empty() && !c.id.starts_with(&f.id) {
        return false;
    }
    if let Some(s) = &f.state
        && s.state != c.state
    {
        return false;
    }
    if !f.pod_sandbox_id.is_empty() && !c.pod_sandbox_id.starts_with(&f.pod_sandbox_id) {
        return false;
    }
    f.label_selector
        .iter()
        .all(|(k, v)| c.labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Fake {
        sandboxes: Vec<pb::Sandbox>,
        containers: Mutex<Vec<pb::Container>>,
    }

    impl ContainerStore for Fake {
        fn sandbox<'a>(&'a self, id: &'a str) -> Fut<'a, Option<pb::Sandbox>> {
            Box::pin(async move { Ok(self.sandboxes.iter().find(|s| s.id == id).cloned()) })
        }
        fn create(&self, req: pb::CreateContainerRequest) -> Fut<'_, pb::Container> {
            Box::pin(async move {
                let mut cs = self.containers.lock().unwrap();
                if cs.iter().any(|c| c.name == req.name) {
                    return Err(Error::already_exists("name in use"));
                }
                let c = pb::Container {
                    id: format!("c{}", cs.len()),
                    name: req.name,
                    config: req.config,
                    host_config: req.host_config,
                    extensions: req.extensions,
                    process_user: Some(pb::ProcessUser {
                        uid: 1000,
                        gid: 10,
                        additional_gids: vec![5, 10],
                    }),
                    state: Some(pb::ContainerState {
                        status: pb::ContainerStatus::Created as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                cs.push(c.clone());
                Ok(c)
            })
        }
        fn get<'a>(&'a self, id: &'a str) -> Fut<'a, Option<pb::Container>> {
            Box::pin(async move {
                let cs = self.containers.lock().unwrap();
                Ok(cs.iter().find(|c| c.id == id).cloned())
            })
        }
        fn list(&self) -> Fut<'_, Vec<pb::Container>> {
            Box::pin(async move { Ok(self.containers.lock().unwrap().clone()) })
        }
        fn start<'a>(&'a self, id: &'a str) -> Fut<'a, ()> {
            Box::pin(async move {
                self.set(id, pb::ContainerStatus::Running, 0);
                Ok(())
            })
        }
        fn stop<'a>(&'a self, id: &'a str, _timeout: i64) -> Fut<'a, bool> {
            Box::pin(async move { Ok(self.set(id, pb::ContainerStatus::Exited, 137)) })
        }
        fn remove<'a>(&'a self, id: &'a str) -> Fut<'a, bool> {
            Box::pin(async move {
                let mut cs = self.containers.lock().unwrap();
                let n = cs.len();
                cs.retain(|c| c.id != id);
                Ok(cs.len() != n)
            })
        }
        fn update<'a>(&'a self, _id: &'a str, _r: pb::Resources) -> Fut<'a, ()> {
            Box::pin(async move { Ok(()) })
        }
        fn reopen_log<'a>(&'a self, _id: &'a str) -> Fut<'a, ()> {
            Box::pin(async move { Ok(()) })
        }
    }

    impl Fake {
        fn set(&self, id: &str, status: pb::ContainerStatus, code: i32) -> bool {
            let mut cs = self.containers.lock().unwrap();
            let Some(c) = cs.iter_mut().find(|c| c.id == id) else {
                return false;
            };
            let st = c.state.get_or_insert_default();
            st.status = status as i32;
            st.exit_code = code;
            true
        }
    }

    fn sandbox(id: &str, state: pb::SandboxState) -> pb::Sandbox {
        pb::Sandbox {
            id: id.into(),
            state: state as i32,
            config: Some(pb::SandboxConfig {
                metadata: Some(pb::SandboxMetadata {
                    name: "web".into(),
                    namespace: "default".into(),
                    uid: "u1".into(),
                    attempt: 0,
                }),
                log_directory: "/var/log/pods/p".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn request(pod: &str, name: &str) -> cri::CreateContainerRequest {
        cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: name.into(),
                    attempt: 2,
                }),
                image: Some(cri::ImageSpec {
                    image: "busybox".into(),
                    ..Default::default()
                }),
                command: vec!["sh".into()],
                args: vec!["-c".into(), "true".into()],
                envs: vec![cri::KeyValue {
                    key: "A".into(),
                    value: "b".into(),
                }],
                labels: HashMap::from([("app".into(), "x".into())]),
                log_path: "c/2.log".into(),
                mounts: vec![cri::Mount {
                    container_path: "/data".into(),
                    host_path: "/nonexistent-host-dir".into(),
                    readonly: true,
                    recursive_read_only: true,
                    propagation: cri::MountPropagation::PropagationHostToContainer as i32,
                    ..Default::default()
                }],
                linux: Some(cri::LinuxContainerConfig {
                    resources: Some(cri::LinuxContainerResources {
                        memory_limit_in_bytes: 1 << 26,
                        oom_score_adj: 500,
                        ..Default::default()
                    }),
                    security_context: Some(cri::LinuxContainerSecurityContext {
                        run_as_user: Some(cri::Int64Value { value: 1000 }),
                        run_as_group: Some(cri::Int64Value { value: 10 }),
                        supplemental_groups: vec![5],
                        supplemental_groups_policy: cri::SupplementalGroupsPolicy::Strict as i32,
                        capabilities: Some(cri::Capability {
                            drop_capabilities: vec!["ALL".into()],
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
            sandbox_config: None,
        }
    }

    #[test]
    fn a_cri_config_becomes_the_engine_request() {
        let sbx = sandbox("p1", pb::SandboxState::Ready);
        let req = create_request(request("p1", "app"), &sbx).unwrap();
        assert_eq!(req.name, "k8s_app_web_default_u1_2");
        let cfg = req.config.unwrap();
        assert_eq!(cfg.entrypoint.unwrap().values, ["sh"]);
        assert_eq!(cfg.cmd.unwrap().values, ["-c", "true"]);
        assert_eq!(cfg.env, ["A=b"]);
        assert_eq!(cfg.user, "1000:10");
        assert_eq!(cfg.labels["io.kubernetes.pod.namespace"], "default");
        let host = req.host_config.unwrap();
        assert_eq!(host.sandbox_id, "p1");
        assert!(host.strict_supplemental_groups);
        assert_eq!(host.group_add, ["5"]);
        assert_eq!(host.oom_score_adj, 500);
        assert_eq!(host.resources.unwrap().memory, Some(1 << 26));
        let log = host.log_config.unwrap();
        assert_eq!(log.r#type, "cri");
        assert_eq!(log.options["path"], "/var/log/pods/p/c/2.log");
        let m = &host.mounts[0];
        let bind = m.bind.unwrap();
        assert_eq!(bind.propagation, pb::Propagation::Rslave as i32);
        assert!(m.read_only && bind.read_only_force_recursive);
        let sec = host.security.unwrap();
        assert_eq!(sec.cap_drop, ["ALL"]);
        assert_eq!(sec.seccomp_profile, "unconfined");
        assert!(req.extensions.contains_key(EXTENSION));
    }

    #[test]
    fn log_paths_stay_under_the_pod_log_directory() {
        let path = |dir: &str, p: &str| log_config(dir, p).map(|l| l.options["path"].clone());
        assert_eq!(path("/logs/p", "c/0.log").unwrap(), "/logs/p/c/0.log");
        assert_eq!(path("/logs/p", "./c.log").unwrap(), "/logs/p/./c.log");
        assert_eq!(log_config("", "").unwrap().r#type, "none");
        for (dir, p) in [
            ("/logs/p", "/etc/passwd"),
            ("/logs/p", "../other/0.log"),
            ("/logs/p", "c/../../x.log"),
            ("/logs/p", "c/"),
            ("/logs/p", "a\0b"),
            ("", "c/0.log"),
            ("relative", "c/0.log"),
        ] {
            let err = log_config(dir, p).unwrap_err();
            assert!(err.is(ErrorKind::InvalidArgument), "{dir:?} {p:?}: {err}");
        }
    }

    #[test]
    fn what_berth_cannot_honour_is_refused() {
        let sbx = sandbox("p1", pb::SandboxState::Ready);
        let mut r = request("p1", "app");
        r.config.as_mut().unwrap().cdi_devices.push(cri::CdiDevice {
            name: "vendor/gpu=0".into(),
        });
        let err = create_request(r, &sbx).unwrap_err();
        assert!(err.is(ErrorKind::InvalidArgument));
        let mut r = request("p1", "app");
        r.config.as_mut().unwrap().mounts[0].readonly = false;
        assert!(
            create_request(r, &sbx)
                .unwrap_err()
                .is(ErrorKind::InvalidArgument)
        );
        // A user namespace of the pod's own is refused; NODE (the host's) is what berth does.
        let userns = |mode: cri::NamespaceMode| {
            let mut r = request("p1", "app");
            let linux = r.config.as_mut().unwrap().linux.get_or_insert_default();
            let sc = linux.security_context.get_or_insert_default();
            sc.namespace_options.get_or_insert_default().userns_options =
                Some(cri::UserNamespace {
                    mode: mode.into(),
                    ..Default::default()
                });
            create_request(r, &sbx)
        };
        assert!(userns(cri::NamespaceMode::Node).is_ok());
        for mode in [
            cri::NamespaceMode::Pod,
            cri::NamespaceMode::Container,
            cri::NamespaceMode::Target,
        ] {
            let err = userns(mode).unwrap_err();
            assert!(err.is(ErrorKind::InvalidArgument), "{mode:?}: {err}");
        }
    }

    #[tokio::test]
    async fn the_lifecycle_answers_the_cri_rules() {
        let fake = Fake {
            sandboxes: vec![
                sandbox("p1", pb::SandboxState::Ready),
                sandbox("p2", pb::SandboxState::Notready),
            ],
            ..Default::default()
        };
        let cs = Containers::new(fake);
        let err = cs.create(request("nope", "a")).await.unwrap_err();
        assert!(err.is(ErrorKind::NotFound));
        let err = cs.create(request("p2", "a")).await.unwrap_err();
        assert!(err.is(ErrorKind::FailedPrecondition));
        let id = cs.create(request("p1", "a")).await.unwrap().container_id;
        let err = cs.create(request("p1", "a")).await.unwrap_err();
        assert!(err.is(ErrorKind::AlreadyExists));

        let status = |id: &str| {
            let cs = cs.clone();
            let id = id.to_string();
            async move {
                cs.status(cri::ContainerStatusRequest {
                    container_id: id,
                    verbose: false,
                })
                .await
            }
        };
        let st = status(&id).await.unwrap().status.unwrap();
        assert_eq!(st.state, cri::ContainerState::ContainerCreated as i32);
        let user = st.user.clone().unwrap().linux.unwrap();
        assert_eq!(user.supplemental_groups, [10, 5]);
        assert_eq!(st.metadata.unwrap().name, "a");
        assert_eq!(st.labels["app"], "x");
        assert_eq!(st.log_path, "/var/log/pods/p/c/2.log");
        cs.start(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
        cs.stop(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 1,
        })
        .await
        .unwrap();
        let st = status(&id).await.unwrap().status.unwrap();
        assert_eq!(st.state, cri::ContainerState::ContainerExited as i32);
        assert_eq!((st.exit_code, st.reason.as_str()), (137, "Error"));

        let list = |f: cri::ContainerFilter| {
            let cs = cs.clone();
            async move {
                cs.list(cri::ListContainersRequest { filter: Some(f) })
                    .await
                    .unwrap()
                    .containers
            }
        };
        assert_eq!(list(Default::default()).await.len(), 1);
        let by_label = cri::ContainerFilter {
            label_selector: HashMap::from([("app".into(), "y".into())]),
            ..Default::default()
        };
        assert!(list(by_label).await.is_empty());
        let running = cri::ContainerFilter {
            state: Some(cri::ContainerStateValue {
                state: cri::ContainerState::ContainerRunning as i32,
            }),
            ..Default::default()
        };
        assert!(list(running).await.is_empty());

        for _ in 0..2 {
            cs.remove(cri::RemoveContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap();
        }
        cs.stop(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 0,
        })
        .await
        .unwrap();
        assert!(status(&id).await.unwrap_err().is(ErrorKind::NotFound));
    }
}
