//! Pod sandboxes through the engine's gRPC (`berth.engine.v1.Sandboxes`), real binaries, real
//! runc and the reference CNI plugins: a pod on a CNI bridge conflist with two containers that
//! share its network (one serves HTTP on localhost, the other fetches it) and PID namespace, the
//! pod's hostname and resolv.conf inside, the pod IP reported; `kill -9` of the engine keeps
//! the pod and its containers; stop (CNI DEL) and remove (namespace files and mounts gone, PID
//! holder ended); CRI-format logs reopened after a rename; recursive read-only binds; bad
//! input answered with the right codes and nothing left behind.
//! Root only; needs /usr/lib/cni.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use berth_integration::engine_kit::{EngineStack, busybox, unique};
use berth_integration::network_kit::{NetSlot, PortmapChains};
use berth_integration::stack::{running, wait_for};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::types::v1 as types;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::Code;

/// Kills PID holders by PID when a test ends early with the engine unable to remove its pods.
#[derive(Default)]
struct Holders(Vec<i32>);

impl Drop for Holders {
    fn drop(&mut self) {
        for pid in &self.0 {
            if running(*pid) {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
        }
    }
}

/// Unmounts a test's own mount point on drop.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn plugins_ready() -> bool {
    if !berth_integration::engine_kit::ready() {
        return false;
    }
    for p in ["bridge", "host-local", "loopback"] {
        if !Path::new("/usr/lib/cni").join(p).is_file() {
            eprintln!("skipped: the CNI reference plugins are not in /usr/lib/cni");
            return false;
        }
    }
    true
}

/// A CNI config directory with one bridge conflist on a subnet of the stack's slot, its
/// host-local state in a temp dir of its own.
struct CniConf {
    conf: tempfile::TempDir,
    ipam: tempfile::TempDir,
    name: String,
    subnet: String,
}

impl CniConf {
    fn new(slot: &NetSlot) -> Result<Self> {
        Self::with_plugins(slot, &[])
    }

    /// The bridge conflist, then `more` plugins (e.g. portmap).
    fn with_plugins(slot: &NetSlot, more: &[serde_json::Value]) -> Result<Self> {
        let conf = tempfile::tempdir()?;
        let ipam = tempfile::tempdir()?;
        let name = format!("pods{}", std::process::id());
        let subnet = slot.subnet(5);
        let mut plugins = vec![serde_json::json!({
            "type": "bridge",
            "bridge": slot.name("pod"),
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": subnet }]],
                "dataDir": ipam.path(),
            }
        })];
        plugins.extend(more.iter().cloned());
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": plugins,
        });
        std::fs::write(conf.path().join("10-pods.conflist"), conflist.to_string())?;
        Ok(Self {
            conf,
            ipam,
            name,
            subnet,
        })
    }

    /// Addresses host-local has handed out (one file per address).
    fn leases(&self) -> Vec<String> {
        std::fs::read_dir(self.ipam.path().join(&self.name))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect()
    }
}

/// A stack whose berth-network reads CNI configs from `conf`.
async fn stack_with(conf: &Path) -> Result<EngineStack> {
    EngineStack::builder()
        .network_toml(&format!("cni_conf_dir = \"{}\"", conf.display()))
        .start()
        .await
}

fn pod(name: &str) -> pb::RunSandboxRequest {
    pb::RunSandboxRequest {
        config: Some(pb::SandboxConfig {
            metadata: Some(pb::SandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "berth-test".into(),
                attempt: 0,
            }),
            hostname: "pod-host".into(),
            dns: Some(pb::SandboxDnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            labels: [("app".to_string(), name.to_string())].into(),
            linux: Some(pb::SandboxLinux {
                security: Some(pb::SandboxSecurity {
                    namespace_options: Some(pb::SandboxNamespaceOptions {
                        pid: pb::NamespaceMode::Pod.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn in_pod(sandbox: &str) -> pb::HostConfig {
    pb::HostConfig {
        sandbox_id: sandbox.into(),
        ..Default::default()
    }
}

async fn get(es: &EngineStack, id: &str) -> Result<pb::Sandbox> {
    es.sandboxes()
        .get(pb::GetSandboxRequest {
            id: id.into(),
            verbose: false,
        })
        .await?
        .into_inner()
        .sandbox
        .context("no sandbox")
}

fn mounts_naming(id: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(id))
        .map(str::to_string)
        .collect()
}

fn code<T>(r: std::result::Result<tonic::Response<T>, tonic::Status>) -> Option<Code> {
    r.err().map(|s| s.code())
}

/// A client in the pod: fetches the server's page over the pod's loopback.
const FETCH: &str =
    "for i in $(seq 1 100); do wget -q -O- http://127.0.0.1:8080/ && break; sleep 0.1; done";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_shares_its_namespaces_survives_the_engine_and_goes_away() -> Result<()> {
    if !plugins_ready() {
        return Ok(());
    }
    let slot_for_conf = NetSlot::claim()?;
    let cni = CniConf::new(&slot_for_conf)?;
    let es = stack_with(cni.conf.path()).await?;
    let mut holders = Holders::default();

    let sb = es
        .sandboxes()
        .run(pod(&unique("web")))
        .await?
        .into_inner()
        .sandbox
        .context("no sandbox")?;
    holders.0.push(sb.pid_holder);
    ensure!(sb.state() == pb::SandboxState::Ready, "{sb:?}");
    let ip = sb.network.clone().unwrap_or_default().ip;
    let prefix = cni.subnet.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
    ensure!(ip.starts_with(prefix), "pod ip {ip} outside {}", cni.subnet);
    ensure!(cni.leases().contains(&ip), "leases {:?}", cni.leases());
    let ns = sb.namespaces.clone().unwrap_or_default();
    let ns_dir = es.stack().state_dir().join("sandboxes").join(&sb.id);
    for (path, kind) in [
        (&ns.network, "net"),
        (&ns.ipc, "ipc"),
        (&ns.uts, "uts"),
        (&ns.pid, "pid"),
    ] {
        ensure!(Path::new(path) == ns_dir.join(kind), "{kind}: {path}");
        ensure!(!mounts_naming(path).is_empty(), "{path} is not mounted");
    }
    ensure!(
        running(sb.pid_holder),
        "pid holder {} not running",
        sb.pid_holder
    );

    // The server listens on the pod's loopback only.
    let server = es
        .create(
            &unique("srv"),
            busybox(&[
                "sh",
                "-c",
                "echo shared-shm > /dev/shm/pod && mkdir -p /www && echo hello-pod > /www/index.html && exec httpd -f -p 127.0.0.1:8080 -h /www",
            ]),
            in_pod(&sb.id),
        )
        .await?;
    es.start_task(&server.id).await?;
    let client = es
        .run(
            &unique("cli"),
            busybox(&[
                "sh",
                "-c",
                &format!(
                    "hostname; cat /etc/resolv.conf; pidof httpd >/dev/null && echo sees-httpd; {FETCH}; cat /dev/shm/pod"
                ),
            ]),
            in_pod(&sb.id),
        )
        .await?;
    ensure!(
        client.exit_code == 0,
        "client: {} / {}",
        client.stdout,
        client.stderr
    );
    let out = &client.stdout;
    ensure!(out.starts_with("pod-host\n"), "hostname: {out}");
    ensure!(out.contains("nameserver 10.96.0.10"), "resolv.conf: {out}");
    ensure!(
        out.contains("search svc.cluster.local"),
        "resolv.conf: {out}"
    );
    ensure!(out.contains("options ndots:5"), "resolv.conf: {out}");
    ensure!(
        out.contains("sees-httpd"),
        "pid namespace not shared: {out}"
    );
    ensure!(out.contains("hello-pod"), "fetch: {out}");
    ensure!(out.contains("shared-shm"), "/dev/shm not shared: {out}");
    let got = get(&es, &sb.id).await?;
    ensure!(got.container_ids.len() == 2, "{:?}", got.container_ids);

    // kill -9 of the engine keeps the pod and its running container.
    es.kill9_engine()?;
    let got = wait_for(Duration::from_secs(30), || {
        let rt = tokio::runtime::Handle::current();
        tokio::task::block_in_place(|| rt.block_on(get(&es, &sb.id)).ok())
    })
    .context("sandbox after the engine restart")?;
    ensure!(got.state() == pb::SandboxState::Ready, "{got:?}");
    ensure!(got.network.unwrap_or_default().ip == ip);
    let srv = es.inspect(&server.id).await?;
    ensure!(
        srv.state.unwrap_or_default().status() == pb::ContainerStatus::Running,
        "server not running after the engine restart"
    );
    let again = es
        .run(
            &unique("cli"),
            busybox(&["sh", "-c", FETCH]),
            in_pod(&sb.id),
        )
        .await?;
    ensure!(again.stdout.contains("hello-pod"), "{again:?}");

    // Stop: containers killed, network torn down (host-local lease released), holder ended.
    es.sandboxes()
        .stop(pb::StopSandboxRequest { id: sb.id.clone() })
        .await?;
    let got = get(&es, &sb.id).await?;
    ensure!(got.state() == pb::SandboxState::Notready);
    ensure!(
        cni.leases().is_empty(),
        "leases after stop: {:?}",
        cni.leases()
    );
    ensure!(
        wait_for(Duration::from_secs(5), || (!running(sb.pid_holder))
            .then_some(()))
        .is_some(),
        "pid holder still running"
    );
    let srv = es.inspect(&server.id).await?;
    ensure!(srv.state.unwrap_or_default().status() != pb::ContainerStatus::Running);
    // Stop again is fine; a container cannot join a stopped pod.
    es.sandboxes()
        .stop(pb::StopSandboxRequest { id: sb.id.clone() })
        .await?;
    let err = es
        .create(&unique("late"), busybox(&["true"]), in_pod(&sb.id))
        .await
        .unwrap_err();
    let status = err.downcast_ref::<tonic::Status>().context("a status")?;
    ensure!(status.code() == Code::FailedPrecondition, "{status:?}");

    // Remove: containers, namespace files and mounts, pod files gone.
    es.sandboxes()
        .remove(pb::RemoveSandboxRequest { id: sb.id.clone() })
        .await?;
    ensure!(!ns_dir.exists(), "{} still exists", ns_dir.display());
    let left = mounts_naming(&sb.id);
    ensure!(left.is_empty(), "mounts left: {left:?}");
    ensure!(!Path::new(&sb.resolv_conf_path).exists());
    let err = es.inspect(&server.id).await.unwrap_err();
    ensure!(err.downcast_ref::<tonic::Status>().map(|s| s.code()) == Some(Code::NotFound));
    let err = get(&es, &sb.id).await.unwrap_err();
    ensure!(err.downcast_ref::<tonic::Status>().map(|s| s.code()) == Some(Code::NotFound));
    // A shim exits right after answering Shutdown, not before: give it a moment.
    let ids = [server.id.clone(), client.id.clone(), again.id.clone()];
    let mut left = es.leftovers(&ids).await?;
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = es.leftovers(&ids).await?;
    }
    if !left.is_empty() {
        let log = es.stack().log_text();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| ids.iter().any(|id| l.contains(&id[..12])))
            .collect();
        anyhow::bail!(
            "left behind: {left:?}\nids: server {} client {} again {}\n{}",
            server.id,
            client.id,
            again.id,
            lines.join("\n")
        );
    }
    drop(slot_for_conf);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_codes_and_leaves_nothing() -> Result<()> {
    if !plugins_ready() {
        return Ok(());
    }
    let slot_for_conf = NetSlot::claim()?;
    let cni = CniConf::new(&slot_for_conf)?;
    let es = stack_with(cni.conf.path()).await?;
    let mut holders = Holders::default();

    // Unknown ids.
    let unknown = "f".repeat(64);
    ensure!(
        code(
            es.sandboxes()
                .get(pb::GetSandboxRequest {
                    id: unknown.clone(),
                    verbose: true
                })
                .await
        ) == Some(Code::NotFound)
    );
    ensure!(
        code(
            es.sandboxes()
                .stop(pb::StopSandboxRequest {
                    id: unknown.clone()
                })
                .await
        ) == Some(Code::NotFound)
    );
    let err = es
        .create(&unique("orphan"), busybox(&["true"]), in_pod(&unknown))
        .await
        .unwrap_err();
    ensure!(err.downcast_ref::<tonic::Status>().map(|s| s.code()) == Some(Code::NotFound));

    // A duplicate name.
    let name = unique("dup");
    let sb = es
        .sandboxes()
        .run(pod(&name))
        .await?
        .into_inner()
        .sandbox
        .context("no sandbox")?;
    holders.0.push(sb.pid_holder);
    ensure!(code(es.sandboxes().run(pod(&name)).await) == Some(Code::AlreadyExists));

    // A CNI config that does not exist: a clear error, nothing left behind.
    let before: Vec<_> = std::fs::read_dir(es.stack().state_dir().join("sandboxes"))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let mut req = pod(&unique("nonet"));
    req.network = Some(pb::SandboxNetworkOptions {
        cni_config_name: "no-such-network".into(),
        ..Default::default()
    });
    let st = es.sandboxes().run(req).await.unwrap_err();
    ensure!(st.code() == Code::FailedPrecondition, "{st:?}");
    ensure!(st.message().contains("no-such-network"), "{st:?}");
    let after: Vec<_> = std::fs::read_dir(es.stack().state_dir().join("sandboxes"))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    ensure!(before == after, "{before:?} → {after:?}");
    let list = es
        .sandboxes()
        .list(pb::ListSandboxesRequest {
            filters: vec![types::Filter {
                key: "state".into(),
                value: "ready".into(),
            }],
        })
        .await?
        .into_inner()
        .sandboxes;
    ensure!(list.len() == 1 && list[0].id == sb.id, "{list:?}");
    ensure!(cni.leases().len() == 1, "leases: {:?}", cni.leases());

    // A container that asks for another network than the pod's.
    let mut hc = in_pod(&sb.id);
    hc.network_mode = "host".into();
    let err = es
        .create(&unique("hostnet"), busybox(&["true"]), hc)
        .await
        .unwrap_err();
    ensure!(err.downcast_ref::<tonic::Status>().map(|s| s.code()) == Some(Code::InvalidArgument));
    drop(slot_for_conf);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_container_logs_in_the_cri_format_and_reopens_its_log() -> Result<()> {
    if !plugins_ready() {
        return Ok(());
    }
    let slot_for_conf = NetSlot::claim()?;
    let cni = CniConf::new(&slot_for_conf)?;
    let es = stack_with(cni.conf.path()).await?;
    let mut holders = Holders::default();
    let sb = es
        .sandboxes()
        .run(pod(&unique("logs")))
        .await?
        .into_inner()
        .sandbox
        .context("no sandbox")?;
    holders.0.push(sb.pid_holder);
    let logs = tempfile::tempdir()?;
    let trigger = tempfile::tempdir()?;
    let log = logs.path().join("app/0.log");
    let mut hc = in_pod(&sb.id);
    hc.log_config = Some(pb::LogConfig {
        r#type: "cri".into(),
        options: [("path".to_string(), log.display().to_string())].into(),
    });
    hc.mounts = vec![pb::MountSpec {
        r#type: pb::MountType::Bind.into(),
        source: trigger.path().display().to_string(),
        target: "/trigger".into(),
        ..Default::default()
    }];
    let c = es
        .create(
            &unique("app"),
            busybox(&[
                "sh",
                "-c",
                "echo first; echo oops >&2; while [ ! -e /trigger/go ]; do sleep 0.1; done; echo second; exec sleep 1000",
            ]),
            hc,
        )
        .await?;
    es.start_task(&c.id).await?;
    let text = wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("first") && t.contains("oops"))
    })
    .context("the first lines in the CRI log")?;
    for line in text.lines() {
        // <RFC3339Nano> stdout|stderr F|P <line>
        let mut parts = line.splitn(4, ' ');
        let (ts, stream, tag) = (parts.next(), parts.next(), parts.next());
        ensure!(
            ts.is_some_and(|t| t.contains('T') && t.ends_with('Z')),
            "{line}"
        );
        ensure!(matches!(stream, Some("stdout" | "stderr")), "{line}");
        ensure!(tag == Some("F"), "{line}");
    }
    ensure!(
        text.contains(" stdout F first\n") && text.contains(" stderr F oops\n"),
        "{text}"
    );

    // The kubelet's rotation: rename, then ReopenLog; new output goes to a new file.
    let rotated = logs.path().join("app/0.log.20261207-000000");
    std::fs::rename(&log, &rotated)?;
    es.tasks()
        .reopen_log(pb::ReopenLogRequest { id: c.id.clone() })
        .await?;
    std::fs::write(trigger.path().join("go"), b"")?;
    let text = wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("second"))
    })
    .context("the line after reopening")?;
    ensure!(!text.contains("first"), "{text}");
    ensure!(!std::fs::read_to_string(&rotated)?.contains("second"));

    // Recursive read-only binds: a submount of the source is read-only too (plain ro covers
    // only the top mount).
    let src = tempfile::tempdir()?;
    let sub = src.path().join("sub");
    std::fs::create_dir(&sub)?;
    nix::mount::mount(
        Some("tmpfs"),
        &sub,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )?;
    let _sub = Unmount(sub.clone());
    for (recursive, want) in [(true, "readonly"), (false, "writable")] {
        let mut hc = in_pod(&sb.id);
        hc.mounts = vec![pb::MountSpec {
            r#type: pb::MountType::Bind.into(),
            source: src.path().display().to_string(),
            target: "/m".into(),
            read_only: true,
            bind: Some(pb::BindOptions {
                read_only_force_recursive: recursive,
                ..Default::default()
            }),
            ..Default::default()
        }];
        let r = es
            .run(
                &unique("rro"),
                busybox(&[
                    "sh",
                    "-c",
                    "touch /m/sub/x 2>/dev/null && echo writable || echo readonly",
                ]),
                hc,
            )
            .await?;
        ensure!(r.stdout.trim() == want, "recursive={recursive}: {r:?}");
    }

    // Not running: FAILED_PRECONDITION.
    es.tasks()
        .stop(pb::StopTaskRequest {
            id: c.id.clone(),
            timeout_seconds: Some(0),
            ..Default::default()
        })
        .await?;
    ensure!(
        code(
            es.tasks()
                .reopen_log(pb::ReopenLogRequest { id: c.id.clone() })
                .await
        ) == Some(Code::FailedPrecondition)
    );
    drop(slot_for_conf);
    Ok(())
}

fn iptables_mentioning(id: &str) -> Vec<String> {
    let out = std::process::Command::new("iptables-save")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter(|l| l.contains(id))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_ports_through_portmap_and_host_network_pods() -> Result<()> {
    if !plugins_ready() || !Path::new("/usr/lib/cni/portmap").is_file() {
        return Ok(());
    }
    let slot_for_conf = NetSlot::claim()?;
    let portmap = serde_json::json!({
        "type": "portmap",
        "capabilities": { "portMappings": true },
        "snat": true,
    });
    let _chains = PortmapChains;
    let cni = CniConf::with_plugins(&slot_for_conf, &[portmap])?;
    let es = stack_with(cni.conf.path()).await?;
    let mut holders = Holders::default();

    // A host port: DNAT by the portmap plugin from the runtime config; a port without a host
    // port is not published.
    let host_port = berth_integration::images_kit::free_port();
    let mut req = pod(&unique("ports"));
    req.config.as_mut().context("config")?.port_mappings = vec![
        types::PortMapping {
            container_port: 8080,
            host_port: u32::from(host_port),
            protocol: types::Protocol::Tcp.into(),
            ..Default::default()
        },
        types::PortMapping {
            container_port: 9090,
            protocol: types::Protocol::Tcp.into(),
            ..Default::default()
        },
    ];
    let sb = es
        .sandboxes()
        .run(req)
        .await?
        .into_inner()
        .sandbox
        .context("no sandbox")?;
    holders.0.push(sb.pid_holder);
    let result: serde_json::Value =
        serde_json::from_slice(&sb.network.clone().unwrap_or_default().cni_result)?;
    let gateway = result["ips"][0]["gateway"]
        .as_str()
        .context("a gateway in the CNI result")?
        .to_string();
    let server = es
        .create(
            &unique("web"),
            busybox(&[
                "sh",
                "-c",
                "mkdir -p /www && echo via-host-port > /www/index.html && exec httpd -f -p 8080 -h /www",
            ]),
            in_pod(&sb.id),
        )
        .await?;
    es.start_task(&server.id).await?;
    let addr = format!("{gateway}:{host_port}");
    let body = wait_for(Duration::from_secs(20), || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.contains("via-host-port").then_some(text)
    });
    ensure!(body.is_some(), "no answer on {addr}");
    ensure!(!iptables_mentioning(&sb.id).is_empty(), "no portmap rules");
    es.sandboxes()
        .remove(pb::RemoveSandboxRequest { id: sb.id.clone() })
        .await?;
    let left = iptables_mentioning(&sb.id);
    ensure!(left.is_empty(), "rules left: {left:?}");

    // The host's network: no namespaces made, no CNI, the host's name.
    let mut req = pod(&unique("hostnet"));
    let linux = req
        .config
        .as_mut()
        .and_then(|c| c.linux.as_mut())
        .context("linux")?;
    linux.security = Some(pb::SandboxSecurity {
        namespace_options: Some(pb::SandboxNamespaceOptions {
            network: pb::NamespaceMode::Node.into(),
            pid: pb::NamespaceMode::Container.into(),
            ipc: pb::NamespaceMode::Node.into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let sb = es
        .sandboxes()
        .run(req)
        .await?
        .into_inner()
        .sandbox
        .context("no sandbox")?;
    ensure!(sb.namespaces.clone().unwrap_or_default() == pb::SandboxNamespacePaths::default());
    ensure!(sb.pid_holder == 0 && sb.network.clone().unwrap_or_default().ip.is_empty());
    ensure!(cni.leases().is_empty(), "{:?}", cni.leases());
    let r = es
        .run(
            &unique("hn"),
            busybox(&["sh", "-c", "hostname; readlink /proc/self/ns/net"]),
            in_pod(&sb.id),
        )
        .await?;
    let host_name = nix::unistd::gethostname()?.to_string_lossy().into_owned();
    let host_net = std::fs::read_link("/proc/self/ns/net")?
        .display()
        .to_string();
    ensure!(
        r.stdout == format!("{host_name}\n{host_net}\n"),
        "{:?} vs {host_name} {host_net}",
        r.stdout
    );
    drop(slot_for_conf);
    Ok(())
}
