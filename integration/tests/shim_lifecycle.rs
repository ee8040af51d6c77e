//! berth-shim with real runc: output and exit statuses, signals, stdin and TTYs, the files the
//! shim keeps in the bundle, runtime errors. Needs root; skips otherwise.

use std::time::{Duration, Instant};

use anyhow::Result;
use berth_integration::shim_kit::{self, ShimTest, attach, skip};
use berth_proto::berth::shim::v1 as pb;
use berth_proto::berth::types::v1 as types;

const T: Duration = Duration::from_secs(20);

fn wait_req(exec_id: &str) -> pb::WaitRequest {
    pb::WaitRequest {
        exec_id: exec_id.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_logged_per_stream_and_the_exit_status_is_kept() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut t = ShimTest::new(
        "out",
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        false,
    )?;
    let address = t.start_shim()?;
    assert!(address.starts_with("unix:///"), "{address}");
    assert_eq!(
        std::fs::read_to_string(t.bundle.join("shim.address"))?,
        address
    );
    // Own session, so no terminal or job-control signal of the caller reaches it.
    let pid = t.shim_pid.unwrap();
    assert_eq!(
        nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid)))?.as_raw(),
        pid
    );

    let mut c = t.client();
    let created = c
        .create(t.create_request(pb::StdioMode::Pipes, false))
        .await?
        .into_inner();
    assert!(created.pid > 0);
    // The rootfs was bind-mounted by the shim.
    assert!(t.bundle.join("rootfs/bin/busybox").exists());
    let state = c.state(pb::StateRequest::default()).await?.into_inner();
    assert_eq!(state.status(), pb::TaskStatus::Created);

    // Wait works before Start.
    let mut waiter = c.clone();
    let wait = tokio::spawn(async move { waiter.wait(wait_req("")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!wait.is_finished());
    let started = c.start(pb::StartRequest::default()).await?.into_inner();
    assert_eq!(started.pid, created.pid);

    let waited = tokio::time::timeout(T, wait).await???.into_inner();
    assert_eq!(waited.exit_status, 3);
    assert!(waited.exited_at.is_some());

    // Both lines, each with its stream, in Docker's json-file format.
    let lines = t.log_lines();
    assert!(
        lines.contains(&("stdout".into(), "out\n".into())),
        "{lines:?}"
    );
    assert!(
        lines.contains(&("stderr".into(), "err\n".into())),
        "{lines:?}"
    );
    let raw = std::fs::read_to_string(t.log_path())?;
    for line in raw.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let time = v["time"].as_str().unwrap();
        // RFC 3339, nanoseconds, UTC.
        assert_eq!(time.len(), "2026-01-01T00:00:00.000000000Z".len(), "{time}");
        assert!(time.ends_with('Z'));
    }

    // The status is in the bundle (written before it was reported) and kept until Delete.
    let exit: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.bundle.join("exit.json"))?)?;
    assert_eq!(exit["exit_status"], 3);
    assert_eq!(exit["pid"], created.pid);
    let state = c.state(pb::StateRequest::default()).await?.into_inner();
    assert_eq!(
        (state.status(), state.exit_status),
        (pb::TaskStatus::Stopped, 3)
    );

    // Logs through the API, over the rotated set.
    let mut logs = c
        .logs(pb::LogsRequest {
            stdout: true,
            stderr: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut entries = Vec::new();
    while let Some(batch) = logs.message().await? {
        entries.extend(batch.entries);
    }
    let texts: Vec<(i32, String)> = entries
        .iter()
        .map(|e| (e.stream, String::from_utf8_lossy(&e.data).into_owned()))
        .collect();
    assert!(
        texts.contains(&(types::OutputStream::Stdout as i32, "out\n".into())),
        "{texts:?}"
    );
    assert!(
        texts.contains(&(types::OutputStream::Stderr as i32, "err\n".into())),
        "{texts:?}"
    );

    let deleted = c.delete(pb::DeleteRequest::default()).await?.into_inner();
    assert_eq!((deleted.pid, deleted.exit_status), (created.pid, 3));
    assert!(
        !t.bundle.join("rootfs/bin/busybox").exists(),
        "rootfs unmounted"
    );
    let err = c.state(pb::StateRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    c.shutdown(pb::ShutdownRequest { now: false }).await?;
    let gone = shim_kit::eventually(T, || (!t.shim_alive()).then_some(())).await;
    assert!(gone.is_some(), "shim exited after Shutdown");
    assert!(!t.bundle.join("shim.address").exists());
    assert!(!t.socket().exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn term_to_a_sleep_gives_143() -> Result<()> {
    if skip() {
        return Ok(());
    }
    // Without a pid namespace the sleep is an ordinary process that TERM kills (as pid 1 of
    // its own namespace the kernel would ignore an unhandled TERM).
    let mut t = ShimTest::new("term", &["sleep", "1000"], false)?;
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.bundle.join("config.json"))?)?;
    config["linux"]["namespaces"] =
        serde_json::json!([{"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]);
    std::fs::write(t.bundle.join("config.json"), serde_json::to_vec(&config)?)?;
    t.start_shim()?;
    let mut c = t.client();
    c.create(t.create_request(pb::StdioMode::Pipes, false))
        .await?;
    c.start(pb::StartRequest::default()).await?;
    // Deleting a running task is refused without force.
    let err = c.delete(pb::DeleteRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    c.kill(pb::KillRequest {
        exec_id: String::new(),
        signal: 15,
        all: false,
    })
    .await?;
    let waited = tokio::time::timeout(T, c.wait(wait_req("")))
        .await??
        .into_inner();
    assert_eq!(waited.exit_status, 143);
    // Killing an exited process is NotFound.
    let err = c
        .kill(pb::KillRequest {
            exec_id: String::new(),
            signal: 15,
            all: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let deleted = c.delete(pb::DeleteRequest::default()).await?.into_inner();
    assert_eq!(deleted.exit_status, 143);
    c.shutdown(pb::ShutdownRequest { now: false }).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_through_a_pipe() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut t = ShimTest::new(
        "stdin",
        &["sh", "-c", "read line; echo \"got $line\"; cat; exit 4"],
        false,
    )?;
    t.start_shim()?;
    let mut c = t.client();
    c.create(t.create_request(pb::StdioMode::Pipes, true))
        .await?;
    let a = attach(
        &mut c,
        pb::AttachOptions {
            stdin: true,
            stdout: true,
            stderr: true,
            stream: true,
            ..Default::default()
        },
    )
    .await?;
    assert!(!a.terminal);
    c.start(pb::StartRequest::default()).await?;
    a.send(b"hello\nmore input\n").await?;
    a.close_stdin().await?;
    let (out, _err, status) = a.collect(T).await?;
    assert_eq!(out, "got hello\nmore input\n");
    assert_eq!(status, Some(4));
    let lines = t.log_lines();
    assert_eq!(
        lines,
        [
            ("stdout".to_string(), "got hello\n".to_string()),
            ("stdout".into(), "more input\n".into())
        ]
    );
    c.delete(pb::DeleteRequest::default()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tty_with_input_and_resize() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let script = "tty; stty size; read l; stty size; echo \"line=$l\"";
    let mut t = ShimTest::new("tty", &["sh", "-c", script], true)?;
    t.start_shim()?;
    let mut c = t.client();
    // Stdio and config.json must agree about the terminal.
    let err = c
        .create(t.create_request(pb::StdioMode::Pipes, true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    c.create(t.create_request(pb::StdioMode::Tty, true)).await?;
    let mut a = attach(
        &mut c,
        pb::AttachOptions {
            stdin: true,
            stdout: true,
            stderr: true,
            stream: true,
            ..Default::default()
        },
    )
    .await?;
    assert!(a.terminal);
    c.start(pb::StartRequest::default()).await?;
    // Wait for the first `stty size` before resizing, so the order is certain.
    let mut seen = String::new();
    while !seen.contains("24 80") {
        let msg = tokio::time::timeout(T, a.output.message())
            .await??
            .expect("output");
        if let Some(pb::attach_response::Event::Output(chunk)) = msg.event {
            assert_eq!(chunk.stream, types::OutputStream::Stdout as i32);
            seen.push_str(&String::from_utf8_lossy(&chunk.data));
        }
    }
    assert!(seen.contains("/dev/pts/"), "{seen:?}");
    c.resize_pty(pb::ResizePtyRequest {
        exec_id: String::new(),
        size: Some(types::TerminalSize {
            width: 120,
            height: 50,
        }),
    })
    .await?;
    a.send(b"typed\r").await?;
    let (out, _, status) = a.collect(T).await?;
    assert!(out.contains("50 120"), "{out:?}");
    assert!(out.contains("line=typed"), "{out:?}");
    assert_eq!(status, Some(0));
    // With a TTY everything is logged as stdout.
    let lines = t.log_lines();
    assert!(lines.iter().all(|(s, _)| s == "stdout"), "{lines:?}");
    assert!(
        lines.iter().any(|(_, l)| l.contains("line=typed")),
        "{lines:?}"
    );
    c.delete(pb::DeleteRequest::default()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_bundle_paths_get_a_short_socket() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let deep = format!("{}/{}", "d".repeat(60), "e".repeat(60));
    let mut t = ShimTest::with_bundle_dir("long", &["sh", "-c", "tty"], true, Some(&deep))?;
    let address = t.start_shim()?;
    assert!(t.bundle.as_os_str().len() > 108);
    assert!(
        address.starts_with(&format!("unix://{}/s/", t.state_dir.display())),
        "{address}"
    );
    // Starting again is idempotent: the same shim answers.
    let out = t.start_command().output()?;
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout)?.trim(), address);

    let mut c = t.client();
    c.create(t.create_request(pb::StdioMode::Tty, false))
        .await?;
    let a = attach(
        &mut c,
        pb::AttachOptions {
            stdout: true,
            stream: true,
            ..Default::default()
        },
    )
    .await?;
    c.start(pb::StartRequest::default()).await?;
    let (out, _, status) = a.collect(T).await?;
    assert!(out.contains("/dev/pts/0"), "{out:?}");
    assert_eq!(status, Some(0));
    c.shutdown(pb::ShutdownRequest { now: true }).await?;
    assert!(
        shim_kit::eventually(T, || (!t.shim_alive()).then_some(()))
            .await
            .is_some()
    );
    assert!(!t.socket().exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_failures_are_clear() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let t = ShimTest::new("bad", &["true"], false)?;
    let out = std::process::Command::new(shim_kit::shim_binary())
        .args(["start", "--id", &t.id, "--bundle"])
        .arg(t.dir.path().join("missing"))
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a directory"), "{err}");

    let out = std::process::Command::new(shim_kit::shim_binary())
        .args(["start", "--id", "bad id!", "--bundle"])
        .arg(&t.bundle)
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("container id"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_errors_surface_from_create() -> Result<()> {
    if skip() {
        return Ok(());
    }
    // A command that does not exist in the rootfs: runc refuses at create time.
    let mut t = ShimTest::new("noexec", &["/no/such/binary"], false)?;
    t.start_shim()?;
    let mut c = t.client();
    let err = c
        .create(t.create_request(pb::StdioMode::Pipes, false))
        .await
        .unwrap_err();
    assert!(err.message().contains("runc create"), "{err:?}");
    assert!(err.message().contains("/no/such/binary"), "{err:?}");
    assert!(
        !t.bundle.join("rootfs/bin/busybox").exists(),
        "rootfs unmounted after a failed create"
    );
    // The shim keeps serving.
    let info = c.info(pb::InfoRequest {}).await?.into_inner();
    assert_eq!((info.id.as_str(), info.task_pid), (t.id.as_str(), 0));

    // crun refuses this machine's hybrid cgroup layout: a prompt, clear error, not a hang.
    if shim_kit::which("crun").is_some() {
        let mut t = ShimTest::new("crun", &["true"], false)?;
        t.start_shim()?;
        let mut c = t.client();
        let mut req = t.create_request(pb::StdioMode::Pipes, false);
        req.runtime = Some(pb::RuntimeConfig {
            binary: "crun".into(),
            root: t.dir.path().join("crun").display().to_string(),
            ..Default::default()
        });
        let started = Instant::now();
        match c.create(req).await {
            Ok(_) => eprintln!("crun accepted this machine's cgroup layout"),
            Err(err) => {
                eprintln!("crun create: {}", err.message());
                assert!(err.message().starts_with("crun create: "), "{err:?}");
                assert!(err.message().len() > "crun create: ".len());
            }
        }
        assert!(started.elapsed() < Duration::from_secs(15));
    }
    Ok(())
}
