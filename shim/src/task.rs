//! The shim's task service in domain terms: one container (its init process and any exec
//! processes), driven through an [`OciRuntime`], with stdio, logs, exit statuses and events.
//!
//! The gRPC layer ([`crate::server`]) is a thin adapter over [`Shim`].

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use berth_core::mount::Mount;
use berth_core::{Error, ErrorKind, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::cgroup::{Cgroup, Stats};
use crate::events::{Envelope, Publisher, TaskEvent, Transport};
use crate::logger::{LogFormat, LogOptions, Logger};
use crate::logreader::{self, LogEntry, ReadOptions};
use crate::nsexec::NativeExec;
use crate::reaper::{Exit, ExitFuture, Spawner};
use crate::rfc3339;
use crate::runtime::{CreateOptions, ExecOptions, OciRuntime, Runc, RuncConfig};
use crate::stdio::{self, Chunk, Output, ProcessIo, StdioSpec};

/// Which OCI runtime to run, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeSettings {
    /// Binary name or path (`runc`, `crun`, `/usr/sbin/runc`).
    pub binary: PathBuf,
    /// Its `--root`; `None` = its default.
    pub root: Option<PathBuf>,
    /// Use the systemd cgroup driver.
    pub systemd_cgroup: bool,
    /// Extra global arguments.
    pub args: Vec<String>,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            binary: "runc".into(),
            root: None,
            systemd_cgroup: false,
            args: Vec::new(),
        }
    }
}

/// Makes the runtime driver for a container.
pub trait RuntimeFactory: Send + Sync + fmt::Debug {
    /// A runtime for `settings` that keeps its per-call files in `bundle`.
    fn runtime(&self, settings: &RuntimeSettings, bundle: &Path) -> Arc<dyn OciRuntime>;
}

/// [`Runc`] drivers (runc, crun, any runc-compatible command line).
#[derive(Debug)]
pub struct RuncFactory {
    /// Spawns the runtime binary.
    pub spawner: Arc<dyn Spawner>,
    /// Longest time any runtime call may take.
    pub timeout: Duration,
}

impl RuntimeFactory for RuncFactory {
    fn runtime(&self, settings: &RuntimeSettings, bundle: &Path) -> Arc<dyn OciRuntime> {
        let config = RuncConfig {
            binary: settings.binary.clone(),
            root: settings.root.clone(),
            systemd_cgroup: settings.systemd_cgroup,
            args: settings.args.clone(),
            log_dir: bundle.to_path_buf(),
            timeout: self.timeout,
        };
        Arc::new(Runc::new(config, self.spawner.clone()))
    }
}

/// Mounts and unmounts a container's rootfs.
pub trait Rootfs: Send + Sync + fmt::Debug {
    /// Performs `mounts` onto `target`.
    fn mount(&self, mounts: &[Mount], target: &Path) -> Result<()>;
    /// Undoes every mount at or below `target`.
    fn unmount(&self, target: &Path) -> Result<()>;
}

/// The host's mounts, through [`berth_core::mount`].
#[derive(Debug, Default, Clone, Copy)]
pub struct HostRootfs;

impl Rootfs for HostRootfs {
    fn mount(&self, mounts: &[Mount], target: &Path) -> Result<()> {
        berth_core::mount::mount_all(mounts, target)
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        berth_core::mount::unmount_all(target)
    }
}

/// What the shim was started with.
#[derive(Debug, Clone)]
pub struct ShimOptions {
    /// Container id.
    pub id: String,
    /// Absolute bundle directory.
    pub bundle: PathBuf,
    /// A directory with short paths, for console sockets (Unix socket paths are limited).
    pub socket_dir: PathBuf,
    /// The runtime used when Create names none.
    pub runtime: RuntimeSettings,
    /// Events endpoint used when Create names none (`unix:///path` or a path).
    pub events_address: Option<String>,
    /// berth namespace used when Create names none.
    pub namespace: String,
    /// Bytes of output buffered for a slow log disk before output is dropped from the log.
    pub log_buffer_bytes: usize,
    /// How long an exit waits for the process' output to drain before it is reported.
    pub exit_drain: Duration,
    /// Start exec processes natively ([`crate::nsexec`]) where possible, else `runtime exec`.
    pub native_exec: bool,
    /// How long a native exec may take.
    pub exec_timeout: Duration,
}

impl ShimOptions {
    /// Defaults for container `id` in `bundle`.
    pub fn new(id: impl Into<String>, bundle: impl Into<PathBuf>) -> Self {
        let bundle = bundle.into();
        Self {
            id: id.into(),
            socket_dir: bundle.clone(),
            bundle,
            runtime: RuntimeSettings::default(),
            events_address: None,
            namespace: "default".into(),
            log_buffer_bytes: 1 << 20,
            exit_drain: Duration::from_secs(2),
            native_exec: true,
            exec_timeout: Duration::from_secs(60),
        }
    }
}

/// How the container's log is written; `format: None` disables it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogSpec {
    /// `None` = no log.
    pub format: Option<LogFormat>,
    /// `None` = `<bundle>/container.log`.
    pub path: Option<PathBuf>,
    /// Rotate before exceeding this size; 0 = never.
    pub max_size: u64,
    /// Files kept, current included.
    pub max_file: u32,
    /// Attributes recorded with every entry.
    pub attrs: std::collections::BTreeMap<String, String>,
}

/// A Create request.
#[derive(Debug, Clone, Default)]
pub struct CreateTask {
    /// Container id ("" = the shim's).
    pub id: String,
    /// Bundle ("" = the shim's).
    pub bundle: PathBuf,
    /// Mounts forming the rootfs; empty = `<bundle>/rootfs` as it is.
    pub rootfs: Vec<Mount>,
    /// Init's stdio.
    pub stdio: StdioSpec,
    /// The log.
    pub log: LogSpec,
    /// The runtime; `None` = the shim's default.
    pub runtime: Option<RuntimeSettings>,
    /// Events endpoint; `None` = the shim's default.
    pub events_address: Option<String>,
    /// Namespace; `None` = the shim's default.
    pub namespace: Option<String>,
    /// Start the init in the same runtime call (`runtime run --detach`).
    pub start: bool,
    /// With `start`: hold the init's output back until this many attaches have subscribed.
    pub hold_output_for: u32,
}

/// An Exec request.
#[derive(Debug, Clone)]
pub struct ExecTask {
    /// Its id, unique within the container.
    pub exec_id: String,
    /// OCI `process` object as JSON.
    pub spec: Vec<u8>,
    /// Its stdio.
    pub stdio: StdioSpec,
}

/// A process' lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Frozen.
    Paused,
    /// Exited.
    Stopped,
}

/// What State reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessState {
    /// Container id.
    pub id: String,
    /// "" for init.
    pub exec_id: String,
    /// Bundle.
    pub bundle: PathBuf,
    /// Host pid (0 before it exists).
    pub pid: u32,
    /// Lifecycle state.
    pub status: Status,
    /// Has a terminal.
    pub terminal: bool,
    /// Has a stdin.
    pub stdin: bool,
    /// How it ended, once stopped.
    pub exit: Option<Exit>,
}

/// What Delete returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// Host pid (0 if it never ran).
    pub pid: u32,
    /// How it ended (`None` if it never ran).
    pub exit: Option<Exit>,
}

/// Who this shim is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Container id.
    pub id: String,
    /// Bundle.
    pub bundle: PathBuf,
    /// The shim's pid.
    pub shim_pid: u32,
    /// The init's pid; 0 when not created or deleted.
    pub task_pid: u32,
    /// Shim version.
    pub version: String,
}

/// Attach options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachOptions {
    /// "" = init.
    pub exec_id: String,
    /// Forward this client's data to stdin.
    pub stdin: bool,
    /// Receive stdout.
    pub stdout: bool,
    /// Receive stderr.
    pub stderr: bool,
    /// Replay the log first (init only).
    pub logs: bool,
    /// Stream live output.
    pub stream: bool,
}

/// What an attached client receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachEvent {
    /// Output.
    Output(Chunk),
    /// The end: output complete (or replay done); the exit status when it exited.
    End(Option<u32>),
}

/// What an attached client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachInput {
    /// Stdin bytes.
    Data(Bytes),
    /// New terminal size (width, height).
    Resize(u16, u16),
    /// Close stdin for everyone.
    CloseStdin,
}

/// One attached client.
#[derive(Debug)]
pub struct Attachment {
    /// Whether the process has a terminal.
    pub terminal: bool,
    /// Output, then one [`AttachEvent::End`].
    pub events: mpsc::Receiver<AttachEvent>,
    /// Where the client's input goes.
    pub input: AttachSink,
}

/// The input side of an attachment.
#[derive(Debug, Clone)]
pub struct AttachSink {
    process: Arc<Process>,
    stdin: bool,
}

impl AttachSink {
    /// Applies one input message.
    pub async fn send(&self, input: AttachInput) -> Result<()> {
        match input {
            AttachInput::Data(data) => {
                if !self.stdin {
                    return Ok(());
                }
                self.process.launched().await?.write_stdin(&data).await
            }
            AttachInput::Resize(w, h) => match self.process.io() {
                Some(io) => io.resize(w, h),
                None => Err(Error::failed_precondition("the process has not started")),
            },
            AttachInput::CloseStdin => {
                self.process.launched().await?.close_stdin().await;
                Ok(())
            }
        }
    }
}

/// How long an exit waits for the log writer to put the process' last output on disk.
const LOG_FLUSH_WAIT: Duration = Duration::from_millis(500);

/// The exit status file the shim writes into the bundle before it reports an exit, so that
/// the status survives any daemon (and the shim itself).
pub const EXIT_FILE: &str = "exit.json";

/// The contents of [`EXIT_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Host pid of the init process.
    pub pid: u32,
    /// Exit code or 128 + signal.
    pub exit_status: u32,
    /// RFC 3339 time, nanoseconds, UTC.
    pub exited_at: String,
}

/// Writes `exit` to `<bundle>/exit.json` (write, then rename).
pub fn write_exit_file(bundle: &Path, exit: &Exit) -> Result<()> {
    let record = ExitRecord {
        pid: exit.pid,
        exit_status: exit.status,
        exited_at: rfc3339::format(exit.at),
    };
    let path = bundle.join(EXIT_FILE);
    let tmp = bundle.join(".exit.json.tmp");
    let data =
        serde_json::to_vec(&record).map_err(|e| Error::internal("encode exit").with_source(e))?;
    std::fs::write(&tmp, data)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| Error::internal(format!("write {}", path.display())).with_source(e))
}

/// Reads `<bundle>/exit.json`, if the shim wrote one.
pub fn read_exit_file(bundle: &Path) -> Option<Exit> {
    let data = std::fs::read(bundle.join(EXIT_FILE)).ok()?;
    let r: ExitRecord = serde_json::from_slice(&data).ok()?;
    Some(Exit {
        pid: r.pid,
        status: r.exit_status,
        at: rfc3339::parse(&r.exited_at)?,
    })
}

#[derive(Debug, Clone, Copy)]
struct ProcState {
    status: Status,
    pid: u32,
    exit: Option<Exit>,
}

/// One process: the init (`exec_id` "") or an exec.
#[derive(Debug)]
struct Process {
    exec_id: String,
    stdio: StdioSpec,
    /// The exec's `process` JSON (none for init).
    spec: Option<Vec<u8>>,
    state: watch::Sender<ProcState>,
    output: Arc<Output>,
    io: watch::Sender<Option<Arc<ProcessIo>>>,
}

impl Process {
    fn new(
        exec_id: String,
        stdio: StdioSpec,
        spec: Option<Vec<u8>>,
        output: Arc<Output>,
    ) -> Arc<Self> {
        Arc::new(Self {
            exec_id,
            stdio,
            spec,
            state: watch::channel(ProcState {
                status: Status::Created,
                pid: 0,
                exit: None,
            })
            .0,
            output,
            io: watch::channel(None).0,
        })
    }

    fn snapshot(&self) -> ProcState {
        *self.state.borrow()
    }

    fn io(&self) -> Option<Arc<ProcessIo>> {
        self.io.borrow().clone()
    }

    /// The process' stdio once it has been launched.
    async fn launched(&self) -> Result<Arc<ProcessIo>> {
        let mut io = self.io.subscribe();
        let mut state = self.state.subscribe();
        loop {
            if let Some(io) = io.borrow_and_update().clone() {
                return Ok(io);
            }
            if state.borrow_and_update().status == Status::Stopped {
                return Err(Error::failed_precondition("the process has exited"));
            }
            if self.output.is_done() {
                // Deleted (or failed to start) before it ever ran.
                return Err(Error::failed_precondition("the process never started"));
            }
            tokio::select! {
                r = io.changed() => r.map_err(|_| Error::failed_precondition("the process is gone"))?,
                r = state.changed() => r.map_err(|_| Error::failed_precondition("the process is gone"))?,
                () = self.output.wait() => {}
            }
        }
    }

    async fn wait(&self) -> Exit {
        let mut rx = self.state.subscribe();
        let state = rx.wait_for(|s| s.exit.is_some()).await.map(|s| *s);
        match state {
            Ok(ProcState {
                exit: Some(exit), ..
            }) => exit,
            // The sender lives as long as the process; unreachable in practice.
            _ => Exit {
                pid: 0,
                status: 255,
                at: SystemTime::now(),
            },
        }
    }
}

/// Counts of OOM kills seen, for turning counter increases into events.
#[derive(Debug)]
struct Oom {
    cgroup: Cgroup,
    seen: AtomicU64,
}

struct Container {
    runtime: Arc<dyn OciRuntime>,
    init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
    mounted: bool,
    oom: Option<Arc<Oom>>,
    stop: CancellationToken,
}

/// The container's log, kept after Delete so Logs keeps working.
struct LogState {
    options: LogOptions,
    logger: Option<Logger>,
}

#[derive(Default)]
struct State {
    container: Option<Container>,
    deleted: bool,
    log: Option<LogState>,
    namespace: Option<String>,
}

struct Inner {
    options: ShimOptions,
    spawner: Arc<dyn Spawner>,
    runtimes: Box<dyn RuntimeFactory>,
    rootfs: Box<dyn Rootfs>,
    events: Publisher,
    /// Serialises operations that change the container's lifecycle.
    lifecycle: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    shutdown: CancellationToken,
    seq: AtomicU64,
    /// Native exec for this container, set up at the first exec (`None`: use the runtime).
    native: std::sync::OnceLock<Option<Arc<NativeExec>>>,
}

/// The task service of one shim. Cheap to clone.
#[derive(Clone)]
pub struct Shim {
    inner: Arc<Inner>,
}

impl fmt::Debug for Shim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shim")
            .field("id", &self.inner.options.id)
            .finish_non_exhaustive()
    }
}

fn not_created() -> Error {
    Error::not_found("no task: the container has not been created (or was deleted)")
}

/// The gRPC events hub as an event [`Transport`].
#[derive(Debug)]
pub struct GrpcEvents {
    client: berth_proto::berth::events::v1::events_client::EventsClient<berth_core::uds::Channel>,
}

impl GrpcEvents {
    /// A client for the hub at `address` (`unix:///path` or `/path`); connects lazily.
    pub fn new(address: &str) -> Result<Self> {
        match berth_core::uds::ListenAddr::parse(address)? {
            berth_core::uds::ListenAddr::Unix(path) => Ok(Self {
                client: berth_proto::berth::events::v1::events_client::EventsClient::new(
                    berth_core::uds::channel(path),
                ),
            }),
            berth_core::uds::ListenAddr::Tcp(_) => Err(Error::invalid_argument(format!(
                "events address {address}: only unix sockets"
            ))),
        }
    }
}

impl Transport for GrpcEvents {
    fn send<'a>(&'a self, event: &'a Envelope) -> crate::runtime::BoxFuture<'a, ()> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let req = berth_proto::berth::events::v1::PublishRequest {
                envelope: Some(crate::convert::envelope(event)),
            };
            client.publish(req).await.map(drop).map_err(Error::from)
        })
    }
}

impl Shim {
    /// A shim for `options`, spawning through `spawner` (the subreaper), running runtimes from
    /// `runtimes`, mounting with `rootfs` and publishing through `events`.
    pub fn new(
        options: ShimOptions,
        spawner: Arc<dyn Spawner>,
        runtimes: Box<dyn RuntimeFactory>,
        rootfs: Box<dyn Rootfs>,
        events: Publisher,
    ) -> Self {
        if let Some(address) = &options.events_address {
            match GrpcEvents::new(address) {
                Ok(t) => events.set_transport(Arc::new(t)),
                Err(err) => tracing::warn!(error = %err.chain(), "events address"),
            }
        }
        Self {
            inner: Arc::new(Inner {
                options,
                spawner,
                runtimes,
                rootfs,
                events,
                lifecycle: tokio::sync::Mutex::new(()),
                state: Mutex::new(State::default()),
                shutdown: CancellationToken::new(),
                seq: AtomicU64::new(0),
                native: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Cancelled when Shutdown was called.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// The event publisher.
    pub fn events(&self) -> &Publisher {
        &self.inner.events
    }

    fn id(&self) -> &str {
        &self.inner.options.id
    }

    fn bundle(&self) -> &Path {
        &self.inner.options.bundle
    }

    fn publish(&self, event: TaskEvent, at: SystemTime) {
        let namespace = {
            let st = self.inner.state.lock().unwrap();
            st.namespace
                .clone()
                .unwrap_or_else(|| self.inner.options.namespace.clone())
        };
        self.inner.events.publish(Envelope {
            container_id: self.id().to_string(),
            namespace,
            at,
            event,
        });
    }

    fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        let st = self.inner.state.lock().unwrap();
        let c = st.container.as_ref().ok_or_else(not_created)?;
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        c.execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("no exec process {exec_id:?}")))
    }

    fn runtime(&self) -> Result<Arc<dyn OciRuntime>> {
        let st = self.inner.state.lock().unwrap();
        Ok(st
            .container
            .as_ref()
            .ok_or_else(not_created)?
            .runtime
            .clone())
    }

    fn next(&self) -> u64 {
        self.inner.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn console_path(&self) -> PathBuf {
        self.inner
            .options
            .socket_dir
            .join(format!("c{}.sock", self.next()))
    }

    /// Creates the container: mounts the rootfs, wires stdio and the log, runs `runtime create`
    /// (with `start`: `runtime run --detach`, and the init is started as by [`Shim::start`]).
    /// Returns the init's host pid.
    pub async fn create(&self, req: CreateTask) -> Result<u32> {
        let _lifecycle = self.inner.lifecycle.lock().await;
        let opts = &self.inner.options;
        if !req.id.is_empty() && req.id != opts.id {
            return Err(Error::invalid_argument(format!(
                "this shim serves container {:?}, not {:?}",
                opts.id, req.id
            )));
        }
        if !req.bundle.as_os_str().is_empty() && req.bundle != opts.bundle {
            return Err(Error::invalid_argument(format!(
                "this shim serves bundle {}, not {}",
                opts.bundle.display(),
                req.bundle.display()
            )));
        }
        {
            let st = self.inner.state.lock().unwrap();
            if st.container.is_some() || st.deleted {
                return Err(Error::already_exists(format!(
                    "task {} was already created",
                    opts.id
                )));
            }
        }
        check_config(&opts.bundle, req.stdio)?;

        // Unset parts of the request's runtime fall back to the shim's flags.
        let runtime_settings = match req.runtime.clone() {
            None => opts.runtime.clone(),
            Some(mut r) => {
                if r.binary.as_os_str().is_empty() {
                    r.binary = opts.runtime.binary.clone();
                }
                if r.root.is_none() {
                    r.root = opts.runtime.root.clone();
                }
                r
            }
        };
        let runtime = self.inner.runtimes.runtime(&runtime_settings, &opts.bundle);
        if let Some(address) = req.events_address.as_deref().filter(|a| !a.is_empty()) {
            self.inner
                .events
                .set_transport(Arc::new(GrpcEvents::new(address)?));
        }
        if let Some(ns) = req.namespace.clone().filter(|n| !n.is_empty()) {
            self.inner.state.lock().unwrap().namespace = Some(ns);
        }
        // Recorded so that `berth-shim delete` can clean up if this shim ever dies.
        let _ = std::fs::write(
            opts.bundle.join("shim-runtime.json"),
            serde_json::to_vec(&runtime_settings).unwrap_or_default(),
        );

        let rootfs = opts.bundle.join("rootfs");
        let mounted = !req.rootfs.is_empty();
        if mounted {
            std::fs::create_dir_all(&rootfs).map_err(|e| {
                Error::internal(format!("create {}", rootfs.display())).with_source(e)
            })?;
            self.inner.rootfs.mount(&req.rootfs, &rootfs)?;
        }
        let undo_mount = |shim: &Self| {
            if mounted && let Err(err) = shim.inner.rootfs.unmount(&rootfs) {
                tracing::warn!(error = %err.chain(), "unmount rootfs");
            }
        };

        let log_options = req.log.format.map(|format| LogOptions {
            format,
            path: req
                .log
                .path
                .clone()
                .unwrap_or_else(|| opts.bundle.join("container.log")),
            max_size: req.log.max_size,
            max_file: req.log.max_file.max(1),
            attrs: req.log.attrs.clone(),
            buffer_bytes: opts.log_buffer_bytes,
        });
        let logger = match (&log_options, req.stdio.mode) {
            (Some(o), m) if m != stdio::StdioMode::None => match Logger::start(o.clone()) {
                Ok(l) => Some(l),
                Err(e) => {
                    undo_mount(self);
                    return Err(
                        Error::internal(format!("open log {}", o.path.display())).with_source(e)
                    );
                }
            },
            _ => None,
        };

        let hold = if req.start { req.hold_output_for } else { 0 };
        let output = Output::held(logger.clone(), hold);
        let init = Process::new(String::new(), req.stdio, None, output.clone());
        let pid_file = opts.bundle.join("init.pid");
        let _ = std::fs::remove_file(&pid_file);
        let launched = async {
            let (pending, child) = stdio::prepare(req.stdio, &self.console_path())?;
            let create_opts = CreateOptions {
                bundle: opts.bundle.clone(),
                pid_file: pid_file.clone(),
                console_socket: pending.console_socket().map(Path::to_path_buf),
                stdio: child,
            };
            let create = if req.start {
                runtime.run(&opts.id, create_opts)
            } else {
                runtime.create(&opts.id, create_opts)
            };
            let io = pending.launch(create, output.clone()).await?;
            Ok::<_, Error>((io, read_pid(&pid_file)?))
        }
        .await;
        let (io, pid) = match launched {
            Ok(v) => v,
            Err(err) => {
                output.close();
                // Leave nothing half-made behind (a runtime that timed out may have created it).
                let _ = runtime.delete(&opts.id, true).await;
                undo_mount(self);
                tracing::warn!(error = %err.chain(), "create failed");
                return Err(err);
            }
        };
        // With `start` the init may have exited already: the reaper keeps the exit for `watch`.
        let exit = self.inner.spawner.watch(pid);
        init.io.send_replace(Some(io));
        init.state.send_modify(|s| {
            s.pid = pid;
            if req.start {
                s.status = Status::Running;
            }
        });

        let oom = Cgroup::for_pid(pid)
            .map_err(|e| tracing::debug!(error = %e.chain(), "no cgroup for stats"))
            .ok()
            .map(|cgroup| {
                let seen = AtomicU64::new(cgroup.oom_kills().unwrap_or(0));
                Arc::new(Oom { cgroup, seen })
            });
        let stop = CancellationToken::new();
        {
            let mut st = self.inner.state.lock().unwrap();
            st.container = Some(Container {
                runtime,
                init: init.clone(),
                execs: HashMap::new(),
                mounted,
                oom: oom.clone(),
                stop: stop.clone(),
            });
            st.log = log_options.map(|options| LogState { options, logger });
        }
        if let Some(oom) = oom {
            tokio::spawn(self.clone().watch_oom(oom, stop));
        }
        if req.start {
            // Before the monitor runs, so that TaskStart always precedes TaskExit.
            self.publish(
                TaskEvent::Start {
                    exec_id: String::new(),
                    pid,
                },
                SystemTime::now(),
            );
        }
        tokio::spawn(self.clone().monitor(init, exit));
        tracing::info!(pid, started = req.start, "task created");
        Ok(pid)
    }

    /// Starts the init process (`exec_id` "") or a created exec process. Returns its pid.
    pub async fn start(&self, exec_id: &str) -> Result<u32> {
        let _lifecycle = self.inner.lifecycle.lock().await;
        if !exec_id.is_empty() {
            return self.start_exec(exec_id).await;
        }
        let init = self.process("")?;
        let runtime = self.runtime()?;
        let st = init.snapshot();
        match st.status {
            Status::Created => {}
            Status::Stopped => {
                return Err(Error::failed_precondition("the task has already exited"));
            }
            _ => return Err(Error::failed_precondition("the task is already started")),
        }
        runtime.start(self.id()).await?;
        init.state.send_if_modified(|s| {
            let started = s.status == Status::Created;
            if started {
                s.status = Status::Running;
            }
            started
        });
        self.publish(
            TaskEvent::Start {
                exec_id: String::new(),
                pid: st.pid,
            },
            SystemTime::now(),
        );
        tracing::info!(pid = st.pid, "task started");
        Ok(st.pid)
    }

    async fn start_exec(&self, exec_id: &str) -> Result<u32> {
        let exec = self.process(exec_id)?;
        let runtime = self.runtime()?;
        if exec.snapshot().status != Status::Created || exec.io().is_some() {
            return Err(Error::failed_precondition(format!(
                "exec {exec_id:?} was already started"
            )));
        }
        let init = self.process("")?.snapshot();
        if init.status != Status::Running {
            return Err(Error::failed_precondition("the container is not running"));
        }
        let process_json = exec_process_json(exec.spec.as_deref().unwrap_or_default(), exec.stdio)?;
        let t0 = std::time::Instant::now();
        let native = self.native_exec(init.pid, &process_json);
        let launched = match &native {
            Some(native) => {
                self.start_native(native, &exec, init.pid, &process_json)
                    .await
            }
            None => {
                self.start_runtime_exec(&runtime, &exec, &process_json)
                    .await
            }
        };
        let (io, pid, exit) = match launched {
            Ok(v) => v,
            Err(err) => {
                // It never ran: release waiters and attachers.
                exec.output.close();
                exec.state.send_modify(|s| {
                    s.status = Status::Stopped;
                    s.exit = Some(Exit {
                        pid: 0,
                        status: 255,
                        at: SystemTime::now(),
                    });
                });
                return Err(err);
            }
        };
        let exit = exit.unwrap_or_else(|| self.inner.spawner.watch(pid));
        exec.io.send_replace(Some(io));
        exec.state.send_modify(|s| {
            s.pid = pid;
            s.status = Status::Running;
        });
        tokio::spawn(self.clone().monitor(exec.clone(), exit));
        self.publish(
            TaskEvent::ExecStarted {
                exec_id: exec_id.to_string(),
                pid,
            },
            SystemTime::now(),
        );
        let micros = t0.elapsed().as_micros() as u64;
        tracing::info!(
            exec_id,
            pid,
            native = native.is_some(),
            micros,
            "exec started"
        );
        Ok(pid)
    }

    /// Native exec for this process, unless it is configured off or does not apply (then the
    /// reason is logged and the runtime runs the exec).
    fn native_exec(&self, init_pid: u32, process_json: &[u8]) -> Option<Arc<NativeExec>> {
        if !self.inner.options.native_exec {
            return None;
        }
        let native = self
            .inner
            .native
            .get_or_init(|| {
                let runtime: RuntimeSettings =
                    std::fs::read(self.bundle().join("shim-runtime.json"))
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_else(|| self.inner.options.runtime.clone());
                let name = runtime
                    .binary
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "runc".into());
                match crate::nsexec::Container::load(self.bundle()) {
                    Ok(c) => Some(Arc::new(NativeExec::new(c, self.id(), &name))),
                    Err(err) => {
                        tracing::info!(reason = %err.chain(), "exec through the runtime");
                        None
                    }
                }
            })
            .clone()?;
        match native.check(init_pid, process_json) {
            Ok(()) => Some(native),
            Err(err) => {
                tracing::info!(reason = %err.chain(), "exec through the runtime");
                None
            }
        }
    }

    async fn start_native(
        &self,
        native: &NativeExec,
        exec: &Process,
        init_pid: u32,
        process_json: &[u8],
    ) -> Result<(Arc<ProcessIo>, u32, Option<ExitFuture>)> {
        let (pending, child) = stdio::prepare_direct(exec.stdio)?;
        let started = native
            .start(
                self.inner.spawner.as_ref(),
                init_pid,
                process_json,
                child,
                self.inner.options.exec_timeout,
            )
            .await?;
        let io = pending.launch_direct(started.master, exec.output.clone())?;
        Ok((io, started.pid, Some(started.exit)))
    }

    async fn start_runtime_exec(
        &self,
        runtime: &Arc<dyn OciRuntime>,
        exec: &Process,
        process_json: &[u8],
    ) -> Result<(Arc<ProcessIo>, u32, Option<ExitFuture>)> {
        let n = self.next();
        let spec_file = self.bundle().join(format!(".exec-{n}.json"));
        let pid_file = self.bundle().join(format!(".exec-{n}.pid"));
        let launched = async {
            std::fs::write(&spec_file, process_json).map_err(|e| {
                Error::internal(format!("write {}", spec_file.display())).with_source(e)
            })?;
            let (pending, child) = stdio::prepare(exec.stdio, &self.console_path())?;
            let run = runtime.exec(
                self.id(),
                ExecOptions {
                    process: spec_file.clone(),
                    pid_file: pid_file.clone(),
                    console_socket: pending.console_socket().map(Path::to_path_buf),
                    stdio: child,
                },
            );
            let io = pending.launch(run, exec.output.clone()).await?;
            Ok::<_, Error>((io, read_pid(&pid_file)?, None))
        }
        .await;
        let _ = std::fs::remove_file(&spec_file);
        let _ = std::fs::remove_file(&pid_file);
        launched
    }

    /// Waits for a process' exit and records it: the exit file first (init), then — once its
    /// output has drained into the log and to attachers — the status and the event.
    async fn monitor(self, process: Arc<Process>, exit: ExitFuture) {
        let pid = process.snapshot().pid;
        let exit = exit.await.unwrap_or_else(|err| {
            tracing::warn!(error = %err.chain(), pid, "lost the exit status");
            Exit {
                pid,
                status: 255,
                at: SystemTime::now(),
            }
        });
        let init = process.exec_id.is_empty();
        if init && let Err(err) = write_exit_file(self.bundle(), &exit) {
            tracing::error!(error = %err.chain(), "record exit status");
        }
        let drain = self.inner.options.exit_drain;
        if tokio::time::timeout(drain, process.output.wait())
            .await
            .is_err()
        {
            tracing::debug!(
                pid,
                "output still open after exit; reporting the exit anyway"
            );
        }
        if let Some(logger) = process.output.logger() {
            // Normally microseconds; a stalled log disk must not hold the exit back for long.
            let _ = tokio::time::timeout(LOG_FLUSH_WAIT, logger.mark()).await;
        }
        self.check_oom();
        process.state.send_modify(|s| {
            s.status = Status::Stopped;
            s.exit = Some(exit);
        });
        tracing::info!(exec_id = %process.exec_id, pid = exit.pid, status = exit.status, "process exited");
        self.publish(
            TaskEvent::Exit {
                exec_id: process.exec_id.clone(),
                pid: exit.pid,
                status: exit.status,
                at: exit.at,
            },
            exit.at,
        );
    }

    fn check_oom(&self) {
        let oom = {
            let st = self.inner.state.lock().unwrap();
            st.container.as_ref().and_then(|c| c.oom.clone())
        };
        if let Some(oom) = oom
            && let Some(kills) = oom.cgroup.oom_kills()
            && kills > oom.seen.swap(kills, Ordering::AcqRel)
        {
            tracing::info!(kills, "oom kill in the container's cgroup");
            self.publish(TaskEvent::Oom, SystemTime::now());
        }
    }

    async fn watch_oom(self, oom: Arc<Oom>, stop: CancellationToken) {
        let fd = match oom.cgroup.oom_notifier() {
            Ok(fd) => fd,
            Err(err) => {
                tracing::debug!(error = %err.chain(), "no oom notifications; checking at exit only");
                return;
            }
        };
        // SAFETY: the OwnedFd stays open and names the same descriptor while the AsyncFd owns it.
        let fd = match unsafe { AsyncFd::register(fd) } {
            Ok(fd) => fd,
            Err(_) => return,
        };
        let mut buf = [0u8; 4096];
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                ready = fd.readable() => {
                    let Ok(mut guard) = ready else { return };
                    match guard.try_io(|f| nix::unistd::read(f.get_ref(), &mut buf).map_err(std::io::Error::from)) {
                        Ok(Ok(_)) => self.check_oom(),
                        Ok(Err(_)) => return,
                        Err(_would_block) => continue,
                    }
                }
            }
        }
    }

    /// A process' state.
    pub fn state(&self, exec_id: &str) -> Result<ProcessState> {
        let p = self.process(exec_id)?;
        let s = p.snapshot();
        Ok(ProcessState {
            id: self.id().to_string(),
            exec_id: exec_id.to_string(),
            bundle: self.bundle().to_path_buf(),
            pid: s.pid,
            status: s.status,
            terminal: p.stdio.terminal(),
            stdin: p.stdio.stdin,
            exit: s.exit,
        })
    }

    /// Sends `signal` to a process; `all` (init only) signals every process of the container.
    pub async fn kill(&self, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let signal = i32::try_from(signal)
            .ok()
            .and_then(|s| nix::sys::signal::Signal::try_from(s).ok())
            .ok_or_else(|| Error::invalid_argument(format!("invalid signal {signal}")))?;
        let p = self.process(exec_id)?;
        let s = p.snapshot();
        if s.status == Status::Stopped {
            return Err(Error::not_found("the process has already exited"));
        }
        if exec_id.is_empty() {
            let runtime = self.runtime()?;
            return match runtime.kill(self.id(), signal as i32, all).await {
                // It exited while we were signalling it.
                Err(e) if p.snapshot().status == Status::Stopped => {
                    Err(Error::not_found("the process has already exited").with_source(e))
                }
                other => other,
            };
        }
        if s.status == Status::Created || s.pid == 0 {
            return Err(Error::failed_precondition(format!(
                "exec {exec_id:?} has not started"
            )));
        }
        // The pid cannot have been reused: the shim has not reaped it (its status is not
        // Stopped), so it still names our child.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid as i32), signal)
            .map_err(|e| Error::internal(format!("signal exec {exec_id:?}")).with_source(e))
    }

    /// Waits until a process has exited (returns at once if it has). Works before Start.
    pub async fn wait(&self, exec_id: &str) -> Result<Exit> {
        let p = self.process(exec_id)?;
        let shutdown = self.inner.shutdown.clone();
        tokio::select! {
            exit = p.wait() => Ok(exit),
            _ = shutdown.cancelled() => Err(Error::unavailable("the shim is shutting down")),
        }
    }

    /// Forgets a process. For init: `runtime delete`, unmount the rootfs. Refuses a running
    /// process unless `force`, which kills it first.
    pub async fn delete(&self, exec_id: &str, force: bool) -> Result<Deleted> {
        let _lifecycle = self.inner.lifecycle.lock().await;
        if !exec_id.is_empty() {
            return self.delete_exec(exec_id, force).await;
        }
        let init = self.process("")?;
        let runtime = self.runtime()?;
        let s = init.snapshot();
        match s.status {
            Status::Running | Status::Paused if !force => {
                return Err(Error::failed_precondition(
                    "the task is running: stop it first or delete with force",
                ));
            }
            Status::Stopped => {
                if let Err(err) = runtime.delete(self.id(), false).await
                    && !err.is(ErrorKind::NotFound)
                {
                    // A stopped container the runtime cannot delete normally: force it.
                    runtime.delete(self.id(), true).await?;
                }
            }
            // Created (never started) or forced: the runtime kills what is left.
            _ => {
                runtime.delete(self.id(), true).await?;
                let wait = init.wait();
                if tokio::time::timeout(Duration::from_secs(10), wait)
                    .await
                    .is_err()
                {
                    return Err(Error::new(
                        ErrorKind::DeadlineExceeded,
                        "the task did not exit after being killed",
                    ));
                }
            }
        }
        let exit = init.snapshot().exit;
        let container = {
            let mut st = self.inner.state.lock().unwrap();
            st.deleted = true;
            if let Some(log) = st.log.as_mut() {
                // Writes what is queued and ends the writer thread.
                log.logger = None;
            }
            st.container.take()
        };
        if let Some(c) = container {
            c.stop.cancel();
            for exec in c.execs.values() {
                exec.output.close();
            }
            if c.mounted {
                self.inner.rootfs.unmount(&self.bundle().join("rootfs"))?;
            }
        }
        tracing::info!("task deleted");
        Ok(Deleted { pid: s.pid, exit })
    }

    async fn delete_exec(&self, exec_id: &str, force: bool) -> Result<Deleted> {
        let exec = self.process(exec_id)?;
        let s = exec.snapshot();
        if s.status == Status::Running {
            if !force {
                return Err(Error::failed_precondition(format!(
                    "exec {exec_id:?} is running: stop it first or delete with force"
                )));
            }
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(s.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            if tokio::time::timeout(Duration::from_secs(10), exec.wait())
                .await
                .is_err()
            {
                return Err(Error::new(
                    ErrorKind::DeadlineExceeded,
                    "the exec did not exit after SIGKILL",
                ));
            }
        }
        exec.output.close();
        let mut st = self.inner.state.lock().unwrap();
        if let Some(c) = st.container.as_mut() {
            c.execs.remove(exec_id);
        }
        let s = exec.snapshot();
        Ok(Deleted {
            pid: s.pid,
            exit: s.exit,
        })
    }

    /// Registers an exec process (started with [`Shim::start`]).
    pub async fn exec(&self, req: ExecTask) -> Result<()> {
        validate_exec_id(&req.exec_id)?;
        // Fail early on a spec the runtime would reject.
        exec_process_json(&req.spec, req.stdio)?;
        let init = self.process("")?;
        if init.snapshot().status == Status::Stopped {
            return Err(Error::failed_precondition("the container is not running"));
        }
        {
            let mut st = self.inner.state.lock().unwrap();
            let c = st.container.as_mut().ok_or_else(not_created)?;
            if c.execs.contains_key(&req.exec_id) {
                return Err(Error::already_exists(format!(
                    "exec {:?} exists",
                    req.exec_id
                )));
            }
            let output = Output::new(None);
            let p = Process::new(req.exec_id.clone(), req.stdio, Some(req.spec), output);
            c.execs.insert(req.exec_id.clone(), p);
        }
        self.publish(
            TaskEvent::ExecAdded {
                exec_id: req.exec_id,
            },
            SystemTime::now(),
        );
        Ok(())
    }

    /// Resizes a process' terminal.
    pub fn resize_pty(&self, exec_id: &str, width: u16, height: u16) -> Result<()> {
        let p = self.process(exec_id)?;
        if !p.stdio.terminal() {
            return Err(Error::failed_precondition("the process has no terminal"));
        }
        match p.io() {
            Some(io) => io.resize(width, height),
            None => Err(Error::failed_precondition("the process has not started")),
        }
    }

    /// Closes a process' stdin.
    pub async fn close_io(&self, exec_id: &str, stdin: bool) -> Result<()> {
        let p = self.process(exec_id)?;
        if stdin && let Some(io) = p.io() {
            io.close_stdin().await;
        }
        Ok(())
    }

    /// Attaches to a process' stdio.
    pub fn attach(&self, opts: AttachOptions) -> Result<Attachment> {
        let process = self.process(&opts.exec_id)?;
        let replay_log = opts.logs && opts.exec_id.is_empty();
        let log = if replay_log {
            let st = self.inner.state.lock().unwrap();
            st.log
                .as_ref()
                .map(|l| (l.options.clone(), l.logger.as_ref().map(Logger::tracker)))
        } else {
            None
        };
        let (live, mark) = match &log {
            Some(_) => process
                .output
                .subscribe_after_log(opts.stdout, opts.stderr, opts.stream),
            None if opts.stream => (process.output.subscribe(opts.stdout, opts.stderr), None),
            None => (None, None),
        };
        let (tx, events) = mpsc::channel(16);
        let p = process.clone();
        let stream = opts.stream;
        let (stdout, stderr) = (opts.stdout, opts.stderr);
        tokio::spawn(async move {
            if let Some((options, tracker)) = log {
                let stop_at = match mark {
                    Some(rx) => rx.await.ok(),
                    None => None,
                };
                let read = ReadOptions {
                    stdout,
                    stderr,
                    follow: stop_at.is_some(),
                    ..Default::default()
                };
                let mut batches = logreader::read(options, tracker, read, stop_at);
                while let Some(batch) = batches.recv().await {
                    let Ok(batch) = batch else { break };
                    for e in batch {
                        let chunk = Chunk {
                            stream: e.stream,
                            data: Bytes::from(e.data),
                        };
                        if tx.send(AttachEvent::Output(chunk)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            if let Some(mut live) = live {
                loop {
                    tokio::select! {
                        chunk = live.recv() => match chunk {
                            Some(c) => if tx.send(AttachEvent::Output(c)).await.is_err() { return },
                            None => break,
                        },
                        _ = tx.closed() => return,
                    }
                }
            }
            let exit = if stream {
                // Output ends as the process exits; its status follows within moments.
                tokio::time::timeout(Duration::from_secs(2), p.wait())
                    .await
                    .ok()
                    .map(|e| e.status)
            } else {
                p.snapshot().exit.map(|e| e.status)
            };
            let _ = tx.send(AttachEvent::End(exit)).await;
        });
        Ok(Attachment {
            terminal: process.stdio.terminal(),
            events,
            input: AttachSink {
                process,
                stdin: opts.stdin,
            },
        })
    }

    /// Reads the container's log.
    pub fn logs(&self, opts: ReadOptions) -> Result<mpsc::Receiver<Result<Vec<LogEntry>>>> {
        if !opts.stdout && !opts.stderr {
            return Err(Error::invalid_argument(
                "logs: ask for stdout, stderr or both",
            ));
        }
        let (options, tracker) = {
            let st = self.inner.state.lock().unwrap();
            if st.container.is_none() && !st.deleted {
                return Err(not_created());
            }
            let log = st.log.as_ref().ok_or_else(|| {
                Error::failed_precondition("the container's output is not logged")
            })?;
            (
                log.options.clone(),
                log.logger.as_ref().map(Logger::tracker),
            )
        };
        Ok(logreader::read(options, tracker, opts, None))
    }

    /// Host pids of the container's processes, with the exec id of exec processes.
    pub async fn pids(&self) -> Result<Vec<(u32, String)>> {
        let runtime = self.runtime()?;
        let pids = runtime.ps(self.id()).await?;
        let execs: HashMap<u32, String> = {
            let st = self.inner.state.lock().unwrap();
            st.container
                .as_ref()
                .map(|c| {
                    c.execs
                        .values()
                        .map(|e| (e.snapshot().pid, e.exec_id.clone()))
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(pids
            .into_iter()
            .map(|pid| (pid, execs.get(&pid).cloned().unwrap_or_default()))
            .collect())
    }

    /// Freezes the container.
    pub async fn pause(&self) -> Result<()> {
        let _lifecycle = self.inner.lifecycle.lock().await;
        let init = self.process("")?;
        if init.snapshot().status != Status::Running {
            return Err(Error::failed_precondition("the task is not running"));
        }
        self.runtime()?.pause(self.id()).await?;
        init.state.send_if_modified(|s| {
            let running = s.status == Status::Running;
            if running {
                s.status = Status::Paused;
            }
            running
        });
        Ok(())
    }

    /// Thaws the container.
    pub async fn resume(&self) -> Result<()> {
        let _lifecycle = self.inner.lifecycle.lock().await;
        let init = self.process("")?;
        if init.snapshot().status != Status::Paused {
            return Err(Error::failed_precondition("the task is not paused"));
        }
        self.runtime()?.resume(self.id()).await?;
        init.state.send_if_modified(|s| {
            let paused = s.status == Status::Paused;
            if paused {
                s.status = Status::Running;
            }
            paused
        });
        Ok(())
    }

    /// Applies new resource limits (an OCI `LinuxResources` JSON object).
    pub async fn update(&self, resources: &[u8]) -> Result<()> {
        let value: serde_json::Value = serde_json::from_slice(resources).map_err(|e| {
            Error::invalid_argument("resources are not a JSON LinuxResources object").with_source(e)
        })?;
        if !value.is_object() {
            return Err(Error::invalid_argument(
                "resources are not a JSON LinuxResources object",
            ));
        }
        let init = self.process("")?;
        if init.snapshot().status == Status::Stopped {
            return Err(Error::failed_precondition("the task is not running"));
        }
        self.runtime()?.update(self.id(), resources).await
    }

    /// The container's cgroup counters.
    pub fn stats(&self) -> Result<Stats> {
        let oom = {
            let st = self.inner.state.lock().unwrap();
            let c = st.container.as_ref().ok_or_else(not_created)?;
            c.oom.clone()
        };
        match oom {
            Some(o) => o.cgroup.stats(),
            None => Err(Error::not_found("the container's cgroup is unknown")),
        }
    }

    /// Who this shim is.
    pub fn info(&self) -> Info {
        let task_pid = {
            let st = self.inner.state.lock().unwrap();
            st.container
                .as_ref()
                .map(|c| c.init.snapshot().pid)
                .unwrap_or(0)
        };
        Info {
            id: self.id().to_string(),
            bundle: self.bundle().to_path_buf(),
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// Ends the shim. Refuses while the task exists, unless `now` (then it is killed and
    /// deleted first).
    pub async fn shutdown(&self, now: bool) -> Result<()> {
        let exists = self.inner.state.lock().unwrap().container.is_some();
        if exists {
            if !now {
                return Err(Error::failed_precondition(
                    "the task is not deleted: delete it first or shut down with now",
                ));
            }
            if let Err(err) = self.delete("", true).await {
                tracing::warn!(error = %err.chain(), "delete on shutdown");
            }
        }
        tracing::info!("shutdown requested");
        self.inner.shutdown.cancel();
        Ok(())
    }
}

fn read_pid(path: &Path) -> Result<u32> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::internal(format!("read pid file {}", path.display())).with_source(e))?;
    text.trim().parse().map_err(|e| {
        Error::internal(format!("pid file {} holds {text:?}", path.display())).with_source(e)
    })
}

/// Checks that the bundle has a config.json whose `process.terminal` agrees with `stdio`.
fn check_config(bundle: &Path, stdio: StdioSpec) -> Result<()> {
    let path = bundle.join("config.json");
    let data = std::fs::read(&path).map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::NotFound
        } else {
            ErrorKind::Internal
        };
        Error::new(kind, format!("read {}", path.display())).with_source(e)
    })?;
    let config: serde_json::Value = serde_json::from_slice(&data).map_err(|e| {
        Error::invalid_argument(format!("{} is not valid JSON", path.display())).with_source(e)
    })?;
    let terminal = config
        .pointer("/process/terminal")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    if terminal != stdio.terminal() {
        return Err(Error::invalid_argument(format!(
            "stdio {} a TTY but config.json has process.terminal={terminal}",
            if stdio.terminal() { "is" } else { "is not" }
        )));
    }
    Ok(())
}

fn validate_exec_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_argument(format!(
            "exec id {id:?}: want 1-128 characters of [A-Za-z0-9_.-]"
        )))
    }
}

/// The exec's `process` JSON with its terminal settings made to match its stdio.
fn exec_process_json(spec: &[u8], stdio: StdioSpec) -> Result<Vec<u8>> {
    let bad = |why: &str| Error::invalid_argument(format!("exec spec: {why}"));
    let mut v: serde_json::Value =
        serde_json::from_slice(spec).map_err(|e| bad("not valid JSON").with_source(e))?;
    let obj = v.as_object_mut().ok_or_else(|| bad("not a JSON object"))?;
    let has_args = obj
        .get("args")
        .and_then(|a| a.as_array())
        .is_some_and(|a| !a.is_empty());
    if !has_args {
        return Err(bad("no args"));
    }
    obj.insert("terminal".into(), stdio.terminal().into());
    match (stdio.terminal(), stdio.size) {
        (true, Some((w, h))) => {
            obj.insert(
                "consoleSize".into(),
                serde_json::json!({"width": w, "height": h}),
            );
        }
        _ => {
            obj.remove("consoleSize");
        }
    }
    obj.entry("cwd").or_insert_with(|| "/".into());
    obj.entry("user")
        .or_insert_with(|| serde_json::json!({"uid": 0, "gid": 0}));
    serde_json::to_vec(&v).map_err(|e| Error::internal("encode exec spec").with_source(e))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::Write;
    use std::sync::atomic::AtomicU32;

    use tokio::sync::oneshot;

    use super::*;
    use crate::events::PublisherConfig;
    use crate::runtime::{BoxFuture, RuntimeState};
    use crate::stdio::StdioMode;

    /// Exits are delivered when the test (or the fake runtime) says so.
    #[derive(Debug, Default)]
    struct FakeSpawner {
        waiting: Mutex<HashMap<u32, oneshot::Sender<Exit>>>,
        exited: Mutex<HashMap<u32, Exit>>,
    }

    impl FakeSpawner {
        fn exit(&self, pid: u32, status: u32) {
            let exit = Exit {
                pid,
                status,
                at: SystemTime::now(),
            };
            match self.waiting.lock().unwrap().remove(&pid) {
                Some(tx) => {
                    let _ = tx.send(exit);
                }
                None => {
                    self.exited.lock().unwrap().insert(pid, exit);
                }
            }
        }
    }

    impl Spawner for FakeSpawner {
        fn spawn(&self, _cmd: &mut std::process::Command) -> Result<(u32, ExitFuture)> {
            Err(Error::unimplemented("fake"))
        }

        fn watch(&self, pid: u32) -> ExitFuture {
            let (tx, rx) = oneshot::channel();
            match self.exited.lock().unwrap().remove(&pid) {
                Some(exit) => {
                    let _ = tx.send(exit);
                }
                None => {
                    self.waiting.lock().unwrap().insert(pid, tx);
                }
            }
            ExitFuture::new(async move { rx.await.map_err(|_| Error::internal("dropped")) })
        }
    }

    /// A runtime whose processes are pids handed out in order; killing one makes the fake
    /// spawner report its exit.
    #[derive(Debug)]
    struct FakeRuntime {
        spawner: Arc<FakeSpawner>,
        calls: Mutex<Vec<String>>,
        next_pid: AtomicU32,
        live: Mutex<Vec<u32>>,
        fail_create: Option<String>,
    }

    impl FakeRuntime {
        fn launch(
            &self,
            pid_file: &Path,
            stdio: crate::runtime::ProcessStdio,
            output: &[u8],
        ) -> u32 {
            let pid = self.next_pid.fetch_add(1, Ordering::SeqCst);
            std::fs::write(pid_file, pid.to_string()).unwrap();
            if let Some(out) = stdio.stdout {
                std::fs::File::from(out).write_all(output).unwrap();
            }
            self.live.lock().unwrap().push(pid);
            pid
        }

        fn kill_all(&self, status: u32) {
            for pid in self.live.lock().unwrap().drain(..) {
                self.spawner.exit(pid, status);
            }
        }
    }

    impl OciRuntime for FakeRuntime {
        fn create<'a>(&'a self, _id: &'a str, opts: CreateOptions) -> BoxFuture<'a, ()> {
            self.calls.lock().unwrap().push("create".into());
            Box::pin(async move {
                if let Some(msg) = &self.fail_create {
                    return Err(Error::internal(msg.clone()));
                }
                self.launch(&opts.pid_file, opts.stdio, b"hello\n");
                Ok(())
            })
        }
        fn start<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, ()> {
            self.calls.lock().unwrap().push("start".into());
            Box::pin(async { Ok(()) })
        }
        fn state<'a>(&'a self, id: &'a str) -> BoxFuture<'a, RuntimeState> {
            Box::pin(async move {
                Ok(RuntimeState {
                    id: id.into(),
                    pid: 0,
                    status: "running".into(),
                })
            })
        }
        fn kill<'a>(&'a self, _id: &'a str, signal: i32, all: bool) -> BoxFuture<'a, ()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("kill {signal} {all}"));
            self.kill_all(128 + signal as u32);
            Box::pin(async { Ok(()) })
        }
        fn delete<'a>(&'a self, _id: &'a str, force: bool) -> BoxFuture<'a, ()> {
            self.calls.lock().unwrap().push(format!("delete {force}"));
            if force {
                self.kill_all(137);
            }
            Box::pin(async { Ok(()) })
        }
        fn exec<'a>(&'a self, _id: &'a str, opts: ExecOptions) -> BoxFuture<'a, ()> {
            self.calls.lock().unwrap().push("exec".into());
            Box::pin(async move {
                let spec: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&opts.process).unwrap()).unwrap();
                assert_eq!(spec["terminal"], false);
                self.launch(&opts.pid_file, opts.stdio, b"from exec\n");
                Ok(())
            })
        }
        fn pause<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }
        fn resume<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }
        fn update<'a>(&'a self, _id: &'a str, _resources: &'a [u8]) -> BoxFuture<'a, ()> {
            Box::pin(async { Ok(()) })
        }
        fn ps<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Vec<u32>> {
            let live = self.live.lock().unwrap().clone();
            Box::pin(async move { Ok(live) })
        }
    }

    #[derive(Debug)]
    struct Factory(Arc<FakeRuntime>);

    impl RuntimeFactory for Factory {
        fn runtime(&self, _settings: &RuntimeSettings, _bundle: &Path) -> Arc<dyn OciRuntime> {
            self.0.clone()
        }
    }

    #[derive(Debug, Default, Clone)]
    struct FakeRootfs(Arc<Mutex<Vec<String>>>);

    impl Rootfs for FakeRootfs {
        fn mount(&self, mounts: &[Mount], target: &Path) -> Result<()> {
            self.0
                .lock()
                .unwrap()
                .push(format!("mount {} {}", mounts.len(), target.display()));
            Ok(())
        }
        fn unmount(&self, target: &Path) -> Result<()> {
            self.0
                .lock()
                .unwrap()
                .push(format!("unmount {}", target.display()));
            Ok(())
        }
    }

    #[derive(Debug, Default)]
    struct Hub(Mutex<Vec<TaskEvent>>);

    impl Transport for Hub {
        fn send<'a>(&'a self, event: &'a Envelope) -> BoxFuture<'a, ()> {
            self.0.lock().unwrap().push(event.event.clone());
            Box::pin(async { Ok(()) })
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        shim: Shim,
        spawner: Arc<FakeSpawner>,
        runtime: Arc<FakeRuntime>,
        rootfs: FakeRootfs,
        hub: Arc<Hub>,
    }

    fn fixture(terminal: bool, fail_create: Option<&str>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({"process": {"terminal": terminal, "args": ["sh"]}});
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let spawner = Arc::new(FakeSpawner::default());
        let runtime = Arc::new(FakeRuntime {
            spawner: spawner.clone(),
            calls: Mutex::new(Vec::new()),
            next_pid: AtomicU32::new(4242),
            live: Mutex::new(Vec::new()),
            fail_create: fail_create.map(str::to_string),
        });
        let rootfs = FakeRootfs::default();
        let hub = Arc::new(Hub::default());
        let events = Publisher::new(PublisherConfig::default());
        events.set_transport(hub.clone());
        let mut options = ShimOptions::new("c1", dir.path());
        options.exit_drain = Duration::from_secs(1);
        let shim = Shim::new(
            options,
            spawner.clone(),
            Box::new(Factory(runtime.clone())),
            Box::new(rootfs.clone()),
            events,
        );
        Fixture {
            dir,
            shim,
            spawner,
            runtime,
            rootfs,
            hub,
        }
    }

    fn create_task(f: &Fixture) -> CreateTask {
        CreateTask {
            rootfs: vec![Mount::bind("/somewhere", false)],
            stdio: StdioSpec {
                mode: StdioMode::Pipes,
                stdin: false,
                size: None,
            },
            log: LogSpec {
                format: Some(LogFormat::JsonFile),
                max_file: 1,
                ..Default::default()
            },
            ..Default::default()
        }
        .with_bundle(f.dir.path())
    }

    impl CreateTask {
        fn with_bundle(mut self, bundle: &Path) -> Self {
            self.bundle = bundle.to_path_buf();
            self
        }
    }

    #[tokio::test]
    async fn lifecycle_records_the_exit_before_reporting_it() {
        let f = fixture(false, None);
        let pid = f.shim.create(create_task(&f)).await.unwrap();
        assert_eq!(pid, 4242);
        assert_eq!(f.shim.state("").unwrap().status, Status::Created);
        assert_eq!(f.shim.info().task_pid, 4242);
        let waiter = tokio::spawn({
            let shim = f.shim.clone();
            async move { shim.wait("").await }
        });
        assert_eq!(f.shim.start("").await.unwrap(), 4242);
        assert_eq!(
            f.shim.start("").await.unwrap_err().kind(),
            ErrorKind::FailedPrecondition
        );
        assert_eq!(
            f.shim.delete("", false).await.unwrap_err().kind(),
            ErrorKind::FailedPrecondition
        );

        f.spawner.exit(4242, 3);
        let exit = waiter.await.unwrap().unwrap();
        assert_eq!((exit.pid, exit.status), (4242, 3));
        assert_eq!(read_exit_file(f.dir.path()).unwrap(), exit);
        // The output drained into the log before the exit was reported.
        let log = std::fs::read_to_string(f.dir.path().join("container.log")).unwrap();
        assert!(
            log.contains("\"log\":\"hello\\n\",\"stream\":\"stdout\""),
            "{log}"
        );
        assert_eq!(
            f.shim.kill("", 15, false).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );

        let deleted = f.shim.delete("", false).await.unwrap();
        assert_eq!((deleted.pid, deleted.exit.unwrap().status), (4242, 3));
        assert_eq!(f.shim.state("").unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(f.shim.info().task_pid, 0);
        let rootfs = f.dir.path().join("rootfs").display().to_string();
        assert_eq!(
            *f.rootfs.0.lock().unwrap(),
            [format!("mount 1 {rootfs}"), format!("unmount {rootfs}")]
        );
        assert_eq!(
            *f.runtime.calls.lock().unwrap(),
            ["create", "start", "delete false"]
        );
        // Logs stay readable after Delete.
        let mut rx = f
            .shim
            .logs(ReadOptions {
                stdout: true,
                stderr: true,
                ..Default::default()
            })
            .unwrap();
        let batch = rx.recv().await.unwrap().unwrap();
        assert_eq!(batch[0].data, b"hello\n");

        assert!(f.shim.events().flush(Duration::from_secs(5)).await);
        let events = f.hub.0.lock().unwrap().clone();
        assert_eq!(
            events[0],
            TaskEvent::Start {
                exec_id: String::new(),
                pid: 4242
            }
        );
        assert!(
            matches!(
                events[1],
                TaskEvent::Exit {
                    pid: 4242,
                    status: 3,
                    ..
                }
            ),
            "{events:?}"
        );
        assert_eq!(
            f.shim.create(create_task(&f)).await.unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
        f.shim.shutdown(false).await.unwrap();
        assert!(f.shim.shutdown_token().is_cancelled());
    }

    #[tokio::test]
    async fn create_with_start_runs_the_init_and_reports_start_before_exit() {
        let f = fixture(false, None);
        // The init is gone before the shim watches it (a `run` of `true`).
        f.spawner.exit(4242, 0);
        let task = CreateTask {
            start: true,
            hold_output_for: 0,
            ..create_task(&f)
        };
        assert_eq!(f.shim.create(task).await.unwrap(), 4242);
        let exit = f.shim.wait("").await.unwrap();
        assert_eq!((exit.pid, exit.status), (4242, 0));
        assert_eq!(
            f.shim.start("").await.unwrap_err().kind(),
            ErrorKind::FailedPrecondition
        );
        assert_eq!(*f.runtime.calls.lock().unwrap(), ["create", "start"]);
        assert!(f.shim.events().flush(Duration::from_secs(5)).await);
        let events = f.hub.0.lock().unwrap().clone();
        assert_eq!(
            events[0],
            TaskEvent::Start {
                exec_id: String::new(),
                pid: 4242
            }
        );
        assert!(
            matches!(events[1], TaskEvent::Exit { pid: 4242, .. }),
            "{events:?}"
        );
        f.shim.delete("", false).await.unwrap();
        f.shim.shutdown(false).await.unwrap();
    }

    #[tokio::test]
    async fn exec_processes_and_force_delete() {
        let f = fixture(false, None);
        f.shim.create(create_task(&f)).await.unwrap();
        let exec = |id: &str, spec: &[u8]| ExecTask {
            exec_id: id.into(),
            spec: spec.to_vec(),
            stdio: StdioSpec {
                mode: StdioMode::Pipes,
                stdin: false,
                size: None,
            },
        };
        let spec = br#"{"args":["echo","x"]}"#;
        f.shim.start("").await.unwrap();
        assert_eq!(
            f.shim.exec(exec("bad id", spec)).await.unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            f.shim.exec(exec("e1", b"{}")).await.unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        f.shim.exec(exec("e1", spec)).await.unwrap();
        assert_eq!(
            f.shim.exec(exec("e1", spec)).await.unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
        let mut a = f
            .shim
            .attach(AttachOptions {
                exec_id: "e1".into(),
                stdout: true,
                stderr: true,
                stream: true,
                ..Default::default()
            })
            .unwrap();
        let pid = f.shim.start("e1").await.unwrap();
        assert_eq!(pid, 4243);
        let first = a.events.recv().await.unwrap();
        assert_eq!(
            first,
            AttachEvent::Output(Chunk {
                stream: crate::logger::Stream::Stdout,
                data: Bytes::from_static(b"from exec\n")
            })
        );
        let pids = f.shim.pids().await.unwrap();
        assert_eq!(pids, [(4242, String::new()), (4243, "e1".to_string())]);
        f.spawner.exit(4243, 0);
        assert_eq!(a.events.recv().await.unwrap(), AttachEvent::End(Some(0)));
        assert_eq!(f.shim.wait("e1").await.unwrap().status, 0);
        assert_eq!(
            f.shim
                .delete("e1", false)
                .await
                .unwrap()
                .exit
                .unwrap()
                .status,
            0
        );
        assert_eq!(f.shim.state("e1").unwrap_err().kind(), ErrorKind::NotFound);
        // Exec output is not logged.
        let log = std::fs::read_to_string(f.dir.path().join("container.log")).unwrap();
        assert!(!log.contains("from exec"));

        assert_eq!(
            f.shim.shutdown(false).await.unwrap_err().kind(),
            ErrorKind::FailedPrecondition
        );
        let deleted = f.shim.delete("", true).await.unwrap();
        assert_eq!(deleted.exit.unwrap().status, 137);
        f.shim.shutdown(false).await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_create_leaves_nothing_behind() {
        let f = fixture(false, Some("runc create: exec: \"nope\": not found"));
        let err = f.shim.create(create_task(&f)).await.unwrap_err();
        assert_eq!(err.message(), "runc create: exec: \"nope\": not found");
        assert_eq!(f.shim.state("").unwrap_err().kind(), ErrorKind::NotFound);
        let rootfs = f.dir.path().join("rootfs").display().to_string();
        assert_eq!(
            *f.rootfs.0.lock().unwrap(),
            [format!("mount 1 {rootfs}"), format!("unmount {rootfs}")]
        );
        // A forced delete cleans up anything the runtime may have half-made.
        assert_eq!(*f.runtime.calls.lock().unwrap(), ["create", "delete true"]);
    }

    #[tokio::test]
    async fn create_checks_the_bundle() {
        let f = fixture(true, None);
        // config.json says terminal, the request says pipes.
        let err = f.shim.create(create_task(&f)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        let mut other = create_task(&f);
        other.id = "c2".into();
        assert_eq!(
            f.shim.create(other).await.unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        std::fs::remove_file(f.dir.path().join("config.json")).unwrap();
        let mut tty = create_task(&f);
        tty.stdio.mode = StdioMode::Tty;
        assert_eq!(
            f.shim.create(tty).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert!(
            f.rootfs.0.lock().unwrap().is_empty(),
            "nothing mounted for a bad request"
        );
    }

    #[test]
    fn exec_specs_get_terminal_settings() {
        let tty = StdioSpec {
            mode: StdioMode::Tty,
            stdin: true,
            size: Some((80, 24)),
        };
        let out = exec_process_json(br#"{"args":["sh"],"terminal":false}"#, tty).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["terminal"], true);
        assert_eq!(
            v["consoleSize"],
            serde_json::json!({"width": 80, "height": 24})
        );
        assert_eq!(v["cwd"], "/");
        assert_eq!(v["user"]["uid"], 0);
        assert!(exec_process_json(br#"{"args":[]}"#, tty).is_err());
        assert!(exec_process_json(b"[1]", tty).is_err());
    }
}
