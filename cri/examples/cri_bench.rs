//! The CRI bench client (`bench/cri.sh`): times pod and container lifecycles through any CRI
//! runtime's socket (berth's or containerd's), in-process, so no CLI start-up is measured.
//!
//! ```text
//! cri_bench --socket S --image REF --scenario pod|pod_container --runs N [--warmup W] [--tag T]
//! cri_bench --socket S --image REF --scenario hold --runs N [--tag T]
//! ```
//!
//! `pod`: RunPodSandbox, StopPodSandbox, RemovePodSandbox. `pod_container`: RunPodSandbox,
//! then CreateContainer, StartContainer, StopContainer (timeout 0: SIGKILL), RemoveContainer,
//! then StopPodSandbox, RemovePodSandbox. Each run prints one JSON line of per-stage ms.
//! `hold`: starts N pods with one `sleep` container each, prints `ready` and waits for stdin to
//! close (the caller measures memory meanwhile), then removes them.

use std::io::BufRead;
use std::time::Instant;

use berth_proto::cri::runtime::v1 as cri;
use cri::image_service_client::ImageServiceClient;
use cri::runtime_service_client::RuntimeServiceClient;

type Client = RuntimeServiceClient<berth_core::uds::Channel>;
type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Args {
    socket: String,
    image: String,
    scenario: String,
    runs: usize,
    warmup: usize,
    tag: String,
    log_dir: String,
}

fn args() -> Res<Args> {
    let mut a = Args {
        socket: String::new(),
        image: String::new(),
        scenario: "pod".into(),
        runs: 10,
        warmup: 2,
        tag: std::process::id().to_string(),
        log_dir: std::env::temp_dir().display().to_string(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--socket" => a.socket = value()?,
            "--image" => a.image = value()?,
            "--scenario" => a.scenario = value()?,
            "--runs" => a.runs = value()?.parse()?,
            "--warmup" => a.warmup = value()?.parse()?,
            "--tag" => a.tag = value()?,
            "--log-dir" => a.log_dir = value()?,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    if a.socket.is_empty() || a.image.is_empty() {
        return Err("--socket and --image are required".into());
    }
    Ok(a)
}

/// What kubelet asks for a pod without `shareProcessNamespace`: one network and IPC namespace
/// per pod, a PID namespace per container.
fn namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod.into(),
        pid: cri::NamespaceMode::Container.into(),
        ipc: cri::NamespaceMode::Pod.into(),
        ..Default::default()
    }
}

fn pod_config(a: &Args, name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "bench".into(),
            attempt: 0,
        }),
        log_directory: format!("{}/{name}", a.log_dir),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_config(a: &Args) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: "c".into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: a.image.clone(),
            ..Default::default()
        }),
        command: vec!["sleep".into(), "3600".into()],
        log_path: "c.log".into(),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Milliseconds since `t`.
fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

async fn run_pod(c: &mut Client, config: &cri::PodSandboxConfig) -> Res<String> {
    Ok(c.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    })
    .await?
    .into_inner()
    .pod_sandbox_id)
}

async fn remove_pod(c: &mut Client, id: &str) -> Res<()> {
    c.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await?;
    c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: id.into(),
    })
    .await?;
    Ok(())
}

/// Creates and starts a container in `pod`; returns its id and the ms of each call.
async fn start_container(
    c: &mut Client,
    a: &Args,
    pod: &str,
    config: &cri::PodSandboxConfig,
) -> Res<(String, f64, f64)> {
    let t = Instant::now();
    let id = c
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(container_config(a)),
            sandbox_config: Some(config.clone()),
        })
        .await?
        .into_inner()
        .container_id;
    let created = ms(t);
    let t = Instant::now();
    c.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await?;
    Ok((id, created, ms(t)))
}

/// Stops (SIGKILL) and removes a container; returns the ms of each call.
async fn remove_container(c: &mut Client, id: &str) -> Res<(f64, f64)> {
    let t = Instant::now();
    c.stop_container(cri::StopContainerRequest {
        container_id: id.into(),
        timeout: 0,
    })
    .await?;
    let stopped = ms(t);
    let t = Instant::now();
    c.remove_container(cri::RemoveContainerRequest {
        container_id: id.into(),
    })
    .await?;
    Ok((stopped, ms(t)))
}

/// One timed run; returns its stages in ms.
async fn one(c: &mut Client, a: &Args, n: usize) -> Res<serde_json::Value> {
    let config = pod_config(a, &format!("bench-{}-{n}", a.tag));
    let t = Instant::now();
    let pod = run_pod(c, &config).await?;
    let run = ms(t);
    let mut out = serde_json::json!({ "run_pod": run });
    if a.scenario == "pod_container" {
        let t1 = Instant::now();
        let (id, create, start) = start_container(c, a, &pod, &config).await?;
        let started = ms(t1);
        let t2 = Instant::now();
        let (stop, remove) = remove_container(c, &id).await?;
        for (k, v) in [
            ("create", create),
            ("start", start),
            ("stop", stop),
            ("remove", remove),
        ] {
            out[k] = v.into();
        }
        out["container_create_start"] = started.into();
        out["container_stop_remove"] = ms(t2).into();
        out["container"] = (started + ms(t2)).into();
    }
    let t3 = Instant::now();
    c.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await?;
    out["stop_pod"] = ms(t3).into();
    let t4 = Instant::now();
    c.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await?;
    out["remove_pod"] = ms(t4).into();
    out["stop_remove_pod"] = ms(t3).into();
    out["total"] = ms(t).into();
    Ok(out)
}

async fn hold(c: &mut Client, a: &Args) -> Res<()> {
    let mut pods = Vec::new();
    let mut result = Ok(());
    for n in 0..a.runs {
        let config = pod_config(a, &format!("hold-{}-{n}", a.tag));
        match run_pod(c, &config).await {
            Ok(pod) => {
                pods.push(pod.clone());
                if let Err(e) = start_container(c, a, &pod, &config).await {
                    result = Err(e);
                    break;
                }
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if result.is_ok() {
        println!("ready {}", pods.len());
        // Until the caller has measured and closes our stdin.
        tokio::task::spawn_blocking(|| std::io::stdin().lock().lines().count()).await?;
    }
    for pod in &pods {
        let containers = c
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    pod_sandbox_id: pod.clone(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .containers;
        for ctr in containers {
            remove_container(c, &ctr.id).await?;
        }
        remove_pod(c, pod).await?;
    }
    result
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Res<()> {
    let a = args()?;
    let mut images = ImageServiceClient::new(berth_core::uds::channel(&a.socket));
    images
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: a.image.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    let mut c = RuntimeServiceClient::new(berth_core::uds::channel(&a.socket));
    match a.scenario.as_str() {
        "pod" | "pod_container" => {
            for n in 0..a.warmup + a.runs {
                let stages = one(&mut c, &a, n).await?;
                if n >= a.warmup {
                    println!("{stages}");
                }
            }
            Ok(())
        }
        "hold" => hold(&mut c, &a).await,
        other => Err(format!("unknown scenario {other}").into()),
    }
}
