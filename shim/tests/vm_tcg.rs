//! The whole `berth-vm` runtime with a real guest under TCG: a busybox container in a network
//! namespace made like the network service makes them (veth `eth0`), run through `VmRuntime`
//! with the real launcher (QEMU, virtiofsd, vhost-device-vsock, `berth-agent`), relays standing
//! in for its processes, its network mirrored onto a tap.
//!
//! Root only; skips (saying why) without QEMU, virtiofsd, vhost-device-vsock (PATH or
//! `BERTH_QEMU`, `BERTH_VIRTIOFSD`, `BERTH_VHOST_VSOCK`), the guest kernel package
//! (`/var/cache/berth/vm`) or the `berth-agent` binary beside `berth-shim`.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use berth_core::vm::{VmAccel, VmRuntimeOptions};
use berth_shim::reaper::{Reaper, Spawner};
use berth_shim::runtime::{CreateOptions, ExecOptions, OciRuntime, ProcessStdio};
use berth_shim::vm::runtime::{MachineLauncher, VmRuntime};

const SHIM: &str = env!("CARGO_BIN_EXE_berth-shim");

fn find_tool(env: &str, name: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([
            PathBuf::from("/usr/local/bin"),
            PathBuf::from("/usr/libexec"),
        ])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn skip(why: &str) {
    eprintln!("SKIP berth-vm TCG test: {why}");
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// Named network namespaces, deleted (with their links) when dropped.
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for d in ["proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    for applet in [
        "sh", "echo", "cat", "ping", "ip", "read", "sleep", "hostname",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
}

fn process(args: &[&str]) -> serde_json::Value {
    let caps = ["CAP_KILL", "CAP_NET_RAW", "CAP_CHOWN"];
    serde_json::json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin"],
        "cwd": "/",
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "noNewPrivileges": true
    })
}

fn pipe() -> (std::io::PipeReader, OwnedFd) {
    let (r, w) = std::io::pipe().unwrap();
    (r, OwnedFd::from(w))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busybox_container_runs_in_a_tcg_guest_with_the_containers_network() {
    if !nix::unistd::geteuid().is_root() {
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
    let agent = Path::new(SHIM).with_file_name("berth-agent");
    if !agent.is_file() {
        return skip("berth-agent is not built (cargo build --workspace --bins)");
    }
    if berth_shim::vm::guest::find_kernel_deb(Path::new(berth_core::vm::DEFAULT_KERNEL_DIR))
        .is_err()
    {
        return skip("no guest kernel package (deploy/install-deps.sh)");
    }
    if !Path::new("/bin/busybox").is_file() {
        return skip("/bin/busybox (busybox-static) not found");
    }

    // The container's network namespace, as the network service makes it, and the "host".
    let tag = std::process::id();
    let (c, h) = (format!("bvmc{tag}"), format!("bvmh{tag}"));
    let _netns = Netns(vec![c.clone(), h.clone()]);
    ip(&["netns", "add", &c]);
    ip(&["netns", "add", &h]);
    ip(&[
        "link", "add", "eth0", "netns", &c, "type", "veth", "peer", "name", "peer", "netns", &h,
    ]);
    ip(&["-n", &c, "addr", "add", "10.231.9.2/24", "dev", "eth0"]);
    ip(&["-n", &c, "link", "set", "eth0", "up"]);
    ip(&["-n", &c, "route", "add", "default", "via", "10.231.9.1"]);
    ip(&["-n", &h, "addr", "add", "10.231.9.1/24", "dev", "peer"]);
    ip(&["-n", &h, "link", "set", "peer", "up"]);

    // Short: the VM's state directory holds Unix sockets.
    let tmp = tempfile::Builder::new()
        .prefix("bvt")
        .tempdir_in("/tmp")
        .unwrap();
    let bundle = tmp.path().join("b");
    rootfs(&bundle.join("rootfs"));
    let marker = tmp.path().join("marker");
    std::fs::write(&marker, "bound from the host\n").unwrap();
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": process(&[
            "/bin/sh", "-c",
            "echo hello; hostname; cat /marker; ping -c 1 -W 10 10.231.9.1 >/dev/null && echo pong; read line; echo \"got $line\"; exit 3",
        ]),
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "vmbox",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/marker", "type": "bind", "source": marker, "options": ["rbind", "ro"]}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "network", "path": format!("/run/netns/{c}")}
            ],
            "resources": {"memory": {"limit": 268435456}}
        }
    });
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();

    let reaper = Reaper::new();
    tokio::spawn(reaper.run().unwrap());
    let spawner: Arc<dyn Spawner> = Arc::new(reaper.clone());
    let options = VmRuntimeOptions {
        accel: VmAccel::Tcg,
        qemu,
        virtiofsd,
        vhost_vsock,
        agent: Some(agent),
        agent_timeout_secs: 120,
        ..VmRuntimeOptions::default()
    };
    let rt = VmRuntime::new(
        options,
        Box::new(MachineLauncher {
            spawner: spawner.clone(),
            cache_dir: Some(
                std::env::var_os("BERTH_VM_CACHE")
                    .map_or_else(|| tmp.path().join("cache"), PathBuf::from),
            ),
            shim_exe: SHIM.into(),
        }),
        SHIM.into(),
        tmp.path().join("s"),
        Duration::from_secs(60),
    )
    .with_bundle(bundle.clone());

    let (stdin_r, stdin_w) = std::io::pipe().unwrap();
    let (mut out_r, out_w) = pipe();
    let (mut err_r, err_w) = pipe();
    let pid_file = bundle.join("init.pid");
    let created = rt
        .create(
            "c1",
            CreateOptions {
                bundle: bundle.clone(),
                pid_file: pid_file.clone(),
                console_socket: None,
                stdio: ProcessStdio {
                    stdin: Some(OwnedFd::from(stdin_r)),
                    stdout: Some(out_w),
                    stderr: Some(err_w),
                },
            },
        )
        .await;
    let result = async {
        created?;
        let init: u32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
        let init_exit = spawner.watch(init);
        // The tap is in the container's namespace, the guest NIC behind it.
        let taps = reaped(
            &*spawner,
            Command::new("ip").args(["-n", &c, "link", "show", "tap0"]),
        )
        .await?;
        anyhow::ensure!(taps.0, "no tap0");
        rt.start("c1").await?;

        // The host reaches the container's IP: the guest answers.
        let ping = reaped(
            &*spawner,
            Command::new("ip").args([
                "netns",
                "exec",
                &h,
                "busybox",
                "ping",
                "-c",
                "1",
                "-W",
                "20",
                "10.231.9.2",
            ]),
        )
        .await?;
        anyhow::ensure!(ping.0, "host → guest ping: {}", ping.1);

        // An exec, through the agent and its own relay.
        let process = tmp.path().join("exec.json");
        std::fs::write(
            &process,
            process_json(&["/bin/sh", "-c", "echo exec-ok; exit 5"]),
        )?;
        let (mut exec_r, exec_w) = pipe();
        let exec_pid = bundle.join("exec.pid");
        rt.exec(
            "c1",
            ExecOptions {
                process,
                pid_file: exec_pid.clone(),
                console_socket: None,
                stdio: ProcessStdio {
                    stdin: None,
                    stdout: Some(exec_w),
                    stderr: None,
                },
            },
        )
        .await?;
        let exec: u32 = std::fs::read_to_string(&exec_pid)?.trim().parse()?;
        let exec_exit = spawner.watch(exec).await?;
        let mut exec_out = String::new();
        exec_r.read_to_string(&mut exec_out)?;
        anyhow::ensure!(exec_out == "exec-ok\n", "exec output {exec_out:?}");
        anyhow::ensure!(exec_exit.status == 5, "exec status {}", exec_exit.status);

        // Stdin reaches the init; it exits 3, and so does its relay.
        (&stdin_w).write_all(b"line\n")?;
        let exit = tokio::time::timeout(Duration::from_secs(60), init_exit).await??;
        let mut out = String::new();
        out_r.read_to_string(&mut out)?;
        let mut err = String::new();
        err_r.read_to_string(&mut err)?;
        anyhow::ensure!(
            out == "hello\nvmbox\nbound from the host\npong\ngot line\n",
            "init stdout {out:?} stderr {err:?}"
        );
        anyhow::ensure!(
            exit.status == 3,
            "init status {} stderr {err:?}",
            exit.status
        );
        anyhow::ensure!(rt.state("c1").await?.status == "stopped");
        Ok::<_, anyhow::Error>(())
    }
    .await;
    drop(stdin_w);
    // Delete whatever happened: VM down, tap gone, share unmounted.
    let deleted = rt.delete("c1", true).await;
    if let Err(e) = &result {
        let log = std::fs::read_to_string(tmp.path().join("s/c1/console.log")).unwrap_or_default();
        eprintln!(
            "console log tail: {}",
            &log[log.len().saturating_sub(3000)..]
        );
        panic!("{e:#}");
    }
    deleted.unwrap();
    let taps = reaped(
        &*spawner,
        Command::new("ip").args(["-n", &c, "link", "show", "tap0"]),
    )
    .await
    .unwrap();
    assert!(!taps.0, "tap0 is still there");
    assert!(!bundle.join("vm").exists());
    assert!(!tmp.path().join("s/c1").exists());
}

/// Runs `cmd` through the reaper: this process' children are all reaped by it, so
/// `Command::output` would race it for the exit (ECHILD). Success, and stdout with stderr.
async fn reaped(spawner: &dyn Spawner, cmd: &mut Command) -> anyhow::Result<(bool, String)> {
    let (mut out_r, out_w) = std::io::pipe()?;
    cmd.stdin(Stdio::null())
        .stderr(out_w.try_clone()?)
        .stdout(out_w);
    let (_, exit) = spawner.spawn(cmd)?;
    // The command keeps its copies of the write end until told otherwise.
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let out = tokio::task::spawn_blocking(move || {
        let mut out = String::new();
        let _ = out_r.read_to_string(&mut out);
        out
    })
    .await?;
    Ok((exit.await?.status == 0, out))
}

fn process_json(args: &[&str]) -> String {
    process(args).to_string()
}
