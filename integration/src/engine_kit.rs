//! Test kit for berth-engine: a whole stack (`berth up`) with its own network slot and cgroup
//! parent, gRPC clients for the engine and the images service, the busybox test image, helpers
//! that run a container to its end, and cleanup that leaves nothing behind even when a test
//! fails: containers are removed through the engine, then leftover shims and runtime containers
//! of this stack are killed by PID / id, mounts under the stack's temp dir are undone, the
//! stack's cgroups removed, and the network slot's bridges and rules deleted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use berth_core::Service;
use berth_core::uds::Channel;
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::engine::v1::containers_client::ContainersClient;
use berth_proto::berth::engine::v1::tasks_client::TasksClient;
use berth_proto::berth::engine::v1::volumes_client::VolumesClient;
use berth_proto::berth::events::v1::events_client::EventsClient;
use berth_proto::berth::images::v1::images_client::ImagesClient;
use berth_proto::berth::types::v1 as types;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_stream::StreamExt;

use crate::network_kit::NetSlot;
use crate::stack::{Stack, running, wait_for};

/// `false` (with a note) when this machine cannot run engine tests: root, runc, iptables.
pub fn ready() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return false;
    }
    for tool in ["runc", "iptables", "ip", "python3"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            eprintln!("skipped: {tool} is not installed");
            return false;
        }
    }
    true
}

/// The busybox test image as a docker-archive, built once per test process.
pub fn busybox_archive() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("berth-engine-images-")
            .tempdir()
            .expect("temp dir");
        let script = crate::stack::mkimage_script();
        let out = Command::new("python3")
            .arg(&script)
            .arg("busybox")
            .arg("--out")
            .arg(dir.path())
            .output()
            .expect("run mkimage.py");
        assert!(
            out.status.success(),
            "mkimage.py busybox: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tar = dir.path().join("busybox/image.tar");
        (dir, tar)
    })
    .1
}

/// How to start an [`EngineStack`].
#[derive(Debug, Default)]
pub struct EngineStackBuilder {
    engine: String,
    network: String,
    extra: String,
}

impl EngineStackBuilder {
    /// Extra lines for the `[engine]` section.
    pub fn engine_toml(mut self, lines: &str) -> Self {
        self.engine.push_str(lines);
        self.engine.push('\n');
        self
    }

    /// Extra lines for the `[network]` section (e.g. `cni_conf_dir`).
    pub fn network_toml(mut self, lines: &str) -> Self {
        self.network.push_str(lines);
        self.network.push('\n');
        self
    }

    /// Extra berth.toml text (other sections).
    pub fn toml(mut self, text: &str) -> Self {
        self.extra.push_str(text);
        self.extra.push('\n');
        self
    }

    /// Starts the stack and imports busybox.
    pub async fn start(self) -> Result<EngineStack> {
        let net = NetSlot::claim()?;
        let cgroup_parent = format!("berth-test-{}-{}", net.index(), std::process::id());
        let toml = format!(
            "{}{}\n[engine]\ncgroup_parent = \"{cgroup_parent}\"\n{}\n{}",
            net.config_toml(None),
            self.network,
            self.engine,
            self.extra
        );
        let stack =
            tokio::task::spawn_blocking(move || Stack::builder().toml(&toml).start()).await??;
        let es = EngineStack {
            stack: Some(stack),
            net: Some(net),
            cgroup_parent,
        };
        es.import_busybox().await?;
        Ok(es)
    }
}

/// A berth stack for engine tests.
#[derive(Debug)]
pub struct EngineStack {
    stack: Option<Stack>,
    net: Option<NetSlot>,
    /// The `[engine] cgroup_parent` of this stack (unique per test).
    pub cgroup_parent: String,
}

/// What a container did when run to its end.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Container id.
    pub id: String,
    /// Its exit code.
    pub exit_code: i64,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

/// A busybox config running `cmd`.
pub fn busybox(cmd: &[&str]) -> pb::ContainerConfig {
    pb::ContainerConfig {
        image: "busybox".into(),
        cmd: Some(types::StringList {
            values: cmd.iter().map(|s| s.to_string()).collect(),
        }),
        ..Default::default()
    }
}

/// A unique container name for this test process.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl EngineStack {
    /// A builder.
    pub fn builder() -> EngineStackBuilder {
        EngineStackBuilder::default()
    }

    /// A stack with the default config.
    pub async fn start() -> Result<Self> {
        Self::builder().start().await
    }

    /// The underlying stack.
    pub fn stack(&self) -> &Stack {
        self.stack.as_ref().expect("stack is running")
    }

    fn channel(&self, s: Service) -> Channel {
        berth_core::uds::channel(self.stack().socket(s))
    }

    /// The network slot of this stack (bridge names, subnets).
    pub fn net(&self) -> &NetSlot {
        self.net.as_ref().expect("slot is held")
    }

    /// Networks client (berth-network).
    pub fn networks(
        &self,
    ) -> berth_proto::berth::network::v1::networks_client::NetworksClient<Channel> {
        berth_proto::berth::network::v1::networks_client::NetworksClient::new(
            self.channel(Service::Network),
        )
    }

    /// Containers client.
    pub fn containers(&self) -> ContainersClient<Channel> {
        ContainersClient::new(self.channel(Service::Engine))
    }

    /// Tasks client.
    pub fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel(Service::Engine))
    }

    /// Volumes client.
    pub fn volumes(&self) -> VolumesClient<Channel> {
        VolumesClient::new(self.channel(Service::Engine))
    }

    /// Sandboxes client (pod sandboxes).
    pub fn sandboxes(
        &self,
    ) -> berth_proto::berth::engine::v1::sandboxes_client::SandboxesClient<Channel> {
        berth_proto::berth::engine::v1::sandboxes_client::SandboxesClient::new(
            self.channel(Service::Engine),
        )
    }

    /// Events client.
    pub fn events(&self) -> EventsClient<Channel> {
        EventsClient::new(self.channel(Service::Engine))
    }

    /// Images client.
    pub fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel(Service::Images))
    }

    /// Loads the busybox test image (as `busybox:latest`).
    pub async fn import_busybox(&self) -> Result<()> {
        let mut client = self.images();
        crate::images_kit::import(&mut client, busybox_archive())
            .await
            .context("import busybox")?;
        Ok(())
    }

    /// Creates a container.
    pub async fn create(
        &self,
        name: &str,
        config: pb::ContainerConfig,
        host: pb::HostConfig,
    ) -> Result<pb::Container> {
        let resp = self
            .containers()
            .create(pb::CreateContainerRequest {
                name: name.into(),
                config: Some(config),
                host_config: Some(host),
                ..Default::default()
            })
            .await?
            .into_inner();
        resp.container.context("create returned no container")
    }

    /// Registers a wait; returns the stream after its `registered` message.
    pub async fn wait_registered(
        &self,
        id: &str,
        condition: pb::WaitCondition,
    ) -> Result<tonic::Streaming<pb::WaitTaskResponse>> {
        let mut s = self
            .tasks()
            .wait(pb::WaitTaskRequest {
                id: id.into(),
                condition: condition.into(),
            })
            .await?
            .into_inner();
        match s.next().await {
            Some(Ok(pb::WaitTaskResponse {
                event: Some(pb::wait_task_response::Event::Registered(_)),
            })) => Ok(s),
            other => bail!("wait did not register: {other:?}"),
        }
    }

    /// The exit a registered wait reports.
    pub async fn wait_exit(
        mut s: tonic::Streaming<pb::WaitTaskResponse>,
        timeout: Duration,
    ) -> Result<pb::WaitExit> {
        match tokio::time::timeout(timeout, s.next()).await {
            Ok(Some(Ok(pb::WaitTaskResponse {
                event: Some(pb::wait_task_response::Event::Exit(e)),
            }))) => Ok(e),
            Ok(other) => bail!("wait ended without an exit: {other:?}"),
            Err(_) => bail!("no exit within {timeout:?}"),
        }
    }

    /// Starts a container.
    pub async fn start_task(&self, id: &str) -> Result<i32> {
        Ok(self
            .tasks()
            .start(pb::StartTaskRequest { id: id.into() })
            .await?
            .into_inner()
            .pid)
    }

    /// Creates, starts and waits for a container; returns its exit code and output.
    pub async fn run(
        &self,
        name: &str,
        config: pb::ContainerConfig,
        host: pb::HostConfig,
    ) -> Result<RunResult> {
        let c = self.create(name, config, host).await?;
        let wait = self
            .wait_registered(&c.id, pb::WaitCondition::NextExit)
            .await?;
        self.start_task(&c.id).await?;
        let exit = Self::wait_exit(wait, Duration::from_secs(60)).await?;
        let (stdout, stderr) = self.logs(&c.id).await?;
        Ok(RunResult {
            id: c.id,
            exit_code: exit.status_code,
            stdout,
            stderr,
        })
    }

    /// A container's whole log, stdout and stderr apart.
    pub async fn logs(&self, id: &str) -> Result<(String, String)> {
        let mut s = self
            .tasks()
            .logs(pb::LogsRequest {
                id: id.into(),
                stdout: true,
                stderr: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        let (mut out, mut err) = (String::new(), String::new());
        while let Some(batch) = s.next().await {
            for e in batch?.entries {
                let text = String::from_utf8_lossy(&e.data);
                if e.stream == types::OutputStream::Stderr as i32 {
                    err.push_str(&text);
                } else {
                    out.push_str(&text);
                }
            }
        }
        Ok((out, err))
    }

    /// A container's record.
    pub async fn inspect(&self, id: &str) -> Result<pb::Container> {
        self.containers()
            .get(pb::GetContainerRequest {
                id: id.into(),
                size: false,
            })
            .await?
            .into_inner()
            .container
            .context("no container")
    }

    /// Force-removes a container (and its anonymous volumes).
    pub async fn remove(&self, id: &str) -> Result<()> {
        self.containers()
            .delete(pb::DeleteContainerRequest {
                id: id.into(),
                force: true,
                remove_volumes: true,
                remove_link: false,
            })
            .await?;
        Ok(())
    }

    /// What is left on the host of containers `ids` (empty when nothing): their bundle, netns
    /// file, mounts, runtime state, cgroups, snapshot, host-side veths and processes (shims)
    /// that name them.
    pub async fn leftovers(&self, ids: &[String]) -> Result<Vec<String>> {
        use berth_core::snapshots::{RemoteSnapshotter, Snapshotter as _};
        let stack = self.stack();
        let state = stack.state_dir();
        let mut left = Vec::new();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        let runc = Command::new("runc")
            .arg("--root")
            .arg(state.join("runtime/runc"))
            .args(["list", "-q"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut cmdlines = Vec::new();
        for entry in std::fs::read_dir("/proc")?.flatten() {
            if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
                cmdlines.push(String::from_utf8_lossy(&cmd).replace('\0', " "));
            }
        }
        let veths = crate::network_kit::links(&["type", "veth"]);
        let snapshots = RemoteSnapshotter::new(stack.socket(Service::Snapshotter), "overlayfs");
        for id in ids {
            for path in [state.join("bundles").join(id), state.join("netns").join(id)] {
                if path.exists() {
                    left.push(format!("{} exists", path.display()));
                }
            }
            for l in mounts.lines().filter(|l| l.contains(id.as_str())) {
                left.push(format!("mount: {l}"));
            }
            if runc.lines().any(|l| l.trim() == id) {
                left.push(format!("runc still knows {id}"));
            }
            for controller in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
                let dir = controller.path().join(&self.cgroup_parent).join(id);
                if dir.exists() {
                    left.push(format!("cgroup {}", dir.display()));
                }
            }
            if snapshots.stat(id).await.is_ok() {
                left.push(format!("snapshot {id}"));
            }
            for c in cmdlines.iter().filter(|c| c.contains(id.as_str())) {
                left.push(format!("process: {c}"));
            }
            // Host-side veth names carry the id's first characters.
            for v in veths.iter().filter(|v| v.contains(&id[..7])) {
                left.push(format!("veth {v}"));
            }
        }
        Ok(left)
    }

    /// The host directory of a container's cgroup in cgroup v1 controller `controller`.
    pub fn cgroup_dir(&self, controller: &str, id: &str) -> PathBuf {
        Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(&self.cgroup_parent)
            .join(id)
    }

    /// `kill -9`s the engine and waits until `berth up` has restarted it and its health check
    /// answers; returns the time from the kill until then.
    pub fn kill9_engine(&self) -> Result<Duration> {
        let stack = self.stack();
        let old = stack.pid(Service::Engine).context("engine pid")?;
        let t0 = Instant::now();
        kill(Pid::from_raw(old), Signal::SIGKILL)?;
        let socket = stack.socket(Service::Engine);
        let new = wait_for(Duration::from_secs(30), || {
            let pid = stack.pid(Service::Engine)?;
            (pid != old && running(pid) && socket.exists()).then_some(pid)
        });
        if new.is_none() {
            bail!("the engine was not restarted; log:\n{}", stack.log_text());
        }
        Ok(t0.elapsed())
    }

    /// Everything this stack's engine has on record, then removes it all (best effort).
    async fn remove_all(&self) {
        // Pod sandboxes first: removing one tears down its network (CNI DEL), ends its PID
        // holder and removes its containers.
        if let Ok(list) = self
            .sandboxes()
            .list(pb::ListSandboxesRequest::default())
            .await
        {
            for sb in list.into_inner().sandboxes {
                let _ = tokio::time::timeout(
                    Duration::from_secs(30),
                    self.sandboxes()
                        .remove(pb::RemoveSandboxRequest { id: sb.id }),
                )
                .await;
            }
        }
        let Ok(list) = self
            .containers()
            .list(pb::ListContainersRequest {
                all: true,
                ..Default::default()
            })
            .await
        else {
            return;
        };
        for c in list.into_inner().containers {
            let _ = tokio::time::timeout(Duration::from_secs(20), self.remove(&c.id)).await;
        }
    }

    fn cleanup_host(&mut self) {
        let Some(stack) = self.stack.as_ref() else {
            return;
        };
        let dir = stack.dir().to_path_buf();
        let state = stack.state_dir();
        // 1. Through the engine, when it still answers.
        let socket = stack.socket(Service::Engine);
        std::thread::scope(|s| {
            s.spawn(|| {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async {
                    if socket.exists() {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(60), self.remove_all()).await;
                    }
                });
            });
        });
        // 2. The stack's services.
        self.stack = None;
        // 3. Shims this stack's engine started, by the PIDs they recorded.
        for entry in std::fs::read_dir(state.join("bundles"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Some(pid) = berth_core::daemon::read_pid_file(&entry.path().join("shim.pid"))
                && running(pid)
            {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        // 4. Runtime containers still known to this stack's runc root.
        let root = state.join("runtime/runc");
        if root.exists()
            && let Ok(out) = Command::new("runc")
                .arg("--root")
                .arg(&root)
                .args(["list", "-q"])
                .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&root)
                    .args(["delete", "--force", id])
                    .output();
            }
        }
        // 5. Mounts under the stack's dir (rootfs, netns files), deepest first.
        unmount_under(&dir);
        // 6. cgroups.
        for controller in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let parent = controller.path().join(&self.cgroup_parent);
            if parent.is_dir() {
                for child in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                    if child.path().is_dir() {
                        let _ = std::fs::remove_dir(child.path());
                    }
                }
                let _ = std::fs::remove_dir(&parent);
            }
        }
        // 7. Network: the slot's drop removes bridges, veths and rules.
        self.net = None;
    }
}

/// Unmounts every mount point at or below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let prefix = dir.display().to_string();
    for _ in 0..3 {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<String> = info
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .map(|p| p.replace("\\040", " "))
            .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
            .collect();
        if points.is_empty() {
            return;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = nix::mount::umount2(p.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Drop for EngineStack {
    fn drop(&mut self) {
        self.cleanup_host();
    }
}

/// Reads a cgroup file as a trimmed string.
pub fn read_cgroup(path: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("read {}", path.display()))?
        .trim()
        .to_string())
}
