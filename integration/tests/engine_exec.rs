//! Exec (create, start attached and detached, inspect with exit code), top, stats,
//! pause/unpause, restart, and logs read from the json-file once the shim is gone.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use berth_integration::engine_kit::{EngineStack, busybox, unique};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::types::v1 as types;
use tokio_stream::StreamExt;

async fn exec(
    es: &EngineStack,
    id: &str,
    cmd: &[&str],
    detach: bool,
) -> Result<(String, Option<i32>, String)> {
    use pb::exec_start_request::Event as In;
    use pb::exec_start_response::Event as Out;
    let exec_id = es
        .tasks()
        .exec_create(pb::ExecCreateRequest {
            id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            attach_stdout: true,
            attach_stderr: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .exec_id;
    let first = pb::ExecStartRequest {
        event: Some(In::Options(pb::ExecStartOptions {
            exec_id: exec_id.clone(),
            detach,
            ..Default::default()
        })),
    };
    let mut s = es
        .tasks()
        .exec_start(tokio_stream::iter([first]))
        .await?
        .into_inner();
    let mut out = String::new();
    let mut code = None;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(20), s.next()).await? {
        match msg?.event {
            Some(Out::Started(_)) => {}
            Some(Out::Output(o)) => out.push_str(&String::from_utf8_lossy(&o.data)),
            Some(Out::End(e)) => code = Some(e.exit_code),
            Some(Out::Failed(f)) => bail!("exec failed ({}): {}", f.exit_code, f.message),
            None => bail!("empty exec message"),
        }
    }
    Ok((exec_id, code, out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_top_stats_pause_and_logs() -> Result<()> {
    if !berth_integration::engine_kit::ready() {
        return Ok(());
    }
    let es = EngineStack::start().await?;
    let c = es
        .create(
            &unique("svc"),
            busybox(&["sh", "-c", "echo started; exec sleep 300"]),
            Default::default(),
        )
        .await?;
    es.start_task(&c.id).await?;

    // Attached exec with output and an exit code; inspect agrees.
    let (exec_id, code, out) = exec(
        &es,
        &c.id,
        &["sh", "-c", "echo in-container; exit 4"],
        false,
    )
    .await?;
    ensure!(
        code == Some(4) && out == "in-container\n",
        "{code:?} {out:?}"
    );
    let info = es
        .tasks()
        .exec_inspect(pb::ExecInspectRequest { exec_id })
        .await?
        .into_inner();
    ensure!(info.exit_code == Some(4) && !info.running, "{info:?}");
    ensure!(info.process_config.unwrap().entrypoint == "sh");
    // Detached exec: inspect shows the exit once it is done.
    let (exec_id, code, _) = exec(&es, &c.id, &["sh", "-c", "exit 6"], true).await?;
    ensure!(code.is_none());
    let mut done = None;
    for _ in 0..100 {
        let info = es
            .tasks()
            .exec_inspect(pb::ExecInspectRequest {
                exec_id: exec_id.clone(),
            })
            .await?
            .into_inner();
        if info.exit_code.is_some() {
            done = info.exit_code;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(done == Some(6), "{done:?}");

    // top: Docker's columns, the container's processes only.
    let top = es
        .tasks()
        .top(pb::TopRequest {
            id: c.id.clone(),
            ps_args: String::new(),
        })
        .await?
        .into_inner();
    ensure!(
        top.titles.first().map(String::as_str) == Some("UID"),
        "{top:?}"
    );
    ensure!(top.titles.contains(&"PID".to_string()), "{top:?}");
    ensure!(
        top.processes.len() == 1
            && top.processes[0]
                .values
                .last()
                .unwrap()
                .contains("sleep 300"),
        "{top:?}"
    );

    // stats: one sample with memory and pids.
    let mut s = es
        .tasks()
        .stats(pb::StatsRequest {
            id: c.id.clone(),
            stream: false,
            one_shot: true,
        })
        .await?
        .into_inner();
    let sample = s.next().await.unwrap()?.stats.unwrap();
    let cg = sample.stats.unwrap_or_default();
    ensure!(cg.memory.unwrap_or_default().usage > 0, "memory usage");
    ensure!(cg.pids.unwrap_or_default().current >= 1, "pids");
    ensure!(sample.num_procs >= 1);

    // pause / unpause.
    es.tasks()
        .pause(pb::PauseTaskRequest { id: c.id.clone() })
        .await?;
    let st = es.inspect(&c.id).await?.state.unwrap();
    ensure!(st.status() == pb::ContainerStatus::Paused, "{st:?}");
    let err = es
        .tasks()
        .exec_create(pb::ExecCreateRequest {
            id: c.id.clone(),
            cmd: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    ensure!(err.code() == tonic::Code::FailedPrecondition, "{err:?}");
    es.tasks()
        .resume(pb::ResumeTaskRequest { id: c.id.clone() })
        .await?;
    ensure!(es.inspect(&c.id).await?.state.unwrap().status() == pb::ContainerStatus::Running);

    // restart: a new process, the log keeps both runs.
    let old = es.inspect(&c.id).await?.state.unwrap().pid;
    es.tasks()
        .restart(pb::RestartTaskRequest {
            id: c.id.clone(),
            signal: "KILL".into(),
            timeout_seconds: Some(0),
        })
        .await?;
    let st = es.inspect(&c.id).await?.state.unwrap();
    ensure!(
        st.status() == pb::ContainerStatus::Running && st.pid != old,
        "{st:?}"
    );

    // Stop: the shim is gone; logs come from the json-file.
    es.tasks()
        .stop(pb::StopTaskRequest {
            id: c.id.clone(),
            signal: String::new(),
            timeout_seconds: Some(1),
        })
        .await?;
    let bundle = es.stack().state_dir().join("bundles").join(&c.id);
    for _ in 0..100 {
        if !bundle.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(!bundle.exists(), "bundle removed after the exit");
    let (out, _) = es.logs(&c.id).await?;
    ensure!(out == "started\nstarted\n", "{out:?}");
    let mut tail = es
        .tasks()
        .logs(pb::LogsRequest {
            id: c.id.clone(),
            stdout: true,
            tail: Some(1),
            ..Default::default()
        })
        .await?
        .into_inner();
    let batch = tail.next().await.unwrap()?;
    ensure!(batch.entries.len() == 1, "{batch:?}");
    ensure!(batch.entries[0].stream == types::OutputStream::Stdout as i32);
    Ok(())
}
