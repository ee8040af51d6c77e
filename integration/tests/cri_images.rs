//! The Kubernetes CRI on `<state>/cri.sock`, driven by a tonic client from berth-proto: the
//! runtime's identity and readiness, and the image service end to end against a loopback
//! registry that a containerd-style hosts.toml mirror stands in for `registry.k8s.io`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context as _, Result, ensure};
use berth_integration::gateway_kit::{self, DockerStack};
use berth_integration::images_kit::{Registry, RegistryOptions, oci_dir};
use berth_integration::stack::Stack;
use berth_proto::cri::runtime::v1 as cri;
use berth_proto::cri::runtime::v1::image_service_client::ImageServiceClient;
use berth_proto::cri::runtime::v1::runtime_service_client::RuntimeServiceClient;
use tonic::Code;

type Channel = berth_core::uds::Channel;

fn clients(d: &DockerStack) -> (RuntimeServiceClient<Channel>, ImageServiceClient<Channel>) {
    let ch = berth_core::uds::channel(d.cri_socket());
    (
        RuntimeServiceClient::new(ch.clone()),
        ImageServiceClient::new(ch),
    )
}

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    })
}

fn condition<'a>(status: &'a cri::StatusResponse, kind: &str) -> &'a cri::RuntimeCondition {
    status
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.r#type == kind))
        .unwrap_or_else(|| panic!("no {kind} condition in {status:?}"))
}

async fn status(rt: &mut RuntimeServiceClient<Channel>) -> Result<cri::StatusResponse> {
    Ok(rt
        .status(cri::StatusRequest { verbose: true })
        .await?
        .into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_identity_readiness_and_config() -> Result<()> {
    if !gateway_kit::ready() {
        return Ok(());
    }
    let cni = tempfile::tempdir()?;
    let d = DockerStack::start_from(
        Stack::builder().env("BERTH_NETWORK__CNI_CONF_DIR", cni.path().to_str().unwrap()),
    )?;
    let sock = d.cri_socket();
    let mode = std::fs::metadata(&sock)
        .context("the CRI socket is up when the stack is")?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "CRI socket mode");
    let (mut rt, _) = clients(&d);

    let v = rt
        .version(cri::VersionRequest {
            version: "0.1.0".into(),
        })
        .await?
        .into_inner();
    assert_eq!(v.runtime_name, "berth");
    assert_eq!(v.runtime_api_version, "v1");
    assert!(!v.runtime_version.is_empty());

    // No CNI config: the runtime is ready, the network is not, with the reason kubelet expects.
    let s = status(&mut rt).await?;
    assert!(condition(&s, "RuntimeReady").status, "{s:?}");
    let net = condition(&s, "NetworkReady");
    assert!(!net.status);
    assert_eq!(net.reason, "NetworkPluginNotReady");
    assert!(
        net.message.contains(&cni.path().display().to_string()),
        "{}",
        net.message
    );
    // A config appears: the network becomes ready without a restart.
    std::fs::write(
        cni.path().join("10-pods.conflist"),
        r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge","bridge":"cni-test0","ipam":{"type":"host-local","subnet":"10.250.0.0/24"}}]}"#,
    )?;
    let s = status(&mut rt).await?;
    let net = condition(&s, "NetworkReady");
    assert!(net.status, "{net:?}");

    let c = rt
        .runtime_config(cri::RuntimeConfigRequest {})
        .await?
        .into_inner();
    assert_eq!(
        c.linux.context("linux config")?.cgroup_driver(),
        cri::CgroupDriver::Cgroupfs
    );

    // The pod CIDR is kept across a kill -9 of the gateway (it lives in the state dir).
    let update = |cidr: &str| cri::UpdateRuntimeConfigRequest {
        runtime_config: Some(cri::RuntimeConfig {
            network_config: Some(cri::NetworkConfig {
                pod_cidr: cidr.into(),
            }),
        }),
    };
    let err = rt
        .update_runtime_config(update("10.88.0.0/33"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    rt.update_runtime_config(update("10.88.0.0/16")).await?;
    d.kill9_gateway()?;
    let s = status(&mut rt).await?;
    let config: serde_json::Value = serde_json::from_str(&s.info["config"])?;
    assert_eq!(config["podCIDRs"], serde_json::json!(["10.88.0.0/16"]));

    // Stats need a container id; checkpoints are never served, and say so.
    let err = rt
        .container_stats(cri::ContainerStatsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = rt
        .checkpoint_container(cri::CheckpointContainerRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(err.message().contains("not supported"), "{err:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_cri_serves_no_socket() -> Result<()> {
    if !gateway_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start_with("[cri]\nenabled = false\n")?;
    d.ok(&["version"])?;
    assert!(
        !d.cri_socket().exists(),
        "cri.sock exists though [cri] enabled = false"
    );
    Ok(())
}

/// A hosts.toml that sends `registry.k8s.io` to the loopback registry, first as a mirror
/// host, then as the server (so nothing ever leaves the machine).
fn hosts_toml(dir: &Path, namespace: &str, registry: &str) -> Result<()> {
    let ns = dir.join(namespace);
    std::fs::create_dir_all(&ns)?;
    std::fs::write(
        ns.join("hosts.toml"),
        format!(
            "server = \"http://{registry}\"\n\n[host.\"http://{registry}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )?;
    Ok(())
}

async fn image_count(img: &mut ImageServiceClient<Channel>) -> Result<usize> {
    Ok(img
        .list_images(cri::ListImagesRequest::default())
        .await?
        .into_inner()
        .images
        .len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_through_a_hosts_toml_mirror_in_one_store_with_docker() -> Result<()> {
    if !gateway_kit::ready() {
        return Ok(());
    }
    let registry = Registry::start(RegistryOptions {
        basic_auth: Some(("kube".into(), "s3cret".into())),
        ..Default::default()
    })?;
    registry.push_oci(&oci_dir("busybox"), "pause:3.10")?;
    // Every other namespace falls back to `_default`: an open registry.
    let open = Registry::start(RegistryOptions::default())?;
    open.push_oci(&oci_dir("busybox"), "google-samples/busybox:1.0")?;
    let certs = tempfile::tempdir()?;
    hosts_toml(certs.path(), "registry.k8s.io", &registry.host)?;
    hosts_toml(certs.path(), "_default", &open.host)?;
    let d = DockerStack::start_with(&format!(
        "[images]\nregistry_config_path = \"{}\"\n",
        certs.path().display()
    ))?;
    let (_, mut img) = clients(&d);
    let name = "registry.k8s.io/pause:3.10";
    let before = image_count(&mut img).await?;

    // Without credentials the registry refuses, and nothing is left.
    let err = img
        .pull_image(cri::PullImageRequest {
            image: spec(name),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(image_count(&mut img).await?, before);

    // With them (as `auth`, base64 of user:password, as kubelet passes a pull secret).
    let auth = Some(cri::AuthConfig {
        auth: "a3ViZTpzM2NyZXQ=".into(), // kube:s3cret
        server_address: "registry.k8s.io".into(),
        ..Default::default()
    });
    let pulled = img
        .pull_image(cri::PullImageRequest {
            image: spec(name),
            auth: auth.clone(),
            sandbox_config: None,
        })
        .await?
        .into_inner();
    assert!(pulled.image_ref.starts_with("sha256:"), "{pulled:?}");
    // The mirror was told which namespace it stands in for, as containerd tells it.
    let log = registry.log_text();
    assert!(
        log.contains("/v2/pause/manifests/3.10?ns=registry.k8s.io"),
        "registry log: {log}"
    );

    let st = img
        .image_status(cri::ImageStatusRequest {
            image: spec(name),
            verbose: true,
        })
        .await?
        .into_inner();
    let image = st.image.context("pulled image has a status")?;
    assert_eq!(image.id, pulled.image_ref);
    assert_eq!(image.repo_tags, [name]);
    let digest = registry.manifest_digest("pause:3.10")?;
    assert_eq!(
        image.repo_digests,
        [format!("registry.k8s.io/pause@{digest}")]
    );
    assert!(image.size > 0);
    let info: serde_json::Value = serde_json::from_str(&st.info["info"])?;
    assert_eq!(info["imageSpec"]["os"], "linux", "{info}");

    // The gateway holds nothing: after a kill -9 the same image is there.
    d.kill9_gateway()?;
    let after = img
        .list_images(cri::ListImagesRequest {
            filter: Some(cri::ImageFilter { image: spec(name) }),
        })
        .await?
        .into_inner()
        .images;
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].id, pulled.image_ref);

    // By digest too, through the same mirror.
    let by_digest = format!("registry.k8s.io/pause@{digest}");
    let again = img
        .pull_image(cri::PullImageRequest {
            image: spec(&by_digest),
            auth: auth.clone(),
            sandbox_config: None,
        })
        .await?
        .into_inner();
    assert_eq!(again.image_ref, pulled.image_ref);

    // One store: docker sees the CRI's image, the CRI sees docker's tag.
    let listed = d.ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"])?;
    assert!(listed.lines().any(|l| l == name), "docker images: {listed}");
    d.ok(&["tag", name, "dockerside:1"])?;
    let filtered = img
        .list_images(cri::ListImagesRequest {
            filter: Some(cri::ImageFilter {
                image: spec("dockerside:1"),
            }),
        })
        .await?
        .into_inner()
        .images;
    assert_eq!(filtered.len(), 1);
    assert_eq!(filtered[0].id, pulled.image_ref);
    assert!(
        filtered[0]
            .repo_tags
            .contains(&"docker.io/library/dockerside:1".to_string()),
        "{filtered:?}"
    );

    // The image filesystem holds the layers.
    let fs = img
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await?
        .into_inner();
    let usage = fs.image_filesystems.first().context("image fs")?;
    assert!(usage.used_bytes.as_ref().context("used bytes")?.value > 0);
    assert!(usage.inodes_used.as_ref().context("inodes")?.value > 0);
    assert_eq!(
        usage.fs_id.as_ref().context("fs id")?.mountpoint,
        d.stack.root().join("snapshotter").display().to_string()
    );

    // An image a Docker container uses cannot go.
    let cid = d.ok(&["create", name, "true"])?;
    let err = img
        .remove_image(cri::RemoveImageRequest { image: spec(name) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    d.ok(&["rm", &cid])?;

    // Now it goes, by tag, with every name it had; a second removal is still success.
    img.remove_image(cri::RemoveImageRequest { image: spec(name) })
        .await?;
    let st = img
        .image_status(cri::ImageStatusRequest {
            image: spec(name),
            verbose: false,
        })
        .await?
        .into_inner();
    assert!(
        st.image.is_none(),
        "a missing image is an empty status: {st:?}"
    );
    let listed = d.ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"])?;
    ensure!(
        !listed.contains("pause") && !listed.contains("dockerside"),
        "docker images after the CRI removal: {listed}"
    );
    img.remove_image(cri::RemoveImageRequest {
        image: spec(&pulled.image_ref),
    })
    .await?;
    // And by id.
    let again = img
        .pull_image(cri::PullImageRequest {
            image: spec(name),
            auth: auth.clone(),
            sandbox_config: None,
        })
        .await?
        .into_inner();
    img.remove_image(cri::RemoveImageRequest {
        image: spec(&again.image_ref),
    })
    .await?;
    let st = img
        .image_status(cri::ImageStatusRequest {
            image: spec(&again.image_ref),
            verbose: false,
        })
        .await?
        .into_inner();
    assert!(st.image.is_none(), "{st:?}");

    // The Docker side pulls through the hosts.toml too (here `_default`), and the CRI sees it.
    d.ok(&["pull", "-q", "gcr.io/google-samples/busybox:1.0"])?;
    let st = img
        .image_status(cri::ImageStatusRequest {
            image: spec("gcr.io/google-samples/busybox:1.0"),
            verbose: false,
        })
        .await?
        .into_inner();
    let docker_pulled = st.image.context("docker's pull is in the CRI's store")?;
    assert_eq!(
        docker_pulled.repo_tags,
        ["gcr.io/google-samples/busybox:1.0"]
    );
    // Pushes follow the hosts.toml as well: `_default`'s server takes them.
    d.ok(&[
        "tag",
        "gcr.io/google-samples/busybox:1.0",
        "gcr.io/pushed/busybox:2",
    ])?;
    d.ok(&["push", "gcr.io/pushed/busybox:2"])?;
    open.manifest_digest("pushed/busybox:2")
        .context("the push reached the _default server")?;
    // Removal by digest.
    let open_digest = open.manifest_digest("google-samples/busybox:1.0")?;
    img.remove_image(cri::RemoveImageRequest {
        image: spec(&format!("gcr.io/google-samples/busybox@{open_digest}")),
    })
    .await?;
    let gone = d.fails(&["image", "inspect", "gcr.io/google-samples/busybox:1.0"])?;
    assert!(gone.1.contains("No such image"), "{gone:?}");

    // A pull of something that does not exist is NotFound and leaves nothing.
    let count = image_count(&mut img).await?;
    let err = img
        .pull_image(cri::PullImageRequest {
            image: spec("registry.k8s.io/nosuch:1"),
            auth,
            sandbox_config: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(image_count(&mut img).await?, count);

    // Bad input.
    let err = img
        .pull_image(cri::PullImageRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    Ok(())
}

/// A registry host that accepts one connection and never answers; the thread reports whether
/// berth closed the connection (true) or 30 s passed first (false).
fn stalled_registry() -> Result<(String, std::thread::JoinHandle<std::io::Result<bool>>)> {
    let stall = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = stall.local_addr()?.to_string();
    let watcher = std::thread::spawn(move || -> std::io::Result<bool> {
        use std::io::Read;
        let (mut conn, _) = stall.accept()?;
        conn.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return Ok(true),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(true),
                Err(_) => return Ok(false),
            }
        }
    });
    Ok((addr, watcher))
}

async fn closed_by_berth(watcher: std::thread::JoinHandle<std::io::Result<bool>>) -> Result<bool> {
    Ok(tokio::task::spawn_blocking(move || watcher.join())
        .await?
        .map_err(|_| anyhow::anyhow!("watcher panicked"))??)
}

/// A pull whose caller goes away is cancelled in berth-images: the connection to a registry
/// that never answers is closed by berth at once, not when its read timeout (60 s) ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_pull_is_cancelled() -> Result<()> {
    if !gateway_kit::ready() {
        return Ok(());
    }
    let (addr, watcher) = stalled_registry()?;
    let certs = tempfile::tempdir()?;
    hosts_toml(certs.path(), "stalled.example", &addr)?;
    let d = DockerStack::start_with(&format!(
        "[images]\nregistry_config_path = \"{}\"\n",
        certs.path().display()
    ))?;
    let (_, mut img) = clients(&d);
    let pull = img.pull_image(cri::PullImageRequest {
        image: spec("stalled.example/never:1"),
        ..Default::default()
    });
    // kubelet gives up (its deadline, or a cancelled pod): the call is dropped.
    let gave_up = tokio::time::timeout(std::time::Duration::from_secs(2), pull).await;
    assert!(gave_up.is_err(), "the stalled pull answered: {gave_up:?}");
    assert!(
        closed_by_berth(watcher).await?,
        "berth kept reading from the registry after the caller went away"
    );
    assert_eq!(image_count(&mut img).await?, 0);
    Ok(())
}

/// A pull that makes no progress for `[cri] image_pull_progress_timeout` fails with
/// DEADLINE_EXCEEDED and is cancelled in berth-images.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_without_progress_times_out() -> Result<()> {
    if !gateway_kit::ready() {
        return Ok(());
    }
    let (addr, watcher) = stalled_registry()?;
    let certs = tempfile::tempdir()?;
    hosts_toml(certs.path(), "stalled.example", &addr)?;
    let d = DockerStack::start_with(&format!(
        "[images]\nregistry_config_path = \"{}\"\n[cri]\nimage_pull_progress_timeout = 1\n",
        certs.path().display()
    ))?;
    let (_, mut img) = clients(&d);
    let err = img
        .pull_image(cri::PullImageRequest {
            image: spec("stalled.example/never:1"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("no progress"), "{err:?}");
    assert!(
        closed_by_berth(watcher).await?,
        "berth kept reading from the registry after the pull timed out"
    );
    Ok(())
}
