//! CRI pod sandboxes on `<state>/cri.sock`, real binaries and the reference CNI plugins: a pod
//! on a CNI bridge conflist is READY with an address from the conflist's subnet, found by the
//! list filters (id prefix, state, labels), NOTREADY after StopPodSandbox and gone after
//! RemovePodSandbox; a `kill -9` of the gateway changes nothing; Stop and Remove of an unknown
//! id succeed, its status is NOT_FOUND; Status advertises the default runtime handler.
//! Root only; needs /usr/lib/cni.

use std::path::Path;

use anyhow::{Result, ensure};
use berth_integration::cri_kit::{self, PodGuard, conflist, plugins_ready, pod_namespaces};
use berth_integration::gateway_kit::DockerStack;
use berth_integration::network_kit::NetSlot;
use berth_integration::stack::Stack;
use berth_proto::cri::runtime::v1 as cri;
use berth_proto::cri::runtime::v1::runtime_service_client::RuntimeServiceClient;
use tonic::Code;

type Channel = berth_core::uds::Channel;

fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        hostname: "cri-pod".into(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        labels: [
            ("app".to_string(), name.to_string()),
            ("tier".to_string(), "test".to_string()),
        ]
        .into(),
        annotations: [("berth.test/pod".to_string(), name.to_string())].into(),
        linux: Some(pod_namespaces()),
        ..cri_kit::pod_config("berth-cri-test", name, Some(log_dir))
    }
}

async fn list(
    rt: &mut RuntimeServiceClient<Channel>,
    filter: cri::PodSandboxFilter,
) -> Result<Vec<String>> {
    Ok(rt
        .list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(filter),
        })
        .await?
        .into_inner()
        .items
        .into_iter()
        .map(|p| p.id)
        .collect())
}

async fn status(rt: &mut RuntimeServiceClient<Channel>, id: &str) -> Result<cri::PodSandboxStatus> {
    rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
        pod_sandbox_id: id.into(),
        verbose: false,
    })
    .await?
    .into_inner()
    .status
    .ok_or_else(|| anyhow::anyhow!("no status"))
}

fn state(s: cri::PodSandboxState) -> Option<cri::PodSandboxStateValue> {
    Some(cri::PodSandboxStateValue { state: s.into() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_run_report_list_stop_and_go_away() -> Result<()> {
    if !plugins_ready() {
        return Ok(());
    }
    let slot = NetSlot::claim()?;
    let conf = tempfile::tempdir()?;
    let ipam = tempfile::tempdir()?;
    let logs = tempfile::tempdir()?;
    let subnet = conflist(&slot, "cri", 5, conf.path(), ipam.path())?;
    let d = DockerStack::start_from(
        Stack::builder().env("BERTH_NETWORK__CNI_CONF_DIR", conf.path().to_str().unwrap()),
    )?;
    let mut rt = RuntimeServiceClient::new(berth_core::uds::channel(d.cri_socket()));

    // The default handler, with recursive read-only mounts.
    let s = rt
        .status(cri::StatusRequest { verbose: false })
        .await?
        .into_inner();
    let default = s.runtime_handlers.iter().find(|h| h.name.is_empty());
    ensure!(
        default
            .and_then(|h| h.features)
            .is_some_and(|f| f.recursive_read_only_mounts),
        "{s:?}"
    );
    ensure!(
        s.features.is_some_and(|f| f.supplemental_groups_policy),
        "{s:?}"
    );

    let id = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config("web", logs.path())),
            runtime_handler: String::new(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    let _guard = PodGuard {
        socket: d.cri_socket(),
        id: id.clone(),
    };
    ensure!(id.len() == 64, "pod id {id}");
    let other = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config("db", logs.path())),
            runtime_handler: String::new(),
        })
        .await?
        .into_inner()
        .pod_sandbox_id;
    let _other_guard = PodGuard {
        socket: d.cri_socket(),
        id: other.clone(),
    };

    // The gateway keeps nothing: after its kill -9 the pods are as they were.
    d.kill9_gateway()?;
    let st = status(&mut rt, &id).await?;
    ensure!(
        st.state == cri::PodSandboxState::SandboxReady as i32,
        "{st:?}"
    );
    let ip = st.network.clone().unwrap_or_default().ip;
    let prefix = subnet.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
    ensure!(
        !ip.is_empty() && ip.starts_with(prefix),
        "pod ip {ip:?} outside {subnet}"
    );
    ensure!(st.created_at > 0, "{st:?}");
    let meta = st.metadata.clone().unwrap_or_default();
    ensure!(
        meta.name == "web" && meta.namespace == "berth-cri-test",
        "{meta:?}"
    );
    ensure!(st.labels["app"] == "web" && st.annotations["berth.test/pod"] == "web");
    let ns = st
        .linux
        .clone()
        .and_then(|l| l.namespaces)
        .and_then(|n| n.options)
        .unwrap_or_default();
    ensure!(ns.pid == cri::NamespaceMode::Container as i32, "{ns:?}");

    let verbose = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: true,
        })
        .await?
        .into_inner();
    ensure!(!verbose.info.is_empty(), "verbose status has no info");

    // Port forwarding into the ready pod's network namespace: a streaming URL.
    let url = rt
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: id.clone(),
            port: vec![8080],
        })
        .await?
        .into_inner()
        .url;
    ensure!(
        url.starts_with("http://127.0.0.1:") && url.contains("/portforward/"),
        "{url}"
    );
    let err = rt
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: "0123456789ab".into(),
            port: vec![8080],
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::NotFound, "{err:?}");

    // Filters.
    let all = list(&mut rt, cri::PodSandboxFilter::default()).await?;
    ensure!(all.contains(&id) && all.contains(&other), "{all:?}");
    let by_id = list(
        &mut rt,
        cri::PodSandboxFilter {
            id: id[..12].into(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(by_id == [id.clone()], "{by_id:?}");
    let by_label = list(
        &mut rt,
        cri::PodSandboxFilter {
            label_selector: [("app".to_string(), "db".to_string())].into(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(by_label == [other.clone()], "{by_label:?}");

    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.clone(),
    })
    .await?;
    // Again: idempotent.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.clone(),
    })
    .await?;
    let st = status(&mut rt, &id).await?;
    ensure!(
        st.state == cri::PodSandboxState::SandboxNotready as i32,
        "{st:?}"
    );
    let err = rt
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: id.clone(),
            port: vec![8080],
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::FailedPrecondition, "{err:?}");
    let ready = list(
        &mut rt,
        cri::PodSandboxFilter {
            state: state(cri::PodSandboxState::SandboxReady),
            ..Default::default()
        },
    )
    .await?;
    ensure!(ready.contains(&other) && !ready.contains(&id), "{ready:?}");
    let not_ready = list(
        &mut rt,
        cri::PodSandboxFilter {
            state: state(cri::PodSandboxState::SandboxNotready),
            label_selector: [("tier".to_string(), "test".to_string())].into(),
            ..Default::default()
        },
    )
    .await?;
    ensure!(not_ready == [id.clone()], "{not_ready:?}");

    for pod in [&id, &other] {
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await?;
    }
    let left = list(&mut rt, cri::PodSandboxFilter::default()).await?;
    ensure!(left.is_empty(), "{left:?}");
    let err = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::NotFound, "{err:?}");

    // Unknown ids: Stop and Remove succeed, Status is NOT_FOUND.
    let unknown = "0".repeat(64);
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: unknown.clone(),
    })
    .await?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: unknown.clone(),
    })
    .await?;
    let err = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: unknown,
            verbose: false,
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::NotFound, "{err:?}");
    // No config: refused.
    let err = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest::default())
        .await
        .unwrap_err();
    ensure!(err.code() == Code::InvalidArgument, "{err:?}");
    Ok(())
}
