//! A pod survives `kill -9` of every berth daemon in turn (CRI on `<state>/cri.sock`, real
//! binaries, the reference CNI plugins): a pod with a container serving HTTP on its CNI
//! address; after each daemon (snapshotter, images, network, engine, gateway — which holds the
//! CRI socket) is killed and `berth up` has restarted it, the pod and the container keep their
//! ids, states and address, ListPodSandbox, PodSandboxStatus, ListContainers and ContainerStatus
//! answer exactly as before, the container is the same process and still answers from the
//! host, and a new container still joins the pod (it fetches the server's page over the pod's
//! loopback) and is removed again. Root only; needs /usr/lib/cni.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use berth_core::Service;
use berth_integration::cri_kit::{
    self, CriStack, PATIENCE, Runtime as Client, exited, plugins_ready, run_pod, sh_container,
    start_container,
};
use berth_integration::gateway_kit::http_get;
use berth_integration::stack::{Stack, running};
use berth_proto::cri::runtime::v1 as cri;
use berth_proto::cri::runtime::v1::runtime_service_client::RuntimeServiceClient;

fn pod_config(log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        hostname: "survivor".into(),
        labels: [("app".to_string(), "survivor".to_string())].into(),
        ..cri_kit::pod_config("berth-cri-restart", "survivor", Some(log_dir))
    }
}

/// What kubelet would see of the pod and its server container.
#[derive(Debug, PartialEq)]
struct Seen {
    pods: Vec<cri::PodSandbox>,
    pod: cri::PodSandboxStatus,
    containers: Vec<cri::Container>,
    server: cri::ContainerStatus,
}

async fn seen(rt: &mut Client, pod: &str, server: &str) -> Result<Seen> {
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items;
    let status = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.into(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("no pod status")?;
    let mut containers = rt
        .list_containers(cri::ListContainersRequest { filter: None })
        .await?
        .into_inner()
        .containers;
    containers.sort_by(|a, b| a.id.cmp(&b.id));
    let server = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: server.into(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("no container status")?;
    Ok(Seen {
        pods,
        pod: status,
        containers,
        server,
    })
}

/// The page the server container serves on the pod's address, from the host.
fn page(ip: &str) -> Result<String> {
    let out = http_get(&format!("{ip}:8080"), "/")?;
    ensure!(out.starts_with("HTTP/1."), "not HTTP: {out:?}");
    Ok(out.lines().last().unwrap_or_default().to_string())
}

/// A CRI client once the gateway's socket answers again.
async fn client(socket: &Path) -> Result<Client> {
    let end = Instant::now() + PATIENCE;
    loop {
        let mut rt = RuntimeServiceClient::new(berth_core::uds::channel(socket.to_path_buf()));
        match rt.version(cri::VersionRequest::default()).await {
            Ok(_) => return Ok(rt),
            Err(e) if Instant::now() > end => bail!("the CRI socket does not answer: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Waits until `berth status` says every daemon is healthy.
fn all_healthy(stack: &Stack) -> Result<()> {
    let end = Instant::now() + PATIENCE;
    loop {
        let out = stack.berth("status").output()?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > end {
            bail!(
                "the stack is not healthy again: {}\nlog:\n{}",
                String::from_utf8_lossy(&out.stdout),
                stack.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Creates a container in `pod` that fetches the server's page over the pod's loopback, waits
/// for it to complete, checks it did, and removes it.
async fn joiner(
    rt: &mut Client,
    pod: &str,
    config: &cri::PodSandboxConfig,
    logs: &Path,
    name: &str,
) -> Result<()> {
    let id = start_container(
        rt,
        pod,
        config,
        sh_container(name, "wget -qO- http://127.0.0.1:8080/"),
    )
    .await?;
    let st = exited(rt, &id).await?;
    ensure!(
        st.exit_code == 0 && st.reason == "Completed",
        "{name}: {st:?}"
    );
    let log = std::fs::read_to_string(logs.join(name).join("0.log"))?;
    ensure!(log.contains(" stdout F still-here"), "{name} log: {log:?}");
    rt.remove_container(cri::RemoveContainerRequest { container_id: id })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_survives_kill_9_of_every_daemon() -> Result<()> {
    if !plugins_ready() {
        return Ok(());
    }
    let s = CriStack::start("crr", 7)?;
    let (d, logs) = (&s.d, &s.logs);
    let socket: PathBuf = d.cri_socket();
    let mut rt = client(&socket).await?;

    let config = pod_config(logs.path());
    let guard = run_pod(&mut rt, d, &config).await?;
    let pod = guard.id.clone();
    let server = start_container(
        &mut rt,
        &pod,
        &config,
        sh_container(
            "server",
            "mkdir -p /www && echo still-here > /www/index.html && exec httpd -f -p 8080 -h /www",
        ),
    )
    .await?;

    let before = seen(&mut rt, &pod, &server).await?;
    ensure!(
        before.pod.state == cri::PodSandboxState::SandboxReady as i32
            && before.server.state == cri::ContainerState::ContainerRunning as i32,
        "{before:?}"
    );
    // The handler reads back as sent ("" is the default), as containerd's does.
    ensure!(before.pod.runtime_handler.is_empty(), "{:?}", before.pod);
    let ip = before
        .pod
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    ensure!(!ip.is_empty(), "no pod IP: {:?}", before.pod);
    let end = Instant::now() + PATIENCE;
    let mut answer = page(&ip);
    while !answer.as_ref().is_ok_and(|p| p == "still-here") && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(200)).await;
        answer = page(&ip);
    }
    ensure!(
        answer.as_ref().is_ok_and(|p| p == "still-here"),
        "{answer:?}"
    );
    let pid = d.ok(&["inspect", "-f", "{{.State.Pid}}", &server])?;
    ensure!(pid.parse::<i32>().is_ok_and(running), "pid {pid:?}");
    joiner(&mut rt, &pod, &config, logs.path(), "joiner-before").await?;

    for service in Service::ALL {
        let (old, new) = d.kill9(service)?;
        all_healthy(&d.stack)?;
        eprintln!("{}: killed pid {old}, restarted as {new}", service.name());
        let mut rt = client(&socket).await?;
        let after = seen(&mut rt, &pod, &server).await?;
        ensure!(
            after == before,
            "after kill -9 of {}:\nbefore {before:#?}\nafter {after:#?}",
            service.name()
        );
        let now = d.ok(&["inspect", "-f", "{{.State.Pid}}", &server])?;
        ensure!(
            now == pid && pid.parse::<i32>().is_ok_and(running),
            "after kill -9 of {}: the server's pid was {pid}, is {now}",
            service.name()
        );
        ensure!(
            page(&ip)? == "still-here",
            "after kill -9 of {}: the server does not answer",
            service.name()
        );
        joiner(
            &mut rt,
            &pod,
            &config,
            logs.path(),
            &format!("joiner-{}", service.name()),
        )
        .await
        .with_context(|| format!("a new container after kill -9 of {}", service.name()))?;
    }
    Ok(())
}
