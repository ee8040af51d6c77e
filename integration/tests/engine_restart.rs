//! The engine's restart-proof lifecycle: `kill -9` of the engine never stops a container, exits
//! that happen while it is down are picked up with their real codes and die events, restart
//! policies with Docker's backoff, and `always` containers coming back after their shim died
//! with the engine.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail, ensure};
use berth_core::Service;
use berth_integration::engine_kit::{EngineStack, busybox, unique};
use berth_integration::stack::{running, wait_for};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::events::v1 as evpb;
use berth_proto::berth::types::v1 as types;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_stream::StreamExt;

/// Sends `line` to a running container's stdin through the engine and returns what it echoes.
async fn attach_roundtrip(es: &EngineStack, id: &str, line: &str) -> Result<String> {
    use pb::attach_task_request::Event as In;
    use pb::attach_task_response::Event as Out;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::AttachTaskRequest {
        event: Some(In::Options(pb::AttachOptions {
            id: id.into(),
            stdin: true,
            stdout: true,
            stderr: true,
            stream: true,
            ..Default::default()
        })),
    })
    .await?;
    let mut out = es
        .tasks()
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    match out.next().await {
        Some(Ok(pb::AttachTaskResponse {
            event: Some(Out::Ready(_)),
        })) => {}
        other => bail!("attach to {id} not ready: {other:?}"),
    }
    tx.send(pb::AttachTaskRequest {
        event: Some(In::Data(format!("{line}\n").into_bytes())),
    })
    .await?;
    let mut got = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !got.contains('\n') {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, out.next()).await {
            Ok(Some(Ok(pb::AttachTaskResponse {
                event: Some(Out::Output(o)),
            }))) => got.push_str(&String::from_utf8_lossy(&o.data)),
            Ok(other) => bail!("attach to {id}: {other:?} after {got:?}"),
            Err(_) => bail!("attach to {id}: no echo within 10 s (got {got:?})"),
        }
    }
    Ok(got)
}

fn die_filter() -> Vec<types::Filter> {
    vec![types::Filter {
        key: "event".into(),
        value: "die".into(),
    }]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_engine_with_twenty_running_containers() -> Result<()> {
    if !berth_integration::engine_kit::ready() {
        return Ok(());
    }
    let es = EngineStack::start().await?;
    let trigger = tempfile::tempdir()?;
    let bind = pb::MountSpec {
        r#type: pb::MountType::Bind.into(),
        source: trigger.path().display().to_string(),
        target: "/trigger".into(),
        ..Default::default()
    };

    // 18 echo servers on stdin, 2 that exit with 7 and 9 once their trigger file appears.
    let mut echoers = Vec::new();
    let mut exiters: BTreeMap<String, i64> = BTreeMap::new();
    let mut creates = Vec::new();
    for i in 0..20 {
        let (name, cfg) = if i < 18 {
            let mut cfg = busybox(&["sh", "-c", "while read l; do echo \"$HOSTNAME:$l\"; done"]);
            cfg.open_stdin = true;
            (unique("echo"), cfg)
        } else {
            let code = if i == 18 { 7 } else { 9 };
            let script =
                format!("while [ ! -e /trigger/go{code} ]; do sleep 0.05; done; exit {code}");
            (
                unique(&format!("exit{code}")),
                busybox(&["sh", "-c", &script]),
            )
        };
        let host = pb::HostConfig {
            mounts: vec![bind.clone()],
            ..Default::default()
        };
        creates.push((i, name, cfg, host));
    }
    let t_start = Instant::now();
    let results = futures::future::join_all(creates.into_iter().map(|(i, name, cfg, host)| {
        let es = &es;
        async move {
            let c = es.create(&name, cfg, host).await?;
            es.start_task(&c.id).await?;
            Ok::<_, anyhow::Error>((i, c.id))
        }
    }))
    .await;
    println!(
        "20 containers created and started in {:?}",
        t_start.elapsed()
    );
    for r in results {
        let (i, id) = r?;
        if i < 18 {
            echoers.push(id);
        } else {
            exiters.insert(id, if i == 18 { 7 } else { 9 });
        }
    }
    for id in &echoers[..2] {
        let echo = attach_roundtrip(&es, id, "before").await?;
        ensure!(echo == format!("{}:before\n", &id[..12]), "{echo:?}");
    }
    let pids: HashMap<String, i32> = {
        let mut m = HashMap::new();
        for id in echoers.iter().chain(exiters.keys()) {
            m.insert(id.clone(), es.inspect(id).await?.state.unwrap().pid);
        }
        m
    };

    // Freeze `berth up` so that it cannot restart the engine yet, then kill -9 the engine.
    let stack = es.stack();
    let up = Pid::from_raw(stack.up_pid());
    let engine_pid = stack.pid(Service::Engine).context("engine pid")?;
    let t_kill = SystemTime::now();
    kill(up, Signal::SIGSTOP)?;
    let result: Result<()> = async {
        kill(Pid::from_raw(engine_pid), Signal::SIGKILL)?;
        wait_for(Duration::from_secs(10), || {
            (!running(engine_pid)).then_some(())
        })
        .context("engine still running after kill -9")?;
        // While it is down: two containers exit, everything else keeps running.
        std::fs::write(trigger.path().join("go7"), "")?;
        std::fs::write(trigger.path().join("go9"), "")?;
        for id in exiters.keys() {
            let pid = pids[id];
            wait_for(Duration::from_secs(10), || (!running(pid)).then_some(()))
                .with_context(|| format!("container {id} did not exit"))?;
        }
        for id in &echoers {
            ensure!(running(pids[id]), "container {id} died with the engine");
        }
        Ok(())
    }
    .await;
    // Let `berth up` restart the engine, whatever happened.
    kill(up, Signal::SIGCONT)?;
    result?;
    let t_cont = Instant::now();
    let new_pid = wait_for(Duration::from_secs(30), || {
        stack
            .pid(Service::Engine)
            .filter(|p| *p != engine_pid && running(*p))
    })
    .context("engine not restarted")?;
    // Ready when it answers (it reconciles before serving).
    let mut answered = None;
    for _ in 0..300 {
        if es
            .containers()
            .list(pb::ListContainersRequest::default())
            .await
            .is_ok()
        {
            answered = Some(t_cont.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let answered = answered.context("restarted engine does not answer")?;
    let log = stack.log_text();
    let took_ms: u64 = log
        .lines()
        .rev()
        .find(|l| l.contains("reconciled containers with their shims"))
        .and_then(|l| l.split("took_ms=").nth(1))
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok())
        .context("no reconcile line in the log")?;
    println!(
        "engine pid {engine_pid} -> {new_pid}: reconnecting to 20 shims took {took_ms} ms; \
         answering {answered:?} after berth up resumed"
    );
    ensure!(took_ms < 1000, "reconnecting took {took_ms} ms");

    // All 18 others running and attachable, the 2 with their real exit codes.
    for id in &echoers {
        let c = es.inspect(id).await?;
        let st = c.state.unwrap();
        ensure!(st.status() == pb::ContainerStatus::Running, "{id}: {st:?}");
        ensure!(st.pid == pids[id], "{id}: pid changed: {st:?}");
    }
    for id in &echoers {
        let echo = attach_roundtrip(&es, id, "after").await?;
        ensure!(echo == format!("{}:after\n", &id[..12]), "{echo:?}");
    }
    for (id, code) in &exiters {
        let st = es.inspect(id).await?.state.unwrap();
        ensure!(st.status() == pb::ContainerStatus::Exited, "{id}: {st:?}");
        ensure!(i64::from(st.exit_code) == *code, "{id}: {st:?}");
    }
    // The events stream has their die events.
    let mut sub = es
        .events()
        .subscribe(evpb::SubscribeRequest {
            filters: die_filter(),
            since: Some(t_kill.into()),
            until: Some(SystemTime::now().into()),
        })
        .await?
        .into_inner();
    let mut dies = BTreeMap::new();
    while let Some(ev) = sub.next().await {
        let env = ev?.envelope.unwrap();
        let actor = env.actor.unwrap();
        dies.insert(
            actor.id.clone(),
            actor.attributes["exitCode"].parse::<i64>()?,
        );
    }
    ensure!(dies == exiters, "die events {dies:?}, want {exiters:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_two_ends_after_three_runs() -> Result<()> {
    if !berth_integration::engine_kit::ready() {
        return Ok(());
    }
    let es = EngineStack::start().await?;
    let host = pb::HostConfig {
        restart_policy: Some(pb::RestartPolicy {
            name: pb::RestartPolicyName::OnFailure.into(),
            max_retries: 2,
        }),
        ..Default::default()
    };
    let c = es
        .create(
            &unique("flaky"),
            busybox(&["sh", "-c", "echo run; exit 3"]),
            host,
        )
        .await?;
    let since = SystemTime::now();
    es.start_task(&c.id).await?;
    // 100 ms + 200 ms of backoff: done well within a few seconds.
    let done = wait_for(Duration::from_secs(20), || {
        None::<()>.or_else(|| {
            let rt = tokio::runtime::Handle::current();
            let st = std::thread::scope(|s| {
                s.spawn(|| rt.block_on(es.inspect(&c.id)).ok())
                    .join()
                    .ok()
                    .flatten()
            })?
            .state?;
            (st.status() == pb::ContainerStatus::Exited && st.restart_count == 2).then_some(())
        })
    });
    ensure!(done.is_some(), "not exited with restart count 2");
    // Stays exited.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let st = es.inspect(&c.id).await?.state.unwrap();
    ensure!(
        st.status() == pb::ContainerStatus::Exited && st.restart_count == 2 && st.exit_code == 3,
        "{st:?}"
    );
    let mut sub = es
        .events()
        .subscribe(evpb::SubscribeRequest {
            filters: vec![types::Filter {
                key: "container".into(),
                value: c.id.clone(),
            }],
            since: Some(since.into()),
            until: Some(SystemTime::now().into()),
        })
        .await?
        .into_inner();
    let mut actions = Vec::new();
    while let Some(ev) = sub.next().await {
        actions.push(ev?.envelope.unwrap().action);
    }
    println!("events: {actions:?}");
    ensure!(
        actions.iter().filter(|a| *a == "die").count() == 3,
        "{actions:?}"
    );
    ensure!(
        actions.iter().filter(|a| *a == "start").count() == 3,
        "{actions:?}"
    );
    let (out, _) = es.logs(&c.id).await?;
    ensure!(out == "run\nrun\nrun\n", "log of the three runs: {out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_comes_back_after_engine_and_shim_died() -> Result<()> {
    if !berth_integration::engine_kit::ready() {
        return Ok(());
    }
    let es = EngineStack::start().await?;
    let host = pb::HostConfig {
        restart_policy: Some(pb::RestartPolicy {
            name: pb::RestartPolicyName::Always.into(),
            max_retries: 0,
        }),
        ..Default::default()
    };
    let c = es
        .create(&unique("always"), busybox(&["sleep", "300"]), host)
        .await?;
    es.start_task(&c.id).await?;
    let old_pid = es.inspect(&c.id).await?.state.unwrap().pid;
    let stack = es.stack();
    let bundle = stack.state_dir().join("bundles").join(&c.id);
    let shim_pid =
        berth_core::daemon::read_pid_file(&bundle.join("shim.pid")).context("shim pid")?;

    // As after a host crash: the engine, the shim and the container all die.
    let up = Pid::from_raw(stack.up_pid());
    let engine_pid = stack.pid(Service::Engine).context("engine pid")?;
    kill(up, Signal::SIGSTOP)?;
    let killed: Result<()> = (|| {
        kill(Pid::from_raw(engine_pid), Signal::SIGKILL)?;
        kill(Pid::from_raw(shim_pid), Signal::SIGKILL)?;
        kill(Pid::from_raw(old_pid), Signal::SIGKILL)?;
        for pid in [engine_pid, shim_pid, old_pid] {
            wait_for(Duration::from_secs(10), || (!running(pid)).then_some(()))
                .with_context(|| format!("pid {pid} still running"))?;
        }
        Ok(())
    })();
    kill(up, Signal::SIGCONT)?;
    killed?;

    let mut back = None;
    for _ in 0..300 {
        if let Ok(c) = es.inspect(&c.id).await {
            let st = c.state.unwrap();
            if st.status() == pb::ContainerStatus::Running && st.pid != old_pid && running(st.pid) {
                back = Some(st);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = back.context("the always container did not come back")?;
    println!(
        "always container back as pid {} (was {old_pid}), restart count {}",
        st.pid, st.restart_count
    );
    ensure!(st.restart_count == 1, "{st:?}");
    Ok(())
}
