//! What the CRI tests share: the CNI plugins check, a bridge conflist for a test's own network
//! slot, a stack started on it with busybox at hand, pod and container configs as kubelet sends
//! them, running pods and containers, waiting for a container to exit, and a guard that removes
//! a pod (with its containers) when a test ends early.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use berth_proto::cri::runtime::v1 as cri;
use berth_proto::cri::runtime::v1::runtime_service_client::RuntimeServiceClient;

use crate::gateway_kit::{self, DockerStack};
use crate::images_kit::Registry;
use crate::network_kit::NetSlot;
use crate::py_kit::with_busybox;
use crate::stack::Stack;

/// A CRI runtime client.
pub type Runtime = RuntimeServiceClient<berth_core::uds::Channel>;

/// A bound on waits, only so that a hang fails the test.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A stack whose network daemon uses one bridge conflist of the test's own network slot, with
/// busybox pushed to a loopback registry, and a directory for pod logs. Everything goes away
/// when dropped (the registry first, the slot last).
#[derive(Debug)]
pub struct CriStack {
    _registry: Registry,
    pub d: DockerStack,
    pub logs: tempfile::TempDir,
    /// The conflist's subnet.
    pub subnet: String,
    _ipam: tempfile::TempDir,
    _conf: tempfile::TempDir,
    _slot: NetSlot,
}

impl CriStack {
    /// Starts the stack on the conflist [`conflist`] writes for `tag` and subnet `index`.
    pub fn start(tag: &str, index: u8) -> Result<Self> {
        let slot = NetSlot::claim()?;
        let conf = tempfile::tempdir()?;
        let ipam = tempfile::tempdir()?;
        let logs = tempfile::tempdir()?;
        let subnet = conflist(&slot, tag, index, conf.path(), ipam.path())?;
        let d = DockerStack::start_from(
            Stack::builder().env("BERTH_NETWORK__CNI_CONF_DIR", conf.path().to_str().unwrap()),
        )?;
        let registry = with_busybox(&d)?;
        Ok(Self {
            _registry: registry,
            d,
            logs,
            subnet,
            _ipam: ipam,
            _conf: conf,
            _slot: slot,
        })
    }

    /// A runtime client on the stack's CRI socket.
    pub fn runtime(&self) -> Runtime {
        RuntimeServiceClient::new(berth_core::uds::channel(self.d.cri_socket()))
    }
}

/// Pod `name` in `namespace` as kubelet configures one: a uid unique to this test process
/// (`uid-<name>-<pid>`), logs under `log_dir` if given; everything else default, for callers to
/// override (`cri::PodSandboxConfig { hostname, ..pod_config(..) }`).
pub fn pod_config(namespace: &str, name: &str, log_dir: Option<&Path>) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}-{}", std::process::id()),
            namespace: namespace.into(),
            attempt: 0,
        }),
        log_directory: log_dir
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// The Linux part of a pod config kubelet sends for an ordinary pod: network and IPC shared by
/// the pod, a PID namespace per container.
pub fn pod_namespaces() -> cri::LinuxPodSandboxConfig {
    cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                network: cri::NamespaceMode::Pod.into(),
                pid: cri::NamespaceMode::Container.into(),
                ipc: cri::NamespaceMode::Pod.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Container `name` of busybox running `sh -c script`, logging to `<name>/0.log` under the
/// pod's log directory; everything else default, for callers to override.
pub fn sh_container(name: &str, script: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: "busybox".into(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into()],
        args: vec![script.into()],
        log_path: format!("{name}/0.log"),
        ..Default::default()
    }
}

/// Runs a pod (removed again by the returned guard; its id is `guard.id`).
pub async fn run_pod(
    rt: &mut Runtime,
    d: &DockerStack,
    config: &cri::PodSandboxConfig,
) -> Result<PodGuard> {
    let id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    Ok(PodGuard {
        socket: d.cri_socket(),
        id,
    })
}

/// Creates and starts a container in `pod` (making its log directory first, as kubelet does);
/// returns its id.
pub async fn start_container(
    rt: &mut Runtime,
    pod: &str,
    pod_config: &cri::PodSandboxConfig,
    config: cri::ContainerConfig,
) -> Result<String> {
    let log_dir = Path::new(&pod_config.log_directory);
    std::fs::create_dir_all(log_dir.join(&config.metadata.as_ref().context("metadata")?.name))?;
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        })
        .await?
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await?;
    Ok(id)
}

/// ContainerStatus of `id`.
pub async fn container_status(rt: &mut Runtime, id: &str) -> Result<cri::ContainerStatus> {
    rt.container_status(cri::ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await?
    .into_inner()
    .status
    .context("no status")
}

/// The status of `id` once it has exited (within [`PATIENCE`]).
pub async fn exited(rt: &mut Runtime, id: &str) -> Result<cri::ContainerStatus> {
    let end = Instant::now() + PATIENCE;
    loop {
        let st = container_status(rt, id).await?;
        if st.state == cri::ContainerState::ContainerExited as i32 {
            return Ok(st);
        }
        if Instant::now() > end {
            bail!("container {id} did not exit: {st:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the stack can run and the CNI reference plugins are in /usr/lib/cni (a note says
/// why not).
pub fn plugins_ready() -> bool {
    if !gateway_kit::ready() {
        return false;
    }
    for p in ["bridge", "host-local", "loopback"] {
        if !Path::new("/usr/lib/cni").join(p).is_file() {
            eprintln!("skipped: the CNI reference plugins are not in /usr/lib/cni");
            return false;
        }
    }
    true
}

/// Writes into `conf` one bridge conflist (bridge `slot.name(tag)`, host-local addresses from
/// subnet `slot.subnet(index)` kept in `ipam`); returns the subnet.
pub fn conflist(slot: &NetSlot, tag: &str, index: u8, conf: &Path, ipam: &Path) -> Result<String> {
    let subnet = slot.subnet(index);
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("{tag}{}", std::process::id()),
        "plugins": [{
            "type": "bridge",
            "bridge": slot.name(tag),
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": subnet }]],
                "dataDir": ipam,
            }
        }],
    });
    std::fs::write(conf.join("10-pods.conflist"), conflist.to_string())?;
    Ok(subnet)
}

/// Stops and removes a pod (and with it its containers) through the CRI when dropped (on its
/// own thread: Drop is not async).
#[derive(Debug)]
pub struct PodGuard {
    pub socket: PathBuf,
    pub id: String,
}

impl Drop for PodGuard {
    fn drop(&mut self) {
        let (socket, id) = (self.socket.clone(), self.id.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let mut c = RuntimeServiceClient::new(berth_core::uds::channel(socket));
                let _ = c
                    .stop_pod_sandbox(cri::StopPodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    })
                    .await;
                let _ = c
                    .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
                    .await;
            });
        })
        .join();
    }
}
