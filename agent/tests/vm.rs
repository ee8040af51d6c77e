//! Boots a berth-vm guest under TCG and runs a busybox container through the agent.
//!
//! Root only; skips (saying why) when QEMU, virtiofsd, vhost-device-vsock or the guest kernel
//! package is absent. Tools are found through `BERTH_QEMU`, `BERTH_VIRTIOFSD`,
//! `BERTH_VHOST_VSOCK`, then `PATH` and `/usr/libexec`; the kernel package through
//! `BERTH_VM_KERNEL_DEB`, then `/var/cache/berth/vm`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_proto::berth::agent::v1::agent_client::AgentClient;
use berth_proto::berth::agent::v1::{
    ContainerRef, CreateContainerRequest, Empty, ExecRequest, Interface, IoInput, ProcessRef,
    Route, SetupNetworkRequest, SignalRequest, io_input, io_output,
};
use berth_shim::reaper::Reaper;
use berth_shim::vm::guest::{self, GuestImageConfig};
use berth_shim::vm::machine::{self, Accel, Machine, MachineConfig, TapConfig};
use tonic::transport::Channel;

fn find_tool(env: &str, name: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([
            PathBuf::from("/usr/libexec"),
            PathBuf::from("/usr/lib/qemu"),
        ])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A network namespace with a tap device for the guest's NIC, deleted on drop.
struct TapNetns {
    name: String,
}

impl TapNetns {
    fn new() -> Self {
        let name = format!("bvm{}", std::process::id());
        let ip = |args: &[&str]| {
            let st = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ip(&[
            "-n", &ns.name, "tuntap", "add", "dev", "tap0", "mode", "tap",
        ]);
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            "10.231.0.1/24",
            "dev",
            "tap0",
        ]);
        ip(&["-n", &ns.name, "link", "set", "tap0", "up"]);
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
}

impl Drop for TapNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn skip(why: &str) {
    eprintln!("SKIP berth-vm guest test: {why}");
}

fn rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for d in ["proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    for applet in [
        "sh", "echo", "uname", "sleep", "cat", "tty", "ip", "hostname", "ping", "mkdir", "grep",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
}

fn process(args: &[&str]) -> serde_json::Value {
    process_tty(args, false)
}

fn process_tty(args: &[&str], terminal: bool) -> serde_json::Value {
    serde_json::json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin"],
        "cwd": "/",
        "capabilities": {
            "bounding": ["CAP_KILL", "CAP_CHOWN", "CAP_NET_RAW"],
            "effective": ["CAP_KILL", "CAP_CHOWN", "CAP_NET_RAW"],
            "permitted": ["CAP_KILL", "CAP_CHOWN", "CAP_NET_RAW"]
        },
        "noNewPrivileges": true
    })
}

fn spec(root: &str, args: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&spec_value(root, args)).unwrap()
}

/// The spec with a seccomp filter that makes mkdir fail with EPERM.
fn spec_seccomp(root: &str, args: &[&str]) -> Vec<u8> {
    let mut v = spec_value(root, args);
    v["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    serde_json::to_vec(&v).unwrap()
}

fn spec_value(root: &str, args: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": process(args),
        "root": {"path": root, "readonly": false},
        "hostname": "vmbox",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "cgroupsPath": "/berth/c1",
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"]
        }
    })
}

/// Runs the Io stream of a process: sends `close_stdin`, returns (stdout, stderr, exit status).
async fn io(agent: &mut AgentClient<Channel>, id: &str, exec_id: &str) -> (String, String, u32) {
    io_with_input(agent, id, exec_id, b"").await
}

/// Like [`io`], writing `input` to the process' stdin first.
async fn io_with_input(
    agent: &mut AgentClient<Channel>,
    id: &str,
    exec_id: &str,
    input: &[u8],
) -> (String, String, u32) {
    let open = IoInput {
        input: Some(io_input::Input::Open(ProcessRef {
            container_id: id.into(),
            exec_id: exec_id.into(),
        })),
    };
    let close = IoInput {
        input: Some(io_input::Input::CloseStdin(Empty {})),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(open).await.unwrap();
    if !input.is_empty() {
        tx.send(IoInput {
            input: Some(io_input::Input::Stdin(input.to_vec())),
        })
        .await
        .unwrap();
    }
    tx.send(close).await.unwrap();
    let mut out = agent
        .io(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut status = None;
    while let Some(msg) = out.message().await.unwrap() {
        match msg.output {
            Some(io_output::Output::Stdout(b)) => stdout.extend(b),
            Some(io_output::Output::Stderr(b)) => stderr.extend(b),
            Some(io_output::Output::ExitStatus(s)) => status = Some(s),
            None => {}
        }
    }
    drop(tx);
    (
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
        status.expect("no exit status on the io stream"),
    )
}

async fn exec(agent: &mut AgentClient<Channel>, exec_id: &str, args: &[&str]) {
    exec_tty(agent, exec_id, args, false).await
}

async fn exec_tty(agent: &mut AgentClient<Channel>, exec_id: &str, args: &[&str], terminal: bool) {
    agent
        .exec(ExecRequest {
            container_id: "c1".into(),
            exec_id: exec_id.into(),
            process: serde_json::to_vec(&process_tty(args, terminal)).unwrap(),
        })
        .await
        .unwrap();
    agent
        .start(ProcessRef {
            container_id: "c1".into(),
            exec_id: exec_id.into(),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_container_in_a_tcg_guest() {
    if !nix::unistd::Uid::effective().is_root() {
        return skip("needs root");
    }
    let Some(qemu) = find_tool("BERTH_QEMU", "qemu-system-x86_64") else {
        return skip("qemu-system-x86_64 not found");
    };
    let Some(virtiofsd) = find_tool("BERTH_VIRTIOFSD", "virtiofsd") else {
        return skip("virtiofsd not found");
    };
    let Some(vhost_vsock) = find_tool("BERTH_VHOST_VSOCK", "vhost-device-vsock") else {
        return skip("vhost-device-vsock not found");
    };
    let kernel_deb = match std::env::var("BERTH_VM_KERNEL_DEB") {
        Ok(p) => PathBuf::from(p),
        Err(_) => match guest::find_kernel_deb(Path::new(guest::DEFAULT_KERNEL_DIR)) {
            Ok(p) => p,
            Err(e) => return skip(&e.to_string()),
        },
    };
    if !Path::new("/bin/busybox").is_file() {
        return skip("/bin/busybox (busybox-static) not found");
    }

    // Short: the state directory holds Unix sockets.
    let tmp = tempfile::Builder::new()
        .prefix("bvm")
        .tempdir_in("/tmp")
        .unwrap();
    let share = tmp.path().join("share");
    rootfs(&share.join("c1/rootfs"));

    let image = guest::ensure(&GuestImageConfig {
        kernel_deb: Some(kernel_deb),
        agent_binary: PathBuf::from(env!("CARGO_BIN_EXE_berth-agent")),
        // BERTH_VM_CACHE keeps built images between runs.
        cache_dir: std::env::var_os("BERTH_VM_CACHE")
            .map_or_else(|| tmp.path().join("cache"), PathBuf::from),
    })
    .unwrap();
    assert!(image.kernel_release.starts_with("6.1."), "{image:?}");

    let netns = TapNetns::new();
    let reaper = Reaper::new();
    tokio::spawn(reaper.run().unwrap());
    let state_dir = tmp.path().join("s");
    let t0 = std::time::Instant::now();
    let mut m = Machine::start(
        MachineConfig {
            qemu,
            virtiofsd,
            vhost_vsock,
            // BERTH_VM_ACCEL=auto|kvm tries the other paths; TCG runs anywhere.
            accel: std::env::var("BERTH_VM_ACCEL")
                .map_or(Ok(Accel::Tcg), |a| a.parse())
                .unwrap(),
            vcpus: 1,
            memory_mib: 512,
            image: image.clone(),
            share_dir: share.clone(),
            state_dir: state_dir.clone(),
            tap: Some(TapConfig {
                ifname: "tap0".into(),
                mac: "02:42:0a:e7:00:02".into(),
                netns: Some(netns.path()),
            }),
            agent_timeout: Duration::from_secs(30),
        },
        Arc::new(reaper.clone()),
    )
    .await
    .unwrap();
    let pids: Vec<u32> = m.pids().iter().map(|(_, p)| *p).collect();
    assert_eq!(pids.len(), 3);
    assert_ne!(m.accel(), Accel::Auto);
    eprintln!(
        "guest up with {:?} in {:?}: {:?}",
        m.accel(),
        t0.elapsed(),
        m.ping()
    );

    let mut agent = m.agent();
    let ping = m.ping().clone();
    let sd = state_dir.clone();
    let release = image.kernel_release.clone();
    let result = async move {
        let state_dir = sd;
        let host = nix::sys::utsname::uname().unwrap();
        assert_eq!(ping.kernel_release, release);
        assert_ne!(
            ping.kernel_release,
            host.release().to_string_lossy(),
            "the guest runs its own kernel"
        );

        // A second client, dialled the way other processes (the relay) do.
        let mut other = AgentClient::new(
            machine::dial(&machine::agent_socket(&state_dir), machine::AGENT_PORT)
                .await
                .unwrap(),
        );
        other
            .ping(berth_proto::berth::agent::v1::PingRequest {})
            .await
            .unwrap();

        agent
            .create_container(CreateContainerRequest {
                container_id: "c1".into(),
                spec: spec(
                    "/run/berth/share/c1/rootfs",
                    &["/bin/sh", "-c", "uname -r; echo hello; echo oops >&2"],
                ),
            })
            .await
            .unwrap();
        // Started before the io stream opens: the output must be kept.
        agent
            .start(ProcessRef {
                container_id: "c1".into(),
                exec_id: String::new(),
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (stdout, stderr, status) = io(&mut agent, "c1", "").await;
        assert_eq!(status, 0, "stdout {stdout:?} stderr {stderr:?}");
        assert_eq!(stdout, format!("{release}\nhello\n"));
        assert_eq!(stderr, "oops\n");
        let waited = agent
            .wait(ProcessRef {
                container_id: "c1".into(),
                exec_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(waited.exit_status, 0);
        agent
            .delete_container(ContainerRef {
                container_id: "c1".into(),
            })
            .await
            .unwrap();

        // A long-running init for exec processes.
        agent
            .create_container(CreateContainerRequest {
                container_id: "c1".into(),
                spec: spec_seccomp("/run/berth/share/c1/rootfs", &["/bin/sleep", "1000"]),
            })
            .await
            .unwrap();
        agent
            .start(ProcessRef {
                container_id: "c1".into(),
                exec_id: String::new(),
            })
            .await
            .unwrap();
        exec(&mut agent, "e3", &["/bin/sh", "-c", "echo in-exec; exit 3"]).await;
        let (stdout, _, status) = io(&mut agent, "c1", "e3").await;
        assert_eq!((stdout.as_str(), status), ("in-exec\n", 3));

        // The spec's seccomp filter applies in the guest.
        exec(
            &mut agent,
            "mkdir",
            &[
                "/bin/sh",
                "-c",
                "grep Seccomp /proc/1/status /proc/self/status; mkdir /tmp/denied",
            ],
        )
        .await;
        let (stdout, stderr, status) = io(&mut agent, "c1", "mkdir").await;
        assert_eq!(status, 1, "{stdout} {stderr}");
        assert!(stderr.contains("Operation not permitted"), "{stderr}");

        exec(&mut agent, "sleep", &["/bin/sleep", "1000"]).await;
        agent
            .signal(SignalRequest {
                container_id: "c1".into(),
                exec_id: "sleep".into(),
                signal: 15,
                all: false,
            })
            .await
            .unwrap();
        let waited = agent
            .wait(ProcessRef {
                container_id: "c1".into(),
                exec_id: "sleep".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(waited.exit_status, 128 + 15);

        // A process with a terminal: the pty is made in the guest.
        exec_tty(
            &mut agent,
            "tty",
            &["/bin/sh", "-c", "tty; echo term"],
            true,
        )
        .await;
        let (stdout, _, status) = io(&mut agent, "c1", "tty").await;
        assert_eq!(status, 0, "{stdout:?}");
        assert!(
            stdout.contains("/dev/pts/") && stdout.contains("term"),
            "{stdout:?}"
        );

        // Stdin reaches the process; close_stdin is its EOF.
        exec(&mut agent, "cat", &["/bin/cat"]).await;
        let (stdout, _, status) = io_with_input(&mut agent, "c1", "cat", b"to cat\n").await;
        assert_eq!((stdout.as_str(), status), ("to cat\n", 0));

        // A container whose init has a terminal.
        let mut tty_spec = spec_value(
            "/run/berth/share/c1/rootfs",
            &["/bin/sh", "-c", "tty; exit 5"],
        );
        tty_spec["process"]["terminal"] = true.into();
        tty_spec["linux"]["cgroupsPath"] = "/berth/c2".into();
        agent
            .create_container(CreateContainerRequest {
                container_id: "c2".into(),
                spec: serde_json::to_vec(&tty_spec).unwrap(),
            })
            .await
            .unwrap();
        agent
            .start(ProcessRef {
                container_id: "c2".into(),
                exec_id: String::new(),
            })
            .await
            .unwrap();
        let (stdout, _, status) = io(&mut agent, "c2", "").await;
        assert_eq!(status, 5, "{stdout:?}");
        assert!(stdout.contains("/dev/pts/0"), "{stdout:?}");
        agent
            .delete_container(ContainerRef {
                container_id: "c2".into(),
            })
            .await
            .unwrap();

        // An io stream that breaks before `exit` kills its process.
        exec(&mut agent, "orphan", &["/bin/sleep", "1000"]).await;
        {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(IoInput {
                input: Some(io_input::Input::Open(ProcessRef {
                    container_id: "c1".into(),
                    exec_id: "orphan".into(),
                })),
            })
            .await
            .unwrap();
            let stream = agent
                .io(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap();
            drop(stream);
            drop(tx);
        }
        let waited = agent
            .wait(ProcessRef {
                container_id: "c1".into(),
                exec_id: "orphan".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(waited.exit_status, 128 + 9);

        // The NIC, found by MAC, renamed, addressed; the host reaches the guest through the tap.
        agent
            .setup_network(SetupNetworkRequest {
                interfaces: vec![Interface {
                    mac: "02:42:0a:e7:00:02".into(),
                    name: "eth0".into(),
                    addresses: vec!["10.231.0.2/24".into()],
                    mtu: 1400,
                }],
                routes: vec![Route {
                    destination: String::new(),
                    gateway: "10.231.0.1".into(),
                    device: "eth0".into(),
                }],
                hostname: "guest1".into(),
            })
            .await
            .unwrap();
        exec(
            &mut agent,
            "ip",
            &["/bin/sh", "-c", "ip addr show eth0; ip route"],
        )
        .await;
        let (stdout, _, status) = io(&mut agent, "c1", "ip").await;
        assert_eq!(status, 0);
        assert!(
            stdout.contains("mtu 1400") && stdout.contains("10.231.0.2/24"),
            "{stdout}"
        );
        assert!(stdout.contains("default via 10.231.0.1"), "{stdout}");
        exec(
            &mut agent,
            "ping",
            &["/bin/ping", "-c1", "-W5", "10.231.0.1"],
        )
        .await;
        let (stdout, stderr, status) = io(&mut agent, "c1", "ping").await;
        assert_eq!(status, 0, "{stdout} {stderr}");

        let stats = agent
            .stats(ContainerRef {
                container_id: "c1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(stats.guest_memory_total_bytes > 256 << 20, "{stats:?}");
        assert!(stats.pids >= 1 && stats.memory_usage_bytes > 0, "{stats:?}");

        let pids = agent
            .pids(ContainerRef {
                container_id: "c1".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .pids;
        assert!(!pids.is_empty());
        agent
            .delete_container(ContainerRef {
                container_id: "c1".into(),
            })
            .await
            .unwrap();
    };
    // Teardown runs whether or not the checks passed.
    let outcome = tokio::spawn(result).await;
    let t1 = std::time::Instant::now();
    m.shutdown(Duration::from_secs(5)).await;
    eprintln!("shut down in {:?}", t1.elapsed());
    for pid in &pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "vm process {pid} still exists"
        );
    }
    assert!(!machine::agent_socket(&state_dir).exists());
    if std::env::var_os("BERTH_VM_KEEP").is_some() {
        eprintln!("kept {}", tmp.keep().display());
    }
    if let Err(e) = outcome {
        let log = std::fs::read_to_string(machine::console_log(&state_dir)).unwrap_or_default();
        eprintln!("console log:\n{log}");
        std::panic::resume_unwind(e.into_panic());
    }
}
