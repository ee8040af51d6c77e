//! Test kit for `berth-shim`: a busybox bundle on a temp dir (rootfs bind-mounted by the shim),
//! the real binary started with `berth-shim start`, a gRPC client on its socket, a fake events
//! hub, and cleanup that runs on drop (so also when a test fails): the shim is killed by the
//! PID it wrote, the container is deleted from runc (its own `--root` per test), the rootfs is
//! unmounted and the cgroups are removed.
//!
//! Binaries are looked up in `BERTH_BIN_DIR`, else `<workspace>/target/debug`; build them first
//! (`cargo build -p berth-shim`). Every test needs root and runc, and skips cleanly otherwise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use berth_proto::berth::events::v1 as ev;
use berth_proto::berth::shim::v1 as pb;
use berth_proto::berth::shim::v1::shim_client::ShimClient;
use berth_proto::berth::types::v1 as types;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// A client of one shim.
pub type Client = ShimClient<berth_core::uds::Channel>;

/// Where the berth binaries are: `BERTH_BIN_DIR`, else `<workspace>/target/debug`.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("BERTH_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"),
    }
}

/// The `berth-shim` binary; panics with how to build it when it is missing.
pub fn shim_binary() -> PathBuf {
    let path = bin_dir().join("berth-shim");
    assert!(
        path.is_file(),
        "{} not found: build it first (cargo build -p berth-shim) or point BERTH_BIN_DIR at it",
        path.display()
    );
    path
}

/// True (after printing why) when shim tests cannot run here: they need root and runc.
pub fn skip() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: shim tests need root (they mount and run containers)");
        return true;
    }
    for program in ["runc", "busybox"] {
        if which(program).is_none() {
            eprintln!("skipping: {program} is not installed");
            return true;
        }
    }
    false
}

/// The full path of `program` on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Makes a busybox root filesystem in `dir`: `/bin/busybox` (hard-linked from the host's
/// busybox-static when possible) with every applet as a symlink.
pub fn busybox_rootfs(dir: &Path) -> Result<()> {
    let host = which("busybox").context("busybox is not installed")?;
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let target = dir.join("bin/busybox");
    if std::fs::hard_link(&host, &target).is_err() {
        std::fs::copy(&host, &target)?;
    }
    let list = Command::new(&host)
        .arg("--list")
        .output()
        .context("busybox --list")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        // `busybox` itself is in the list; a symlink would replace the binary.
        if applet.is_empty() || applet == "busybox" {
            continue;
        }
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\n")?;
    Ok(())
}

/// A minimal runc config.json: pid, ipc, uts and mount namespaces, `cgroups_path`.
pub fn spec(args: &[&str], terminal: bool, cgroups_path: &str) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_AUDIT_WRITE", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"],
                "effective": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_AUDIT_WRITE", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"],
                "permitted": ["CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_AUDIT_WRITE", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"]
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "shimtest",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}
        ],
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// An exec `process` spec running `args`.
pub fn exec_spec(args: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "args": args,
        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
        "cwd": "/",
        "user": {"uid": 0, "gid": 0}
    }))
    .unwrap()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique, runc-valid container id starting with `prefix`.
pub fn unique_id(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

/// One container's bundle and (once started) its shim. Dropping it cleans everything up.
#[derive(Debug)]
pub struct ShimTest {
    /// The temp dir holding everything below.
    pub dir: tempfile::TempDir,
    /// Container id.
    pub id: String,
    /// The bundle (config.json; the rootfs gets mounted at bundle/rootfs).
    pub bundle: PathBuf,
    /// The prepared busybox tree, bind-mounted by the shim onto bundle/rootfs.
    pub rootfs_source: PathBuf,
    /// runc's `--root` for this test only.
    pub runtime_root: PathBuf,
    /// The shim's `--state-dir`.
    pub state_dir: PathBuf,
    /// The container's cgroups path.
    pub cgroups_path: String,
    /// Address printed by `start`.
    pub address: Option<String>,
    /// PID of the shim (from bundle/shim.pid).
    pub shim_pid: Option<i32>,
}

impl ShimTest {
    /// A bundle whose container runs `args` (with a terminal when `terminal`).
    pub fn new(prefix: &str, args: &[&str], terminal: bool) -> Result<Self> {
        Self::with_bundle_dir(prefix, args, terminal, None)
    }

    /// Like [`Self::new`], with the bundle at `bundle_rel` inside the temp dir (to test long
    /// bundle paths).
    pub fn with_bundle_dir(
        prefix: &str,
        args: &[&str],
        terminal: bool,
        bundle_rel: Option<&str>,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("bshim")
            .tempdir_in("/tmp")?;
        let id = unique_id(prefix);
        let bundle = dir.path().join(bundle_rel.unwrap_or("bundle"));
        std::fs::create_dir_all(&bundle)?;
        let rootfs_source = dir.path().join("rootfs-src");
        busybox_rootfs(&rootfs_source)?;
        let cgroups_path = format!("/berth-shimtest-{id}");
        let config = spec(args, terminal, &cgroups_path);
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&config)?,
        )?;
        let runtime_root = dir.path().join("runc");
        let state_dir = dir.path().join("state");
        Ok(Self {
            dir,
            id,
            bundle,
            rootfs_source,
            runtime_root,
            state_dir,
            cgroups_path,
            address: None,
            shim_pid: None,
        })
    }

    /// The `berth-shim start` command line for this bundle.
    pub fn start_command(&self) -> Command {
        let mut cmd = Command::new(shim_binary());
        cmd.arg("start")
            .arg("--id")
            .arg(&self.id)
            .arg("--bundle")
            .arg(&self.bundle)
            .arg("--runtime-root")
            .arg(&self.runtime_root)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--log-level")
            .arg("debug");
        cmd
    }

    /// Runs `berth-shim start` and records the address and PID.
    pub fn start_shim(&mut self) -> Result<String> {
        let out = self
            .start_command()
            .output()
            .context("run berth-shim start")?;
        if !out.status.success() {
            bail!(
                "berth-shim start failed ({}): {}\nshim.log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.shim_log()
            );
        }
        let address = String::from_utf8(out.stdout)?.trim().to_string();
        self.adopt(&address)?;
        Ok(address)
    }

    /// Records a shim started some other way (by its printed address).
    pub fn adopt(&mut self, address: &str) -> Result<()> {
        self.address = Some(address.to_string());
        let pid = std::fs::read_to_string(self.bundle.join("shim.pid")).context("read shim.pid")?;
        self.shim_pid = Some(pid.trim().parse()?);
        Ok(())
    }

    /// The socket path from the address.
    pub fn socket(&self) -> PathBuf {
        let address = self.address.as_deref().expect("shim started");
        PathBuf::from(address.strip_prefix("unix://").unwrap_or(address))
    }

    /// A new client on the shim's socket.
    pub fn client(&self) -> Client {
        ShimClient::new(berth_core::uds::channel(self.socket()))
    }

    /// A Create request for this bundle: the rootfs as one bind mount, runc with this test's
    /// root.
    pub fn create_request(&self, mode: pb::StdioMode, stdin: bool) -> pb::CreateRequest {
        pb::CreateRequest {
            id: self.id.clone(),
            bundle: self.bundle.display().to_string(),
            rootfs: vec![berth_proto::containerd::types::Mount {
                r#type: "bind".into(),
                source: self.rootfs_source.display().to_string(),
                target: String::new(),
                options: vec!["rbind".into(), "rw".into()],
            }],
            stdio: Some(pb::Stdio {
                mode: mode as i32,
                stdin,
                terminal_size: (mode == pb::StdioMode::Tty).then_some(types::TerminalSize {
                    width: 80,
                    height: 24,
                }),
            }),
            log: Some(pb::LogConfig {
                format: pb::LogFormat::JsonFile as i32,
                path: self.log_path().display().to_string(),
                ..Default::default()
            }),
            runtime: Some(pb::RuntimeConfig {
                binary: "runc".into(),
                root: self.runtime_root.display().to_string(),
                ..Default::default()
            }),
            events_address: String::new(),
            namespace: "test".into(),
            start: false,
            hold_output_for: 0,
            health: None,
        }
    }

    /// Where the container log goes.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("logs/container.log")
    }

    /// The json-file log as (stream, log) pairs.
    pub fn log_lines(&self) -> Vec<(String, String)> {
        read_json_log(&self.log_path())
    }

    /// The shim's own log.
    pub fn shim_log(&self) -> String {
        std::fs::read_to_string(self.bundle.join("shim.log")).unwrap_or_default()
    }

    /// Whether the shim process is alive.
    pub fn shim_alive(&self) -> bool {
        self.shim_pid.is_some_and(running)
    }

    /// The shim's resident memory, from /proc/<pid>/status.
    pub fn shim_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.shim_pid?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for ShimTest {
    fn drop(&mut self) {
        if let Some(pid) = self.shim_pid
            && running(pid)
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            wait_gone(pid, Duration::from_secs(5));
        }
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&self.runtime_root)
            .args(["delete", "--force", &self.id])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = berth_core::mount::unmount_all(&self.bundle.join("rootfs"));
        remove_cgroups(&self.cgroups_path);
    }
}

/// Removes `path` from every cgroup hierarchy (runc delete normally already did).
pub fn remove_cgroups(path: &str) {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in entries.flatten() {
            let _ = std::fs::remove_dir(e.path().join(rel));
        }
    }
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(rel));
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

fn wait_gone(pid: i32, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while running(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A json-file log as (stream, log) pairs; lines that do not parse are skipped.
pub fn read_json_log(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((
                v["stream"].as_str()?.to_string(),
                v["log"].as_str()?.to_string(),
            ))
        })
        .collect()
}

/// An attached client: options sent, `ready` received.
#[derive(Debug)]
pub struct Attached {
    /// Sends input messages.
    pub input: mpsc::Sender<pb::AttachRequest>,
    /// The server's messages after `ready`.
    pub output: tonic::Streaming<pb::AttachResponse>,
    /// Whether the process has a terminal (from `ready`).
    pub terminal: bool,
}

/// Attaches with `options`; returns once the shim said `ready`.
pub async fn attach(client: &mut Client, options: pb::AttachOptions) -> Result<Attached> {
    let (input, rx) = mpsc::channel(16);
    input
        .send(pb::AttachRequest {
            event: Some(pb::attach_request::Event::Options(options)),
        })
        .await?;
    let mut output = client.attach(ReceiverStream::new(rx)).await?.into_inner();
    let first = output
        .message()
        .await?
        .context("attach stream ended before ready")?;
    let Some(pb::attach_response::Event::Ready(ready)) = first.event else {
        bail!("first attach message was not ready: {first:?}");
    };
    Ok(Attached {
        input,
        output,
        terminal: ready.terminal,
    })
}

impl Attached {
    /// Sends stdin bytes.
    pub async fn send(&self, data: &[u8]) -> Result<()> {
        self.input
            .send(pb::AttachRequest {
                event: Some(pb::attach_request::Event::Data(data.to_vec())),
            })
            .await?;
        Ok(())
    }

    /// Closes the process' stdin.
    pub async fn close_stdin(&self) -> Result<()> {
        self.input
            .send(pb::AttachRequest {
                event: Some(pb::attach_request::Event::CloseStdin(pb::CloseStdin {})),
            })
            .await?;
        Ok(())
    }

    /// Everything until `end`: (stdout, stderr, exit status from `end`).
    pub async fn collect(mut self, timeout: Duration) -> Result<(String, String, Option<u32>)> {
        let mut out = String::new();
        let mut err = String::new();
        let collect = async {
            while let Some(msg) = self.output.message().await? {
                match msg.event {
                    Some(pb::attach_response::Event::Output(c)) => {
                        let text = String::from_utf8_lossy(&c.data);
                        if c.stream == types::OutputStream::Stderr as i32 {
                            err.push_str(&text);
                        } else {
                            out.push_str(&text);
                        }
                    }
                    Some(pb::attach_response::Event::End(end)) => return Ok(end.exit_status),
                    _ => {}
                }
            }
            bail!("attach stream ended without end")
        };
        let status = tokio::time::timeout(timeout, collect)
            .await
            .context("attach timed out")??;
        Ok((out, err, status))
    }
}

/// A fake events hub (`berth.events.v1.Events`) that records what is published.
#[derive(Debug, Clone, Default)]
pub struct FakeHub {
    /// Envelopes received, in order.
    pub received: Arc<Mutex<Vec<ev::Envelope>>>,
}

#[tonic::async_trait]
impl ev::events_server::Events for FakeHub {
    async fn publish(
        &self,
        req: tonic::Request<ev::PublishRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        if let Some(env) = req.into_inner().envelope {
            self.received.lock().unwrap().push(env);
        }
        Ok(tonic::Response::new(()))
    }

    type SubscribeStream = ReceiverStream<Result<ev::SubscribeResponse, tonic::Status>>;

    async fn subscribe(
        &self,
        _req: tonic::Request<ev::SubscribeRequest>,
    ) -> Result<tonic::Response<Self::SubscribeStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake hub"))
    }
}

impl FakeHub {
    /// Serves the hub on `socket` until the returned handle is aborted.
    pub async fn serve(&self, socket: &Path) -> Result<tokio::task::JoinHandle<()>> {
        let listener = berth_core::uds::bind(socket, 0o600, None).await?;
        let svc = ev::events_server::EventsServer::new(self.clone());
        Ok(tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await;
        }))
    }

    /// Task exit payloads received: (exec_id, exit_status).
    pub fn exits(&self) -> Vec<(String, u32)> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match &e.payload {
                Some(ev::envelope::Payload::TaskExit(x)) => {
                    Some((x.exec_id.clone(), x.exit_status))
                }
                _ => None,
            })
            .collect()
    }

    /// Topics received, in order.
    pub fn topics(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.topic.clone())
            .collect()
    }

    /// How many of each topic.
    pub fn topic_counts(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for t in self.topics() {
            *m.entry(t).or_default() += 1;
        }
        m
    }
}

/// Polls `f` every 20 ms until it returns `Some`, for at most `timeout`.
pub async fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
