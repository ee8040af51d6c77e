//! berth-shim outlives whoever started it: `kill -9` of the starting process before the
//! container exits leaves the shim running with the exit status, a new client reads it, and the
//! exit event reaches an events hub that only comes up later. Needs root; skips otherwise.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result};
use berth_integration::shim_kit::{self, FakeHub, ShimTest, skip};
use berth_proto::berth::shim::v1 as pb;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shim_survives_its_starter_and_keeps_the_exit_status() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut t = ShimTest::new(
        "survive",
        &["sh", "-c", "echo started; sleep 2; exit 7"],
        false,
    )?;
    let hub_socket = t.dir.path().join("hub.sock");

    // The engine stand-in: a process that runs `berth-shim start`, keeps running, and is
    // killed with SIGKILL while the container still runs.
    let start = t.start_command();
    let mut line = format!("{:?}", start.get_program());
    for arg in start.get_args() {
        line.push(' ');
        line.push_str(&format!("{arg:?}"));
    }
    let addr_file = t.dir.path().join("address");
    let script = format!(
        "{line} --events-address unix://{} > {} && exec sleep 1000",
        hub_socket.display(),
        addr_file.display()
    );
    let mut starter = Command::new("/bin/sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .spawn()
        .context("spawn the starter")?;
    let address = shim_kit::eventually(T, || {
        std::fs::read_to_string(&addr_file)
            .ok()
            .filter(|a| a.ends_with('\n'))
            .map(|a| a.trim().to_string())
    })
    .await
    .context("the starter never printed an address")?;
    t.adopt(&address)?;
    let shim_pid = t.shim_pid.unwrap();

    let mut c = t.client();
    c.create(t.create_request(pb::StdioMode::Pipes, false))
        .await?;
    c.start(pb::StartRequest::default()).await?;
    shim_kit::eventually(T, || {
        t.log_lines()
            .iter()
            .any(|(_, l)| l == "started\n")
            .then_some(())
    })
    .await
    .context("container output")?;

    // kill -9 the starter (our own child) before the container exits; drop our connection.
    kill(Pid::from_raw(starter.id() as i32), Signal::SIGKILL)?;
    starter.wait()?;
    drop(c);
    assert!(
        shim_kit::running(shim_pid),
        "the shim died with its starter"
    );

    // The container exits; the shim records it in the bundle while nobody is connected.
    let exit = shim_kit::eventually(T, || std::fs::read(t.bundle.join("exit.json")).ok())
        .await
        .context("exit.json")?;
    let exit: serde_json::Value = serde_json::from_slice(&exit)?;
    assert_eq!(exit["exit_status"], 7);
    assert!(shim_kit::running(shim_pid));

    // A new client on the same socket reads the status.
    let mut c = t.client();
    let waited = tokio::time::timeout(T, c.wait(pb::WaitRequest::default()))
        .await??
        .into_inner();
    assert_eq!(waited.exit_status, 7);
    let state = c.state(pb::StateRequest::default()).await?.into_inner();
    assert_eq!(
        (state.status(), state.exit_status),
        (pb::TaskStatus::Stopped, 7)
    );
    let info = c.info(pb::InfoRequest {}).await?.into_inner();
    assert_eq!(info.shim_pid as i32, shim_pid);

    // The events hub was down when the container exited; the shim's queue delivers once it is up.
    let hub = FakeHub::default();
    let server = hub.serve(&hub_socket).await?;
    let exits = shim_kit::eventually(T, || {
        let exits = hub.exits();
        (!exits.is_empty()).then_some(exits)
    })
    .await
    .context("no TaskExit reached the hub")?;
    assert_eq!(exits, [(String::new(), 7)]);
    let topics = hub.topics();
    assert_eq!(topics, ["/tasks/start", "/tasks/exit"], "in order");
    let envelope = hub.received.lock().unwrap()[1].clone();
    assert_eq!(envelope.namespace, "test");
    assert_eq!(envelope.actor.unwrap().id, t.id);

    c.delete(pb::DeleteRequest::default()).await?;
    c.shutdown(pb::ShutdownRequest { now: false }).await?;
    assert!(
        shim_kit::eventually(T, || (!shim_kit::running(shim_pid)).then_some(()))
            .await
            .is_some()
    );
    server.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn termination_signals_do_not_stop_a_shim_with_a_task() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut t = ShimTest::new("sigterm", &["sleep", "1000"], false)?;
    t.start_shim()?;
    let pid = t.shim_pid.unwrap();
    let mut c = t.client();
    c.create(t.create_request(pb::StdioMode::Pipes, false))
        .await?;
    c.start(pb::StartRequest::default()).await?;
    kill(Pid::from_raw(pid), Signal::SIGTERM)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        shim_kit::running(pid),
        "SIGTERM stopped a shim whose task runs"
    );
    let err = c
        .shutdown(pb::ShutdownRequest { now: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    // `now` kills and deletes the task, then exits.
    c.shutdown(pb::ShutdownRequest { now: true }).await?;
    assert!(
        shim_kit::eventually(T, || (!shim_kit::running(pid)).then_some(()))
            .await
            .is_some()
    );
    let exit: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.bundle.join("exit.json"))?)?;
    assert_eq!(exit["exit_status"], 137);
    assert!(!t.bundle.join("rootfs/bin").exists(), "rootfs unmounted");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_cleans_up_after_a_dead_shim() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut t = ShimTest::new("dead", &["sleep", "1000"], false)?;
    t.start_shim()?;
    let pid = t.shim_pid.unwrap();
    let mut c = t.client();
    c.create(t.create_request(pb::StdioMode::Pipes, false))
        .await?;
    c.start(pb::StartRequest::default()).await?;
    // The shim dies (it never should); its container is orphaned.
    kill(Pid::from_raw(pid), Signal::SIGKILL)?;
    assert!(
        shim_kit::eventually(T, || (!shim_kit::running(pid)).then_some(()))
            .await
            .is_some()
    );
    let out = Command::new(shim_kit::shim_binary())
        .args(["delete", "--id", &t.id, "--bundle"])
        .arg(&t.bundle)
        .arg("--state-dir")
        .arg(&t.state_dir)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No exit was recorded (the shim died first): 255, as the engine reports an unknown status.
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(printed["exit_status"], 255);
    let list = Command::new("runc")
        .arg("--root")
        .arg(&t.runtime_root)
        .args(["list", "-q"])
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&list.stdout).trim(),
        "",
        "container deleted"
    );
    assert!(!t.bundle.join("rootfs/bin").exists(), "rootfs unmounted");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_kills_are_published_before_the_exit() -> Result<()> {
    if skip() {
        return Ok(());
    }
    // `tail` keeps the last "line" of an endless stream without newlines: it grows until the
    // cgroup's limit kills it.
    let mut t = ShimTest::new("oom", &["tail", "/dev/zero"], false)?;
    let config_path = t.bundle.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path)?)?;
    config["linux"]["resources"]["memory"] = serde_json::json!({"limit": 32 << 20});
    std::fs::write(&config_path, serde_json::to_vec(&config)?)?;
    let hub_socket = t.dir.path().join("hub.sock");
    let hub = FakeHub::default();
    let server = hub.serve(&hub_socket).await?;
    t.start_shim()?;
    let mut c = t.client();
    let mut req = t.create_request(pb::StdioMode::Pipes, false);
    req.events_address = format!("unix://{}", hub_socket.display());
    c.create(req).await?;
    c.start(pb::StartRequest::default()).await?;
    let waited = tokio::time::timeout(T, c.wait(pb::WaitRequest::default()))
        .await??
        .into_inner();
    assert_eq!(waited.exit_status, 137);
    let topics = shim_kit::eventually(T, || {
        let topics = hub.topics();
        topics
            .contains(&"/tasks/exit".to_string())
            .then_some(topics)
    })
    .await
    .context("no exit event")?;
    assert_eq!(topics, ["/tasks/start", "/tasks/oom", "/tasks/exit"]);
    c.delete(pb::DeleteRequest::default()).await?;
    server.abort();
    Ok(())
}
