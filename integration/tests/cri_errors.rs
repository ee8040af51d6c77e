//! Bad input through the CRI (`<state>/cri.sock`, real binaries, the reference CNI plugins),
//! each answered with the gRPC code kubelet expects and leaving nothing behind: RunPodSandbox
//! while no CNI config exists (Status says NetworkReady false with kubelet's reason; the run
//! fails saying why, and no record, namespace file or name reservation stays: the same pod runs
//! once a config appears), a pod name already in use (ALREADY_EXISTS), log paths outside the
//! pod's log directory (INVALID_ARGUMENT), a container created in a stopped sandbox
//! (FAILED_PRECONDITION), unknown pod and container ids (NOT_FOUND), an unknown runtime handler
//! (INVALID_ARGUMENT). (A pull of an image that does not exist is in cri_images.rs.)
//! Root only; needs /usr/lib/cni.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use berth_integration::cri_kit::{self, conflist, plugins_ready, run_pod, sh_container};
use berth_integration::gateway_kit::DockerStack;
use berth_integration::network_kit::NetSlot;
use berth_integration::py_kit::with_busybox;
use berth_integration::stack::Stack;
use berth_proto::cri::runtime::v1 as cri;
use berth_proto::cri::runtime::v1::runtime_service_client::RuntimeServiceClient;
use tonic::Code;

type Client = RuntimeServiceClient<berth_core::uds::Channel>;

fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri_kit::pod_config("berth-cri-errors", name, Some(log_dir))
}

fn container(name: &str, log_path: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        command: vec!["sleep".into(), "60".into()],
        args: Vec::new(),
        log_path: log_path.into(),
        ..sh_container(name, "")
    }
}

async fn pod_ids(rt: &mut Client) -> Result<Vec<String>> {
    Ok(rt
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items
        .into_iter()
        .map(|p| p.id)
        .collect())
}

async fn container_ids(rt: &mut Client) -> Result<Vec<String>> {
    Ok(rt
        .list_containers(cri::ListContainersRequest { filter: None })
        .await?
        .into_inner()
        .containers
        .into_iter()
        .map(|c| c.id)
        .collect())
}

/// The entries of `dir` (none when it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn network_ready(rt: &mut Client) -> Result<cri::RuntimeCondition> {
    let status = rt
        .status(cri::StatusRequest { verbose: false })
        .await?
        .into_inner()
        .status
        .unwrap_or_default();
    status
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .ok_or_else(|| anyhow::anyhow!("no NetworkReady condition"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_code_kubelet_expects_and_leaves_nothing() -> Result<()> {
    if !plugins_ready() {
        return Ok(());
    }
    let slot = NetSlot::claim()?;
    let conf = tempfile::tempdir()?;
    let ipam = tempfile::tempdir()?;
    let logs = tempfile::tempdir()?;
    let d = DockerStack::start_from(
        Stack::builder().env("BERTH_NETWORK__CNI_CONF_DIR", conf.path().to_str().unwrap()),
    )?;
    let _registry = with_busybox(&d)?;
    let mut rt = RuntimeServiceClient::new(berth_core::uds::channel(d.cri_socket()));
    let sandbox_files = d.stack.root().join("engine/sandboxes");
    let sandbox_ns = d.stack.state_dir().join("sandboxes");

    // --- No CNI config yet: NetworkReady false with kubelet's reason; RunPodSandbox fails
    // saying why and leaves nothing.
    let cond = network_ready(&mut rt).await?;
    ensure!(
        !cond.status && cond.reason == "NetworkPluginNotReady",
        "{cond:?}"
    );
    let config = pod_config("errors", logs.path());
    let err = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::FailedPrecondition, "{err:?}");
    ensure!(
        err.message().contains("network") && err.message().contains("config"),
        "the reason: {err:?}"
    );
    ensure!(pod_ids(&mut rt).await?.is_empty());
    ensure!(
        entries(&sandbox_files).is_empty() && entries(&sandbox_ns).is_empty(),
        "left behind: {:?} {:?}",
        entries(&sandbox_files),
        entries(&sandbox_ns)
    );

    // A config appears (the directory is watched): the same pod name runs.
    conflist(&slot, "cre", 8, conf.path(), ipam.path())?;
    let end = Instant::now() + Duration::from_secs(60);
    while !network_ready(&mut rt).await?.status {
        if Instant::now() > end {
            bail!("NetworkReady stays false with a conflist in place");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let guard = run_pod(&mut rt, &d, &config).await?;
    let pod = guard.id.clone();

    // --- The same name again: ALREADY_EXISTS, and still one pod.
    let err = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::AlreadyExists, "{err:?}");
    ensure!(pod_ids(&mut rt).await? == [pod.as_str()]);

    // --- An unknown runtime handler: refused, nothing made.
    let err = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config("other", logs.path())),
            runtime_handler: "no-such-handler".into(),
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::InvalidArgument, "{err:?}");
    ensure!(pod_ids(&mut rt).await? == [pod.as_str()]);
    // The VM runtime as a pod handler: not yet (one VM per pod), said so, nothing made.
    let err = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config("in-a-vm", logs.path())),
            runtime_handler: "berth-vm".into(),
        })
        .await
        .unwrap_err();
    ensure!(
        err.code() == Code::Unimplemented && err.message().contains("one VM per pod"),
        "{err:?}"
    );
    ensure!(pod_ids(&mut rt).await? == [pod.as_str()]);

    // --- Log paths outside the pod's log directory: INVALID_ARGUMENT, no container.
    let before = d.container_ids();
    for bad in ["../escape.log", "/etc/berth-test.log", "a/../../b.log"] {
        let err = rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(container("logs", bad)),
                sandbox_config: Some(config.clone()),
            })
            .await
            .unwrap_err();
        ensure!(err.code() == Code::InvalidArgument, "{bad}: {err:?}");
    }
    ensure!(container_ids(&mut rt).await?.is_empty());
    ensure!(d.container_ids() == before, "{:?}", d.container_ids());
    ensure!(!Path::new("/etc/berth-test.log").exists());
    // A good one works, in the same name (nothing was reserved).
    std::fs::create_dir_all(logs.path().join("logs"))?;
    let ok = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container("logs", "logs/0.log")),
            sandbox_config: Some(config.clone()),
        })
        .await?
        .into_inner()
        .container_id;
    ensure!(container_ids(&mut rt).await? == [ok.as_str()]);

    // --- A container created in a stopped sandbox: FAILED_PRECONDITION, no container.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await?;
    let before = d.container_ids();
    let err = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container("late", "late/0.log")),
            sandbox_config: Some(config.clone()),
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::FailedPrecondition, "{err:?}");
    ensure!(container_ids(&mut rt).await? == [ok.as_str()]);
    ensure!(d.container_ids() == before, "{:?}", d.container_ids());

    // --- Unknown ids: NOT_FOUND.
    let unknown = "0".repeat(64);
    let err = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: unknown.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::NotFound, "{err:?}");
    let err = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: unknown.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::NotFound, "{err:?}");
    let err = rt
        .start_container(cri::StartContainerRequest {
            container_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::NotFound, "{err:?}");
    let err = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: unknown.clone(),
            cmd: vec!["true".into()],
            timeout: 0,
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::NotFound, "{err:?}");
    let err = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: unknown.clone(),
            config: Some(container("x", "x/0.log")),
            sandbox_config: Some(config.clone()),
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::NotFound, "{err:?}");

    // Removal leaves nothing: no pod, no container, no sandbox files.
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await?;
    ensure!(pod_ids(&mut rt).await?.is_empty());
    ensure!(container_ids(&mut rt).await?.is_empty());
    ensure!(
        entries(&sandbox_files).is_empty() && entries(&sandbox_ns).is_empty(),
        "left behind: {:?} {:?}",
        entries(&sandbox_files),
        entries(&sandbox_ns)
    );
    Ok(())
}
