//! `VmRuntime` through its whole lifecycle against a fake launcher whose "VM" is the fake agent
//! (no QEMU): the share mounts, the spec the agent receives, relays standing in for the init
//! and an exec (real `berth-shim vm-relay` processes), kill, state, ps, delete. Root only (bind
//! mounts); skips otherwise.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_core::vm::VmRuntimeOptions;
use berth_proto::berth::agent::v1::agent_client::AgentClient;
use berth_shim::runtime::{BoxFuture, CreateOptions, ExecOptions, OciRuntime, ProcessStdio};
use berth_shim::vm::runtime::{Vm, VmLauncher, VmRuntime, VmSpec};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use serde_json::json;
use tonic::transport::Channel;

mod common;
use common::agent::{Calls, SHIM, serve};

#[derive(Debug)]
struct FakeVm {
    socket: PathBuf,
    agent: AgentClient<Channel>,
    shutdowns: Arc<Mutex<u32>>,
}

impl Vm for FakeVm {
    fn agent(&self) -> AgentClient<Channel> {
        self.agent.clone()
    }
    fn vsock_socket(&self) -> PathBuf {
        self.socket.clone()
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        *self.shutdowns.lock().unwrap() += 1;
        Box::pin(async { Ok(()) })
    }
}

#[derive(Debug)]
struct FakeLauncher {
    socket: PathBuf,
    specs: Arc<Mutex<Vec<VmSpec>>>,
    shutdowns: Arc<Mutex<u32>>,
}

impl VmLauncher for FakeLauncher {
    fn launch(&self, spec: VmSpec) -> BoxFuture<'_, Box<dyn Vm>> {
        self.specs.lock().unwrap().push(spec);
        Box::pin(async move {
            let channel = berth_shim::vm::relay::dial(&self.socket, 1024).await?;
            Ok(Box::new(FakeVm {
                socket: self.socket.clone(),
                agent: AgentClient::new(channel),
                shutdowns: self.shutdowns.clone(),
            }) as Box<dyn Vm>)
        })
    }
}

/// Kills and reaps the relays and lazily unmounts the share, even when the test fails.
struct Cleanup {
    pids: Mutex<Vec<u32>>,
    share: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for pid in self.pids.lock().unwrap().drain(..) {
            let pid = Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = self.share.display().to_string();
        for t in mounts.lines().filter_map(|l| l.split(' ').nth(4)) {
            if t.starts_with(&prefix) {
                let _ = nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

fn pipe() -> (std::io::PipeReader, OwnedFd) {
    let (r, w) = std::io::pipe().unwrap();
    (r, OwnedFd::from(w))
}

fn read_pid(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn mounted_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|t| t.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// Reads until `want` arrived (the relay writes as the agent sends).
fn read_until(r: &mut impl Read, want: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains(want) {
        let n = r.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "EOF before {want:?}: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(got).unwrap()
}

async fn wait_exit(pid: u32) -> WaitStatus {
    tokio::task::spawn_blocking(move || waitpid(Pid::from_raw(pid as i32), None).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_lives_and_dies_through_the_agent() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs/etc")).unwrap();
    std::fs::write(bundle.join("rootfs/etc/marker"), "in rootfs").unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 box\n").unwrap();
    let spec = json!({
        "ociVersion": "1.0.2",
        "hostname": "box",
        "root": {"path": "rootfs"},
        "process": {"terminal": false, "args": ["sh"], "cwd": "/"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "ro"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]}
    });
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    let share = bundle.join("vm/share");
    let cleanup = Cleanup {
        pids: Mutex::new(Vec::new()),
        share: share.clone(),
    };

    let sock = dir.path().join("vsock");
    let calls: Arc<Calls> = serve(&sock);
    let specs = Arc::new(Mutex::new(Vec::new()));
    let shutdowns = Arc::new(Mutex::new(0));
    let rt = VmRuntime::new(
        VmRuntimeOptions::default(),
        Box::new(FakeLauncher {
            socket: sock.clone(),
            specs: specs.clone(),
            shutdowns: shutdowns.clone(),
        }),
        SHIM.into(),
        dir.path().join("state"),
        Duration::from_secs(10),
    );

    // create: share mounted, spec rewritten, init relay running, pid file written.
    let (mut out_r, out_w) = pipe();
    let pid_file = bundle.join("init.pid");
    rt.create(
        "c1",
        CreateOptions {
            bundle: bundle.clone(),
            pid_file: pid_file.clone(),
            console_socket: None,
            stdio: ProcessStdio {
                stdin: None,
                stdout: Some(out_w),
                stderr: None,
            },
        },
    )
    .await
    .unwrap();
    let init = read_pid(&pid_file);
    cleanup.pids.lock().unwrap().push(init);
    assert_eq!(
        std::fs::read_to_string(share.join("rootfs/etc/marker")).unwrap(),
        "in rootfs"
    );
    assert_eq!(
        std::fs::read_to_string(share.join("m1")).unwrap(),
        "127.0.0.1 box\n"
    );
    // `ro` holds on the host side of the share, whatever the guest does.
    let err = std::fs::write(share.join("m1"), "guest was here").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert_eq!(std::fs::read_to_string(&hosts).unwrap(), "127.0.0.1 box\n");
    let sent = calls.spec.lock().unwrap().clone().unwrap();
    assert_eq!(sent["root"]["path"], "/run/berth/share/rootfs");
    assert_eq!(sent["mounts"][1]["source"], "/run/berth/share/m1");
    assert_eq!(*calls.hostname.lock().unwrap(), "box");
    {
        let specs = specs.lock().unwrap();
        assert_eq!((specs[0].vcpus, specs[0].memory_mib), (1, 256));
        assert_eq!(specs[0].tap, None);
        assert_eq!(specs[0].share_dir, share);
    }
    assert_eq!(rt.state("c1").await.unwrap().status, "created");

    // start: the init's output arrives through its relay.
    rt.start("c1").await.unwrap();
    assert_eq!(read_until(&mut out_r, "started\n"), "started\n");
    let st = rt.state("c1").await.unwrap();
    assert_eq!((st.status.as_str(), st.pid), ("running", init));

    // stats: the agent's counters (the guest container's cgroup), not the init relay's cgroup.
    let stats = rt
        .stats("c1")
        .expect("a VM reads its own stats")
        .await
        .unwrap();
    assert_eq!(stats.version, berth_shim::cgroup::Version::V2);
    assert_eq!(
        (stats.memory.usage, stats.memory.limit),
        (5 << 20, 200 << 20)
    );
    assert_eq!(stats.memory.stats.get("inactive_file"), Some(&(1 << 20)));
    assert_eq!((stats.cpu.total_ns, stats.pids_current), (1_500_000_000, 2));
    // What the agent does not count is not claimed.
    assert_eq!((stats.cpu.user_ns, stats.memory.max_usage), (0, 0));

    // exec: its own relay, its stderr, its exit code.
    let process = dir.path().join("process.json");
    std::fs::write(&process, json!({"args": ["true"], "cwd": "/"}).to_string()).unwrap();
    let (mut err_r, err_w) = pipe();
    let exec_pid_file = bundle.join("exec.pid");
    rt.exec(
        "c1",
        ExecOptions {
            process,
            pid_file: exec_pid_file.clone(),
            console_socket: None,
            stdio: ProcessStdio {
                stdin: None,
                stdout: None,
                stderr: Some(err_w),
            },
        },
    )
    .await
    .unwrap();
    let exec = read_pid(&exec_pid_file);
    cleanup.pids.lock().unwrap().push(exec);
    assert_eq!(read_until(&mut err_r, "exec ran\n"), "exec ran\n");
    assert_eq!(
        wait_exit(exec).await,
        WaitStatus::Exited(Pid::from_raw(exec as i32), 7)
    );
    assert!(rt.ps("c1").await.unwrap().contains(&init));

    // An exec with a terminal: the master comes over the console socket, the relay holds the
    // slave (raw: no echo of its own), resizes of the master reach the agent.
    let process = dir.path().join("tty.json");
    std::fs::write(
        &process,
        json!({"args": ["sh"], "cwd": "/", "terminal": true}).to_string(),
    )
    .unwrap();
    let console_path = dir.path().join("console.sock");
    let console = berth_shim::console::ConsoleSocket::bind(&console_path).unwrap();
    let tty_pid_file = bundle.join("tty.pid");
    let (execd, master) = tokio::join!(
        rt.exec(
            "c1",
            ExecOptions {
                process,
                pid_file: tty_pid_file.clone(),
                console_socket: Some(console_path.clone()),
                stdio: ProcessStdio::default(),
            },
        ),
        console.receive()
    );
    execd.unwrap();
    let master = master.unwrap();
    let tty = read_pid(&tty_pid_file);
    cleanup.pids.lock().unwrap().push(tty);
    let mut master = std::fs::File::from(master);
    // Once the relay runs, a resize of the master is a SIGWINCH to it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    berth_shim::console::resize(&master, 100, 40).unwrap();
    assert!(read_until(&mut master, "resize 100x40\n").ends_with("resize 100x40\n"));
    std::io::Write::write_all(&mut master, b"bye").unwrap();
    assert!(read_until(&mut master, "bye").ends_with("bye"));
    assert_eq!(
        wait_exit(tty).await,
        WaitStatus::Exited(Pid::from_raw(tty as i32), 9)
    );

    // kill: the agent gets the signal, the init's relay dies of it.
    rt.kill("c1", libc::SIGTERM, false).await.unwrap();
    assert_eq!(
        wait_exit(init).await,
        WaitStatus::Signaled(
            Pid::from_raw(init as i32),
            nix::sys::signal::Signal::SIGTERM,
            false
        )
    );
    cleanup.pids.lock().unwrap().clear();
    assert_eq!(rt.state("c1").await.unwrap().status, "stopped");

    // delete: agent told, VM shut down, share unmounted and removed.
    rt.delete("c1", false).await.unwrap();
    assert_eq!(*shutdowns.lock().unwrap(), 1);
    assert!(mounted_under(&share).is_empty());
    assert!(!bundle.join("vm").exists());
    assert!(
        bundle.join("rootfs/etc/marker").exists(),
        "delete went through the bind"
    );
    assert_eq!(
        calls.log(),
        [
            "network 0 interfaces",
            "create c1",
            "start c1/",
            "stats c1",
            "exec c1/exec-0",
            "start c1/exec-0",
            "exec c1/exec-1",
            "start c1/exec-1",
            "signal c1/ 15",
            "delete c1",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_spec_leaves_nothing_behind() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    let spec = json!({
        "root": {"path": "rootfs"},
        "process": {"args": ["sh"]},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
    });
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    let specs = Arc::new(Mutex::new(Vec::new()));
    let rt = VmRuntime::new(
        VmRuntimeOptions::default(),
        Box::new(FakeLauncher {
            socket: dir.path().join("absent"),
            specs: specs.clone(),
            shutdowns: Arc::default(),
        }),
        SHIM.into(),
        dir.path().join("state"),
        Duration::from_secs(5),
    );
    let err = rt
        .create(
            "c2",
            CreateOptions {
                bundle: bundle.clone(),
                pid_file: bundle.join("init.pid"),
                console_socket: None,
                stdio: ProcessStdio::default(),
            },
        )
        .await
        .unwrap_err();
    assert!(err.chain().contains("--network host"), "{}", err.chain());
    assert!(specs.lock().unwrap().is_empty(), "no VM was booted");
    assert!(!bundle.join("vm").exists());
    // No VM, no counters: not zeros.
    let err = rt.stats("c2").unwrap().await.unwrap_err();
    assert_eq!(
        err.kind(),
        berth_core::ErrorKind::NotFound,
        "{}",
        err.chain()
    );
}
