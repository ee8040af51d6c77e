//! Native exec: the shim starts an exec process inside a running container itself, the way
//! crun and conmon do, instead of running `runc exec` (two Go start-ups and a libseccomp
//! compile per exec, 20–40 ms).
//!
//! The shim forks a child that writes itself into every cgroup of the container's init process,
//! sets its oom score and joins the init's namespaces (mount, then user last); because a pid
//! namespace only applies to children, it forks again and exits. The grandchild — re-parented
//! to the shim, the subreaper — does what runc's `setns` init does, in the same order: a new
//! session and session keyring, the terminal (a pty opened in the container's `/dev/ptmx`, its
//! master sent back over a socket pair, its settings the kernel's defaults as runc leaves
//! them) or stdio, the working directory, `no_new_privs`, the capability bounding set, user
//! and groups, the other capability sets, the program lookup in `$PATH`, the container's
//! seccomp filter (compiled once by [`crate::seccomp`]) and `execve`. Everything is prepared
//! before the fork: between fork and exec the children make only raw system calls (no
//! allocation, no locks). Failures travel back as `(stage, errno)` over a close-on-exec pipe
//! whose EOF means the exec happened.
//!
//! [`plan`] says when native exec does not apply (the shim then runs `runtime exec`): an
//! AppArmor profile or SELinux label with that LSM enabled, no capabilities in the process,
//! a seccomp profile [`crate::seccomp`] cannot compile.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_core::caps::NAMES as CAPS;
use berth_core::{Error, Result};
use serde::Deserialize;
use tokio::io::AsyncReadExt;

use crate::reaper::{ExitFuture, Spawner};
use crate::runtime::ProcessStdio;
use crate::seccomp::Filter;

/// The OCI `process` fields native exec uses.
#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Process {
    #[serde(default)]
    terminal: bool,
    #[serde(default)]
    user: User,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<String>,
    #[serde(default)]
    cwd: String,
    capabilities: Option<Capabilities>,
    #[serde(default)]
    rlimits: Vec<Rlimit>,
    #[serde(default)]
    no_new_privileges: bool,
    #[serde(default)]
    apparmor_profile: String,
    #[serde(default)]
    selinux_label: String,
    oom_score_adj: Option<i32>,
    console_size: Option<ConsoleSize>,
}

#[derive(Debug, Deserialize, Default, Clone, Copy)]
struct ConsoleSize {
    #[serde(default)]
    height: u16,
    #[serde(default)]
    width: u16,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct User {
    #[serde(default)]
    uid: u32,
    #[serde(default)]
    gid: u32,
    #[serde(default)]
    additional_gids: Vec<u32>,
}

#[derive(Debug, Deserialize, Default)]
struct Capabilities {
    #[serde(default)]
    bounding: Vec<String>,
    #[serde(default)]
    effective: Vec<String>,
    #[serde(default)]
    inheritable: Vec<String>,
    #[serde(default)]
    permitted: Vec<String>,
    #[serde(default)]
    ambient: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Rlimit {
    #[serde(rename = "type")]
    kind: String,
    soft: u64,
    hard: u64,
}

/// The container-wide part of native exec, computed once per container from `config.json`.
#[derive(Debug)]
pub struct Container {
    /// The compiled `linux.seccomp`, if any.
    seccomp: Option<Arc<Filter>>,
    /// The container's own `process.oomScoreAdj` (runc applies it to exec processes).
    oom_score_adj: Option<i32>,
    /// Whether the session keyring is left alone (`noNewKeyring`; runc's annotation-less
    /// default is a new keyring per container).
    no_new_keyring: bool,
    /// The container process' capabilities, rlimits and AppArmor profile: runc uses them for
    /// an exec process that names none.
    capabilities: Option<Capabilities>,
    rlimits: Vec<Rlimit>,
    apparmor_profile: String,
}

impl Container {
    /// Reads the bundle's `config.json`. An error means: use the runtime for execs.
    pub fn load(bundle: &Path) -> Result<Self> {
        let path = bundle.join("config.json");
        let text = std::fs::read(&path)
            .map_err(|e| Error::internal(format!("read {}", path.display())).with_source(e))?;
        let spec: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Error::internal("parse config.json").with_source(e))?;
        let seccomp = match spec.pointer("/linux/seccomp") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let json = serde_json::to_vec(v).unwrap_or_default();
                Some(Arc::new(crate::seccomp::compile_json(&json)?))
            }
        };
        Ok(Self {
            seccomp,
            oom_score_adj: spec
                .pointer("/process/oomScoreAdj")
                .and_then(|v| v.as_i64())
                .map(|v| v as i32),
            no_new_keyring: spec
                .pointer("/process/noNewKeyring")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            capabilities: spec
                .pointer("/process/capabilities")
                .and_then(|v| serde_json::from_value(v.clone()).ok()),
            rlimits: spec
                .pointer("/process/rlimits")
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .unwrap_or_default(),
            apparmor_profile: spec
                .pointer("/process/apparmorProfile")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string(),
        })
    }
}

/// Whether an LSM named in `/sys/kernel/security/lsm` (or AppArmor's module) is enabled.
fn lsm_enabled(name: &str) -> bool {
    let listed = std::fs::read_to_string("/sys/kernel/security/lsm")
        .map(|l| l.split(',').any(|x| x.trim() == name))
        .unwrap_or(false);
    listed
        || (name == "apparmor"
            && std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
                .is_ok_and(|s| s.trim() == "Y"))
        || (name == "selinux" && Path::new("/sys/fs/selinux/enforce").exists())
}

/// A capability set as a bit mask; unknown names are ignored, as runc does.
fn cap_mask(names: &[String], last: u32) -> u64 {
    names
        .iter()
        .filter_map(|n| {
            let bare = n.strip_prefix("CAP_").unwrap_or(n);
            CAPS.iter().position(|c| *c == bare)
        })
        .filter(|&i| i as u32 <= last)
        .fold(0, |m, i| m | 1 << i)
}

fn rlimit_resource(kind: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match kind {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    })
}

fn cstring(s: impl AsRef<[u8]>) -> Result<CString> {
    CString::new(s.as_ref()).map_err(|_| Error::invalid_argument("exec spec: a string has a NUL"))
}

/// Everything the children need, prepared before the fork.
struct Plan {
    cgroup_procs: Vec<OwnedFd>,
    /// Namespace fds with their `CLONE_NEW*` type, in joining order.
    namespaces: Vec<(OwnedFd, libc::c_int)>,
    oom_score_adj: Option<CString>,
    keyring: Option<CString>,
    terminal: bool,
    /// The terminal's size, set before the program runs (as runc does).
    console_size: Option<libc::winsize>,
    cwd: CString,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    no_new_privs: bool,
    last_cap: u32,
    bounding: u64,
    effective: u64,
    permitted: u64,
    inheritable: u64,
    ambient: u64,
    seccomp: Option<Arc<Filter>>,
    /// Paths to try for `args[0]` (one when it contains a slash, else one per `$PATH` entry).
    candidates: Vec<CString>,
    /// Whether the name was searched in `$PATH` (for the error message).
    searched: bool,
    name: String,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

/// Why native exec does not apply to a process, or the plan for it.
fn plan(container: &Container, container_id: &str, init_pid: u32, spec: &[u8]) -> Result<Plan> {
    let p: Process = serde_json::from_slice(spec)
        .map_err(|e| Error::invalid_argument("exec spec").with_source(e))?;
    let fallback = |why: &str| Err(Error::failed_precondition(format!("native exec: {why}")));
    let apparmor = if p.apparmor_profile.is_empty() {
        &container.apparmor_profile
    } else {
        &p.apparmor_profile
    };
    if !apparmor.is_empty() && lsm_enabled("apparmor") {
        return fallback("an AppArmor profile");
    }
    if !p.selinux_label.is_empty() && lsm_enabled("selinux") {
        return fallback("an SELinux label");
    }
    let Some(caps) = p.capabilities.as_ref().or(container.capabilities.as_ref()) else {
        return fallback("no capabilities in the process or the container");
    };
    if p.args.is_empty() {
        return Err(Error::invalid_argument("exec spec: no args"));
    }
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);

    let mut env = p.env.clone();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", home(init_pid, p.user.uid)));
    }
    let path_var = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("");
    let name = p.args[0].clone();
    let searched = !name.contains('/');
    let candidates = if searched {
        path_var
            .split(':')
            .map(|d| if d.is_empty() { "." } else { d })
            .map(|d| cstring(format!("{d}/{name}")))
            .collect::<Result<Vec<_>>>()?
    } else {
        vec![cstring(&name)?]
    };

    let mut rlimits = Vec::new();
    let limits = if p.rlimits.is_empty() {
        &container.rlimits
    } else {
        &p.rlimits
    };
    for r in limits {
        let Some(res) = rlimit_resource(&r.kind) else {
            return Err(Error::invalid_argument(format!(
                "exec spec: unknown rlimit {}",
                r.kind
            )));
        };
        rlimits.push((
            res,
            libc::rlimit {
                rlim_cur: r.soft,
                rlim_max: r.hard,
            },
        ));
    }

    let oom = p.oom_score_adj.or(container.oom_score_adj);
    Ok(Plan {
        cgroup_procs: cgroup_procs(init_pid)?,
        namespaces: namespaces(init_pid)?,
        oom_score_adj: oom.map(|v| cstring(v.to_string())).transpose()?,
        keyring: (!container.no_new_keyring)
            .then(|| cstring(format!("_ses.{container_id}")))
            .transpose()?,
        terminal: p.terminal,
        console_size: p.console_size.map(|c| libc::winsize {
            ws_row: c.height,
            ws_col: c.width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }),
        cwd: cstring(if p.cwd.is_empty() { "/" } else { &p.cwd })?,
        uid: p.user.uid,
        gid: p.user.gid,
        groups: p.user.additional_gids.clone(),
        rlimits,
        no_new_privs: p.no_new_privileges,
        last_cap,
        bounding: cap_mask(&caps.bounding, last_cap),
        effective: cap_mask(&caps.effective, last_cap),
        permitted: cap_mask(&caps.permitted, last_cap),
        inheritable: cap_mask(&caps.inheritable, last_cap),
        ambient: cap_mask(&caps.ambient, last_cap),
        seccomp: container.seccomp.clone(),
        candidates,
        searched,
        name,
        argv: p.args.iter().map(cstring).collect::<Result<_>>()?,
        envp: env.iter().map(cstring).collect::<Result<_>>()?,
    })
}

/// The home directory of `uid` in the container's `/etc/passwd` (runc sets `HOME` from it when
/// the process has none), else `/`.
fn home(init_pid: u32, uid: u32) -> String {
    let passwd =
        std::fs::read_to_string(format!("/proc/{init_pid}/root/etc/passwd")).unwrap_or_default();
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 6 && f[2].parse() == Ok(uid))
        .map(|f| f[5].to_string())
        .unwrap_or_else(|| "/".into())
}

/// `cgroup.procs` of every hierarchy the init process is in (v1 controllers, named v1
/// hierarchies and the v2 unified one), opened for writing.
fn cgroup_procs(init_pid: u32) -> Result<Vec<OwnedFd>> {
    let read = |p: String| {
        std::fs::read_to_string(&p).map_err(|e| Error::internal(format!("read {p}")).with_source(e))
    };
    let cgroups = read(format!("/proc/{init_pid}/cgroup"))?;
    // The exec process starts in the shim's cgroups: where the init shares them (rootless
    // containers get no cgroup of their own) there is nothing to join, and no right to.
    let own = read("/proc/self/cgroup".into())?;
    let mountinfo = read("/proc/self/mountinfo".into())?;
    let mut fds = Vec::new();
    for line in cgroups.lines().filter(|l| !own.lines().any(|o| o == *l)) {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Some(dir) = cgroup_dir(&mountinfo, controllers, path) else {
            continue;
        };
        let procs = dir.join("cgroup.procs");
        let fd = nix::fcntl::open(
            &procs,
            nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| Error::internal(format!("open {}", procs.display())).with_source(e))?;
        fds.push(fd);
    }
    Ok(fds)
}

/// Where the cgroup `path` of a hierarchy with `controllers` ("" = v2) is mounted.
fn cgroup_dir(mountinfo: &str, controllers: &str, path: &str) -> Option<PathBuf> {
    for line in mountinfo.lines() {
        let (left, right) = line.split_once(" - ")?;
        let f: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if f.len() < 5 || r.len() < 3 {
            continue;
        }
        let (root, mountpoint, fstype, opts) = (f[3], f[4], r[0], r[2]);
        let matches = if controllers.is_empty() {
            fstype == "cgroup2"
        } else {
            fstype == "cgroup"
                && controllers
                    .split(',')
                    .all(|c| opts.split(',').any(|o| o == c))
        };
        if !matches {
            continue;
        }
        let rel = path.strip_prefix(root).unwrap_or(path);
        let dir = Path::new(mountpoint).join(rel.trim_start_matches('/'));
        if dir.is_dir() {
            return Some(dir);
        }
    }
    None
}

/// The init's namespaces that differ from the shim's, opened, in joining order.
fn namespaces(init_pid: u32) -> Result<Vec<(OwnedFd, libc::c_int)>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    // The user namespace last: the shim is root in the user namespace the container's was
    // made from, so it may join every namespace of the container whichever user namespace
    // owns it (one a container shares with the host, or the engine made outside it); inside
    // the container's user namespace it could only join those that namespace owns.
    for (name, kind) in [
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("net", libc::CLONE_NEWNET),
        ("pid", libc::CLONE_NEWPID),
        ("cgroup", libc::CLONE_NEWCGROUP),
        ("mnt", libc::CLONE_NEWNS),
        ("user", libc::CLONE_NEWUSER),
    ] {
        let theirs = format!("/proc/{init_pid}/ns/{name}");
        let Ok(meta) = std::fs::metadata(&theirs) else {
            continue;
        };
        let ours = std::fs::metadata(format!("/proc/self/ns/{name}")).ok();
        if ours.is_some_and(|o| o.ino() == meta.ino() && o.dev() == meta.dev()) {
            continue;
        }
        let fd = nix::fcntl::open(
            theirs.as_str(),
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| Error::internal(format!("open {theirs}")).with_source(e))?;
        out.push((fd, kind));
    }
    Ok(out)
}

/// Failure stages reported by the children.
#[repr(u8)]
#[derive(Clone, Copy)]
enum Stage {
    Cgroup = 1,
    OomScore,
    Setns,
    Fork,
    Setsid,
    Keyring,
    Terminal,
    Stdio,
    Rlimit,
    Chdir,
    NoNewPrivs,
    Seccomp,
    Bounding,
    Groups,
    Setgid,
    Setuid,
    Capset,
    Lookup,
    Exec,
}

const STAGES: [&str; 19] = [
    "join cgroup",
    "write oom_score_adj",
    "join namespace",
    "fork",
    "setsid",
    "join session keyring",
    "set up terminal",
    "set up stdio",
    "set rlimits",
    "chdir",
    "set no_new_privs",
    "load seccomp filter",
    "drop bounding capabilities",
    "setgroups",
    "setgid",
    "setuid",
    "capset",
    "look up the program",
    "exec",
];

/// What the shim learned from the children.
#[derive(Debug, Default)]
struct Report {
    pid: Option<u32>,
    error: Option<(u8, i32, u32)>,
}

fn parse_report(bytes: &[u8]) -> Report {
    let mut r = Report::default();
    let mut rest = bytes;
    while let Some((&tag, tail)) = rest.split_first() {
        match tag {
            b'P' if tail.len() >= 4 => {
                r.pid = Some(u32::from_le_bytes(tail[..4].try_into().unwrap()));
                rest = &tail[4..];
            }
            b'E' if tail.len() >= 9 => {
                let errno = i32::from_le_bytes(tail[1..5].try_into().unwrap());
                let extra = u32::from_le_bytes(tail[5..9].try_into().unwrap());
                r.error.get_or_insert((tail[0], errno, extra));
                rest = &tail[9..];
            }
            _ => break,
        }
    }
    r
}

/// The message for a failure, shaped like runc's so that callers (and users) see the same
/// errors with either path.
fn error_message(plan: &Plan, stage: u8, errno: i32) -> String {
    let err = std::io::Error::from_raw_os_error(errno);
    let why = strip_os_error(&err);
    let name = &plan.name;
    match stage {
        s if s == Stage::Lookup as u8 && plan.searched && errno == libc::ENOENT => format!(
            "exec failed: unable to start container process: exec: \"{name}\": executable file not found in $PATH"
        ),
        s if s == Stage::Lookup as u8 && errno == libc::ENOENT => format!(
            "exec failed: unable to start container process: exec: \"{name}\": stat {name}: {why}"
        ),
        s if s == Stage::Lookup as u8 || s == Stage::Exec as u8 => {
            format!("exec failed: unable to start container process: exec: \"{name}\": {why}")
        }
        s if s == Stage::Chdir as u8 => format!(
            "exec failed: unable to start container process: chdir to cwd (\"{}\") set in config.json failed: {why}",
            plan.cwd.to_string_lossy()
        ),
        s => {
            let what = STAGES
                .get(s as usize - 1)
                .copied()
                .unwrap_or("start the process");
            format!("exec failed: unable to start container process: {what}: {why}")
        }
    }
}

/// `No such file or directory (os error 2)` → `no such file or directory`, as Go prints it.
fn strip_os_error(err: &std::io::Error) -> String {
    let s = err.to_string();
    let s = s.split(" (os error").next().unwrap_or(&s);
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_lowercase().chain(c).collect())
        .unwrap_or_default()
}

/// A started exec process.
#[derive(Debug)]
pub struct Started {
    /// Its host pid.
    pub pid: u32,
    /// Its exit.
    pub exit: ExitFuture,
    /// The pty master, with a terminal.
    pub master: Option<OwnedFd>,
}

/// Native exec for one container.
#[derive(Debug)]
pub struct NativeExec {
    container: Container,
    id: String,
    runtime_name: String,
}

impl NativeExec {
    /// Native exec into container `id` (whose `config.json` gave `container`); errors name
    /// `runtime_name` like the runtime's own would.
    pub fn new(container: Container, id: &str, runtime_name: &str) -> Self {
        Self {
            container,
            id: id.to_string(),
            runtime_name: runtime_name.to_string(),
        }
    }

    /// Whether this process can be started natively (an error says why not).
    pub fn check(&self, init_pid: u32, spec: &[u8]) -> Result<()> {
        plan(&self.container, &self.id, init_pid, spec).map(drop)
    }

    /// Starts the process described by the OCI `process` JSON `spec` in the container whose
    /// init is `init_pid`, with `stdio` (ignored with a terminal). Returns once it has
    /// `execve`d (or failed), like `runc exec --detach`.
    pub async fn start(
        &self,
        spawner: &dyn Spawner,
        init_pid: u32,
        spec: &[u8],
        stdio: ProcessStdio,
        timeout: Duration,
    ) -> Result<Started> {
        let plan = plan(&self.container, &self.id, init_pid, spec)?;
        let fail = |m: String| {
            Error::new(
                berth_core::ErrorKind::Internal,
                format!("{} exec: {m}", self.runtime_name),
            )
        };
        let (status_r, status_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::internal("create pipe").with_source(e))?;
        let (sock_parent, sock_child) = if plan.terminal {
            let (a, b) = nix::sys::socket::socketpair(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::Stream,
                None,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            )
            .map_err(|e| Error::internal("create socket pair").with_source(e))?;
            (Some(a), Some(b))
        } else {
            (None, None)
        };
        let devnull = nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| Error::internal("open /dev/null").with_source(e))?;
        let fd_or_null =
            |fd: &Option<OwnedFd>| fd.as_ref().map_or(devnull.as_raw_fd(), |f| f.as_raw_fd());
        let stdio_fds = [
            fd_or_null(&stdio.stdin),
            fd_or_null(&stdio.stdout),
            fd_or_null(&stdio.stderr),
        ];
        let child = ChildArgs::new(
            &plan,
            status_w.as_raw_fd(),
            sock_child.as_ref().map(|s| s.as_raw_fd()),
            stdio_fds,
        );

        // SAFETY: the child only runs `child_main`, which makes raw system calls on memory
        // prepared above and never returns.
        let pid1 = unsafe { libc::fork() };
        if pid1 < 0 {
            return Err(Error::internal("fork").with_source(std::io::Error::last_os_error()));
        }
        if pid1 == 0 {
            // SAFETY: in the forked child; see child_main.
            unsafe { child_main(&child) }
        }
        let first = spawner.watch(pid1 as u32);
        drop(child);
        drop(status_w);
        drop(sock_child);
        drop(stdio);

        let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(status_r)
            .map_err(|e| Error::internal("register pipe").with_source(e))?;
        let mut bytes = Vec::new();
        let read = async {
            let _ = rx.read_to_end(&mut bytes).await;
            let _ = first.await;
        };
        if tokio::time::timeout(timeout, read).await.is_err() {
            // SAFETY: signalling our unreaped child.
            unsafe { libc::kill(pid1, libc::SIGKILL) };
            return Err(Error::new(
                berth_core::ErrorKind::DeadlineExceeded,
                format!("native exec did not finish within {timeout:?}"),
            ));
        }
        let report = parse_report(&bytes);
        let exit = report.pid.map(|p| spawner.watch(p));
        if let Some((stage, errno, _)) = report.error {
            // The grandchild (if any) exits by itself; its exit is collected and dropped.
            drop(exit);
            return Err(fail(error_message(&plan, stage, errno)));
        }
        let (Some(pid), Some(exit)) = (report.pid, exit) else {
            return Err(fail(
                "exec failed: the process vanished before it started".into(),
            ));
        };
        let master = match sock_parent {
            Some(sock) => Some(
                crate::console::recv_fd_now(&sock)
                    .map_err(|e| fail(format!("receive the terminal: {e}")))?,
            ),
            None => None,
        };
        Ok(Started { pid, exit, master })
    }
}

/// Raw pointers and numbers the children use (no allocation after fork).
struct ChildArgs<'a> {
    plan: &'a Plan,
    status: RawFd,
    sock: Option<RawFd>,
    stdio: [RawFd; 3],
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl<'a> ChildArgs<'a> {
    fn new(plan: &'a Plan, status: RawFd, sock: Option<RawFd>, stdio: [RawFd; 3]) -> Self {
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        Self {
            plan,
            status,
            sock,
            stdio,
            argv: ptrs(&plan.argv),
            envp: ptrs(&plan.envp),
        }
    }
}

fn errno() -> i32 {
    // SAFETY: reads this thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Reports a failure and exits. Async-signal-safe.
fn die(status: RawFd, stage: Stage, err: i32) -> ! {
    let mut msg = [0u8; 10];
    msg[0] = b'E';
    msg[1] = stage as u8;
    msg[2..6].copy_from_slice(&err.to_le_bytes());
    // SAFETY: writing a stack buffer to a pipe, then exiting without running any Rust code.
    unsafe {
        libc::write(status, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// The first child: joins cgroups and namespaces, forks the process and exits.
///
/// # Safety
/// Only in a freshly forked child.
unsafe fn child_main(a: &ChildArgs<'_>) -> ! {
    let p = a.plan;
    // SAFETY: raw system calls on fds and buffers prepared before the fork.
    unsafe {
        for fd in &p.cgroup_procs {
            if libc::write(fd.as_raw_fd(), c"0".as_ptr().cast(), 1) < 0 {
                die(a.status, Stage::Cgroup, errno());
            }
        }
        if let Some(adj) = &p.oom_score_adj {
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd < 0 || libc::write(fd, adj.as_ptr().cast(), adj.as_bytes().len()) < 0 {
                die(a.status, Stage::OomScore, errno());
            }
            libc::close(fd);
        }
        for (fd, kind) in &p.namespaces {
            if libc::setns(fd.as_raw_fd(), *kind) < 0 {
                die(a.status, Stage::Setns, errno());
            }
        }
        let pid = libc::fork();
        if pid < 0 {
            die(a.status, Stage::Fork, errno());
        }
        if pid == 0 {
            process_main(a);
        }
        let mut msg = [0u8; 5];
        msg[0] = b'P';
        msg[1..].copy_from_slice(&(pid as u32).to_le_bytes());
        libc::write(a.status, msg.as_ptr().cast(), msg.len());
        libc::_exit(0)
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The exec process, inside the container's namespaces: runc's `setns` init, then execve.
///
/// # Safety
/// Only in the second forked child.
unsafe fn process_main(a: &ChildArgs<'_>) -> ! {
    let p = a.plan;
    let st = a.status;
    // SAFETY: raw system calls on memory prepared before the fork.
    unsafe {
        if libc::setsid() < 0 {
            die(st, Stage::Setsid, errno());
        }
        if let Some(name) = &p.keyring {
            // KEYCTL_JOIN_SESSION_KEYRING; ENOSYS (no keyrings) is fine, as for runc.
            if libc::syscall(libc::SYS_keyctl, 1, name.as_ptr()) < 0 && errno() != libc::ENOSYS {
                die(st, Stage::Keyring, errno());
            }
        }
        if let Some(sock) = a.sock {
            setup_terminal(st, sock, p.console_size.as_ref());
        } else {
            for (i, fd) in a.stdio.iter().enumerate() {
                if libc::dup2(*fd, i as i32) < 0 {
                    die(st, Stage::Stdio, errno());
                }
            }
        }
        for (res, lim) in &p.rlimits {
            if libc::setrlimit(*res, lim) < 0 {
                die(st, Stage::Rlimit, errno());
            }
        }
        // Like runc: chdir as root first; a permission error is retried as the user.
        let mut chdir_later = false;
        if libc::chdir(p.cwd.as_ptr()) < 0 {
            if errno() != libc::EACCES {
                die(st, Stage::Chdir, errno());
            }
            chdir_later = true;
        }
        if p.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
            die(st, Stage::NoNewPrivs, errno());
        }
        if let Some(f) = &p.seccomp
            && !p.no_new_privs
            && let Err(e) = crate::seccomp::install(f)
        {
            die(st, Stage::Seccomp, e);
        }
        for cap in 0..=p.last_cap {
            if p.bounding & (1 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0
                && errno() != libc::EINVAL
            {
                die(st, Stage::Bounding, errno());
            }
        }
        libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0);
        if libc::setgroups(p.groups.len(), p.groups.as_ptr()) < 0 {
            die(st, Stage::Groups, errno());
        }
        if libc::syscall(libc::SYS_setgid, p.gid) < 0 {
            die(st, Stage::Setgid, errno());
        }
        if libc::syscall(libc::SYS_setuid, p.uid) < 0 {
            die(st, Stage::Setuid, errno());
        }
        if chdir_later && libc::chdir(p.cwd.as_ptr()) < 0 {
            die(st, Stage::Chdir, errno());
        }
        libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0);
        let mut hdr = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let half = |m: u64, i: usize| (m >> (32 * i)) as u32;
        let data = [0, 1].map(|i| CapData {
            effective: half(p.effective, i),
            permitted: half(p.permitted, i),
            inheritable: half(p.inheritable, i),
        });
        if libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) < 0 {
            die(st, Stage::Capset, errno());
        }
        for cap in 0..=p.last_cap {
            let op = if p.ambient & (1 << cap) != 0 {
                libc::PR_CAP_AMBIENT_RAISE
            } else {
                libc::PR_CAP_AMBIENT_LOWER
            };
            if libc::prctl(libc::PR_CAP_AMBIENT, op, cap as libc::c_ulong, 0, 0) < 0
                && errno() != libc::EINVAL
            {
                die(st, Stage::Capset, errno());
            }
        }
        let path = lookup(st, p);
        // Nothing but 0–2 (and the close-on-exec status pipe) may reach the program.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        if let Some(f) = &p.seccomp
            && p.no_new_privs
            && let Err(e) = crate::seccomp::install(f)
        {
            die(st, Stage::Seccomp, e);
        }
        libc::execve(path, a.argv.as_ptr(), a.envp.as_ptr());
        die(st, Stage::Exec, errno())
    }
}

/// Go's `exec.LookPath` as runc uses it: the first candidate that is a regular file with an
/// execute bit.
unsafe fn lookup(st: RawFd, p: &Plan) -> *const libc::c_char {
    let mut last = libc::ENOENT;
    for c in &p.candidates {
        // SAFETY: stat into a zeroed stack buffer.
        let mut s: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: stat of a NUL-terminated path into a buffer we own.
        if unsafe { libc::stat(c.as_ptr(), &mut s) } < 0 {
            continue;
        }
        if s.st_mode & libc::S_IFMT == libc::S_IFDIR {
            last = libc::EISDIR;
            if !p.searched {
                break;
            }
            continue;
        }
        if s.st_mode & 0o111 != 0 {
            return c.as_ptr();
        }
        last = libc::EACCES;
        if !p.searched {
            break;
        }
    }
    let last = if p.searched { libc::ENOENT } else { last };
    die(st, Stage::Lookup, last)
}

/// Opens a pty in the container's `/dev/ptmx`, sends the master to the shim, makes the slave
/// the controlling terminal and stdio.
unsafe fn setup_terminal(st: RawFd, sock: RawFd, size: Option<&libc::winsize>) {
    // SAFETY: raw system calls on stack buffers.
    unsafe {
        let master = libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if master < 0 {
            die(st, Stage::Terminal, errno());
        }
        let unlock: libc::c_int = 0;
        if libc::ioctl(master, libc::TIOCSPTLCK, &unlock) < 0 {
            die(st, Stage::Terminal, errno());
        }
        // The kernel's default terminal settings are left as they are, as runc leaves them
        // (`onlcr` included: output lines end in "\r\n", as `docker exec -t` shows them).
        if let Some(ws) = size {
            libc::ioctl(master, libc::TIOCSWINSZ, ws as *const libc::winsize);
        }
        let slave = libc::ioctl(master, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY);
        if slave < 0 {
            die(st, Stage::Terminal, errno());
        }
        if crate::console::send_fd_raw(sock, master) < 0 {
            die(st, Stage::Terminal, errno());
        }
        libc::close(master);
        for i in 0..3 {
            if libc::dup2(slave, i) < 0 {
                die(st, Stage::Terminal, errno());
            }
        }
        if slave > 2 {
            libc::close(slave);
        }
        if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            die(st, Stage::Terminal, errno());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_parse_and_errors_read_like_runc() {
        let mut bytes = vec![b'P'];
        bytes.extend(42u32.to_le_bytes());
        bytes.extend([b'E', Stage::Lookup as u8]);
        bytes.extend(libc::ENOENT.to_le_bytes());
        bytes.extend(0u32.to_le_bytes());
        let r = parse_report(&bytes);
        assert_eq!(r.pid, Some(42));
        assert_eq!(r.error, Some((Stage::Lookup as u8, libc::ENOENT, 0)));
        let c = Container {
            seccomp: None,
            oom_score_adj: None,
            no_new_keyring: false,
            capabilities: None,
            rlimits: Vec::new(),
            apparmor_profile: String::new(),
        };
        let spec = br#"{"args":["nope"],"env":["PATH=/usr/bin:/bin"],"cwd":"/","capabilities":{}}"#;
        let p = plan(&c, "c1", std::process::id(), spec).unwrap();
        assert_eq!(
            error_message(&p, Stage::Lookup as u8, libc::ENOENT),
            "exec failed: unable to start container process: exec: \"nope\": executable file not found in $PATH"
        );
        assert_eq!(p.candidates.len(), 2);
        let spec = br#"{"args":["/nope"],"cwd":"/x","capabilities":{}}"#;
        let p = plan(&c, "c1", std::process::id(), spec).unwrap();
        assert_eq!(
            error_message(&p, Stage::Lookup as u8, libc::ENOENT),
            "exec failed: unable to start container process: exec: \"/nope\": stat /nope: no such file or directory"
        );
        assert_eq!(
            error_message(&p, Stage::Chdir as u8, libc::ENOENT),
            "exec failed: unable to start container process: chdir to cwd (\"/x\") set in config.json failed: no such file or directory"
        );
        // Without capabilities in the spec, the runtime does it.
        assert!(plan(&c, "c1", std::process::id(), br#"{"args":["x"]}"#).is_err());
    }

    #[test]
    fn capability_names_map_to_bits() {
        let names = ["CAP_CHOWN", "CAP_KILL", "CAP_BPF", "CAP_NOPE"].map(String::from);
        assert_eq!(cap_mask(&names, 40), 1 | 1 << 5 | 1 << 39);
        assert_eq!(cap_mask(&names, 38), 1 | 1 << 5);
    }

    #[test]
    fn cgroup_dirs_resolve_hybrid_mounts() {
        let mi = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup_dir(mi, "cpu,cpuacct", "/"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")).filter(|p| p.is_dir())
        );
        assert_eq!(cgroup_dir(mi, "memory", "/"), None);
    }
}
