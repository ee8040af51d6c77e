//! The engine's seams: everything outside its own process, as small traits injected through
//! [`Deps`]. The real implementations talk gRPC to the other berth services and to shims
//! (`remote`, `shim`), or make kernel calls (`netns`); unit tests substitute fakes.
//!
//! The seams speak the other services' wire types: the engine does not own their domains and
//! only passes their data along.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use berth_core::Result;
use berth_core::mount::Mount;
use berth_core::snapshots::Labels;
use berth_core::userns::IdMap;
use berth_proto::berth::images::v1 as images;
use berth_proto::berth::network::v1 as net;
use berth_proto::berth::shim::v1 as shim;
use berth_proto::berth::types::v1 as types;
use futures::Stream;

/// A boxed, sendable future of a `Result`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;
/// A boxed, sendable stream of `Result`s.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T>> + Send + 'static>>;

/// The images service, as the engine uses it.
pub trait Images: Send + Sync {
    /// Resolves a reference to an image, making sure it is unpacked in `snapshotter` (shifted
    /// through the daemon's container id map unless `host_ids`).
    fn resolve(
        &self,
        reference: &str,
        platform: Option<types::Platform>,
        snapshotter: &str,
        host_ids: bool,
    ) -> BoxFuture<'_, images::ResolveImageResponse>;
    /// Records that container `container_id` uses `image_id`.
    fn add_user(&self, image_id: &str, container_id: &str) -> BoxFuture<'_, ()>;
    /// Drops that record.
    fn remove_user(&self, image_id: &str, container_id: &str) -> BoxFuture<'_, ()>;
    /// Replaces every record of the engine with `(image id, container id)` pairs.
    fn set_users(&self, users: Vec<(String, String)>) -> BoxFuture<'_, ()>;
    /// Creates a child image (`docker commit`) from `options` and the uncompressed layer tar
    /// whose chunks `layer` carries (nothing for an empty layer).
    fn create_image(
        &self,
        options: images::CreateImageOptions,
        layer: tokio::sync::mpsc::Receiver<Vec<u8>>,
    ) -> BoxFuture<'_, images::CreateImageResponse> {
        let _ = (options, layer);
        Box::pin(async {
            Err(berth_core::Error::unimplemented(
                "creating images is not available here",
            ))
        })
    }
}

/// The snapshotter, as the engine uses it (container rootfs snapshots only).
pub trait Snapshots: Send + Sync {
    /// Creates the active snapshot `key` over `parent` ("" = empty) and returns its mounts.
    fn prepare(&self, key: &str, parent: &str, labels: Labels) -> BoxFuture<'_, Vec<Mount>>;
    /// The mounts of the active snapshot `key`.
    fn mounts(&self, key: &str) -> BoxFuture<'_, Vec<Mount>>;
    /// Removes snapshot `key`; a missing one is not an error.
    fn remove(&self, key: &str) -> BoxFuture<'_, ()>;
    /// Bytes used by `key` itself.
    fn usage(&self, key: &str) -> BoxFuture<'_, i64>;
}

/// The network service, as the engine uses it.
pub trait Networks: Send + Sync {
    /// Connects a network namespace to a network.
    fn attach(&self, req: net::AttachRequest) -> BoxFuture<'_, net::Attachment>;
    /// Disconnects a container from `network` ("" = every network).
    fn detach(&self, container_id: &str, network: &str, force: bool) -> BoxFuture<'_, ()>;
    /// Resolves a network name, id or prefix to `(id, name)`.
    fn get(&self, network: &str) -> BoxFuture<'_, (String, String)>;
    /// CNI ADD of a pod sandbox's network namespace (idempotent for the same id and config).
    fn cni_attach(&self, req: net::CniAttachRequest) -> BoxFuture<'_, net::CniAttachResponse> {
        let _ = req;
        Box::pin(async {
            Err(berth_core::Error::unimplemented(
                "CNI attachments are not available here",
            ))
        })
    }
    /// CNI DEL of what [`Networks::cni_attach`] made; nothing to delete is not an error.
    fn cni_detach(&self, container_id: &str, config_name: &str) -> BoxFuture<'_, ()> {
        let _ = (container_id, config_name);
        Box::pin(async {
            Err(berth_core::Error::unimplemented(
                "CNI attachments are not available here",
            ))
        })
    }
}

/// Which namespaces a pod sandbox holds itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodNsWant {
    /// A network namespace (with loopback up).
    pub net: bool,
    /// An IPC namespace.
    pub ipc: bool,
    /// A UTS namespace (its hostname set).
    pub uts: bool,
}

/// The namespace files of a pod sandbox (`None` for those it does not hold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodNsPaths {
    /// Network namespace file.
    pub net: Option<PathBuf>,
    /// IPC namespace file.
    pub ipc: Option<PathBuf>,
    /// UTS namespace file.
    pub uts: Option<PathBuf>,
    /// The pod's /dev/shm (a tmpfs) that goes with its IPC namespace.
    pub shm: Option<PathBuf>,
}

/// Namespaces of pod sandboxes, owned by the engine: bind mounts of namespace files under a
/// sandbox's directory, and the PID namespace holder. Every method blocks (kernel calls and a
/// short process spawn); the engine calls them from blocking tasks.
pub trait PodNamespaces: Send + Sync {
    /// Makes the namespaces of `want` and bind-mounts them as `<dir>/{net,ipc,uts}`; the UTS
    /// one gets `hostname`; with the IPC one goes a tmpfs at `<dir>/shm` (the pod's /dev/shm).
    /// On failure nothing is left mounted.
    fn create(&self, dir: &Path, want: PodNsWant, hostname: &str) -> Result<PodNsPaths>;
    /// Starts the PID namespace holder: a tiny process that is the init of a new PID
    /// namespace (it reaps what is re-parented to it and does nothing else), detached from the
    /// engine; the namespace file is bind-mounted as `<dir>/pid`. Returns its host pid.
    fn start_pid_holder(&self, dir: &Path) -> Result<(u32, PathBuf)>;
    /// Whether holder `pid` still runs and is the init of the namespace at `ns_file`.
    fn holder_alive(&self, pid: u32, ns_file: &Path) -> bool;
    /// Kills the holder (and with it every process of its PID namespace) when it is still the
    /// one of `ns_file`.
    fn stop_pid_holder(&self, pid: u32, ns_file: &Path);
    /// Whether `path` is (still) a mounted namespace file.
    fn ns_alive(&self, path: &Path) -> bool;
    /// Unmounts every namespace file (and the shm tmpfs) under `dir` and removes `dir`; a
    /// missing one is not an error.
    fn remove(&self, dir: &Path) -> Result<()>;
}

/// Network namespaces that outlive their first process (bind mounts under the state dir).
pub trait Netns: Send + Sync {
    /// Creates the namespace file for container `id` and returns its path. With `userns`,
    /// the network namespace belongs to a new user namespace with that map, whose file is
    /// [`userns_file`] of the returned path (the container joins it: it then owns its network
    /// namespace, for sysfs, raw sockets and net sysctls).
    fn create<'a>(&'a self, id: &'a str, userns: Option<&'a IdMap>) -> BoxFuture<'a, PathBuf>;
    /// Unmounts and removes the namespace file (and its user namespace's); a missing one is
    /// not an error.
    fn remove(&self, path: &Path) -> Result<()>;
}

/// The user namespace file that goes with network namespace file `netns` when it was made
/// for a user-namespaced container.
pub fn userns_file(netns: &Path) -> PathBuf {
    let mut name = netns.as_os_str().to_owned();
    name.push(".user");
    PathBuf::from(name)
}

/// What a shim that is gone left behind about its init process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadExit {
    /// Exit status (255 when unknown).
    pub status: u32,
    /// When it exited, if known.
    pub exited_at: Option<std::time::SystemTime>,
}

/// Starting and finding shims.
pub trait ShimLauncher: Send + Sync {
    /// Starts a shim for container `id` with bundle directory `bundle` and returns a client.
    fn spawn<'a>(
        &'a self,
        id: &'a str,
        bundle: &'a Path,
        namespace: &'a str,
    ) -> BoxFuture<'a, Arc<dyn Shim>>;
    /// A client for the running shim of container `id`, or `None` when it is gone.
    fn connect<'a>(&'a self, id: &'a str, bundle: &'a Path)
    -> BoxFuture<'a, Option<Arc<dyn Shim>>>;
    /// Cleans up after a shim that is gone: reads the exit status it left in the bundle,
    /// tears down what it left mounted or running, removes the bundle and its socket.
    fn cleanup<'a>(&'a self, id: &'a str, bundle: &'a Path) -> BoxFuture<'a, DeadExit>;
    /// Ids of containers that have a bundle or shim socket on this host.
    fn list(&self) -> Vec<String>;
}

/// One container's shim: the `berth.shim.v1` API.
pub trait Shim: Send + Sync {
    /// Mounts the rootfs and creates the init process.
    fn create(&self, req: shim::CreateRequest) -> BoxFuture<'_, u32>;
    /// Starts the init ("") or an exec process; returns its pid.
    fn start(&self, exec_id: &str) -> BoxFuture<'_, u32>;
    /// State of a process.
    fn state(&self, exec_id: &str) -> BoxFuture<'_, shim::StateResponse>;
    /// Signals a process (or all with `all`).
    fn kill(&self, exec_id: &str, signal: u32, all: bool) -> BoxFuture<'_, ()>;
    /// Waits for a process to exit; returns its status and time.
    fn wait(&self, exec_id: &str) -> BoxFuture<'_, shim::WaitResponse>;
    /// Forgets an exited process.
    fn delete(&self, exec_id: &str, force: bool) -> BoxFuture<'_, shim::DeleteResponse>;
    /// Creates an exec process.
    fn exec(&self, req: shim::ExecRequest) -> BoxFuture<'_, ()>;
    /// Resizes a process's TTY.
    fn resize(&self, exec_id: &str, size: types::TerminalSize) -> BoxFuture<'_, ()>;
    /// Closes a process's stdin.
    fn close_stdin(&self, exec_id: &str) -> BoxFuture<'_, ()>;
    /// Attaches to a process' stdio: `input` carries the options first, then stdin.
    fn attach(
        &self,
        input: BoxStream<shim::AttachRequest>,
    ) -> BoxFuture<'_, BoxStream<shim::AttachResponse>>;
    /// Reads the init process' log.
    fn logs(&self, req: shim::LogsRequest) -> BoxFuture<'_, BoxStream<shim::LogsResponse>>;
    /// Every process of the container.
    fn pids(&self) -> BoxFuture<'_, Vec<shim::ProcessInfo>>;
    /// Freezes the container.
    fn pause(&self) -> BoxFuture<'_, ()>;
    /// Thaws it.
    fn resume(&self) -> BoxFuture<'_, ()>;
    /// Applies new resources (OCI `LinuxResources` JSON).
    fn update(&self, resources: Vec<u8>) -> BoxFuture<'_, ()>;
    /// cgroup counters.
    fn stats(&self) -> BoxFuture<'_, types::CgroupStats>;
    /// Who the shim is.
    fn info(&self) -> BoxFuture<'_, shim::InfoResponse>;
    /// Ends the shim.
    fn shutdown(&self, now: bool) -> BoxFuture<'_, ()>;
    /// Closes the init's log file and opens its path again.
    fn reopen_log(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            Err(berth_core::Error::unimplemented(
                "this shim cannot reopen its log",
            ))
        })
    }
    /// The container's health (NOT_FOUND without a healthcheck).
    fn health(&self) -> BoxFuture<'_, types::Health> {
        Box::pin(async {
            Err(berth_core::Error::unimplemented(
                "this shim does not report health",
            ))
        })
    }
}

/// Everything the engine reaches outside itself.
#[derive(Clone)]
pub struct Deps {
    /// berth-images.
    pub images: Arc<dyn Images>,
    /// The snapshotter.
    pub snapshots: Arc<dyn Snapshots>,
    /// berth-network.
    pub networks: Arc<dyn Networks>,
    /// Network namespaces.
    pub netns: Arc<dyn Netns>,
    /// Shims.
    pub shims: Arc<dyn ShimLauncher>,
    /// Pod sandbox namespaces.
    pub pod_ns: Arc<dyn PodNamespaces>,
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deps").finish_non_exhaustive()
    }
}
