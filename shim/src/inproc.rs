//! The in-process OCI runtime: [`Libcontainer`] runs containers with youki's `libcontainer`
//! inside the shim, so no runtime binary (and no Go runtime start-up) is on the start path.
//!
//! Its state lives in the same `--root` layout runc uses (`<root>/<id>/state.json`, youki's
//! format), so a restarted shim, or `berth-shim delete` after a shim died, finds the container.
//!
//! Every call runs to completion on the calling thread. That is deliberate: libcontainer forks
//! an intermediate process and `waitpid`s it itself, and the shim's reaper (a task on the same
//! single-threaded runtime) must not reap that process first. While a call runs the reaper cannot
//! run; the container's init is the shim's own child (libcontainer starts it as the intermediate's
//! sibling) and the reaper collects it afterwards as it does with runc.

use std::fs::File;
use std::os::fd::OwnedFd;
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
}

impl Libcontainer {
    /// A runtime keeping its containers' state under `root` (default `/run/berth/libcontainer`).
    pub fn new(root: Option<PathBuf>) -> Self {
        Self {
            root: root.unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT)),
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
        prepare_bundle(&opts.bundle)?;
        let builder = self.builder(id, opts.stdio)?;
        let result = builder.with_pid_file(Some(&opts.pid_file)).and_then(|b| {
            b.with_console_socket(opts.console_socket.as_ref())
                .as_init(&opts.bundle)
                .with_systemd(false)
                .with_detach(true)
                .build()
        });
        match result {
            Ok(_) => Ok(()),
            Err(e) => {
                // libcontainer leaves the state directory (and, past the fork, the cgroup) of
                // a create that failed; runc removes both. So does this.
                let err = failed("create", e);
                if !matches!(err.kind(), ErrorKind::AlreadyExists) {
                    self.remove_failed(id);
                }
                Err(err)
            }
        }
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

/// Why the bundle's container cannot run in-process (and runs with runc instead), or `None`.
///
/// libcontainer 0.7 mounts a cgroup v1 `/sys/fs/cgroup` by reading `/proc/<pid>/cgroup` with the
/// pid the init has inside its PID namespace, in the host's `/proc`: in a PID namespace it joins
/// (a pod's, `--pid container:`) that pid is not the init's on the host, and the create fails.
pub fn needs_runc(bundle: &Path) -> Option<&'static str> {
    let data = std::fs::read(bundle.join("config.json")).ok()?;
    let spec: serde_json::Value = serde_json::from_slice(&data).ok()?;
    let joins_pid_ns = spec
        .pointer("/linux/namespaces")
        .and_then(|n| n.as_array())
        .is_some_and(|ns| {
            ns.iter()
                .any(|n| n["type"] == "pid" && n["path"].as_str().is_some_and(|p| !p.is_empty()))
        });
    let mounts_cgroup = spec
        .pointer("/mounts")
        .and_then(|m| m.as_array())
        .is_some_and(|ms| ms.iter().any(|m| m["type"] == "cgroup"));
    let cgroup_v1 = !Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    (joins_pid_ns && mounts_cgroup && cgroup_v1).then_some(
        "libcontainer 0.7 cannot mount cgroup v1 for a container that joins a PID namespace",
    )
}

/// Makes the bundle one libcontainer runs the way runc would, through what it reads:
///
/// - It installs seccomp early (while the init still has CAP_SYS_ADMIN) only when
///   `process.noNewPrivileges` is absent; an explicit `false`, which means the same to runc and
///   which berth's specs carry, makes it install the filter after dropping capabilities, where
///   the kernel refuses it. An explicit `false` is removed from config.json.
/// - runc creates a working directory the image lacks (Docker relies on it); libcontainer
///   fails the `chdir`. The directory is made in the rootfs first, resolved inside it.
fn prepare_bundle(bundle: &Path) -> Result<()> {
    let path = bundle.join("config.json");
    let data = std::fs::read(&path)
        .map_err(|e| Error::invalid_argument(format!("read {}", path.display())).with_source(e))?;
    let mut spec: serde_json::Value = serde_json::from_slice(&data)
        .map_err(|e| Error::invalid_argument(format!("{}", path.display())).with_source(e))?;
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
        let tmp = bundle.join(".config.json.inproc");
        std::fs::write(&tmp, serde_json::to_vec(&spec).unwrap_or_default())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::internal(format!("write {}", path.display())).with_source(e))?;
    }
    Ok(())
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
            async move { self.create_sync(id, opts) },
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
                c.delete(force).map_err(|e| failed("delete", e))
            },
        ))
    }

    fn exec<'a>(&'a self, id: &'a str, opts: ExecOptions) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.load(id)?;
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
