//! Pod sandboxes: records with namespaces the engine holds (see `crate::podns`), a pod network
//! from CNI through berth-network, and the pod's hostname, hosts and resolv.conf files.
//!
//! Each sandbox has an operation lock like containers: Run's tail, Stop and Remove are
//! serialized per sandbox. Run writes the record (incomplete) before it makes anything, so a
//! crash half-way leaves a record that the next start tears down.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use berth_core::id::{ObjectKind, resolve};
use berth_core::{Error, ErrorKind, Id, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::events::v1::EventType;
use berth_proto::berth::types::v1 as types;

use super::{Ctr, Engine, now, write_atomic};
use crate::deps::PodNsWant;
use crate::events;
use crate::hostfiles::{self, Resolv};
use crate::sandbox::{self as sb, SandboxPrivate, SandboxRecord};
use crate::spec::Namespace;

/// One sandbox in memory.
pub struct Sbx {
    /// Full id.
    pub id: String,
    op: tokio::sync::Mutex<()>,
    rec: RwLock<SandboxRecord>,
}

impl std::fmt::Debug for Sbx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sbx")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Sbx {
    fn new(rec: SandboxRecord) -> Arc<Self> {
        Arc::new(Self {
            id: rec.id().to_string(),
            op: tokio::sync::Mutex::new(()),
            rec: RwLock::new(rec),
        })
    }

    /// A copy of the record.
    pub fn record(&self) -> SandboxRecord {
        self.rec.read().unwrap().clone()
    }

    fn update<T>(&self, f: impl FnOnce(&mut SandboxRecord) -> T) -> T {
        f(&mut self.rec.write().unwrap())
    }
}

/// Sandboxes by id, and names (a name being created maps to an empty id).
#[derive(Debug, Default)]
pub(crate) struct SandboxRegistry {
    by_id: HashMap<String, Arc<Sbx>>,
    names: HashMap<String, String>,
}

impl SandboxRegistry {
    pub(crate) fn load(records: Vec<SandboxRecord>) -> Self {
        let mut reg = Self::default();
        for rec in records {
            reg.names.insert(rec.s.name.clone(), rec.id().to_string());
            reg.by_id.insert(rec.id().to_string(), Sbx::new(rec));
        }
        reg
    }
}

/// The namespaces a container of a sandbox joins, and the pod's files it binds.
#[derive(Debug, Clone)]
pub(crate) struct SandboxJoin {
    pub network: Namespace,
    pub ipc: Namespace,
    pub uts: Namespace,
    pub pid: Namespace,
    pub files_dir: PathBuf,
    pub netns_path: String,
    /// The pod's /dev/shm, with a pod IPC namespace.
    pub shm: Option<PathBuf>,
}

fn mode(m: i32) -> pb::NamespaceMode {
    pb::NamespaceMode::try_from(m).unwrap_or(pb::NamespaceMode::Pod)
}

impl Engine {
    /// Finds a sandbox by full id, name, or unique id prefix.
    pub fn sandbox(&self, input: &str) -> Result<Arc<Sbx>> {
        let reg = self.sandboxes.lock().unwrap();
        let objects: Vec<(&str, &str)> = reg
            .names
            .iter()
            .filter(|(_, id)| !id.is_empty())
            .map(|(name, id)| (id.as_str(), name.as_str()))
            .collect();
        let id = resolve(ObjectKind("pod sandbox"), input, objects.iter().copied())?.to_string();
        reg.by_id
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("No such pod sandbox: {input}")))
    }

    fn all_sandboxes(&self) -> Vec<Arc<Sbx>> {
        self.sandboxes
            .lock()
            .unwrap()
            .by_id
            .values()
            .cloned()
            .collect()
    }

    /// The containers created in sandbox `id`.
    pub fn sandbox_containers(&self, id: &str) -> Vec<Arc<Ctr>> {
        self.all()
            .into_iter()
            .filter(|c| c.with(|r| r.host_config().sandbox_id == id))
            .collect()
    }

    fn sandbox_event(&self, rec: &SandboxRecord, action: &str) {
        let md = rec.config().metadata.clone().unwrap_or_default();
        let mut attrs: Vec<(String, String)> = rec
            .config()
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        attrs.push(("name".into(), rec.s.name.clone()));
        attrs.push(("podName".into(), md.name));
        attrs.push(("podNamespace".into(), md.namespace));
        attrs.push(("podUID".into(), md.uid));
        attrs.push((
            "state".into(),
            if rec.is_ready() { "ready" } else { "notready" }.into(),
        ));
        let ns = if rec.p.namespace.is_empty() {
            super::DEFAULT_NAMESPACE
        } else {
            rec.p.namespace.as_str()
        };
        self.hub.publish(
            events::docker_event(EventType::Sandbox, action, rec.id(), attrs),
            ns,
        );
    }

    /// The public view: the record plus its containers.
    pub fn describe_sandbox(&self, sbx: &Sbx) -> pb::Sandbox {
        let mut s = sbx.record().s;
        let mut ids: Vec<String> = self
            .sandbox_containers(&sbx.id)
            .into_iter()
            .map(|c| c.id.clone())
            .collect();
        ids.sort();
        s.container_ids = ids;
        s
    }

    /// Runs a pod sandbox (state READY). On failure nothing is left behind.
    pub async fn run_sandbox(
        self: &Arc<Self>,
        req: pb::RunSandboxRequest,
        namespace: &str,
    ) -> Result<pb::Sandbox> {
        let name = sb::validate(&req)?;
        // The handler is recorded as sent ("" is the default runtime), as containerd does:
        // the pod's status reads back what kubelet asked for.
        let runtime = req.runtime_handler.clone();
        if !runtime.is_empty()
            && runtime != self.config.engine.default_runtime()
            && !self.config.engine.runtimes.contains_key(&runtime)
        {
            return Err(Error::invalid_argument(format!(
                "unknown runtime handler {runtime:?}"
            )));
        }
        let vm = self
            .config
            .engine
            .runtimes
            .get(&runtime)
            .is_some_and(|r| r.path == berth_core::vm::VM_RUNTIME);
        if vm {
            // berth-vm boots one VM per container; a pod needs one VM holding all of its
            // containers around the pod's namespaces, which it does not do yet.
            return Err(Error::unimplemented(format!(
                "runtime handler {runtime:?} ({}): VM-isolated pods (one VM per pod) are not \
                 supported yet; berth-vm runs Docker API containers only",
                berth_core::vm::VM_RUNTIME
            )));
        }
        let id = Id::random().to_string();
        {
            let mut reg = self.sandboxes.lock().unwrap();
            if let Some(other) = reg.names.get(&name) {
                return Err(Error::already_exists(format!(
                    "pod sandbox name {name:?} is already reserved for {}",
                    if other.is_empty() {
                        "a sandbox being created"
                    } else {
                        other
                    }
                )));
            }
            reg.names.insert(name.clone(), String::new());
        }
        let cfg = req.config.clone().unwrap_or_default();
        let host_network = mode(sb::ns_options(&cfg).network) == pb::NamespaceMode::Node;
        let hostname = if host_network {
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else if cfg.hostname.is_empty() {
            id[..12].to_string()
        } else {
            cfg.hostname.clone()
        };
        let files_dir = self.paths.sandbox_files.join(&id);
        let rec = SandboxRecord {
            s: pb::Sandbox {
                id: id.clone(),
                name: name.clone(),
                config: Some(pb::SandboxConfig { hostname, ..cfg }),
                state: pb::SandboxState::Notready.into(),
                created: Some(now()),
                runtime_handler: runtime,
                network: Some(pb::SandboxNetworkStatus::default()),
                namespaces: Some(pb::SandboxNamespacePaths::default()),
                hostname_path: files_dir.join("hostname").display().to_string(),
                hosts_path: files_dir.join("hosts").display().to_string(),
                resolv_conf_path: files_dir.join("resolv.conf").display().to_string(),
                pid_holder: 0,
                container_ids: Vec::new(),
                stopped: None,
                network_options: req.network.clone(),
            },
            p: SandboxPrivate {
                namespace: if namespace.is_empty() {
                    super::DEFAULT_NAMESPACE.into()
                } else {
                    namespace.into()
                },
                complete: false,
                ns_dir: self.paths.sandbox_ns.join(&id),
                files_dir,
                cni_added: false,
            },
        };
        if let Err(e) = self.store.put_sandbox(&rec).await {
            self.sandboxes.lock().unwrap().names.remove(&name);
            return Err(e);
        }
        let sbx = Sbx::new(rec);
        let _op = sbx.op.lock().await;
        {
            let mut reg = self.sandboxes.lock().unwrap();
            reg.names.insert(name.clone(), id.clone());
            reg.by_id.insert(id.clone(), sbx.clone());
        }
        match self.set_up_sandbox(&sbx).await {
            Ok(()) => {
                sbx.update(|r| {
                    r.s.state = pb::SandboxState::Ready.into();
                    r.p.complete = true;
                });
                let rec = sbx.record();
                if let Err(e) = self.store.put_sandbox(&rec).await {
                    let _ = self.tear_down_sandbox(&sbx, true).await;
                    self.forget_sandbox(&sbx).await;
                    return Err(e);
                }
                tracing::info!(
                    id,
                    name,
                    ip = rec.s.network.as_ref().map(|n| n.ip.as_str()).unwrap_or(""),
                    "pod sandbox ready"
                );
                self.sandbox_event(&rec, "create");
                self.sandbox_event(&rec, "start");
                Ok(self.describe_sandbox(&sbx))
            }
            Err(e) => {
                tracing::warn!(id, name, error = %e.chain(), "pod sandbox failed to start");
                if let Err(err) = self.tear_down_sandbox(&sbx, true).await {
                    // Typically berth-network restarting: its CNI DEL must come first, so the
                    // namespaces stay until it does.
                    tracing::warn!(id, error = %err.chain(), "tearing down a failed pod sandbox; retrying");
                    self.finish_teardown_later(sbx.clone());
                    return Err(e);
                }
                self.forget_sandbox(&sbx).await;
                Err(e)
            }
        }
    }

    /// Retries the teardown of a sandbox whose Run failed (its record stays incomplete, so an
    /// engine restart meanwhile tears it down too), backing off, until it succeeds or the
    /// sandbox is removed; then forgets it.
    fn finish_teardown_later(self: &Arc<Self>, sbx: Arc<Sbx>) {
        let engine = self.clone();
        tokio::spawn(async move {
            let mut delay = std::time::Duration::from_millis(100);
            loop {
                tokio::time::sleep(delay).await;
                let _op = sbx.op.lock().await;
                if !engine.sandboxes.lock().unwrap().by_id.contains_key(&sbx.id) {
                    return;
                }
                match engine.tear_down_sandbox(&sbx, true).await {
                    Ok(()) => {
                        tracing::info!(id = %sbx.id, "failed pod sandbox torn down");
                        engine.forget_sandbox(&sbx).await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(id = %sbx.id, error = %e.chain(), "tearing down a failed pod sandbox");
                        delay = (delay * 2).min(std::time::Duration::from_secs(30));
                    }
                }
            }
        });
    }

    async fn forget_sandbox(&self, sbx: &Sbx) {
        if let Err(e) = self.store.delete_sandbox(&sbx.id).await {
            tracing::warn!(id = %sbx.id, error = %e.chain(), "deleting a sandbox record");
        }
        let name = sbx.record().s.name;
        let mut reg = self.sandboxes.lock().unwrap();
        reg.by_id.remove(&sbx.id);
        if reg
            .names
            .get(&name)
            .is_some_and(|i| i == &sbx.id || i.is_empty())
        {
            reg.names.remove(&name);
        }
    }

    async fn set_up_sandbox(&self, sbx: &Arc<Sbx>) -> Result<()> {
        let rec = sbx.record();
        let cfg = rec.config().clone();
        let ns = rec.ns_options();
        let (net_mode, ipc_mode, pid_mode) = (mode(ns.network), mode(ns.ipc), mode(ns.pid));
        let host_network = net_mode == pb::NamespaceMode::Node;
        std::fs::create_dir_all(&rec.p.files_dir).map_err(|e| {
            Error::internal(format!("create {}", rec.p.files_dir.display())).with_source(e)
        })?;

        // Namespaces.
        let want = PodNsWant {
            net: !host_network,
            ipc: ipc_mode == pb::NamespaceMode::Pod,
            uts: !host_network,
        };
        let pod_ns = self.deps.pod_ns.clone();
        let dir = rec.p.ns_dir.clone();
        let hostname = cfg.hostname.clone();
        let paths = tokio::task::spawn_blocking(move || pod_ns.create(&dir, want, &hostname))
            .await
            .map_err(|e| Error::internal("pod namespace task").with_source(e))??;
        let show = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        };
        sbx.update(|r| {
            let n = r.s.namespaces.get_or_insert_with(Default::default);
            n.network = show(&paths.net);
            n.ipc = show(&paths.ipc);
            n.uts = show(&paths.uts);
            n.shm = show(&paths.shm);
        });
        if pid_mode == pb::NamespaceMode::Pod {
            let pod_ns = self.deps.pod_ns.clone();
            let dir = rec.p.ns_dir.clone();
            let (pid, file) = tokio::task::spawn_blocking(move || pod_ns.start_pid_holder(&dir))
                .await
                .map_err(|e| Error::internal("pid holder task").with_source(e))??;
            sbx.update(|r| {
                r.s.pid_holder = pid as i32;
                r.s.namespaces.get_or_insert_with(Default::default).pid =
                    file.display().to_string();
            });
            // Recorded at once: a crash from here on must still end the holder.
            self.store.put_sandbox(&sbx.record()).await?;
        }

        // The pod network.
        let mut pod_ip = String::new();
        if let Some(netns) = &paths.net {
            sbx.update(|r| r.p.cni_added = true);
            // Recorded before the ADD, so a crash during it is followed by a DEL.
            self.store.put_sandbox(&sbx.record()).await?;
            let opts = rec.s.network_options.clone().unwrap_or_default();
            let req = sb::cni_request(&rec.s.id, &netns.display().to_string(), &cfg, &opts);
            let resp = self.deps.networks.cni_attach(req).await.map_err(|e| {
                let kind = if e.is(ErrorKind::NotFound) {
                    ErrorKind::FailedPrecondition
                } else {
                    e.kind()
                };
                Error::new(kind, "set up the pod network").with_source(e)
            })?;
            let (ip, more) = sb::pod_ips(&resp);
            pod_ip = ip.clone();
            sbx.update(|r| {
                r.s.network = Some(pb::SandboxNetworkStatus {
                    ip,
                    additional_ips: more,
                    cni_config_name: opts.cni_config_name.clone(),
                    cni_result: resp.result.clone(),
                })
            });
        }

        // The pod's files.
        let files = &rec.p.files_dir;
        write_atomic(
            &files.join("hostname"),
            format!("{}\n", cfg.hostname).as_bytes(),
        )?;
        let hosts = if host_network {
            std::fs::read_to_string("/etc/hosts").unwrap_or_default()
        } else {
            let own = (!pod_ip.is_empty()).then(|| types::HostEntry {
                ip: pod_ip.clone(),
                hostnames: vec![cfg.hostname.clone()],
            });
            hostfiles::hosts(&[], own.as_slice())
        };
        write_atomic(&files.join("hosts"), hosts.as_bytes())?;
        let dns = cfg.dns.clone().unwrap_or_default();
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let resolv = if dns.servers.is_empty() && dns.searches.is_empty() && dns.options.is_empty()
        {
            Resolv::build(
                &Resolv::default(),
                &Resolv::default(),
                &host_resolv,
                host_network,
            )
        } else {
            Resolv {
                servers: dns.servers,
                search: dns.searches,
                options: dns.options,
            }
        };
        write_atomic(&files.join("resolv.conf"), resolv.render().as_bytes())?;
        Ok(())
    }

    /// Releases what a sandbox holds: CNI DEL (when an ADD may have run), the PID holder, and
    /// with `remove` the namespace files and the pod's files. Idempotent.
    async fn tear_down_sandbox(&self, sbx: &Sbx, remove: bool) -> Result<()> {
        let rec = sbx.record();
        let mut first_err = None;
        // Remove DELs again whatever Stop did (DEL is idempotent; berth-network answers an
        // attachment it does not know with success).
        if rec.p.cni_added || (remove && !rec.namespaces().network.is_empty()) {
            let config = rec
                .s
                .network_options
                .as_ref()
                .map(|o| o.cni_config_name.clone())
                .unwrap_or_default();
            match self.deps.networks.cni_detach(&rec.s.id, &config).await {
                Ok(()) => {
                    sbx.update(|r| r.p.cni_added = false);
                }
                Err(e) => {
                    tracing::warn!(id = %rec.s.id, error = %e.chain(), "pod network teardown");
                    first_err =
                        Some(Error::new(e.kind(), "tear down the pod network").with_source(e));
                }
            }
        }
        let ns = rec.namespaces();
        if rec.s.pid_holder != 0 {
            let pod_ns = self.deps.pod_ns.clone();
            let pid = rec.s.pid_holder as u32;
            let file = PathBuf::from(&ns.pid);
            let _ = tokio::task::spawn_blocking(move || pod_ns.stop_pid_holder(pid, &file)).await;
            sbx.update(|r| r.s.pid_holder = 0);
        }
        if remove && first_err.is_none() {
            let pod_ns = self.deps.pod_ns.clone();
            let dir = rec.p.ns_dir.clone();
            let removed = tokio::task::spawn_blocking(move || pod_ns.remove(&dir))
                .await
                .map_err(|e| Error::internal("pod namespace task").with_source(e))
                .and_then(|r| r);
            if let Err(e) = removed {
                first_err = Some(e);
            }
            let files = rec.p.files_dir.clone();
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(files)).await;
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Stops a sandbox: its containers are killed, its network torn down, its PID holder
    /// ended. NOTREADY afterwards.
    pub async fn stop_sandbox(self: &Arc<Self>, input: &str) -> Result<()> {
        let sbx = self.sandbox(input)?;
        let _op = sbx.op.lock().await;
        for ctr in self.sandbox_containers(&sbx.id) {
            if ctr.with(|r| r.is_running() || r.status() == pb::ContainerStatus::Restarting)
                && let Err(e) = self.stop(&ctr.id, "SIGKILL", Some(0)).await
                && !e.is(ErrorKind::NotFound)
            {
                return Err(
                    Error::new(e.kind(), format!("stop container {} of the pod", ctr.id))
                        .with_source(e),
                );
            }
        }
        let was_ready = sbx.record().is_ready();
        let torn = self.tear_down_sandbox(&sbx, false).await;
        sbx.update(|r| {
            r.s.state = pb::SandboxState::Notready.into();
            if r.s.stopped.is_none() {
                r.s.stopped = Some(now());
            }
            if let Some(n) = r.s.network.as_mut() {
                n.ip.clear();
                n.additional_ips.clear();
            }
        });
        let rec = sbx.record();
        self.store.put_sandbox(&rec).await?;
        torn?;
        if was_ready {
            tracing::info!(id = %sbx.id, "pod sandbox stopped");
            self.sandbox_event(&rec, "stop");
        }
        Ok(())
    }

    /// Removes a sandbox with its containers, network, namespaces and files.
    pub async fn remove_sandbox(self: &Arc<Self>, input: &str) -> Result<()> {
        let sbx = self.sandbox(input)?;
        let _op = sbx.op.lock().await;
        for ctr in self.sandbox_containers(&sbx.id) {
            if let Err(e) = self.delete(&ctr.id, true, true).await
                && !e.is(ErrorKind::NotFound)
            {
                return Err(Error::new(
                    e.kind(),
                    format!("remove container {} of the pod", ctr.id),
                )
                .with_source(e));
            }
        }
        self.tear_down_sandbox(&sbx, true).await?;
        sbx.update(|r| r.s.state = pb::SandboxState::Notready.into());
        let rec = sbx.record();
        self.store.delete_sandbox(&sbx.id).await?;
        self.forget_sandbox(&sbx).await;
        tracing::info!(id = %sbx.id, "pod sandbox removed");
        self.sandbox_event(&rec, "destroy");
        Ok(())
    }

    /// A sandbox, with the verbose info map when asked.
    pub fn get_sandbox(
        &self,
        input: &str,
        verbose: bool,
    ) -> Result<(pb::Sandbox, HashMap<String, String>)> {
        let sbx = self.sandbox(input)?;
        let s = self.describe_sandbox(&sbx);
        let mut info = HashMap::new();
        if verbose {
            let rec = sbx.record();
            let cni: serde_json::Value = s
                .network
                .as_ref()
                .and_then(|n| serde_json::from_slice(&n.cni_result).ok())
                .unwrap_or(serde_json::Value::Null);
            let ns = rec.namespaces();
            let doc = serde_json::json!({
                "id": s.id,
                "name": s.name,
                "runtimeHandler": s.runtime_handler,
                "pid": s.pid_holder,
                "namespaces": {
                    "network": ns.network,
                    "ipc": ns.ipc,
                    "uts": ns.uts,
                    "pid": ns.pid,
                },
                "shm": ns.shm,
                "pidHolder": if s.pid_holder != 0 { "berth-engine pid-holder" } else { "" },
                "files": {
                    "hostname": s.hostname_path,
                    "hosts": s.hosts_path,
                    "resolvConf": s.resolv_conf_path,
                },
                "cgroupParent": rec.config().linux.as_ref().map(|l| l.cgroup_parent.clone()).unwrap_or_default(),
                "cniResult": cni,
                "containers": s.container_ids,
            });
            info.insert("info".to_string(), doc.to_string());
        }
        Ok((s, info))
    }

    /// Sandboxes matching `filters`, most recently created first.
    pub fn list_sandboxes(&self, filters: &[types::Filter]) -> Result<Vec<pb::Sandbox>> {
        let mut out = Vec::new();
        for sbx in self.all_sandboxes() {
            let s = sbx.record().s;
            if sb::matches(&s, filters)? {
                out.push(self.describe_sandbox(&sbx));
            }
        }
        out.sort_by(|a, b| {
            let t = |s: &pb::Sandbox| s.created.map(|t| (t.seconds, t.nanos)).unwrap_or_default();
            t(b).cmp(&t(a))
        });
        Ok(out)
    }

    /// Checks a container's sandbox at create and fills what it inherits: the full sandbox id,
    /// the cgroup parent and the sysctls. Returns the sandbox's hostname.
    pub(in crate::engine) fn join_sandbox_at_create(
        &self,
        hc: &mut pb::HostConfig,
    ) -> Result<Option<String>> {
        if hc.sandbox_id.is_empty() {
            return Ok(None);
        }
        let sbx = self.sandbox(&hc.sandbox_id)?;
        let rec = sbx.record();
        if !rec.is_ready() {
            return Err(Error::failed_precondition(format!(
                "pod sandbox {} is not ready",
                rec.s.id
            )));
        }
        for (what, m) in [
            ("network", &hc.network_mode),
            ("ipc", &hc.ipc_mode),
            ("uts", &hc.uts_mode),
        ] {
            if !m.is_empty() {
                return Err(Error::invalid_argument(format!(
                    "a container of a pod sandbox takes the pod's {what} namespace; {what} mode {m:?} conflicts"
                )));
            }
        }
        if !hc.pid_mode.is_empty() && !hc.pid_mode.starts_with("container:") {
            return Err(Error::invalid_argument(format!(
                "a container of a pod sandbox takes the pod's pid namespace or a target container's; pid mode {:?} conflicts",
                hc.pid_mode
            )));
        }
        let linux = rec.config().linux.clone().unwrap_or_default();
        let pod_privileged = linux.security.as_ref().is_some_and(|s| s.privileged);
        if hc.security.as_ref().is_some_and(|s| s.privileged) && !pod_privileged {
            return Err(Error::invalid_argument(
                "no privileged container allowed in a sandbox that is not privileged",
            ));
        }
        hc.sandbox_id = rec.s.id.clone();
        // The pod's containers run with the pod's runtime handler.
        if hc.runtime.is_empty() {
            hc.runtime = rec.s.runtime_handler.clone();
        }
        if hc.cgroup_parent.is_empty() {
            hc.cgroup_parent = linux.cgroup_parent.clone();
        }
        for (k, v) in linux.sysctls {
            hc.sysctls.entry(k).or_insert(v);
        }
        // With the host's network the pod's hostname is the host's (recorded at Run).
        Ok(Some(rec.config().hostname.clone()))
    }

    /// The namespaces and files a container of sandbox `id` joins at start.
    pub(in crate::engine) fn sandbox_join(&self, id: &str, pid_mode: &str) -> Result<SandboxJoin> {
        let sbx = self.sandbox(id)?;
        let rec = sbx.record();
        if !rec.is_ready() {
            return Err(Error::failed_precondition(format!(
                "pod sandbox {} is not ready",
                rec.s.id
            )));
        }
        let ns = rec.namespaces();
        let opts = rec.ns_options();
        let join = |path: &str, host: bool| {
            if host {
                Namespace::Host
            } else if path.is_empty() {
                Namespace::Private
            } else {
                Namespace::Join(PathBuf::from(path))
            }
        };
        let host_net = mode(opts.network) == pb::NamespaceMode::Node;
        let pid = if pid_mode.starts_with("container:") {
            self.join_mode(pid_mode, "pid")?
        } else {
            join(&ns.pid, mode(opts.pid) == pb::NamespaceMode::Node)
        };
        Ok(SandboxJoin {
            network: join(&ns.network, host_net),
            ipc: join(&ns.ipc, mode(opts.ipc) == pb::NamespaceMode::Node),
            uts: join(&ns.uts, host_net),
            pid,
            files_dir: rec.p.files_dir.clone(),
            netns_path: ns.network.clone(),
            shm: (!ns.shm.is_empty()).then(|| PathBuf::from(&ns.shm)),
        })
    }

    /// Start-up: half-made sandboxes are torn down and forgotten; ready ones whose
    /// namespaces or PID holder are gone (a reboot, a killed holder) become NOTREADY; namespace
    /// directories without a record are removed.
    pub(in crate::engine) async fn recover_sandboxes(&self) {
        for sbx in self.all_sandboxes() {
            let rec = sbx.record();
            if !rec.p.complete {
                tracing::info!(id = %sbx.id, "removing a pod sandbox whose creation did not finish");
                if let Err(e) = self.tear_down_sandbox(&sbx, true).await {
                    tracing::warn!(id = %sbx.id, error = %e.chain(), "tearing down a half-made pod sandbox");
                    continue;
                }
                self.forget_sandbox(&sbx).await;
                continue;
            }
            if !rec.is_ready() {
                continue;
            }
            let ns = rec.namespaces();
            let pod_ns = &self.deps.pod_ns;
            let ns_ok = [&ns.network, &ns.ipc, &ns.uts]
                .into_iter()
                .filter(|p| !p.is_empty())
                .all(|p| pod_ns.ns_alive(Path::new(p)));
            let holder_ok = ns.pid.is_empty()
                || pod_ns.holder_alive(rec.s.pid_holder as u32, Path::new(&ns.pid));
            if ns_ok && holder_ok {
                continue;
            }
            tracing::warn!(id = %sbx.id, ns_ok, holder_ok, "pod sandbox lost its namespaces; marking it not ready");
            let _ = self.tear_down_sandbox(&sbx, false).await;
            sbx.update(|r| {
                r.s.state = pb::SandboxState::Notready.into();
                r.s.stopped.get_or_insert_with(now);
            });
            let rec = sbx.record();
            if let Err(e) = self.store.put_sandbox(&rec).await {
                tracing::warn!(id = %sbx.id, error = %e.chain(), "persisting a sandbox");
            }
            self.sandbox_event(&rec, "stop");
        }
        let known: std::collections::HashSet<String> =
            self.all_sandboxes().iter().map(|s| s.id.clone()).collect();
        let dirs = std::fs::read_dir(&self.paths.sandbox_ns)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !known.contains(n))
            .collect::<Vec<_>>();
        for orphan in dirs {
            let dir = self.paths.sandbox_ns.join(&orphan);
            tracing::info!(dir = %dir.display(), "removing namespaces of an unknown pod sandbox");
            if let Err(e) = self.deps.pod_ns.remove(&dir) {
                tracing::warn!(error = %e.chain(), "removing an orphan sandbox directory");
            }
        }
    }
}
