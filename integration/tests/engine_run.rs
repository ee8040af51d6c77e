//! berth-engine end to end with the real shim, snapshotter, images and network services: run
//! busybox, exit codes, stdout/stderr, env/workdir/user, cgroup limits, volumes, bind and tmpfs
//! mounts, error statuses.

use std::time::Duration;

use anyhow::{Result, ensure};
use berth_integration::engine_kit::{EngineStack, busybox, read_cgroup, unique};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::types::v1 as types;

fn sh(script: &str) -> pb::ContainerConfig {
    busybox(&["sh", "-c", script])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_exit_codes_streams_env_workdir_and_user() -> Result<()> {
    if !berth_integration::engine_kit::ready() {
        return Ok(());
    }
    let es = EngineStack::start().await?;

    let r = es
        .run(
            &unique("echo"),
            busybox(&["echo", "hello", "world"]),
            Default::default(),
        )
        .await?;
    ensure!(r.exit_code == 0, "{r:?}");
    ensure!(r.stdout == "hello world\n" && r.stderr.is_empty(), "{r:?}");

    let r = es
        .run(
            &unique("codes"),
            sh("echo out; echo err >&2; exit 3"),
            Default::default(),
        )
        .await?;
    ensure!(r.exit_code == 3, "{r:?}");
    ensure!(r.stdout == "out\n" && r.stderr == "err\n", "{r:?}");

    // Env, workdir and user from the image (busybox: root, /, PATH) ...
    let r = es
        .run(
            &unique("img"),
            sh("id -u; id -g; pwd; echo $PATH; echo $HOME; hostname"),
            Default::default(),
        )
        .await?;
    let lines: Vec<&str> = r.stdout.lines().collect();
    ensure!(lines[..3] == ["0", "0", "/"], "{r:?}");
    ensure!(lines[3].contains("/bin"), "{r:?}");
    ensure!(lines[4] == "/root", "{r:?}");
    ensure!(lines[5] == &r.id[..12], "{r:?}");
    // ... and from overrides: a user by name from the image's /etc/passwd, a workdir that does
    // not exist yet (runc creates it), env over the image's.
    let mut cfg = sh("id -u; id -g; id -G; pwd; echo $GREETING; echo $PATH");
    cfg.user = "postgres".into();
    cfg.working_dir = "/var/tmp/work".into();
    cfg.env = vec!["GREETING=hi there".into(), "PATH=/bin".into()];
    let r = es.run(&unique("ovr"), cfg, Default::default()).await?;
    let lines: Vec<&str> = r.stdout.lines().collect();
    ensure!(lines[..2] == ["70", "70"], "{r:?}");
    ensure!(lines[3] == "/var/tmp/work", "{r:?}");
    ensure!(lines[4] == "hi there" && lines[5] == "/bin", "{r:?}");
    let mut cfg = sh("id -u; id -g");
    cfg.user = "1234:5678".into();
    let r = es.run(&unique("num"), cfg, Default::default()).await?;
    ensure!(r.stdout == "1234\n5678\n", "{r:?}");

    // A command that does not exist: Docker's 127.
    let name = unique("nocmd");
    let c = es
        .create(&name, busybox(&["/no/such/binary"]), Default::default())
        .await?;
    let wait = es
        .wait_registered(&c.id, pb::WaitCondition::NextExit)
        .await?;
    let err = es.start_task(&c.id).await.unwrap_err();
    println!("start of a missing binary: {err:#}");
    let exit = EngineStack::wait_exit(wait, Duration::from_secs(10)).await?;
    ensure!(exit.status_code == 127, "{exit:?}");
    ensure!(!exit.error.is_empty(), "{exit:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_limits_are_applied() -> Result<()> {
    if !berth_integration::engine_kit::ready() {
        return Ok(());
    }
    let es = EngineStack::start().await?;
    let host = pb::HostConfig {
        resources: Some(pb::Resources {
            memory: Some(64 << 20),
            pids_limit: Some(42),
            nano_cpus: Some(500_000_000),
            cpuset_cpus: Some("0".into()),
            cpu_shares: Some(512),
            ..Default::default()
        }),
        ..Default::default()
    };
    let c = es
        .create(
            &unique("limits"),
            sh("cat /sys/fs/cgroup/memory/memory.limit_in_bytes; sleep 300"),
            host,
        )
        .await?;
    es.start_task(&c.id).await?;
    let id = &c.id;
    ensure!(
        read_cgroup(&es.cgroup_dir("memory", id).join("memory.limit_in_bytes"))?
            == (64u64 << 20).to_string()
    );
    ensure!(read_cgroup(&es.cgroup_dir("pids", id).join("pids.max"))? == "42");
    ensure!(read_cgroup(&es.cgroup_dir("cpu", id).join("cpu.cfs_quota_us"))? == "50000");
    ensure!(read_cgroup(&es.cgroup_dir("cpu", id).join("cpu.cfs_period_us"))? == "100000");
    ensure!(read_cgroup(&es.cgroup_dir("cpu", id).join("cpu.shares"))? == "512");
    ensure!(read_cgroup(&es.cgroup_dir("cpuset", id).join("cpuset.cpus"))? == "0");
    // The container sees its own limit too.
    let mut seen = String::new();
    for _ in 0..50 {
        seen = es.logs(id).await?.0;
        if !seen.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(seen.trim() == (64u64 << 20).to_string(), "inside: {seen:?}");

    // A live update reaches the cgroup.
    es.containers()
        .update(pb::UpdateContainerRequest {
            id: id.clone(),
            resources: Some(pb::Resources {
                pids_limit: Some(64),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    ensure!(read_cgroup(&es.cgroup_dir("pids", id).join("pids.max"))? == "64");
    es.remove(id).await?;
    ensure!(
        !es.cgroup_dir("pids", id).exists(),
        "cgroup removed with the container"
    );

    // Over the memory limit: OOM-killed, recorded, "oom" published before "die".
    let since = std::time::SystemTime::now();
    let host = pb::HostConfig {
        resources: Some(pb::Resources {
            memory: Some(8 << 20),
            ..Default::default()
        }),
        ..Default::default()
    };
    let r = es
        .run(
            &unique("oom"),
            sh("x=$(head -c 200000000 /dev/zero | tr '\\0' x); echo survived"),
            host,
        )
        .await?;
    ensure!(
        r.exit_code == 137 && !r.stdout.contains("survived"),
        "{r:?}"
    );
    let st = es.inspect(&r.id).await?.state.unwrap();
    ensure!(st.oom_killed, "{st:?}");
    let mut sub = es
        .events()
        .subscribe(berth_proto::berth::events::v1::SubscribeRequest {
            filters: vec![types::Filter {
                key: "container".into(),
                value: r.id.clone(),
            }],
            since: Some(since.into()),
            until: Some(std::time::SystemTime::now().into()),
        })
        .await?
        .into_inner();
    let mut actions = Vec::new();
    while let Some(ev) = tokio_stream::StreamExt::next(&mut sub).await {
        actions.push(ev?.envelope.unwrap().action);
    }
    ensure!(actions == ["create", "start", "oom", "die"], "{actions:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_binds_and_tmpfs() -> Result<()> {
    if !berth_integration::engine_kit::ready() {
        return Ok(());
    }
    let es = EngineStack::start().await?;
    let vol = unique("data");
    let volume_mount = |ro: bool| pb::MountSpec {
        r#type: pb::MountType::Volume.into(),
        source: vol.clone(),
        target: "/data".into(),
        read_only: ro,
        ..Default::default()
    };
    // A named volume keeps data across two containers.
    let host = pb::HostConfig {
        mounts: vec![volume_mount(false)],
        ..Default::default()
    };
    let r = es
        .run(&unique("w"), sh("echo persisted > /data/f"), host.clone())
        .await?;
    ensure!(r.exit_code == 0, "{r:?}");
    let r = es.run(&unique("r"), sh("cat /data/f"), host).await?;
    ensure!(r.stdout == "persisted\n", "{r:?}");
    let v = es
        .volumes()
        .get(pb::GetVolumeRequest {
            name: vol.clone(),
            usage: true,
        })
        .await?
        .into_inner()
        .volume
        .unwrap();
    ensure!(v.usage.as_ref().unwrap().ref_count == 2, "{v:?}");
    ensure!(std::fs::read_to_string(format!("{}/f", v.mountpoint))? == "persisted\n");
    // In use: refused.
    let err = es
        .volumes()
        .delete(pb::DeleteVolumeRequest {
            name: vol.clone(),
            force: false,
        })
        .await
        .unwrap_err();
    ensure!(err.code() == tonic::Code::FailedPrecondition, "{err:?}");

    // A new named volume on a path of the image is filled from the image (copy-up).
    let etc = unique("etc");
    let host = pb::HostConfig {
        mounts: vec![pb::MountSpec {
            r#type: pb::MountType::Volume.into(),
            source: etc.clone(),
            target: "/etc".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let r = es
        .run(&unique("cu"), sh("grep -c postgres /etc/passwd"), host)
        .await?;
    ensure!(r.stdout.trim() == "1", "{r:?}");

    // A read-only bind mount is read-only; a read-write one is writable from both sides.
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("host.txt"), "from host\n")?;
    let bind = |ro: bool, target: &str| pb::MountSpec {
        r#type: pb::MountType::Bind.into(),
        source: dir.path().display().to_string(),
        target: target.into(),
        read_only: ro,
        ..Default::default()
    };
    let host = pb::HostConfig {
        mounts: vec![bind(true, "/ro"), bind(false, "/rw")],
        ..Default::default()
    };
    let r = es
        .run(
            &unique("bind"),
            sh("cat /ro/host.txt; touch /ro/x && echo WROTE-RO; echo hi > /rw/new.txt; grep -E ' /ro ' /proc/mounts"),
            host,
        )
        .await?;
    ensure!(r.stdout.starts_with("from host\n"), "{r:?}");
    ensure!(!r.stdout.contains("WROTE-RO"), "{r:?}");
    ensure!(r.stderr.contains("Read-only file system"), "{r:?}");
    ensure!(
        r.stdout
            .lines()
            .any(|l| l.contains(" /ro ") && l.contains(" ro,")),
        "{r:?}"
    );
    ensure!(std::fs::read_to_string(dir.path().join("new.txt"))? == "hi\n");

    // A tmpfs mount is tmpfs, with its size.
    let host = pb::HostConfig {
        mounts: vec![pb::MountSpec {
            r#type: pb::MountType::Tmpfs.into(),
            target: "/scratch".into(),
            tmpfs: Some(pb::TmpfsOptions {
                size_bytes: 8 << 20,
                mode: 0o1777,
                options: vec![],
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let r = es
        .run(
            &unique("tmpfs"),
            sh("grep ' /scratch ' /proc/mounts; df -k /scratch | tail -1"),
            host,
        )
        .await?;
    ensure!(r.stdout.contains("tmpfs /scratch tmpfs"), "{r:?}");
    ensure!(r.stdout.contains("8192"), "{r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_clear_grpc_statuses() -> Result<()> {
    if !berth_integration::engine_kit::ready() {
        return Ok(());
    }
    let es = EngineStack::start().await?;
    let err = es
        .containers()
        .get(pb::GetContainerRequest {
            id: "nope".into(),
            size: false,
        })
        .await
        .unwrap_err();
    ensure!(
        err.code() == tonic::Code::NotFound && err.message() == "No such container: nope",
        "{err:?}"
    );

    let name = unique("busy");
    let c = es
        .create(&name, busybox(&["sleep", "300"]), Default::default())
        .await?;
    let err = es
        .create(&name, busybox(&["true"]), Default::default())
        .await
        .unwrap_err();
    let status = err.downcast_ref::<tonic::Status>().unwrap();
    ensure!(status.code() == tonic::Code::AlreadyExists, "{status:?}");
    ensure!(
        status.message()
            == format!(
                "Conflict. The container name \"/{name}\" is already in use by container \"{}\". You have to remove (or rename) that container to be able to reuse that name.",
                c.id
            ),
        "{status:?}"
    );
    es.start_task(&c.id).await?;
    let err = es
        .containers()
        .delete(pb::DeleteContainerRequest {
            id: name.clone(),
            force: false,
            ..Default::default()
        })
        .await
        .unwrap_err();
    ensure!(err.code() == tonic::Code::FailedPrecondition, "{err:?}");
    ensure!(
        err.message()
            .contains("Stop the container before attempting removal or force remove")
    );
    let mut cfg = busybox(&["true"]);
    cfg.image = "no-such-image:1".into();
    let err = es
        .create(&unique("x"), cfg, Default::default())
        .await
        .unwrap_err();
    let status = err.downcast_ref::<tonic::Status>().unwrap();
    ensure!(status.code() == tonic::Code::NotFound, "{status:?}");

    // Stop: SIGTERM is ignored by sh as pid 1, so the timeout leads to SIGKILL.
    let t = std::time::Instant::now();
    es.tasks()
        .stop(pb::StopTaskRequest {
            id: name.clone(),
            signal: String::new(),
            timeout_seconds: Some(1),
        })
        .await?;
    ensure!(t.elapsed() < Duration::from_secs(10));
    let c = es.inspect(&name).await?;
    let st = c.state.unwrap();
    ensure!(
        st.status() == pb::ContainerStatus::Exited && st.exit_code == 137,
        "{st:?}"
    );
    let _ = types::Filter::default();
    Ok(())
}
