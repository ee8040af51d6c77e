//! CRI containers on `<state>/cri.sock`, real binaries and the reference CNI plugins: two busybox
//! containers of one pod share its network namespace (one serves HTTP on 127.0.0.1, the other
//! fetches it and ends Completed with exit code 0), log in the kubelet's CRI format under the
//! pod's log directory, are found by the list filters, show in `docker ps -a` under their
//! dockershim names; StopContainer ends one EXITED with its exit code, RemoveContainer removes it
//! (twice: idempotent); unknown ids: Stop and Remove succeed, Status is NOT_FOUND, Create in an
//! unknown pod is NOT_FOUND. Root only; needs /usr/lib/cni.

use std::path::Path;

use anyhow::{Result, ensure};
use berth_integration::cri_kit::{
    self, CriStack, container_status, exited, plugins_ready, pod_namespaces, run_pod, sh_container,
};
use berth_proto::cri::runtime::v1 as cri;
use berth_proto::cri::runtime::v1::runtime_service_client::RuntimeServiceClient;
use tonic::Code;

type Channel = berth_core::uds::Channel;

fn pod_config(log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        hostname: "cri-pod".into(),
        linux: Some(pod_namespaces()),
        ..cri_kit::pod_config("berth-cri-test", "web", Some(log_dir))
    }
}

fn container(name: &str, script: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        labels: [("role".to_string(), name.to_string())].into(),
        ..sh_container(name, script)
    }
}

async fn list(
    rt: &mut RuntimeServiceClient<Channel>,
    filter: cri::ContainerFilter,
) -> Result<Vec<String>> {
    let mut ids: Vec<String> = rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(filter),
        })
        .await?
        .into_inner()
        .containers
        .into_iter()
        .map(|c| c.id)
        .collect();
    ids.sort();
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_containers_share_the_network_log_and_stop() -> Result<()> {
    if !plugins_ready() {
        return Ok(());
    }
    let s = CriStack::start("crc", 6)?;
    let (d, logs) = (&s.d, &s.logs);
    let mut rt = s.runtime();

    let pod_config = pod_config(logs.path());
    let guard = run_pod(&mut rt, d, &pod_config).await?;
    let pod = guard.id.clone();
    // kubelet makes the per-container log directories.
    for name in ["server", "client"] {
        std::fs::create_dir_all(logs.path().join(name))?;
    }

    let create = |config: cri::ContainerConfig| cri::CreateContainerRequest {
        pod_sandbox_id: pod.clone(),
        config: Some(config),
        sandbox_config: Some(pod_config.clone()),
    };
    let server = rt
        .create_container(create(container(
            "server",
            "mkdir -p /www && echo hello-from-the-pod > /www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /www",
        )))
        .await?
        .into_inner()
        .container_id;
    let st = container_status(&mut rt, &server).await?;
    ensure!(
        st.state == cri::ContainerState::ContainerCreated as i32,
        "{st:?}"
    );
    // The same name in the same pod: refused.
    let err = rt
        .create_container(create(container("server", "true")))
        .await
        .unwrap_err();
    ensure!(err.code() == Code::AlreadyExists, "{err:?}");

    rt.start_container(cri::StartContainerRequest {
        container_id: server.clone(),
    })
    .await?;
    let client = rt
        .create_container(create(container(
            "client",
            "for i in $(seq 1 100); do wget -qO- http://127.0.0.1:8080/ && exit 0; sleep 0.2; done; exit 1",
        )))
        .await?
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: client.clone(),
    })
    .await?;

    let st = exited(&mut rt, &client).await?;
    ensure!(
        st.exit_code == 0 && st.reason == "Completed",
        "client: {st:?}"
    );
    ensure!(
        st.started_at > 0 && st.finished_at >= st.started_at,
        "{st:?}"
    );
    ensure!(
        st.metadata.clone().unwrap_or_default().name == "client" && st.labels["role"] == "client",
        "{st:?}"
    );
    ensure!(!st.image_ref.is_empty(), "{st:?}");
    let log_path = logs.path().join("client/0.log");
    ensure!(st.log_path == log_path.to_string_lossy(), "{st:?}");
    let log = std::fs::read_to_string(&log_path)?;
    ensure!(
        log.lines()
            .any(|l| l.ends_with(" stdout F hello-from-the-pod")
                && l.split(' ').next().is_some_and(|t| t.contains('T'))),
        "log in the CRI format: {log:?}"
    );

    let st = container_status(&mut rt, &server).await?;
    ensure!(
        st.state == cri::ContainerState::ContainerRunning as i32,
        "{st:?}"
    );

    // Filters.
    let both = {
        let mut v = vec![server.clone(), client.clone()];
        v.sort();
        v
    };
    let by_pod = list(
        &mut rt,
        cri::ContainerFilter {
            pod_sandbox_id: pod.clone(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(by_pod == both, "{by_pod:?}");
    let running = list(
        &mut rt,
        cri::ContainerFilter {
            state: Some(cri::ContainerStateValue {
                state: cri::ContainerState::ContainerRunning.into(),
            }),
            pod_sandbox_id: pod.clone(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(running == [server.clone()], "{running:?}");
    let by_label = list(
        &mut rt,
        cri::ContainerFilter {
            label_selector: [("role".to_string(), "client".to_string())].into(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(by_label == [client.clone()], "{by_label:?}");
    let by_id = list(
        &mut rt,
        cri::ContainerFilter {
            id: server[..12].into(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(by_id == [server.clone()], "{by_id:?}");

    // docker ps -a shows them under their dockershim names.
    let names = d.ok(&["ps", "-a", "--format", "{{.Names}}"])?;
    let want = format!(
        "k8s_server_web_berth-cri-test_uid-web-{}_0",
        std::process::id()
    );
    ensure!(names.lines().any(|n| n == want), "{names}");

    rt.stop_container(cri::StopContainerRequest {
        container_id: server.clone(),
        timeout: 2,
    })
    .await?;
    let st = exited(&mut rt, &server).await?;
    ensure!(st.exit_code != 0 && st.reason == "Error", "server: {st:?}");

    for _ in 0..2 {
        rt.remove_container(cri::RemoveContainerRequest {
            container_id: server.clone(),
        })
        .await?;
    }
    let err = container_status(&mut rt, &server).await.unwrap_err();
    ensure!(
        err.downcast_ref::<tonic::Status>()
            .is_some_and(|s| s.code() == Code::NotFound),
        "{err:?}"
    );

    // Unknown ids.
    let unknown = "0".repeat(64);
    rt.stop_container(cri::StopContainerRequest {
        container_id: unknown.clone(),
        timeout: 0,
    })
    .await?;
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: unknown.clone(),
    })
    .await?;
    let err = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: unknown,
            config: Some(container("x", "true")),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::NotFound, "{err:?}");
    Ok(())
}
