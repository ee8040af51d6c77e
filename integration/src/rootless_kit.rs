//! Rootless mode under test: an ordinary user made for the test (with subordinate id ranges),
//! a stack that user starts with `berth up --rootless`, and cleanup of all of it — processes of
//! the user and of its subordinate ids, the user, its home and runtime dir, the ranges, and the
//! mode of `/dev/net/tun` — even when the test fails.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use berth_core::userns::{HostIdFiles, SUBORDINATE_COUNT};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::stack::{bin_dir, wait_for};

/// The berth binaries a rootless stack runs.
const BINARIES: [&str; 7] = [
    "berth",
    "berth-snapshotter",
    "berth-images",
    "berth-network",
    "berth-engine",
    "berth-gateway",
    "berth-shim",
];

/// `/dev/net/tun` opened to every user (slirp4netns needs it; Debian's udev rules do this, this
/// machine has no udev), its mode put back on drop.
#[derive(Debug)]
pub struct TunAccess {
    mode: u32,
}

impl TunAccess {
    pub fn grant() -> Result<Self> {
        let path = Path::new("/dev/net/tun");
        let mode = std::fs::metadata(path)
            .context("stat /dev/net/tun")?
            .permissions()
            .mode()
            & 0o7777;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .context("chmod /dev/net/tun")?;
        Ok(Self { mode })
    }
}

impl Drop for TunAccess {
    fn drop(&mut self) {
        let _ =
            std::fs::set_permissions("/dev/net/tun", std::fs::Permissions::from_mode(self.mode));
    }
}

/// An ordinary user with subordinate ranges, removed on drop with everything it ran.
#[derive(Debug)]
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub runtime_dir: PathBuf,
    /// First subordinate uid and how many.
    pub subuid: (u32, u32),
    pub subgid: (u32, u32),
    /// The berth binaries, linked where the user can run them.
    pub bin: PathBuf,
}

impl TestUser {
    /// Creates `brl<random>` with a home, subordinate uids and gids, and a runtime dir.
    pub fn create() -> Result<Self> {
        let name = format!("brl{:08x}", rand_u32());
        let out = Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/sh", "--user-group"])
            // The ranges come from berth's own editor below, under the lock the other tests'
            // editors share (useradd's own lock is not theirs).
            .args(["-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0"])
            .arg(&name)
            .output()
            .context("run useradd")?;
        ensure!(
            out.status.success(),
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // From here on a failure still removes the user (Drop).
        let mut user = Self {
            name: name.clone(),
            uid: 0,
            gid: 0,
            home: PathBuf::new(),
            runtime_dir: PathBuf::new(),
            subuid: (0, 0),
            subgid: (0, 0),
            bin: PathBuf::new(),
        };
        let pw = nix::unistd::User::from_name(&name)?.context("the new user is not in passwd")?;
        user.uid = pw.uid.as_raw();
        user.gid = pw.gid.as_raw();
        user.home = pw.dir;
        let (u, g) = HostIdFiles::default().add_ranges(&name)?;
        user.subuid = (u, SUBORDINATE_COUNT);
        user.subgid = (g, SUBORDINATE_COUNT);
        user.runtime_dir = PathBuf::from(format!("/run/user/{}", user.uid));
        std::fs::create_dir_all(&user.runtime_dir)?;
        user.chown(&user.runtime_dir)?;
        std::fs::set_permissions(&user.runtime_dir, std::fs::Permissions::from_mode(0o700))?;
        user.bin = user.home.join("bin");
        std::fs::create_dir_all(&user.bin)?;
        for b in BINARIES {
            let from = bin_dir().join(b);
            let to = user.bin.join(b);
            // A hard link needs no search permission on the build tree; a copy is the fallback.
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).with_context(|| format!("copy {}", from.display()))?;
            }
        }
        std::fs::set_permissions(&user.home, std::fs::Permissions::from_mode(0o755))?;
        Ok(user)
    }

    pub fn chown(&self, path: &Path) -> Result<()> {
        nix::unistd::chown(path, Some(self.uid.into()), Some(self.gid.into()))
            .with_context(|| format!("chown {}", path.display()))
    }

    /// `program` run as the user with a login-like environment (and `DOCKER_HOST` set to the
    /// rootless socket).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", &self.name, "--", "env", "-i"])
            .arg(format!("HOME={}", self.home.display()))
            .arg(format!("USER={}", self.name))
            .arg(format!("XDG_RUNTIME_DIR={}", self.runtime_dir.display()))
            .arg("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .arg(format!(
                "DOCKER_HOST=unix://{}",
                self.docker_socket().display()
            ))
            .arg("RUST_LOG=info")
            .arg(program)
            .current_dir(&self.home);
        cmd
    }

    /// `docker ARGS` as the user; its output, or an error with its stderr.
    pub fn docker(&self, args: &[&str]) -> Result<String> {
        let out = self.command("docker").args(args).output()?;
        ensure!(
            out.status.success(),
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `docker ARGS` as the user, expected to fail: its stderr.
    pub fn docker_fails(&self, args: &[&str]) -> Result<String> {
        let out = self.command("docker").args(args).output()?;
        ensure!(
            !out.status.success(),
            "docker {} succeeded: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.runtime_dir.join("berth")
    }

    pub fn docker_socket(&self) -> PathBuf {
        self.state_dir().join("docker.sock")
    }

    /// Every process running as the user or one of its subordinate uids.
    pub fn processes(&self) -> Vec<i32> {
        let (start, count) = self.subuid;
        let owned =
            |uid: u32| uid == self.uid || (count > 0 && uid >= start && uid < start + count);
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| proc_uids(*pid).is_some_and(|u| u.iter().any(|x| owned(*x))))
            .collect()
    }
}

impl crate::userns_kit::DockerCli for TestUser {
    fn docker(&self, args: &[&str]) -> Result<std::process::Output> {
        crate::gateway_kit::run_for(self.command("docker").args(args), Duration::from_secs(120))
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // Everything the user (and its containers, under subordinate ids) still runs: the
        // stack, the namespace holder, slirp4netns, shims, containers. Namespaces and their
        // mounts go with the last process.
        for _ in 0..50 {
            let pids = self.processes();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.subuid.1 > 0
            && let Err(e) = HostIdFiles::default().remove_ranges(&self.name)
        {
            eprintln!("removing the subordinate ranges of {}: {e}", self.name);
        }
        let _ = Command::new("userdel")
            .args(["--remove", "--force", &self.name])
            .output();
        if !self.runtime_dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.runtime_dir);
        }
    }
}

/// The real, effective, saved and filesystem uids of `pid`.
pub fn proc_uids(pid: i32) -> Option<[u32; 4]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let v: Vec<u32> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    Some([*v.first()?, *v.get(1)?, *v.get(2)?, *v.get(3)?])
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    u32::from_le_bytes(b) ^ std::process::id()
}

/// `berth up --rootless` run by `user`, stopped on drop (the user's Drop removes the rest).
#[derive(Debug)]
pub struct RootlessStack {
    child: Child,
    pub log: PathBuf,
}

impl RootlessStack {
    /// Starts the stack and waits until the Docker API answers.
    pub fn start(user: &TestUser) -> Result<Self> {
        let log = user.home.join("berth-up.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = user
            .command(&user.bin.join("berth").display().to_string())
            .args(["up", "--rootless"])
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("start berth up as the user")?;
        let mut stack = Self { child, log };
        let ready = wait_for(Duration::from_secs(30), || {
            if let Ok(Some(_)) = stack.child.try_wait() {
                return Some(false);
            }
            user.docker(&["version", "--format", "{{.Server.Version}}"])
                .ok()
                .map(|_| true)
        });
        if ready != Some(true) {
            bail!("berth up --rootless did not come up:\n{}", stack.log_text());
        }
        Ok(stack)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The supervisor itself (`runuser` runs it as a child).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the runuser wrapper after its `berth up` was killed.
    pub fn reap(&mut self) {
        let _ = wait_for(Duration::from_secs(15), || {
            self.child.try_wait().ok().flatten().map(|_| ())
        });
    }

    /// SIGTERM to `berth up`, then waits for it.
    pub fn stop(&mut self, user: &TestUser) {
        if let Some(pid) = berth_core::daemon::read_pid_file(&user.state_dir().join("berth.pid")) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        self.reap();
    }
}

impl Drop for RootlessStack {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}
