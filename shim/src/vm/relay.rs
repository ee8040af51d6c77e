//! The host stand-in for one guest process (`berth-shim vm-relay`).
//!
//! The shim is pid-centric: its reaper waits for host pids, the init's pid goes in the pid file,
//! stdio is file descriptors. A process of a `berth-vm` container runs in the guest, so the
//! runtime spawns one relay per guest process through the shim's spawner, with the stdio the
//! process should have had (or a host pty slave when it has a terminal). The relay:
//!
//! - dials the agent through vhost-device-vsock's Unix socket and opens the process' `Io` stream;
//! - copies its stdin into `stdin` messages (EOF → `close_stdin`) and `stdout`/`stderr` messages
//!   onto its own stdout and stderr, in the order the agent sent them;
//! - forwards every catchable signal it receives to the guest process (`Signal` RPC), and with
//!   a terminal, turns SIGWINCH into `resize`;
//! - on `exit_status`, exits the same way: a code, or 128+N → dies of signal N, so that the
//!   shim's wait status matches what runc's process would have given;
//! - if the stream breaks without an exit (the VM died), says why on stderr and exits 255.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use berth_core::{Context, Error, Result};
use berth_proto::berth::agent::v1::agent_client::AgentClient;
use berth_proto::berth::agent::v1::{
    Empty, IoInput, ProcessRef, SignalRequest, WindowSize, io_input, io_output,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

pub use super::machine::AGENT_PORT;

/// Exit status of a relay whose guest process' fate is unknown (the stream broke).
pub const LOST: i32 = 255;

/// `berth-shim vm-relay` flags.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct RelayArgs {
    /// vhost-device-vsock's Unix socket (the guest's vsock, host side).
    #[arg(long)]
    pub vsock: PathBuf,
    /// The agent's vsock port.
    #[arg(long, default_value_t = AGENT_PORT)]
    pub port: u32,
    /// Container id.
    #[arg(long)]
    pub container: String,
    /// Exec id; "" (the default) is the init process.
    #[arg(long, default_value = "")]
    pub exec_id: String,
    /// Stdin, stdout and stderr are one pty slave: become its session leader, put it in raw
    /// mode (the guest's own terminal does the line discipline) and forward window sizes.
    #[arg(long)]
    pub terminal: bool,
}

impl RelayArgs {
    /// The command-line arguments after `vm-relay` that parse back into these flags.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--vsock".to_string(),
            self.vsock.display().to_string(),
            "--port".to_string(),
            self.port.to_string(),
            "--container".to_string(),
            self.container.clone(),
            format!("--exec-id={}", self.exec_id),
        ];
        if self.terminal {
            args.push("--terminal".into());
        }
        args
    }
}

/// Opens a gRPC channel to the guest port `port` through vhost-device-vsock's Unix socket
/// (the `CONNECT <port>` / `OK <n>` handshake): [`super::machine::dial`].
pub async fn dial(socket: &Path, port: u32) -> Result<Channel> {
    super::machine::dial(socket, port).await
}

/// Signals the relay forwards to the guest process: every catchable one except those about the
/// relay itself (SIGCHLD, SIGPIPE) and hardware faults, which only the kernel sends for real.
fn forwarded_signals() -> Vec<i32> {
    let mut sigs = vec![
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGABRT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGTERM,
        libc::SIGSTKFLT,
        libc::SIGCONT,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
        libc::SIGURG,
        libc::SIGXCPU,
        libc::SIGXFSZ,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGIO,
        libc::SIGPWR,
        libc::SIGSYS,
    ];
    sigs.extend(libc::SIGRTMIN()..=libc::SIGRTMAX());
    sigs
}

/// What the output writer thread receives.
enum Out {
    Stdout(bytes::Bytes),
    Stderr(bytes::Bytes),
}

/// The relay's file descriptors: what it copies from and to.
#[derive(Debug)]
pub struct RelayIo {
    /// Read into `stdin` messages.
    pub stdin: OwnedFd,
    /// Where `stdout` messages go.
    pub stdout: OwnedFd,
    /// Where `stderr` messages go.
    pub stderr: OwnedFd,
}

impl RelayIo {
    /// Duplicates the process' own fds 0, 1 and 2.
    pub fn from_process() -> Result<Self> {
        let dup = |fd: i32| {
            // SAFETY: fds 0, 1 and 2 are open for the life of the process (the spawner gives
            // every child all three); the duplicate is a new descriptor owned only here.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            fd.try_clone_to_owned()
                .internal(|| "duplicate a stdio descriptor".into())
        };
        Ok(Self {
            stdin: dup(0)?,
            stdout: dup(1)?,
            stderr: dup(2)?,
        })
    }
}

/// Relays one guest process until it exits; returns its exit status (code, or 128 + signal).
/// An error means the stream broke (or never opened) before the process' exit was known.
///
/// `signals` tells whether to install signal forwarding (the `vm-relay` process does; an
/// in-process caller must not take over the process' signals).
pub async fn relay(args: &RelayArgs, io: RelayIo, signals: bool) -> Result<u32> {
    let channel = dial(&args.vsock, args.port).await?;
    let mut client = AgentClient::new(channel);
    let process = ProcessRef {
        container_id: args.container.clone(),
        exec_id: args.exec_id.clone(),
    };
    let (tx, rx) = mpsc::channel::<IoInput>(16);
    let input = |i| IoInput { input: Some(i) };
    // The channel holds 16: these cannot block.
    let _ = tx.try_send(input(io_input::Input::Open(process.clone())));
    if args.terminal
        && let Some((width, height)) = window_size(&io.stdin)
    {
        let _ = tx.try_send(input(io_input::Input::Resize(WindowSize { width, height })));
    }
    let mut output = client
        .io(ReceiverStream::new(rx))
        .await
        .map_err(|s| Error::unavailable("open the process' io").with_source(Error::from(s)))?
        .into_inner();

    let RelayIo {
        stdin,
        stdout,
        stderr,
    } = io;
    if signals {
        forward_signals(client.clone(), process.clone(), args.terminal, &stdin, &tx)?;
    }
    spawn_stdin_pump(stdin, tx.clone());
    drop(tx);

    let (out_tx, out_rx) = mpsc::channel::<Out>(64);
    let writer = std::thread::Builder::new()
        .name("relay-out".into())
        .spawn(move || write_output(out_rx, stdout, stderr))
        .internal(|| "spawn the output writer".into())?;

    let result = loop {
        match output.message().await {
            Ok(Some(msg)) => match msg.output {
                Some(io_output::Output::Stdout(b)) => {
                    let _ = out_tx.send(Out::Stdout(b.into())).await;
                }
                Some(io_output::Output::Stderr(b)) => {
                    let _ = out_tx.send(Out::Stderr(b.into())).await;
                }
                Some(io_output::Output::ExitStatus(status)) => break Ok(status),
                None => {}
            },
            Ok(None) => {
                break Err(Error::unavailable(
                    "the agent ended the process' io stream without an exit status",
                ));
            }
            Err(status) => {
                break Err(Error::unavailable("the process' io stream broke")
                    .with_source(Error::from(status)));
            }
        }
    };
    // Everything received is written before the exit is reported.
    drop(out_tx);
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    result
}

/// Writes output in the order it came; a closed reader only drops output.
fn write_output(mut rx: mpsc::Receiver<Out>, stdout: OwnedFd, stderr: OwnedFd) {
    let mut stdout = File::from(stdout);
    let mut stderr = File::from(stderr);
    let (mut out_ok, mut err_ok) = (true, true);
    while let Some(out) = rx.blocking_recv() {
        match out {
            Out::Stdout(b) if out_ok => out_ok = stdout.write_all(&b).is_ok(),
            Out::Stderr(b) if err_ok => err_ok = stderr.write_all(&b).is_ok(),
            _ => {}
        }
    }
}

/// Copies stdin into `stdin` messages on a thread of its own (a pipe or tty read blocks), and
/// sends `close_stdin` at EOF.
fn spawn_stdin_pump(stdin: OwnedFd, tx: mpsc::Sender<IoInput>) {
    let _ = std::thread::Builder::new()
        .name("relay-in".into())
        .spawn(move || {
            let mut stdin = File::from(stdin);
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // EIO: a pty whose master closed; as good as EOF.
                    Err(_) => break,
                };
                let msg = IoInput {
                    input: Some(io_input::Input::Stdin(buf[..n].to_vec())),
                };
                if tx.blocking_send(msg).is_err() {
                    return;
                }
            }
            let _ = tx.blocking_send(IoInput {
                input: Some(io_input::Input::CloseStdin(Empty {})),
            });
        });
}

/// The terminal's size behind `fd`, as (columns, rows).
fn window_size(fd: &impl AsRawFd) -> Option<(u32, u32)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, valid for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col.into(), ws.ws_row.into()))
}

/// Installs the handlers: each forwarded signal → `Signal` RPC (in arrival order, one at a
/// time); SIGWINCH with a terminal → `resize`.
fn forward_signals(
    client: AgentClient<Channel>,
    process: ProcessRef,
    terminal: bool,
    tty: &OwnedFd,
    io_tx: &mpsc::Sender<IoInput>,
) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (sig_tx, mut sig_rx) = mpsc::unbounded_channel::<i32>();
    for sig in forwarded_signals() {
        let mut stream = signal(SignalKind::from_raw(sig))
            .internal(|| format!("install a handler for signal {sig}"))?;
        let sig_tx = sig_tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if sig_tx.send(sig).is_err() {
                    return;
                }
            }
        });
    }
    tokio::spawn(async move {
        let mut client = client;
        while let Some(sig) = sig_rx.recv().await {
            let req = SignalRequest {
                container_id: process.container_id.clone(),
                exec_id: process.exec_id.clone(),
                signal: sig as u32,
                all: false,
            };
            if let Err(status) = client.signal(req).await {
                eprintln!(
                    "berth-shim vm-relay: forward signal {sig}: {}",
                    Error::from(status).chain()
                );
            }
        }
    });
    if terminal {
        let tty = tty
            .try_clone()
            .internal(|| "duplicate the terminal".into())?;
        let io_tx = io_tx.clone();
        let mut winch = signal(SignalKind::window_change())
            .internal(|| "install a handler for SIGWINCH".into())?;
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                if let Some((width, height)) = window_size(&tty) {
                    let msg = IoInput {
                        input: Some(io_input::Input::Resize(WindowSize { width, height })),
                    };
                    if io_tx.send(msg).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    Ok(())
}

/// Makes the relay the session leader of the pty slave on fd 0, with the slave as its
/// controlling terminal (so that the kernel sends it SIGWINCH on resizes), in raw mode.
fn take_terminal() -> Result<()> {
    // A fresh child of the shim is no group leader, so setsid succeeds; if it was one already
    // (EPERM), it may already lead a session with this terminal: try to continue.
    let _ = nix::unistd::setsid();
    // SAFETY: TIOCSCTTY takes an int argument (0: do not steal); fd 0 is open.
    let rc = unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
    if rc != 0 {
        return Err(Error::internal("make the pty the controlling terminal")
            .with_source(std::io::Error::last_os_error()));
    }
    // SAFETY: fd 0 is open for the life of the process.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(0) };
    let mut t = nix::sys::termios::tcgetattr(fd).internal(|| "read terminal modes".into())?;
    nix::sys::termios::cfmakeraw(&mut t);
    nix::sys::termios::tcsetattr(fd, nix::sys::termios::SetArg::TCSANOW, &t)
        .internal(|| "set the terminal raw".into())
}

/// Ends the process the way the guest process ended: `exit(code)`, or for 128 + N, death by
/// signal N with its default action (no core file), when that action terminates.
pub fn exit_like(status: u32) -> ! {
    if let Some(sig) = status.checked_sub(128).filter(|s| (1..=64).contains(s)) {
        let sig = sig as i32;
        let stops_or_ignores = [
            libc::SIGCHLD,
            libc::SIGCONT,
            libc::SIGURG,
            libc::SIGWINCH,
            libc::SIGSTOP,
            libc::SIGTSTP,
            libc::SIGTTIN,
            libc::SIGTTOU,
        ];
        if !stops_or_ignores.contains(&sig) {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: plain syscalls with valid arguments; the process is about to die, so
            // resetting a disposition tokio installed cannot break anything that runs later.
            unsafe {
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                libc::signal(sig, libc::SIG_DFL);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                libc::kill(libc::getpid(), sig);
            }
            // The signal is delivered before kill returns to a thread that does not block it;
            // give other threads' delivery a moment in case it went to one of them.
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    }
    std::process::exit((status & 0xff) as i32)
}

/// `berth-shim vm-relay`: relays the guest process, then exits like it. Never returns.
pub fn main(args: RelayArgs) -> ! {
    let fail = |err: Error| -> ! {
        eprintln!(
            "berth-shim vm-relay: {} {:?}: {}",
            args.container,
            args.exec_id,
            err.chain()
        );
        std::process::exit(LOST)
    };
    if args.terminal
        && let Err(err) = take_terminal()
    {
        fail(err)
    }
    let io = RelayIo::from_process().unwrap_or_else(|e| fail(e));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(Error::internal("start the runtime").with_source(e)));
    match rt.block_on(relay(&args, io, true)) {
        Ok(status) => exit_like(status),
        Err(err) => fail(err),
    }
}
