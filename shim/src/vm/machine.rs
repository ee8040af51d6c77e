//! One `berth-vm` virtual machine: vhost-device-vsock (the agent's vsock), virtiofsd (the shared
//! directory, tag `berth`) and QEMU, started together and torn down together.
//!
//! The three processes are children of the caller, spawned through its [`Spawner`] (the shim's
//! reaper), and killed by pid; nothing relies on `PR_SET_PDEATHSIG`, which would fire when the
//! spawning *thread* exits in a long-lived, multi-threaded shim. Their pids are also written to
//! `<state_dir>/machine.json`, so a later process (a restarted shim, `berth-shim delete`) can
//! kill a VM whose owner died ([`kill_recorded`]).
//!
//! The agent is reached through vhost-device-vsock's host-side Unix socket ([`agent_socket`]):
//! a client connects, writes `CONNECT <port>\n`, reads `OK <n>\n`, and from then on the
//! connection is a byte stream to the guest's port ([`dial`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use berth_core::{Context, Error, ErrorKind, Result};
use berth_proto::berth::agent::v1::agent_client::AgentClient;
use berth_proto::berth::agent::v1::{Empty, PingRequest, PingResponse};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint, Uri};

use super::guest::GuestImage;
use crate::reaper::Spawner;

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// The guest's vsock context id (each VM has its own vhost-device-vsock, so it is always 3).
pub const GUEST_CID: u32 = 3;
/// The virtio-fs tag of the shared directory.
pub const SHARE_TAG: &str = "berth";

/// How long [`Accel::Auto`] waits for a guest under KVM before falling back to TCG.
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The record of a running VM's processes, in the state directory.
const RECORD: &str = "machine.json";

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's binary translator: slow, but runs anywhere.
    Tcg,
    /// KVM when /dev/kvm opens and the guest comes up under it, else TCG.
    Auto,
}

impl std::str::FromStr for Accel {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            "auto" => Ok(Self::Auto),
            _ => Err(Error::invalid_argument(format!(
                "accelerator {s:?}: expected kvm, tcg or auto"
            ))),
        }
    }
}

impl Accel {
    fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
            Self::Auto => "auto",
        }
    }
}

/// The guest's NIC: a tap device the host side created (in `netns`, when set), opened by QEMU by
/// name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapConfig {
    /// The tap's name.
    pub ifname: String,
    /// The guest NIC's MAC address, "aa:bb:cc:dd:ee:ff".
    pub mac: String,
    /// The network namespace QEMU joins before opening the tap.
    pub netns: Option<PathBuf>,
}

/// How to start one VM.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `virtiofsd`.
    pub virtiofsd: PathBuf,
    /// `vhost-device-vsock`.
    pub vhost_vsock: PathBuf,
    /// The accelerator to use.
    pub accel: Accel,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory.
    pub memory_mib: u64,
    /// The kernel and initramfs (from [`super::guest::ensure`]).
    pub image: GuestImage,
    /// The host directory shared into the guest at tag `berth` (`/run/berth/share` there).
    pub share_dir: PathBuf,
    /// Sockets, logs and the process record. Keep the path short: Unix socket paths are limited
    /// to 107 bytes.
    pub state_dir: PathBuf,
    /// The guest NIC, if any.
    pub tap: Option<TapConfig>,
    /// How long the agent has to answer `Ping` after QEMU starts.
    pub agent_timeout: Duration,
}

/// The host-side Unix socket of the VM's vsock, for [`dial`].
pub fn agent_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("vsock.sock")
}

/// QEMU's log: the guest's serial console followed by QEMU's own stderr.
pub fn console_log(state_dir: &Path) -> PathBuf {
    state_dir.join("console.log")
}

fn vhost_vsock_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("vhost-vsock.sock")
}

fn virtiofs_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("virtiofs.sock")
}

/// What `<state_dir>/machine.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct Record {
    /// Process name → pid.
    pids: BTreeMap<String, u32>,
    accel: Option<Accel>,
}

/// One started process of the VM.
#[derive(Debug)]
struct Proc {
    name: &'static str,
    pid: u32,
    /// The exit status, once the spawner reaped it.
    exited: watch::Receiver<Option<u32>>,
}

impl Proc {
    fn spawn(spawner: &dyn Spawner, name: &'static str, cmd: &mut Command) -> Result<Self> {
        let (pid, exit) = spawner.spawn(cmd)?;
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = match exit.await {
                Ok(e) => e.status,
                Err(_) => 255,
            };
            let _ = tx.send(Some(status));
        });
        tracing::debug!(name, pid, "vm process started");
        Ok(Self {
            name,
            pid,
            exited: rx,
        })
    }

    fn has_exited(&self) -> Option<u32> {
        *self.exited.borrow()
    }

    async fn wait(&mut self) -> u32 {
        match self.exited.wait_for(Option::is_some).await {
            Ok(s) => s.unwrap_or(255),
            Err(_) => 255,
        }
    }

    fn kill(&self) {
        if self.has_exited().is_none() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
    }
}

/// A running VM with its agent answering.
#[derive(Debug)]
pub struct Machine {
    state_dir: PathBuf,
    accel: Accel,
    procs: Vec<Proc>,
    agent: AgentClient<Channel>,
    ping: PingResponse,
}

impl Machine {
    /// Starts the VM's processes and waits until the agent answers `Ping`, for at most
    /// `cfg.agent_timeout` (then everything started is torn down and the error, of kind
    /// `DeadlineExceeded`, quotes the end of the console log). With [`Accel::Auto`], KVM is tried
    /// when /dev/kvm opens; a guest that does not come up under KVM within
    /// [`KVM_PROBE_TIMEOUT`] (it boots in about a second when KVM works) is restarted with TCG.
    /// Where /dev/kvm opens but cannot run the guest (nested PVM hosts), `Auto` therefore costs
    /// that much on every start: configure `Tcg` there.
    pub async fn start(cfg: MachineConfig, spawner: Arc<dyn Spawner>) -> Result<Self> {
        match cfg.accel {
            Accel::Kvm | Accel::Tcg => {
                Self::start_with(&cfg, spawner.as_ref(), cfg.accel, None).await
            }
            Accel::Auto if !kvm_usable() => {
                Self::start_with(&cfg, spawner.as_ref(), Accel::Tcg, None).await
            }
            Accel::Auto => {
                let kvm_timeout = cfg.agent_timeout.min(KVM_PROBE_TIMEOUT);
                match Self::start_with(&cfg, spawner.as_ref(), Accel::Kvm, Some(kvm_timeout)).await
                {
                    Ok(m) => Ok(m),
                    Err(err) => {
                        tracing::warn!(error = %err.chain(), "guest did not come up with KVM; retrying with TCG");
                        Self::start_with(&cfg, spawner.as_ref(), Accel::Tcg, None).await
                    }
                }
            }
        }
    }

    async fn start_with(
        cfg: &MachineConfig,
        spawner: &dyn Spawner,
        accel: Accel,
        timeout: Option<Duration>,
    ) -> Result<Self> {
        let dir = &cfg.state_dir;
        std::fs::create_dir_all(dir).internal(|| format!("create {}", dir.display()))?;
        for stale in [
            agent_socket(dir),
            vhost_vsock_socket(dir),
            virtiofs_socket(dir),
            console_log(dir),
        ] {
            let _ = std::fs::remove_file(stale);
        }
        let mut procs = Vec::with_capacity(3);
        let result = async {
            let vsock = Proc::spawn(spawner, "vhost-device-vsock", &mut vhost_vsock_cmd(cfg)?)?;
            procs.push(vsock);
            let fs = Proc::spawn(spawner, "virtiofsd", &mut virtiofsd_cmd(cfg)?)?;
            procs.push(fs);
            write_record(dir, &procs, accel)?;
            wait_for_path(&procs, &vhost_vsock_socket(dir)).await?;
            wait_for_path(&procs, &virtiofs_socket(dir)).await?;
            let qemu = Proc::spawn(spawner, "qemu", &mut qemu_cmd(cfg, accel)?)?;
            procs.push(qemu);
            write_record(dir, &procs, accel)?;
            wait_for_agent(dir, &procs, timeout.unwrap_or(cfg.agent_timeout)).await
        }
        .await;
        match result {
            Ok((agent, ping)) => {
                tracing::info!(
                    state_dir = %dir.display(),
                    accel = accel.as_str(),
                    kernel = %ping.kernel_release,
                    "vm up"
                );
                Ok(Self {
                    state_dir: dir.clone(),
                    accel,
                    procs,
                    agent,
                    ping,
                })
            }
            Err(err) => {
                teardown(&mut procs).await;
                let _ = std::fs::remove_file(dir.join(RECORD));
                Err(err)
            }
        }
    }

    /// A client of the agent (cheap to clone).
    pub fn agent(&self) -> AgentClient<Channel> {
        self.agent.clone()
    }

    /// The agent's answer to the first `Ping` (guest kernel release, agent version).
    pub fn ping(&self) -> &PingResponse {
        &self.ping
    }

    /// The accelerator the VM runs with ([`Accel::Kvm`] or [`Accel::Tcg`], never `Auto`).
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Process name ("vhost-device-vsock", "virtiofsd", "qemu") → pid, of those still running.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.procs
            .iter()
            .filter(|p| p.has_exited().is_none())
            .map(|p| (p.name, p.pid))
            .collect()
    }

    /// Waits until QEMU exits (the guest powered off, crashed or was killed) and returns its
    /// exit status.
    pub async fn wait(&mut self) -> u32 {
        match self.procs.iter_mut().find(|p| p.name == "qemu") {
            Some(p) => p.wait().await,
            None => 255,
        }
    }

    /// Asks the agent to power the guest off, gives QEMU `grace` to exit, then kills whatever is
    /// left and removes the sockets and the process record.
    pub async fn shutdown(&mut self, grace: Duration) {
        let mut agent = self.agent.clone();
        let asked = tokio::time::timeout(grace, agent.shutdown(Empty {})).await;
        if matches!(asked, Ok(Ok(_))) {
            let qemu = self.procs.iter_mut().find(|p| p.name == "qemu");
            if let Some(q) = qemu {
                let _ = tokio::time::timeout(grace, q.wait()).await;
            }
        }
        self.kill().await;
    }

    /// Kills the VM's processes at once, waits for the reaper to collect them, and removes the
    /// sockets and the process record.
    pub async fn kill(&mut self) {
        teardown(&mut self.procs).await;
        remove_state(&self.state_dir);
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // A machine dropped without `kill`/`shutdown` must not leave a VM behind; the reaper
        // still collects the exits.
        for p in &self.procs {
            p.kill();
        }
    }
}

/// The VM processes recorded in `<state_dir>/machine.json` (name → pid) and the accelerator,
/// for a process that did not start the VM; empty when there is no record.
pub fn recorded(state_dir: &Path) -> Result<(BTreeMap<String, u32>, Option<Accel>)> {
    let path = state_dir.join(RECORD);
    match std::fs::read(&path) {
        Ok(b) => {
            let r: Record =
                serde_json::from_slice(&b).internal(|| format!("parse {}", path.display()))?;
            Ok((r.pids, r.accel))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((BTreeMap::new(), None)),
        Err(e) => Err(Error::internal(format!("read {}", path.display())).with_source(e)),
    }
}

/// Kills the processes recorded in `<state_dir>/machine.json` by a process that is gone (a
/// crashed shim), and removes the record and sockets. A pid is killed only while its command
/// line still names `state_dir`, so a reused pid is left alone. Returns the pids killed.
pub fn kill_recorded(state_dir: &Path) -> Result<Vec<u32>> {
    let (pids, _) = recorded(state_dir)?;
    let needle = state_dir.as_os_str().as_encoded_bytes();
    let mut killed = Vec::new();
    for &pid in pids.values() {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle)
            && kill(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok()
        {
            killed.push(pid);
        }
    }
    remove_state(state_dir);
    Ok(killed)
}

/// Dials the guest's vsock `port` through vhost-device-vsock's host-side socket (see
/// [`agent_socket`]). The returned channel redials the same way after a failure.
pub async fn dial(vsock_socket: &Path, port: u32) -> Result<Channel> {
    let path = vsock_socket.to_path_buf();
    Endpoint::from_static("http://berth-agent.vsock")
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { connect_stream(&path, port).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| {
            Error::unavailable(format!(
                "dial vsock port {port} through {}",
                vsock_socket.display()
            ))
            .with_source(e)
        })
}

/// Connects a byte stream to the guest's vsock `port` (the `CONNECT` handshake).
pub async fn connect_stream(vsock_socket: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(vsock_socket).await?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    // Byte by byte: whatever follows the newline already belongs to the guest's stream.
    let mut line = Vec::with_capacity(16);
    let read = async {
        loop {
            let b = s.read_u8().await?;
            if b == b'\n' {
                return Ok::<_, std::io::Error>(());
            }
            line.push(b);
            if line.len() > 64 {
                return Err(std::io::Error::other("overlong handshake reply"));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no handshake reply"))??;
    if !line.starts_with(b"OK ") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!(
                "vsock port {port}: {:?}",
                String::from_utf8_lossy(&line).trim()
            ),
        ));
    }
    Ok(s)
}

fn kvm_usable() -> bool {
    File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn log_file(dir: &Path, name: &str) -> Result<File> {
    let path = dir.join(name);
    File::options()
        .create(true)
        .append(true)
        .open(&path)
        .internal(|| format!("open {}", path.display()))
}

fn with_logs(cmd: &mut Command, log: File) -> Result<()> {
    let err = log.try_clone().internal(|| "dup log fd".into())?;
    cmd.stdin(Stdio::null()).stdout(log).stderr(err);
    Ok(())
}

fn vhost_vsock_cmd(cfg: &MachineConfig) -> Result<Command> {
    let dir = &cfg.state_dir;
    let mut cmd = Command::new(&cfg.vhost_vsock);
    cmd.arg("--guest-cid")
        .arg(GUEST_CID.to_string())
        .arg("--socket")
        .arg(vhost_vsock_socket(dir))
        .arg("--uds-path")
        .arg(agent_socket(dir));
    with_logs(&mut cmd, log_file(dir, "vhost-device-vsock.log")?)?;
    Ok(cmd)
}

fn virtiofsd_cmd(cfg: &MachineConfig) -> Result<Command> {
    let dir = &cfg.state_dir;
    let mut cmd = Command::new(&cfg.virtiofsd);
    cmd.arg(format!("--socket-path={}", virtiofs_socket(dir).display()))
        .arg(format!("--shared-dir={}", cfg.share_dir.display()))
        // Volumes are bind mounts under the share: each is its own submount in the guest.
        .arg("--announce-submounts")
        .arg("--cache=auto")
        .arg("--sandbox=chroot")
        .arg("--log-level=warn");
    with_logs(&mut cmd, log_file(dir, "virtiofsd.log")?)?;
    Ok(cmd)
}

fn qemu_cmd(cfg: &MachineConfig, accel: Accel) -> Result<Command> {
    let dir = &cfg.state_dir;
    let mem = cfg.memory_mib;
    let mut cmd = Command::new(&cfg.qemu);
    let cpu = if accel == Accel::Kvm { "host" } else { "max" };
    // q35, not microvm: under TCG on a loaded host the guest kernel cannot calibrate the TSC
    // against microvm's PIT and, with no HPET or ACPI PM timer there as a reference, hangs
    // before init; q35 has both. Its devices are PCI (the guest loads virtio_pci).
    cmd.args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-name", "berth-vm"])
        .arg("-machine")
        .arg(format!("q35,accel={},memory-backend=mem", accel.as_str()))
        .args(["-cpu", cpu])
        .arg("-smp")
        .arg(cfg.vcpus.max(1).to_string())
        .arg("-m")
        .arg(format!("{mem}M"))
        .arg("-object")
        .arg(format!("memory-backend-memfd,id=mem,size={mem}M,share=on"))
        .arg("-kernel")
        .arg(&cfg.image.kernel)
        .arg("-initrd")
        .arg(&cfg.image.initrd)
        .arg("-append")
        .arg("console=ttyS0 panic=-1 rdinit=/init loglevel=4")
        .arg("-serial")
        .arg(format!("file:{}", console_log(dir).display()))
        .arg("-chardev")
        .arg(format!(
            "socket,id=vsock,path={}",
            vhost_vsock_socket(dir).display()
        ))
        // The backend decides the guest's CID.
        .args(["-device", "vhost-user-vsock-pci,chardev=vsock"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=fs,path={}",
            virtiofs_socket(dir).display()
        ))
        .arg("-device")
        .arg(format!("vhost-user-fs-pci,chardev=fs,tag={SHARE_TAG}"));
    if let Some(tap) = &cfg.tap {
        cmd.arg("-netdev")
            .arg(format!(
                "tap,id=net0,ifname={},script=no,downscript=no",
                tap.ifname
            ))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=net0,mac={}", tap.mac));
        if let Some(netns) = &tap.netns {
            let ns = File::open(netns).internal(|| format!("open {}", netns.display()))?;
            // SAFETY: between fork and exec only async-signal-safe calls: setns(2) on an fd the
            // closure owns.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }
    with_logs(&mut cmd, log_file(dir, "qemu.log")?)?;
    Ok(cmd)
}

fn write_record(dir: &Path, procs: &[Proc], accel: Accel) -> Result<()> {
    let record = Record {
        pids: procs.iter().map(|p| (p.name.to_string(), p.pid)).collect(),
        accel: Some(accel),
    };
    let path = dir.join(RECORD);
    let tmp = dir.join(format!("{RECORD}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(&record).unwrap_or_default())
        .internal(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).internal(|| format!("rename {}", path.display()))
}

fn remove_state(dir: &Path) {
    for f in [
        agent_socket(dir),
        vhost_vsock_socket(dir),
        virtiofs_socket(dir),
        dir.join(RECORD),
    ] {
        let _ = std::fs::remove_file(f);
    }
}

async fn teardown(procs: &mut [Proc]) {
    // QEMU first, so the backends see their client go rather than the reverse.
    for p in procs.iter().rev() {
        p.kill();
    }
    for p in procs.iter_mut().rev() {
        if tokio::time::timeout(Duration::from_secs(10), p.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                name = p.name,
                pid = p.pid,
                "vm process not reaped after SIGKILL"
            );
        }
    }
}

fn died(procs: &[Proc]) -> Option<(&'static str, u32)> {
    // QEMU first: when it dies its backends follow, and its death is the one worth naming.
    procs
        .iter()
        .rev()
        .find_map(|p| p.has_exited().map(|s| (p.name, s)))
}

async fn wait_for_path(procs: &[Proc], path: &Path) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if let Some((name, status)) = died(procs) {
            return Err(Error::unavailable(format!(
                "{name} exited with status {status} before creating {}",
                path.display()
            )));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::new(
                ErrorKind::DeadlineExceeded,
                format!("{} did not appear within 10s", path.display()),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn wait_for_agent(
    dir: &Path,
    procs: &[Proc],
    timeout: Duration,
) -> Result<(AgentClient<Channel>, PingResponse)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let sock = agent_socket(dir);
    let mut last = String::from("no attempt");
    loop {
        if let Some((name, status)) = died(procs) {
            return Err(Error::unavailable(format!(
                "{name} exited with status {status} before the agent answered ({last}); {}",
                log_tail(dir)
            )));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::new(
                ErrorKind::DeadlineExceeded,
                format!(
                    "the agent did not answer within {timeout:?} ({last}); {}",
                    log_tail(dir)
                ),
            ));
        }
        if sock.exists() {
            let attempt = async {
                let channel = dial(&sock, AGENT_PORT).await?;
                let mut client = AgentClient::new(channel);
                let ping = client
                    .ping(PingRequest {})
                    .await
                    .map_err(|s| Error::unavailable(format!("ping: {}", s.message())))?;
                Ok::<_, Error>((client, ping.into_inner()))
            };
            match tokio::time::timeout(Duration::from_secs(3), attempt).await {
                Ok(Ok(ok)) => return Ok(ok),
                Ok(Err(e)) => last = e.chain(),
                Err(_) => last = "ping timed out".into(),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// "console log <path> ends: …" with the last lines of the console log and QEMU's stderr.
fn log_tail(dir: &Path) -> String {
    let mut out = String::new();
    for path in [console_log(dir), dir.join("qemu.log")] {
        let tail = tail_lines(&path, 8);
        if !tail.is_empty() {
            out.push_str(&format!("{} ends: {tail}; ", path.display()));
        }
    }
    if out.is_empty() {
        format!("{} is empty", console_log(dir).display())
    } else {
        out.trim_end_matches("; ").to_string()
    }
}

fn tail_lines(path: &Path, n: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_parses() {
        assert_eq!("tcg".parse::<Accel>().unwrap(), Accel::Tcg);
        assert_eq!("auto".parse::<Accel>().unwrap(), Accel::Auto);
        assert!("xen".parse::<Accel>().is_err());
    }

    #[tokio::test]
    async fn handshake_is_read_up_to_the_newline_only() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            s.write_all(b"OK 1073741824\nhello").await.unwrap();
        });
        let mut s = connect_stream(&sock, 1024).await.unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "hello");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn refused_port_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            drop(s);
        });
        assert!(connect_stream(&sock, 1024).await.is_err());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn kill_recorded_kills_only_processes_that_name_the_state_dir() {
        use crate::reaper::TokioSpawner;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        // `sh -c … <state_dir>`: the shell's command line names the state directory.
        let (ours, ours_exit) = TokioSpawner
            .spawn(
                Command::new("/bin/sh")
                    // A builtin blocked on a pipe nobody writes: no child to leave behind.
                    .args(["-c", "read x"])
                    .arg(&state)
                    .stdin(Stdio::piped()),
            )
            .unwrap();
        let (other, other_exit) = TokioSpawner
            .spawn(Command::new("/bin/sleep").arg("30"))
            .unwrap();
        let record = Record {
            pids: [("qemu".to_string(), ours), ("virtiofsd".to_string(), other)].into(),
            accel: Some(Accel::Tcg),
        };
        std::fs::write(state.join(RECORD), serde_json::to_vec(&record).unwrap()).unwrap();
        assert_eq!(recorded(&state).unwrap().1, Some(Accel::Tcg));
        let killed = kill_recorded(&state).unwrap();
        // Clean up the other one whatever happened.
        let _ = kill(Pid::from_raw(other as i32), Signal::SIGKILL);
        assert_eq!(killed, [ours]);
        assert_eq!(ours_exit.await.unwrap().status, 128 + 9);
        assert_eq!(other_exit.await.unwrap().status, 128 + 9);
        assert!(!state.join(RECORD).exists());
    }

    #[test]
    fn kill_recorded_without_record_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        assert!(kill_recorded(dir.path()).unwrap().is_empty());
    }
}
