//! The real host side of the seams: network namespace files, `berth-shim` processes, and the
//! host facts spec generation needs. Root-only; exercised by the integration tests.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_core::{Error, ErrorKind, Id, Result};

use crate::deps::{BoxFuture, DeadExit, Netns, Shim, ShimLauncher, UserNs, userns_file};
use crate::remote::RemoteShim;
use crate::spec::{Device, HostInfo};

/// Network namespaces as bind mounts of `/proc/thread-self/ns/net` under a directory
/// (`<state>/netns/<id>`), made by a short-lived thread that unshares its network namespace and
/// brings its loopback interface up.
#[derive(Debug, Clone)]
pub struct HostNetns {
    dir: PathBuf,
}

impl HostNetns {
    /// Namespace files go into `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }
}

pub(crate) fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket/ioctl calls on a zeroed, correctly sized ifreq whose name is a
    // NUL-terminated "lo"; the descriptor is closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        req.ifr_name[0] = b'l' as libc::c_char;
        req.ifr_name[1] = b'o' as libc::c_char;
        let mut res = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        if res == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            res = libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if res != 0 { Err(err) } else { Ok(()) }
    }
}

fn make_netns(path: &Path) -> Result<()> {
    let target = path.to_path_buf();
    // A thread of its own: unshare changes only the calling thread, which then ends.
    std::thread::spawn(move || -> Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| Error::internal("unshare the network namespace").with_source(e))?;
        if let Err(e) = loopback_up() {
            tracing::warn!(error = %e, "bringing up lo in a new network namespace");
        }
        // moby's defaults for a container's own network namespace: any port may be bound and
        // any group may ping. Written here, by the namespace's owner: a container with a user
        // namespace of its own (userns-remap, rootless) may not write them itself, and its root
        // would otherwise not bind port 80. The spec's sysctls (`--sysctl`) still apply after.
        // /proc/sys/net is the calling thread's namespace.
        for (key, value) in [
            ("net/ipv4/ip_unprivileged_port_start", "0"),
            ("net/ipv4/ping_group_range", "0 2147483647"),
        ] {
            if let Err(e) = std::fs::write(format!("/proc/sys/{key}"), value) {
                tracing::warn!(key, error = %e, "setting a new network namespace's sysctl");
            }
        }
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            Error::internal(format!("bind-mount netns on {}", target.display())).with_source(e)
        })
    })
    .join()
    .map_err(|_| Error::internal("netns thread panicked"))?
}

impl Netns for HostNetns {
    fn create<'a>(&'a self, id: &'a str, userns: Option<UserNs>) -> BoxFuture<'a, PathBuf> {
        let path = self.dir.join(id);
        let dir = self.dir.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || -> Result<PathBuf> {
                std::fs::create_dir_all(&dir).map_err(|e| {
                    Error::internal(format!("create {}", dir.display())).with_source(e)
                })?;
                let user = userns_file(&path);
                for p in [&path, &user] {
                    if p.exists() {
                        let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
                        let _ = std::fs::remove_file(p);
                    }
                }
                let mut files = vec![&path];
                if userns.is_some() {
                    files.push(&user);
                }
                for p in &files {
                    std::fs::File::create(p).map_err(|e| {
                        Error::internal(format!("create {}", p.display())).with_source(e)
                    })?;
                }
                let made = match &userns {
                    None => make_netns(&path),
                    Some(u) => make_userns_netns(u.clone(), &user, &path),
                };
                if let Err(e) = made {
                    for p in files {
                        let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
                        let _ = std::fs::remove_file(p);
                    }
                    return Err(e);
                }
                Ok(path)
            })
            .await
            .map_err(|e| Error::internal("netns task").with_source(e))?
        })
    }

    fn remove(&self, path: &Path) -> Result<()> {
        for p in [path.to_path_buf(), userns_file(path)] {
            match nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
                Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
                Err(e) => {
                    return Err(Error::internal(format!("unmount {}", p.display())).with_source(e));
                }
            }
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::internal(format!("remove {}", p.display())).with_source(e));
                }
            }
        }
        Ok(())
    }
}

/// The `/proc/PID/{uid,gid}_map` text of `ranges`.
fn map_text(ranges: &[berth_core::userns::IdRange]) -> String {
    ranges
        .iter()
        .map(|r| format!("{} {} {}\n", r.container, r.host, r.size))
        .collect()
}

/// Makes a network namespace owned by user namespace `userns` (a new one, or one joined),
/// bind-mounted on `net`, and bind-mounts that user namespace on `user`: a forked child
/// unshares its user namespace and waits while this process writes the maps (or joins the
/// existing one), unshares its network namespace, brings `lo` up and waits again while both
/// are bind-mounted, then exits. Between fork and exit the child makes raw system calls only.
fn make_userns_netns(userns: UserNs, user: &Path, net: &Path) -> Result<()> {
    use std::io::{Read, Write};
    let join = match &userns {
        UserNs::Join(path) => Some(
            std::fs::File::open(path)
                .map_err(|e| Error::internal(format!("open {}", path.display())).with_source(e))?,
        ),
        UserNs::New(_) => None,
    };
    let join_fd = join.as_ref().map_or(-1, |f| f.as_raw_fd());
    let (mut from_child, child_w) = std::io::pipe()?;
    let (child_r, mut to_child) = std::io::pipe()?;
    let (cw, cr) = (child_w.as_raw_fd(), child_r.as_raw_fd());
    let (pr, pw) = (from_child.as_raw_fd(), to_child.as_raw_fd());
    // SAFETY: the child only makes async-signal-safe system calls on descriptors opened before
    // the fork, then `_exit`s; the parent closes its copies of the child's ends.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::internal("fork").with_source(std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above; only raw calls until _exit.
        unsafe {
            // The parent's ends: holding its write end would keep the last wait from ever
            // seeing end-of-file.
            libc::close(pr);
            libc::close(pw);
            let report = |b: u8| {
                libc::write(cw, (&b as *const u8).cast(), 1);
            };
            let wait = || {
                let mut b = 0u8;
                libc::read(cr, (&mut b as *mut u8).cast(), 1)
            };
            if join_fd >= 0 {
                if libc::setns(join_fd, libc::CLONE_NEWUSER) < 0 {
                    report(b'U');
                    libc::_exit(1);
                }
            } else {
                if libc::unshare(libc::CLONE_NEWUSER) < 0 {
                    report(b'U');
                    libc::_exit(1);
                }
                report(b'1');
                if wait() != 1 {
                    libc::_exit(1);
                }
            }
            if libc::unshare(libc::CLONE_NEWNET) < 0 {
                report(b'N');
                libc::_exit(1);
            }
            let _ = loopback_up();
            report(b'2');
            wait();
            libc::_exit(0);
        }
    }
    drop(child_w);
    drop(child_r);
    let result = (|| -> Result<()> {
        let step = |from_child: &mut std::io::PipeReader, want: u8| -> Result<()> {
            let mut b = [0u8; 1];
            match from_child.read(&mut b) {
                Ok(1) if b[0] == want => Ok(()),
                Ok(1) if b[0] == b'U' => Err(Error::internal("unshare the user namespace")),
                Ok(1) if b[0] == b'N' => Err(Error::internal("unshare the network namespace")),
                other => Err(Error::internal(format!(
                    "user namespace helper ended early ({other:?})"
                ))),
            }
        };
        if let UserNs::New(map) = &userns {
            step(&mut from_child, b'1')?;
            for (file, ranges) in [("uid_map", &map.uids), ("gid_map", &map.gids)] {
                let p = format!("/proc/{pid}/{file}");
                std::fs::write(&p, map_text(ranges))
                    .map_err(|e| Error::internal(format!("write {p}")).with_source(e))?;
            }
            to_child.write_all(b"1")?;
        }
        step(&mut from_child, b'2')?;
        for (ns, target) in [("user", user), ("net", net)] {
            nix::mount::mount(
                Some(format!("/proc/{pid}/ns/{ns}").as_str()),
                target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| {
                Error::internal(format!("bind-mount {ns} namespace on {}", target.display()))
                    .with_source(e)
            })?;
        }
        Ok(())
    })();
    drop(to_child);
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    result
}

/// Shims as `berth-shim` processes (`berth-shim start` daemonizes one per container).
#[derive(Debug, Clone)]
pub struct ShimProcesses {
    /// The shim binary.
    pub binary: PathBuf,
    /// `[state_dir]`, passed on for socket placement.
    pub state_dir: PathBuf,
    /// Where bundles are (`<state>/bundles`).
    pub bundles: PathBuf,
    /// The engine's events endpoint, `unix:///…/engine.sock`.
    pub events_address: String,
    /// Default runtime binary.
    pub runtime: String,
    /// The default runtime's `--root`.
    pub runtime_root: PathBuf,
    /// Output a shim buffers for a slow log disk.
    pub log_buffer_bytes: u64,
    /// `[shim] exec`: how shims start exec processes (`native` or `runc`).
    pub exec: String,
    /// `[telemetry] otlp_endpoint`: where shims send their trace spans.
    pub otlp_endpoint: Option<String>,
}

impl ShimProcesses {
    /// The shim binary for `config`: `[shim] binary`, else `berth-shim` next to this binary.
    pub fn binary_for(config: &berth_core::Config) -> PathBuf {
        if let Some(b) = &config.shim.binary {
            // Shims start in `/`: a relative path means the engine's working directory.
            return if b.components().count() > 1 {
                std::path::absolute(b).unwrap_or_else(|_| b.clone())
            } else {
                b.clone()
            };
        }
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("berth-shim")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("berth-shim"))
    }
}

/// How long a new shim may take to serve.
const SHIM_READY: Duration = Duration::from_secs(15);

fn address_path(addr: &str) -> PathBuf {
    PathBuf::from(addr.trim().strip_prefix("unix://").unwrap_or(addr.trim()))
}

impl ShimLauncher for ShimProcesses {
    fn spawn<'a>(
        &'a self,
        id: &'a str,
        bundle: &'a Path,
        namespace: &'a str,
    ) -> BoxFuture<'a, Arc<dyn Shim>> {
        Box::pin(async move {
            // `berth-shim serve` itself, not `berth-shim start` (which would only spawn it and
            // wait): one process fewer on every start. It reports readiness on stdout, then
            // lets go of it; its stderr is its log.
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(bundle.join("shim.log"))
                .map_err(|e| Error::internal("open shim.log").with_source(e))?;
            let mut cmd = tokio::process::Command::new(&self.binary);
            cmd.args(["serve", "--notify-stdout"])
                .args(["--id", id])
                .arg("--bundle")
                .arg(bundle)
                .args(["--runtime", &self.runtime])
                .arg("--runtime-root")
                .arg(&self.runtime_root)
                .args(["--events-address", &self.events_address])
                .args([
                    "--namespace",
                    if namespace.is_empty() {
                        "default"
                    } else {
                        namespace
                    },
                ])
                .arg("--state-dir")
                .arg(&self.state_dir)
                .args(["--log-buffer-bytes", &self.log_buffer_bytes.to_string()])
                .args(["--exec", &self.exec])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(log)
                .current_dir("/");
            if let Some(endpoint) = &self.otlp_endpoint {
                cmd.args(["--otlp-endpoint", endpoint]);
            }
            berth_core::daemon::detach_on_exec(cmd.as_std_mut());
            let mut child = cmd.spawn().map_err(|e| {
                Error::internal(format!("run {}", self.binary.display())).with_source(e)
            })?;
            let ready = async {
                use tokio::io::AsyncBufReadExt as _;
                let mut line = String::new();
                if let Some(out) = child.stdout.take() {
                    let _ = tokio::io::BufReader::new(out).read_line(&mut line).await;
                }
                line
            };
            let line = match tokio::time::timeout(SHIM_READY, ready).await {
                Ok(line) => line,
                Err(_) => String::from("error the shim was not ready in time"),
            };
            match line.trim_end().split_once(' ') {
                Some(("ok", addr)) => {
                    // The shim outlives this call, and the engine; dropped, its exit is reaped
                    // by tokio in the background (or by whoever it is re-parented to).
                    drop(child);
                    let shim: Arc<dyn Shim> = Arc::new(RemoteShim::new(address_path(addr)));
                    Ok(shim)
                }
                other => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    let message = match other {
                        Some(("error", msg)) => msg.to_string(),
                        _ if line.trim().is_empty() => {
                            "the shim exited before it was ready (see shim.log in the bundle)"
                                .into()
                        }
                        _ => format!("unexpected readiness line {:?}", line.trim()),
                    };
                    Err(Error::internal(format!("berth-shim: {message}")))
                }
            }
        })
    }

    fn connect<'a>(
        &'a self,
        _id: &'a str,
        bundle: &'a Path,
    ) -> BoxFuture<'a, Option<Arc<dyn Shim>>> {
        Box::pin(async move {
            let Ok(addr) = std::fs::read_to_string(bundle.join("shim.address")) else {
                return Ok(None);
            };
            let path = address_path(&addr);
            if !path.exists() {
                return Ok(None);
            }
            let shim = RemoteShim::new(&path);
            match tokio::time::timeout(Duration::from_secs(2), shim.info()).await {
                Ok(Ok(_)) => Ok(Some(Arc::new(shim) as Arc<dyn Shim>)),
                Ok(Err(e)) if e.is(ErrorKind::Unavailable) => Ok(None),
                Ok(Err(e)) => Err(e),
                Err(_) => Ok(None),
            }
        })
    }

    fn cleanup<'a>(&'a self, id: &'a str, bundle: &'a Path) -> BoxFuture<'a, DeadExit> {
        Box::pin(async move {
            let unknown = DeadExit {
                status: 255,
                exited_at: None,
            };
            if !bundle.exists() {
                return Ok(unknown);
            }
            let out = tokio::process::Command::new(&self.binary)
                .arg("delete")
                .args(["--id", id])
                .arg("--bundle")
                .arg(bundle)
                .arg("--state-dir")
                .arg(&self.state_dir)
                .stdin(std::process::Stdio::null())
                .output()
                .await
                .map_err(|e| {
                    Error::internal(format!("run {}", self.binary.display())).with_source(e)
                })?;
            if !out.status.success() {
                tracing::warn!(id, error = %String::from_utf8_lossy(&out.stderr).trim(), "berth-shim delete");
                return Ok(unknown);
            }
            #[derive(serde::Deserialize)]
            struct Exit {
                exit_status: u32,
                #[serde(default)]
                exited_at: String,
            }
            let exit: Exit = match serde_json::from_slice(&out.stdout) {
                Ok(e) => e,
                Err(_) => return Ok(unknown),
            };
            Ok(DeadExit {
                status: exit.exit_status,
                exited_at: crate::logs::parse_rfc3339(&exit.exited_at),
            })
        })
    }

    fn list(&self) -> Vec<String> {
        std::fs::read_dir(&self.bundles)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| Id::is_valid(n))
            .collect()
    }
}

/// The host facts, read once at start-up.
pub fn detect_host() -> HostInfo {
    let cg = Path::new("/sys/fs/cgroup");
    let v2 = cg.join("cgroup.controllers").exists();
    let (swap_limit, blkio_weight) = if v2 {
        (
            cg.join("init.scope/memory.swap.max").exists()
                || std::fs::read_to_string(cg.join("cgroup.controllers"))
                    .is_ok_and(|c| c.contains("memory")),
            std::fs::read_to_string(cg.join("cgroup.controllers")).is_ok_and(|c| c.contains("io")),
        )
    } else {
        (
            cg.join("memory/memory.memsw.limit_in_bytes").exists(),
            cg.join("blkio/blkio.weight").exists() || cg.join("blkio/blkio.bfq.weight").exists(),
        )
    };
    HostInfo {
        ncpu: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        swap_limit,
        blkio_weight,
        cgroup_v2: v2,
        devices: scan_devices(Path::new("/dev")),
        nofile: nofile_limit(),
        seccomp_x32: x32_abi_from_config(read_kernel_config().as_deref()),
        cpu_realtime: !v2 && cg.join("cpu/cpu.rt_runtime_us").exists(),
        min_oom_score_adj: min_oom_score_adj(),
        cgroups: cgroups_writable(cg, v2),
        hugetlb: if v2 {
            std::fs::read_to_string(cg.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|w| w == "hugetlb"))
        } else {
            cg.join("hugetlb").is_dir()
        },
        id_map: None,
    }
}

/// Whether the engine may make container cgroups: always as real root; in a user namespace
/// (rootless) only where the hierarchy runc writes first is writable to it.
fn cgroups_writable(cg: &Path, v2: bool) -> bool {
    if !berth_core::rootless::in_user_namespace() {
        return true;
    }
    let dir = if v2 {
        cg.to_path_buf()
    } else {
        cg.join("memory")
    };
    nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// -1000 when this process may lower `oom_score_adj` (CAP_SYS_RESOURCE), else its own value:
/// what a container started through the shim and runc can still be given.
fn min_oom_score_adj() -> i32 {
    if caps::has_sys_resource() {
        return -1000;
    }
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The running kernel's build config, from /proc/config.gz, when the kernel exposes it.
fn read_kernel_config() -> Option<String> {
    use std::io::Read;
    let file = std::fs::File::open("/proc/config.gz").ok()?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// Whether the kernel runs x32 binaries. Unknown (no config to read) counts as yes: a
/// profile that lists x32 needlessly only costs time, one that misses it would let x32
/// binaries be killed.
fn x32_abi_from_config(config: Option<&str>) -> bool {
    match config {
        Some(text) => text.lines().any(|l| l.trim() == "CONFIG_X86_X32_ABI=y"),
        None => true,
    }
}

/// The default open-files limit for containers: 1048576 (what containers get under dockerd),
/// unless this process could not set it: without CAP_SYS_RESOURCE a hard limit can only be
/// lowered, so the engine's own hard limit caps it.
fn nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit};
    let want = crate::spec::DEFAULT_NOFILE;
    let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return want;
    };
    let can_raise = caps::has_sys_resource();
    if can_raise { want } else { want.min(hard) }
}

mod caps {
    /// Whether CAP_SYS_RESOURCE is in this process's effective set.
    pub fn has_sys_resource() -> bool {
        const CAP_SYS_RESOURCE: u32 = 24;
        // In a user namespace (rootless) the capability does not reach the limits and scores
        // the host's kernel checks it for.
        if berth_core::rootless::in_user_namespace() {
            return false;
        }
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            })
            .is_some_and(|eff| eff & (1 << CAP_SYS_RESOURCE) != 0)
    }
}

/// Device nodes under `dir` (for privileged containers), skipping the per-container trees.
fn scan_devices(dir: &Path) -> Vec<Device> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(m) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let ft = m.file_type();
            if ft.is_dir() {
                let name = e.file_name();
                if !matches!(name.to_str(), Some("pts" | "shm" | "mqueue" | "fd")) {
                    stack.push(path);
                }
                continue;
            }
            let kind = if ft.is_char_device() {
                'c'
            } else if ft.is_block_device() {
                'b'
            } else {
                continue;
            };
            let p = path.display().to_string();
            if matches!(p.as_str(), "/dev/console" | "/dev/ptmx" | "/dev/tty") {
                continue;
            }
            out.push(Device {
                path: p,
                kind,
                major: nix::sys::stat::major(m.rdev()) as i64,
                minor: nix::sys::stat::minor(m.rdev()) as i64,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                permissions: "rwm".into(),
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

#[cfg(test)]
mod x32_tests {
    use super::x32_abi_from_config;

    #[test]
    fn x32_follows_the_kernel_config_and_defaults_to_yes() {
        assert!(x32_abi_from_config(Some(
            "CONFIG_X86_64=y\nCONFIG_X86_X32_ABI=y\n"
        )));
        assert!(!x32_abi_from_config(Some(
            "CONFIG_X86_64=y\n# CONFIG_X86_X32_ABI is not set\n"
        )));
        assert!(x32_abi_from_config(None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_facts() {
        let h = detect_host();
        assert!(h.ncpu >= 1);
        if Path::new("/dev/null").exists() {
            assert!(
                h.devices
                    .iter()
                    .any(|d| d.path == "/dev/null" && d.major == 1 && d.minor == 3)
            );
        }
        assert_eq!(
            address_path("unix:///run/x.sock\n"),
            Path::new("/run/x.sock")
        );
    }

    #[tokio::test]
    async fn netns_files_come_and_go() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let ns = HostNetns::new(t.path().join("netns"));
        let path = ns.create("abc", None).await.unwrap();
        let mine = std::fs::read_link("/proc/self/ns/net").unwrap();
        // The file is a namespace of its own: opening it and comparing inode numbers.
        let st = nix::sys::stat::stat(&path).unwrap();
        let host = nix::sys::stat::stat("/proc/self/ns/net").unwrap();
        assert_ne!(st.st_ino, host.st_ino, "a new namespace, not {mine:?}");
        ns.remove(&path).unwrap();
        assert!(!path.exists());
        ns.remove(&path).unwrap();
    }

    #[tokio::test]
    async fn a_netns_for_a_user_namespace_is_owned_by_it() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let ns = HostNetns::new(t.path().join("netns"));
        let map = berth_core::userns::IdMap {
            uids: berth_core::userns::concatenate(&[(300000, 1000)]).unwrap(),
            gids: berth_core::userns::concatenate(&[(400000, 1000)]).unwrap(),
        };
        let path = ns.create("abc", Some(UserNs::New(map))).await.unwrap();
        let user = userns_file(&path);
        let net = std::fs::File::open(&path).unwrap();
        // NS_GET_USERNS: the user namespace that owns the network namespace.
        // SAFETY: an ioctl on an open namespace fd that returns a new fd or -1.
        let owner = unsafe { libc::ioctl(net.as_raw_fd(), 0xb701) };
        assert!(owner >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: the ioctl returned a new fd that nothing else owns.
        let owner = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(owner) };
        let owner_ino = nix::sys::stat::fstat(&owner).unwrap().st_ino;
        assert_eq!(owner_ino, nix::sys::stat::stat(&user).unwrap().st_ino);
        assert_ne!(
            owner_ino,
            nix::sys::stat::stat("/proc/self/ns/user").unwrap().st_ino
        );
        ns.remove(&path).unwrap();
        assert!(!path.exists() && !user.exists());
    }
}
