//! Test kit for the Docker API gateway: a `berth up` stack driven by the real `docker` CLI and
//! by bollard, with every container removed through the API when the kit is dropped (before the
//! stack itself goes), so no shim outlives a test even when it fails.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use berth_core::Service;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::stack::{Stack, running, wait_for};

/// `false` (and a note) when this machine cannot run the gateway tests: they need root, the
/// docker CLI, a registry and the tools the images kit uses.
pub fn ready() -> bool {
    if !crate::images_kit::ready() {
        return false;
    }
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join("docker").is_file()))
        .unwrap_or(false);
    if !found {
        eprintln!("skipped: the docker CLI is not installed");
    }
    found
}

/// Runs `cmd` with a deadline; a command still running then is killed (by its PID) and the
/// output so far returned with a failed status.
pub fn run_for(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

/// A child process killed by PID when dropped (`docker logs -f`, `docker attach`, ...).
#[derive(Debug)]
pub struct Running {
    child: Child,
    out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    err: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Running {
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {cmd:?}"))?;
        let collect = |mut r: Box<dyn Read + Send>| {
            let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let b = buf.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = r.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    b.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            });
            buf
        };
        let out = collect(Box::new(child.stdout.take().context("stdout")?));
        let err = collect(Box::new(child.stderr.take().context("stderr")?));
        Ok(Self { child, out, err })
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// Waits until stdout satisfies `pred`.
    pub fn wait_stdout(&self, limit: Duration, pred: impl Fn(&str) -> bool) -> bool {
        wait_for(limit, || pred(&self.stdout()).then_some(())).is_some()
    }

    /// The exit status, once the process has exited (within `limit`).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_for(limit, || self.child.try_wait().ok().flatten())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// A stack for Docker API tests.
#[derive(Debug)]
pub struct DockerStack {
    /// The stack (dropped after the containers are removed).
    pub stack: Stack,
}

/// How long a single docker command may take before the test calls it hung.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(60);

impl DockerStack {
    /// Starts a stack with the default config (its own bridge and subnets).
    pub fn start() -> Result<Self> {
        Ok(Self {
            stack: Stack::start()?,
        })
    }

    /// Starts a stack with extra berth.toml text.
    pub fn start_with(toml: &str) -> Result<Self> {
        Ok(Self {
            stack: Stack::builder().toml(toml).start()?,
        })
    }

    /// Starts a stack from `builder` (extra TOML, environment).
    pub fn start_from(builder: crate::stack::StackBuilder) -> Result<Self> {
        Ok(Self {
            stack: builder.start()?,
        })
    }

    /// The Docker API socket.
    pub fn socket(&self) -> PathBuf {
        self.stack.docker_socket()
    }

    /// The Kubernetes CRI socket (served by the gateway).
    pub fn cri_socket(&self) -> PathBuf {
        self.stack.state_dir().join("cri.sock")
    }

    /// A `docker` command aimed at this stack.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = self.stack.docker();
        c.args(args);
        c
    }

    /// Runs `docker args...` to completion (or the command limit).
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        run_for(&mut self.cmd(args), COMMAND_LIMIT)
    }

    /// Runs `docker args...` and returns its trimmed stdout; fails with its stderr otherwise.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        ensure!(
            out.status.success(),
            "docker {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }

    /// Runs `docker args...`, expects it to fail, and returns its stderr.
    pub fn fails(&self, args: &[&str]) -> Result<(i32, String)> {
        let out = self.run(args)?;
        ensure!(
            !out.status.success(),
            "docker {} succeeded unexpectedly: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Starts a long-running `docker args...` (killed by PID on drop).
    pub fn spawn(&self, args: &[&str]) -> Result<Running> {
        Running::spawn(&mut self.cmd(args))
    }

    /// Runs `docker args...` inside a pseudo-terminal (`script -qec`), for `-it`.
    pub fn in_pty(&self, args: &str) -> Result<Output> {
        let mut c = Command::new("script");
        c.arg("-qec")
            .arg(format!("docker {args}"))
            .arg("/dev/null")
            .envs(
                self.stack
                    .docker()
                    .get_envs()
                    .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))),
            );
        run_for(&mut c, COMMAND_LIMIT)
    }

    /// A bollard client on this stack's socket, speaking the API version berth advertises.
    pub fn bollard(&self) -> Result<bollard::Docker> {
        let sock = self.socket();
        bollard::Docker::connect_with_unix(
            sock.to_str().context("socket path")?,
            120,
            &bollard::ClientVersion {
                major_version: 1,
                minor_version: 45,
            },
        )
        .context("bollard connect")
    }

    /// `kill -9`s the gateway and waits until `berth up` has restarted it and it answers.
    pub fn kill9_gateway(&self) -> Result<(i32, i32)> {
        self.kill9(Service::Gateway)
    }

    /// `kill -9`s `service` and waits until `berth up` has restarted it and `docker ps`
    /// (gateway → engine) answers again. Returns the old and the new PID.
    pub fn kill9(&self, service: Service) -> Result<(i32, i32)> {
        let old = self.stack.pid(service).context("service pid")?;
        kill(Pid::from_raw(old), Signal::SIGKILL)?;
        let new = wait_for(Duration::from_secs(20), || {
            let pid = self.stack.pid(service)?;
            (pid != old && running(pid) && self.run(&["ps"]).is_ok_and(|o| o.status.success()))
                .then_some(pid)
        });
        match new {
            Some(pid) => Ok((old, pid)),
            None => bail!(
                "{} was not restarted after kill -9; log:\n{}",
                service.name(),
                self.stack.log_text()
            ),
        }
    }

    /// Every container id, running or not.
    pub fn container_ids(&self) -> Vec<String> {
        self.run(&["ps", "-aq", "--no-trunc"])
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for DockerStack {
    fn drop(&mut self) {
        // Containers go through the API, so their shims, mounts and network attachments are
        // released by the services themselves; the stack's own cleanup catches the rest.
        let ids = self.container_ids();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids.iter().map(String::as_str));
            let _ = self.run(&args);
        }
    }
}

/// Reads a plain-HTTP GET of `path` from `addr` (what curl would do), with a timeout.
pub fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// A file in `dir` with `content`.
pub fn write_file(dir: &Path, name: &str, content: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, content)?;
    Ok(p)
}

/// A raw HTTP/1.1 request to a Docker API socket (`Connection: close`), for inputs the CLI
/// never sends (bad JSON). Returns the status code, the lowercased header block and the body.
pub fn raw_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String, String)> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").context("no header end")?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status")?;
    // A chunked body: keep only the chunk payloads.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = rest;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        rest.to_string()
    };
    Ok((code, head.to_ascii_lowercase(), body))
}
