//! What every berth daemon's `main` does: flags, config, telemetry, socket, PID file, signals,
//! exit code. Each daemon only supplies its `run(config, listener, shutdown)`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DEFAULT_CONFIG_PATH, Service};
use crate::error::{Context, ErrorKind, Result};

/// Flags every daemon (and `berth up`) accepts.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// berth.toml to load (default: /etc/berth/berth.toml when it exists).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A Docker daemon.json whose keys are mapped onto berth's config.
    #[arg(long, value_name = "FILE")]
    pub docker_config: Option<PathBuf>,
    /// Data root (overrides `root`).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// State directory for sockets and runtime state (overrides `state_dir`).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

impl ConfigArgs {
    /// Loads the config: defaults, file, daemon.json, `BERTH_*` environment, then these flags.
    ///
    /// An ordinary user (not root, outside any user namespace) gets the rootless layout: the
    /// config file, data root and state directory follow XDG (`crate::rootless::XdgPaths`)
    /// unless set, and `rootless` is on.
    pub fn load(&self) -> Result<Config> {
        // SAFETY: geteuid has no preconditions.
        let ordinary_user = unsafe { libc::geteuid() } != 0;
        let xdg = if ordinary_user {
            Some(crate::rootless::XdgPaths::from_env(std::env::vars())?)
        } else {
            None
        };
        let default = xdg
            .as_ref()
            .map_or(Path::new(DEFAULT_CONFIG_PATH), |x| x.config_file.as_path());
        let file = match &self.config {
            Some(path) => Some(path.as_path()),
            None if default.exists() => Some(default),
            None => None,
        };
        let mut cfg = Config::load(file, std::env::vars())?;
        if let Some(xdg) = xdg {
            let defaults = Config::default();
            if cfg.root == defaults.root {
                cfg.root = xdg.root;
            }
            if cfg.state_dir == defaults.state_dir {
                cfg.state_dir = xdg.state_dir;
            }
            cfg.rootless = true;
        }
        if let Some(path) = &self.docker_config {
            let applied = crate::daemon_json::apply_file(&mut cfg, path)?;
            for (key, why) in applied.ignored {
                tracing::warn!(key, "daemon.json key has no effect: {why}");
            }
            // The environment still wins over daemon.json, as it does over the file.
            let env_only = Config::load(None, std::env::vars())?;
            reapply_env(&mut cfg, &env_only);
        }
        if let Some(root) = &self.root {
            cfg.root = absolute(root)?;
        }
        if let Some(state) = &self.state_dir {
            cfg.state_dir = absolute(state)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The same flags as command-line arguments, to hand on to child processes.
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut push = |flag: &str, v: &Option<PathBuf>| {
            if let Some(v) = v {
                out.push(flag.to_string());
                out.push(v.display().to_string());
            }
        };
        push("--config", &self.config);
        push("--docker-config", &self.docker_config);
        push("--root", &self.root);
        push("--state-dir", &self.state_dir);
        out
    }
}

/// `BERTH_*` variables are applied before daemon.json by [`Config::load`]; put back the top-level
/// values they set so that the documented order (env over daemon.json) holds for those.
fn reapply_env(cfg: &mut Config, env_only: &Config) {
    let defaults = Config::default();
    if env_only.root != defaults.root {
        cfg.root = env_only.root.clone();
    }
    if env_only.state_dir != defaults.state_dir {
        cfg.state_dir = env_only.state_dir.clone();
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).context(ErrorKind::InvalidArgument, format!("path {}", p.display()))
}

/// A future that completes on SIGTERM or SIGINT.
pub async fn termination_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The exit code for an error: 2 for bad configuration or arguments, 1 otherwise.
pub fn exit_code(err: &crate::Error) -> ExitCode {
    match err.kind() {
        ErrorKind::InvalidArgument | ErrorKind::NotFound => ExitCode::from(2),
        _ => ExitCode::from(1),
    }
}

/// Runs a gRPC daemon: loads config from `args`, starts telemetry, binds its socket, writes its
/// PID file, calls `run` until SIGTERM/SIGINT, then cleans up. Returns the process exit code.
pub fn main<F, Fut>(service: Service, args: &ConfigArgs, run: F) -> ExitCode
where
    F: FnOnce(Config, UnixListener, CancellationToken) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    main_with(service, args, move |cfg, shutdown| async move {
        let socket = cfg.socket(service);
        let listener =
            crate::uds::bind(&socket, cfg.socket_mode, cfg.socket_group.as_deref()).await?;
        tracing::info!(socket = %socket.display(), "serving gRPC");
        notify_ready();
        let result = run(cfg, listener, shutdown).await;
        let _ = std::fs::remove_file(&socket);
        result
    })
}

/// Like [`main`] for a daemon that opens its own listeners (the gateway): `run` gets the config
/// and the shutdown token.
pub fn main_with<F, Fut>(service: Service, args: &ConfigArgs, run: F) -> ExitCode
where
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let cfg = match args.load() {
        Ok(cfg) => cfg,
        Err(err) => {
            eprintln!("{}: {}", service.binary(), err.chain());
            return exit_code(&err);
        }
    };
    crate::memory::tune_malloc(2);
    let runtime = match build_runtime(service) {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("{}: start runtime: {err}", service.binary());
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let rust_log = std::env::var("RUST_LOG").ok();
        let telemetry =
            match crate::telemetry::init(service.binary(), &cfg.telemetry, rust_log.as_deref()) {
                Ok(t) => t,
                Err(err) => {
                    eprintln!("{}: {}", service.binary(), err.chain());
                    return exit_code(&err);
                }
            };
        let pid_file = cfg.pid_file(service);
        let shutdown = CancellationToken::new();
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            termination_signal().await;
            tracing::info!("termination signal received, shutting down");
            on_signal.cancel();
        });
        tracing::info!(pid = std::process::id(), "{} starting", service.binary());
        raise_open_files_limit();
        crate::metrics::install();
        tokio::spawn(crate::memory::trim_when_idle(shutdown.clone()));
        tokio::spawn(metrics_upkeep(shutdown.clone()));
        let prepared = std::fs::create_dir_all(&cfg.state_dir)
            .and_then(|_| std::fs::create_dir_all(&cfg.root))
            .context(ErrorKind::Internal, "create the state and data directories");
        let result = match prepared.and_then(|_| write_pid_file(&pid_file)) {
            Ok(()) => run(cfg, shutdown).await,
            Err(err) => Err(err),
        };
        remove_pid_file(&pid_file);
        match &result {
            Ok(()) => tracing::info!("{} stopped", service.binary()),
            Err(err) => tracing::error!(error = %err.chain(), "{} failed", service.binary()),
        }
        telemetry.shutdown().await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => exit_code(&err),
        }
    })
}

/// Folds histogram samples into their buckets every minute, so a daemon nobody scrapes does not
/// keep every sample.
async fn metrics_upkeep(shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => crate::metrics::upkeep(),
        }
    }
}

/// The Tokio runtime for `service`. The engine and the gateway get two workers: they do the
/// CPU work of a request (OCI specs, JSON) and serve many clients at once. The others are
/// I/O-bound (their heavy work already runs on `spawn_blocking` threads), so one thread — the
/// main one — is enough and saves the worker threads' stacks and malloc arenas.
fn build_runtime(service: Service) -> std::io::Result<tokio::runtime::Runtime> {
    match service {
        Service::Engine | Service::Gateway => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    }
}

/// Makes the process `cmd` starts a long-lived detached one (a shim): a session of its own (no
/// controlling terminal, no signals from the starter's job), and every descriptor above 2 that
/// the starter leaked without close-on-exec closed at exec (std's exec-error pipe still works:
/// the flag acts only at exec).
pub fn detach_on_exec(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: between fork and exec the closure makes only async-signal-safe system calls
    // (setsid, close_range) and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
}

/// Tells systemd (`Type=notify` units) that the daemon accepts requests. A no-op elsewhere.
pub fn notify_ready() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
}

/// Writes this process's PID to `path` (write, then rename, so readers never see half a file).
pub fn write_pid_file(path: &Path) -> Result<()> {
    let tmp = path.with_extension("pid.tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|_| std::fs::rename(&tmp, path))
        .context(
            ErrorKind::Internal,
            format!("write pid file {}", path.display()),
        )
}

/// Removes `path` if it still holds this process's PID (a restarted copy may have replaced it).
pub fn remove_pid_file(path: &Path) {
    if read_pid_file(path) == Some(std::process::id() as i32) {
        let _ = std::fs::remove_file(path);
    }
}

/// The PID in `path`, if it holds one.
pub fn read_pid_file(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Raises the soft limit of open files to the hard one, as container daemons do (a daemon
/// holds sockets to every shim and, while `docker stats` streams, each container's cgroup
/// files); the processes berth starts (shims, runtimes) inherit the raised limit.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::debug!("could not raise the open files limit");
            }
        }
    }
}
