//! [`VmRuntime`]: the `berth-vm` [`OciRuntime`]. Each container runs in its own lightweight VM;
//! the in-guest agent runs its processes, and one relay process per guest process stands in for
//! it on the host (see [`super::relay`]), so the rest of the shim stays pid-centric.
//!
//! `create` shares the rootfs and every bind-mount source with the guest through one virtio-fs
//! directory (`<bundle>/vm/share`, mounted in the guest at [`GUEST_SHARE`]), mirrors the
//! container's network namespace onto a tap ([`super::net`]), boots the VM through a
//! [`VmLauncher`], and asks the agent to create the container from the rewritten spec.
//!
//! What a VM cannot honour is refused, never ignored: host network or pid namespaces, joining
//! another container's namespaces, devices, pause/resume/update.

use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use berth_core::cgroup::{BlkioStats, CpuStats, MemoryStats, Stats, Version as CgroupVersion};
use berth_core::vm::{VmAccel, VmRuntimeOptions};
use berth_core::{Context, Error, ErrorKind, Result};
use berth_proto::berth::agent::v1::agent_client::AgentClient;
use berth_proto::berth::agent::v1::{
    ContainerRef, CreateContainerRequest, ExecRequest, ProcessRef, SignalRequest, StatsResponse,
};
use serde_json::Value;
use tonic::transport::Channel;

use super::guest::{self, GuestImageConfig};
use super::machine::{self, Accel, Machine, MachineConfig, TapConfig};
use super::net::{self, GuestNetwork};
use super::relay::{AGENT_PORT, RelayArgs};
use crate::reaper::Spawner;
use crate::runtime::{
    BoxFuture, CreateOptions, ExecOptions, OciRuntime, ProcessStdio, RuntimeState,
};

/// Where the guest mounts the shared directory (virtio-fs tag `berth`).
pub const GUEST_SHARE: &str = "/run/berth/share";

/// The runtime binary name that selects [`VmRuntime`] in the shim's runtime factory.
pub use berth_core::vm::VM_RUNTIME;

/// Where VM state directories (sockets, logs) go: short, for Unix socket paths.
pub const STATE_ROOT: &str = "/run/berth-vm";

/// Whether runtime settings naming `binary` select the VM runtime.
pub fn selected_by(binary: &Path) -> bool {
    binary == Path::new(VM_RUNTIME)
}

/// The guest NIC, when the container has a network namespace with an `eth0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmTap {
    /// The tap inside the namespace (`tap0`).
    pub ifname: String,
    /// The guest NIC's MAC (`eth0`'s).
    pub mac: String,
    /// The container's network namespace, where QEMU must open the tap.
    pub netns: PathBuf,
}

/// What one VM is started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// The runtime's options: binaries, accelerator, kernel, agent.
    pub options: VmRuntimeOptions,
    /// The agent binary, resolved (`--agent`, or `berth-agent` next to the shim).
    pub agent: PathBuf,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory.
    pub memory_mib: u32,
    /// Shared with the guest through virtio-fs, tag `berth`, mounted at [`GUEST_SHARE`].
    pub share_dir: PathBuf,
    /// The VM's sockets and logs (short path: Unix socket addresses are limited).
    pub state_dir: PathBuf,
    /// The guest NIC.
    pub tap: Option<VmTap>,
}

/// A running VM, as far as the runtime cares.
pub trait Vm: Send + Sync + fmt::Debug {
    /// A client of the guest agent.
    fn agent(&self) -> AgentClient<Channel>;
    /// vhost-device-vsock's Unix socket, for relays to dial the agent through.
    fn vsock_socket(&self) -> PathBuf;
    /// Asks the guest to power off and waits for the VM's processes; kills them if it does
    /// not.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}

/// Starts VMs. The seam between the runtime and QEMU (`machine.rs`), so that the runtime's
/// logic runs against a fake agent in tests.
pub trait VmLauncher: Send + Sync + fmt::Debug {
    /// Boots a VM and returns once its agent answers.
    fn launch(&self, spec: VmSpec) -> BoxFuture<'_, Box<dyn Vm>>;
}

/// The launcher used until this build has a VM launcher: refuses with the reason.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoLauncher;

impl VmLauncher for NoLauncher {
    fn launch(&self, _spec: VmSpec) -> BoxFuture<'_, Box<dyn Vm>> {
        Box::pin(async {
            Err(Error::unimplemented(format!(
                "{VM_RUNTIME}: this shim was built without a VM launcher"
            )))
        })
    }
}

/// The real launcher: builds (or reuses) the guest image, then boots QEMU with virtiofsd and
/// vhost-device-vsock through [`super::machine::Machine`].
#[derive(Debug)]
pub struct MachineLauncher {
    /// Spawns the VM's processes (so the shim's reaper collects them).
    pub spawner: Arc<dyn Spawner>,
    /// Where built guest images are cached; `None`: the runtime's `--image-cache`.
    pub cache_dir: Option<PathBuf>,
    /// `berth-shim`, which builds the guest image in a child process (`vm-guest-image`).
    pub shim_exe: PathBuf,
}

/// Builds (or finds in the cache) the guest image in a child process, `berth-shim
/// vm-guest-image`, through `spawner`. Not in the shim itself: [`guest::ensure`] runs `ldd`
/// and waits for it, and the shim's reaper (`waitpid(-1)`) can take that exit first, which
/// fails the build with ECHILD.
async fn guest_image(
    spawner: &dyn Spawner,
    shim_exe: &Path,
    cfg: &GuestImageConfig,
) -> Result<guest::GuestImage> {
    let (mut out_r, out_w) = std::io::pipe().internal(|| "create a pipe".into())?;
    let (mut err_r, err_w) = std::io::pipe().internal(|| "create a pipe".into())?;
    let mut cmd = Command::new(shim_exe);
    cmd.arg("vm-guest-image")
        .arg("--agent")
        .arg(&cfg.agent_binary)
        .arg("--cache-dir")
        .arg(&cfg.cache_dir)
        .stdin(Stdio::null())
        .stdout(out_w)
        .stderr(err_w);
    if let Some(deb) = &cfg.kernel_deb {
        cmd.arg("--kernel-deb").arg(deb);
    }
    let (_, exit) = spawner.spawn(&mut cmd)?;
    drop(cmd);
    let (out, err) = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let (mut out, mut err) = (String::new(), String::new());
        let _ = out_r.read_to_string(&mut out);
        let _ = err_r.read_to_string(&mut err);
        (out, err)
    })
    .await
    .internal(|| "guest image reader".into())?;
    let exit = exit.await?;
    let mut lines = out.lines();
    match (exit.status, lines.next(), lines.next(), lines.next()) {
        (0, Some(kernel), Some(initrd), Some(release)) => Ok(guest::GuestImage {
            kernel: kernel.into(),
            initrd: initrd.into(),
            kernel_release: release.into(),
        }),
        _ => Err(Error::internal(format!(
            "{VM_RUNTIME}: guest image: {}",
            err.trim().trim_start_matches("berth-shim: ")
        ))),
    }
}

/// `berth-shim vm-guest-image`: builds the guest image and prints its kernel, initrd and
/// kernel release, one per line.
pub fn guest_image_main(
    agent: PathBuf,
    cache_dir: PathBuf,
    kernel_deb: Option<PathBuf>,
) -> Result<()> {
    let image = guest::ensure(&GuestImageConfig {
        kernel_deb,
        agent_binary: agent,
        cache_dir,
    })?;
    println!(
        "{}\n{}\n{}",
        image.kernel.display(),
        image.initrd.display(),
        image.kernel_release
    );
    Ok(())
}

/// A [`Machine`] as a [`Vm`].
#[derive(Debug)]
struct MachineVm {
    machine: tokio::sync::Mutex<Machine>,
    agent: AgentClient<Channel>,
    vsock: PathBuf,
}

impl Vm for MachineVm {
    fn agent(&self) -> AgentClient<Channel> {
        self.agent.clone()
    }

    fn vsock_socket(&self) -> PathBuf {
        self.vsock.clone()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.machine
                .lock()
                .await
                .shutdown(Duration::from_secs(10))
                .await;
            Ok(())
        })
    }
}

impl VmLauncher for MachineLauncher {
    fn launch(&self, spec: VmSpec) -> BoxFuture<'_, Box<dyn Vm>> {
        Box::pin(async move {
            let o = &spec.options;
            let kernel_deb = if o.kernel.is_dir() {
                guest::find_kernel_deb(&o.kernel)?
            } else {
                o.kernel.clone()
            };
            let image_cfg = GuestImageConfig {
                kernel_deb: Some(kernel_deb),
                agent_binary: spec.agent.clone(),
                cache_dir: self
                    .cache_dir
                    .clone()
                    .unwrap_or_else(|| o.image_cache.clone()),
            };
            let image = guest_image(self.spawner.as_ref(), &self.shim_exe, &image_cfg).await?;
            let cfg = MachineConfig {
                qemu: o.qemu.clone(),
                virtiofsd: o.virtiofsd.clone(),
                vhost_vsock: o.vhost_vsock.clone(),
                accel: match o.accel {
                    // A host whose /dev/kvm cannot boot a stock guest (nested PVM) is known
                    // up front: go straight to TCG instead of waiting out a KVM attempt.
                    VmAccel::Auto if berth_core::vm::host_accelerator() == VmAccel::Tcg => {
                        Accel::Tcg
                    }
                    VmAccel::Auto => Accel::Auto,
                    VmAccel::Kvm => Accel::Kvm,
                    VmAccel::Tcg => Accel::Tcg,
                },
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib.into(),
                image,
                share_dir: spec.share_dir.clone(),
                state_dir: spec.state_dir.clone(),
                tap: spec.tap.as_ref().map(|t| TapConfig {
                    ifname: t.ifname.clone(),
                    mac: t.mac.clone(),
                    netns: Some(t.netns.clone()),
                }),
                agent_timeout: Duration::from_secs(o.agent_timeout_secs),
            };
            let machine = Machine::start(cfg, self.spawner.clone()).await?;
            tracing::info!(accel = ?machine.accel(), "berth-vm guest up");
            Ok(Box::new(MachineVm {
                agent: machine.agent(),
                vsock: machine::agent_socket(&spec.state_dir),
                machine: tokio::sync::Mutex::new(machine),
            }) as Box<dyn Vm>)
        })
    }
}

/// What one created container holds.
#[derive(Debug)]
struct Running {
    vm: Box<dyn Vm>,
    net: Option<GuestNetwork>,
    /// Host pid of the init's relay.
    init_relay: u32,
    /// Host pids of exec relays.
    exec_relays: Vec<u32>,
    started: bool,
}

/// The `berth-vm` runtime for one shim.
#[derive(Debug)]
pub struct VmRuntime {
    options: VmRuntimeOptions,
    launcher: Box<dyn VmLauncher>,
    /// The binary relays run from (`berth-shim`).
    shim_exe: PathBuf,
    /// Where VM state directories go (`/run/berth-vm`).
    state_root: PathBuf,
    timeout: Duration,
    running: tokio::sync::Mutex<Option<Running>>,
    bundle: Mutex<Option<PathBuf>>,
    execs: AtomicU64,
}

fn bad_spec(msg: impl Into<String>) -> Error {
    Error::failed_precondition(format!("{VM_RUNTIME}: {}", msg.into()))
}

/// Devices every container has anyway (the guest makes its own).
const DEFAULT_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/console",
    "/dev/ptmx",
];

/// One host path bound into the share.
#[derive(Debug, PartialEq)]
struct ShareBind {
    source: PathBuf,
    /// Its name under `share/`.
    name: String,
    dir: bool,
    recursive: bool,
    /// Read-only on the host side too: the guest is not trusted to honour `ro` itself.
    readonly: bool,
}

/// What [`prepare_spec`] decided.
#[derive(Debug, Default, PartialEq)]
struct Prepared {
    /// Each bind mount (the rootfs first, as `rootfs`).
    binds: Vec<ShareBind>,
    /// The container's network namespace, if it has its own one by path.
    netns: Option<PathBuf>,
    vcpus: u32,
    memory_mib: u32,
    hostname: String,
}

/// Checks a spec against what a VM can honour and rewrites its paths to guest paths.
fn prepare_spec(spec: &mut Value, bundle: &Path, options: &VmRuntimeOptions) -> Result<Prepared> {
    let mut p = Prepared {
        hostname: spec["hostname"].as_str().unwrap_or_default().to_string(),
        ..Prepared::default()
    };
    let linux = &spec["linux"];
    let namespaces = linux["namespaces"].as_array().cloned().unwrap_or_default();
    let ns = |t: &str| namespaces.iter().find(|n| n["type"] == t);
    match ns("network") {
        None => {
            return Err(bad_spec(
                "the host's network (--network host) cannot be given to a VM",
            ));
        }
        Some(n) => {
            p.netns = n["path"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        }
    }
    if ns("pid").is_none() {
        return Err(bad_spec(
            "the host's pid namespace (--pid host) cannot be given to a VM",
        ));
    }
    for n in &namespaces {
        let t = n["type"].as_str().unwrap_or_default();
        if t != "network" && n["path"].as_str().is_some_and(|s| !s.is_empty()) {
            return Err(bad_spec(format!(
                "cannot join another {t} namespace (a VM has its own kernel)"
            )));
        }
    }
    // In the guest, the container uses the VM's own network namespace, where the agent
    // configures eth0 as the host's was; the host path means nothing there.
    if let Some(list) = spec["linux"]["namespaces"].as_array_mut() {
        list.retain(|n| n["type"] != "network");
    }
    let linux = &spec["linux"];
    if let Some(devices) = linux["devices"].as_array() {
        for d in devices {
            let path = d["path"].as_str().unwrap_or_default();
            if !DEFAULT_DEVICES.contains(&path) {
                return Err(bad_spec(format!(
                    "device {path} cannot be passed into a VM"
                )));
            }
        }
    }

    // Resources: vCPUs from the CPU quota, memory from the limit plus the guest's overhead.
    let cpu = &linux["resources"]["cpu"];
    p.vcpus = match (cpu["quota"].as_i64(), cpu["period"].as_u64()) {
        (Some(q), Some(period)) if q > 0 && period > 0 => (q as u64).div_ceil(period).max(1) as u32,
        _ => 1,
    };
    p.memory_mib = match linux["resources"]["memory"]["limit"].as_i64() {
        Some(limit) if limit > 0 => {
            (limit as u64).div_ceil(1 << 20) as u32 + options.memory_overhead_mib
        }
        _ => options.memory_mib,
    };

    // The rootfs and every bind source go into the share; the spec names them by guest path.
    let root = spec["root"]["path"].as_str().unwrap_or("rootfs");
    let root = if Path::new(root).is_absolute() {
        PathBuf::from(root)
    } else {
        bundle.join(root)
    };
    p.binds.push(ShareBind {
        source: root,
        name: "rootfs".into(),
        dir: true,
        recursive: true,
        // The container's own layer: the guest may have to make mountpoints in it before it
        // applies `root.readonly`, and writes reach nobody else.
        readonly: false,
    });
    spec["root"]["path"] = Value::from(format!("{GUEST_SHARE}/rootfs"));
    if let Some(mounts) = spec["mounts"].as_array_mut() {
        for (i, m) in mounts.iter_mut().enumerate() {
            let options: Vec<&str> = m["options"]
                .as_array()
                .map(|o| o.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let is_bind =
                m["type"] == "bind" || options.iter().any(|o| *o == "bind" || *o == "rbind");
            if !is_bind {
                continue;
            }
            let recursive = options.contains(&"rbind");
            let readonly = options.contains(&"ro");
            let source = PathBuf::from(m["source"].as_str().unwrap_or_default());
            let meta = std::fs::metadata(&source).map_err(|e| {
                bad_spec(format!("bind source {}", source.display())).with_source(e)
            })?;
            let name = format!("m{i}");
            m["source"] = Value::from(format!("{GUEST_SHARE}/{name}"));
            p.binds.push(ShareBind {
                source,
                name,
                dir: meta.is_dir(),
                recursive,
                readonly,
            });
        }
    }
    Ok(p)
}

fn bind(b: &ShareBind, target: &Path) -> Result<()> {
    let source = &b.source;
    if b.dir {
        std::fs::create_dir_all(target)
    } else {
        std::fs::File::create(target).map(drop)
    }
    .internal(|| format!("create {}", target.display()))?;
    let mut flags = nix::mount::MsFlags::MS_BIND;
    if b.recursive {
        flags |= nix::mount::MsFlags::MS_REC;
    }
    nix::mount::mount(Some(source), target, None::<&str>, flags, None::<&str>).context(
        ErrorKind::Internal,
        format!("bind {} into the vm share", source.display()),
    )?;
    if b.readonly {
        let ro = nix::mount::MsFlags::MS_BIND
            | nix::mount::MsFlags::MS_REMOUNT
            | nix::mount::MsFlags::MS_RDONLY;
        nix::mount::mount(None::<&str>, target, None::<&str>, ro, None::<&str>).context(
            ErrorKind::Internal,
            format!("make {} read-only in the vm share", source.display()),
        )?;
    }
    Ok(())
}

/// Unmounts everything under `share` (deepest first) and removes `<bundle>/vm`.
fn remove_share(vm_dir: &Path) -> Result<()> {
    let share = vm_dir.join("share");
    if share.exists() {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = share.display().to_string();
        let mut targets: Vec<String> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|t| t.starts_with(&prefix))
            .map(str::to_string)
            .collect();
        targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
        for t in targets {
            let _ = nix::mount::umount2(t.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
    match std::fs::remove_dir_all(vm_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::internal(format!("remove {}", vm_dir.display())).with_source(e))
        }
        _ => Ok(()),
    }
}

/// A pty for a process with a terminal: the master goes to the shim over the console socket,
/// the relay gets the slave.
fn console(socket: &Path) -> Result<OwnedFd> {
    let pty = nix::pty::openpty(None, None).internal(|| "open a pty".into())?;
    let sock = std::os::unix::net::UnixStream::connect(socket).context(
        ErrorKind::Internal,
        format!("connect to console socket {}", socket.display()),
    )?;
    // SAFETY: both descriptors are open for the call.
    let rc = unsafe { crate::console::send_fd_raw(sock.as_raw_fd(), pty.master.as_raw_fd()) };
    if rc < 0 {
        return Err(Error::internal("send the pty over the console socket")
            .with_source(std::io::Error::last_os_error()));
    }
    Ok(pty.slave)
}

fn to_stdio(fd: Option<OwnedFd>) -> Stdio {
    fd.map(Stdio::from).unwrap_or_else(Stdio::null)
}

impl VmRuntime {
    /// A runtime booting VMs through `launcher`, running relays from `shim_exe`.
    pub fn new(
        options: VmRuntimeOptions,
        launcher: Box<dyn VmLauncher>,
        shim_exe: PathBuf,
        state_root: PathBuf,
        timeout: Duration,
    ) -> Self {
        Self {
            options,
            launcher,
            shim_exe,
            state_root,
            timeout,
            running: tokio::sync::Mutex::new(None),
            bundle: Mutex::new(None),
            execs: AtomicU64::new(0),
        }
    }

    /// The bundle of the shim's container, known before `create` (so that a `delete` by a
    /// fresh shim, after the one that created the VM is gone, still cleans up).
    pub fn with_bundle(self, bundle: PathBuf) -> Self {
        *self.bundle.lock().unwrap() = Some(bundle);
        self
    }

    async fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(Error::from(status))
                .map_err(|e| Error::new(e.kind(), format!("{VM_RUNTIME} {what}")).with_source(e)),
            Err(_) => Err(Error::new(
                ErrorKind::DeadlineExceeded,
                format!(
                    "{VM_RUNTIME} {what}: the agent did not answer in {:?}",
                    self.timeout
                ),
            )),
        }
    }

    /// Spawns a relay for one guest process and returns its pid. It is a plain child of the
    /// shim, not one started through the shim's `Spawner`: the shim learns the pid from the
    /// pid file and `watch`es it, and the reaper keeps the exit of a child nobody subscribed to
    /// until then (as for runc's processes), whereas `Spawner::spawn`'s subscription would take
    /// an early exit away from that `watch`.
    fn spawn_relay(
        &self,
        vm: &dyn Vm,
        id: &str,
        exec_id: &str,
        console_socket: Option<&Path>,
        stdio: ProcessStdio,
    ) -> Result<u32> {
        let args = RelayArgs {
            vsock: vm.vsock_socket(),
            port: AGENT_PORT,
            container: id.to_string(),
            exec_id: exec_id.to_string(),
            terminal: console_socket.is_some(),
        };
        let mut cmd = Command::new(&self.shim_exe);
        cmd.arg("vm-relay").args(args.to_args());
        match console_socket {
            Some(socket) => {
                let slave = console(socket)?;
                let dup = |fd: &OwnedFd| fd.try_clone().internal(|| "duplicate the pty".into());
                cmd.stdin(Stdio::from(dup(&slave)?))
                    .stdout(Stdio::from(dup(&slave)?))
                    .stderr(Stdio::from(slave));
            }
            None => {
                cmd.stdin(to_stdio(stdio.stdin))
                    .stdout(to_stdio(stdio.stdout))
                    .stderr(to_stdio(stdio.stderr));
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| crate::reaper::spawn_error(&cmd, e))?;
        Ok(child.id())
    }

    fn state_dir(&self, id: &str) -> PathBuf {
        let short: String = id.chars().take(12).collect();
        self.state_root.join(short)
    }

    fn agent_path(&self) -> PathBuf {
        self.options.agent.clone().unwrap_or_else(|| {
            self.shim_exe
                .parent()
                .unwrap_or(Path::new("/"))
                .join("berth-agent")
        })
    }

    async fn create_inner(&self, id: &str, opts: CreateOptions, vm_dir: &Path) -> Result<()> {
        let config = opts.bundle.join("config.json");
        let data = std::fs::read(&config).internal(|| format!("read {}", config.display()))?;
        let mut spec: Value = serde_json::from_slice(&data)
            .map_err(|e| Error::invalid_argument("parse config.json").with_source(e))?;
        let prepared = prepare_spec(&mut spec, &opts.bundle, &self.options)?;
        let terminal = spec["process"]["terminal"].as_bool().unwrap_or(false);

        let share = vm_dir.join("share");
        std::fs::create_dir_all(&share).internal(|| format!("create {}", share.display()))?;
        for b in &prepared.binds {
            bind(b, &share.join(&b.name))?;
        }
        let net = match &prepared.netns {
            Some(netns) => {
                let netns = netns.clone();
                tokio::task::spawn_blocking(move || net::setup(&netns))
                    .await
                    .internal(|| "network setup thread".into())??
            }
            None => None,
        };
        let state_dir = self.state_dir(id);
        let _ = std::fs::remove_dir_all(&state_dir);
        std::fs::create_dir_all(&state_dir)
            .internal(|| format!("create {}", state_dir.display()))?;
        let vm_spec = VmSpec {
            options: self.options.clone(),
            agent: self.agent_path(),
            vcpus: prepared.vcpus,
            memory_mib: prepared.memory_mib,
            share_dir: share.clone(),
            state_dir,
            tap: net.as_ref().map(|n| VmTap {
                ifname: n.tap.clone(),
                mac: n.mac.clone(),
                netns: n.netns.clone(),
            }),
        };
        tracing::info!(
            id,
            vcpus = vm_spec.vcpus,
            memory_mib = vm_spec.memory_mib,
            "booting vm"
        );
        let vm = match self.launcher.launch(vm_spec).await {
            Ok(vm) => vm,
            Err(e) => {
                if let Some(n) = &net {
                    let _ = net::teardown(&n.netns);
                }
                return Err(e);
            }
        };
        let mut running = Running {
            vm,
            net,
            init_relay: 0,
            exec_relays: Vec::new(),
            started: false,
        };
        let result = async {
            let mut agent = running.vm.agent();
            let mut request = running
                .net
                .as_ref()
                .map(|n| n.request.clone())
                .unwrap_or_default();
            request.hostname = prepared.hostname.clone();
            self.call("setup network", agent.setup_network(request))
                .await?;
            let spec = serde_json::to_vec(&spec).internal(|| "encode the spec".into())?;
            self.call(
                "create container",
                agent.create_container(CreateContainerRequest {
                    container_id: id.to_string(),
                    spec,
                }),
            )
            .await?;
            let console = terminal.then_some(()).and(opts.console_socket.as_deref());
            if terminal && console.is_none() {
                return Err(Error::invalid_argument(
                    "the process has a terminal but no console socket was given",
                ));
            }
            let pid = self.spawn_relay(running.vm.as_ref(), id, "", console, opts.stdio)?;
            running.init_relay = pid;
            std::fs::write(&opts.pid_file, pid.to_string())
                .internal(|| format!("write {}", opts.pid_file.display()))
        }
        .await;
        match result {
            Ok(()) => {
                *self.running.lock().await = Some(running);
                Ok(())
            }
            Err(e) => {
                self.dispose(running).await;
                Err(e)
            }
        }
    }

    /// Shuts the VM down and removes the network mirror.
    async fn dispose(&self, running: Running) {
        if let Err(err) = running.vm.shutdown().await {
            tracing::warn!(reason = %err.chain(), "vm shutdown");
        }
        if let Some(n) = &running.net
            && let Err(err) = net::teardown(&n.netns)
        {
            tracing::warn!(reason = %err.chain(), "network teardown");
        }
    }

    fn vm_dir(&self) -> Result<PathBuf> {
        self.bundle
            .lock()
            .unwrap()
            .as_ref()
            .map(|b| b.join("vm"))
            .ok_or_else(|| Error::not_found(format!("{VM_RUNTIME}: no container")))
    }
}

/// The network namespace path of the bundle's spec (`vm_dir` is `<bundle>/vm`).
fn spec_netns(vm_dir: &Path) -> Option<PathBuf> {
    let data = std::fs::read(vm_dir.parent()?.join("config.json")).ok()?;
    let spec: Value = serde_json::from_slice(&data).ok()?;
    spec["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")?["path"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

fn pid_alive(pid: u32) -> bool {
    pid != 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

fn unsupported<'a>(what: &str) -> BoxFuture<'a, ()> {
    let err = Error::unimplemented(format!("{VM_RUNTIME} does not support {what}"));
    Box::pin(async move { Err(err) })
}

impl OciRuntime for VmRuntime {
    fn create<'a>(&'a self, id: &'a str, opts: CreateOptions) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            *self.bundle.lock().unwrap() = Some(opts.bundle.clone());
            let vm_dir = opts.bundle.join("vm");
            let result = self.create_inner(id, opts, &vm_dir).await;
            if result.is_err() {
                let _ = remove_share(&vm_dir);
                let _ = std::fs::remove_dir_all(self.state_dir(id));
            }
            result
        })
    }

    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let mut guard = self.running.lock().await;
            let running = guard.as_mut().ok_or_else(|| {
                Error::not_found(format!("{VM_RUNTIME}: container {id} does not exist"))
            })?;
            let mut agent = running.vm.agent();
            self.call(
                "start",
                agent.start(ProcessRef {
                    container_id: id.to_string(),
                    exec_id: String::new(),
                }),
            )
            .await?;
            running.started = true;
            Ok(())
        })
    }

    fn state<'a>(&'a self, id: &'a str) -> BoxFuture<'a, RuntimeState> {
        Box::pin(async move {
            let guard = self.running.lock().await;
            let running = guard.as_ref().ok_or_else(|| {
                Error::not_found(format!("{VM_RUNTIME}: container {id} does not exist"))
            })?;
            let alive = pid_alive(running.init_relay);
            let status = match (running.started, alive) {
                (_, false) => "stopped",
                (false, true) => "created",
                (true, true) => "running",
            };
            Ok(RuntimeState {
                id: id.to_string(),
                pid: if alive { running.init_relay } else { 0 },
                status: status.into(),
            })
        })
    }

    fn kill<'a>(&'a self, id: &'a str, signal: i32, all: bool) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let guard = self.running.lock().await;
            let running = guard.as_ref().ok_or_else(|| {
                Error::not_found(format!("{VM_RUNTIME}: container {id} does not exist"))
            })?;
            let mut agent = running.vm.agent();
            self.call(
                "kill",
                agent.signal(SignalRequest {
                    container_id: id.to_string(),
                    exec_id: String::new(),
                    signal: signal as u32,
                    all,
                }),
            )
            .await
            .map(drop)
        })
    }

    fn delete<'a>(&'a self, id: &'a str, force: bool) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let running = self.running.lock().await.take();
            if running.is_none() {
                // Not created by this process (its shim is gone): what it left on disk.
                match machine::kill_recorded(&self.state_dir(id)) {
                    Ok(pids) if !pids.is_empty() => {
                        tracing::info!(?pids, "killed the processes of a VM left behind")
                    }
                    Ok(_) => {}
                    Err(err) => tracing::warn!(reason = %err.chain(), "kill a VM left behind"),
                }
                if let Some(netns) = self.vm_dir().ok().and_then(|d| spec_netns(&d)) {
                    let _ = net::teardown(&netns);
                }
            }
            if let Some(running) = running {
                let mut agent = running.vm.agent();
                if force {
                    let _ = self
                        .call(
                            "kill",
                            agent.signal(SignalRequest {
                                container_id: id.to_string(),
                                exec_id: String::new(),
                                signal: libc::SIGKILL as u32,
                                all: true,
                            }),
                        )
                        .await;
                }
                if let Err(err) = self
                    .call(
                        "delete",
                        agent.delete_container(ContainerRef {
                            container_id: id.to_string(),
                        }),
                    )
                    .await
                {
                    tracing::warn!(reason = %err.chain(), "agent delete");
                }
                self.dispose(running).await;
            }
            if let Ok(vm_dir) = self.vm_dir() {
                remove_share(&vm_dir)?;
            }
            let _ = std::fs::remove_dir_all(self.state_dir(id));
            Ok(())
        })
    }

    fn exec<'a>(&'a self, id: &'a str, opts: ExecOptions) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let process = std::fs::read(&opts.process)
                .internal(|| format!("read {}", opts.process.display()))?;
            let parsed: Value = serde_json::from_slice(&process)
                .map_err(|e| Error::invalid_argument("parse the exec process").with_source(e))?;
            let terminal = parsed["terminal"].as_bool().unwrap_or(false);
            let mut guard = self.running.lock().await;
            let running = guard.as_mut().ok_or_else(|| {
                Error::not_found(format!("{VM_RUNTIME}: container {id} does not exist"))
            })?;
            let exec_id = format!("exec-{}", self.execs.fetch_add(1, Ordering::Relaxed));
            let mut agent = running.vm.agent();
            self.call(
                "exec",
                agent.exec(ExecRequest {
                    container_id: id.to_string(),
                    exec_id: exec_id.clone(),
                    process,
                }),
            )
            .await?;
            let console = if terminal {
                Some(opts.console_socket.as_deref().ok_or_else(|| {
                    Error::invalid_argument("the process has a terminal but no console socket")
                })?)
            } else {
                None
            };
            // The relay opens the stream before the process starts: no output is missed.
            let pid = self.spawn_relay(running.vm.as_ref(), id, &exec_id, console, opts.stdio)?;
            running.exec_relays.retain(|p| pid_alive(*p));
            running.exec_relays.push(pid);
            let started = self
                .call(
                    "start exec",
                    agent.start(ProcessRef {
                        container_id: id.to_string(),
                        exec_id,
                    }),
                )
                .await;
            if let Err(e) = started {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return Err(e);
            }
            std::fs::write(&opts.pid_file, pid.to_string())
                .internal(|| format!("write {}", opts.pid_file.display()))
        })
    }

    fn pause<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, ()> {
        unsupported("pause")
    }

    fn resume<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, ()> {
        unsupported("resume")
    }

    fn update<'a>(&'a self, _id: &'a str, _resources: &'a [u8]) -> BoxFuture<'a, ()> {
        unsupported("update (resources are fixed when the VM boots)")
    }

    fn ps<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Vec<u32>> {
        Box::pin(async move {
            let guard = self.running.lock().await;
            let running = guard.as_ref().ok_or_else(|| {
                Error::not_found(format!("{VM_RUNTIME}: container {id} does not exist"))
            })?;
            Ok(std::iter::once(running.init_relay)
                .chain(running.exec_relays.iter().copied())
                .filter(|p| pid_alive(*p))
                .collect())
        })
    }

    /// From the agent: the init's relay is in the shim's cgroup, the container's cgroup is in
    /// the guest.
    fn stats<'a>(&'a self, id: &'a str) -> Option<BoxFuture<'a, Stats>> {
        Some(Box::pin(async move {
            // The client is a cheap clone: the lock is not held while the guest answers.
            let mut agent = {
                let guard = self.running.lock().await;
                let running = guard.as_ref().ok_or_else(|| {
                    Error::not_found(format!("{VM_RUNTIME}: container {id} does not exist"))
                })?;
                running.vm.agent()
            };
            let r = self
                .call(
                    "stats",
                    agent.stats(ContainerRef {
                        container_id: id.to_string(),
                    }),
                )
                .await?;
            Ok(guest_stats(r, SystemTime::now()))
        }))
    }
}

/// The agent's counters (the guest container's cgroup v2) as the shim's [`Stats`]. What the
/// agent does not send stays zero, which consumers read as "not counted": per-mode and per-CPU
/// time, throttling, peak memory, swap, block I/O. The host-wide CPU time and CPU count are
/// left for the engine to fill when it samples, as it does for any shim's reading, so
/// `docker stats`' CPU% is the guest container's share of the host.
fn guest_stats(r: StatsResponse, read: SystemTime) -> Stats {
    Stats {
        read,
        version: CgroupVersion::V2,
        cpu: CpuStats {
            total_ns: r.cpu_usage_nanos,
            ..CpuStats::default()
        },
        memory: MemoryStats {
            usage: r.memory_usage_bytes,
            // An agent that sent no limit: the guest's memory bounds the container, as the
            // host's memory stands for an unlimited host cgroup.
            limit: if r.memory_limit_bytes == 0 {
                r.guest_memory_total_bytes
            } else {
                r.memory_limit_bytes
            },
            stats: r.memory_stat.into_iter().collect(),
            ..MemoryStats::default()
        },
        pids_current: u64::from(r.pids),
        pids_limit: r.pids_limit,
        blkio: BlkioStats::default(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec() -> Value {
        json!({
            "hostname": "box",
            "root": {"path": "rootfs"},
            "process": {"terminal": false, "args": ["sh"]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts", "options": ["rbind", "ro"]},
                {"destination": "/data", "type": "none", "source": "/tmp", "options": ["bind"]}
            ],
            "linux": {
                "namespaces": [
                    {"type": "pid"}, {"type": "mount"},
                    {"type": "network", "path": "/run/netns/x"}
                ],
                "resources": {
                    "cpu": {"quota": 150000, "period": 100000},
                    "memory": {"limit": 536870912}
                }
            }
        })
    }

    #[test]
    fn the_spec_is_rewritten_to_guest_paths_and_sized() {
        let mut s = spec();
        let p = prepare_spec(&mut s, Path::new("/b"), &VmRuntimeOptions::default()).unwrap();
        assert_eq!(s["root"]["path"], "/run/berth/share/rootfs");
        assert_eq!(s["mounts"][0]["source"], "proc");
        assert_eq!(s["mounts"][1]["source"], "/run/berth/share/m1");
        assert_eq!(s["mounts"][2]["source"], "/run/berth/share/m2");
        let binds: Vec<_> = p
            .binds
            .iter()
            .map(|b| {
                (
                    b.source.to_str().unwrap(),
                    b.name.as_str(),
                    b.dir,
                    b.recursive,
                    b.readonly,
                )
            })
            .collect();
        assert_eq!(
            binds,
            [
                ("/b/rootfs", "rootfs", true, true, false),
                ("/etc/hosts", "m1", false, true, true),
                ("/tmp", "m2", true, false, false),
            ]
        );
        assert_eq!(p.netns, Some(PathBuf::from("/run/netns/x")));
        // The guest's container shares the VM's network namespace.
        assert_eq!(
            s["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "mount"}])
        );
        assert_eq!(p.vcpus, 2);
        assert_eq!(p.memory_mib, 512 + 128);
        assert_eq!(p.hostname, "box");
    }

    #[test]
    fn defaults_without_limits() {
        let mut s = spec();
        s["linux"]["resources"] = json!({});
        let p = prepare_spec(&mut s, Path::new("/b"), &VmRuntimeOptions::default()).unwrap();
        assert_eq!((p.vcpus, p.memory_mib), (1, 256));
    }

    #[test]
    fn what_a_vm_cannot_honour_is_refused() {
        let opts = VmRuntimeOptions::default();
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|s| {
                    s["linux"]["namespaces"] = json!([{"type": "pid"}]);
                }),
                "--network host",
            ),
            (
                Box::new(|s| {
                    s["linux"]["namespaces"] = json!([{"type": "network"}]);
                }),
                "--pid host",
            ),
            (
                Box::new(|s| {
                    s["linux"]["namespaces"] = json!([
                        {"type": "pid"}, {"type": "network"},
                        {"type": "ipc", "path": "/proc/1/ns/ipc"}
                    ]);
                }),
                "cannot join another ipc namespace",
            ),
            (
                Box::new(|s| {
                    s["linux"]["devices"] = json!([{"path": "/dev/fuse", "type": "c"}]);
                }),
                "device /dev/fuse",
            ),
        ];
        for (edit, needle) in cases {
            let mut s = spec();
            edit(&mut s);
            let err = prepare_spec(&mut s, Path::new("/b"), &opts).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
            assert!(err.chain().contains(needle), "{needle}: {}", err.chain());
            assert!(err.chain().contains(VM_RUNTIME));
        }
    }

    #[test]
    fn guest_stats_stand_for_the_agent_only() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(9);
        let r = StatsResponse {
            memory_usage_bytes: 10,
            memory_limit_bytes: 0,
            cpu_usage_nanos: 30,
            pids: 4,
            guest_memory_total_bytes: 1 << 30,
            pids_limit: 64,
            memory_stat: [("inactive_file".to_string(), 5)].into(),
        };
        let s = guest_stats(r, at);
        assert_eq!((s.read, s.version), (at, CgroupVersion::V2));
        // No limit sent: the guest's memory is the bound.
        assert_eq!((s.memory.usage, s.memory.limit), (10, 1 << 30));
        assert_eq!(s.memory.stats.get("inactive_file"), Some(&5));
        assert_eq!((s.cpu.total_ns, s.pids_current, s.pids_limit), (30, 4, 64));
        // Host-relative values are the engine's to fill; nothing else is made up.
        assert_eq!(
            (s.cpu.system_ns, s.cpu.online_cpus, s.cpu.user_ns),
            (0, 0, 0)
        );
        assert_eq!(s.blkio, BlkioStats::default());
    }

    #[tokio::test]
    async fn pause_resume_update_are_refused_by_name() {
        let rt = VmRuntime::new(
            VmRuntimeOptions::default(),
            Box::new(NoLauncher),
            "/bin/false".into(),
            std::env::temp_dir(),
            Duration::from_secs(1),
        );
        for err in [
            rt.pause("c").await.unwrap_err(),
            rt.resume("c").await.unwrap_err(),
            rt.update("c", b"{}").await.unwrap_err(),
        ] {
            assert_eq!(err.kind(), ErrorKind::Unimplemented);
            assert!(err.chain().contains("berth-vm does not support"));
        }
    }
}
