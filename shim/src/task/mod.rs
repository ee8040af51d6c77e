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

mod exec;
mod health;
#[cfg(test)]
mod tests;
mod types;

pub use types::*;

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
    /// The init's cgroup, read for stats and watched for OOM kills; `None` when unknown, or
    /// not the container's (a runtime that reads its own stats).
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
    health: Option<health::HealthSlot>,
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
        let spec = check_config(&opts.bundle, req.stdio)?;

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
        let mut runtime_settings = runtime_settings;
        if crate::inproc::selected_by(&runtime_settings.binary)
            && let Some(reason) = crate::inproc::needs_runc(&spec)
        {
            tracing::warn!(id = %opts.id, reason, "running this container with runc");
            runtime_settings.binary = "runc".into();
            runtime_settings.root = runtime_settings
                .root
                .as_deref()
                .and_then(Path::parent)
                .map(|p| p.join("runc"));
        }
        let runtime = self.inner.runtimes.runtime(&runtime_settings, &opts.bundle);
        if let Some(address) = req.events_address.as_deref().filter(|a| !a.is_empty()) {
            self.inner
                .events
                .set_transport(Arc::new(GrpcEvents::new(address)?));
        }
        if let Some(ns) = req.namespace.clone().filter(|n| !n.is_empty()) {
            self.inner.state.lock().unwrap().namespace = Some(ns);
        }
        self.set_health(req.health.clone());
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

        // A runtime that reads its own stats says the init's host cgroup is not the
        // container's (a VM's relay sits in the shim's cgroup): its OOM kills are not the
        // container's either.
        let host_cgroup = runtime.stats(&opts.id).is_none();
        let oom = host_cgroup
            .then(|| {
                Cgroup::for_pid(pid)
                    .map_err(|e| tracing::debug!(error = %e.chain(), "no cgroup for stats"))
                    .ok()
            })
            .flatten()
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
            self.start_health(pid);
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
        self.start_health(st.pid);
        tracing::info!(pid = st.pid, "task started");
        Ok(st.pid)
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
        if init {
            self.stop_health();
            if let Err(err) = write_exit_file(self.bundle(), &exit) {
                tracing::error!(error = %err.chain(), "record exit status");
            }
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
        self.stop_health();
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
        self.pause_health();
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
        self.resume_health();
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

    /// Closes the init's log file and opens its path again.
    pub async fn reopen_log(&self) -> Result<()> {
        let logger = {
            let st = self.inner.state.lock().unwrap();
            st.log.as_ref().and_then(|l| l.logger.clone())
        };
        let logger = logger.ok_or_else(|| {
            Error::failed_precondition("the container has no log writer (not running, or no log)")
        })?;
        logger.reopen().await.map_err(|e| {
            Error::internal(format!("reopen {}", logger.options().path.display())).with_source(e)
        })
    }

    /// The container's counters: from the runtime when it reads them itself (a VM), else
    /// from the init's cgroup.
    pub async fn stats(&self) -> Result<Stats> {
        let (runtime, oom) = {
            let st = self.inner.state.lock().unwrap();
            let c = st.container.as_ref().ok_or_else(not_created)?;
            (c.runtime.clone(), c.oom.clone())
        };
        if let Some(read) = runtime.stats(self.id()) {
            return read.await;
        }
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
fn check_config(bundle: &Path, stdio: StdioSpec) -> Result<serde_json::Value> {
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
    Ok(config)
}
