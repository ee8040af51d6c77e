//! The engine: container records in memory and in redb, their tasks through shims, volumes and
//! the events hub.
//!
//! # Concurrency
//!
//! Each container has an *operation lock* (a tokio mutex) that serializes lifecycle operations
//! (create's tail, start, stop, restart, pause, update, delete, the cleanup after an exit),
//! and its record behind a short-held `RwLock` for reads. An exit is recorded in two phases:
//! first, without the operation lock, the record becomes exited and waiters are woken (so a
//! `stop` holding the lock sees the exit); then, in a task that takes the lock, the task's
//! resources are released and the restart policy or auto-remove is applied.

mod archive;
mod commit;
mod create;
mod io;
mod network;
mod query;
mod recover;
mod sandbox;
mod stats;
mod task;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use berth_core::id::{ObjectKind, resolve};
use berth_core::{Config, Error, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::events::v1::{self as evpb, EventType};
use berth_proto::prost_types::Timestamp;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::deps::{Deps, Shim};
use crate::events::{self, Hub};
use crate::record::Record;
use crate::spec::HostInfo;
use crate::store::Store;
use crate::volumes::Volumes;

pub use io::{AttachInput, ExecInstance};
pub use query::list_keys;
pub use sandbox::Sbx;
pub(crate) use task::parse_size;

/// Where the engine keeps things.
#[derive(Debug, Clone)]
pub struct Paths {
    /// `<root>/engine`: the database and per-container files.
    pub data: PathBuf,
    /// `<root>/engine/containers`: hosts, resolv.conf, hostname, json logs per container.
    pub containers: PathBuf,
    /// `<state>/bundles`: OCI bundles (config.json, rootfs mount point, shim files).
    pub bundles: PathBuf,
    /// `<state>/engine-tmp`: temporary mount points.
    pub scratch: PathBuf,
    /// `<root>/volumes`.
    pub volumes: PathBuf,
    /// `<root>/engine/sandboxes`: each pod's hostname, hosts and resolv.conf.
    pub sandbox_files: PathBuf,
    /// `<state>/sandboxes`: each pod's namespace files.
    pub sandbox_ns: PathBuf,
}

impl Paths {
    /// The layout for `config`.
    pub fn new(config: &Config) -> Self {
        let data = config.root.join("engine");
        Self {
            containers: data.join("containers"),
            sandbox_files: data.join("sandboxes"),
            sandbox_ns: config.state_dir.join("sandboxes"),
            data,
            bundles: config.state_dir.join("bundles"),
            scratch: config.state_dir.join("engine-tmp"),
            volumes: config.root.join("volumes"),
        }
    }

    /// A container's own directory.
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.containers.join(id)
    }

    /// A container's bundle.
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.bundles.join(id)
    }
}

/// What waiters see of a container's exits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExitState {
    /// Incremented at every exit (or failed start).
    pub generation: u64,
    /// Whether a task is running (or paused).
    pub running: bool,
    /// Last exit code.
    pub code: i64,
    /// Why the last start failed, if it did.
    pub error: String,
    /// When it exited.
    pub at: Option<Timestamp>,
    /// The container has been removed.
    pub removed: bool,
}

/// Hands a freshly created task to an attach that was registered before start; the attach
/// answers on the inner sender once its shim attach is ready, so no output is missed.
pub type AttachHandoff = (Arc<dyn Shim>, oneshot::Sender<()>);

/// One container in memory.
pub struct Ctr {
    /// Full id.
    pub id: String,
    op: tokio::sync::Mutex<()>,
    rec: RwLock<Record>,
    shim: Mutex<Option<Arc<dyn Shim>>>,
    exits: watch::Sender<ExitState>,
    pending_attach: Mutex<Vec<oneshot::Sender<AttachHandoff>>>,
    restart_cancel: Mutex<CancellationToken>,
    oom: std::sync::atomic::AtomicBool,
    /// The cgroup of the task's init (its pid with it), resolved once for the stats.
    cgroup: Mutex<Option<(u32, Arc<berth_core::cgroup::Cgroup>)>>,
    /// While a stats stream samples the container: a reader of that cgroup that keeps its
    /// files open (see [`Ctr::read_cgroup`]).
    stats_reader: Mutex<Option<(u32, Arc<berth_core::cgroup::Reader>)>>,
    keep_stats_open: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Ctr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctr")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Ctr {
    fn new(rec: Record) -> Arc<Self> {
        let st = ExitState {
            generation: 0,
            // Waiters treat a container waiting for its restart as running (Docker).
            running: rec.is_running() || rec.status() == pb::ContainerStatus::Restarting,
            code: i64::from(rec.state().exit_code),
            error: rec.state().error.clone(),
            at: rec.state().finished_at,
            removed: false,
        };
        Arc::new(Self {
            id: rec.id().to_string(),
            op: tokio::sync::Mutex::new(()),
            rec: RwLock::new(rec),
            shim: Mutex::new(None),
            exits: watch::Sender::new(st),
            pending_attach: Mutex::new(Vec::new()),
            restart_cancel: Mutex::new(CancellationToken::new()),
            oom: std::sync::atomic::AtomicBool::new(false),
            cgroup: Mutex::new(None),
            stats_reader: Mutex::new(None),
            keep_stats_open: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A copy of the record.
    pub fn record(&self) -> Record {
        self.rec.read().unwrap().clone()
    }

    /// Reads the record under its lock.
    pub fn with<T>(&self, f: impl FnOnce(&Record) -> T) -> T {
        f(&self.rec.read().unwrap())
    }

    fn update<T>(&self, f: impl FnOnce(&mut Record) -> T) -> T {
        f(&mut self.rec.write().unwrap())
    }

    /// The shim of the current task, if connected.
    pub fn shim(&self) -> Option<Arc<dyn Shim>> {
        self.shim.lock().unwrap().clone()
    }

    fn set_shim(&self, shim: Option<Arc<dyn Shim>>) {
        *self.shim.lock().unwrap() = shim;
    }

    /// The cgroup of init `pid`, when it is this container's (its directory is named after
    /// the id, as `spec::cgroup_path` makes it): a reused pid, or a task berth did not place,
    /// gives `None`, and the caller asks the shim instead.
    pub(crate) fn cgroup(&self, pid: u32) -> Option<Arc<berth_core::cgroup::Cgroup>> {
        use berth_core::cgroup::Cgroup;
        let mut cached = self.cgroup.lock().unwrap();
        if let Some((p, cg)) = cached.as_ref()
            && *p == pid
        {
            return Some(cg.clone());
        }
        let cg = Cgroup::for_pid(pid).ok()?;
        let leaf = match &cg {
            Cgroup::V1(dirs) => dirs.get("memory").or_else(|| dirs.get("cpuacct"))?,
            Cgroup::V2(dir) => dir,
        };
        if leaf.file_name()? != std::ffi::OsStr::new(&self.id) {
            return None;
        }
        let cg = Arc::new(cg);
        *cached = Some((pid, cg.clone()));
        Some(cg)
    }

    /// The cgroup counters of init `pid` read here, when its cgroup is this container's (see
    /// [`Ctr::cgroup`]). While a stats stream samples the container its files stay open.
    pub(crate) fn read_cgroup(&self, pid: u32) -> Option<berth_core::cgroup::Stats> {
        use std::sync::atomic::Ordering;
        if !self.keep_stats_open.load(Ordering::Relaxed) {
            return self.cgroup(pid)?.stats().ok();
        }
        let reader = {
            let mut kept = self.stats_reader.lock().unwrap();
            match kept.as_ref() {
                Some((p, r)) if *p == pid => r.clone(),
                _ => {
                    let r = Arc::new(berth_core::cgroup::Reader::new(
                        (*self.cgroup(pid)?).clone(),
                    ));
                    *kept = Some((pid, r.clone()));
                    r
                }
            }
        };
        reader.stats().ok()
    }

    /// Keeps the cgroup's files open for the stats samples to come (`true`), or closes them.
    pub(crate) fn keep_stats_open(&self, on: bool) {
        self.keep_stats_open
            .store(on, std::sync::atomic::Ordering::Relaxed);
        if !on {
            *self.stats_reader.lock().unwrap() = None;
        }
    }

    /// Subscribes to exits.
    pub fn exits(&self) -> watch::Receiver<ExitState> {
        self.exits.subscribe()
    }
}

#[derive(Debug, Default)]
struct Registry {
    by_id: HashMap<String, Arc<Ctr>>,
    /// name → id; a name being created maps to an empty id.
    names: HashMap<String, String>,
}

/// The engine.
pub struct Engine {
    /// The configuration.
    pub config: Config,
    /// Where things are.
    pub paths: Paths,
    store: Store,
    /// The events hub.
    pub hub: Arc<Hub>,
    /// Volumes.
    pub volumes: Volumes,
    deps: Deps,
    host: HostInfo,
    reg: Mutex<Registry>,
    sandboxes: Mutex<sandbox::SandboxRegistry>,
    execs: Mutex<HashMap<String, Arc<ExecInstance>>>,
    /// Stats samplers of containers someone streams stats of, by id.
    samplers: Mutex<HashMap<String, std::sync::Weak<stats::Sampler>>>,
    /// Cancelled when the engine stops (background tasks end; containers keep running).
    pub shutdown: CancellationToken,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

/// The namespace when a call names none.
pub const DEFAULT_NAMESPACE: &str = "default";

impl Engine {
    /// Opens the database and loads the records. Nothing is reconciled yet: call
    /// [`Engine::recover`].
    pub fn open(config: Config, deps: Deps, host: HostInfo) -> Result<Arc<Self>> {
        let paths = Paths::new(&config);
        for dir in [&paths.data, &paths.containers, &paths.bundles] {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::internal(format!("create {}", dir.display())).with_source(e))?;
        }
        if host.id_map.is_some() {
            // The runtime sets a user-namespaced container up as its (mapped) root, which must
            // reach the bundle, the network files and the volumes: the directories on the way
            // are made traversable (never listable) by others, as Docker's volumes directory is.
            for dir in [
                &config.root,
                &config.state_dir,
                &paths.data,
                &paths.containers,
                &paths.bundles,
                &paths.volumes,
            ] {
                traversable(dir)?;
            }
        }
        let store = Store::open(&paths.data.join("engine.redb"))?;
        let hub = Hub::open(
            &paths.data.join("events.log"),
            events::Retention {
                max_count: config.engine.events_max_count as usize,
                max_age: (config.engine.events_max_age > 0)
                    .then(|| Duration::from_secs(config.engine.events_max_age)),
            },
        )?;
        let volumes = Volumes::load(paths.volumes.clone(), store.clone(), hub.clone())?
            .with_owner(host.id_map.as_ref().map(|m| m.root()));
        let mut reg = Registry::default();
        for rec in store.containers()? {
            reg.names.insert(rec.c.name.clone(), rec.id().to_string());
            reg.by_id.insert(rec.id().to_string(), Ctr::new(rec));
        }
        let sandboxes = sandbox::SandboxRegistry::load(store.sandboxes()?);
        Ok(Arc::new(Self {
            config,
            paths,
            store,
            hub,
            volumes,
            deps,
            host,
            reg: Mutex::new(reg),
            sandboxes: Mutex::new(sandboxes),
            execs: Mutex::new(HashMap::new()),
            samplers: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
        }))
    }

    /// The host facts spec generation uses.
    pub fn host_info(&self) -> &HostInfo {
        &self.host
    }

    /// The id map of a container with host config `hc`: the daemon's container map
    /// (userns-remap, rootless) unless the container opts out with `--userns=host`. Rootless,
    /// `--privileged`, `--network host` and `--pid host` opt out too: they mean the stack's
    /// own namespaces (privileged within them), as in Docker's rootless mode, where rootful
    /// remap refuses them. Pod containers (the CRI) are left alone: the kubelet decides about
    /// user namespaces.
    pub fn container_map(&self, hc: &pb::HostConfig) -> Option<&berth_core::userns::IdMap> {
        let privileged = hc.security.as_ref().is_some_and(|s| s.privileged);
        let in_stack = self.config.rootless
            && (privileged || hc.network_mode == "host" || hc.pid_mode == "host");
        self.host
            .id_map
            .as_ref()
            .filter(|_| hc.userns_mode != "host" && hc.sandbox_id.is_empty() && !in_stack)
    }

    /// Finds a container by full id, name, or unique id prefix.
    pub fn get(&self, input: &str) -> Result<Arc<Ctr>> {
        let reg = self.reg.lock().unwrap();
        // Every container has exactly one entry in the name map (placeholders of names being
        // created map to an empty id and are skipped).
        let objects: Vec<(&str, &str)> = reg
            .names
            .iter()
            .filter(|(_, id)| !id.is_empty())
            .map(|(name, id)| (id.as_str(), name.as_str()))
            .collect();
        let id = resolve(ObjectKind("container"), input, objects.iter().copied())?.to_string();
        reg.by_id
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("No such container: {input}")))
    }

    /// Every container.
    pub fn all(&self) -> Vec<Arc<Ctr>> {
        self.reg.lock().unwrap().by_id.values().cloned().collect()
    }

    /// Ids of containers whose mounts use volume `name`.
    pub fn volume_users(&self, name: &str) -> Vec<String> {
        self.all()
            .into_iter()
            .filter(|c| {
                c.with(|r| {
                    r.c.mounts
                        .iter()
                        .any(|m| m.r#type() == pb::MountType::Volume && m.name == name)
                })
            })
            .map(|c| c.id.clone())
            .collect()
    }

    /// Publishes a container event with the container's name, image and labels.
    pub fn container_event(
        &self,
        rec: &Record,
        action: &str,
        extra: impl IntoIterator<Item = (String, String)>,
    ) {
        let mut attrs = rec.event_attributes();
        attrs.extend(extra);
        crate::metrics::container_event(action, &attrs);
        let ns = if rec.p.namespace.is_empty() {
            DEFAULT_NAMESPACE
        } else {
            rec.p.namespace.as_str()
        };
        self.hub.publish(
            events::docker_event(EventType::Container, action, rec.id(), attrs),
            ns,
        );
    }

    /// Adds an envelope published by another service or a shim, and reacts to task payloads.
    pub fn publish(self: &Arc<Self>, env: evpb::Envelope, namespace: &str) {
        let Some(stored) = self.hub.publish(env, namespace) else {
            return;
        };
        if let Some(payload) = stored.payload.clone() {
            let engine = self.clone();
            tokio::spawn(async move { engine.on_task_event(payload).await });
        }
    }

    async fn persist(&self, ctr: &Ctr) -> Result<()> {
        let rec = ctr.record();
        self.store.put_container(&rec).await
    }

    fn reserve_name(&self, name: &str) -> Result<()> {
        let mut reg = self.reg.lock().unwrap();
        if let Some(id) = reg.names.get(name) {
            return Err(name_conflict(name, id));
        }
        reg.names.insert(name.to_string(), String::new());
        Ok(())
    }

    fn release_name(&self, name: &str) {
        let mut reg = self.reg.lock().unwrap();
        if reg.names.get(name).is_some_and(String::is_empty) {
            reg.names.remove(name);
        }
    }

    fn name_taken(&self, name: &str) -> bool {
        self.reg.lock().unwrap().names.contains_key(name)
    }

    fn insert(&self, ctr: Arc<Ctr>, name: &str) {
        let mut reg = self.reg.lock().unwrap();
        reg.names.insert(name.to_string(), ctr.id.clone());
        reg.by_id.insert(ctr.id.clone(), ctr);
    }

    fn remove_from_registry(&self, id: &str) {
        let mut reg = self.reg.lock().unwrap();
        if let Some(c) = reg.by_id.remove(id) {
            let name = c.with(|r| r.c.name.clone());
            if reg.names.get(&name).is_some_and(|i| i == id) {
                reg.names.remove(&name);
            }
        }
    }

    /// Renames a container; publishes "rename".
    pub async fn rename(&self, input: &str, new_name: &str) -> Result<()> {
        let ctr = self.get(input)?;
        let new_name = berth_core::id::validate_name(new_name)?.to_string();
        let _op = ctr.op.lock().await;
        let old = ctr.with(|r| r.c.name.clone());
        if old == new_name {
            return Err(Error::invalid_argument(
                "Renaming a container with the same name as its current name",
            ));
        }
        {
            let mut reg = self.reg.lock().unwrap();
            if let Some(id) = reg.names.get(&new_name) {
                return Err(name_conflict(&new_name, id));
            }
            reg.names.remove(&old);
            reg.names.insert(new_name.clone(), ctr.id.clone());
        }
        ctr.update(|r| r.c.name = new_name.clone());
        if let Err(e) = self.persist(&ctr).await {
            ctr.update(|r| r.c.name = old.clone());
            let mut reg = self.reg.lock().unwrap();
            reg.names.remove(&new_name);
            reg.names.insert(old, ctr.id.clone());
            return Err(e);
        }
        self.rename_links(&old, &new_name).await;
        let rec = ctr.record();
        self.container_event(&rec, "rename", [("oldName".to_string(), format!("/{old}"))]);
        Ok(())
    }
}

/// Adds the others-execute bit to `dir` (creating it when missing).
fn traversable(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::internal(format!("create {}", dir.display())).with_source(e))?;
    let mode = std::fs::metadata(dir)
        .map_err(|e| Error::internal(format!("stat {}", dir.display())).with_source(e))?
        .permissions()
        .mode();
    if mode & 0o001 == 0 {
        std::fs::set_permissions(
            dir,
            std::fs::Permissions::from_mode((mode & 0o7777) | 0o001),
        )
        .map_err(|e| Error::internal(format!("chmod {}", dir.display())).with_source(e))?;
    }
    Ok(())
}

/// Docker's message for a taken name.
pub fn name_conflict(name: &str, id: &str) -> Error {
    Error::already_exists(format!(
        "Conflict. The container name \"/{name}\" is already in use by container \"{id}\". You have to remove (or rename) that container to be able to reuse that name."
    ))
}

/// Now as a protobuf timestamp.
pub fn now() -> Timestamp {
    SystemTime::now().into()
}

/// Writes `data` to `path` atomically (write, then rename).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| Error::internal(format!("write {}", path.display())).with_source(e))
}

#[cfg(test)]
mod tests;
