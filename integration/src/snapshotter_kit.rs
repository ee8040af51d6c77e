//! Test kit for the snapshotter: the real `berth-snapshotter` binary on temp dirs, a real
//! containerd on its own root/state/socket pointed at it, the offline test images, and cleanup
//! that runs on drop (so also when a test fails): processes are killed by the PID we started,
//! mounts under the temp dirs are undone.
//!
//! Binaries are looked up in `BERTH_BIN_DIR`, else `<workspace>/target/debug`; build them first
//! (`cargo build -p berth-snapshotter`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use berth_core::snapshots::RemoteSnapshotter;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The path of the berth binary `name`; panics with how to build it when it is missing.
pub fn binary(name: &str) -> PathBuf {
    let path = crate::stack::bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} not found: build it first (cargo build -p {name}) or point BERTH_BIN_DIR at it",
        path.display()
    );
    path
}

/// True (after printing why) when the test must be skipped because it needs root.
pub fn skip_unless_root(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!("skipping: {what} needs root (it mounts filesystems)");
    true
}

/// True (after printing why) when one of the host `programs` is not on PATH.
pub fn skip_unless_installed(programs: &[&str]) -> bool {
    for program in programs {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
            .unwrap_or(false);
        if !found {
            eprintln!("skipping: {program} is not installed");
            return true;
        }
    }
    false
}

/// Sends `signal` to `child` unless it has already exited.
fn signal(child: &mut Child, signal: Signal) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = kill(Pid::from_raw(child.id() as i32), signal);
    }
}

/// Waits up to `timeout` for `child`; SIGKILLs it after that.
fn wait_or_kill(child: &mut Child, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(child, Signal::SIGKILL);
    let _ = child.wait();
}

/// A `berth-snapshotter` process on `<dir>/root` and `<dir>/state`, started from a generated
/// berth.toml. Dropping it SIGKILLs it.
#[derive(Debug)]
pub struct SnapshotterProcess {
    child: Option<Child>,
    /// The berth.toml it was started with.
    pub config: PathBuf,
    /// Data root (`root` in berth.toml).
    pub root: PathBuf,
    /// State dir (`state_dir`).
    pub state: PathBuf,
    /// Its gRPC socket.
    pub socket: PathBuf,
    /// Its stdout and stderr.
    pub log: PathBuf,
    /// `overlayfs` or `native`.
    pub driver: String,
}

impl SnapshotterProcess {
    /// Writes a berth.toml under `dir` and starts the binary with the given driver.
    pub async fn start(dir: &Path, driver: &str) -> Result<Self> {
        let root = dir.join("root");
        let state = dir.join("state");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&state)?;
        let config = dir.join("berth.toml");
        std::fs::write(
            &config,
            format!(
                "root = {root:?}\nstate_dir = {state:?}\n\n[snapshotter]\ndriver = {driver:?}\n",
                root = root.display().to_string(),
                state = state.display().to_string(),
            ),
        )?;
        let mut process = Self {
            child: None,
            socket: state.join("snapshotter.sock"),
            log: dir.join("snapshotter.log"),
            config,
            root,
            state,
            driver: driver.to_string(),
        };
        process.spawn().await?;
        Ok(process)
    }

    /// Starts the binary again on the same directories (after [`Self::kill9`] or
    /// [`Self::terminate`]).
    pub async fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("berth-snapshotter is still running");
        }
        self.spawn().await
    }

    async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(binary("berth-snapshotter"))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn berth-snapshotter")?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "berth-snapshotter exited with {status}:\n{}",
                    self.log_text()
                );
            }
            if tokio::net::UnixStream::connect(&self.socket).await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "berth-snapshotter did not listen on {}:\n{}",
                    self.socket.display(),
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `kill -9` and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&mut child, Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait (SIGKILL after 10 s).
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&mut child, Signal::SIGTERM);
            wait_or_kill(&mut child, Duration::from_secs(10));
        }
    }

    /// A proxy to it, as the rest of berth would make one.
    pub fn remote(&self) -> RemoteSnapshotter {
        RemoteSnapshotter::new(&self.socket, self.driver.clone())
    }

    /// The driver's data directory (`<root>/snapshotter/<driver>`).
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("snapshotter").join(&self.driver)
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SnapshotterProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Builds the offline test images `kinds` (`busybox`, `layered`, ...) under `out` with
/// `../shared/testimages/mkimage.py`; returns `out`.
pub fn build_images(out: &Path, kinds: &[&str]) -> Result<PathBuf> {
    let script = crate::stack::mkimage_script();
    for kind in kinds {
        let output = Command::new("python3")
            .arg(&script)
            .arg(kind)
            .arg("--out")
            .arg(out)
            .output()
            .context("run mkimage.py")?;
        if !output.status.success() {
            bail!(
                "mkimage.py {kind} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(out.to_path_buf())
}

/// A containerd on its own root, state and socket, with berth-snapshotter as the proxy
/// snapshotter `berth`. Dropping it kills the shims it started (by the PIDs in its state dir),
/// then containerd, removes the test namespace's cgroups and unmounts everything under its
/// directory.
#[derive(Debug)]
pub struct Containerd {
    child: Option<Child>,
    /// Its directory (config, root, state, sockets, log).
    pub dir: PathBuf,
    /// Its gRPC socket.
    pub socket: PathBuf,
    /// The namespace the `ctr` helper uses.
    pub namespace: String,
    /// Its log.
    pub log: PathBuf,
}

/// Output of a finished command.
#[derive(Debug)]
pub struct Output {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Containerd {
    /// Starts containerd under `dir` with `[proxy_plugins.berth]` pointing at `snapshotter`.
    ///
    /// With `eager_gc`, containerd's garbage collector runs after every deletion (so removals
    /// reach the snapshotter promptly); without it, it never runs, so snapshots made without a
    /// lease (as a plain snapshots client makes them) are not collected under the client.
    pub async fn start(dir: &Path, snapshotter: &Path, eager_gc: bool) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        let d = dir.display();
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.internal.v1.opt",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = "{d}/debug.sock"
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.gc.v1.scheduler"]
{gc}

[proxy_plugins.berth]
  type = "snapshot"
  address = "{snapshotter}"
"#,
                socket = socket.display(),
                snapshotter = snapshotter.display(),
                gc = if eager_gc {
                    "  deletion_threshold = 1\n  schedule_delay = \"0s\""
                } else {
                    "  deletion_threshold = 0\n  mutation_threshold = 1000000000\n  startup_delay = \"24h\""
                },
            ),
        )?;
        let log_path = dir.join("containerd.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn containerd")?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        let mut containerd = Self {
            child: Some(child),
            dir: dir.to_path_buf(),
            socket,
            namespace: format!("berth-test-{}-{nanos}", std::process::id()),
            log: log_path,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = containerd
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "containerd exited with {status}:\n{}",
                    containerd.log_text()
                );
            }
            if tokio::net::UnixStream::connect(&containerd.socket)
                .await
                .is_ok()
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("containerd did not start:\n{}", containerd.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(containerd)
    }

    /// Runs `ctr --address <socket> -n <namespace> args…` (at most `timeout`); an error carries
    /// its stderr.
    pub async fn ctr(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut command = tokio::process::Command::new("ctr");
        command
            .arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(timeout, command.output())
            .await
            .with_context(|| format!("ctr {args:?} did not finish within {timeout:?}"))??;
        let out = Output {
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        if !output.status.success() {
            bail!(
                "ctr {args:?} failed ({}): {}{}",
                output.status,
                out.stderr,
                out.stdout
            );
        }
        Ok(out)
    }

    /// What containerd logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// PIDs of the shims containerd started (from their pid files in its state dir).
    fn shim_pids(&self) -> Vec<i32> {
        let tasks = self.dir.join("state/io.containerd.runtime.v2.task");
        let mut pids = Vec::new();
        for ns in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
            for task in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                let pid = std::fs::read_to_string(task.path().join("shim.pid")).ok();
                if let Some(pid) = pid.and_then(|p| p.trim().parse().ok()) {
                    pids.push(pid);
                }
            }
        }
        pids
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for pid in self.shim_pids() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if let Some(mut child) = self.child.take() {
            signal(&mut child, Signal::SIGTERM);
            wait_or_kill(&mut child, Duration::from_secs(10));
        }
        // Containers of this test's namespace that a failed run left behind.
        for controller in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let ns = controller.path().join(&self.namespace);
            for child in std::fs::read_dir(&ns).into_iter().flatten().flatten() {
                if child.path().is_dir() {
                    let _ = std::fs::remove_dir(child.path());
                }
            }
            let _ = std::fs::remove_dir(&ns);
        }
        if let Err(err) = berth_core::mount::unmount_all(&self.dir) {
            eprintln!("containerd cleanup: {}", err.chain());
        }
    }
}

/// Unmounts everything under a directory when dropped. Declare it after the temp dir it guards:
/// locals drop in reverse order, so the unmount runs before the directory is deleted.
#[derive(Debug)]
pub struct UnmountOnDrop(pub PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        if let Err(err) = berth_core::mount::unmount_all(&self.0) {
            eprintln!("unmount {}: {}", self.0.display(), err.chain());
        }
    }
}
