//! Issue 16: `docker run --runtime berth-vm` through the real docker CLI and a whole stack: the
//! container runs under its own guest kernel (TCG here), keeps its exit code, its network
//! (published port through the tc mirror), its bind mounts, exec and a terminal; what a VM
//! cannot honour is refused by name; `docker info` lists the runtime with its accelerator;
//! `docker stats` shows the guest container's memory use and limit; and nothing is left behind
//! (VM processes, state directories, share mounts).
//!
//! Root only; skips (saying why) without the docker tests' tools, QEMU, virtiofsd,
//! vhost-device-vsock (on PATH), the guest kernel package (`/var/cache/berth/vm`) or the
//! `berth-agent` binary.

use std::path::Path;

use anyhow::{Result, ensure};
use berth_integration::gateway_kit::{DockerStack, http_get, ready};
use berth_integration::py_kit;

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

fn vm_ready() -> bool {
    for tool in ["qemu-system-x86_64", "virtiofsd", "vhost-device-vsock"] {
        if !on_path(tool) {
            eprintln!("skipped: {tool} is not on PATH");
            return false;
        }
    }
    let kernel = std::fs::read_dir("/var/cache/berth/vm")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("linux-image-"))
        })
        .unwrap_or(false);
    if !kernel {
        eprintln!("skipped: no guest kernel package (deploy/install-deps.sh)");
        return false;
    }
    true
}

/// VM processes whose command line names `dir` (the stack's VM state lives under it).
fn vm_processes(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&needle) && !cmd.contains("vm_runtime-") {
                found.push(cmd);
            }
        }
    }
    found
}

/// A size as the docker CLI prints it ("1.5MiB", "200MiB", "712KiB", "0B").
fn bytes(text: &str) -> Option<u64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = text.split_at(split);
    let scale = match unit {
        "B" => 1u64,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    Some((n.parse::<f64>().ok()? * scale as f64) as u64)
}

#[test]
fn docker_runs_containers_in_berth_vm_guests() -> Result<()> {
    if !ready() || !vm_ready() {
        return Ok(());
    }
    let scratch = tempfile::tempdir()?;
    let cache = scratch.path().join("guest-images");
    let d = DockerStack::start_with(&format!(
        "[engine.runtimes.berth-vm]\npath = \"berth-vm\"\nargs = [\"--accel=auto\", \"--image-cache={}\"]\n",
        cache.display()
    ))?;
    let agent = berth_integration::stack::bin_dir().join("berth-agent");
    if !agent.is_file() {
        eprintln!("skipped: {} is not built", agent.display());
        return Ok(());
    }
    let _registry = py_kit::with_busybox(&d)?;

    let info = d.ok(&["info", "--format", "{{json .Runtimes}}"])?;
    ensure!(
        info.contains(r#""berth-vm":{"path":"berth-vm""#) && info.contains("accelerator"),
        "docker info: {info}"
    );

    // Its own kernel, the container's exit code.
    let host_release = nix::sys::utsname::uname()?
        .release()
        .to_string_lossy()
        .into_owned();
    let out = d.run(&[
        "run",
        "--rm",
        "--runtime",
        "berth-vm",
        "busybox",
        "sh",
        "-c",
        "uname -r; echo hello; exit 7",
    ])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    let guest_release = lines.next().unwrap_or_default();
    ensure!(
        !guest_release.is_empty() && guest_release != host_release,
        "guest kernel {guest_release:?} (host {host_release}), stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(lines.next() == Some("hello"), "stdout {stdout:?}");
    ensure!(out.status.code() == Some(7), "status {}", out.status);

    // Refused by name.
    for (args, phrase) in [
        (&["--network", "host"][..], "--network host"),
        (&["--pid", "host"][..], "--pid host"),
        (&["--device", "/dev/fuse"][..], "device /dev/fuse"),
    ] {
        let mut cmd = vec!["run", "--rm", "--runtime", "berth-vm"];
        cmd.extend_from_slice(args);
        cmd.extend_from_slice(&["busybox", "true"]);
        let (_, err) = d.fails(&cmd)?;
        ensure!(
            err.contains(phrase) && err.contains("berth-vm"),
            "{args:?}: {err}"
        );
    }

    // A server: a published port and a read-only bind mount reach it; exec runs beside it.
    let www = scratch.path().join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("index.html"), "served from a berth-vm guest\n")?;
    let volume = format!("{}:/www:ro", www.display());
    let id = d.ok(&[
        "run",
        "-d",
        "--runtime",
        "berth-vm",
        "-p",
        "127.0.0.1::80",
        "-m",
        "200m",
        "-v",
        &volume,
        "busybox",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ])?;
    let port = d.ok(&["port", &id, "80"])?;
    let addr = port.lines().next().unwrap_or_default().to_string();
    let mut body = String::new();
    for _ in 0..30 {
        if let Ok(b) = http_get(&addr, "/") {
            body = b;
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    ensure!(
        body.contains("served from a berth-vm guest"),
        "GET {addr}: {body:?}"
    );
    let out = d.run(&["exec", &id, "sh", "-c", "uname -r; exit 4"])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == guest_release
            && out.status.code() == Some(4),
        "exec: {out:?}"
    );
    let (_, err) = d.fails(&["pause", &id])?;
    ensure!(
        err.contains("berth-vm does not support pause"),
        "pause: {err}"
    );
    // Stats are the guest container's (its cgroup in the guest, through the agent), not those
    // of the shim's cgroup where its host stand-in runs beside QEMU: the 200 MiB limit, a
    // usage well under it, its processes.
    let stats = d.ok(&[
        "stats",
        "--no-stream",
        "--format",
        "{{.MemUsage}}|{{.PIDs}}",
        &id,
    ])?;
    let (usage, rest) = stats.trim().split_once(" / ").unwrap_or_default();
    let (limit, pids) = rest.split_once('|').unwrap_or_default();
    let (usage, limit) = (bytes(usage), bytes(limit));
    ensure!(
        limit == Some(200 << 20) && usage.is_some_and(|u| u > 0 && u < 100 << 20),
        "docker stats: {stats:?}"
    );
    ensure!(
        pids.parse::<u32>().is_ok_and(|n| n >= 1),
        "docker stats: {stats:?}"
    );
    // Network counters are the container's eth0 in its namespace (where the guest's frames
    // are mirrored), not the host's: the GET above is in them, the host's traffic is not, and
    // the tap that mirrors eth0 is not counted twice.
    let raw = std::process::Command::new("curl")
        .arg("-sf")
        .arg("--unix-socket")
        .arg(d.socket())
        .arg(format!(
            "http://berth/containers/{}/stats?stream=false",
            id.trim()
        ))
        .output()?;
    let json: serde_json::Value = serde_json::from_slice(&raw.stdout)?;
    let nets = &json["networks"];
    let rx = nets["eth0"]["rx_bytes"].as_u64().unwrap_or(0);
    ensure!(
        rx > 0 && rx < 10 << 20 && nets.get("tap0").is_none(),
        "networks in stats: {nets}"
    );
    d.ok(&["rm", "-f", &id])?;

    // A terminal.
    let out = d.in_pty("run -it --rm --runtime berth-vm busybox sh -c 'tty; exit 3'")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("/dev/pts/0") && out.status.code() == Some(3),
        "tty: {out:?}"
    );

    // Nothing left: no VM process, no VM state, no share mount.
    let vm_state = Path::new("/run/berth-vm");
    let left: Vec<_> = std::fs::read_dir(vm_state)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let procs = vm_processes(&cache);
    let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter(|l| l.contains(&*d.stack.state_dir().to_string_lossy()) && l.contains("/vm/share"))
        .map(str::to_string)
        .collect();
    ensure!(
        procs.is_empty() && mounts.is_empty(),
        "left behind: {procs:?} {mounts:?} {left:?}"
    );
    Ok(())
}
