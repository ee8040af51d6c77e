//! `berth up --rootless`: the user, mount and network namespaces an ordinary user's stack runs
//! in, set up from Rust with shadow's `newuidmap`/`newgidmap` and `slirp4netns`.
//!
//! A holder process (`berth rootless-ns`, detached from `berth up`, it only pauses) owns the
//! namespaces, as Podman's pause process does, so they outlive `berth up` and every service:
//! a restarted `berth up` joins them again and finds its containers. The user namespace maps
//! root to the user and 1..=N to the user's subordinate ids; the mount namespace is where
//! overlays, bind mounts and the network namespace's bind mount live; the network namespace
//! holds the bridges, reached from outside through slirp4netns (tap0, 10.0.2.100/24).
//!
//! `berth up` itself joins only the user and mount namespaces: the snapshotter, the images
//! service (pulls from the host's loopback registry work as they do rootful) and the gateway
//! stay in the host's network namespace; the engine (hence the shims and `--network host`) is
//! started in the stack's one, and berth-network moves itself there after opening the thread
//! that publishes ports on the host.
//!
//! When the holder is gone (killed) but something still lives in the namespaces (a shim), a new
//! holder joins them through that process; when nothing does, fresh namespaces are made.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use berth_core::userns::subordinate_ranges;
use berth_core::{Config, Error, Result};
use nix::sched::{CloneFlags, setns, unshare};

/// How long the holder and slirp4netns get to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The namespaces the holder owns, in the order they are joined.
const KINDS: [&str; 3] = ["user", "mnt", "net"];

/// The stack's namespaces, joined.
pub struct Namespaces {
    /// The holder's PID.
    pub holder: i32,
}

/// Makes (or finds) the namespaces, starts slirp4netns for them, joins this process to the
/// user and mount namespaces and bind-mounts the network namespace at
/// [`Config::rootless_netns`]. Must run while the process has a single thread.
pub fn enter(cfg: &Config) -> Result<Namespaces> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Err(Error::invalid_argument(
            "rootless mode is for an ordinary user: run `berth up` as that user (root runs the \
             rootful stack; `userns_remap` maps containers' root for it)",
        ));
    }
    let dir = cfg.state_dir.join("rootless");
    std::fs::create_dir_all(&dir).map_err(|e| io_error(e, format!("create {}", dir.display())))?;
    let holder = find_or_make_holder(&dir)?;
    let ids = ns_ids(holder)?;
    ensure_slirp(&dir, holder, ids[2])?;
    for kind in ["user", "mnt"] {
        let ns = open_ns(holder, kind)?;
        let flag = if kind == "user" {
            CloneFlags::CLONE_NEWUSER
        } else {
            CloneFlags::CLONE_NEWNS
        };
        setns(&ns, flag).map_err(|e| nix_error(e, format!("join the stack's {kind} namespace")))?;
    }
    std::env::set_current_dir("/").map_err(|e| io_error(e, "chdir /"))?;
    expose_state_dir(&cfg.state_dir)?;
    check_searchable(&cfg.root)?;
    bind_netns(holder, ids[2], &cfg.rootless_netns())?;
    Ok(Namespaces { holder })
}

/// The holder found alive, or a new one (joining the namespaces through a survivor, or fresh).
fn find_or_make_holder(dir: &Path) -> Result<i32> {
    let pid_file = dir.join("holder.pid");
    let saved = std::fs::read_to_string(dir.join("ns")).ok();
    let saved: Option<Vec<u64>> =
        saved.and_then(|s| s.split_whitespace().map(|v| v.parse().ok()).collect());
    if let (Some(pid), Some(want)) = (berth_core::daemon::read_pid_file(&pid_file), &saved)
        && ns_ids(pid).is_ok_and(|ids| ids[..] == want[..])
    {
        return Ok(pid);
    }
    let survivor = saved.as_ref().and_then(|want| find_member(want));
    let holder = spawn_holder(survivor)?;
    let ids = ns_ids(holder)?;
    let text = ids.map(|i| i.to_string()).join(" ");
    write_atomic(&dir.join("ns"), &text)?;
    write_atomic(&pid_file, &holder.to_string())?;
    match survivor {
        Some(pid) => tracing::info!(holder, through = pid, "rootless namespaces rejoined"),
        None => tracing::info!(holder, "rootless namespaces made"),
    }
    Ok(holder)
}

/// A process of this user that is in all of the namespaces `want` names.
fn find_member(want: &[u64]) -> Option<i32> {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == uid))
        .find(|pid| ns_ids(*pid).is_ok_and(|ids| ids == want))
}

/// The inode numbers of `pid`'s user, mount and network namespaces.
fn ns_ids(pid: i32) -> Result<[u64; 3]> {
    let mut out = [0; 3];
    for (slot, kind) in out.iter_mut().zip(KINDS) {
        let path = format!("/proc/{pid}/ns/{kind}");
        *slot = std::fs::metadata(&path)
            .map_err(|e| io_error(e, format!("stat {path}")))?
            .ino();
    }
    Ok(out)
}

fn open_ns(pid: i32, kind: &str) -> Result<File> {
    let path = format!("/proc/{pid}/ns/{kind}");
    File::open(&path).map_err(|e| io_error(e, format!("open {path}")))
}

/// Starts `berth rootless-ns` detached and waits until it has its namespaces (mapped through
/// newuidmap/newgidmap when fresh).
fn spawn_holder(join: Option<i32>) -> Result<i32> {
    let exe = std::env::current_exe().map_err(|e| io_error(e, "find the berth binary"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("rootless-ns");
    if let Some(pid) = join {
        cmd.arg("--join").arg(pid.to_string());
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe; the holder must not share `berth up`'s session.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| io_error(e, "start the namespace holder"))?;
    let pid = child.id() as i32;
    let mut stdin = child.stdin.take().expect("piped");
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut stderr = child.stderr.take().expect("piped");
    let fail = |child: &mut std::process::Child, stderr: &mut std::process::ChildStderr, what| {
        let _ = child.kill();
        let _ = child.wait();
        let mut msg = String::new();
        let _ = stderr.read_to_string(&mut msg);
        Error::unavailable(format!("rootless namespace holder: {what}: {}", msg.trim()))
    };
    if join.is_none() {
        if !matches!(lines.next(), Some(Ok(l)) if l == "unshared") {
            return Err(fail(&mut child, &mut stderr, "did not unshare"));
        }
        if let Err(err) = map_ids(pid) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(err);
        }
        let _ = stdin.write_all(b"mapped\n");
    }
    drop(stdin);
    if !matches!(lines.next(), Some(Ok(l)) if l == "ready") {
        return Err(fail(&mut child, &mut stderr, "did not get ready"));
    }
    // The holder is not waited for: it outlives `berth up` (init reaps it).
    std::mem::forget(child);
    Ok(pid)
}

/// Writes the holder's uid and gid maps: 0 is the user, 1.. the subordinate ranges in order.
fn map_ids(pid: i32) -> Result<()> {
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let user = nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_default();
    let group = nix::unistd::Group::from_gid(gid.into())
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_default();
    for (tool, file, name, id) in [
        ("newuidmap", "/etc/subuid", &user, uid),
        ("newgidmap", "/etc/subgid", &group, gid),
    ] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let mut ranges = subordinate_ranges(&text, name, Some(id));
        if ranges.is_empty() && file == "/etc/subgid" {
            // shadow's useradd keys subgid lines by the user's name too.
            ranges = subordinate_ranges(&text, &user, Some(id));
        }
        if ranges.is_empty() {
            return Err(Error::failed_precondition(format!(
                "rootless: {file} has no range for {name} ({id}); add a line such as \
                 \"{name}:100000:65536\" (docs/rootless.md)"
            )));
        }
        let status = Command::new(tool)
            .arg(pid.to_string())
            .args(map_args(id, &ranges))
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| {
                io_error(
                    e,
                    format!("run {tool} (Debian's uidmap package provides it)"),
                )
            })?;
        if !status.status.success() {
            return Err(Error::failed_precondition(format!(
                "rootless: {tool} failed: {}",
                String::from_utf8_lossy(&status.stderr).trim()
            )));
        }
    }
    Ok(())
}

/// `inside outside count` triples for newuidmap: 0 -> `id`, then each range after the other.
fn map_args(id: u32, ranges: &[(u32, u32)]) -> Vec<String> {
    let mut out = vec!["0".to_string(), id.to_string(), "1".to_string()];
    let mut next = 1u64;
    for (start, count) in ranges {
        out.extend([next.to_string(), start.to_string(), count.to_string()]);
        next += u64::from(*count);
    }
    out
}

/// The holder's side (`berth rootless-ns`): unshare (or join `join`'s namespaces), wait for the
/// maps, bring up loopback, say ready, and pause until killed.
pub fn hold(join: Option<i32>) -> std::process::ExitCode {
    match hold_inner(join) {
        Ok(()) => {
            loop {
                // SAFETY: pause has no preconditions.
                unsafe { libc::pause() };
            }
        }
        Err(err) => {
            eprintln!("{}", err.chain());
            std::process::ExitCode::from(1)
        }
    }
}

fn hold_inner(join: Option<i32>) -> Result<()> {
    let mut out = std::io::stdout();
    match join {
        Some(pid) => {
            let flags = [
                CloneFlags::CLONE_NEWUSER,
                CloneFlags::CLONE_NEWNS,
                CloneFlags::CLONE_NEWNET,
            ];
            let files: Vec<File> = KINDS
                .iter()
                .map(|k| open_ns(pid, k))
                .collect::<Result<_>>()?;
            for ((file, flag), kind) in files.iter().zip(flags).zip(KINDS) {
                setns(file, flag).map_err(|e| nix_error(e, format!("join {kind} of {pid}")))?;
            }
        }
        None => {
            unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET)
                .map_err(|e| nix_error(e, "unshare user, mount and network namespaces"))?;
            writeln!(out, "unshared").and_then(|_| out.flush()).ok();
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .map_err(|e| io_error(e, "wait for the id maps"))?;
            if line.trim() != "mapped" {
                return Err(Error::unavailable("the id maps were not written"));
            }
            loopback_up()?;
        }
    }
    writeln!(out, "ready").and_then(|_| out.flush()).ok();
    // Nothing to say from here on: stdio goes to /dev/null, so `berth up` may go away.
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors of this process.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    Ok(())
}

/// `ip link set lo up`, through the SIOCSIFFLAGS ioctl.
fn loopback_up() -> Result<()> {
    // SAFETY: a plain socket; closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io_error(std::io::Error::last_os_error(), "socket"));
    }
    // SAFETY: fd was just returned by socket.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `req`, which outlives the calls.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io_error(std::io::Error::last_os_error(), "get lo flags"));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io_error(std::io::Error::last_os_error(), "bring lo up"));
        }
    }
    Ok(())
}

/// Starts slirp4netns for the holder's network namespace unless one already serves it.
fn ensure_slirp(dir: &Path, holder: i32, netns: u64) -> Result<()> {
    let pid_file = dir.join("slirp4netns.pid");
    if let Ok(text) = std::fs::read_to_string(&pid_file) {
        let mut parts = text.split_whitespace();
        let pid: Option<i32> = parts.next().and_then(|p| p.parse().ok());
        let served: Option<u64> = parts.next().and_then(|p| p.parse().ok());
        if let Some(pid) = pid
            && is_slirp(pid)
        {
            if served == Some(netns) {
                return Ok(());
            }
            // Ours, for namespaces that are gone.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    let log_path = dir.join("slirp4netns.log");
    let log = File::create(&log_path)
        .map_err(|e| io_error(e, format!("create {}", log_path.display())))?;
    let (ready_r, ready_w) = nix::unistd::pipe().map_err(|e| nix_error(e, "pipe"))?;
    let ready_w_fd = ready_w.as_raw_fd();
    let mut cmd = Command::new("slirp4netns");
    cmd.args([
        "--configure",
        "--mtu=65520",
        // Containers must not reach the host's loopback services through 10.0.2.2.
        "--disable-host-loopback",
        "--enable-seccomp",
        "--ready-fd=3",
    ])
    .arg(holder.to_string())
    .arg("tap0")
    .stdin(Stdio::null())
    .stdout(log.try_clone().map_err(|e| io_error(e, "dup log"))?)
    .stderr(log);
    // SAFETY: setsid and dup2 are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if libc::dup2(ready_w_fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        io_error(
            e,
            "start slirp4netns (Debian's slirp4netns package provides it)",
        )
    })?;
    drop(ready_w);
    let pid = child.id() as i32;
    std::mem::forget(child);
    let mut ready = File::from(ready_r);
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut byte = [0u8; 1];
    // slirp4netns writes "1" once tap0 is configured; EOF means it exited.
    let ok = loop {
        match ready.read(&mut byte) {
            Ok(1) => break true,
            Ok(_) => break false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break false,
        }
    };
    if !ok || Instant::now() > deadline {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let hint = if log.contains("/dev/net/tun") {
            " (slirp4netns needs /dev/net/tun usable by this user: mode 0666, as Debian's udev \
             rules make it)"
        } else {
            ""
        };
        return Err(Error::unavailable(format!(
            "rootless: slirp4netns failed{hint}: {}",
            log.trim()
        )));
    }
    write_atomic(&pid_file, &format!("{pid} {netns}"))?;
    Ok(())
}

/// While `berth up` runs: a slirp4netns that died (killed, crashed) is started again for the
/// stack's network namespace, so containers regain their way out.
pub async fn keep_slirp(cfg: Config) {
    let dir = cfg.state_dir.join("rootless");
    let mut last_error = String::new();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let dir = dir.clone();
        let restarted = tokio::task::spawn_blocking(move || -> Result<bool> {
            let pid: Option<i32> = std::fs::read_to_string(dir.join("slirp4netns.pid"))
                .ok()
                .and_then(|t| t.split_whitespace().next()?.parse().ok());
            if let Some(pid) = pid {
                // When this `berth up` started it, it is our child: reap it if it died.
                let _ = nix::sys::wait::waitpid(
                    nix::unistd::Pid::from_raw(pid),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
            }
            let alive = pid.is_some_and(is_slirp);
            if alive {
                return Ok(false);
            }
            let holder = berth_core::daemon::read_pid_file(&dir.join("holder.pid"))
                .ok_or_else(|| Error::unavailable("no namespace holder"))?;
            let ids = ns_ids(holder)?;
            ensure_slirp(&dir, holder, ids[2])?;
            Ok(true)
        })
        .await;
        match restarted {
            Ok(Ok(true)) => tracing::warn!("slirp4netns was gone; started it again"),
            Ok(Ok(false)) => last_error.clear(),
            Ok(Err(err)) if err.chain() != last_error => {
                last_error = err.chain();
                tracing::error!(error = %last_error, "cannot restart slirp4netns");
            }
            _ => {}
        }
    }
}

/// `pid` is a live (not zombie) slirp4netns.
fn is_slirp(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.split_once(" (")
        .and_then(|(_, rest)| rest.rsplit_once(") "))
        .is_some_and(|(comm, state)| comm == "slirp4netns" && !state.starts_with('Z'))
}

/// Bind-mounts the holder's network namespace at `path` (in the stack's mount namespace, which
/// this process has joined) unless it is already there.
fn bind_netns(holder: i32, netns: u64, path: &Path) -> Result<()> {
    if std::fs::metadata(path).is_ok_and(|m| m.ino() == netns) {
        return Ok(());
    }
    // A stale bind (namespaces made afresh) goes first.
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    File::create(path).map_err(|e| io_error(e, format!("create {}", path.display())))?;
    let source = PathBuf::from(format!("/proc/{holder}/ns/net"));
    nix::mount::mount(
        Some(&source),
        path,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| {
        nix_error(
            e,
            format!("bind the network namespace at {}", path.display()),
        )
    })
}

/// Containers' root is a subordinate uid, and the runtime binds their rootfs (in the state
/// directory) from inside their user namespace, so every directory above it must be searchable
/// by others. `$XDG_RUNTIME_DIR` is 0700 (logind makes it so): inside the stack's mount
/// namespace a tmpfs (0711) covers it, holding only a bind mount of the real state directory —
/// the sockets stay where the user's clients find them, the host's modes are untouched.
fn expose_state_dir(state_dir: &Path) -> Result<()> {
    let (Some(parent), Some(name)) = (state_dir.parent(), state_dir.file_name()) else {
        return Ok(());
    };
    let marker = parent.join(".berth-rootless");
    let searchable = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.mode() & 0o001 != 0);
    if marker.exists() || searchable(parent) {
        return set_mode(state_dir, 0o711);
    }
    set_mode(state_dir, 0o711)?;
    let real =
        File::open(state_dir).map_err(|e| io_error(e, format!("open {}", state_dir.display())))?;
    let real_path = PathBuf::from(format!("/proc/self/fd/{}", real.as_raw_fd()));
    nix::mount::mount(
        Some("tmpfs"),
        parent,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some("mode=0711,size=1m"),
    )
    .map_err(|e| nix_error(e, format!("mount a tmpfs over {}", parent.display())))?;
    let inner = parent.join(name);
    std::fs::create_dir(&inner).map_err(|e| io_error(e, format!("create {}", inner.display())))?;
    nix::mount::mount(
        Some(&real_path),
        &inner,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| {
        nix_error(
            e,
            format!("bind {} into the stack's view", state_dir.display()),
        )
    })?;
    File::create(&marker).map_err(|e| io_error(e, format!("create {}", marker.display())))?;
    Ok(())
}

/// The data root's ancestors must be searchable by containers' root too (volumes and the
/// containers' files are bound from there): refused with what to change otherwise.
fn check_searchable(root: &Path) -> Result<()> {
    for dir in root.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        if meta.mode() & 0o001 == 0 {
            return Err(Error::failed_precondition(format!(
                "rootless: {} (mode {:o}) is not searchable by others; containers' root is a \
                 subordinate uid and must reach {}: `chmod o+x {}`, or set `root` in \
                 ~/.config/berth/berth.toml to a directory whose parents are (docs/rootless.md)",
                dir.display(),
                meta.mode() & 0o7777,
                root.display(),
                dir.display()
            )));
        }
    }
    Ok(())
}

fn set_mode(dir: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| io_error(e, format!("create {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_error(e, format!("chmod {}", dir.display())))
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{text}\n"))
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| io_error(e, format!("write {}", path.display())))
}

fn io_error(e: std::io::Error, what: impl Into<String>) -> Error {
    Error::internal(what).with_source(e)
}

fn nix_error(e: nix::Error, what: impl Into<String>) -> Error {
    io_error(std::io::Error::from(e), what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_put_root_on_the_user_and_ranges_after_each_other() {
        let ranges = [(100000, 65536), (300000, 10)];
        assert_eq!(
            map_args(1000, &ranges).join(" "),
            "0 1000 1 1 100000 65536 65537 300000 10"
        );
    }
}
