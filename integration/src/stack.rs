//! A whole berth stack started with `berth up` on temp dirs, stopped (and every process it
//! started killed) on drop, even when the test fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use berth_core::Service;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub use crate::network_kit::NetSlot;

/// Where the berth binaries are: `$BERTH_BIN_DIR`, else the workspace's `target/debug`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BERTH_BIN_DIR") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug")
}

/// `../shared/testimages/mkimage.py` beside the checkout (`$BERTH_SHARED_DIR` overrides where
/// `shared/` is): the offline test image builder.
pub fn mkimage_script() -> PathBuf {
    let shared = match std::env::var_os("BERTH_SHARED_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
    };
    shared.join("testimages/mkimage.py")
}

/// The path of berth binary `name`, checked to exist.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first (cargo build --workspace --bins) or set BERTH_BIN_DIR",
        path.display()
    );
    path
}

/// Returns `true` when a process with `pid` exists (zombies included).
pub fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// Returns `true` for a live, non-zombie process.
pub fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Polls `f` every 10 ms until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// How to start a stack.
#[derive(Debug, Default)]
pub struct StackBuilder {
    toml: String,
    docker_config: Option<String>,
    env: Vec<(String, String)>,
}

impl StackBuilder {
    /// Extra berth.toml text appended to the generated config.
    pub fn toml(mut self, text: &str) -> Self {
        self.toml.push_str(text);
        self.toml.push('\n');
        self
    }

    /// A daemon.json passed with `--docker-config`.
    pub fn docker_config(mut self, json: &str) -> Self {
        self.docker_config = Some(json.to_string());
        self
    }

    /// An environment variable for `berth up` and its services.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Writes the config into a new temp dir and returns the `berth up` command, not started.
    /// Unless the extra TOML has a `[network]` section, the stack gets its own bridge and
    /// subnets from `slot`, so parallel stacks never share kernel objects.
    pub fn prepare_in(self, slot: &NetSlot) -> Result<(tempfile::TempDir, Command)> {
        let dir = tempfile::Builder::new().prefix("berth-stack-").tempdir()?;
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        let config = dir.path().join("berth.toml");
        let mut toml = self.toml.clone();
        if !toml.contains("[network]") {
            toml = format!("{}\n{toml}", slot.config_toml(None));
        }
        std::fs::write(&config, toml)?;
        let mut cmd = Command::new(bin("berth"));
        cmd.arg("up")
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(&root)
            .arg("--state-dir")
            .arg(&state);
        if let Some(json) = &self.docker_config {
            let path = dir.path().join("daemon.json");
            std::fs::write(&path, json)?;
            cmd.arg("--docker-config").arg(path);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        Ok((dir, cmd))
    }

    /// Like [`Self::prepare_in`] with a slot that lives as long as the returned temp dir is
    /// used by the caller (for commands expected to fail before touching the network).
    pub fn prepare(self) -> Result<(tempfile::TempDir, Command)> {
        let slot = NetSlot::claim()?;
        self.prepare_in(&slot)
    }

    /// Starts `berth up` and waits until it reports the stack up.
    pub fn start(self) -> Result<Stack> {
        let slot = NetSlot::claim()?;
        let (dir, mut cmd) = self.prepare_in(&slot)?;
        let log_path = dir.path().join("up.log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if line.starts_with("berth is up") {
                    let _ = tx.send(());
                }
            }
        });
        let stack = Stack {
            dir,
            child,
            log: log_path,
            slot,
        };
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            bail!("berth up did not come up; its log:\n{}", stack.log_text());
        }
        stack.assert_all_pids()?;
        Ok(stack)
    }
}

/// A running `berth up`.
#[derive(Debug)]
pub struct Stack {
    dir: tempfile::TempDir,
    child: Child,
    log: PathBuf,
    slot: NetSlot,
}

impl Stack {
    /// A builder for a stack with the default config.
    pub fn builder() -> StackBuilder {
        StackBuilder::default()
    }

    /// Starts a stack with the default config.
    pub fn start() -> Result<Stack> {
        Self::builder().start()
    }

    /// The test address-space slot this stack holds; dropping the stack cleans up its bridges,
    /// veths and iptables rules.
    pub fn slot(&self) -> &NetSlot {
        &self.slot
    }

    /// The data root.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The state dir.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The temp dir holding everything of this stack.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The Docker API socket.
    pub fn docker_socket(&self) -> PathBuf {
        self.state_dir().join("docker.sock")
    }

    /// The gRPC socket of `service`.
    pub fn socket(&self, service: Service) -> PathBuf {
        self.state_dir().join(format!("{}.sock", service.name()))
    }

    /// PID of `berth up`.
    pub fn up_pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// PID of `service`, from its PID file.
    pub fn pid(&self, service: Service) -> Option<i32> {
        berth_core::daemon::read_pid_file(&self.state_dir().join(format!("{}.pid", service.name())))
    }

    fn assert_all_pids(&self) -> Result<()> {
        for s in Service::ALL {
            match self.pid(s) {
                Some(pid) if running(pid) => {}
                other => bail!("{} has no live pid ({other:?})", s.name()),
            }
        }
        Ok(())
    }

    /// `berth up`'s log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A `docker` command aimed at this stack.
    pub fn docker(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.env(
            "DOCKER_HOST",
            format!("unix://{}", self.docker_socket().display()),
        )
        .env("DOCKER_CONFIG", self.dir.path().join("docker-cli"));
        cmd
    }

    /// A `berth` command with this stack's config flags (for `status`).
    pub fn berth(&self, sub: &str) -> Command {
        let mut cmd = Command::new(bin("berth"));
        cmd.arg(sub)
            .arg("--config")
            .arg(self.dir.path().join("berth.toml"))
            .arg("--root")
            .arg(self.root())
            .arg("--state-dir")
            .arg(self.state_dir());
        cmd
    }

    /// Stops `berth up` (containers keep running), rewrites its berth.toml with `edit`, and
    /// starts it again on the same data root and state dir; returns once it is up.
    pub fn restart_with_config(&mut self, edit: impl FnOnce(String) -> String) -> Result<()> {
        self.stop(Duration::from_secs(30))?;
        let path = self.dir.path().join("berth.toml");
        let toml = edit(std::fs::read_to_string(&path)?);
        std::fs::write(&path, toml)?;
        let log = std::fs::OpenOptions::new().append(true).open(&self.log)?;
        let mut child = self
            .berth("up")
            .stdout(Stdio::piped())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        self.child = child;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if line.starts_with("berth is up") {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            bail!(
                "berth up did not come up again; its log:\n{}",
                self.log_text()
            );
        }
        self.assert_all_pids()
    }

    /// Sends SIGTERM to `berth up` and waits for it to exit; returns its exit status.
    pub fn stop(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        kill(Pid::from_raw(self.up_pid()), Signal::SIGTERM)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "berth up did not stop within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let pids: Vec<i32> = Service::ALL.iter().filter_map(|s| self.pid(*s)).collect();
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.up_pid()), Signal::SIGTERM);
            let stopped = wait_for(Duration::from_secs(15), || {
                self.child.try_wait().ok().flatten()
            });
            if stopped.is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        // Whatever `berth up` failed to stop: only processes this stack started.
        for pid in pids {
            if running(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        cleanup_containers(&self.state_dir(), self.dir.path());
        // The slot's drop then removes the bridges, veths and netfilter rules.
    }
}

/// Removes what containers of a stopped stack leave on the host: shims (by the PIDs they
/// recorded in their bundles), runtime containers under the stack's runc root, their cgroups,
/// and every mount below `dir`.
pub fn cleanup_containers(state: &Path, dir: &Path) {
    for entry in std::fs::read_dir(state.join("bundles"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Some(pid) = berth_core::daemon::read_pid_file(&entry.path().join("shim.pid"))
            && running(pid)
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    let root = state.join("runtime/runc");
    let runc = |args: &[&str]| {
        Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(args)
            .output()
    };
    if root.exists()
        && let Ok(out) = runc(&["list", "-q"])
    {
        for id in String::from_utf8_lossy(&out.stdout).lines() {
            let _ = runc(&["delete", "--force", id]);
        }
    }
    crate::engine_kit::unmount_under(dir);
}
