//! Starting and running the shim process: `berth-shim start` daemonizes a `berth-shim serve`
//! (new session, re-parented once the starter exits, child subreaper), waits until its socket
//! accepts connections and prints the address; `serve` is the shim itself; `delete` cleans up
//! after a shim that died.
//!
//! Files in the bundle: `shim.address` (`unix:///path`), `shim.pid`, `shim.log` (the shim's own
//! log), `shim-runtime.json` (the runtime Create used), `exit.json` (the init's exit status,
//! written before the exit is reported), `container.log*` (the default container log).

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_core::{Error, ErrorKind, Result};

use crate::events::{Publisher, PublisherConfig};
use crate::reaper::{Reaper, Spawner};
use crate::server::ShimService;
use crate::task::{HostRootfs, RuncFactory, RuntimeSettings, Shim, ShimOptions};

/// Flags of `start` and `serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ShimArgs {
    /// Container id.
    #[arg(long)]
    pub id: String,
    /// Bundle directory (holds config.json; the rootfs is mounted at BUNDLE/rootfs).
    #[arg(long)]
    pub bundle: PathBuf,
    /// OCI runtime binary used when Create names none.
    #[arg(long, default_value = "runc")]
    pub runtime: PathBuf,
    /// The runtime's --root directory.
    #[arg(long)]
    pub runtime_root: Option<PathBuf>,
    /// Use the systemd cgroup driver.
    #[arg(long)]
    pub systemd_cgroup: bool,
    /// The engine's events endpoint (unix:///path) used when Create names none.
    #[arg(long)]
    pub events_address: Option<String>,
    /// berth namespace used when Create names none.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Where sockets go when the bundle path is too long for one (STATE_DIR/s/HASH/).
    #[arg(long, default_value = "/run/berth")]
    pub state_dir: PathBuf,
    /// The shim's socket; default BUNDLE/shim.sock, or under --state-dir for long bundles.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Bytes of container output buffered for a slow log disk before output is dropped from
    /// the log.
    #[arg(long, default_value_t = 1 << 20)]
    pub log_buffer_bytes: usize,
    /// Seconds any one OCI runtime call may take.
    #[arg(long, default_value_t = 60)]
    pub runtime_timeout: u64,
    /// Log level of the shim's own log (BUNDLE/shim.log): error, warn, info, debug, trace.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// How exec processes are started: `native` (the shim joins the container itself, and
    /// uses the runtime for what it does not cover) or `runc` (always `runtime exec`).
    #[arg(long, env = "BERTH_SHIM_EXEC", default_value = "native", value_parser = ["native", "runc"])]
    pub exec: String,
    /// Seconds of idleness after which the shim returns memory it does not need (0 = never).
    #[arg(long, default_value_t = 5, hide = true)]
    pub idle_trim_secs: u64,
    /// OTLP/gRPC collector (e.g. `http://127.0.0.1:4317`) the shim sends its trace spans to;
    /// none = spans are not recorded.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
}

/// The longest Unix socket path (`sun_path` is 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Room left next to the socket for console sockets (`c<counter>.sock`).
const CONSOLE_ROOM: usize = 16;

/// Where the shim listens, and where its console sockets go: `<bundle>/shim.sock` when the
/// bundle path is short enough, else `<state_dir>/s/<16 hex digits of a hash of the bundle>/`.
pub fn socket_path(bundle: &Path, state_dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let fits =
        |dir: &Path| dir.as_os_str().len() + "/shim.sock".len() + CONSOLE_ROOM <= MAX_SOCKET_PATH;
    if fits(bundle) {
        return Ok((bundle.join("shim.sock"), bundle.to_path_buf()));
    }
    // FNV-1a: stable across builds and processes, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bundle.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let dir = state_dir.join("s").join(format!("{h:016x}"));
    if !fits(&dir) {
        return Err(Error::invalid_argument(format!(
            "no socket path fits: both {} and {} are too long",
            bundle.display(),
            state_dir.display()
        )));
    }
    Ok((dir.join("shim.sock"), dir))
}

fn absolute_bundle(args: &ShimArgs) -> Result<PathBuf> {
    let bundle = std::path::absolute(&args.bundle).map_err(|e| {
        Error::invalid_argument(format!("bundle {}", args.bundle.display())).with_source(e)
    })?;
    if !bundle.is_dir() {
        return Err(Error::not_found(format!(
            "bundle {} is not a directory",
            bundle.display()
        )));
    }
    // The runtime's rule for container ids (runc: `^[\w+-\.]+$`).
    let id_ok = !args.id.is_empty()
        && args.id.len() <= 1024
        && args
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.'));
    if !id_ok {
        return Err(Error::invalid_argument(format!(
            "container id {:?}: want characters of [A-Za-z0-9_+.-]",
            args.id
        )));
    }
    Ok(bundle)
}

/// The address string for a socket path.
pub fn address(socket: &Path) -> String {
    format!("unix://{}", socket.display())
}

/// `berth-shim start`: starts `serve` as a daemon and returns its address once its socket
/// accepts connections. When a shim already serves this bundle, returns its address.
pub fn start(args: &ShimArgs, exe: &Path) -> Result<String> {
    let bundle = absolute_bundle(args)?;
    let (socket, _) = match &args.socket {
        Some(s) => (
            s.clone(),
            s.parent().unwrap_or(Path::new("/")).to_path_buf(),
        ),
        None => socket_path(&bundle, &args.state_dir)?,
    };
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Ok(address(&socket));
    }

    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(bundle.join("shim.log"))
        .map_err(|e| Error::internal("open shim.log").with_source(e))?;
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::internal("create pipe").with_source(e))?;

    let mut cmd = Command::new(exe);
    cmd.arg("serve").arg("--notify-stdout");
    cmd.args(forward_args(args, &bundle));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(ready_w))
        .stderr(Stdio::from(log));
    cmd.current_dir("/");
    berth_core::daemon::detach_on_exec(&mut cmd);
    let child = cmd
        .spawn()
        .map_err(|e| Error::internal(format!("start {}", exe.display())).with_source(e))?;
    let pid = child.id();
    drop(cmd);

    match read_ready(&ready_r, Duration::from_secs(15)) {
        Ok(addr) => {
            // The child outlives us; it is re-parented when we exit and reaped by its new parent.
            drop(child);
            Ok(addr)
        }
        Err(err) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            Err(err)
        }
    }
}

/// The flags `serve` gets from `start`.
fn forward_args(args: &ShimArgs, bundle: &Path) -> Vec<std::ffi::OsString> {
    let mut out: Vec<std::ffi::OsString> = Vec::new();
    let mut push = |k: &str, v: &std::ffi::OsStr| {
        out.push(k.into());
        out.push(v.to_owned());
    };
    push("--id", args.id.as_ref());
    push("--bundle", bundle.as_os_str());
    push("--runtime", args.runtime.as_os_str());
    if let Some(r) = &args.runtime_root {
        push("--runtime-root", r.as_os_str());
    }
    if let Some(e) = &args.events_address {
        push("--events-address", e.as_ref());
    }
    push("--namespace", args.namespace.as_ref());
    push("--state-dir", args.state_dir.as_os_str());
    if let Some(s) = &args.socket {
        push("--socket", s.as_os_str());
    }
    push(
        "--log-buffer-bytes",
        args.log_buffer_bytes.to_string().as_ref(),
    );
    push(
        "--runtime-timeout",
        args.runtime_timeout.to_string().as_ref(),
    );
    push("--log-level", args.log_level.as_ref());
    push("--exec", args.exec.as_ref());
    push("--idle-trim-secs", args.idle_trim_secs.to_string().as_ref());
    if let Some(e) = &args.otlp_endpoint {
        push("--otlp-endpoint", e.as_ref());
    }
    if args.systemd_cgroup {
        out.push("--systemd-cgroup".into());
    }
    out
}

/// Reads `serve`'s readiness line: `ok <address>` or `error <message>`.
fn read_ready(fd: &OwnedFd, timeout: Duration) -> Result<String> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let deadline = Instant::now() + timeout;
    let mut file = std::fs::File::from(
        fd.try_clone()
            .map_err(|e| Error::internal("dup").with_source(e))?,
    );
    let mut line = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::new(
                ErrorKind::DeadlineExceeded,
                format!("the shim was not ready within {timeout:?}"),
            ));
        }
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let ms =
            PollTimeout::try_from(left.as_millis().min(10_000) as i32).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Error::internal("wait for the shim").with_source(e)),
        }
        let mut buf = [0u8; 4096];
        let n = file
            .read(&mut buf)
            .map_err(|e| Error::internal("read from the shim").with_source(e))?;
        if n == 0 {
            let text = String::from_utf8_lossy(&line).trim().to_string();
            return Err(Error::internal(if text.is_empty() {
                "the shim exited before it was ready (see shim.log in the bundle)".to_string()
            } else {
                text
            }));
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(nl) = line.iter().position(|&b| b == b'\n') {
            let text = String::from_utf8_lossy(&line[..nl]).to_string();
            return match text.split_once(' ') {
                Some(("ok", addr)) => Ok(addr.to_string()),
                Some(("error", msg)) => Err(Error::internal(msg.to_string())),
                _ => Err(Error::internal(format!(
                    "unexpected readiness line {text:?}"
                ))),
            };
        }
    }
}

/// `berth-shim serve`: the shim itself, in the foreground. With `notify_stdout`, reports
/// readiness (`ok <address>` or `error <message>`) on stdout and then detaches stdout.
pub fn serve(args: &ShimArgs, notify_stdout: bool) -> Result<()> {
    crate::memory::limit_malloc_arenas();
    let notify = |line: &str| {
        if notify_stdout {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    };
    let result = serve_inner(args, &|addr: &str| {
        notify(&format!("ok {addr}"));
        if notify_stdout {
            // Nothing else may write to the starter's pipe, and holding it would keep a caller
            // that reads it to EOF waiting.
            if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
                let _ = nix::unistd::dup2_stdout(null.as_fd());
            }
        }
    });
    if let Err(err) = &result {
        notify(&format!("error {}", err.chain()));
    }
    result
}

fn serve_inner(args: &ShimArgs, ready: &dyn Fn(&str)) -> Result<()> {
    let bundle = absolute_bundle(args)?;
    let (socket, socket_dir) = match &args.socket {
        Some(s) => (
            s.clone(),
            s.parent().unwrap_or(Path::new("/")).to_path_buf(),
        ),
        None => socket_path(&bundle, &args.state_dir)?,
    };
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| Error::internal("become a child subreaper").with_source(e))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // spawn_blocking (log reads) threads go away soon after use.
        .thread_keep_alive(Duration::from_secs(2))
        .max_blocking_threads(8)
        .build()
        .map_err(|e| Error::internal("start runtime").with_source(e))?;
    runtime.block_on(async move {
        init_logging(&args.log_level);
        if let Some(endpoint) = &args.otlp_endpoint {
            crate::trace::start_exporter(
                endpoint,
                vec![
                    ("berth.container.id", args.id.clone()),
                    ("berth.namespace", args.namespace.clone()),
                ],
            );
        }
        let reaper = Reaper::new();
        tokio::spawn(reaper.run()?);
        if args.idle_trim_secs > 0 {
            let window = Duration::from_secs(args.idle_trim_secs);
            tokio::spawn(crate::memory::trim_when_idle(window, Duration::from_millis(2)));
        }
        let spawner: Arc<dyn Spawner> = Arc::new(reaper);
        let options = ShimOptions {
            id: args.id.clone(),
            bundle: bundle.clone(),
            socket_dir: socket_dir.clone(),
            runtime: RuntimeSettings {
                binary: args.runtime.clone(),
                root: args.runtime_root.clone(),
                systemd_cgroup: args.systemd_cgroup,
                args: Vec::new(),
            },
            events_address: args.events_address.clone(),
            namespace: args.namespace.clone(),
            log_buffer_bytes: args.log_buffer_bytes,
            exit_drain: Duration::from_secs(2),
            native_exec: args.exec == "native",
            exec_timeout: Duration::from_secs(args.runtime_timeout),
        };
        let factory = RuncFactory { spawner: spawner.clone(), timeout: Duration::from_secs(args.runtime_timeout) };
        let shim = Shim::new(
            options,
            spawner,
            Box::new(factory),
            Box::new(HostRootfs),
            Publisher::new(PublisherConfig::default()),
        );

        let listener = berth_core::uds::bind(&socket, 0o600, None).await?;
        let addr = address(&socket);
        write_file(&bundle.join("shim.address"), addr.as_bytes())?;
        berth_core::daemon::write_pid_file(&bundle.join("shim.pid"))?;
        tracing::info!(id = %args.id, socket = %socket.display(), pid = std::process::id(), "shim serving");
        ready(&addr);

        let token = shim.shutdown_token();
        let on_signal = shim.clone();
        tokio::spawn(async move {
            loop {
                berth_core::daemon::termination_signal().await;
                match on_signal.shutdown(false).await {
                    Ok(()) => return,
                    Err(_) => tracing::warn!("termination signal ignored: the task is not deleted"),
                }
            }
        });
        let router = berth_core::grpc::server().add_service(ShimService::new(shim.clone()).into_server());
        // Graceful shutdown waits for clients to hang up; one that keeps its connection (or a
        // stream) open gets a second to receive its last answers, not a veto.
        let deadline = async {
            token.cancelled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let served = tokio::select! {
            r = berth_core::grpc::serve(router, listener, token.clone().cancelled_owned()) => r,
            () = deadline => {
                tracing::debug!("clients still connected at shutdown; exiting anyway");
                let _ = std::fs::remove_file(&socket);
                Ok(())
            }
        };
        if !shim.events().flush(Duration::from_secs(3)).await {
            tracing::warn!(queued = shim.events().queued(), "exiting with undelivered events");
        }
        crate::trace::flush(Duration::from_secs(2)).await;
        let _ = std::fs::remove_file(bundle.join("shim.address"));
        berth_core::daemon::remove_pid_file(&bundle.join("shim.pid"));
        if socket_dir != bundle {
            let _ = std::fs::remove_dir(&socket_dir);
        }
        tracing::info!("shim exiting");
        served
    })
}

/// Plain-text log lines on stderr (the bundle's shim.log). A small fmt subscriber rather than
/// the daemons' telemetry stack: the shim runs once per container and its memory counts.
fn init_logging(level: &str) {
    let level = match level.to_ascii_lowercase().as_str() {
        "trace" => tracing::Level::TRACE,
        "debug" => tracing::Level::DEBUG,
        "warn" => tracing::Level::WARN,
        "error" => tracing::Level::ERROR,
        _ => tracing::Level::INFO,
    };
    // A close-on-exec copy of stderr: a container process cloned from the shim (the in-process
    // runtime's init) logs into shim.log until it execs, not into the container's stderr, which
    // it has made its fd 2 by then.
    let out = nix::fcntl::fcntl(std::io::stderr(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))
        .map(|fd| {
            // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
            std::fs::File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
        })
        .ok();
    let _ = tracing::subscriber::set_global_default(StderrLogger { level, out });
}

/// libcontainer and libcgroups log each create at info and warn (the cgroup driver chosen,
/// every v1 controller the host lacks); the shim keeps their errors unless asked for more.
fn library_level(target: &str, level: tracing::Level) -> tracing::Level {
    if (target.starts_with("libcontainer") || target.starts_with("libcgroups"))
        && level < tracing::Level::DEBUG
    {
        tracing::Level::ERROR
    } else {
        level
    }
}

/// A minimal `tracing` subscriber: one line per event with its fields, no `tracing` spans; a
/// line written inside a shim span ([`crate::trace`]) ends with its `trace_id` and `span_id`.
#[derive(Debug)]
struct StderrLogger {
    level: tracing::Level,
    /// shim.log; `None` = stderr itself.
    out: Option<std::fs::File>,
}

impl tracing::Subscriber for StderrLogger {
    fn enabled(&self, meta: &tracing::Metadata<'_>) -> bool {
        meta.is_event() && *meta.level() <= library_level(meta.target(), self.level)
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write as _;
                if field.name() == "message" {
                    let _ = write!(self.0, " {value:?}");
                } else {
                    let _ = write!(self.0, " {}={value:?}", field.name());
                }
            }
        }
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        if let Some(cx) = crate::trace::current() {
            use std::fmt::Write as _;
            let _ = write!(
                fields.0,
                " trace_id={} span_id={}",
                cx.trace_id_hex(),
                cx.span_id_hex()
            );
        }
        let line = format!(
            "{} {} {}:{}\n",
            crate::rfc3339::format(std::time::SystemTime::now()),
            event.metadata().level(),
            event.metadata().target(),
            fields.0
        );
        let _ = match &self.out {
            Some(f) => (&*f).write_all(line.as_bytes()),
            None => std::io::stderr().write_all(line.as_bytes()),
        };
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| Error::internal(format!("write {}", path.display())).with_source(e))
}

/// Flags of `delete`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeleteArgs {
    /// Container id.
    #[arg(long)]
    pub id: String,
    /// Bundle directory.
    #[arg(long)]
    pub bundle: PathBuf,
    /// Where sockets go for long bundle paths (as given to start).
    #[arg(long, default_value = "/run/berth")]
    pub state_dir: PathBuf,
}

/// `berth-shim delete`: cleans up after a shim that is gone — deletes the container from the
/// runtime (killing what is left), unmounts the rootfs, removes the shim's files — and returns
/// the init's recorded exit (`None` when the shim never recorded one).
pub fn delete(args: &DeleteArgs) -> Result<Option<crate::reaper::Exit>> {
    let bundle = std::path::absolute(&args.bundle).map_err(|e| {
        Error::invalid_argument(format!("bundle {}", args.bundle.display())).with_source(e)
    })?;
    let settings: RuntimeSettings = std::fs::read(bundle.join("shim-runtime.json"))
        .ok()
        .and_then(|d| serde_json::from_slice(&d).ok())
        .unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::internal("start runtime").with_source(e))?;
    runtime.block_on(async {
        use crate::task::RuntimeFactory;
        let factory = RuncFactory {
            spawner: Arc::new(crate::reaper::TokioSpawner),
            timeout: Duration::from_secs(60),
        };
        let rt = factory.runtime(&settings, &bundle);
        match rt.delete(&args.id, true).await {
            Ok(()) => {}
            Err(e) if e.is(ErrorKind::NotFound) => {}
            Err(e) => return Err(e),
        }
        Ok::<_, Error>(())
    })?;
    berth_core::mount::unmount_all(&bundle.join("rootfs"))?;
    if let Ok((socket, dir)) = socket_path(&bundle, &args.state_dir) {
        let _ = std::fs::remove_file(&socket);
        if dir != bundle {
            let _ = std::fs::remove_dir(&dir);
        }
    }
    let _ = std::fs::remove_file(bundle.join("shim.address"));
    let _ = std::fs::remove_file(bundle.join("shim.pid"));
    Ok(crate::task::read_exit_file(&bundle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_fit_sun_path() {
        let (sock, dir) =
            socket_path(Path::new("/run/berth/bundles/c1"), Path::new("/run/berth")).unwrap();
        assert_eq!(sock, Path::new("/run/berth/bundles/c1/shim.sock"));
        assert_eq!(dir, Path::new("/run/berth/bundles/c1"));

        let long = PathBuf::from(format!("/var/lib/{}", "x".repeat(120)));
        let (sock, dir) = socket_path(&long, Path::new("/run/berth")).unwrap();
        assert!(sock.starts_with("/run/berth/s/"), "{}", sock.display());
        assert!(sock.as_os_str().len() + CONSOLE_ROOM <= MAX_SOCKET_PATH);
        assert_eq!(sock.parent().unwrap(), dir);
        // Stable: the engine can compute it too.
        assert_eq!(socket_path(&long, Path::new("/run/berth")).unwrap().0, sock);
        let other = PathBuf::from(format!("/var/lib/{}", "y".repeat(120)));
        assert_ne!(
            socket_path(&other, Path::new("/run/berth")).unwrap().0,
            sock
        );

        let long_state = PathBuf::from(format!("/{}", "z".repeat(100)));
        assert_eq!(
            socket_path(&long, &long_state).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn readiness_lines() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut w = std::fs::File::from(w);
        w.write_all(b"ok unix:///x/shim.sock\n").unwrap();
        assert_eq!(
            read_ready(&r, Duration::from_secs(1)).unwrap(),
            "unix:///x/shim.sock"
        );

        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut w = std::fs::File::from(w);
        w.write_all(b"error bind /x: permission denied\n").unwrap();
        assert_eq!(
            read_ready(&r, Duration::from_secs(1))
                .unwrap_err()
                .message(),
            "bind /x: permission denied"
        );

        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        drop(w);
        assert!(
            read_ready(&r, Duration::from_secs(1))
                .unwrap_err()
                .message()
                .contains("exited before")
        );

        let (r, _w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let err = read_ready(&r, Duration::from_millis(100)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    }
}
