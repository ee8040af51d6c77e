//! Mount propagation of CRI containers (critest's "Container Mount Propagation" specs, with
//! real runc): a host directory made an rshared mount is bound into a privileged container of a
//! pod; with `PROPAGATION_BIDIRECTIONAL` a mount the host makes under it after the container
//! started appears inside, and a mount the container makes under it appears on the host; with
//! `PROPAGATION_HOST_TO_CONTAINER` only the first; with `PROPAGATION_PRIVATE` neither. Root only;
//! needs /usr/lib/cni.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, ensure};
use berth_integration::cri_kit::{
    CriStack, plugins_ready, pod_config, run_pod, sh_container, start_container,
};
use berth_proto::cri::runtime::v1 as cri;
use berth_proto::cri::runtime::v1::runtime_service_client::RuntimeServiceClient;

type Client = RuntimeServiceClient<berth_core::uds::Channel>;

fn mount(args: &[&str]) -> Result<()> {
    let out = Command::new("mount").args(args).output()?;
    ensure!(
        out.status.success(),
        "mount {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Unmounts everything under (and at) a directory when dropped, lazily.
struct Unmount(Vec<PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-R").arg("-l").arg(p).output();
        }
    }
}

fn is_mountpoint(path: &Path) -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = path.to_string_lossy();
    mountinfo
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_ref()))
}

async fn exec(rt: &mut Client, id: &str, script: &str) -> Result<String> {
    let r = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: vec!["sh".into(), "-c".into(), script.into()],
            timeout: 0,
        })
        .await?
        .into_inner();
    ensure!(
        r.exit_code == 0,
        "{script}: {} {}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    Ok(String::from_utf8_lossy(&r.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binds_propagate_as_asked() -> Result<()> {
    if !plugins_ready() {
        return Ok(());
    }
    let s = CriStack::start("crm", 10)?;
    let (d, logs) = (&s.d, &s.logs);
    let mut rt = s.runtime();
    let config = cri::PodSandboxConfig {
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                privileged: true,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..pod_config("berth-cri-mounts", "mounts", Some(logs.path()))
    };
    let guard = run_pod(&mut rt, d, &config).await?;
    let pod = guard.id.clone();

    use cri::MountPropagation as P;
    let host = tempfile::tempdir()?;
    let mut unmount = Unmount(Vec::new());
    let flag_src = host.path().join("flag-src");
    std::fs::create_dir_all(&flag_src)?;
    std::fs::write(flag_src.join("flagFile"), "")?;
    for (name, propagation, host_to_container, container_to_host) in [
        ("bidirectional", P::PropagationBidirectional, true, true),
        (
            "host-to-container",
            P::PropagationHostToContainer,
            true,
            false,
        ),
        ("private", P::PropagationPrivate, false, false),
    ] {
        // critest's set-up: the source bound onto itself, rshared (rprivate for private).
        let src = host.path().join(name);
        let from_host = src.join("from-host");
        let from_container = src.join("from-container");
        std::fs::create_dir_all(&from_host)?;
        std::fs::create_dir_all(&from_container)?;
        let src_text = src.to_string_lossy().into_owned();
        mount(&["--bind", &src_text, &src_text])?;
        unmount.0.push(src.clone());
        let make = if propagation == P::PropagationPrivate {
            "--make-rprivate"
        } else {
            "--make-rshared"
        };
        mount(&[make, &src_text])?;

        let container = cri::ContainerConfig {
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    privileged: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            mounts: vec![cri::Mount {
                container_path: src_text.clone(),
                host_path: src_text.clone(),
                propagation: propagation.into(),
                ..Default::default()
            }],
            ..sh_container(name, "exec sleep 300")
        };
        let id = start_container(&mut rt, &pod, &config, container).await?;

        // The host mounts after the container started.
        mount(&[
            "--bind",
            &flag_src.to_string_lossy(),
            &from_host.to_string_lossy(),
        ])?;
        let inside = exec(&mut rt, &id, &format!("ls -A {}", from_host.display())).await?;
        ensure!(
            inside.contains("flagFile") == host_to_container,
            "{name}: the host's mount inside the container: {inside:?}"
        );
        // The container mounts.
        exec(
            &mut rt,
            &id,
            &format!("mount --bind /etc {}", from_container.display()),
        )
        .await?;
        let on_host =
            is_mountpoint(&from_container) && std::fs::read_dir(&from_container)?.next().is_some();
        ensure!(
            on_host == container_to_host,
            "{name}: the container's mount on the host: {on_host}"
        );
        rt.stop_container(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 0,
        })
        .await?;
        rt.remove_container(cri::RemoveContainerRequest { container_id: id })
            .await?;
    }
    Ok(())
}
