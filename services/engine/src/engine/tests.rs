//! Record and lifecycle logic against fakes of every seam: no root, no other services.
//!
//! The fake shim runs "processes" whose behaviour the command chooses: `exit <code>` exits at
//! once with that code, `sleep` runs until a signal (128 + signal), `stubborn` ignores SIGTERM.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use berth_core::mount::Mount;
use berth_core::snapshots::Labels;
use berth_core::{Config, Error, ErrorKind, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::events::v1::{self as evpb, EventType};
use berth_proto::berth::images::v1 as images;
use berth_proto::berth::network::v1 as net;
use berth_proto::berth::shim::v1 as shimpb;
use berth_proto::berth::types::v1 as types;
use berth_proto::prost_types::Timestamp;
use futures::StreamExt;
use tokio::sync::watch;

use super::{Engine, now};
use crate::deps::*;
use crate::events::EventFilter;
use crate::spec::HostInfo;

// ---------------------------------------------------------------------------------------------
// Fakes

struct FakeImages {
    rootfs: PathBuf,
    users: Mutex<Vec<(String, String)>>,
}

impl Images for FakeImages {
    fn resolve(
        &self,
        reference: &str,
        _: Option<types::Platform>,
        snapshotter: &str,
        _host_ids: bool,
    ) -> BoxFuture<'_, images::ResolveImageResponse> {
        let reference = reference.to_string();
        let snapshotter = snapshotter.to_string();
        Box::pin(async move {
            if reference == "missing" {
                return Err(Error::not_found("image not found"));
            }
            let volumes = if reference == "withvolume" {
                r#","Volumes":{"/data":{}}"#
            } else {
                ""
            };
            let config = format!(
                r#"{{"config":{{"Env":["PATH=/bin","FROM_IMAGE=1"],"Cmd":["sh"],"WorkingDir":"/srv","Labels":{{"img":"yes"}}{volumes}}}}}"#
            );
            let _ = &self.rootfs;
            Ok(images::ResolveImageResponse {
                image_id: "sha256:1111".into(),
                reference: reference.clone(),
                chain_id: "sha256:chain".into(),
                config: config.into_bytes(),
                platform: None,
                snapshotter,
                target: None,
                snapshot_key: String::new(),
            })
        })
    }
    fn add_user(&self, image_id: &str, container_id: &str) -> BoxFuture<'_, ()> {
        self.users
            .lock()
            .unwrap()
            .push((image_id.into(), container_id.into()));
        Box::pin(async { Ok(()) })
    }
    fn remove_user(&self, _: &str, container_id: &str) -> BoxFuture<'_, ()> {
        self.users
            .lock()
            .unwrap()
            .retain(|(_, c)| c != container_id);
        Box::pin(async { Ok(()) })
    }
    fn set_users(&self, users: Vec<(String, String)>) -> BoxFuture<'_, ()> {
        *self.users.lock().unwrap() = users;
        Box::pin(async { Ok(()) })
    }
}

struct FakeSnapshots {
    rootfs: PathBuf,
    keys: Mutex<Vec<String>>,
}

impl Snapshots for FakeSnapshots {
    fn prepare(&self, key: &str, parent: &str, labels: Labels) -> BoxFuture<'_, Vec<Mount>> {
        assert_eq!(parent, "sha256:chain");
        assert!(labels.contains_key(super::create::GC_ROOT_LABEL));
        let mut keys = self.keys.lock().unwrap();
        if keys.iter().any(|k| k == key) {
            return Box::pin(async { Err(Error::already_exists("snapshot exists")) });
        }
        keys.push(key.into());
        let m = vec![Mount::bind(self.rootfs.display().to_string(), false)];
        Box::pin(async move { Ok(m) })
    }
    fn mounts(&self, _: &str) -> BoxFuture<'_, Vec<Mount>> {
        let m = vec![Mount::bind(self.rootfs.display().to_string(), false)];
        Box::pin(async move { Ok(m) })
    }
    fn remove(&self, key: &str) -> BoxFuture<'_, ()> {
        self.keys.lock().unwrap().retain(|k| k != key);
        Box::pin(async { Ok(()) })
    }
    fn usage(&self, _: &str) -> BoxFuture<'_, i64> {
        Box::pin(async { Ok(4096) })
    }
}

#[derive(Default)]
struct FakeNetworks {
    attached: Mutex<Vec<String>>,
    /// Sandbox ids with a CNI attachment.
    cni: Mutex<Vec<String>>,
}

impl Networks for FakeNetworks {
    fn attach(&self, req: net::AttachRequest) -> BoxFuture<'_, net::Attachment> {
        self.attached.lock().unwrap().push(req.container_id.clone());
        Box::pin(async move {
            Ok(net::Attachment {
                container_id: req.container_id,
                network_id: "n".repeat(64),
                network_name: "bridge".into(),
                interface_name: "eth0".into(),
                ipv4_address: "10.9.0.2".into(),
                ipv4_prefix_len: 24,
                ipv4_gateway: "10.9.0.1".into(),
                hosts: vec![types::HostEntry {
                    ip: "10.9.0.2".into(),
                    hostnames: vec![req.hostname],
                }],
                default_route: true,
                ..Default::default()
            })
        })
    }
    fn detach(&self, container_id: &str, _: &str, _: bool) -> BoxFuture<'_, ()> {
        self.attached.lock().unwrap().retain(|c| c != container_id);
        Box::pin(async { Ok(()) })
    }
    fn get(&self, network: &str) -> BoxFuture<'_, (String, String)> {
        let n = network.to_string();
        Box::pin(async move { Ok(("n".repeat(64), n)) })
    }
    fn cni_attach(&self, req: net::CniAttachRequest) -> BoxFuture<'_, net::CniAttachResponse> {
        Box::pin(async move {
            if req.config_name == "missing" {
                return Err(Error::not_found("no CNI network config named \"missing\""));
            }
            self.cni.lock().unwrap().push(req.container_id);
            Ok(net::CniAttachResponse {
                ips: vec![net::CniIpConfig {
                    address: "10.88.0.5/16".into(),
                    gateway: "10.88.0.1".into(),
                    interface: 0,
                }],
                result: b"{}".to_vec(),
                ..Default::default()
            })
        })
    }
    fn cni_detach(&self, container_id: &str, _: &str) -> BoxFuture<'_, ()> {
        self.cni.lock().unwrap().retain(|c| c != container_id);
        Box::pin(async { Ok(()) })
    }
}

/// Pod namespaces as entries in a list.
#[derive(Default)]
struct FakePodNs {
    live: Mutex<Vec<PathBuf>>,
}

impl PodNamespaces for FakePodNs {
    fn create(&self, dir: &Path, want: PodNsWant, _hostname: &str) -> Result<PodNsPaths> {
        let mut live = self.live.lock().unwrap();
        let mut make = |on: bool, k: &str| {
            on.then(|| {
                live.push(dir.join(k));
                dir.join(k)
            })
        };
        Ok(PodNsPaths {
            net: make(want.net, "net"),
            ipc: make(want.ipc, "ipc"),
            uts: make(want.uts, "uts"),
            shm: make(want.ipc, "shm"),
        })
    }
    fn start_pid_holder(&self, dir: &Path) -> Result<(u32, PathBuf)> {
        self.live.lock().unwrap().push(dir.join("pid"));
        Ok((4242, dir.join("pid")))
    }
    fn holder_alive(&self, _pid: u32, ns_file: &Path) -> bool {
        self.ns_alive(ns_file)
    }
    fn stop_pid_holder(&self, _pid: u32, ns_file: &Path) {
        self.live.lock().unwrap().retain(|p| p != ns_file);
    }
    fn ns_alive(&self, path: &Path) -> bool {
        self.live.lock().unwrap().iter().any(|p| p == path)
    }
    fn remove(&self, dir: &Path) -> Result<()> {
        self.live.lock().unwrap().retain(|p| !p.starts_with(dir));
        Ok(())
    }
}

#[derive(Default)]
struct FakeNetns {
    live: Mutex<Vec<PathBuf>>,
}

impl Netns for FakeNetns {
    fn create<'a>(
        &'a self,
        id: &'a str,
        _userns: Option<&'a berth_core::userns::IdMap>,
    ) -> BoxFuture<'a, PathBuf> {
        let p = PathBuf::from(format!("/fake/netns/{id}"));
        self.live.lock().unwrap().push(p.clone());
        Box::pin(async move { Ok(p) })
    }
    fn remove(&self, path: &Path) -> Result<()> {
        self.live.lock().unwrap().retain(|p| p != path);
        Ok(())
    }
}

/// One fake task.
struct FakeShim {
    bundle: PathBuf,
    pid: u32,
    args: Mutex<Vec<String>>,
    started: Mutex<bool>,
    exit: watch::Sender<Option<(u32, Timestamp)>>,
    shut_down: Mutex<bool>,
    stats_calls: std::sync::atomic::AtomicUsize,
}

impl FakeShim {
    fn exit_with(&self, code: u32) {
        self.exit.send_if_modified(|e| {
            if e.is_none() {
                *e = Some((code, now()));
                true
            } else {
                false
            }
        });
    }
}

impl Shim for FakeShim {
    fn create(&self, req: shimpb::CreateRequest) -> BoxFuture<'_, u32> {
        let spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.bundle.join("config.json")).unwrap())
                .unwrap();
        *self.args.lock().unwrap() =
            serde_json::from_value(spec["process"]["args"].clone()).unwrap();
        assert!(!req.rootfs.is_empty());
        if req.start {
            // Created and started at once, as the real shim does with `runc run`.
            return self.start("");
        }
        let pid = self.pid;
        Box::pin(async move { Ok(pid) })
    }
    fn start(&self, exec_id: &str) -> BoxFuture<'_, u32> {
        assert_eq!(exec_id, "");
        *self.started.lock().unwrap() = true;
        let args = self.args.lock().unwrap().clone();
        if args.first().map(String::as_str) == Some("exit") {
            self.exit_with(args[1].parse().unwrap());
        }
        if args.first().map(String::as_str) == Some("nosuchbinary") {
            return Box::pin(async {
                Err(Error::internal(
                    "exec: \"nosuchbinary\": executable file not found in $PATH",
                ))
            });
        }
        let pid = self.pid;
        Box::pin(async move { Ok(pid) })
    }
    fn state(&self, _: &str) -> BoxFuture<'_, shimpb::StateResponse> {
        let e = *self.exit.borrow();
        let pid = self.pid;
        Box::pin(async move {
            Ok(shimpb::StateResponse {
                pid,
                status: if e.is_some() {
                    shimpb::TaskStatus::Stopped
                } else {
                    shimpb::TaskStatus::Running
                }
                .into(),
                exit_status: e.map(|e| e.0).unwrap_or(0),
                exited_at: e.map(|e| e.1),
                ..Default::default()
            })
        })
    }
    fn kill(&self, _: &str, signal: u32, _: bool) -> BoxFuture<'_, ()> {
        let stubborn = self.args.lock().unwrap().first().map(String::as_str) == Some("stubborn");
        if !(stubborn && signal == 15) {
            self.exit_with(128 + signal);
        }
        Box::pin(async { Ok(()) })
    }
    fn wait(&self, _: &str) -> BoxFuture<'_, shimpb::WaitResponse> {
        let mut rx = self.exit.subscribe();
        Box::pin(async move {
            let e = *rx.wait_for(|e| e.is_some()).await.unwrap();
            let (exit_status, at) = e.unwrap();
            Ok(shimpb::WaitResponse {
                exit_status,
                exited_at: Some(at),
            })
        })
    }
    fn delete(&self, _: &str, _: bool) -> BoxFuture<'_, shimpb::DeleteResponse> {
        Box::pin(async { Ok(shimpb::DeleteResponse::default()) })
    }
    fn exec(&self, _: shimpb::ExecRequest) -> BoxFuture<'_, ()> {
        Box::pin(async { Err(Error::unimplemented("fake")) })
    }
    fn resize(&self, _: &str, _: types::TerminalSize) -> BoxFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn close_stdin(&self, _: &str) -> BoxFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn attach(
        &self,
        _: BoxStream<shimpb::AttachRequest>,
    ) -> BoxFuture<'_, BoxStream<shimpb::AttachResponse>> {
        use shimpb::attach_response::Event;
        let mut rx = self.exit.subscribe();
        Box::pin(async move {
            let ready = futures::stream::iter([Ok(shimpb::AttachResponse {
                event: Some(Event::Ready(shimpb::AttachReady { terminal: false })),
            })]);
            let rest = futures::stream::once(async move {
                let e = *rx.wait_for(|e| e.is_some()).await.unwrap();
                Ok(shimpb::AttachResponse {
                    event: Some(Event::Output(types::OutputChunk {
                        stream: types::OutputStream::Stdout.into(),
                        data: format!("bye {}\n", e.unwrap().0).into_bytes(),
                    })),
                })
            })
            .chain(futures::stream::iter([Ok(shimpb::AttachResponse {
                event: Some(Event::End(shimpb::AttachEnd { exit_status: None })),
            })]));
            let s: BoxStream<shimpb::AttachResponse> = Box::pin(ready.chain(rest));
            Ok(s)
        })
    }
    fn logs(&self, _: shimpb::LogsRequest) -> BoxFuture<'_, BoxStream<shimpb::LogsResponse>> {
        Box::pin(async { Err(Error::unimplemented("fake")) })
    }
    fn pids(&self) -> BoxFuture<'_, Vec<shimpb::ProcessInfo>> {
        let pid = self.pid;
        Box::pin(async move {
            Ok(vec![shimpb::ProcessInfo {
                pid,
                exec_id: String::new(),
            }])
        })
    }
    fn pause(&self) -> BoxFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn resume(&self) -> BoxFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn update(&self, _: Vec<u8>) -> BoxFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn stats(&self) -> BoxFuture<'_, types::CgroupStats> {
        self.stats_calls
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async { Ok(types::CgroupStats::default()) })
    }
    fn info(&self) -> BoxFuture<'_, shimpb::InfoResponse> {
        Box::pin(async { Ok(shimpb::InfoResponse::default()) })
    }
    fn shutdown(&self, _: bool) -> BoxFuture<'_, ()> {
        *self.shut_down.lock().unwrap() = true;
        Box::pin(async { Ok(()) })
    }
}

#[derive(Default)]
struct FakeLauncher {
    shims: Mutex<HashMap<String, Arc<FakeShim>>>,
    /// Shims that "died": their cleanup reports this status.
    dead: Mutex<HashMap<String, u32>>,
    next_pid: Mutex<u32>,
    spawns: Mutex<u32>,
}

impl FakeLauncher {
    fn shim(&self, id: &str) -> Arc<FakeShim> {
        self.shims.lock().unwrap()[id].clone()
    }
}

impl ShimLauncher for FakeLauncher {
    fn spawn<'a>(
        &'a self,
        id: &'a str,
        bundle: &'a Path,
        _: &'a str,
    ) -> BoxFuture<'a, Arc<dyn Shim>> {
        let mut pid = self.next_pid.lock().unwrap();
        *pid += 1;
        *self.spawns.lock().unwrap() += 1;
        let shim = Arc::new(FakeShim {
            bundle: bundle.to_path_buf(),
            pid: 1000 + *pid,
            args: Mutex::new(Vec::new()),
            started: Mutex::new(false),
            exit: watch::Sender::new(None),
            shut_down: Mutex::new(false),
            stats_calls: Default::default(),
        });
        self.shims
            .lock()
            .unwrap()
            .insert(id.to_string(), shim.clone());
        Box::pin(async move { Ok(shim as Arc<dyn Shim>) })
    }
    fn connect<'a>(&'a self, id: &'a str, _: &'a Path) -> BoxFuture<'a, Option<Arc<dyn Shim>>> {
        let s = self
            .shims
            .lock()
            .unwrap()
            .get(id)
            .filter(|s| !*s.shut_down.lock().unwrap())
            .cloned();
        Box::pin(async move { Ok(s.map(|s| s as Arc<dyn Shim>)) })
    }
    fn cleanup<'a>(&'a self, id: &'a str, _: &'a Path) -> BoxFuture<'a, DeadExit> {
        let status = self.dead.lock().unwrap().remove(id).unwrap_or(255);
        Box::pin(async move {
            Ok(DeadExit {
                status,
                exited_at: Some(SystemTime::now()),
            })
        })
    }
    fn list(&self) -> Vec<String> {
        Vec::new()
    }
}

struct Kit {
    _dir: tempfile::TempDir,
    config: Config,
    images: Arc<FakeImages>,
    snapshots: Arc<FakeSnapshots>,
    networks: Arc<FakeNetworks>,
    netns: Arc<FakeNetns>,
    shims: Arc<FakeLauncher>,
    pod_ns: Arc<FakePodNs>,
}

impl Kit {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\npostgres:x:70:70::/var/lib/postgresql:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(rootfs.join("etc/group"), "root:x:0:\npostgres:x:70:\n").unwrap();
        let config = Config {
            root: dir.path().join("root"),
            state_dir: dir.path().join("state"),
            ..Config::default()
        };
        Self {
            images: Arc::new(FakeImages {
                rootfs: rootfs.clone(),
                users: Mutex::new(Vec::new()),
            }),
            snapshots: Arc::new(FakeSnapshots {
                rootfs,
                keys: Mutex::new(Vec::new()),
            }),
            networks: Arc::new(FakeNetworks::default()),
            netns: Arc::new(FakeNetns::default()),
            shims: Arc::new(FakeLauncher::default()),
            pod_ns: Arc::new(FakePodNs::default()),
            config,
            _dir: dir,
        }
    }

    fn engine(&self) -> Arc<Engine> {
        let deps = Deps {
            images: self.images.clone(),
            snapshots: self.snapshots.clone(),
            networks: self.networks.clone(),
            netns: self.netns.clone(),
            shims: self.shims.clone(),
            pod_ns: self.pod_ns.clone(),
        };
        let host = HostInfo {
            ncpu: 2,
            ..HostInfo::default()
        };
        Engine::open(self.config.clone(), deps, host).unwrap()
    }
}

fn create_req(name: &str, cmd: &[&str]) -> pb::CreateContainerRequest {
    pb::CreateContainerRequest {
        name: name.into(),
        config: Some(pb::ContainerConfig {
            image: "busybox".into(),
            cmd: Some(types::StringList {
                values: cmd.iter().map(|s| s.to_string()).collect(),
            }),
            labels: [("team".to_string(), "a".to_string())].into(),
            ..Default::default()
        }),
        host_config: Some(pb::HostConfig::default()),
        ..Default::default()
    }
}

fn events_of(engine: &Arc<Engine>, since: SystemTime) -> crate::events::Subscription {
    engine
        .hub
        .subscribe(EventFilter::new(&[], "default").unwrap(), Some(since), None)
}

async fn next_action(sub: &mut crate::events::Subscription) -> String {
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("an event in time")
        .unwrap()
        .action
        .clone()
}

async fn wait_status(engine: &Arc<Engine>, id: &str, want: pb::ContainerStatus) {
    for _ in 0..500 {
        if engine.get(id).unwrap().with(|r| r.status()) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{id} never became {want:?}: {:?}",
        engine.get(id).unwrap().with(|r| r.status())
    );
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn create_merges_the_image_and_records_everything() {
    let kit = Kit::new();
    let engine = kit.engine();
    let t0 = SystemTime::now();
    let mut ev = events_of(&engine, t0);
    let (c, _) = engine
        .create(create_req("web", &["echo", "hi"]), "default")
        .await
        .unwrap();
    assert!(berth_core::Id::is_valid(&c.id));
    assert_eq!(c.name, "web");
    assert_eq!(c.image_id, "sha256:1111");
    let cfg = c.config.as_ref().unwrap();
    assert_eq!(cfg.working_dir, "/srv");
    assert_eq!(cfg.env, ["PATH=/bin", "FROM_IMAGE=1"]);
    assert_eq!(cfg.labels["img"], "yes");
    assert_eq!(cfg.hostname, c.id[..12]);
    assert_eq!(
        c.state.as_ref().unwrap().status(),
        pb::ContainerStatus::Created
    );
    assert!(c.log_path.ends_with(&format!("{}-json.log", c.id)));
    assert_eq!(c.networks.keys().collect::<Vec<_>>(), ["bridge"]);
    assert_eq!(next_action(&mut ev).await, "create");
    assert_eq!(kit.images.users.lock().unwrap().len(), 1);

    // Resolution by name, id and prefix.
    assert_eq!(engine.get("web").unwrap().id, c.id);
    assert_eq!(engine.get("/web").unwrap().id, c.id);
    assert_eq!(engine.get(&c.id[..8]).unwrap().id, c.id);
    let err = engine.get("nope").unwrap_err();
    assert_eq!(
        (err.kind(), err.message()),
        (ErrorKind::NotFound, "No such container: nope")
    );

    // A taken name.
    let err = engine
        .create(create_req("web", &["x"]), "default")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert_eq!(
        err.message(),
        format!(
            "Conflict. The container name \"/web\" is already in use by container \"{}\". You have to remove (or rename) that container to be able to reuse that name.",
            c.id
        )
    );
    // A generated name; a missing image; bad input.
    let (g, _) = engine
        .create(create_req("", &["x"]), "default")
        .await
        .unwrap();
    assert!(g.name.contains('_'), "{}", g.name);
    let mut missing = create_req("mm", &["x"]);
    missing.config.as_mut().unwrap().image = "missing".into();
    let err = engine.create(missing, "default").await.unwrap_err();
    assert_eq!(
        (err.kind(), err.message()),
        (ErrorKind::NotFound, "No such image: missing")
    );
    assert!(
        engine.get("mm").is_err(),
        "the name is released after a failed create"
    );
    let mut bad = create_req("bad", &["x"]);
    bad.host_config.as_mut().unwrap().auto_remove = true;
    bad.host_config.as_mut().unwrap().restart_policy = Some(pb::RestartPolicy {
        name: pb::RestartPolicyName::Always.into(),
        max_retries: 0,
    });
    assert_eq!(
        engine.create(bad, "default").await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    // Records survive a restart of the engine.
    drop(engine);
    let engine = kit.engine();
    assert_eq!(engine.get("web").unwrap().record().c, c);
}

#[tokio::test]
async fn start_wait_exit_and_cleanup() {
    let kit = Kit::new();
    let engine = kit.engine();
    let (c, _) = engine
        .create(create_req("job", &["exit", "3"]), "default")
        .await
        .unwrap();
    let t0 = SystemTime::now();
    let mut ev = events_of(&engine, t0);
    // Registered before start: the next exit.
    let (_, wait) = engine.wait("job", pb::WaitCondition::NextExit).unwrap();
    let (pid, already) = engine.start("job").await.unwrap();
    assert!(pid > 1000 && !already);
    let (code, err, at) = tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .unwrap();
    assert_eq!((code, err.as_str()), (3, ""));
    assert!(at.is_some());
    assert_eq!(next_action(&mut ev).await, "start");
    assert_eq!(next_action(&mut ev).await, "die");
    wait_status(&engine, "job", pb::ContainerStatus::Exited).await;
    // Phase two released the task.
    for _ in 0..200 {
        if !engine.get("job").unwrap().with(|r| r.p.has_task) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rec = engine.get("job").unwrap().record();
    assert!(!rec.p.has_task && rec.p.netns.is_none());
    assert_eq!(rec.state().exit_code, 3);
    assert!(kit.netns.live.lock().unwrap().is_empty());
    assert!(kit.networks.attached.lock().unwrap().is_empty());
    assert!(*kit.shims.shim(&c.id).shut_down.lock().unwrap());
    // The network files were written.
    let hosts = std::fs::read_to_string(&rec.c.hosts_path).unwrap();
    assert!(
        hosts.contains(&format!("10.9.0.2\t{}", &c.id[..12])),
        "{hosts}"
    );
    // NOT_RUNNING answers at once for an exited container.
    let (_, wait) = engine.wait("job", pb::WaitCondition::NotRunning).unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(1), wait)
            .await
            .unwrap()
            .0,
        3
    );
}

#[tokio::test]
async fn a_failed_start_reports_docker_exit_codes_to_waiters() {
    let kit = Kit::new();
    let engine = kit.engine();
    engine
        .create(create_req("bad", &["nosuchbinary"]), "default")
        .await
        .unwrap();
    let (_, wait) = engine.wait("bad", pb::WaitCondition::NextExit).unwrap();
    let err = engine.start("bad").await.unwrap_err();
    assert!(
        err.chain().contains("executable file not found"),
        "{}",
        err.chain()
    );
    let (code, msg, _) = tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .unwrap();
    assert_eq!(code, 127);
    assert!(msg.contains("executable file not found"));
    let rec = engine.get("bad").unwrap().record();
    assert_eq!(rec.status(), pb::ContainerStatus::Exited);
    assert!(!rec.p.has_task);
}

#[tokio::test]
async fn stop_escalates_to_sigkill_and_delete_needs_force() {
    let kit = Kit::new();
    let engine = kit.engine();
    engine
        .create(create_req("ss", &["stubborn"]), "default")
        .await
        .unwrap();
    engine.start("ss").await.unwrap();
    let err = engine.delete("ss", false, false).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(
        err.message()
            .starts_with("You cannot remove a running container")
    );
    let t = std::time::Instant::now();
    let already = engine.stop("ss", "", Some(1)).await.unwrap();
    assert!(!already);
    assert!(t.elapsed() >= Duration::from_secs(1));
    let rec = engine.get("ss").unwrap().record();
    assert_eq!(rec.state().exit_code, 137);
    assert!(rec.state().manually_stopped);
    assert!(
        engine.stop("ss", "", Some(1)).await.unwrap(),
        "already stopped"
    );
    let err = engine.kill("ss", "").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);

    // Force removal of a running container.
    let (c, _) = engine
        .create(create_req("ff", &["sleep"]), "default")
        .await
        .unwrap();
    engine.start("ff").await.unwrap();
    let (_, removed) = engine.wait("ff", pb::WaitCondition::Removed).unwrap();
    let mut ev = events_of(&engine, SystemTime::now());
    engine.delete("ff", true, true).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), removed)
        .await
        .unwrap();
    let mut actions = Vec::new();
    for _ in 0..3 {
        actions.push(next_action(&mut ev).await);
    }
    assert_eq!(actions, ["kill", "die", "destroy"]);
    assert_eq!(engine.get(&c.id).unwrap_err().kind(), ErrorKind::NotFound);
    assert!(!kit.snapshots.keys.lock().unwrap().contains(&c.id));
    assert!(
        kit.images
            .users
            .lock()
            .unwrap()
            .iter()
            .all(|(_, id)| *id != c.id)
    );
}

#[tokio::test]
async fn on_failure_restarts_with_backoff_until_the_maximum() {
    let kit = Kit::new();
    let engine = kit.engine();
    let mut req = create_req("flaky", &["exit", "1"]);
    req.host_config.as_mut().unwrap().restart_policy = Some(pb::RestartPolicy {
        name: pb::RestartPolicyName::OnFailure.into(),
        max_retries: 2,
    });
    engine.create(req, "default").await.unwrap();
    let mut ev = engine.hub.subscribe(
        EventFilter::new(
            &[types::Filter {
                key: "event".into(),
                value: "die".into(),
            }],
            "default",
        )
        .unwrap(),
        Some(SystemTime::now()),
        None,
    );
    let t = std::time::Instant::now();
    engine.start("flaky").await.unwrap();
    for _ in 0..3 {
        assert_eq!(next_action(&mut ev).await, "die");
    }
    // 100 ms, then 200 ms of backoff.
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let rec = engine.get("flaky").unwrap().record();
    assert_eq!(rec.status(), pb::ContainerStatus::Exited);
    assert_eq!(rec.state().restart_count, 2);
    assert_eq!(*kit.shims.spawns.lock().unwrap(), 3);
    // A manual start resets the count.
    engine.start("flaky").await.unwrap();
    assert_eq!(
        engine.get("flaky").unwrap().record().state().restart_count,
        0
    );
}

#[tokio::test]
async fn always_restarts_until_stopped_and_auto_remove_removes() {
    let kit = Kit::new();
    let engine = kit.engine();
    let mut req = create_req("aa", &["exit", "0"]);
    req.host_config.as_mut().unwrap().restart_policy = Some(pb::RestartPolicy {
        name: pb::RestartPolicyName::Always.into(),
        max_retries: 0,
    });
    engine.create(req, "default").await.unwrap();
    engine.start("aa").await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(*kit.shims.spawns.lock().unwrap() >= 2);
    engine.stop("aa", "", Some(1)).await.unwrap();
    let n = *kit.shims.spawns.lock().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        *kit.shims.spawns.lock().unwrap(),
        n,
        "no restart after a stop"
    );
    assert_eq!(
        engine.get("aa").unwrap().with(|r| r.status()),
        pb::ContainerStatus::Exited
    );

    let mut req = create_req("rm", &["exit", "0"]);
    req.host_config.as_mut().unwrap().auto_remove = true;
    engine.create(req, "default").await.unwrap();
    let (_, removed) = engine.wait("rm", pb::WaitCondition::Removed).unwrap();
    engine.start("rm").await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), removed)
        .await
        .unwrap();
    assert!(engine.get("rm").is_err());
}

#[tokio::test]
async fn recovery_reconnects_live_shims_and_picks_up_exits() {
    let kit = Kit::new();
    let engine = kit.engine();
    let mut ids = Vec::new();
    for name in ["live", "exited", "gone"] {
        let (c, _) = engine
            .create(create_req(name, &["sleep"]), "default")
            .await
            .unwrap();
        engine.start(name).await.unwrap();
        ids.push(c.id);
    }
    // The engine goes away (its tasks stop; containers keep running in the fake shims).
    engine.shutdown.cancel();
    // Background tasks notice the shutdown and let go of the engine (and its database).
    for _ in 0..100 {
        if Arc::strong_count(&engine) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(Arc::strong_count(&engine), 1);
    drop(engine);
    // While it is down: one task exits, one shim dies with its exit file saying 7.
    kit.shims.shim(&ids[1]).exit_with(42);
    *kit.shims.shim(&ids[2]).shut_down.lock().unwrap() = true;
    kit.shims.dead.lock().unwrap().insert(ids[2].clone(), 7);

    let engine = kit.engine();
    let t0 = SystemTime::now();
    let mut ev = engine.hub.subscribe(
        EventFilter::new(
            &[types::Filter {
                key: "event".into(),
                value: "die".into(),
            }],
            "default",
        )
        .unwrap(),
        Some(t0 - Duration::from_secs(1)),
        None,
    );
    let r = engine.recover().await.unwrap();
    assert_eq!((r.reconnected, r.exited), (1, 2));
    let mut codes = BTreeMap::new();
    for _ in 0..2 {
        let e = tokio::time::timeout(Duration::from_secs(5), ev.next())
            .await
            .unwrap()
            .unwrap();
        let a = e.actor.as_ref().unwrap();
        codes.insert(
            a.attributes["name"].clone(),
            a.attributes["exitCode"].clone(),
        );
    }
    assert_eq!(codes["exited"], "42");
    assert_eq!(codes["gone"], "7");
    assert_eq!(
        engine.get("live").unwrap().with(|r| r.status()),
        pb::ContainerStatus::Running
    );
    assert_eq!(engine.get("exited").unwrap().record().state().exit_code, 42);
    assert_eq!(engine.get("gone").unwrap().record().state().exit_code, 7);
    // The reconnected task is monitored again.
    kit.shims.shim(&ids[0]).exit_with(5);
    wait_status(&engine, "live", pb::ContainerStatus::Exited).await;
    assert_eq!(engine.get("live").unwrap().record().state().exit_code, 5);
    // A repeated TaskExit from a shim's retry queue changes nothing.
    engine.publish(
        evpb::Envelope {
            r#type: EventType::Task.into(),
            topic: "/tasks/exit".into(),
            payload: Some(evpb::envelope::Payload::TaskExit(evpb::TaskExit {
                container_id: ids[0].clone(),
                pid: 1001,
                exit_status: 99,
                ..Default::default()
            })),
            ..Default::default()
        },
        "default",
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(engine.get("live").unwrap().record().state().exit_code, 5);
}

#[tokio::test]
async fn attach_before_start_gets_the_first_output() {
    let kit = Kit::new();
    let engine = kit.engine();
    let (c, _) = engine
        .create(create_req("att", &["sleep"]), "default")
        .await
        .unwrap();
    let opts = pb::AttachOptions {
        id: "att".into(),
        stdout: true,
        stream: true,
        ..Default::default()
    };
    let ctr = engine.prepare_attach(&opts).unwrap();
    let (_in_tx, in_rx) = tokio::sync::mpsc::channel(1);
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(engine.clone().run_attach(ctr, opts, in_rx, tx));
    let first = rx.recv().await.unwrap().unwrap();
    assert!(matches!(
        first.event,
        Some(pb::attach_task_response::Event::Ready(_))
    ));
    engine.start("att").await.unwrap();
    kit.shims.shim(&c.id).exit_with(0);
    let out = rx.recv().await.unwrap().unwrap();
    match out.event {
        Some(pb::attach_task_response::Event::Output(o)) => assert_eq!(o.data, b"bye 0\n"),
        other => panic!("{other:?}"),
    }
    let end = rx.recv().await.unwrap().unwrap();
    assert!(
        matches!(end.event, Some(pb::attach_task_response::Event::End(e)) if e.reason == pb::AttachEndReason::Exited as i32)
    );
}

#[tokio::test]
async fn rename_update_list_and_volumes_in_use() {
    let kit = Kit::new();
    let engine = kit.engine();
    let mut req = create_req("one", &["sleep"]);
    req.host_config
        .as_mut()
        .unwrap()
        .mounts
        .push(pb::MountSpec {
            r#type: pb::MountType::Volume.into(),
            source: "shared".into(),
            target: "/data".into(),
            volume: Some(pb::VolumeOptions {
                no_copy: true,
                ..Default::default()
            }),
            ..Default::default()
        });
    let (c, _) = engine.create(req, "default").await.unwrap();
    assert_eq!(c.mounts[0].name, "shared");
    let err = engine
        .volumes
        .remove("shared", &engine.volume_users("shared"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);

    engine
        .create(create_req("two", &["sleep"]), "default")
        .await
        .unwrap();
    let err = engine.rename("one", "two").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    engine.rename("one", "uno").await.unwrap();
    assert_eq!(engine.get("uno").unwrap().id, c.id);
    assert!(engine.get("one").is_err());

    engine.start("uno").await.unwrap();
    let (u, _) = engine
        .update(pb::UpdateContainerRequest {
            id: "uno".into(),
            resources: Some(pb::Resources {
                memory: Some(64 << 20),
                ..Default::default()
            }),
            set_extensions: [(
                "docker".to_string(),
                types::Extension {
                    version: 1,
                    data: b"x".to_vec(),
                },
            )]
            .into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        u.host_config.unwrap().resources.unwrap().memory,
        Some(64 << 20)
    );
    assert_eq!(u.extensions["docker"].data, b"x");

    let list = |filters: &[(&str, &str)], all: bool| {
        let req = pb::ListContainersRequest {
            filters: filters
                .iter()
                .map(|(k, v)| types::Filter {
                    key: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            all,
            ..Default::default()
        };
        let engine = engine.clone();
        async move {
            engine
                .list(&req)
                .await
                .unwrap()
                .into_iter()
                .map(|c| c.name)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list(&[], false).await, ["uno"]);
    assert_eq!(list(&[], true).await, ["two", "uno"]);
    assert_eq!(list(&[("status", "created")], false).await, ["two"]);
    assert_eq!(list(&[("volume", "shared")], true).await, ["uno"]);
    assert_eq!(
        list(&[("label", "team=a"), ("name", "tw")], true).await,
        ["two"]
    );
    assert_eq!(list(&[("ancestor", "busybox")], true).await.len(), 2);
    assert!(
        engine
            .list(&pb::ListContainersRequest {
                filters: vec![types::Filter {
                    key: "bogus".into(),
                    value: "1".into()
                }],
                ..Default::default()
            })
            .await
            .is_err()
    );
    engine.delete("uno", true, false).await.unwrap();
    engine
        .volumes
        .remove("shared", &engine.volume_users("shared"))
        .await
        .unwrap();
    let (deleted, _) = engine.prune(&[]).await.unwrap();
    assert_eq!(deleted.len(), 1);
}

#[tokio::test]
async fn user_and_spec_come_from_the_rootfs_and_overrides() {
    let kit = Kit::new();
    let engine = kit.engine();
    let mut req = create_req("uu", &["sleep"]);
    {
        let cfg = req.config.as_mut().unwrap();
        cfg.user = "postgres".into();
        cfg.env = vec!["FROM_IMAGE=2".into()];
        cfg.working_dir = "/tmp".into();
    }
    req.host_config.as_mut().unwrap().resources = Some(pb::Resources {
        memory: Some(32 << 20),
        pids_limit: Some(10),
        ..Default::default()
    });
    let (c, _) = engine.create(req, "default").await.unwrap();
    engine.start("uu").await.unwrap();
    let spec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(&c.bundle_path).join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(spec["process"]["user"]["uid"], 70);
    assert_eq!(spec["process"]["user"]["gid"], 70);
    assert_eq!(spec["process"]["cwd"], "/tmp");
    let env: Vec<String> = serde_json::from_value(spec["process"]["env"].clone()).unwrap();
    assert!(env.contains(&"FROM_IMAGE=2".to_string()));
    assert!(env.contains(&"HOME=/var/lib/postgresql".to_string()));
    assert_eq!(spec["linux"]["resources"]["memory"]["limit"], 32 << 20);
    assert_eq!(spec["linux"]["resources"]["pids"]["limit"], 10);
    assert_eq!(spec["linux"]["cgroupsPath"], format!("/berth/{}", c.id));
    let dests: Vec<String> = spec["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["destination"].as_str().unwrap().to_string())
        .collect();
    for f in ["/etc/hosts", "/etc/resolv.conf", "/etc/hostname"] {
        assert!(dests.contains(&f.to_string()), "{dests:?}");
    }
    assert_eq!(
        spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["type"] == "network")
            .unwrap()["path"],
        format!("/fake/netns/{}", c.id)
    );

    // An unknown user fails the start with Docker's message.
    let mut req = create_req("nouser", &["sleep"]);
    req.config.as_mut().unwrap().user = "alice".into();
    engine.create(req, "default").await.unwrap();
    let err = engine.start("nouser").await.unwrap_err();
    assert!(
        err.chain().contains("unable to find user alice"),
        "{}",
        err.chain()
    );
}

#[tokio::test]
async fn image_volumes_become_anonymous_volumes_filled_from_the_image() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: copy-up mounts the rootfs, which needs root");
        return;
    }
    let kit = Kit::new();
    std::fs::create_dir_all(kit.snapshots.rootfs.join("data/sub")).unwrap();
    std::fs::write(kit.snapshots.rootfs.join("data/sub/seed"), "from image").unwrap();
    let engine = kit.engine();
    let mut req = create_req("vv", &["sleep"]);
    req.config.as_mut().unwrap().image = "withvolume".into();
    let (c, _) = engine.create(req, "default").await.unwrap();
    assert_eq!(c.mounts.len(), 1);
    let m = &c.mounts[0];
    assert_eq!(
        (m.destination.as_str(), m.r#type()),
        ("/data", pb::MountType::Volume)
    );
    assert!(berth_core::Id::is_valid(&m.name), "anonymous: {}", m.name);
    assert_eq!(
        std::fs::read_to_string(Path::new(&m.source).join("sub/seed")).unwrap(),
        "from image"
    );
    assert_eq!(engine.volume_users(&m.name), std::slice::from_ref(&c.id));
    // Removed with the container when asked.
    engine.delete("vv", false, true).await.unwrap();
    assert!(engine.volumes.get(&m.name).is_err());
    assert!(!Path::new(&m.source).exists());
}

#[tokio::test]
async fn kill_returns_once_the_exit_is_recorded() {
    let kit = Kit::new();
    let engine = kit.engine();
    engine
        .create(create_req("kk", &["sleep"]), "default")
        .await
        .unwrap();
    engine.start("kk").await.unwrap();
    engine.kill("kk", "").await.unwrap();
    let rec = engine.get("kk").unwrap().record();
    assert_eq!(rec.status(), pb::ContainerStatus::Exited);
    assert_eq!(rec.state().exit_code, 137);
}

#[tokio::test]
async fn a_restarting_container_is_removed_only_by_force() {
    let kit = Kit::new();
    let engine = kit.engine();
    let mut req = create_req("rr", &["exit", "3"]);
    req.host_config.as_mut().unwrap().restart_policy = Some(pb::RestartPolicy {
        name: pb::RestartPolicyName::OnFailure.into(),
        max_retries: 0,
    });
    let (c, _) = engine.create(req, "default").await.unwrap();
    engine.start("rr").await.unwrap();
    // The backoff doubles, so some attempt finds it restarting.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let err = loop {
        assert!(std::time::Instant::now() < deadline, "never restarting");
        if engine.get("rr").unwrap().with(|r| r.status()) != pb::ContainerStatus::Restarting {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        match engine.delete("rr", false, false).await {
            Err(e) if e.message().contains("restarting") => break e,
            Err(_) => continue,
            Ok(()) => panic!("a restarting container was removed without force"),
        }
    };
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert_eq!(
        err.message(),
        "cannot remove container \"rr\": container is restarting: stop the container before removing or force remove"
    );
    engine.delete("rr", true, false).await.unwrap();
    let spawns = *kit.shims.spawns.lock().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        *kit.shims.spawns.lock().unwrap(),
        spawns,
        "restarted after removal"
    );
    assert_eq!(engine.get(&c.id).unwrap_err().kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn stats_streams_of_one_container_share_each_sample() {
    use futures::StreamExt;
    let kit = Kit::new();
    let engine = kit.engine();
    engine
        .create(create_req("st", &["sleep", "60"]), "default")
        .await
        .unwrap();
    engine.start("st").await.unwrap();
    let id = engine.get("st").unwrap().id.clone();
    let mut a = engine.stats("st", true, false).await.unwrap();
    let mut b = engine.stats("st", true, false).await.unwrap();
    for _ in 0..3 {
        for s in [&mut a, &mut b] {
            let got = s.next().await.unwrap().unwrap();
            assert_eq!(got.stats.unwrap().id, id);
        }
    }
    let calls = kit.shims.shims.lock().unwrap()[&id]
        .stats_calls
        .load(std::sync::atomic::Ordering::SeqCst);
    // Three samples seen by both streams; the sampler may have taken the fourth already.
    // Unshared, that is six reads.
    assert!((3..=4).contains(&calls), "{calls} cgroup reads");
    drop((a, b));
}

mod sandboxes;
