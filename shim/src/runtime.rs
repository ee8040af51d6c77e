//! The OCI runtime seam: [`OciRuntime`] in domain terms, and [`Runc`], its implementation for
//! runc-compatible command-line runtimes (runc, crun), which takes the binary as configuration.

use std::fmt;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use berth_core::cgroup::Stats;
use berth_core::{Error, ErrorKind, Result};
use serde::Deserialize;
use tokio::io::AsyncReadExt;

use crate::reaper::Spawner;

/// A boxed future, so that [`OciRuntime`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// The file descriptors a new container or exec process gets as stdin, stdout and stderr.
/// `None` means `/dev/null`.
#[derive(Debug, Default)]
pub struct ProcessStdio {
    /// Read end of the process' stdin.
    pub stdin: Option<OwnedFd>,
    /// Write end of its stdout.
    pub stdout: Option<OwnedFd>,
    /// Write end of its stderr.
    pub stderr: Option<OwnedFd>,
}

/// How to create a container (`runtime create`).
#[derive(Debug)]
pub struct CreateOptions {
    /// The bundle: `config.json` and `rootfs/`.
    pub bundle: PathBuf,
    /// Where the runtime writes the init process' host pid.
    pub pid_file: PathBuf,
    /// Where the runtime sends the pty master when `process.terminal` is set.
    pub console_socket: Option<PathBuf>,
    /// Stdio of the init process (ignored with a console socket).
    pub stdio: ProcessStdio,
}

/// How to start an extra process in a running container (`runtime exec --detach`).
#[derive(Debug)]
pub struct ExecOptions {
    /// An OCI runtime-spec `process` object as a JSON file.
    pub process: PathBuf,
    /// Where the runtime writes the process' host pid.
    pub pid_file: PathBuf,
    /// Where the runtime sends the pty master when the process has a terminal.
    pub console_socket: Option<PathBuf>,
    /// Stdio of the process (ignored with a console socket).
    pub stdio: ProcessStdio,
}

/// What the runtime reports about a container (`runtime state`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RuntimeState {
    /// Container id.
    pub id: String,
    /// Host pid of the init process (0 once stopped).
    #[serde(default)]
    pub pid: u32,
    /// `created`, `running`, `paused`, `stopped`.
    pub status: String,
}

/// An OCI runtime, driven per container.
///
/// Contract: every method runs the runtime to completion, or gives up after the configured
/// timeout with `DeadlineExceeded` (a runtime that hangs must never hang the shim). Failures
/// carry the runtime's own error message; a container the runtime does not know is `NotFound`.
/// `create` and `exec` return once the process exists (created but not started, for `create`);
/// its pid is in the pid file.
pub trait OciRuntime: Send + Sync + fmt::Debug {
    /// Creates container `id` from a bundle.
    fn create<'a>(&'a self, id: &'a str, opts: CreateOptions) -> BoxFuture<'a, ()>;
    /// Starts the created container's user process.
    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()>;
    /// Creates container `id` and starts its process at once (`runtime run --detach`); returns
    /// once it runs. Without a single call for it, `create` then `start`.
    fn run<'a>(&'a self, id: &'a str, opts: CreateOptions) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.create(id, opts).await?;
            self.start(id).await
        })
    }
    /// The container's state.
    fn state<'a>(&'a self, id: &'a str) -> BoxFuture<'a, RuntimeState>;
    /// Sends `signal` to the init process, or with `all` to every process of the container.
    fn kill<'a>(&'a self, id: &'a str, signal: i32, all: bool) -> BoxFuture<'a, ()>;
    /// Deletes the container; `force` kills it first when it still runs.
    fn delete<'a>(&'a self, id: &'a str, force: bool) -> BoxFuture<'a, ()>;
    /// Starts an extra process in the container, detached.
    fn exec<'a>(&'a self, id: &'a str, opts: ExecOptions) -> BoxFuture<'a, ()>;
    /// Freezes every process of the container.
    fn pause<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()>;
    /// Thaws a paused container.
    fn resume<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()>;
    /// Applies new cgroup limits: an OCI `LinuxResources` object as JSON.
    fn update<'a>(&'a self, id: &'a str, resources: &'a [u8]) -> BoxFuture<'a, ()>;
    /// Host pids of every process in the container.
    fn ps<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Vec<u32>>;
    /// The container's resource counters, when the runtime reads them itself; `None` (the
    /// default) when the host cgroup of the init process is the container's, and the shim
    /// reads it and watches it for OOM kills.
    ///
    /// `Some` also says that the init's host cgroup is *not* the container's (a VM's init on
    /// the host is a relay in the shim's own cgroup): the shim then neither reads it nor
    /// reports its OOM kills. The answer must not depend on the container's state, and nothing
    /// may happen before the future is polled (the shim also calls this only to ask).
    fn stats<'a>(&'a self, _id: &'a str) -> Option<BoxFuture<'a, Stats>> {
        None
    }
}

/// Which runtime binary to run and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuncConfig {
    /// Binary name (looked up on PATH) or path: `runc`, `crun`, `/usr/sbin/runc`.
    pub binary: PathBuf,
    /// The runtime's `--root` state directory; `None` = its default.
    pub root: Option<PathBuf>,
    /// Use the systemd cgroup driver.
    pub systemd_cgroup: bool,
    /// Extra global arguments, placed before the command.
    pub args: Vec<String>,
    /// Directory for the runtime's per-call log files (the bundle).
    pub log_dir: PathBuf,
    /// How long any one runtime call may take.
    pub timeout: Duration,
}

impl RuncConfig {
    /// runc with its defaults, logging into `log_dir`.
    pub fn new(binary: impl Into<PathBuf>, log_dir: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            root: None,
            systemd_cgroup: false,
            args: Vec::new(),
            log_dir: log_dir.into(),
            timeout: Duration::from_secs(60),
        }
    }
}

/// A runc-compatible runtime command line (runc, crun).
#[derive(Debug)]
pub struct Runc {
    config: RuncConfig,
    spawner: Arc<dyn Spawner>,
    calls: AtomicU64,
}

/// Output of one runtime call.
struct Output {
    stdout: Vec<u8>,
}

/// What one call passes to the runtime process besides its arguments.
#[derive(Default)]
struct CallIo {
    /// The container's stdio (create, exec); `None` = capture stdout and stderr.
    stdio: Option<ProcessStdio>,
}

impl Runc {
    /// A runtime driver spawning through `spawner`.
    pub fn new(config: RuncConfig, spawner: Arc<dyn Spawner>) -> Self {
        Self {
            config,
            spawner,
            calls: AtomicU64::new(0),
        }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &RuncConfig {
        &self.config
    }

    fn name(&self) -> String {
        self.config
            .binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.config.binary.display().to_string())
    }

    /// Runs `<binary> <global args> <args>` and returns its stdout, or an error carrying the
    /// runtime's message.
    async fn call(&self, op: &str, args: &[&std::ffi::OsStr], io: CallIo) -> Result<Output> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        let log = self
            .config
            .log_dir
            .join(format!(".runtime-{}-{op}-{n}.log", std::process::id()));
        let mut cmd = Command::new(&self.config.binary);
        if let Some(root) = &self.config.root {
            cmd.arg("--root").arg(root);
        }
        if self.config.systemd_cgroup {
            cmd.arg("--systemd-cgroup");
        }
        cmd.args(&self.config.args);
        cmd.arg("--log").arg(&log).args(["--log-format", "json"]);
        cmd.arg(op).args(args);

        // Container stdio goes straight to the runtime (it hands it on to the process); only
        // calls without a process capture the runtime's output.
        let mut capture = None;
        match io.stdio {
            Some(stdio) => {
                let to_stdio =
                    |fd: Option<OwnedFd>| fd.map(Stdio::from).unwrap_or_else(Stdio::null);
                cmd.stdin(to_stdio(stdio.stdin));
                cmd.stdout(to_stdio(stdio.stdout));
                cmd.stderr(to_stdio(stdio.stderr));
            }
            None => {
                let (out_r, out_w) = pipe()?;
                let (err_r, err_w) = pipe()?;
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::from(out_w))
                    .stderr(Stdio::from(err_w));
                capture = Some((out_r, err_r));
            }
        }

        let result = crate::trace::child(
            || format!("{} {op}", self.name()),
            || {
                vec![
                    (
                        "process.executable.path",
                        self.config.binary.display().to_string(),
                    ),
                    ("berth.runtime.op", op.to_string()),
                ]
            },
            self.run(op, cmd, capture, &log),
        )
        .await;
        let _ = std::fs::remove_file(&log);
        result
    }

    async fn run(
        &self,
        op: &str,
        mut cmd: Command,
        capture: Option<(OwnedFd, OwnedFd)>,
        log: &Path,
    ) -> Result<Output> {
        let runtime = self.name();
        let (pid, exit) = self.spawner.spawn(&mut cmd).map_err(|e| {
            if e.is(ErrorKind::NotFound) {
                Error::new(
                    ErrorKind::FailedPrecondition,
                    format!("oci runtime {:?} not found", self.config.binary),
                )
            } else {
                e
            }
        })?;
        // The child holds the write ends now; drop ours so the reads see EOF when it exits.
        drop(cmd);

        let read_all = |fd: Option<OwnedFd>| async move {
            let mut buf = Vec::new();
            if let Some(fd) = fd
                && let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
            {
                let _ = rx.read_to_end(&mut buf).await;
            }
            buf
        };
        let (out_fd, err_fd) = match capture {
            Some((o, e)) => (Some(o), Some(e)),
            None => (None, None),
        };
        let work = async { tokio::join!(exit, read_all(out_fd), read_all(err_fd)) };
        let (exit, stdout, stderr) = match tokio::time::timeout(self.config.timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                // Signalling a pid we spawned and have not reaped yet cannot hit another
                // process: an unreaped child keeps its pid.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return Err(Error::new(
                    ErrorKind::DeadlineExceeded,
                    format!(
                        "{runtime} {op} did not finish within {:?}",
                        self.config.timeout
                    ),
                ));
            }
        };
        let exit = exit?;
        if exit.status == 0 {
            return Ok(Output { stdout });
        }
        let message = runtime_error_message(log, &stderr)
            .unwrap_or_else(|| format!("exit status {}", exit.status));
        Err(Error::new(
            classify(&message),
            format!("{runtime} {op}: {message}"),
        ))
    }

    fn id_arg(id: &str) -> &std::ffi::OsStr {
        std::ffi::OsStr::new(id)
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::internal("create pipe").with_source(e))
}

/// The most useful line a failed runtime call left: the last error in its JSON log (runc and
/// crun both write `{"level":"error","msg":...}`), else the last line of its stderr.
fn runtime_error_message(log: &Path, stderr: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Line {
        #[serde(default)]
        level: String,
        #[serde(default)]
        msg: String,
    }
    let from_log = std::fs::read_to_string(log).ok().and_then(|text| {
        text.lines()
            .filter_map(|l| serde_json::from_str::<Line>(l).ok())
            .rfind(|l| matches!(l.level.as_str(), "error" | "fatal") && !l.msg.is_empty())
            .map(|l| l.msg)
    });
    from_log.or_else(|| {
        String::from_utf8_lossy(stderr)
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .map(str::to_string)
    })
}

/// The error kind a runtime message stands for.
fn classify(message: &str) -> ErrorKind {
    let m = message.to_ascii_lowercase();
    if m.contains("does not exist") || (m.contains("not found") && m.contains("container")) {
        ErrorKind::NotFound
    } else if m.contains("already exists") {
        ErrorKind::AlreadyExists
    } else if m.contains("not running")
        || m.contains("not paused")
        || m.contains("is paused")
        || m.contains("stopped")
    {
        ErrorKind::FailedPrecondition
    } else {
        ErrorKind::Internal
    }
}

impl Runc {
    /// `create` or `run --detach`: the same arguments, the container's stdio passed on.
    async fn create_or_run(&self, op: &str, id: &str, opts: CreateOptions) -> Result<()> {
        let mut args: Vec<&std::ffi::OsStr> = Vec::new();
        if op == "run" {
            args.push("--detach".as_ref());
        }
        args.extend([
            "--bundle".as_ref(),
            opts.bundle.as_os_str(),
            "--pid-file".as_ref(),
            opts.pid_file.as_os_str(),
        ]);
        if let Some(sock) = &opts.console_socket {
            args.extend(["--console-socket".as_ref(), sock.as_os_str()]);
        }
        args.push(Self::id_arg(id));
        self.call(
            op,
            &args,
            CallIo {
                stdio: Some(opts.stdio),
            },
        )
        .await
        .map(drop)
    }
}

impl OciRuntime for Runc {
    fn create<'a>(&'a self, id: &'a str, opts: CreateOptions) -> BoxFuture<'a, ()> {
        Box::pin(self.create_or_run("create", id, opts))
    }

    /// One runtime process instead of two (a Go runtime's start-up and state load each).
    fn run<'a>(&'a self, id: &'a str, opts: CreateOptions) -> BoxFuture<'a, ()> {
        Box::pin(self.create_or_run("run", id, opts))
    }

    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.call("start", &[Self::id_arg(id)], CallIo::default())
                .await
                .map(drop)
        })
    }

    fn state<'a>(&'a self, id: &'a str) -> BoxFuture<'a, RuntimeState> {
        Box::pin(async move {
            let out = self
                .call("state", &[Self::id_arg(id)], CallIo::default())
                .await?;
            serde_json::from_slice(&out.stdout).map_err(|e| {
                Error::internal(format!("{} state: unexpected output", self.name())).with_source(e)
            })
        })
    }

    fn kill<'a>(&'a self, id: &'a str, signal: i32, all: bool) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let sig = signal.to_string();
            let mut args: Vec<&std::ffi::OsStr> = Vec::new();
            if all {
                args.push("--all".as_ref());
            }
            args.extend([Self::id_arg(id), sig.as_ref()]);
            self.call("kill", &args, CallIo::default()).await.map(drop)
        })
    }

    fn delete<'a>(&'a self, id: &'a str, force: bool) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let mut args: Vec<&std::ffi::OsStr> = Vec::new();
            if force {
                args.push("--force".as_ref());
            }
            args.push(Self::id_arg(id));
            self.call("delete", &args, CallIo::default())
                .await
                .map(drop)
        })
    }

    fn exec<'a>(&'a self, id: &'a str, opts: ExecOptions) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let mut args: Vec<&std::ffi::OsStr> = vec![
                "--detach".as_ref(),
                "--process".as_ref(),
                opts.process.as_os_str(),
                "--pid-file".as_ref(),
                opts.pid_file.as_os_str(),
            ];
            if let Some(sock) = &opts.console_socket {
                args.extend(["--console-socket".as_ref(), sock.as_os_str()]);
            }
            args.push(Self::id_arg(id));
            self.call(
                "exec",
                &args,
                CallIo {
                    stdio: Some(opts.stdio),
                },
            )
            .await
            .map(drop)
        })
    }

    fn pause<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.call("pause", &[Self::id_arg(id)], CallIo::default())
                .await
                .map(drop)
        })
    }

    fn resume<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.call("resume", &[Self::id_arg(id)], CallIo::default())
                .await
                .map(drop)
        })
    }

    fn update<'a>(&'a self, id: &'a str, resources: &'a [u8]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::Relaxed);
            let file = self
                .config
                .log_dir
                .join(format!(".resources-{}-{n}.json", std::process::id()));
            std::fs::write(&file, resources)
                .map_err(|e| Error::internal(format!("write {}", file.display())).with_source(e))?;
            let args: [&std::ffi::OsStr; 3] =
                ["--resources".as_ref(), file.as_os_str(), Self::id_arg(id)];
            let result = self
                .call("update", &args, CallIo::default())
                .await
                .map(drop);
            let _ = std::fs::remove_file(&file);
            result
        })
    }

    fn ps<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Vec<u32>> {
        Box::pin(async move {
            let args: [&std::ffi::OsStr; 3] =
                ["--format".as_ref(), "json".as_ref(), Self::id_arg(id)];
            let out = self.call("ps", &args, CallIo::default()).await?;
            let pids: Option<Vec<u32>> = serde_json::from_slice(&out.stdout).map_err(|e| {
                Error::internal(format!("{} ps: unexpected output", self.name())).with_source(e)
            })?;
            Ok(pids.unwrap_or_default())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::reaper::TokioSpawner;

    fn runtime(binary: &str, dir: &Path) -> Runc {
        Runc::new(RuncConfig::new(binary, dir), Arc::new(TokioSpawner))
    }

    /// A fake runtime: a shell script that records its arguments and answers like runc.
    fn fake(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("fake-runtime");
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho \"$@\" >> {}/args\n{body}\n", dir.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn true_succeeds_and_false_fails_with_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let ok = runtime("/bin/true", dir.path());
        ok.start("c1").await.unwrap();
        ok.kill("c1", 15, true).await.unwrap();
        ok.create(
            "c1",
            CreateOptions {
                bundle: dir.path().into(),
                pid_file: dir.path().join("pid"),
                console_socket: None,
                stdio: ProcessStdio::default(),
            },
        )
        .await
        .unwrap();
        let bad = runtime("/bin/false", dir.path());
        let err = bad.start("c1").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Internal);
        assert_eq!(err.message(), "false start: exit status 1");
        // No per-call log files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[tokio::test]
    async fn missing_binary_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = runtime("/nonexistent/runc", dir.path())
            .start("c1")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(err.chain().contains("/nonexistent/runc"), "{}", err.chain());
    }

    #[tokio::test]
    async fn arguments_follow_the_runc_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake(dir.path(), "");
        let mut cfg = RuncConfig::new(&bin, dir.path());
        cfg.root = Some("/run/r".into());
        cfg.systemd_cgroup = true;
        cfg.args = vec!["--debug".into()];
        let rt = Runc::new(cfg, Arc::new(TokioSpawner));
        rt.kill("c1", 9, true).await.unwrap();
        rt.delete("c1", true).await.unwrap();
        rt.exec(
            "c1",
            ExecOptions {
                process: "/b/p.json".into(),
                pid_file: "/b/p.pid".into(),
                console_socket: Some("/s/c.sock".into()),
                stdio: ProcessStdio::default(),
            },
        )
        .await
        .unwrap();
        OciRuntime::run(
            &rt,
            "c1",
            CreateOptions {
                bundle: "/b".into(),
                pid_file: "/b/init.pid".into(),
                console_socket: None,
                stdio: ProcessStdio::default(),
            },
        )
        .await
        .unwrap();
        let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
        let lines: Vec<String> = args
            .lines()
            .map(|l| {
                // The per-call log file name varies; normalise it.
                let words: Vec<&str> = l.split(' ').collect();
                let i = words.iter().position(|w| *w == "--log").unwrap();
                let mut w: Vec<String> = words.iter().map(|s| s.to_string()).collect();
                w[i + 1] = "LOG".into();
                w.join(" ")
            })
            .collect();
        let prefix = "--root /run/r --systemd-cgroup --debug --log LOG --log-format json";
        assert_eq!(
            lines,
            [
                format!("{prefix} kill --all c1 9"),
                format!("{prefix} delete --force c1"),
                format!(
                    "{prefix} exec --detach --process /b/p.json --pid-file /b/p.pid \
                     --console-socket /s/c.sock c1"
                ),
                format!("{prefix} run --detach --bundle /b --pid-file /b/init.pid c1"),
            ]
        );
    }

    #[tokio::test]
    async fn state_and_ps_parse_runtime_output() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake(
            dir.path(),
            r#"case "$*" in
  *" state "*) echo '{"ociVersion":"1.0.2","id":"c1","pid":42,"status":"running","bundle":"/b"}' ;;
  *" ps "*) echo '[42,43]' ;;
esac"#,
        );
        let rt = runtime(bin.to_str().unwrap(), dir.path());
        let st = rt.state("c1").await.unwrap();
        assert_eq!(
            st,
            RuntimeState {
                id: "c1".into(),
                pid: 42,
                status: "running".into()
            }
        );
        assert_eq!(rt.ps("c1").await.unwrap(), [42, 43]);
    }

    #[tokio::test]
    async fn errors_carry_the_runtime_message() {
        let dir = tempfile::tempdir().unwrap();
        // Like runc: the JSON log gets the error, stderr a copy.
        let bin = fake(
            dir.path(),
            r#"while [ "$1" != "--log" ]; do shift; done
echo '{"level":"warning","msg":"ignored"}' >> "$2"
echo '{"level":"error","msg":"container \"c1\" does not exist"}' >> "$2"
echo 'container "c1" does not exist' >&2
exit 1"#,
        );
        let rt = runtime(bin.to_str().unwrap(), dir.path());
        let err = rt.state("c1").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(
            err.message(),
            "fake-runtime state: container \"c1\" does not exist"
        );

        // Without a log, stderr's last line is the message.
        let bin = fake(
            dir.path(),
            "echo 'first' >&2; echo 'cgroups in hybrid mode not supported' >&2; exit 1",
        );
        let rt = runtime(bin.to_str().unwrap(), dir.path());
        let err = rt.start("c1").await.unwrap_err();
        assert_eq!(
            err.message(),
            "fake-runtime start: cgroups in hybrid mode not supported"
        );
    }

    #[tokio::test]
    async fn a_hanging_runtime_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake(dir.path(), "exec sleep 30");
        let mut cfg = RuncConfig::new(&bin, dir.path());
        cfg.timeout = Duration::from_millis(300);
        let rt = Runc::new(cfg, Arc::new(TokioSpawner));
        let t = std::time::Instant::now();
        let err = rt.start("c1").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
