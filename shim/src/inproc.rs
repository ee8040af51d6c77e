//! The in-process OCI runtime: [`Libcontainer`] runs containers with youki's `libcontainer`
//! inside the shim, so no runtime binary (and no Go runtime start-up) is on the start path.
//!
//! Its state lives in the same `--root` layout runc uses (`<root>/<id>/state.json`, youki's
//! format), so a restarted shim, or `berth-shim delete` after a shim died, finds the container.
//!
//! Create and exec run in a forked copy of the shim ([`forked`]), not in the shim itself:
//! libcontainer starts its processes with the raw `clone3` system call, which skips glibc's fork
//! handlers, so a clone taken while another shim thread (the log writer) holds the malloc lock
//! would leave the child deadlocked on its first allocation. glibc's `fork` takes those locks
//! first; the forked copy is single-threaded and clones safely. It also keeps libcontainer's own
//! `waitpid` of its intermediate process away from the shim's reaper. The container's init is
//! the fork's child (libcontainer starts it as the intermediate's sibling); once the fork exits
//! the init is re-parented to the shim, a subreaper, which reaps it as it does runc's.
//! The other calls (start, kill, state, delete, pause, resume, update, ps) fork nothing and run
//! in the shim directly.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

use berth_core::{Error, ErrorKind, Result};
use libcgroups::common::{CgroupConfig, CgroupManager, ControllerOpt};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::error::LibcontainerError;
use libcontainer::oci_spec::runtime::{LinuxResources, Spec};
use libcontainer::signal::Signal;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};

use std::sync::Arc;

use crate::reaper::Spawner;
use crate::runtime::{
    BoxFuture, CreateOptions, ExecOptions, OciRuntime, ProcessStdio, RuntimeState,
};

/// The runtime's name where a runtime binary would be named (`[engine.runtimes]`, the shim's
/// `--runtime`, Create's `RuntimeConfig.binary`): this name selects the in-process runtime.
pub const NAME: &str = "libcontainer";

/// The `--root` used when the engine names none.
const DEFAULT_ROOT: &str = "/run/berth/libcontainer";

/// Whether `binary`, as a runtime setting, names the in-process runtime.
pub fn selected_by(binary: &Path) -> bool {
    binary.as_os_str() == NAME
}

/// The in-process runtime for one state root.
#[derive(Debug, Clone)]
pub struct Libcontainer {
    root: PathBuf,
    spawner: Arc<dyn Spawner>,
    timeout: std::time::Duration,
}

impl Libcontainer {
    /// A runtime keeping its containers' state under `root` (default `/run/berth/libcontainer`);
    /// `spawner` reaps the forked copies that create and exec run in, each of which is killed
    /// (and the call fails with `DeadlineExceeded`) after `timeout`.
    pub fn new(
        root: Option<PathBuf>,
        spawner: Arc<dyn Spawner>,
        timeout: std::time::Duration,
    ) -> Self {
        Self {
            root: root.unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT)),
            spawner,
            timeout,
        }
    }

    fn builder(&self, id: &str, stdio: ProcessStdio) -> Result<ContainerBuilder> {
        std::fs::create_dir_all(&self.root).map_err(|e| {
            Error::internal(format!("create {}", self.root.display())).with_source(e)
        })?;
        let null = || -> Result<OwnedFd> {
            File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map(OwnedFd::from)
                .map_err(|e| Error::internal("open /dev/null").with_source(e))
        };
        let stdin = stdio.stdin.map_or_else(null, Ok)?;
        let stdout = stdio.stdout.map_or_else(null, Ok)?;
        let stderr = stdio.stderr.map_or_else(null, Ok)?;
        ContainerBuilder::new(id.to_string(), SyscallType::default())
            .with_root_path(&self.root)
            .map_err(|e| failed("create", e))
            .map(|b| {
                b.with_executor(RuncLikeExecutor)
                    .with_stdin(stdin)
                    .with_stdout(stdout)
                    .with_stderr(stderr)
            })
    }

    /// The container's directory, or `NotFound` as runc says it.
    fn load(&self, id: &str) -> Result<Container> {
        let dir = self.root.join(id);
        if !dir.join("state.json").exists() {
            return Err(Error::not_found(format!("container {id:?} does not exist")));
        }
        Container::load(dir).map_err(|e| failed("load", e))
    }

    fn create_sync(&self, id: &str, opts: CreateOptions) -> Result<()> {
        let config = opts.bundle.join("config.json");
        let prepared = match prepare_bundle(&opts.bundle) {
            Ok(p) => p,
            Err(e) => {
                remove_extra_cgroups(&config);
                return Err(e);
            }
        };
        let builder = self.builder(id, opts.stdio)?;
        let result = builder
            .with_pid_file(Some(&opts.pid_file))
            .and_then(|b| {
                b.with_console_socket(opts.console_socket.as_ref())
                    .as_init(&opts.bundle)
                    .with_systemd(false)
                    .with_detach(true)
                    .build()
            })
            .map_err(|e| failed("create", e))
            .and_then(|c| {
                let pid = c.pid().map_or(0, |p| p.as_raw());
                finish_create(pid, &prepared)
            });
        if let Err(err) = &result {
            // libcontainer leaves the state directory (and, past the fork, the cgroup) of a
            // create that failed; runc removes both. So does this.
            if !matches!(err.kind(), ErrorKind::AlreadyExists) {
                self.remove_failed(id);
                remove_extra_cgroups(&config);
            }
        }
        result
    }

    fn remove_failed(&self, id: &str) {
        if let Ok(mut c) = self.load(id)
            && let Err(e) = c.delete(true)
        {
            tracing::warn!(id, error = %e, "clean up after a failed create");
        }
        let _ = std::fs::remove_dir_all(self.root.join(id));
    }

    fn cgroup_manager(&self, c: &Container) -> Result<libcgroups::common::AnyCgroupManager> {
        let config = c.spec().map_err(|e| failed("load", e))?;
        libcgroups::common::create_cgroup_manager(CgroupConfig {
            cgroup_path: config.cgroup_path,
            systemd_cgroup: false,
            container_name: c.id().to_string(),
        })
        .map_err(|e| Error::internal(format!("cgroup of {}: {e}", c.id())))
    }
}

/// Why the container of `spec` (its config.json) cannot run in-process (and runs with runc instead), or `None`.
///
/// On cgroup v1 the shim mounts the container's `/sys/fs/cgroup` itself (see [`prepare_bundle`]),
/// which needs `linux.cgroupsPath` and one hierarchy per mount point: runc links comounted
/// controllers (`cpu` → `cpu,cpuacct`) in the container, which an OCI mount list cannot say.
pub fn needs_runc(spec: &serde_json::Value) -> Option<&'static str> {
    let mounts_cgroup = spec
        .pointer("/mounts")
        .and_then(|m| m.as_array())
        .is_some_and(|ms| ms.iter().any(|m| m["type"] == "cgroup"));
    let hierarchies = v1_hierarchies()?;
    if !mounts_cgroup {
        return None;
    }
    if spec
        .pointer("/linux/cgroupsPath")
        .and_then(|p| p.as_str())
        .is_none()
    {
        return Some("a cgroup v1 mount without linux.cgroupsPath");
    }
    hierarchies
        .iter()
        .any(|h| h.to_string_lossy().contains(','))
        .then_some("comounted cgroup v1 hierarchies")
}

/// Whether the container of `config_json` has a user namespace of its own (an unreadable
/// config counts as one: the caller refuses rather than guesses).
fn has_user_namespace(config_json: &Path) -> bool {
    let Ok(spec) = std::fs::read(config_json)
        .map_err(drop)
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).map_err(drop))
    else {
        return true;
    };
    spec.pointer("/linux/namespaces")
        .and_then(|n| n.as_array())
        .is_some_and(|ns| ns.iter().any(|n| n["type"] == "user"))
}

/// What create needs to know of the spec once the container exists.
#[derive(Debug, Default)]
struct Prepared {
    /// `process.user.uid`: owner runc gives the init's stdio.
    uid: u32,
    /// Hierarchies libcontainer does not put the init in (cgroup v1 `name=systemd`, the hybrid
    /// layout's cgroup2): the container's directories in them, which it must join.
    extra_cgroups: Vec<PathBuf>,
}

/// The cgroup v1 hierarchies mounted under `/sys/fs/cgroup` (their mount points), or `None` on
/// a cgroup v2 host.
fn v1_hierarchies() -> Option<Vec<PathBuf>> {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        return None;
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut out: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let point = pre.split(' ').nth(4)?;
            (post.split(' ').next() == Some("cgroup") && point.starts_with("/sys/fs/cgroup/"))
                .then(|| PathBuf::from(point))
        })
        .collect();
    // In mount order, as runc mounts them.
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    Some(out)
}

/// Makes the bundle one libcontainer runs the way runc would, through what it reads:
///
/// - It installs seccomp early (while the init still has CAP_SYS_ADMIN) only when
///   `process.noNewPrivileges` is absent; an explicit `false`, which means the same to runc and
///   which berth's specs carry, makes it install the filter after dropping capabilities, where
///   the kernel refuses it. An explicit `false` is removed from config.json.
/// - runc creates a working directory the image lacks (Docker relies on it); libcontainer
///   fails the `chdir`. The directory is made in the rootfs first, resolved inside it.
/// - `linux.rootfsPropagation` `rshared`/`rslave`/`rprivate` (runc's recursive spellings) become
///   the plain names, which libcontainer applies recursively anyway.
/// - A bind mount whose source is gone fails with runc's words, not libcontainer's "failed to
///   prepare rootfs".
/// - On cgroup v1, libcontainer's own `cgroup` mount binds each hierarchy read-write, binds the
///   host's whole `name=systemd` hierarchy, and fails in a joined PID namespace. The mount is
///   replaced by what runc mounts: a tmpfs, and in it each hierarchy's container directory bound
///   read-only (the directories are made first, so that the binds have sources).
fn prepare_bundle(bundle: &Path) -> Result<Prepared> {
    let path = bundle.join("config.json");
    let data = std::fs::read(&path)
        .map_err(|e| Error::invalid_argument(format!("read {}", path.display())).with_source(e))?;
    let mut spec: serde_json::Value = serde_json::from_slice(&data)
        .map_err(|e| Error::invalid_argument(format!("{}", path.display())).with_source(e))?;
    let mut changed = false;
    let mut prepared = Prepared {
        uid: spec
            .pointer("/process/user/uid")
            .and_then(|u| u.as_u64())
            .unwrap_or(0) as u32,
        ..Prepared::default()
    };
    let root = spec
        .pointer("/root/path")
        .and_then(|p| p.as_str())
        .map(|p| bundle.join(p));
    if let (Some(root), Some(cwd)) = (root, spec.pointer("/process/cwd").and_then(|c| c.as_str())) {
        make_dir_in_root(&root, cwd)?;
    }
    if let Some(process) = spec.get_mut("process").and_then(|p| p.as_object_mut())
        && process.get("noNewPrivileges") == Some(&serde_json::Value::Bool(false))
    {
        process.remove("noNewPrivileges");
        changed = true;
    }
    // libcontainer applies the rootfs propagation recursively and knows only the plain names;
    // runc's recursive spellings mean the same.
    if let Some(p) = spec.pointer_mut("/linux/rootfsPropagation")
        && let Some(plain) = p.as_str().and_then(|v| {
            ["rshared", "rslave", "rprivate"]
                .contains(&v)
                .then(|| v[1..].to_string())
        })
    {
        *p = plain.into();
        changed = true;
    }
    for m in spec["mounts"].as_array().into_iter().flatten() {
        let bind = m["type"] == "bind"
            || m["options"]
                .as_array()
                .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"));
        if let (true, Some(source)) = (bind, m["source"].as_str())
            && !Path::new(source).exists()
        {
            let dest = m["destination"].as_str().unwrap_or_default();
            return Err(Error::internal(format!(
                "error mounting {source:?} to rootfs at {dest:?}: stat {source}: no such file or directory"
            )));
        }
    }
    let cgroups_path = spec
        .pointer("/linux/cgroupsPath")
        .and_then(|p| p.as_str())
        .map(|p| p.trim_start_matches('/').to_string());
    if let (Some(hierarchies), Some(cgroups_path)) = (v1_hierarchies(), cgroups_path) {
        let mounts = spec["mounts"].as_array_mut();
        if let Some(mounts) = mounts
            && let Some(at) = mounts.iter().position(|m| m["type"] == "cgroup")
        {
            let cgroup = mounts.remove(at);
            let dest = cgroup["destination"]
                .as_str()
                .unwrap_or("/sys/fs/cgroup")
                .to_string();
            let mut flags: Vec<serde_json::Value> = cgroup["options"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|o| ["ro", "nosuid", "nodev", "noexec"].contains(&o.as_str().unwrap_or("")))
                .collect();
            if !flags.contains(&"ro".into()) {
                flags.push("rw".into());
            }
            let mut replacement = vec![serde_json::json!({
                "destination": dest, "type": "tmpfs", "source": "tmpfs",
                "options": ["nosuid", "nodev", "noexec", "mode=755"],
            })];
            for h in &hierarchies {
                let dir = h.join(&cgroups_path);
                std::fs::create_dir_all(&dir).map_err(|e| {
                    Error::internal(format!("create cgroup {}", dir.display())).with_source(e)
                })?;
                let name = h.file_name().unwrap_or_default().to_string_lossy();
                let mut options: Vec<serde_json::Value> = vec!["rbind".into()];
                options.extend(flags.iter().cloned());
                replacement.push(serde_json::json!({
                    "destination": format!("{}/{name}", dest.trim_end_matches('/')),
                    "type": "bind", "source": dir, "options": options,
                }));
                if name == "systemd" {
                    prepared.extra_cgroups.push(dir);
                }
            }
            mounts.splice(at..at, replacement);
            changed = true;
        }
        let unified = Path::new("/sys/fs/cgroup/unified");
        if unified.join("cgroup.controllers").exists() {
            let dir = unified.join(&cgroups_path);
            std::fs::create_dir_all(&dir).map_err(|e| {
                Error::internal(format!("create cgroup {}", dir.display())).with_source(e)
            })?;
            prepared.extra_cgroups.push(dir);
        }
    }
    if changed {
        let tmp = bundle.join(".config.json.inproc");
        std::fs::write(&tmp, serde_json::to_vec(&spec).unwrap_or_default())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::internal(format!("write {}", path.display())).with_source(e))?;
    }
    Ok(prepared)
}

/// What runc does after create that libcontainer does not: the init joins `extra_cgroups`, and
/// its stdio (pipes or the pty, not `/dev/null`) is given to the container's user, so that a
/// non-root process can open `/dev/stdout`.
fn finish_create(pid: i32, prepared: &Prepared) -> Result<()> {
    for dir in &prepared.extra_cgroups {
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).map_err(|e| {
            Error::internal(format!("join cgroup {}", dir.display())).with_source(e)
        })?;
    }
    if prepared.uid != 0 {
        let null = std::fs::metadata("/dev/null").map(|m| m.rdev()).ok();
        for fd in 0..3 {
            let path = PathBuf::from(format!("/proc/{pid}/fd/{fd}"));
            match std::fs::metadata(&path) {
                Ok(m) if Some(m.rdev()) == null && m.file_type().is_char_device() => continue,
                Ok(_) => {
                    std::os::unix::fs::chown(&path, Some(prepared.uid), None).map_err(|e| {
                        Error::internal(format!("give the init's fd {fd} to uid {}", prepared.uid))
                            .with_source(e)
                    })?
                }
                Err(_) => continue,
            }
        }
    }
    Ok(())
}

/// Removes the container's cgroup directories that libcontainer does not: those
/// [`prepare_bundle`] made (all of them when a create failed early) and the ones
/// [`finish_create`] joined. Missing ones are fine.
fn remove_extra_cgroups(config_json: &Path) {
    let Ok(data) = std::fs::read(config_json) else {
        return;
    };
    let Ok(spec) = serde_json::from_slice::<serde_json::Value>(&data) else {
        return;
    };
    let Some(path) = spec.pointer("/linux/cgroupsPath").and_then(|p| p.as_str()) else {
        return;
    };
    let path = path.trim_start_matches('/');
    let mut bases = v1_hierarchies().unwrap_or_default();
    bases.push(PathBuf::from("/sys/fs/cgroup/unified"));
    for base in bases {
        let dir = base.join(path);
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "remove cgroup"),
        }
    }
}

/// `mkdir -p` of `dir` inside `root`, every component resolved as if `root` were `/` (symlinks
/// cannot lead out), new directories root-owned and 0755, as runc makes them.
fn make_dir_in_root(root: &Path, dir: &str) -> Result<()> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    use nix::sys::stat::{Mode, mkdirat};
    let fail = |e: nix::Error| {
        Error::invalid_argument(format!("working directory {dir:?} in {}", root.display()))
            .with_source(e)
    };
    let how = || {
        OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT)
    };
    let root_fd = File::open(root)
        .map_err(|e| Error::internal(format!("open {}", root.display())).with_source(e))?;
    let mut prefix = PathBuf::from(".");
    for part in Path::new(dir).components() {
        let std::path::Component::Normal(name) = part else {
            continue;
        };
        let parent = openat2(&root_fd, &prefix, how()).map_err(fail)?;
        prefix.push(name);
        match openat2(&root_fd, &prefix, how()) {
            Ok(_) => {}
            Err(nix::Error::ENOENT) => {
                match mkdirat(&parent, name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(nix::Error::EEXIST) => {}
                    Err(e) => return Err(fail(e)),
                }
            }
            Err(e) => return Err(fail(e)),
        }
    }
    Ok(())
}

/// Runs `work` in a forked, single-threaded copy of the shim and returns its result (see the
/// module docs for why). The fork reports through a pipe and exits at once with `_exit`.
async fn forked(
    spawner: &dyn Spawner,
    timeout: std::time::Duration,
    work: impl FnOnce() -> Result<()>,
) -> Result<()> {
    use nix::unistd::{ForkResult, fork};
    use std::io::Write as _;
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::internal("create pipe").with_source(e))?;
    // SAFETY: glibc's fork; the child runs only `work` (allocation is safe: fork took malloc's
    // locks) and leaves with `_exit`, never returning into the parent's runtime.
    match unsafe { fork() } {
        Err(e) => Err(Error::internal("fork").with_source(e)),
        Ok(ForkResult::Child) => {
            drop(r);
            let report = match work() {
                Ok(()) => String::new(),
                Err(e) => format!("{}\n{}", e.kind().grpc_code() as i32, e.chain()),
            };
            let _ = File::from(w).write_all(report.as_bytes());
            // SAFETY: ends the forked copy without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(w);
            // The report is complete once the fork has exited. The pipe never reaches EOF
            // before the container starts: its init, cloned from the fork, holds the write end
            // until it execs. So wait for the exit, then read what is there.
            let exit =
                match tokio::time::timeout(timeout, spawner.watch(child.as_raw() as u32)).await {
                    Ok(exit) => exit?,
                    Err(_) => {
                        // Not reaped yet (the reaper owns it), so the pid is still this child's.
                        let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                        return Err(Error::new(
                            ErrorKind::DeadlineExceeded,
                            format!("{NAME} did not finish within {timeout:?}"),
                        ));
                    }
                };
            let mut report = Vec::new();
            let mut file = File::from(r);
            let _ = nix::fcntl::fcntl(
                &file,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            );
            let _ = std::io::Read::read_to_end(&mut file, &mut report);
            if report.is_empty() {
                return match exit.status {
                    0 => Ok(()),
                    status => Err(Error::internal(format!(
                        "{NAME}: the forked runtime exited with status {status} and no report"
                    ))),
                };
            }
            let report = String::from_utf8_lossy(&report);
            let (code, message) = report.split_once('\n').unwrap_or(("", &report));
            let kind = code.parse::<i32>().map_or(ErrorKind::Internal, |c| {
                ErrorKind::from_grpc_code(tonic::Code::from(c))
            });
            Err(Error::new(kind, message.to_string()))
        }
    }
}

/// A libcontainer error as a berth error of the kind runc's message would have been classified.
fn failed(op: &str, e: LibcontainerError) -> Error {
    let kind = match &e {
        LibcontainerError::Exist => ErrorKind::AlreadyExists,
        LibcontainerError::NoDirectory => ErrorKind::NotFound,
        LibcontainerError::IncorrectStatus(_) => ErrorKind::FailedPrecondition,
        LibcontainerError::InvalidInput(_) | LibcontainerError::InvalidID(_) => {
            ErrorKind::InvalidArgument
        }
        _ => ErrorKind::Internal,
    };
    let mut message = e.to_string();
    // The reason a create failed is in the init's error, nested in the chain.
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = s.source();
    }
    Error::new(kind, format!("{NAME} {op}: {message}"))
}

fn status_name(status: ContainerStatus) -> &'static str {
    match status {
        ContainerStatus::Creating | ContainerStatus::Created => "created",
        ContainerStatus::Running => "running",
        ContainerStatus::Paused => "paused",
        ContainerStatus::Stopped => "stopped",
    }
}

/// libcontainer's default workload, checked first the way runc checks it, so a failed start
/// says what runc says (`exec: "x": executable file not found in $PATH`, `permission denied`),
/// which is what Docker's exit codes 127 and 126 are derived from.
#[derive(Clone)]
struct RuncLikeExecutor;

impl Executor for RuncLikeExecutor {
    fn exec(&self, spec: &Spec) -> std::result::Result<(), ExecutorError> {
        // Rust ignores SIGPIPE in the shim, and an ignored signal stays ignored across exec:
        // the container's process must get the default, as under runc.
        // SAFETY: resetting a disposition to SIG_DFL in the single-threaded init.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
        libcontainer::workload::default::get_executor().exec(spec)
    }

    fn validate(&self, spec: &Spec) -> std::result::Result<(), ExecutorValidationError> {
        let process = spec.process().as_ref().ok_or_else(|| {
            ExecutorValidationError::ArgValidationError("spec has no process".into())
        })?;
        let Some(arg0) = process.args().as_ref().and_then(|a| a.first()) else {
            return Err(ExecutorValidationError::ArgValidationError(
                "args must not be empty".into(),
            ));
        };
        let path_var = process
            .env()
            .iter()
            .flatten()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        let found = if arg0.contains('/') {
            Path::new(arg0).exists().then(|| PathBuf::from(arg0))
        } else {
            path_var
                .split(':')
                .map(|d| Path::new(d).join(arg0))
                .find(|p| p.is_file())
        };
        let Some(path) = found else {
            let message = if arg0.contains('/') {
                format!("exec: {arg0:?}: stat {arg0}: no such file or directory")
            } else {
                format!("exec: {arg0:?}: executable file not found in $PATH")
            };
            return Err(ExecutorValidationError::ArgValidationError(message));
        };
        let executable =
            nix::unistd::access(&path, nix::unistd::AccessFlags::X_OK).is_ok() && path.is_file();
        if !executable {
            return Err(ExecutorValidationError::ArgValidationError(format!(
                "exec: {arg0:?}: permission denied"
            )));
        }
        Ok(())
    }
}

impl OciRuntime for Libcontainer {
    fn create<'a>(&'a self, id: &'a str, opts: CreateOptions) -> BoxFuture<'a, ()> {
        Box::pin(crate::trace::child(
            || format!("{NAME} create"),
            || vec![("berth.runtime.op", "create".to_string())],
            forked(self.spawner.as_ref(), self.timeout, move || {
                self.create_sync(id, opts)
            }),
        ))
    }

    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(crate::trace::child(
            || format!("{NAME} start"),
            || vec![("berth.runtime.op", "start".to_string())],
            async move { self.load(id)?.start().map_err(|e| failed("start", e)) },
        ))
    }

    fn state<'a>(&'a self, id: &'a str) -> BoxFuture<'a, RuntimeState> {
        Box::pin(async move {
            let mut c = self.load(id)?;
            c.refresh_status().map_err(|e| failed("state", e))?;
            let status = status_name(c.status());
            Ok(RuntimeState {
                id: id.to_string(),
                pid: match status {
                    "stopped" => 0,
                    _ => c.pid().map_or(0, |p| p.as_raw() as u32),
                },
                status: status.to_string(),
            })
        })
    }

    fn kill<'a>(&'a self, id: &'a str, signal: i32, all: bool) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let sig = Signal::try_from(signal)
                .map_err(|e| Error::invalid_argument(format!("signal {signal}")).with_source(e))?;
            let mut c = self.load(id)?;
            c.kill(sig, all).map_err(|e| match e {
                LibcontainerError::IncorrectStatus(_) => Error::new(
                    ErrorKind::FailedPrecondition,
                    format!("{NAME} kill: container not running"),
                ),
                e => failed("kill", e),
            })
        })
    }

    fn delete<'a>(&'a self, id: &'a str, force: bool) -> BoxFuture<'a, ()> {
        Box::pin(crate::trace::child(
            || format!("{NAME} delete"),
            || vec![("berth.runtime.op", "delete".to_string())],
            async move {
                let mut c = self.load(id)?;
                let config = c.bundle().join("config.json");
                c.delete(force).map_err(|e| failed("delete", e))?;
                remove_extra_cgroups(&config);
                Ok(())
            },
        ))
    }

    fn exec<'a>(&'a self, id: &'a str, opts: ExecOptions) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let c = self.load(id)?;
            // libcontainer's tenant does not end up in a user namespace the container joined
            // by path (the engine's, for userns-remap): its process would be the host's root.
            // Native exec joins it; here the exec is refused rather than run outside it.
            if has_user_namespace(&c.bundle().join("config.json")) {
                return Err(Error::failed_precondition(format!(
                    "{NAME} exec: the in-process runtime cannot exec into a container with a user namespace (use [shim] exec = \"native\", or runc)"
                )));
            }
            forked(self.spawner.as_ref(), self.timeout, move || {
                self.builder(id, opts.stdio)?
                    .with_pid_file(Some(&opts.pid_file))
                    .map_err(|e| failed("exec", e))?
                    .with_console_socket(opts.console_socket.as_ref())
                    .as_tenant()
                    .with_process(Some(&opts.process))
                    .with_detach(true)
                    .build()
                    .map(drop)
                    .map_err(|e| failed("exec", e))
            })
            .await
        })
    }

    fn pause<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move { self.load(id)?.pause().map_err(|e| failed("pause", e)) })
    }

    fn resume<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move { self.load(id)?.resume().map_err(|e| failed("resume", e)) })
    }

    fn update<'a>(&'a self, id: &'a str, resources: &'a [u8]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let resources: LinuxResources = serde_json::from_slice(resources).map_err(|e| {
                Error::invalid_argument("update: resources are not an OCI LinuxResources")
                    .with_source(e)
            })?;
            let c = self.load(id)?;
            self.cgroup_manager(&c)?
                .apply(&ControllerOpt {
                    resources: &resources,
                    disable_oom_killer: false,
                    oom_score_adj: None,
                    freezer_state: None,
                })
                .map_err(|e| Error::internal(format!("{NAME} update: {e}")))
        })
    }

    fn ps<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Vec<u32>> {
        Box::pin(async move {
            let c = self.load(id)?;
            let pids = self
                .cgroup_manager(&c)?
                .get_all_pids()
                .map_err(|e| Error::internal(format!("{NAME} ps: {e}")))?;
            Ok(pids.into_iter().map(|p| p.as_raw() as u32).collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(spec: serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
        dir
    }

    fn spec_at(dir: &Path) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
    }

    #[test]
    fn an_explicit_no_new_privileges_false_is_removed_and_true_is_kept() {
        let b = bundle(serde_json::json!({
            "root": {"path": "rootfs"}, "process": {"cwd": "/", "noNewPrivileges": false}
        }));
        prepare_bundle(b.path()).unwrap();
        assert!(
            spec_at(b.path())["process"]
                .get("noNewPrivileges")
                .is_none()
        );
        let b = bundle(serde_json::json!({
            "root": {"path": "rootfs"}, "process": {"cwd": "/", "noNewPrivileges": true}
        }));
        prepare_bundle(b.path()).unwrap();
        assert_eq!(spec_at(b.path())["process"]["noNewPrivileges"], true);
    }

    #[test]
    fn a_missing_working_directory_is_made_inside_the_rootfs_even_through_a_symlink() {
        let b = bundle(serde_json::json!({
            "root": {"path": "rootfs"}, "process": {"cwd": "/link/work/dir"}
        }));
        let rootfs = b.path().join("rootfs");
        // An absolute symlink resolves inside the rootfs, never on the host.
        std::os::unix::fs::symlink("/var", rootfs.join("link")).unwrap();
        std::fs::create_dir(rootfs.join("var")).unwrap();
        prepare_bundle(b.path()).unwrap();
        assert!(rootfs.join("var/work/dir").is_dir());
        assert!(!Path::new("/var/work/dir").exists());
        // A path through a file is refused.
        std::fs::write(rootfs.join("file"), "x").unwrap();
        let b2 = bundle(serde_json::json!({
            "root": {"path": rootfs.display().to_string()}, "process": {"cwd": "/file/sub"}
        }));
        assert!(prepare_bundle(b2.path()).is_err());
    }

    #[test]
    fn runc_is_needed_only_without_a_cgroups_path_or_with_comounted_hierarchies() {
        let spec = |path: Option<&str>| {
            let mut s = serde_json::json!({
                "linux": {"namespaces": [{"type": "pid", "path": "/proc/1/ns/pid"}]},
                "mounts": [{"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}]
            });
            if let Some(p) = path {
                s["linux"]["cgroupsPath"] = p.into();
            }
            s
        };
        let comounted =
            v1_hierarchies().is_some_and(|h| h.iter().any(|h| h.to_string_lossy().contains(',')));
        assert_eq!(needs_runc(&spec(Some("/berth/x"))).is_some(), comounted);
        assert_eq!(
            needs_runc(&spec(None)).is_some(),
            v1_hierarchies().is_some()
        );
    }

    #[test]
    fn the_reserved_name_selects_the_in_process_runtime() {
        assert!(selected_by(Path::new("libcontainer")));
        assert!(!selected_by(Path::new("runc")));
        assert!(!selected_by(Path::new("/usr/bin/libcontainer")));
    }
}
