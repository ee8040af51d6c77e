use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::AtomicU32;

use tokio::sync::oneshot;

use super::exec::exec_process_json;
use super::*;
use crate::events::PublisherConfig;
use crate::runtime::{BoxFuture, RuntimeState};
use crate::stdio::StdioMode;

/// Exits are delivered when the test (or the fake runtime) says so.
#[derive(Debug, Default)]
struct FakeSpawner {
    waiting: Mutex<HashMap<u32, oneshot::Sender<Exit>>>,
    exited: Mutex<HashMap<u32, Exit>>,
}

impl FakeSpawner {
    fn exit(&self, pid: u32, status: u32) {
        let exit = Exit {
            pid,
            status,
            at: SystemTime::now(),
        };
        match self.waiting.lock().unwrap().remove(&pid) {
            Some(tx) => {
                let _ = tx.send(exit);
            }
            None => {
                self.exited.lock().unwrap().insert(pid, exit);
            }
        }
    }
}

impl Spawner for FakeSpawner {
    fn spawn(&self, _cmd: &mut std::process::Command) -> Result<(u32, ExitFuture)> {
        Err(Error::unimplemented("fake"))
    }

    fn watch(&self, pid: u32) -> ExitFuture {
        let (tx, rx) = oneshot::channel();
        match self.exited.lock().unwrap().remove(&pid) {
            Some(exit) => {
                let _ = tx.send(exit);
            }
            None => {
                self.waiting.lock().unwrap().insert(pid, tx);
            }
        }
        ExitFuture::new(async move { rx.await.map_err(|_| Error::internal("dropped")) })
    }
}

/// A runtime whose processes are pids handed out in order; killing one makes the fake
/// spawner report its exit.
#[derive(Debug)]
struct FakeRuntime {
    spawner: Arc<FakeSpawner>,
    calls: Mutex<Vec<String>>,
    next_pid: AtomicU32,
    live: Mutex<Vec<u32>>,
    fail_create: Option<String>,
    /// Counters the runtime reports itself (as a VM's does), instead of the init's cgroup.
    own_stats: Option<Stats>,
}

impl FakeRuntime {
    fn launch(&self, pid_file: &Path, stdio: crate::runtime::ProcessStdio, output: &[u8]) -> u32 {
        let pid = self.next_pid.fetch_add(1, Ordering::SeqCst);
        std::fs::write(pid_file, pid.to_string()).unwrap();
        if let Some(out) = stdio.stdout {
            std::fs::File::from(out).write_all(output).unwrap();
        }
        self.live.lock().unwrap().push(pid);
        pid
    }

    fn kill_all(&self, status: u32) {
        for pid in self.live.lock().unwrap().drain(..) {
            self.spawner.exit(pid, status);
        }
    }
}

impl OciRuntime for FakeRuntime {
    fn create<'a>(&'a self, _id: &'a str, opts: CreateOptions) -> BoxFuture<'a, ()> {
        self.calls.lock().unwrap().push("create".into());
        Box::pin(async move {
            if let Some(msg) = &self.fail_create {
                return Err(Error::internal(msg.clone()));
            }
            self.launch(&opts.pid_file, opts.stdio, b"hello\n");
            Ok(())
        })
    }
    fn start<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, ()> {
        self.calls.lock().unwrap().push("start".into());
        Box::pin(async { Ok(()) })
    }
    fn state<'a>(&'a self, id: &'a str) -> BoxFuture<'a, RuntimeState> {
        Box::pin(async move {
            Ok(RuntimeState {
                id: id.into(),
                pid: 0,
                status: "running".into(),
            })
        })
    }
    fn kill<'a>(&'a self, _id: &'a str, signal: i32, all: bool) -> BoxFuture<'a, ()> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("kill {signal} {all}"));
        self.kill_all(128 + signal as u32);
        Box::pin(async { Ok(()) })
    }
    fn delete<'a>(&'a self, _id: &'a str, force: bool) -> BoxFuture<'a, ()> {
        self.calls.lock().unwrap().push(format!("delete {force}"));
        if force {
            self.kill_all(137);
        }
        Box::pin(async { Ok(()) })
    }
    fn exec<'a>(&'a self, _id: &'a str, opts: ExecOptions) -> BoxFuture<'a, ()> {
        self.calls.lock().unwrap().push("exec".into());
        Box::pin(async move {
            let spec: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&opts.process).unwrap()).unwrap();
            assert_eq!(spec["terminal"], false);
            self.launch(&opts.pid_file, opts.stdio, b"from exec\n");
            Ok(())
        })
    }
    fn pause<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
    fn resume<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
    fn update<'a>(&'a self, _id: &'a str, _resources: &'a [u8]) -> BoxFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
    fn ps<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Vec<u32>> {
        let live = self.live.lock().unwrap().clone();
        Box::pin(async move { Ok(live) })
    }
    fn stats<'a>(&'a self, _id: &'a str) -> Option<BoxFuture<'a, Stats>> {
        let stats = self.own_stats.clone()?;
        Some(Box::pin(async move { Ok(stats) }))
    }
}

#[derive(Debug)]
struct Factory(Arc<FakeRuntime>);

impl RuntimeFactory for Factory {
    fn runtime(&self, _settings: &RuntimeSettings, _bundle: &Path) -> Arc<dyn OciRuntime> {
        self.0.clone()
    }
}

#[derive(Debug, Default, Clone)]
struct FakeRootfs(Arc<Mutex<Vec<String>>>);

impl Rootfs for FakeRootfs {
    fn mount(&self, mounts: &[Mount], target: &Path) -> Result<()> {
        self.0
            .lock()
            .unwrap()
            .push(format!("mount {} {}", mounts.len(), target.display()));
        Ok(())
    }
    fn unmount(&self, target: &Path) -> Result<()> {
        self.0
            .lock()
            .unwrap()
            .push(format!("unmount {}", target.display()));
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Hub(Mutex<Vec<TaskEvent>>);

impl Transport for Hub {
    fn send<'a>(&'a self, event: &'a Envelope) -> BoxFuture<'a, ()> {
        self.0.lock().unwrap().push(event.event.clone());
        Box::pin(async { Ok(()) })
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    shim: Shim,
    spawner: Arc<FakeSpawner>,
    runtime: Arc<FakeRuntime>,
    rootfs: FakeRootfs,
    hub: Arc<Hub>,
}

fn fixture(terminal: bool, fail_create: Option<&str>) -> Fixture {
    fixture_with(terminal, fail_create, 4242, None)
}

fn fixture_with(
    terminal: bool,
    fail_create: Option<&str>,
    first_pid: u32,
    own_stats: Option<Stats>,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({"process": {"terminal": terminal, "args": ["sh"]}});
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let spawner = Arc::new(FakeSpawner::default());
    let runtime = Arc::new(FakeRuntime {
        spawner: spawner.clone(),
        calls: Mutex::new(Vec::new()),
        next_pid: AtomicU32::new(first_pid),
        live: Mutex::new(Vec::new()),
        fail_create: fail_create.map(str::to_string),
        own_stats,
    });
    let rootfs = FakeRootfs::default();
    let hub = Arc::new(Hub::default());
    let events = Publisher::new(PublisherConfig::default());
    events.set_transport(hub.clone());
    let mut options = ShimOptions::new("c1", dir.path());
    options.exit_drain = Duration::from_secs(1);
    let shim = Shim::new(
        options,
        spawner.clone(),
        Box::new(Factory(runtime.clone())),
        Box::new(rootfs.clone()),
        events,
    );
    Fixture {
        dir,
        shim,
        spawner,
        runtime,
        rootfs,
        hub,
    }
}

fn create_task(f: &Fixture) -> CreateTask {
    CreateTask {
        rootfs: vec![Mount::bind("/somewhere", false)],
        stdio: StdioSpec {
            mode: StdioMode::Pipes,
            stdin: false,
            size: None,
        },
        log: LogSpec {
            format: Some(LogFormat::JsonFile),
            max_file: 1,
            ..Default::default()
        },
        ..Default::default()
    }
    .with_bundle(f.dir.path())
}

impl CreateTask {
    fn with_bundle(mut self, bundle: &Path) -> Self {
        self.bundle = bundle.to_path_buf();
        self
    }
}

#[tokio::test]
async fn lifecycle_records_the_exit_before_reporting_it() {
    let f = fixture(false, None);
    let pid = f.shim.create(create_task(&f)).await.unwrap();
    assert_eq!(pid, 4242);
    assert_eq!(f.shim.state("").unwrap().status, Status::Created);
    assert_eq!(f.shim.info().task_pid, 4242);
    let waiter = tokio::spawn({
        let shim = f.shim.clone();
        async move { shim.wait("").await }
    });
    assert_eq!(f.shim.start("").await.unwrap(), 4242);
    assert_eq!(
        f.shim.start("").await.unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
    assert_eq!(
        f.shim.delete("", false).await.unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );

    f.spawner.exit(4242, 3);
    let exit = waiter.await.unwrap().unwrap();
    assert_eq!((exit.pid, exit.status), (4242, 3));
    assert_eq!(read_exit_file(f.dir.path()).unwrap(), exit);
    // The output drained into the log before the exit was reported.
    let log = std::fs::read_to_string(f.dir.path().join("container.log")).unwrap();
    assert!(
        log.contains("\"log\":\"hello\\n\",\"stream\":\"stdout\""),
        "{log}"
    );
    assert_eq!(
        f.shim.kill("", 15, false).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );

    let deleted = f.shim.delete("", false).await.unwrap();
    assert_eq!((deleted.pid, deleted.exit.unwrap().status), (4242, 3));
    assert_eq!(f.shim.state("").unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(f.shim.info().task_pid, 0);
    let rootfs = f.dir.path().join("rootfs").display().to_string();
    assert_eq!(
        *f.rootfs.0.lock().unwrap(),
        [format!("mount 1 {rootfs}"), format!("unmount {rootfs}")]
    );
    assert_eq!(
        *f.runtime.calls.lock().unwrap(),
        ["create", "start", "delete false"]
    );
    // Logs stay readable after Delete.
    let mut rx = f
        .shim
        .logs(ReadOptions {
            stdout: true,
            stderr: true,
            ..Default::default()
        })
        .unwrap();
    let batch = rx.recv().await.unwrap().unwrap();
    assert_eq!(batch[0].data, b"hello\n");

    assert!(f.shim.events().flush(Duration::from_secs(5)).await);
    let events = f.hub.0.lock().unwrap().clone();
    assert_eq!(
        events[0],
        TaskEvent::Start {
            exec_id: String::new(),
            pid: 4242
        }
    );
    assert!(
        matches!(
            events[1],
            TaskEvent::Exit {
                pid: 4242,
                status: 3,
                ..
            }
        ),
        "{events:?}"
    );
    assert_eq!(
        f.shim.create(create_task(&f)).await.unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    f.shim.shutdown(false).await.unwrap();
    assert!(f.shim.shutdown_token().is_cancelled());
}

#[tokio::test]
async fn create_with_start_runs_the_init_and_reports_start_before_exit() {
    let f = fixture(false, None);
    // The init is gone before the shim watches it (a `run` of `true`).
    f.spawner.exit(4242, 0);
    let task = CreateTask {
        start: true,
        hold_output_for: 0,
        ..create_task(&f)
    };
    assert_eq!(f.shim.create(task).await.unwrap(), 4242);
    let exit = f.shim.wait("").await.unwrap();
    assert_eq!((exit.pid, exit.status), (4242, 0));
    assert_eq!(
        f.shim.start("").await.unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
    assert_eq!(*f.runtime.calls.lock().unwrap(), ["create", "start"]);
    assert!(f.shim.events().flush(Duration::from_secs(5)).await);
    let events = f.hub.0.lock().unwrap().clone();
    assert_eq!(
        events[0],
        TaskEvent::Start {
            exec_id: String::new(),
            pid: 4242
        }
    );
    assert!(
        matches!(events[1], TaskEvent::Exit { pid: 4242, .. }),
        "{events:?}"
    );
    f.shim.delete("", false).await.unwrap();
    f.shim.shutdown(false).await.unwrap();
}

#[tokio::test]
async fn exec_processes_and_force_delete() {
    let f = fixture(false, None);
    f.shim.create(create_task(&f)).await.unwrap();
    let exec = |id: &str, spec: &[u8]| ExecTask {
        exec_id: id.into(),
        spec: spec.to_vec(),
        stdio: StdioSpec {
            mode: StdioMode::Pipes,
            stdin: false,
            size: None,
        },
    };
    let spec = br#"{"args":["echo","x"]}"#;
    f.shim.start("").await.unwrap();
    assert_eq!(
        f.shim.exec(exec("bad id", spec)).await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        f.shim.exec(exec("e1", b"{}")).await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    f.shim.exec(exec("e1", spec)).await.unwrap();
    assert_eq!(
        f.shim.exec(exec("e1", spec)).await.unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    let mut a = f
        .shim
        .attach(AttachOptions {
            exec_id: "e1".into(),
            stdout: true,
            stderr: true,
            stream: true,
            ..Default::default()
        })
        .unwrap();
    let pid = f.shim.start("e1").await.unwrap();
    assert_eq!(pid, 4243);
    let first = a.events.recv().await.unwrap();
    assert_eq!(
        first,
        AttachEvent::Output(Chunk {
            stream: crate::logger::Stream::Stdout,
            data: Bytes::from_static(b"from exec\n")
        })
    );
    let pids = f.shim.pids().await.unwrap();
    assert_eq!(pids, [(4242, String::new()), (4243, "e1".to_string())]);
    f.spawner.exit(4243, 0);
    assert_eq!(a.events.recv().await.unwrap(), AttachEvent::End(Some(0)));
    assert_eq!(f.shim.wait("e1").await.unwrap().status, 0);
    assert_eq!(
        f.shim
            .delete("e1", false)
            .await
            .unwrap()
            .exit
            .unwrap()
            .status,
        0
    );
    assert_eq!(f.shim.state("e1").unwrap_err().kind(), ErrorKind::NotFound);
    // Exec output is not logged.
    let log = std::fs::read_to_string(f.dir.path().join("container.log")).unwrap();
    assert!(!log.contains("from exec"));

    assert_eq!(
        f.shim.shutdown(false).await.unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
    let deleted = f.shim.delete("", true).await.unwrap();
    assert_eq!(deleted.exit.unwrap().status, 137);
    f.shim.shutdown(false).await.unwrap();
}

#[tokio::test]
async fn a_failed_create_leaves_nothing_behind() {
    let f = fixture(false, Some("runc create: exec: \"nope\": not found"));
    let err = f.shim.create(create_task(&f)).await.unwrap_err();
    assert_eq!(err.message(), "runc create: exec: \"nope\": not found");
    assert_eq!(f.shim.state("").unwrap_err().kind(), ErrorKind::NotFound);
    let rootfs = f.dir.path().join("rootfs").display().to_string();
    assert_eq!(
        *f.rootfs.0.lock().unwrap(),
        [format!("mount 1 {rootfs}"), format!("unmount {rootfs}")]
    );
    // A forced delete cleans up anything the runtime may have half-made.
    assert_eq!(*f.runtime.calls.lock().unwrap(), ["create", "delete true"]);
}

#[tokio::test]
async fn create_checks_the_bundle() {
    let f = fixture(true, None);
    // config.json says terminal, the request says pipes.
    let err = f.shim.create(create_task(&f)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let mut other = create_task(&f);
    other.id = "c2".into();
    assert_eq!(
        f.shim.create(other).await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    std::fs::remove_file(f.dir.path().join("config.json")).unwrap();
    let mut tty = create_task(&f);
    tty.stdio.mode = StdioMode::Tty;
    assert_eq!(
        f.shim.create(tty).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert!(
        f.rootfs.0.lock().unwrap().is_empty(),
        "nothing mounted for a bad request"
    );
}

#[test]
fn exec_specs_get_terminal_settings() {
    let tty = StdioSpec {
        mode: StdioMode::Tty,
        stdin: true,
        size: Some((80, 24)),
    };
    let out = exec_process_json(br#"{"args":["sh"],"terminal":false}"#, tty).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["terminal"], true);
    assert_eq!(
        v["consoleSize"],
        serde_json::json!({"width": 80, "height": 24})
    );
    assert_eq!(v["cwd"], "/");
    assert_eq!(v["user"]["uid"], 0);
    assert!(exec_process_json(br#"{"args":[]}"#, tty).is_err());
    assert!(exec_process_json(b"[1]", tty).is_err());
}

/// Waits (polling) until `f` holds; panics after a generous limit.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never: {what}");
}

#[tokio::test]
async fn healthchecks_probe_through_exec_and_stop_with_the_init() {
    use crate::health::HealthStatus::{Healthy, Starting, Unhealthy};
    use crate::health::{HealthConfig, HealthState};

    let f = fixture(false, None);
    let task = CreateTask {
        health: Some(HealthConfig {
            command: vec!["check".into()],
            interval: Duration::from_millis(20),
            retries: 1,
            ..Default::default()
        }),
        ..create_task(&f)
    };
    f.shim.create(task).await.unwrap();
    let h = f.shim.health().unwrap();
    assert_eq!(
        (h.pid, h.log.len()),
        (0, 0),
        "nothing runs before the start"
    );
    f.shim.start("").await.unwrap();
    assert_eq!(f.shim.health().unwrap().status, Starting);

    // The first probe is an exec through the runtime (native exec does not apply to this
    // bundle); it passes.
    until("a probe", || f.runtime.live.lock().unwrap().len() == 2).await;
    let probe = f.runtime.live.lock().unwrap()[1];
    f.spawner.exit(probe, 0);
    until("healthy", || f.shim.health().unwrap().status == Healthy).await;
    let h = f.shim.health().unwrap();
    assert_eq!((h.pid, h.failing_streak), (4242, 0));
    assert_eq!(h.log[0].output, "from exec\n");
    assert_eq!(HealthState::load(f.dir.path()), Some(h));
    // Probes are no exec processes anyone sees.
    assert_eq!(
        f.shim
            .pids()
            .await
            .unwrap()
            .iter()
            .filter(|p| !p.1.is_empty())
            .count(),
        0
    );

    // The next one fails: unhealthy after one retry.
    until("a second probe", || {
        f.runtime.live.lock().unwrap().len() == 3
    })
    .await;
    let probe = f.runtime.live.lock().unwrap()[2];
    f.spawner.exit(probe, 1);
    until("unhealthy", || f.shim.health().unwrap().status == Unhealthy).await;

    // The init exits: the probes stop (the one running is abandoned) and the final state is
    // published.
    f.shim.kill("", 9, false).await.unwrap();
    f.shim.wait("").await.unwrap();
    assert!(f.shim.events().flush(Duration::from_secs(5)).await);
    until("the final health event", || {
        f.hub
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, TaskEvent::Health { changed: false, .. }))
    })
    .await;
    let events = f.hub.0.lock().unwrap().clone();
    let health: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            TaskEvent::Health { state, changed } => Some((state.status, *changed)),
            _ => None,
        })
        .collect();
    assert_eq!(
        health,
        [(Healthy, true), (Unhealthy, true), (Unhealthy, false)]
    );
    assert!(
        !events.iter().any(|e| matches!(
            e,
            TaskEvent::ExecAdded { .. } | TaskEvent::ExecStarted { .. }
        )),
        "{events:?}"
    );
    f.shim.delete("", false).await.unwrap();
    assert_eq!(f.shim.health().unwrap().status, Unhealthy);
    f.shim.shutdown(false).await.unwrap();
}

/// The init is this test process, whose cgroup is real: the shim reads and watches it, unless
/// the runtime reports stats itself (a VM, whose init on the host is a relay in the shim's own
/// cgroup), and then neither reads nor watches it for OOM kills.
#[tokio::test]
async fn stats_come_from_the_runtime_that_reads_them_itself() {
    let me = std::process::id();
    if Cgroup::for_pid(me).is_err() {
        eprintln!("skipped: no cgroup hierarchy");
        return;
    }
    let has_oom_watch = |f: &Fixture| {
        let st = f.shim.inner.state.lock().unwrap();
        st.container.as_ref().unwrap().oom.is_some()
    };

    let f = fixture_with(false, None, me, None);
    f.shim.create(create_task(&f)).await.unwrap();
    assert!(has_oom_watch(&f));
    assert_eq!(
        f.shim.stats().await.unwrap().version,
        Cgroup::for_pid(me).unwrap().version()
    );
    f.shim.delete("", true).await.unwrap();

    let own = Stats {
        read: SystemTime::UNIX_EPOCH + Duration::from_secs(7),
        version: crate::cgroup::Version::V2,
        cpu: Default::default(),
        memory: crate::cgroup::MemoryStats {
            usage: 4096,
            limit: 200 << 20,
            ..Default::default()
        },
        pids_current: 2,
        pids_limit: 0,
        blkio: Default::default(),
    };
    let f = fixture_with(false, None, me, Some(own.clone()));
    f.shim.create(create_task(&f)).await.unwrap();
    assert!(
        !has_oom_watch(&f),
        "the init's host cgroup is not the container's"
    );
    assert_eq!(f.shim.stats().await.unwrap(), own);
    f.shim.delete("", true).await.unwrap();
    assert_eq!(
        f.shim.stats().await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}
