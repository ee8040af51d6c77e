//! `berth up`: the all-in-one supervisor.
//!
//! Starts each service as a child process in dependency order and waits for it to be healthy
//! before starting the next; restarts one that exits unexpectedly (exponential backoff, reset
//! after it stays up); on SIGINT/SIGTERM stops them in reverse order. Shims are not its children
//! (they daemonize away from the engine), so stopping the stack never stops a container.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use berth_core::daemon::{self, ConfigArgs};
use berth_core::{Config, Error, Result, Service};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::status;

/// How long a service may take to become healthy at start.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a service gets to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// First restart delay; doubles while a service keeps dying young, up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A service that ran this long is considered healthy again and its backoff resets.
const STABLE_AFTER: Duration = Duration::from_secs(10);

pub fn main(args: ConfigArgs, rootless: bool) -> ExitCode {
    let cfg = match args.load() {
        Ok(cfg) => cfg,
        Err(err) => {
            eprintln!("berth up: {}", err.chain());
            return daemon::exit_code(&err);
        }
    };
    // Rootless: join the stack's namespaces while this process still has one thread (setns of
    // a user namespace requires it); the services inherit them.
    let rootless = if rootless || cfg.rootless {
        match crate::rootless::enter(&cfg) {
            Ok(ns) => Some(ns),
            Err(err) => {
                eprintln!("berth up: {}", err.chain());
                return daemon::exit_code(&err);
            }
        }
    } else {
        None
    };
    let cfg = Config {
        rootless: rootless.is_some(),
        ..cfg
    };
    berth_core::memory::tune_malloc(2);
    // Current-thread runtime: children get PR_SET_PDEATHSIG, which fires when the *thread* that
    // forked them exits, so every child must be spawned from the main thread.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("berth up: start runtime: {err}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let rust_log = std::env::var("RUST_LOG").ok();
        let telemetry =
            match berth_core::telemetry::init("berth", &cfg.telemetry, rust_log.as_deref()) {
                Ok(t) => t,
                Err(err) => {
                    eprintln!("berth up: {}", err.chain());
                    return daemon::exit_code(&err);
                }
            };
        // Once the stack is up the supervisor only waits; give back what start-up touched.
        tokio::spawn(berth_core::memory::trim_when_idle(
            tokio_util::sync::CancellationToken::new(),
        ));
        if let Some(ns) = &rootless {
            tracing::info!(
                holder = ns.holder,
                "rootless: running in the stack's namespaces"
            );
        }
        let result = up(&args, &cfg).await;
        telemetry.shutdown().await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(error = %err.chain(), "berth up failed");
                eprintln!("berth up: {}", err.chain());
                daemon::exit_code(&err)
            }
        }
    })
}

async fn up(args: &ConfigArgs, cfg: &Config) -> Result<()> {
    for dir in [&cfg.root, &cfg.state_dir] {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::from(e).with_source(std::io::Error::other(dir.display().to_string()))
        })?;
    }
    let pid_file = cfg.state_dir.join("berth.pid");
    if let Some(pid) = daemon::read_pid_file(&pid_file).filter(|p| status::alive(*p)) {
        return Err(Error::already_exists(format!(
            "berth up is already running on {} (pid {pid})",
            cfg.state_dir.display()
        )));
    }
    daemon::write_pid_file(&pid_file)?;

    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let child_args = child_args(args, cfg);
    // The engine (hence shims, runtimes and `--network host` containers) runs in the stack's
    // network namespace; berth-network moves there itself (it keeps a thread in the host's).
    let engine_netns = if cfg.rootless {
        let path = cfg.rootless_netns();
        Some(std::sync::Arc::new(std::fs::File::open(&path).map_err(
            |e| Error::internal(format!("open {}", path.display())).with_source(e),
        )?))
    } else {
        None
    };

    let mut supervisors = Vec::new();
    let mut start_error = None;
    let mut signal = Box::pin(daemon::termination_signal());
    for service in Service::ALL {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let sup = Supervisor {
            service,
            binary: bin_dir.join(service.binary()),
            args: child_args.clone(),
            cfg: cfg.clone(),
            netns: engine_netns.clone().filter(|_| service == Service::Engine),
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let handle = tokio::spawn(sup.run(stop_rx, ready_tx));
        supervisors.push((service, stop_tx, handle));
        tokio::select! {
            ready = ready_rx => match ready {
                Ok(Ok(())) => tracing::info!(service = service.name(), "healthy"),
                Ok(Err(err)) => { start_error = Some(err); break; }
                Err(_) => { start_error = Some(Error::internal(format!("{} supervisor ended", service.name()))); break; }
            },
            _ = &mut signal => {
                start_error = Some(Error::new(berth_core::ErrorKind::Cancelled, "interrupted during start"));
                break;
            }
        }
    }
    if start_error.is_none() {
        tracing::info!(state_dir = %cfg.state_dir.display(), "berth is up");
        let cri = if cfg.cri.enabled {
            format!("; CRI at unix://{}", cfg.cri_socket().display())
        } else {
            String::new()
        };
        println!(
            "berth is up; Docker API at {}{cri}",
            cfg.gateway_hosts().join(", ")
        );
        if cfg.rootless {
            tokio::spawn(crate::rootless::keep_slirp(cfg.clone()));
        }
        signal.await;
        tracing::info!("stopping berth");
    }
    // Reverse order, one at a time: the gateway first, the snapshotter last.
    for (service, stop_tx, handle) in supervisors.into_iter().rev() {
        let _ = stop_tx.send(true);
        let _ = handle.await;
        tracing::info!(service = service.name(), "stopped");
    }
    daemon::remove_pid_file(&pid_file);
    match start_error {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// The flags the services get. A rootless stack's services run as root of its user namespace,
/// so they are told the paths and the file this (ordinary) user's defaults chose.
fn child_args(args: &ConfigArgs, cfg: &Config) -> Vec<String> {
    if !cfg.rootless {
        return args.to_args();
    }
    let config = args.config.clone().or_else(|| {
        berth_core::rootless::XdgPaths::from_env(std::env::vars())
            .ok()
            .map(|x| x.config_file)
            .filter(|f| f.exists())
    });
    ConfigArgs {
        config,
        docker_config: args.docker_config.clone(),
        root: Some(cfg.root.clone()),
        state_dir: Some(cfg.state_dir.clone()),
    }
    .to_args()
}

struct Supervisor {
    service: Service,
    binary: PathBuf,
    args: Vec<String>,
    cfg: Config,
    /// A network namespace to start the service in.
    netns: Option<std::sync::Arc<std::fs::File>>,
}

impl Supervisor {
    fn spawn(&self) -> Result<Child> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            // Own process group: a terminal's Ctrl-C reaches only `berth up`, which then stops
            // the services in order.
            .process_group(0)
            .kill_on_drop(false);
        if self.cfg.rootless {
            cmd.env("BERTH_ROOTLESS", "true");
        }
        let netns = self.netns.as_ref().map(|f| f.as_raw_fd());
        // SAFETY: prctl and setns are async-signal-safe and touch only the child's own state.
        unsafe {
            cmd.pre_exec(move || {
                // If `berth up` dies, its services stop rather than linger unsupervised.
                if libc_prctl_pdeathsig() != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = netns
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().map_err(|e| {
            Error::unavailable(format!("start {}", self.binary.display())).with_source(e)
        })
    }

    async fn wait_healthy(&self, child: &mut Child) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::unavailable(format!(
                    "{} exited during start ({status})",
                    self.service.binary()
                )));
            }
            if status::probe(&self.cfg, self.service).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::unavailable(format!(
                    "{} did not become healthy within {START_TIMEOUT:?}",
                    self.service.binary()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn run(
        self,
        mut stop: watch::Receiver<bool>,
        ready: tokio::sync::oneshot::Sender<Result<()>>,
    ) {
        let mut ready = Some(ready);
        let mut backoff = MIN_BACKOFF;
        loop {
            let started = Instant::now();
            let mut child = match self.spawn() {
                Ok(child) => child,
                Err(err) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Err(err));
                        return;
                    }
                    tracing::error!(service = self.service.name(), error = %err.chain(), "restart failed");
                    if sleep_or_stop(&mut stop, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            let pid = child.id();
            if let Some(tx) = ready.take() {
                let health = tokio::select! {
                    h = self.wait_healthy(&mut child) => h,
                    _ = stop.changed() => Err(Error::new(berth_core::ErrorKind::Cancelled, "stopped during start")),
                };
                let failed = health.is_err();
                let _ = tx.send(health);
                if failed {
                    self.stop_child(&mut child).await;
                    return;
                }
            } else {
                tracing::info!(service = self.service.name(), pid, "restarted");
            }
            tokio::select! {
                status = child.wait() => {
                    if *stop.borrow() {
                        return;
                    }
                    let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    if started.elapsed() >= STABLE_AFTER {
                        backoff = MIN_BACKOFF;
                    }
                    tracing::warn!(
                        service = self.service.name(),
                        pid,
                        %status,
                        restart_in = ?backoff,
                        "service exited unexpectedly"
                    );
                    if sleep_or_stop(&mut stop, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                _ = stop.changed() => {
                    self.stop_child(&mut child).await;
                    return;
                }
            }
        }
    }

    async fn stop_child(&self, child: &mut Child) {
        if let Some(pid) = child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            if tokio::time::timeout(STOP_TIMEOUT, child.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    service = self.service.name(),
                    pid,
                    "did not stop in time; killing it"
                );
                let _ = child.kill().await;
            }
        }
        let _ = child.wait().await;
    }
}

/// Sleeps for `d`; returns `true` if the stack is stopping instead.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

fn libc_prctl_pdeathsig() -> i32 {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and has no memory effects.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGTERM as libc::c_ulong,
            0,
            0,
            0,
        )
    }
}
