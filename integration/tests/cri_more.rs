//! More of the CRI end to end (`<state>/cri.sock`, real binaries, real runc, the reference CNI
//! plugins):
//! - a pod's hostname, DNS config and sysctls, and a container's security context (run as
//!   user/group with supplemental groups, capabilities `drop ALL` + one added, a read-only
//!   rootfs), as the container's own process sees them; a line longer than 16 KiB logged as `P`
//!   then `F` entries; UpdateContainerResources reaching the container's memory cgroup; a
//!   container over its memory limit reported `OOMKilled` with exit code 137;
//! - run as username, no_new_privs, seccomp RuntimeDefault, the default masked and read-only
//!   paths, a device, the NODE user namespace, cpu shares/quota/period and cpuset in the host's
//!   cgroup files, a negative oom_score_adj clamped, ReopenContainerLog after a rename, and
//!   StopContainer's SIGKILL after the timeout;
//! - Docker and the CRI seeing each other: `docker ps -a` lists a pod's container under its
//!   dockershim name with the `io.kubernetes.*` labels, `docker stop` / `start` / `rm -f` of it
//!   are what ContainerStatus then reports, RemoveImage is refused while a running CRI container
//!   uses the image, and ImageStatus answers the uid / username of an image's `USER`;
//! - a pod sharing its PID namespace under a cgroup parent of its own, a symlinked host path
//!   bound read-only; a pod in the host's network, PID and IPC namespaces;
//! - a host port of a pod (CNI bridge + portmap conflist, the CRI's port mappings) answered from
//!   the host; the bandwidth annotations shaping the pod (bandwidth plugin); both gone after
//!   StopPodSandbox.
//!
//! Root only; needs /usr/lib/cni.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use berth_integration::cri_kit::{
    self, CriStack, PATIENCE, conflist, container_status, exited, plugins_ready, pod_namespaces,
    run_pod, sh_container, start_container,
};
use berth_integration::gateway_kit::DockerStack;
use berth_integration::network_kit::{NetSlot, PortmapChains};
use berth_integration::py_kit::with_busybox;
use berth_integration::stack::{Stack, wait_for};
use berth_proto::cri::runtime::v1 as cri;
use berth_proto::cri::runtime::v1::image_service_client::ImageServiceClient;
use berth_proto::cri::runtime::v1::runtime_service_client::RuntimeServiceClient;
use tonic::Code;

fn pod_config(name: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        hostname: format!("{name}-host"),
        linux: Some(pod_namespaces()),
        ..cri_kit::pod_config("berth-cri-more", name, Some(log_dir))
    }
}

/// The log's entries once one of them reads `last`: (stream, tag, content).
fn log_entries(path: &Path, last: &str) -> Result<Vec<(String, String, String)>> {
    let parse = |text: &str| -> Vec<(String, String, String)> {
        text.lines()
            .filter_map(|l| {
                let mut f = l.splitn(4, ' ');
                let (_time, stream, tag) = (f.next()?, f.next()?, f.next()?);
                Some((stream.into(), tag.into(), f.next().unwrap_or("").into()))
            })
            .collect()
    };
    wait_for(PATIENCE, || {
        let entries = parse(&std::fs::read_to_string(path).ok()?);
        entries.iter().any(|e| e.2 == last).then_some(entries)
    })
    .with_context(|| {
        format!(
            "no {last:?} in {}: {:?}",
            path.display(),
            std::fs::read_to_string(path)
        )
    })
}

/// The value of `key=` among the container's `key=value` output lines.
fn value<'a>(entries: &'a [(String, String, String)], key: &str) -> Option<&'a str> {
    entries
        .iter()
        .find_map(|e| e.2.strip_prefix(key)?.strip_prefix('='))
}

/// A cgroup v1 file of a container's init process (`controller`, `file`), read on the host.
fn cgroup_value(d: &DockerStack, id: &str, controller: &str, file: &str) -> Result<String> {
    let pid = d.ok(&["inspect", "-f", "{{.State.Pid}}", id])?;
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let path = cgroups
        .lines()
        .find_map(|line| {
            let mut f = line.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            controllers
                .split(',')
                .any(|c| c == controller)
                .then(|| path.trim_start_matches('/').to_string())
        })
        .with_context(|| format!("no {controller} cgroup for {pid}: {cgroups}"))?;
    let file = Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(path)
        .join(file);
    Ok(std::fs::read_to_string(&file)
        .with_context(|| file.display().to_string())?
        .trim()
        .to_string())
}

/// Whether this host's cgroups are v1 with the controllers the tests read (cgroup v2 only
/// hosts skip those checks, saying so).
fn cgroup_v1() -> bool {
    let v1 = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
        && Path::new("/sys/fs/cgroup/cpu/cpu.shares").exists();
    if !v1 {
        eprintln!("note: no cgroup v1 memory/cpu hierarchy: cgroup files not checked");
    }
    v1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_and_container_config_resources_and_oom_kill() -> Result<()> {
    if !plugins_ready() {
        return Ok(());
    }
    let s = CriStack::start("crm", 3)?;
    let (d, logs) = (&s.d, &s.logs);
    let mut rt = s.runtime();

    let mut config = pod_config("conf", logs.path());
    config.dns_config = Some(cri::DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["berth-cri-more.svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    if let Some(linux) = config.linux.as_mut() {
        linux.sysctls = [(
            "net.ipv4.ip_unprivileged_port_start".to_string(),
            "1000".to_string(),
        )]
        .into();
    }
    let pod = run_pod(&mut rt, d, &config).await?;

    // --- What the container's own process sees.
    let mut c = sh_container(
        "look",
        "echo uid=$(id -u); echo gid=$(id -g); echo groups=$(id -G); echo host=$(hostname); \
         echo capbnd=$(grep CapBnd /proc/self/status | cut -f2); \
         echo port=$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start); \
         if touch /probe 2>/dev/null; then echo rootfs=rw; else echo rootfs=ro; fi; \
         sed 's/^/resolv: /' /etc/resolv.conf; \
         head -c 20000 /dev/zero | tr '\\0' a; echo; echo done=1; exec sleep 3600",
    );
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                add_capabilities: vec!["NET_RAW".into()],
                drop_capabilities: vec!["ALL".into()],
                add_ambient_capabilities: vec![],
            }),
            run_as_user: Some(cri::Int64Value { value: 1000 }),
            run_as_group: Some(cri::Int64Value { value: 2000 }),
            supplemental_groups: vec![3000],
            readonly_rootfs: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    let look = start_container(&mut rt, &pod.id, &config, c).await?;
    let entries = log_entries(&logs.path().join("look/0.log"), "done=1")?;
    let seen = |k: &str| value(&entries, k).unwrap_or("<missing>").to_string();
    // For messages: the entries without the long line's content.
    let shown: Vec<(&str, &str)> = entries
        .iter()
        .filter(|e| !e.2.starts_with("aaa"))
        .map(|e| (e.1.as_str(), e.2.as_str()))
        .collect();
    ensure!(seen("uid") == "1000" && seen("gid") == "2000", "{shown:?}");
    let groups: Vec<String> = seen("groups").split(' ').map(str::to_string).collect();
    ensure!(groups.contains(&"3000".to_string()), "{groups:?}");
    ensure!(seen("host") == "conf-host", "{shown:?}");
    // Bounding set: NET_RAW (bit 13) only.
    ensure!(seen("capbnd") == "0000000000002000", "{shown:?}");
    ensure!(seen("port") == "1000", "{shown:?}");
    ensure!(seen("rootfs") == "ro", "{shown:?}");
    let resolv: Vec<&str> = entries
        .iter()
        .filter_map(|e| e.2.strip_prefix("resolv: "))
        .collect();
    ensure!(
        resolv.contains(&"nameserver 10.96.0.10")
            && resolv.contains(&"search berth-cri-more.svc.cluster.local")
            && resolv.contains(&"options ndots:5"),
        "resolv.conf: {resolv:?}"
    );
    // The 20000-byte line: a 16 KiB partial entry, then the rest as the full one.
    let long: Vec<(&str, usize)> = entries
        .iter()
        .filter(|e| e.2.starts_with("aaa"))
        .map(|e| (e.1.as_str(), e.2.len()))
        .collect();
    ensure!(long == [("P", 16384), ("F", 20000 - 16384)], "{long:?}");
    ensure!(entries.iter().all(|e| e.0 == "stdout"), "{shown:?}");

    // --- UpdateContainerResources reaches the cgroup, and the status says so.
    let limit = 96 << 20;
    rt.update_container_resources(cri::UpdateContainerResourcesRequest {
        container_id: look.clone(),
        linux: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: limit,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await?;
    if cgroup_v1() {
        let seen = cgroup_value(d, &look, "memory", "memory.limit_in_bytes")?;
        ensure!(seen == limit.to_string(), "memory.limit_in_bytes {seen}");
    }
    let st = container_status(&mut rt, &look).await?;
    let linux = st.resources.and_then(|r| r.linux).context("resources")?;
    ensure!(linux.memory_limit_in_bytes == limit, "{linux:?}");
    let err = rt
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: "0".repeat(64),
            linux: Some(cri::LinuxContainerResources::default()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::NotFound, "{err:?}");

    // --- Over its memory limit (set as kubelet sets it, swap = memory): OOMKilled, 137.
    let mut c = sh_container(
        "hog",
        "x=$(head -c 200000000 /dev/zero | tr '\\0' x); echo survived",
    );
    c.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 16 << 20,
            memory_swap_limit_in_bytes: 16 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let hog = start_container(&mut rt, &pod.id, &config, c).await?;
    let st = exited(&mut rt, &hog).await?;
    ensure!(
        st.reason == "OOMKilled" && st.exit_code == 137,
        "hog: {st:?}"
    );
    ensure!(
        st.finished_at >= st.started_at && st.started_at > 0,
        "{st:?}"
    );
    let log = std::fs::read_to_string(logs.path().join("hog/0.log"))?;
    ensure!(!log.contains("survived"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_and_the_cri_see_each_others_changes() -> Result<()> {
    if !plugins_ready() {
        return Ok(());
    }
    let s = CriStack::start("crd", 4)?;
    let (d, logs) = (&s.d, &s.logs);
    let mut rt = s.runtime();
    let mut img = ImageServiceClient::new(berth_core::uds::channel(d.cri_socket()));
    let spec = |image: &str| {
        Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        })
    };

    let config = pod_config("mixed", logs.path());
    let pod = run_pod(&mut rt, d, &config).await?;
    let app = start_container(
        &mut rt,
        &pod.id,
        &config,
        sh_container("app", "exec sleep 3600"),
    )
    .await?;
    let uid = config.metadata.clone().unwrap_or_default().uid;

    // `docker ps -a` shows it by its pod, with the io.kubernetes.* labels.
    let seen = d.ok(&[
        "ps",
        "-a",
        "--no-trunc",
        "--filter",
        &format!("label=io.kubernetes.pod.uid={uid}"),
        "--format",
        "{{.ID}} {{.Names}} {{.Label \"io.kubernetes.container.name\"}} \
         {{.Label \"io.kubernetes.pod.name\"}} {{.Label \"io.kubernetes.pod.namespace\"}} \
         {{.Label \"io.kubernetes.sandbox.id\"}}",
    ])?;
    let want = format!(
        "{app} k8s_app_mixed_berth-cri-more_{uid}_0 app mixed berth-cri-more {}",
        pod.id
    );
    ensure!(seen.trim() == want, "docker ps: {seen:?}, want {want:?}");

    // A running CRI container keeps its image.
    let err = img
        .remove_image(cri::RemoveImageRequest {
            image: spec("busybox"),
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::FailedPrecondition, "{err:?}");

    // `docker stop` (sleep as PID 1 ignores SIGTERM: killed after the timeout) is what the CRI
    // then reports.
    let name = format!("k8s_app_mixed_berth-cri-more_{uid}_0");
    d.ok(&["stop", "-t", "1", &name])?;
    let st = container_status(&mut rt, &app).await?;
    ensure!(
        st.state == cri::ContainerState::ContainerExited as i32
            && st.exit_code == 137
            && st.reason == "Error"
            && st.finished_at >= st.started_at,
        "after docker stop: {st:?}"
    );
    let exited_ids: Vec<String> = rt
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerExited.into(),
                }),
                pod_sandbox_id: pod.id.clone(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .containers
        .into_iter()
        .map(|c| c.id)
        .collect();
    ensure!(exited_ids == [app.clone()], "{exited_ids:?}");
    // `docker start` brings it back, `docker rm -f` removes it: the CRI sees both.
    d.ok(&["start", &name])?;
    let st = container_status(&mut rt, &app).await?;
    ensure!(
        st.state == cri::ContainerState::ContainerRunning as i32,
        "after docker start: {st:?}"
    );
    d.ok(&["rm", "-f", &name])?;
    let err = container_status(&mut rt, &app).await.unwrap_err();
    ensure!(
        err.downcast_ref::<tonic::Status>()
            .is_some_and(|s| s.code() == Code::NotFound),
        "after docker rm: {err:?}"
    );

    // ImageStatus answers the image's USER: a number is the uid, a name the username.
    d.ok(&["create", "--name", "cri-more-src", "busybox", "true"])?;
    d.ok(&[
        "commit",
        "--change",
        "USER 1234:5678",
        "cri-more-src",
        "cri-more/num:1",
    ])?;
    d.ok(&[
        "commit",
        "--change",
        "USER nobody",
        "cri-more-src",
        "cri-more/name:1",
    ])?;
    d.ok(&["rm", "cri-more-src"])?;
    let user = |image: &'static str| {
        let mut img = img.clone();
        async move {
            let st = img
                .image_status(cri::ImageStatusRequest {
                    image: spec(image),
                    verbose: true,
                })
                .await?
                .into_inner();
            let image = st.image.context("image status")?;
            anyhow::Ok((image.uid.map(|u| u.value), image.username))
        }
    };
    let num = user("cri-more/num:1").await?;
    ensure!(num == (Some(1234), String::new()), "{num:?}");
    let name = user("cri-more/name:1").await?;
    ensure!(name == (None, "nobody".to_string()), "{name:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_profiles_devices_cpu_and_log_reopen() -> Result<()> {
    if !plugins_ready() {
        return Ok(());
    }
    let s = CriStack::start("crs", 6)?;
    let (d, logs) = (&s.d, &s.logs);
    let mut rt = s.runtime();
    // User namespace NODE (the host's), as kubelets with user namespace support send it for
    // pods that do not ask for one of their own, on the pod and on its containers.
    let node_userns = cri::UserNamespace {
        mode: cri::NamespaceMode::Node.into(),
        ..Default::default()
    };
    let mut config = pod_config("sec", logs.path());
    if let Some(ns) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
    {
        ns.userns_options = Some(node_userns.clone());
    }
    let pod = run_pod(&mut rt, d, &config).await?;

    let mut c = sh_container(
        "sec",
        "echo uid=$(id -u); echo nnp=$(grep NoNewPrivs /proc/self/status | cut -f2); \
         echo seccomp=$(grep '^Seccomp:' /proc/self/status | cut -f2); \
         echo kcore=$(cat /proc/kcore 2>/dev/null | wc -c); \
         if (echo x > /proc/sys/kernel/domainname) 2>/dev/null; then echo procsys=rw; else echo procsys=ro; fi; \
         if [ -c /dev/cri-null ] && echo hi > /dev/cri-null; then echo dev=ok; else echo dev=missing; fi; \
         echo oom=$(cat /proc/self/oom_score_adj); echo uidmap=$(cat /proc/self/uid_map); \
         echo done=1; \
         while :; do echo tick; sleep 0.2; done",
    );
    c.devices = vec![cri::Device {
        container_path: "/dev/cri-null".into(),
        host_path: "/dev/null".into(),
        permissions: "rwm".into(),
    }];
    c.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            cpu_shares: 512,
            cpu_period: 100_000,
            cpu_quota: 50_000,
            cpuset_cpus: "0".into(),
            oom_score_adj: -998,
            ..Default::default()
        }),
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_username: "nobody".into(),
            no_new_privs: true,
            namespace_options: config
                .linux
                .as_ref()
                .and_then(|l| l.security_context.as_ref())
                .and_then(|s| s.namespace_options.clone()),
            seccomp: Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::RuntimeDefault.into(),
                localhost_ref: String::new(),
            }),
            ..Default::default()
        }),
    });
    let sec = start_container(&mut rt, &pod.id, &config, c).await?;
    let log = logs.path().join("sec/0.log");
    let entries = log_entries(&log, "done=1")?;
    let seen = |k: &str| value(&entries, k).unwrap_or("<missing>").to_string();
    let shown: Vec<&str> = entries.iter().map(|e| e.2.as_str()).collect();
    ensure!(seen("uid") == "65534", "run as username nobody: {shown:?}");
    ensure!(seen("nnp") == "1", "{shown:?}");
    ensure!(
        seen("seccomp") == "2",
        "RuntimeDefault is a filter: {shown:?}"
    );
    ensure!(seen("kcore") == "0", "/proc/kcore masked: {shown:?}");
    ensure!(seen("procsys") == "ro", "/proc/sys read-only: {shown:?}");
    ensure!(seen("dev") == "ok", "{shown:?}");
    let host_map = std::fs::read_to_string("/proc/self/uid_map")?
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    ensure!(
        seen("uidmap").trim() == host_map,
        "the host's user namespace: {shown:?}"
    );
    // A negative oom_score_adj is clamped to what the engine may set, not refused.
    let engine = d
        .stack
        .pid(berth_core::Service::Engine)
        .context("engine pid")?;
    let floor: i32 = std::fs::read_to_string(format!("/proc/{engine}/oom_score_adj"))?
        .trim()
        .parse()?;
    ensure!(
        seen("oom") == (-998).max(floor).to_string(),
        "oom_score_adj (engine's {floor}): {shown:?}"
    );
    if cgroup_v1() {
        for (controller, file, want) in [
            ("cpu", "cpu.shares", "512"),
            ("cpu", "cpu.cfs_period_us", "100000"),
            ("cpu", "cpu.cfs_quota_us", "50000"),
            ("cpuset", "cpuset.cpus", "0"),
        ] {
            let got = cgroup_value(d, &sec, controller, file)?;
            ensure!(got == want, "{file}: {got}, want {want}");
        }
    }
    let st = container_status(&mut rt, &sec).await?;
    let r = st.resources.and_then(|r| r.linux).context("resources")?;
    ensure!(
        (
            r.cpu_shares,
            r.cpu_quota,
            r.cpu_period,
            r.cpuset_cpus.as_str()
        ) == (512, 50_000, 100_000, "0"),
        "{r:?}"
    );

    // ReopenContainerLog after kubelet renamed the file: the output goes on in a new one.
    let rotated = logs.path().join("sec/0.log.20261207-000000");
    std::fs::rename(&log, &rotated)?;
    rt.reopen_container_log(cri::ReopenContainerLogRequest {
        container_id: sec.clone(),
    })
    .await?;
    let fresh = log_entries(&log, "tick")?;
    ensure!(
        fresh.iter().all(|e| e.2 == "tick"),
        "only new output in the reopened log: {:?}",
        fresh.iter().map(|e| &e.2).collect::<Vec<_>>()
    );
    let err = rt
        .reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: "0".repeat(64),
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::NotFound, "{err:?}");

    // StopContainer: SIGTERM, which the shell as PID 1 ignores, then SIGKILL after the timeout.
    rt.stop_container(cri::StopContainerRequest {
        container_id: sec.clone(),
        timeout: 1,
    })
    .await?;
    let st = container_status(&mut rt, &sec).await?;
    ensure!(
        st.state == cri::ContainerState::ContainerExited as i32
            && st.exit_code == 137
            && st.reason == "Error",
        "after StopContainer: {st:?}"
    );
    Ok(())
}

/// Removes a cgroup directory (a pod's `cgroup_parent`) from every v1 hierarchy and the v2 one
/// when dropped: after the stack, whose containers were in it, is gone.
struct CgroupDirs(String);

impl Drop for CgroupDirs {
    fn drop(&mut self) {
        let Ok(roots) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for root in roots.flatten() {
            let dir = root.path().join(&self.0);
            // Children first (the engine removes its containers' own; anything left is empty).
            if let Ok(children) = std::fs::read_dir(&dir) {
                for child in children.flatten() {
                    if child.path().is_dir() {
                        let _ = std::fs::remove_dir(child.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

/// The inode link of one of this process's namespaces, e.g. `net:[4026531840]`.
fn own_namespace(kind: &str) -> Result<String> {
    Ok(std::fs::read_link(format!("/proc/self/ns/{kind}"))?
        .to_string_lossy()
        .into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_and_host_namespaces_mounts_and_cgroup_parent() -> Result<()> {
    if !plugins_ready() {
        return Ok(());
    }
    let slot = NetSlot::claim()?;
    let conf = tempfile::tempdir()?;
    let ipam = tempfile::tempdir()?;
    let logs = tempfile::tempdir()?;
    let data = tempfile::tempdir()?;
    conflist(&slot, "crn", 7, conf.path(), ipam.path())?;
    let parent = format!("berth-cri-more-{}", std::process::id());
    let _cgroups = CgroupDirs(parent.clone());
    let d = DockerStack::start_from(
        Stack::builder().env("BERTH_NETWORK__CNI_CONF_DIR", conf.path().to_str().unwrap()),
    )?;
    let _registry = with_busybox(&d)?;
    let mut rt = RuntimeServiceClient::new(berth_core::uds::channel(d.cri_socket()));

    // --- A pod sharing its PID namespace, under a cgroup parent of its own.
    let mut config = pod_config("share", logs.path());
    let ns = cri::NamespaceOption {
        network: cri::NamespaceMode::Pod.into(),
        pid: cri::NamespaceMode::Pod.into(),
        ipc: cri::NamespaceMode::Pod.into(),
        ..Default::default()
    };
    if let Some(linux) = config.linux.as_mut() {
        linux.cgroup_parent = format!("/{parent}");
        if let Some(sc) = linux.security_context.as_mut() {
            sc.namespace_options = Some(ns.clone());
        }
    }
    let pod = run_pod(&mut rt, &d, &config).await?;
    let with_ns = |mut c: cri::ContainerConfig, ns: &cri::NamespaceOption| {
        c.linux = Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(ns.clone()),
                ..Default::default()
            }),
            ..Default::default()
        });
        c
    };
    let first = start_container(
        &mut rt,
        &pod.id,
        &config,
        with_ns(sh_container("first", "exec sleep 3600"), &ns),
    )
    .await?;
    // A host directory reached through a symlink, bound read-only.
    std::fs::write(data.path().join("file"), "through-the-link\n")?;
    let link = data.path().join("link");
    std::os::unix::fs::symlink(data.path(), &link)?;
    let mut second = with_ns(
        sh_container(
            "second",
            "echo sees-first=$(if pidof sleep >/dev/null; then echo yes; else echo no; fi); \
             echo data=$(cat /data/file); \
             if touch /data/new 2>/dev/null; then echo data-rw=yes; else echo data-rw=no; fi; \
             echo done=1",
        ),
        &ns,
    );
    second.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: link.to_string_lossy().into_owned(),
        readonly: true,
        ..Default::default()
    }];
    let second = start_container(&mut rt, &pod.id, &config, second).await?;
    let entries = log_entries(&logs.path().join("second/0.log"), "done=1")?;
    let shown: Vec<&str> = entries.iter().map(|e| e.2.as_str()).collect();
    ensure!(
        value(&entries, "sees-first") == Some("yes"),
        "PID namespace shared: {shown:?}"
    );
    ensure!(
        value(&entries, "data") == Some("through-the-link"),
        "{shown:?}"
    );
    ensure!(value(&entries, "data-rw") == Some("no"), "{shown:?}");
    ensure!(!data.path().join("new").exists());
    let st = exited(&mut rt, &second).await?;
    let mount = st.mounts.first().context("mounts in the status")?;
    ensure!(
        mount.container_path == "/data" && mount.readonly,
        "{:?}",
        st.mounts
    );
    // The cgroup parent: the container's cgroups are under it.
    let pid = d.ok(&["inspect", "-f", "{{.State.Pid}}", &first])?;
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    ensure!(
        cgroups.lines().all(|l| l.contains(&format!("/{parent}/"))
            || l.ends_with(":/")
            || l.contains("::/")
            || l.contains("name=")),
        "cgroups of the first container: {cgroups}"
    );
    ensure!(
        cgroups.lines().any(|l| l.contains(&format!("/{parent}/"))),
        "{cgroups}"
    );
    drop(pod);

    // --- A pod in the host's network, PID and IPC namespaces.
    let host = cri::NamespaceOption {
        network: cri::NamespaceMode::Node.into(),
        pid: cri::NamespaceMode::Node.into(),
        ipc: cri::NamespaceMode::Node.into(),
        ..Default::default()
    };
    let mut config = pod_config("hostns", logs.path());
    if let Some(sc) = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
    {
        sc.namespace_options = Some(host.clone());
    }
    let pod = run_pod(&mut rt, &d, &config).await?;
    start_container(
        &mut rt,
        &pod.id,
        &config,
        with_ns(
            sh_container(
                "look",
                "for k in net pid ipc; do echo $k=$(readlink /proc/self/ns/$k); done; echo done=1",
            ),
            &host,
        ),
    )
    .await?;
    let entries = log_entries(&logs.path().join("look/0.log"), "done=1")?;
    for kind in ["net", "pid", "ipc"] {
        let want = own_namespace(kind)?;
        ensure!(
            value(&entries, kind) == Some(want.as_str()),
            "{kind}: {:?}, the host's {want}",
            entries.iter().map(|e| &e.2).collect::<Vec<_>>()
        );
    }
    let st = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.id.clone(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("pod status")?;
    let ns = st
        .linux
        .and_then(|l| l.namespaces)
        .and_then(|n| n.options)
        .context("namespace options in the status")?;
    ensure!(
        (ns.network, ns.pid, ns.ipc) == (host.network, host.pid, host.ipc),
        "{ns:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_port_of_a_pod_answers_from_the_host() -> Result<()> {
    if !plugins_ready() || !Path::new("/usr/lib/cni/portmap").is_file() {
        return Ok(());
    }
    let slot = NetSlot::claim()?;
    let conf = tempfile::tempdir()?;
    let ipam = tempfile::tempdir()?;
    let logs = tempfile::tempdir()?;
    let subnet = conflist(&slot, "crp", 5, conf.path(), ipam.path())?;
    // The same bridge conflist, plus portmap.
    let file = conf.path().join("10-pods.conflist");
    let mut list: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file)?)?;
    list["plugins"]
        .as_array_mut()
        .context("plugins")?
        .push(serde_json::json!({
            "type": "portmap",
            "capabilities": { "portMappings": true },
            "snat": true,
        }));
    std::fs::write(&file, list.to_string())?;
    let _chains = PortmapChains;
    let d = DockerStack::start_from(
        Stack::builder().env("BERTH_NETWORK__CNI_CONF_DIR", conf.path().to_str().unwrap()),
    )?;
    let _registry = with_busybox(&d)?;
    let mut rt = RuntimeServiceClient::new(berth_core::uds::channel(d.cri_socket()));

    let host_port = berth_integration::images_kit::free_port();
    let mut config = pod_config("ports", logs.path());
    config.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp.into(),
        container_port: 8080,
        host_port: i32::from(host_port),
        host_ip: String::new(),
    }];
    let pod = run_pod(&mut rt, &d, &config).await?;
    start_container(
        &mut rt,
        &pod.id,
        &config,
        sh_container(
            "web",
            "mkdir -p /www && echo via-cri-host-port > /www/index.html && exec httpd -f -p 8080 -h /www",
        ),
    )
    .await?;

    // The bridge's gateway is a host address: the host port answers there (DNAT by portmap).
    let st = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.id.clone(),
            verbose: false,
        })
        .await?
        .into_inner()
        .status
        .context("pod status")?;
    let ip = st.network.context("network")?.ip;
    // The subnet is a /28 (`a.b.c.d/28`): its first host is the bridge's gateway.
    let base: std::net::Ipv4Addr = subnet.split('/').next().context("subnet")?.parse()?;
    let ip: std::net::Ipv4Addr = ip.parse()?;
    ensure!(u32::from(ip) & !0xf == u32::from(base), "{ip} in {subnet}");
    let gateway = std::net::Ipv4Addr::from(u32::from(base) + 1);
    let addr = format!("{gateway}:{host_port}");
    let body = wait_for(PATIENCE, || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.contains("via-cri-host-port").then_some(text)
    });
    ensure!(body.is_some(), "no answer on {addr}");

    // Stop tears the mapping down (CNI DEL).
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.id.clone(),
    })
    .await?;
    let rules = std::process::Command::new("iptables-save").output()?;
    let left: Vec<String> = String::from_utf8_lossy(&rules.stdout)
        .lines()
        .filter(|l| l.contains(&format!("--dport {host_port}")))
        .map(str::to_string)
        .collect();
    ensure!(left.is_empty(), "rules left after stop: {left:?}");
    Ok(())
}

/// The `tc` qdiscs of the host, one line each.
fn qdiscs(dev: Option<&str>) -> Result<String> {
    let mut cmd = std::process::Command::new("tc");
    cmd.args(["qdisc", "show"]);
    if let Some(dev) = dev {
        cmd.args(["dev", dev]);
    }
    let out = cmd.output()?;
    ensure!(out.status.success(), "tc: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_annotations_shape_the_pod() -> Result<()> {
    if !plugins_ready() || !Path::new("/usr/lib/cni/bandwidth").is_file() {
        return Ok(());
    }
    let slot = NetSlot::claim()?;
    let conf = tempfile::tempdir()?;
    let ipam = tempfile::tempdir()?;
    let logs = tempfile::tempdir()?;
    conflist(&slot, "crb", 8, conf.path(), ipam.path())?;
    let file = conf.path().join("10-pods.conflist");
    let mut list: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file)?)?;
    list["plugins"]
        .as_array_mut()
        .context("plugins")?
        .push(serde_json::json!({
            "type": "bandwidth",
            "capabilities": { "bandwidth": true },
        }));
    std::fs::write(&file, list.to_string())?;
    let d = DockerStack::start_from(
        Stack::builder().env("BERTH_NETWORK__CNI_CONF_DIR", conf.path().to_str().unwrap()),
    )?;
    let mut rt = RuntimeServiceClient::new(berth_core::uds::channel(d.cri_socket()));

    let mut config = pod_config("shaped", logs.path());
    config.annotations = [
        (
            "kubernetes.io/ingress-bandwidth".to_string(),
            "3M".to_string(),
        ),
        (
            "kubernetes.io/egress-bandwidth".to_string(),
            "5M".to_string(),
        ),
    ]
    .into();
    let pod = run_pod(&mut rt, &d, &config).await?;

    // The pod's host-side veth is the one port of this test's bridge; the plugin shapes what
    // reaches the pod there (ingress), and what leaves it on an ifb device it mirrors to.
    let bridge = slot.name("crb");
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show", "master", &bridge])
        .output()?;
    let ports = String::from_utf8_lossy(&out.stdout).into_owned();
    let veth = ports
        .lines()
        .find_map(|l| Some(l.split(':').nth(1)?.trim().split('@').next()?.to_string()))
        .with_context(|| format!("no port on {bridge}: {ports}"))?;
    let on_veth = qdiscs(Some(&veth))?;
    ensure!(
        on_veth.contains("tbf") && on_veth.contains("rate 3Mbit"),
        "ingress on {veth}: {on_veth}"
    );
    let all = qdiscs(None)?;
    ensure!(
        all.lines()
            .any(|l| l.contains("tbf") && l.contains("rate 5Mbit")),
        "egress (ifb): {all}"
    );

    // Teardown (CNI DEL) takes the shaping away.
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.id.clone(),
    })
    .await?;
    let all = qdiscs(None)?;
    ensure!(
        !all.lines()
            .any(|l| l.contains("rate 5Mbit") || l.contains("rate 3Mbit")),
        "after stop: {all}"
    );
    Ok(())
}
