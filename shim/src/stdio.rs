//! A process' stdio as the shim holds it: pipes or a pty master, pumped into the log and fanned
//! out to any number of attached clients; stdin merged from every attacher.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use berth_core::{Context, Error, ErrorKind, Result};
use bytes::{Bytes, BytesMut};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch};

use crate::console::{self, ConsoleSocket};
use crate::logger::{LogPosition, Logger, Stream};
use crate::runtime::ProcessStdio;

/// How a process' stdio is wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StdioMode {
    /// `/dev/null` everywhere: nothing is logged or attachable.
    #[default]
    None,
    /// Pipes read by the shim.
    Pipes,
    /// A pseudo-terminal; all output is stdout.
    Tty,
}

/// What stdio a process gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StdioSpec {
    /// How it is wired.
    pub mode: StdioMode,
    /// Whether it has a stdin attachers can write to.
    pub stdin: bool,
    /// Initial terminal size (width, height), TTY only.
    pub size: Option<(u16, u16)>,
}

impl StdioSpec {
    /// Whether the process has a terminal.
    pub fn terminal(&self) -> bool {
        self.mode == StdioMode::Tty
    }
}

/// A chunk of a process' output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Which stream.
    pub stream: Stream,
    /// The bytes as read.
    pub data: Bytes,
}

/// The shim's ends of a process' stdio, between preparing them and the runtime having started
/// the process.
#[derive(Debug)]
pub struct PendingIo {
    spec: StdioSpec,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    console: Option<ConsoleSocket>,
}

fn pipe_pair() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::internal("create pipe").with_source(e))
}

/// Makes the pipes (or console socket, at `console_path`) for `spec`. Returns the shim's ends
/// and the process' ends, which go to the runtime.
pub fn prepare(spec: StdioSpec, console_path: &Path) -> Result<(PendingIo, ProcessStdio)> {
    let mut pending = PendingIo {
        spec,
        stdin: None,
        stdout: None,
        stderr: None,
        console: None,
    };
    let mut child = ProcessStdio::default();
    match spec.mode {
        StdioMode::None => {}
        StdioMode::Tty => pending.console = Some(ConsoleSocket::bind(console_path)?),
        StdioMode::Pipes => {
            if spec.stdin {
                let (r, w) = pipe_pair()?;
                child.stdin = Some(r);
                pending.stdin = Some(w);
            }
            let (r, w) = pipe_pair()?;
            pending.stdout = Some(r);
            child.stdout = Some(w);
            let (r, w) = pipe_pair()?;
            pending.stderr = Some(r);
            child.stderr = Some(w);
        }
    }
    Ok((pending, child))
}

/// Like [`prepare`], for a launcher that makes the terminal itself (native exec): TTY mode
/// gets no console socket; the master comes back from the launch.
pub fn prepare_direct(spec: StdioSpec) -> Result<(PendingIo, ProcessStdio)> {
    if spec.mode == StdioMode::Tty {
        let pending = PendingIo {
            spec,
            stdin: None,
            stdout: None,
            stderr: None,
            console: None,
        };
        return Ok((pending, ProcessStdio::default()));
    }
    prepare(spec, Path::new(""))
}

impl PendingIo {
    /// The console socket to hand the runtime, in TTY mode.
    pub fn console_socket(&self) -> Option<&Path> {
        self.console.as_ref().map(|c| c.path())
    }

    /// Runs `launch` (the runtime call that creates the process) while receiving the terminal
    /// it sends, then starts pumping output into `output` (its log and attachers).
    ///
    /// When `launch` fails, the pipes are dropped unread: whatever the runtime wrote to the
    /// process' stderr while failing is already in its error message.
    pub async fn launch<F>(mut self, launch: F, output: Arc<Output>) -> Result<Arc<ProcessIo>>
    where
        F: Future<Output = Result<()>>,
    {
        let master = match self.console.take() {
            None => {
                launch.await?;
                None
            }
            Some(console) => {
                let receive = console.receive();
                tokio::pin!(receive);
                tokio::pin!(launch);
                let mut master = None;
                let launched = loop {
                    tokio::select! {
                        r = &mut launch => break r,
                        m = &mut receive, if master.is_none() => master = Some(m),
                    }
                };
                launched?;
                let master = match master {
                    Some(m) => m?,
                    // The runtime sends the terminal before it exits; allow for scheduling.
                    None => tokio::time::timeout(Duration::from_secs(5), receive)
                        .await
                        .map_err(|_| Error::internal("the runtime did not send a terminal"))??,
                };
                if let Some((w, h)) = self.spec.size {
                    console::resize(&master, w, h)?;
                }
                Some(master)
            }
        };
        ProcessIo::start(self, master, output)
    }
}

impl PendingIo {
    /// Starts pumping the output of a process that was launched with `master` as its terminal
    /// (TTY mode) or with the pipes of [`prepare_direct`].
    pub fn launch_direct(
        self,
        master: Option<OwnedFd>,
        output: Arc<Output>,
    ) -> Result<Arc<ProcessIo>> {
        if self.spec.mode == StdioMode::Tty {
            let master = master.ok_or_else(|| Error::internal("no terminal for a TTY process"))?;
            if let Some((w, h)) = self.spec.size {
                console::resize(&master, w, h)?;
            }
            return ProcessIo::start(self, Some(master), output);
        }
        ProcessIo::start(self, None, output)
    }
}

enum Stdin {
    Pipe(pipe::Sender),
    Tty(Arc<AsyncFd<OwnedFd>>),
}

/// A subscriber to a process' output.
struct Subscriber {
    tx: mpsc::Sender<Chunk>,
    stdout: bool,
    stderr: bool,
}

impl Subscriber {
    fn wants(&self, stream: Stream) -> bool {
        match stream {
            Stream::Stdout => self.stdout,
            Stream::Stderr => self.stderr,
        }
    }
}

/// Output chunks queued per attacher before the process' output waits for it.
const ATTACH_QUEUE: usize = 64;
/// How long output waits for a stuck attacher before detaching it.
const ATTACH_STALL: Duration = Duration::from_secs(30);

/// The longest output is held back for attaches announced but not (yet) subscribed.
const HOLD_MAX: Duration = Duration::from_secs(1);

/// Where a process' output goes: its log (init only) and every attached subscriber. Exists
/// from when the process is registered, so clients can attach before it starts; closed once
/// the output has ended.
pub struct Output {
    /// `None` once the output has ended.
    subscribers: Mutex<Option<Vec<Subscriber>>>,
    logger: Option<Logger>,
    done: watch::Sender<bool>,
    /// Subscriptions still awaited before output flows (see [`Output::held`]); `true` in the
    /// channel once it flows.
    awaited: Mutex<u32>,
    flowing: watch::Sender<bool>,
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Output")
            .field("done", &*self.done.borrow())
            .finish_non_exhaustive()
    }
}

impl Output {
    /// Output that is logged by `logger` (if any) and fanned out to subscribers.
    pub fn new(logger: Option<Logger>) -> Arc<Self> {
        Self::held(logger, 0)
    }

    /// Output that delivers nothing — to the log or to anyone — until `subscribers` clients
    /// have subscribed, or for at most [`HOLD_MAX`]: for a process started before the
    /// attaches waiting for it are connected, so that they still see its first byte. The
    /// process itself runs on; it blocks only once a pipe is full.
    pub fn held(logger: Option<Logger>, subscribers: u32) -> Arc<Self> {
        Arc::new(Self {
            subscribers: Mutex::new(Some(Vec::new())),
            logger,
            done: watch::channel(false).0,
            awaited: Mutex::new(subscribers),
            flowing: watch::channel(subscribers == 0).0,
        })
    }

    /// Counts a subscription towards the ones [`Output::held`] waits for.
    fn subscribed(&self) {
        let mut awaited = self.awaited.lock().unwrap();
        *awaited = awaited.saturating_sub(1);
        if *awaited == 0 {
            self.flowing.send_replace(true);
        }
    }

    /// Waits until output may flow (at most [`HOLD_MAX`] from the first chunk).
    async fn until_flowing(&self) {
        if *self.flowing.borrow() {
            return;
        }
        let mut flowing = self.flowing.subscribe();
        if tokio::time::timeout(HOLD_MAX, flowing.wait_for(|f| *f))
            .await
            .is_err()
        {
            tracing::debug!("attaches announced for the start did not come; output flows");
            self.flowing.send_replace(true);
        }
    }

    /// The log writer, if the output is logged.
    pub fn logger(&self) -> Option<&Logger> {
        self.logger.as_ref()
    }

    async fn deliver(&self, chunk: Chunk) {
        self.until_flowing().await;
        let targets: Vec<mpsc::Sender<Chunk>> = {
            let mut subs = self.subscribers.lock().unwrap();
            // Logging under the same lock as choosing subscribers keeps a subscription that
            // replays the log exact: every chunk is either before its mark or sent to it.
            if let Some(logger) = &self.logger {
                logger.write(chunk.stream, SystemTime::now(), chunk.data.clone());
            }
            let Some(subs) = subs.as_mut() else { return };
            subs.retain(|s| !s.tx.is_closed());
            subs.iter()
                .filter(|s| s.wants(chunk.stream))
                .map(|s| s.tx.clone())
                .collect()
        };
        for tx in targets {
            // Attachers get every byte, so a slow one holds the output back (as with Docker),
            // but one that is stuck is detached rather than stalling the container for good.
            if tokio::time::timeout(ATTACH_STALL, tx.send(chunk.clone()))
                .await
                .is_err()
            {
                tracing::warn!("attached client stalled; detaching it");
                let mut subs = self.subscribers.lock().unwrap();
                if let Some(subs) = subs.as_mut() {
                    subs.retain(|s| !s.tx.same_channel(&tx));
                }
            }
        }
    }

    /// Marks the output as ended: subscribers' streams end, the log gets its final partial
    /// lines.
    pub fn close(&self) {
        self.flowing.send_replace(true);
        *self.subscribers.lock().unwrap() = None;
        if let Some(logger) = &self.logger {
            logger.eof(Stream::Stdout);
            logger.eof(Stream::Stderr);
        }
        self.done.send_replace(true);
    }

    /// Subscribes to live output. `None` when the output has already ended.
    pub fn subscribe(&self, stdout: bool, stderr: bool) -> Option<mpsc::Receiver<Chunk>> {
        let (tx, rx) = mpsc::channel(ATTACH_QUEUE);
        let mut subs = self.subscribers.lock().unwrap();
        subs.as_mut()?.push(Subscriber { tx, stdout, stderr });
        drop(subs);
        self.subscribed();
        Some(rx)
    }

    /// Subscribes to live output (unless `live` is false) and, atomically with it, marks the
    /// log, so that replaying the log up to the mark and then the subscription sees every chunk
    /// exactly once.
    pub fn subscribe_after_log(
        &self,
        stdout: bool,
        stderr: bool,
        live: bool,
    ) -> (
        Option<mpsc::Receiver<Chunk>>,
        Option<oneshot::Receiver<LogPosition>>,
    ) {
        let mut subs = self.subscribers.lock().unwrap();
        let mark = self.logger.as_ref().map(|l| l.mark_now());
        let rx = match subs.as_mut() {
            Some(subs) if live => {
                let (tx, rx) = mpsc::channel(ATTACH_QUEUE);
                subs.push(Subscriber { tx, stdout, stderr });
                Some(rx)
            }
            _ => None,
        };
        drop(subs);
        if rx.is_some() {
            self.subscribed();
        }
        (rx, mark)
    }

    /// Whether all output has been read and delivered.
    pub fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    /// Waits until all output has been read and delivered.
    pub async fn wait(&self) {
        let mut done = self.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }
}

/// The shim's side of one running process' stdin and terminal.
pub struct ProcessIo {
    spec: StdioSpec,
    stdin: tokio::sync::Mutex<Option<Stdin>>,
    console: Option<Arc<AsyncFd<OwnedFd>>>,
}

impl std::fmt::Debug for ProcessIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessIo")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

fn set_nonblocking(fd: &OwnedFd) -> Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags =
        fcntl(fd, FcntlArg::F_GETFL).map_err(|e| Error::internal("fcntl").with_source(e))?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(|e| Error::internal("fcntl").with_source(e))?;
    Ok(())
}

impl ProcessIo {
    fn start(
        pending: PendingIo,
        master: Option<OwnedFd>,
        output: Arc<Output>,
    ) -> Result<Arc<Self>> {
        let mut pumps: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        let mut stdin = None;
        let mut console = None;
        match (pending.spec.mode, master) {
            (StdioMode::Tty, Some(master)) => {
                set_nonblocking(&master)?;
                // SAFETY: the OwnedFd stays open and names the same descriptor for as long as
                // the AsyncFd owns it.
                let master = unsafe { AsyncFd::register(master) }.map_err(|e| {
                    Error::internal("register terminal").with_source(std::io::Error::from(e))
                })?;
                let master = Arc::new(master);
                if pending.spec.stdin {
                    stdin = Some(Stdin::Tty(master.clone()));
                }
                console = Some(master.clone());
                pumps.push(tokio::spawn(pump_tty(master, output.clone())));
            }
            (StdioMode::Pipes, _) => {
                if let Some(w) = pending.stdin {
                    stdin = Some(Stdin::Pipe(
                        pipe::Sender::from_owned_fd(w)
                            .context(ErrorKind::Internal, "register stdin")?,
                    ));
                }
                for (fd, stream) in [
                    (pending.stdout, Stream::Stdout),
                    (pending.stderr, Stream::Stderr),
                ] {
                    if let Some(fd) = fd {
                        let rx = pipe::Receiver::from_owned_fd(fd)
                            .context(ErrorKind::Internal, "register output")?;
                        pumps.push(tokio::spawn(pump_pipe(rx, stream, output.clone())));
                    }
                }
            }
            _ => {}
        }
        tokio::spawn(async move {
            for p in pumps {
                let _ = p.await;
            }
            output.close();
        });
        Ok(Arc::new(Self {
            spec: pending.spec,
            stdin: tokio::sync::Mutex::new(stdin),
            console,
        }))
    }

    /// The stdio it was made with.
    pub fn spec(&self) -> StdioSpec {
        self.spec
    }

    /// Writes to the process' stdin. Fails when it has none or it was closed.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<()> {
        let mut guard = self.stdin.lock().await;
        let result = match guard.as_mut() {
            None => return Err(Error::failed_precondition("the process has no open stdin")),
            Some(Stdin::Pipe(tx)) => tx.write_all(data).await,
            Some(Stdin::Tty(master)) => write_fd(master, data).await,
        };
        if let Err(err) = result {
            // The reader is gone (EPIPE): nothing will ever read stdin again.
            *guard = None;
            return Err(Error::new(ErrorKind::FailedPrecondition, "write stdin").with_source(err));
        }
        Ok(())
    }

    /// Closes stdin: the process reads EOF. With a TTY, sends the terminal's EOF character
    /// (the pty stays open for output).
    pub async fn close_stdin(&self) {
        let mut guard = self.stdin.lock().await;
        if let Some(Stdin::Tty(master)) = guard.as_ref() {
            let _ = write_fd(master, &[0x04]).await;
        }
        *guard = None;
    }

    /// Resizes the terminal.
    pub fn resize(&self, width: u16, height: u16) -> Result<()> {
        match &self.console {
            Some(master) => console::resize(master.get_ref(), width, height),
            None => Err(Error::failed_precondition("the process has no terminal")),
        }
    }
}

async fn write_fd(fd: &AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let mut guard = fd.writable().await?;
        match guard
            .try_io(|inner| nix::unistd::write(inner.get_ref(), data).map_err(std::io::Error::from))
        {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

const READ_SIZE: usize = 32 * 1024;

async fn pump_pipe(mut rx: pipe::Receiver, stream: Stream, fanout: Arc<Output>) {
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(READ_SIZE);
        match rx.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => {
                fanout
                    .deliver(Chunk {
                        stream,
                        data: buf.split().freeze(),
                    })
                    .await
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(err = %e, stream = stream.as_str(), "read process output");
                break;
            }
        }
    }
}

async fn pump_tty(master: Arc<AsyncFd<OwnedFd>>, fanout: Arc<Output>) {
    let mut buf = vec![0u8; READ_SIZE];
    loop {
        let mut guard = match master.readable().await {
            Ok(g) => g,
            Err(_) => break,
        };
        let n = match guard.try_io(|inner| {
            nix::unistd::read(inner.get_ref(), &mut buf).map_err(std::io::Error::from)
        }) {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => n,
            // EIO: every holder of the terminal's other end closed it; the output is complete.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => break,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => {
                tracing::warn!(err = %e, "read terminal");
                break;
            }
            Err(_would_block) => continue,
        };
        fanout
            .deliver(Chunk {
                stream: Stream::Stdout,
                data: Bytes::copy_from_slice(&buf[..n]),
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    async fn drain(mut rx: mpsc::Receiver<Chunk>) -> Vec<(Stream, String)> {
        let mut out: Vec<(Stream, String)> = Vec::new();
        while let Some(c) = rx.recv().await {
            match out.last_mut() {
                Some((s, text)) if *s == c.stream => {
                    text.push_str(std::str::from_utf8(&c.data).unwrap())
                }
                _ => out.push((c.stream, String::from_utf8(c.data.to_vec()).unwrap())),
            }
        }
        out
    }

    /// Stands in for the runtime: runs `sh -c script` on the process' ends.
    fn launch_sh(script: &str, child: ProcessStdio) -> impl Future<Output = Result<()>> + use<> {
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", script]);
        let to = |fd: Option<OwnedFd>| {
            fd.map(std::process::Stdio::from)
                .unwrap_or_else(std::process::Stdio::null)
        };
        cmd.stdin(to(child.stdin))
            .stdout(to(child.stdout))
            .stderr(to(child.stderr));
        let mut child = tokio::process::Command::from(cmd).spawn().unwrap();
        async move {
            // Detach like runc does: the process runs on after the launch call returns.
            tokio::spawn(async move {
                let status = child.wait().await.unwrap();
                assert!(status.signal().is_none());
            });
            Ok(())
        }
    }

    #[tokio::test]
    async fn held_output_waits_for_the_announced_subscribers() {
        let output = Output::held(None, 2);
        let chunk = |s: &str| Chunk {
            stream: Stream::Stdout,
            data: Bytes::from(s.to_string()),
        };
        let o = output.clone();
        let early = tokio::spawn(async move { o.deliver(chunk("first")).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !early.is_finished(),
            "output flowed before anyone subscribed"
        );
        let a = output.subscribe(true, true).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !early.is_finished(),
            "output flowed with one of two subscribers"
        );
        let b = output.subscribe(true, false).unwrap();
        early.await.unwrap();
        output.close();
        let want = vec![(Stream::Stdout, "first".to_string())];
        assert_eq!(drain(a).await, want);
        assert_eq!(drain(b).await, want);
    }

    #[tokio::test]
    async fn pipes_reach_every_subscriber_and_stdin_works() {
        let dir = tempfile::tempdir().unwrap();
        let spec = StdioSpec {
            mode: StdioMode::Pipes,
            stdin: true,
            size: None,
        };
        let (pending, child) = prepare(spec, &dir.path().join("c.sock")).unwrap();
        let launch = launch_sh("read line; echo \"got $line\"; echo err >&2", child);
        let output = Output::new(None);
        let a = output.subscribe(true, true).unwrap();
        let b = output.subscribe(true, false).unwrap();
        let io = pending.launch(launch, output.clone()).await.unwrap();
        io.write_stdin(b"hello\n").await.unwrap();
        io.close_stdin().await;
        let (a, b) = tokio::join!(drain(a), drain(b));
        output.wait().await;
        assert!(a.contains(&(Stream::Stdout, "got hello\n".into())), "{a:?}");
        assert!(a.contains(&(Stream::Stderr, "err\n".into())), "{a:?}");
        assert_eq!(b, [(Stream::Stdout, "got hello\n".to_string())]);
        assert!(output.subscribe(true, true).is_none(), "output ended");
        assert!(io.write_stdin(b"x").await.is_err());
        assert_eq!(
            io.resize(80, 24).unwrap_err().kind(),
            ErrorKind::FailedPrecondition
        );
    }

    #[tokio::test]
    async fn a_failed_launch_leaves_nothing_running() {
        let dir = tempfile::tempdir().unwrap();
        let spec = StdioSpec {
            mode: StdioMode::Tty,
            stdin: true,
            size: None,
        };
        let (pending, _child) = prepare(spec, &dir.path().join("c.sock")).unwrap();
        let sock = pending.console_socket().unwrap().to_path_buf();
        assert!(sock.exists());
        let output = Output::new(None);
        let err = pending
            .launch(async { Err(Error::internal("runc create: boom")) }, output)
            .await
            .unwrap_err();
        assert_eq!(err.message(), "runc create: boom");
        assert!(!sock.exists());
    }
}
