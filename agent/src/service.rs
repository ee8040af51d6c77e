//! The `berth.agent.v1.Agent` service: containers and their processes inside the guest.
//!
//! Each process has its stdio made when it is created (pipes, or a pty received over a console
//! socket for a process with a terminal), kept unread until an `Io` stream takes it, so output
//! written before the stream opens is not lost (a pipe holds 64 KiB; a process that writes more
//! before anyone reads blocks, as it would under runc). Stdin is a pipe too: a client that has no
//! input sends `close_stdin`.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_core::{Context, Error, ErrorKind, Result};
use berth_proto::berth::agent::v1::agent_server::Agent;
use berth_proto::berth::agent::v1::{
    ContainerRef, CreateContainerRequest, Empty, ExecRequest, IoInput, IoOutput, PidsResponse,
    PingRequest, PingResponse, ProcessRef, SetupNetworkRequest, SignalRequest, StatsResponse,
    WaitResponse, io_input, io_output,
};
use berth_shim::console::ConsoleSocket;
use berth_shim::inproc::Libcontainer;
use berth_shim::nsexec::NativeExec;
use berth_shim::reaper::{ExitFuture, Reaper, Spawner};
use berth_shim::runtime::{CreateOptions, ExecOptions, OciRuntime, ProcessStdio};
use futures::Stream;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

/// How long output may keep arriving after a process exited (from children that inherited its
/// stdout) before `exit` is sent anyway.
const DRAIN: Duration = Duration::from_secs(2);

/// The agent's state: its runtime and the containers it runs.
#[derive(Debug, Clone)]
pub struct AgentService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    reaper: Reaper,
    runtime: Libcontainer,
    /// Bundles: `<root>/<id>/config.json`, exec process files, pid files, console sockets.
    root: PathBuf,
    timeout: Duration,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

#[derive(Debug)]
struct Container {
    bundle: PathBuf,
    procs: Mutex<HashMap<String, Arc<Process>>>,
}

/// The agent's ends of a process' stdio.
#[derive(Debug, Default)]
struct ProcIo {
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// The pty master, for a process with a terminal.
    pty: Option<OwnedFd>,
}

#[derive(Debug)]
struct Process {
    terminal: bool,
    pid: Mutex<Option<u32>>,
    /// The process' ends, until start (exec processes: created at Exec, handed over at Start).
    child: Mutex<Option<ProcessStdio>>,
    /// The agent's ends; `Some` once ready (a terminal's pty exists only after start), taken by
    /// the first Io stream.
    io: Mutex<Option<ProcIo>>,
    io_ready: watch::Sender<bool>,
    exit: watch::Sender<Option<u32>>,
}

impl Process {
    fn new(terminal: bool) -> Self {
        Self {
            terminal,
            pid: Mutex::new(None),
            child: Mutex::new(None),
            io: Mutex::new(None),
            io_ready: watch::channel(false).0,
            exit: watch::channel(None).0,
        }
    }

    fn set_io(&self, io: ProcIo) {
        *self.io.lock().unwrap() = Some(io);
        self.io_ready.send_replace(true);
    }

    async fn wait(&self) -> u32 {
        let mut rx = self.exit.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(s) => s.unwrap_or(255),
            Err(_) => 255,
        }
    }

    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    fn signal(&self, sig: i32) -> Result<()> {
        let pid = self
            .pid
            .lock()
            .unwrap()
            .ok_or_else(|| Error::failed_precondition("process not started"))?;
        if self.exited() {
            return Err(Error::not_found("process already exited"));
        }
        let sig = Signal::try_from(sig)
            .map_err(|_| Error::invalid_argument(format!("bad signal {sig}")))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
            .context(ErrorKind::Internal, format!("signal pid {pid}"))
    }
}

/// Pipes for a process without a terminal: (the process' ends, the agent's ends).
fn pipes() -> Result<(ProcessStdio, ProcIo)> {
    let pipe =
        || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context(ErrorKind::Internal, "pipe");
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    Ok((
        ProcessStdio {
            stdin: Some(in_r),
            stdout: Some(out_w),
            stderr: Some(err_w),
        },
        ProcIo {
            stdin: Some(in_w),
            stdout: Some(out_r),
            stderr: Some(err_r),
            pty: None,
        },
    ))
}

fn read_pid(path: &Path) -> Result<u32> {
    let text = std::fs::read_to_string(path).internal(|| format!("read {}", path.display()))?;
    text.trim()
        .parse()
        .map_err(|_| Error::internal(format!("bad pid file {}", path.display())))
}

fn status(e: Error) -> Status {
    e.into()
}

impl AgentService {
    /// An agent running containers with libcontainer, its bundles under `root`, every runtime
    /// call bounded by `timeout`. `reaper` must be running.
    pub fn new(reaper: Reaper, root: PathBuf, timeout: Duration) -> Self {
        let runtime = Libcontainer::new(
            Some(root.join("libcontainer")),
            Arc::new(reaper.clone()),
            timeout,
        );
        Self {
            inner: Arc::new(Inner {
                reaper,
                runtime,
                root,
                timeout,
                containers: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.inner
            .containers
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("container {id:?} does not exist")))
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<(Arc<Container>, Arc<Process>)> {
        let c = self.container(id)?;
        let p = c
            .procs
            .lock()
            .unwrap()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                Error::not_found(format!("process {exec_id:?} of {id:?} does not exist"))
            })?;
        Ok((c, p))
    }

    /// Reports `pid`'s exit to `proc` once the reaper collects it.
    fn watch(&self, proc: &Arc<Process>, pid: u32) {
        self.watch_exit(proc, pid, self.inner.reaper.watch(pid));
    }

    fn watch_exit(&self, proc: &Arc<Process>, pid: u32, exit: ExitFuture) {
        *proc.pid.lock().unwrap() = Some(pid);
        let proc = proc.clone();
        tokio::spawn(async move {
            let status = exit.await.map(|e| e.status).unwrap_or(255);
            proc.exit.send_replace(Some(status));
        });
    }

    async fn create(&self, id: &str, spec: &[u8]) -> Result<()> {
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(Error::invalid_argument(format!("bad container id {id:?}")));
        }
        let parsed: serde_json::Value =
            serde_json::from_slice(spec).context(ErrorKind::InvalidArgument, "parse spec")?;
        let terminal = parsed
            .pointer("/process/terminal")
            .and_then(|t| t.as_bool())
            .unwrap_or(false);
        let bundle = self.inner.root.join(id);
        {
            let mut containers = self.inner.containers.lock().unwrap();
            if containers.contains_key(id) {
                return Err(Error::already_exists(format!("container {id:?} exists")));
            }
            containers.insert(
                id.to_string(),
                Arc::new(Container {
                    bundle: bundle.clone(),
                    procs: Mutex::new(HashMap::new()),
                }),
            );
        }
        let result = self.create_init(id, &bundle, spec, terminal).await;
        if result.is_err() {
            self.inner.containers.lock().unwrap().remove(id);
            let _ = std::fs::remove_dir_all(&bundle);
        }
        result
    }

    async fn create_init(
        &self,
        id: &str,
        bundle: &Path,
        spec: &[u8],
        terminal: bool,
    ) -> Result<()> {
        std::fs::create_dir_all(bundle).internal(|| format!("create {}", bundle.display()))?;
        std::fs::write(bundle.join("config.json"), spec).internal(|| "write config.json".into())?;
        let proc = Arc::new(Process::new(terminal));
        let pid_file = bundle.join("init.pid");
        let (stdio, io, console) = if terminal {
            let console = ConsoleSocket::bind(&bundle.join("console.sock"))?;
            (ProcessStdio::default(), None, Some(console))
        } else {
            let (child, ours) = pipes()?;
            (child, Some(ours), None)
        };
        let opts = CreateOptions {
            bundle: bundle.to_path_buf(),
            pid_file: pid_file.clone(),
            console_socket: console.as_ref().map(|c| c.path().to_path_buf()),
            stdio,
        };
        let pty = match &console {
            Some(c) => {
                let (created, pty) = tokio::join!(self.inner.runtime.create(id, opts), async {
                    tokio::time::timeout(Duration::from_secs(60), c.receive()).await
                });
                created?;
                Some(pty.map_err(|_| Error::internal("no terminal from the runtime"))??)
            }
            None => {
                self.inner.runtime.create(id, opts).await?;
                None
            }
        };
        let pid = read_pid(&pid_file)?;
        self.watch(&proc, pid);
        proc.set_io(io.unwrap_or(ProcIo {
            pty,
            ..ProcIo::default()
        }));
        self.container(id)?
            .procs
            .lock()
            .unwrap()
            .insert(String::new(), proc);
        tracing::info!(id, pid, "container created");
        Ok(())
    }

    async fn exec(&self, id: &str, exec_id: &str, process: &[u8]) -> Result<()> {
        if exec_id.is_empty() || exec_id.contains('/') || exec_id.starts_with('.') {
            return Err(Error::invalid_argument(format!("bad exec id {exec_id:?}")));
        }
        let parsed: serde_json::Value =
            serde_json::from_slice(process).context(ErrorKind::InvalidArgument, "parse process")?;
        let terminal = parsed
            .get("terminal")
            .and_then(|t| t.as_bool())
            .unwrap_or(false);
        let c = self.container(id)?;
        let path = c.bundle.join(format!("exec-{exec_id}.json"));
        std::fs::write(&path, process).internal(|| format!("write {}", path.display()))?;
        let proc = Arc::new(Process::new(terminal));
        if !terminal {
            let (child, ours) = pipes()?;
            *proc.child.lock().unwrap() = Some(child);
            proc.set_io(ours);
        }
        let mut procs = c.procs.lock().unwrap();
        if procs.contains_key(exec_id) {
            return Err(Error::already_exists(format!("exec {exec_id:?} exists")));
        }
        procs.insert(exec_id.to_string(), proc);
        Ok(())
    }

    async fn start(&self, id: &str, exec_id: &str) -> Result<()> {
        let (c, proc) = self.process(id, exec_id)?;
        if exec_id.is_empty() {
            return self.inner.runtime.start(id).await;
        }
        if proc.pid.lock().unwrap().is_some() {
            return Err(Error::failed_precondition(format!(
                "exec {exec_id:?} already started"
            )));
        }
        let process_path = c.bundle.join(format!("exec-{exec_id}.json"));
        let spec =
            std::fs::read(&process_path).internal(|| format!("read {}", process_path.display()))?;
        let init_pid =
            self.process(id, "")?.1.pid.lock().unwrap().ok_or_else(|| {
                Error::failed_precondition(format!("container {id:?} has no init"))
            })?;
        let stdio = proc.child.lock().unwrap().take().unwrap_or_default();
        // Native exec, as the shim does: libcontainer's exec does not apply the container's
        // seccomp filter to the new process.
        let native = berth_shim::nsexec::Container::load(&c.bundle)
            .map(|ct| NativeExec::new(ct, id, berth_shim::inproc::NAME))
            .and_then(|n| n.check(init_pid, &spec).map(|()| n));
        let pid = match native {
            Ok(native) => {
                let started = native
                    .start(
                        &self.inner.reaper,
                        init_pid,
                        &spec,
                        stdio,
                        self.inner.timeout,
                    )
                    .await?;
                if proc.terminal {
                    proc.set_io(ProcIo {
                        pty: started.master,
                        ..ProcIo::default()
                    });
                }
                self.watch_exit(&proc, started.pid, started.exit);
                started.pid
            }
            Err(why) => {
                tracing::info!(reason = %why.chain(), "exec through libcontainer");
                self.runtime_exec(&c, id, exec_id, &proc, process_path, stdio)
                    .await?
            }
        };
        tracing::info!(id, exec_id, pid, "exec started");
        Ok(())
    }

    async fn runtime_exec(
        &self,
        c: &Container,
        id: &str,
        exec_id: &str,
        proc: &Arc<Process>,
        process: PathBuf,
        stdio: ProcessStdio,
    ) -> Result<u32> {
        let pid_file = c.bundle.join(format!("exec-{exec_id}.pid"));
        let console = if proc.terminal {
            Some(ConsoleSocket::bind(
                &c.bundle.join(format!("exec-{exec_id}.sock")),
            )?)
        } else {
            None
        };
        let opts = ExecOptions {
            process,
            pid_file: pid_file.clone(),
            console_socket: console.as_ref().map(|c| c.path().to_path_buf()),
            stdio,
        };
        match &console {
            Some(cs) => {
                let (done, pty) = tokio::join!(self.inner.runtime.exec(id, opts), async {
                    tokio::time::timeout(Duration::from_secs(60), cs.receive()).await
                });
                done?;
                let pty = pty.map_err(|_| Error::internal("no terminal from the runtime"))??;
                proc.set_io(ProcIo {
                    pty: Some(pty),
                    ..ProcIo::default()
                });
            }
            None => self.inner.runtime.exec(id, opts).await?,
        }
        let pid = read_pid(&pid_file)?;
        self.watch(proc, pid);
        Ok(pid)
    }

    async fn signal(&self, req: &SignalRequest) -> Result<()> {
        let (_, proc) = self.process(&req.container_id, &req.exec_id)?;
        if req.exec_id.is_empty() {
            self.inner
                .runtime
                .kill(&req.container_id, req.signal as i32, req.all)
                .await
        } else {
            proc.signal(req.signal as i32)
        }
    }

    async fn delete(&self, id: &str) -> Result<()> {
        let c = self.container(id)?;
        for p in c.procs.lock().unwrap().values() {
            if p.pid.lock().unwrap().is_some() && !p.exited() {
                let _ = p.signal(libc::SIGKILL);
            }
        }
        match self.inner.runtime.delete(id, true).await {
            Ok(()) => {}
            Err(e) if e.is(ErrorKind::NotFound) => {}
            Err(e) => return Err(e),
        }
        self.inner.containers.lock().unwrap().remove(id);
        let _ = std::fs::remove_dir_all(&c.bundle);
        tracing::info!(id, "container deleted");
        Ok(())
    }

    async fn stats(&self, id: &str) -> Result<StatsResponse> {
        let (_, init) = self.process(id, "")?;
        let pid = init.pid.lock().unwrap().unwrap_or(0);
        // Without its cgroup there is nothing true to report: zeros would claim an idle
        // container (the shim's runc path also fails once the cgroup is gone).
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let path = cg
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .filter(|_| pid != 0)
            .ok_or_else(|| Error::not_found(format!("the cgroup of container {id} is unknown")))?;
        let dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        Ok(cgroup_stats(&dir, meminfo_total().unwrap_or(0)))
    }
}

/// The counters of the cgroup v2 directory `dir`; `guest_total` stands for an unlimited memory
/// limit, as the host's memory does for an unlimited container on the host. A file the kernel
/// lacks (a controller not enabled) reads as zero.
fn cgroup_stats(dir: &Path, guest_total: u64) -> StatsResponse {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let memory_stat = read("memory.stat")
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect();
    StatsResponse {
        memory_usage_bytes: read("memory.current").trim().parse().unwrap_or(0),
        memory_limit_bytes: read("memory.max").trim().parse().unwrap_or(guest_total),
        cpu_usage_nanos: read("cpu.stat")
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(0, |us| us * 1000),
        pids: read("pids.current").trim().parse().unwrap_or(0),
        guest_memory_total_bytes: guest_total,
        // "max" does not parse: unlimited.
        pids_limit: read("pids.max").trim().parse().unwrap_or(0),
        memory_stat,
    }
}

fn meminfo_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

type IoStream = Pin<Box<dyn Stream<Item = std::result::Result<IoOutput, Status>> + Send>>;

/// Copies `fd` to the stream as `wrap`ped messages until EOF (or EIO: a pty whose other side is
/// gone).
async fn copy_out(
    fd: OwnedFd,
    tx: mpsc::Sender<std::result::Result<IoOutput, Status>>,
    wrap: fn(Vec<u8>) -> io_output::Output,
) {
    let mut f = tokio::fs::File::from_std(std::fs::File::from(fd));
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match f.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let msg = IoOutput {
                    output: Some(wrap(buf[..n].to_vec())),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Feeds the client's messages to the process until the client finishes sending; returns whether
/// the stream broke (an error rather than a clean end).
async fn copy_in(
    mut inbound: Streaming<IoInput>,
    stdin: Option<OwnedFd>,
    pty: Option<OwnedFd>,
) -> bool {
    let mut writer = stdin.map(|fd| tokio::fs::File::from_std(std::fs::File::from(fd)));
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return false,
            Err(_) => return true,
        };
        match msg.input {
            Some(io_input::Input::Stdin(data)) => {
                if let Some(w) = writer.as_mut()
                    && (w.write_all(&data).await.is_err() || w.flush().await.is_err())
                {
                    writer = None;
                }
            }
            Some(io_input::Input::CloseStdin(_)) => {
                if pty.is_some() {
                    // A terminal has no EOF of its own: the line discipline's EOF character.
                    if let Some(w) = writer.as_mut() {
                        let _ = w.write_all(&[4]).await;
                        let _ = w.flush().await;
                    }
                } else {
                    writer = None;
                }
            }
            Some(io_input::Input::Resize(ws)) => {
                if let Some(p) = &pty {
                    let _ = berth_shim::console::resize(p, ws.width as u16, ws.height as u16);
                }
            }
            Some(io_input::Input::Open(_)) | None => {}
        }
    }
}

async fn pump(
    proc: Arc<Process>,
    inbound: Streaming<IoInput>,
    tx: mpsc::Sender<std::result::Result<IoOutput, Status>>,
) {
    let kill = |proc: &Process| {
        if !proc.exited() {
            let _ = proc.signal(libc::SIGKILL);
        }
    };
    // A terminal exec's pty exists only once it is started.
    let mut ready = proc.io_ready.subscribe();
    tokio::select! {
        r = ready.wait_for(|r| *r) => {
            if r.is_err() {
                return;
            }
        }
        _ = tx.closed() => return,
    }
    let Some(io) = proc.io.lock().unwrap().take() else {
        let _ = tx
            .send(Err(Status::failed_precondition(
                "the process' io is already open",
            )))
            .await;
        return;
    };
    let ProcIo {
        stdin,
        stdout,
        stderr,
        pty,
    } = io;
    let (stdin, pty_in, out) = match pty {
        Some(master) => {
            let dup = master.try_clone().ok();
            let resize = master.try_clone().ok();
            (dup, resize, Some(master))
        }
        None => (stdin, None, stdout),
    };
    let mut input = tokio::spawn(copy_in(inbound, stdin, pty_in));
    let mut readers = Vec::new();
    if let Some(fd) = out {
        readers.push(tokio::spawn(copy_out(
            fd,
            tx.clone(),
            io_output::Output::Stdout,
        )));
    }
    if let Some(fd) = stderr {
        readers.push(tokio::spawn(copy_out(
            fd,
            tx.clone(),
            io_output::Output::Stderr,
        )));
    }
    let mut input_done = false;
    let status = loop {
        tokio::select! {
            s = proc.wait() => break s,
            _ = tx.closed() => {
                kill(&proc);
                input.abort();
                return;
            }
            broken = &mut input, if !input_done => {
                input_done = true;
                if broken.unwrap_or(true) {
                    kill(&proc);
                    input.abort();
                    return;
                }
            }
        }
    };
    let drained = tokio::time::timeout(DRAIN, futures::future::join_all(readers.iter_mut())).await;
    if drained.is_err() {
        for r in &readers {
            r.abort();
        }
    }
    input.abort();
    let _ = tx
        .send(Ok(IoOutput {
            output: Some(io_output::Output::ExitStatus(status)),
        }))
        .await;
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn ping(
        &self,
        _: Request<PingRequest>,
    ) -> std::result::Result<Response<PingResponse>, Status> {
        let uts = nix::sys::utsname::uname().map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(PingResponse {
            kernel_release: uts.release().to_string_lossy().into_owned(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn setup_network(
        &self,
        req: Request<SetupNetworkRequest>,
    ) -> std::result::Result<Response<Empty>, Status> {
        crate::network::setup(&req.into_inner())
            .await
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn create_container(
        &self,
        req: Request<CreateContainerRequest>,
    ) -> std::result::Result<Response<Empty>, Status> {
        let req = req.into_inner();
        self.create(&req.container_id, &req.spec)
            .await
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn start(
        &self,
        req: Request<ProcessRef>,
    ) -> std::result::Result<Response<Empty>, Status> {
        let req = req.into_inner();
        AgentService::start(self, &req.container_id, &req.exec_id)
            .await
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn exec(
        &self,
        req: Request<ExecRequest>,
    ) -> std::result::Result<Response<Empty>, Status> {
        let req = req.into_inner();
        AgentService::exec(self, &req.container_id, &req.exec_id, &req.process)
            .await
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn signal(
        &self,
        req: Request<SignalRequest>,
    ) -> std::result::Result<Response<Empty>, Status> {
        AgentService::signal(self, &req.into_inner())
            .await
            .map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn wait(
        &self,
        req: Request<ProcessRef>,
    ) -> std::result::Result<Response<WaitResponse>, Status> {
        let req = req.into_inner();
        let (_, proc) = self
            .process(&req.container_id, &req.exec_id)
            .map_err(status)?;
        let exit_status = proc.wait().await;
        Ok(Response::new(WaitResponse { exit_status }))
    }

    type IoStream = IoStream;

    async fn io(
        &self,
        req: Request<Streaming<IoInput>>,
    ) -> std::result::Result<Response<Self::IoStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("io: the stream ended before open"))?;
        let Some(io_input::Input::Open(r)) = first.input else {
            return Err(Status::invalid_argument(
                "io: the first message must be open",
            ));
        };
        let (_, proc) = self.process(&r.container_id, &r.exec_id).map_err(status)?;
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(pump(proc, inbound, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn pids(
        &self,
        req: Request<ContainerRef>,
    ) -> std::result::Result<Response<PidsResponse>, Status> {
        let id = req.into_inner().container_id;
        self.container(&id).map_err(status)?;
        let pids = self.inner.runtime.ps(&id).await.map_err(status)?;
        Ok(Response::new(PidsResponse { pids }))
    }

    async fn stats(
        &self,
        req: Request<ContainerRef>,
    ) -> std::result::Result<Response<StatsResponse>, Status> {
        let id = req.into_inner().container_id;
        Ok(Response::new(
            AgentService::stats(self, &id).await.map_err(status)?,
        ))
    }

    async fn delete_container(
        &self,
        req: Request<ContainerRef>,
    ) -> std::result::Result<Response<Empty>, Status> {
        let id = req.into_inner().container_id;
        self.delete(&id).await.map_err(status)?;
        Ok(Response::new(Empty {}))
    }

    async fn shutdown(&self, _: Request<Empty>) -> std::result::Result<Response<Empty>, Status> {
        tracing::info!("shutdown requested");
        if std::process::id() == 1 {
            // After the reply has had a moment to leave.
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                crate::init::power_off();
            });
        }
        Ok(Response::new(Empty {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_come_from_the_cgroup_files() {
        let dir = tempfile::tempdir().unwrap();
        let w = |f: &str, text: &str| std::fs::write(dir.path().join(f), text).unwrap();
        w("memory.current", "4096\n");
        w("memory.max", "209715200\n");
        w("memory.stat", "anon 1024\nfile 3072\ninactive_file 2048\n");
        w(
            "cpu.stat",
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
        );
        w("pids.current", "3\n");
        w("pids.max", "max\n");
        let s = cgroup_stats(dir.path(), 1 << 30);
        assert_eq!(
            (
                s.memory_usage_bytes,
                s.memory_limit_bytes,
                s.cpu_usage_nanos
            ),
            (4096, 209_715_200, 1_500_000)
        );
        assert_eq!(
            (s.pids, s.pids_limit, s.guest_memory_total_bytes),
            (3, 0, 1 << 30)
        );
        assert_eq!(s.memory_stat.get("inactive_file"), Some(&2048));

        // No limit: the guest's memory bounds the container.
        w("memory.max", "max\n");
        w("pids.max", "64\n");
        let s = cgroup_stats(dir.path(), 1 << 30);
        assert_eq!((s.memory_limit_bytes, s.pids_limit), (1 << 30, 64));
    }
}
