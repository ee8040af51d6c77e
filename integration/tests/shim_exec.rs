//! berth-shim with real runc: exec processes with and without a TTY, several attachers, and the
//! rest of the task API on a running container (pids, pause/resume, update, stats, kill --all).
//! Needs root; skips otherwise.

use std::time::Duration;

use anyhow::Result;
use berth_integration::shim_kit::{ShimTest, attach, exec_spec, skip};
use berth_proto::berth::shim::v1 as pb;
use berth_proto::berth::types::v1 as types;

const T: Duration = Duration::from_secs(20);

fn all_output() -> pb::AttachOptions {
    pb::AttachOptions {
        stdout: true,
        stderr: true,
        stream: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_with_and_without_a_tty_and_two_attachers() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut t = ShimTest::new("exec", &["sleep", "1000"], false)?;
    t.start_shim()?;
    let mut c = t.client();
    let init_pid = c
        .create(t.create_request(pb::StdioMode::Pipes, false))
        .await?
        .into_inner()
        .pid;
    c.start(pb::StartRequest::default()).await?;

    // Without a TTY: two attachers, both attached before Start, see the same output.
    c.exec(pb::ExecRequest {
        exec_id: "e1".into(),
        spec: exec_spec(&[
            "sh",
            "-c",
            "echo hello; echo oops >&2; for i in 1 2 3; do echo n$i; done; exit 5",
        ]),
        terminal: false,
        stdin: false,
        terminal_size: None,
    })
    .await?;
    let dup = c
        .exec(pb::ExecRequest {
            exec_id: "e1".into(),
            spec: exec_spec(&["true"]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), tonic::Code::AlreadyExists);
    let a1 = attach(
        &mut c,
        pb::AttachOptions {
            exec_id: "e1".into(),
            ..all_output()
        },
    )
    .await?;
    let a2 = attach(
        &mut c,
        pb::AttachOptions {
            exec_id: "e1".into(),
            ..all_output()
        },
    )
    .await?;
    let state = c
        .state(pb::StateRequest {
            exec_id: "e1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(state.status(), pb::TaskStatus::Created);
    let pid = c
        .start(pb::StartRequest {
            exec_id: "e1".into(),
        })
        .await?
        .into_inner()
        .pid;
    assert!(pid > 0 && pid != init_pid);
    let (r1, r2) = tokio::join!(a1.collect(T), a2.collect(T));
    let (out1, err1, status1) = r1?;
    let (out2, err2, status2) = r2?;
    assert_eq!(out1, "hello\nn1\nn2\nn3\n");
    assert_eq!(err1, "oops\n");
    assert_eq!(status1, Some(5));
    assert_eq!((out1, err1, status1), (out2, err2, status2));
    let waited = c
        .wait(pb::WaitRequest {
            exec_id: "e1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(waited.exit_status, 5);
    // Exec output is not logged.
    assert!(t.log_lines().is_empty(), "{:?}", t.log_lines());
    let deleted = c
        .delete(pb::DeleteRequest {
            exec_id: "e1".into(),
            force: false,
        })
        .await?
        .into_inner();
    assert_eq!((deleted.pid, deleted.exit_status), (pid, 5));

    // With a TTY and stdin.
    c.exec(pb::ExecRequest {
        exec_id: "e2".into(),
        spec: exec_spec(&["sh", "-c", "tty; stty size; read x; echo \"x=$x\"; exit 2"]),
        terminal: true,
        stdin: true,
        terminal_size: Some(types::TerminalSize {
            width: 100,
            height: 30,
        }),
    })
    .await?;
    let a = attach(
        &mut c,
        pb::AttachOptions {
            exec_id: "e2".into(),
            stdin: true,
            ..all_output()
        },
    )
    .await?;
    assert!(a.terminal);
    c.start(pb::StartRequest {
        exec_id: "e2".into(),
    })
    .await?;
    a.send(b"abc\r").await?;
    let (out, err, status) = a.collect(T).await?;
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(out.contains("30 100"), "{out:?}");
    assert!(out.contains("x=abc"), "{out:?}");
    assert_eq!((err.as_str(), status), ("", Some(2)));
    assert_eq!(
        c.wait(pb::WaitRequest {
            exec_id: "e2".into()
        })
        .await?
        .into_inner()
        .exit_status,
        2
    );

    // TERM to an exec'd sleep (not pid 1 of the namespace, so TERM kills it): 143.
    c.exec(pb::ExecRequest {
        exec_id: "e3".into(),
        spec: exec_spec(&["sleep", "1000"]),
        ..Default::default()
    })
    .await?;
    let sleep_pid = c
        .start(pb::StartRequest {
            exec_id: "e3".into(),
        })
        .await?
        .into_inner()
        .pid;
    let pids = c.pids(pb::PidsRequest {}).await?.into_inner().processes;
    assert!(
        pids.iter()
            .any(|p| p.pid == init_pid && p.exec_id.is_empty()),
        "{pids:?}"
    );
    assert!(
        pids.iter().any(|p| p.pid == sleep_pid && p.exec_id == "e3"),
        "{pids:?}"
    );
    let err = c
        .delete(pb::DeleteRequest {
            exec_id: "e3".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    c.kill(pb::KillRequest {
        exec_id: "e3".into(),
        signal: 15,
        all: false,
    })
    .await?;
    let waited = tokio::time::timeout(
        T,
        c.wait(pb::WaitRequest {
            exec_id: "e3".into(),
        }),
    )
    .await??
    .into_inner();
    assert_eq!(waited.exit_status, 143);

    // An exec that cannot start fails Start with the runtime's message.
    c.exec(pb::ExecRequest {
        exec_id: "e4".into(),
        spec: exec_spec(&["/nope"]),
        ..Default::default()
    })
    .await?;
    let err = c
        .start(pb::StartRequest {
            exec_id: "e4".into(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("runc exec"), "{err:?}");

    c.kill(pb::KillRequest {
        exec_id: String::new(),
        signal: 9,
        all: true,
    })
    .await?;
    let waited = tokio::time::timeout(T, c.wait(pb::WaitRequest::default()))
        .await??
        .into_inner();
    assert_eq!(waited.exit_status, 137);
    c.delete(pb::DeleteRequest::default()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_attachers_to_the_init_process() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let script = "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done";
    let mut t = ShimTest::new("att", &["sh", "-c", script], false)?;
    t.start_shim()?;
    let mut c = t.client();
    c.create(t.create_request(pb::StdioMode::Pipes, false))
        .await?;
    let a1 = attach(&mut c, all_output()).await?;
    let a2 = attach(
        &mut c,
        pb::AttachOptions {
            stderr: false,
            ..all_output()
        },
    )
    .await?;
    c.start(pb::StartRequest::default()).await?;
    let (r1, r2) = tokio::join!(a1.collect(T), a2.collect(T));
    let (out1, err1, s1) = r1?;
    let (out2, err2, s2) = r2?;
    assert_eq!(out1, "out1\nout2\nout3\nout4\nout5\n");
    assert_eq!(err1, "err1\nerr2\nerr3\nerr4\nerr5\n");
    assert_eq!((out2, err2.as_str()), (out1, ""));
    assert_eq!((s1, s2), (Some(0), Some(0)));

    // Attaching afterwards with logs replays the log and ends.
    let late = attach(
        &mut c,
        pb::AttachOptions {
            logs: true,
            ..all_output()
        },
    )
    .await?;
    let (out, err, status) = late.collect(T).await?;
    assert_eq!(out, "out1\nout2\nout3\nout4\nout5\n");
    assert_eq!(err, "err1\nerr2\nerr3\nerr4\nerr5\n");
    assert_eq!(status, Some(0));
    c.delete(pb::DeleteRequest::default()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_update_and_stats() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut t = ShimTest::new(
        "stats",
        &["sh", "-c", "while true; do sleep 1; done"],
        false,
    )?;
    t.start_shim()?;
    let mut c = t.client();
    c.create(t.create_request(pb::StdioMode::None, false))
        .await?;
    c.start(pb::StartRequest::default()).await?;

    let stats = c
        .stats(pb::StatsRequest {})
        .await?
        .into_inner()
        .stats
        .unwrap();
    let v1 = std::fs::metadata("/sys/fs/cgroup/memory").is_ok();
    let want = if v1 {
        types::CgroupVersion::V1
    } else {
        types::CgroupVersion::V2
    };
    assert_eq!(stats.cgroup_version(), want);
    let memory = stats.memory.unwrap();
    assert!(memory.usage > 0);
    assert!(memory.limit > 0);
    assert!(
        memory.stats.contains_key("inactive_file"),
        "{:?}",
        memory.stats.keys()
    );
    assert!(stats.pids.unwrap().current >= 1);
    assert!(stats.cpu.unwrap().usage.unwrap().total_ns > 0);
    assert!(stats.blkio.is_some());

    c.update(pb::UpdateRequest {
        resources: serde_json::to_vec(&serde_json::json!({"pids": {"limit": 77}}))?,
        ..Default::default()
    })
    .await?;
    let stats = c
        .stats(pb::StatsRequest {})
        .await?
        .into_inner()
        .stats
        .unwrap();
    assert_eq!(stats.pids.unwrap().limit, 77);
    let err = c
        .update(pb::UpdateRequest {
            resources: b"[1]".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    c.pause(pb::PauseRequest {}).await?;
    assert_eq!(
        c.state(pb::StateRequest::default())
            .await?
            .into_inner()
            .status(),
        pb::TaskStatus::Paused
    );
    let err = c.pause(pb::PauseRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    c.resume(pb::ResumeRequest {}).await?;
    assert_eq!(
        c.state(pb::StateRequest::default())
            .await?
            .into_inner()
            .status(),
        pb::TaskStatus::Running
    );

    // Force-delete kills what runs, paused or not.
    c.pause(pb::PauseRequest {}).await?;
    let deleted = c
        .delete(pb::DeleteRequest {
            exec_id: String::new(),
            force: true,
        })
        .await?
        .into_inner();
    assert_eq!(deleted.exit_status, 137);
    c.shutdown(pb::ShutdownRequest { now: false }).await?;
    Ok(())
}
