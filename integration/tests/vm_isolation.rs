//! Issue 16, the rest of `docker run --runtime berth-vm` (`vm_runtime.rs` has the basics):
//! isolation (processes, mounts, a kernel module and the hostname stay in the guest), a user
//! network with two VMs reaching each other by name, a named volume written in the guest, `docker
//! stop`'s SIGTERM and `docker kill`'s 137, `kill -9` of every daemon with a VM serving, and a
//! missing QEMU or kernel and a guest that never answers failing clearly and leaving nothing.
//! TCG unless `BERTH_TEST_VM_ACCEL` says otherwise. Root only; skips with the reason when QEMU,
//! virtiofsd, vhost-device-vsock or the guest kernel package is missing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use berth_core::Service;
use berth_integration::gateway_kit::{DockerStack, http_get};
use berth_integration::py_kit;
use berth_integration::stack::{Stack, wait_for};

/// The accelerator the tests ask for: TCG unless `BERTH_TEST_VM_ACCEL` says otherwise.
fn accel() -> String {
    std::env::var("BERTH_TEST_VM_ACCEL").unwrap_or_else(|_| "tcg".into())
}

/// The config that registers `berth-vm` with the tests' accelerator, its guest images built
/// into `cache` (the test's own, removed with it).
fn vm_toml(cache: &Path, extra_args: &[&str]) -> String {
    let mut args = vec![
        format!("\"--accel={}\"", accel()),
        format!("\"--image-cache={}\"", cache.display()),
    ];
    args.extend(extra_args.iter().map(|a| format!("{a:?}")));
    format!(
        "[engine.runtimes.berth-vm]\npath = \"berth-vm\"\nargs = [{}]\n",
        args.join(", ")
    )
}

/// Why VM tests cannot run here, if they cannot.
fn missing() -> Option<String> {
    if !berth_integration::gateway_kit::ready() {
        return Some("the docker CLI stack is not available".into());
    }
    for tool in ["qemu-system-x86_64", "virtiofsd", "vhost-device-vsock"] {
        if which(tool).is_none() {
            return Some(format!("{tool} is not installed (deploy/install-deps.sh)"));
        }
    }
    if !berth_integration::stack::bin_dir()
        .join("berth-agent")
        .is_file()
    {
        return Some("berth-agent is not built".into());
    }
    if kernel_deb().is_none() {
        return Some("no guest kernel package in /var/cache/berth/vm".into());
    }
    None
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// The guest kernel package install-deps downloads.
fn kernel_deb() -> Option<PathBuf> {
    std::fs::read_dir("/var/cache/berth/vm")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-image-") && n.ends_with(".deb"))
        })
}

fn vm_stack(cache: &Path) -> Result<DockerStack> {
    DockerStack::start_from(Stack::builder().toml(&vm_toml(cache, &[])))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Extracts one module of the guest kernel package into `dir`; returns its file name.
fn guest_module(dir: &Path, name: &str) -> Result<String> {
    let deb = kernel_deb().context("guest kernel package")?;
    let listing = std::process::Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    let member = listing
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .find(|p| p.ends_with(&format!("/{name}.ko")))
        .with_context(|| format!("{name}.ko in {}", deb.display()))?
        .to_string();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dpkg-deb --fsys-tarfile '{}' | tar -xO '{member}' > '{}/{name}.ko'",
            deb.display(),
            dir.display()
        ))
        .status()?;
    ensure!(status.success(), "extract {member}");
    Ok(format!("{name}.ko"))
}

#[test]
fn a_vm_container_has_its_own_kernel_and_sees_nothing_of_the_host() -> Result<()> {
    if let Some(why) = missing() {
        println!("skipped: {why}");
        return Ok(());
    }
    let cache = tempfile::tempdir()?;
    let d = vm_stack(cache.path())?;
    let _registry = py_kit::with_busybox(&d)?;
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;

    // `docker info` names the runtime and the accelerator it runs with.
    let info = d.ok(&["info", "--format", "{{json .Runtimes}}"])?;
    ensure!(info.contains("berth-vm"), "runtimes: {info}");

    let modules = tempfile::tempdir()?;
    let module = guest_module(modules.path(), "dummy")?;
    let mount = format!("{}:/m:ro", modules.path().display());
    let script = format!(
        "uname -r; echo ---; ps -o pid,comm; echo ---; cat /proc/mounts; echo ---; \
         hostname vm-only; cat /proc/sys/kernel/hostname; echo ---; \
         insmod /m/{module} && grep -c '^dummy ' /proc/modules"
    );
    let out = d.ok(&[
        "run",
        "--rm",
        "--runtime",
        "berth-vm",
        "--privileged",
        "-v",
        &mount,
        "busybox",
        "sh",
        "-c",
        &script,
    ])?;
    let parts: Vec<&str> = out.split("---\n").collect();
    ensure!(parts.len() == 5, "output: {out}");
    let release = parts[0].trim();
    ensure!(
        release.starts_with("6.1.") && release != host_release.trim(),
        "guest kernel {release:?}, host {host_release:?}"
    );
    // Only the container's own processes: sh and ps (and nothing of the host's).
    let procs: Vec<&str> = parts[1].lines().skip(1).collect();
    ensure!(procs.len() <= 3, "processes seen in the VM: {}", parts[1]);
    for host_only in ["berth", "qemu", "virtiofsd", "systemd", "dockerd", "cargo"] {
        ensure!(
            !parts[1].contains(host_only),
            "{host_only} visible: {}",
            parts[1]
        );
    }
    // None of the host's mounts: not its root disk, not berth's state.
    let state = d.stack.state_dir();
    ensure!(
        !parts[2].contains("/dev/vda") && !parts[2].contains(&*state.to_string_lossy()),
        "host mounts visible: {}",
        parts[2]
    );
    ensure!(parts[3].trim() == "vm-only", "guest hostname: {}", parts[3]);
    ensure!(
        parts[4].trim() == "1",
        "module not loaded in the guest: {out}"
    );
    ensure!(
        std::fs::read_to_string("/proc/sys/kernel/hostname")? == host_name,
        "the host's hostname changed"
    );
    // (A host built without module support has no /proc/modules: nothing reached it either.)
    ensure!(
        !std::fs::read_to_string("/proc/modules")
            .unwrap_or_default()
            .contains("dummy "),
        "the module reached the host"
    );

    // Exit codes come back as runc's would.
    let (code, _) = d.fails(&[
        "run",
        "--rm",
        "--runtime",
        "berth-vm",
        "busybox",
        "sh",
        "-c",
        "exit 3",
    ])?;
    ensure!(code == 3, "exit code {code}");
    Ok(())
}

#[test]
fn a_detached_vm_container_serves_execs_stops_and_outlives_the_daemons() -> Result<()> {
    if let Some(why) = missing() {
        println!("skipped: {why}");
        return Ok(());
    }
    let cache = tempfile::tempdir()?;
    let d = vm_stack(cache.path())?;
    let _registry = py_kit::with_busybox(&d)?;
    let tag = std::process::id();
    let net = format!("vmnet{tag}");
    let (web, vol) = (format!("vmweb{tag}"), format!("vmvol{tag}"));
    d.ok(&["network", "create", &net])?;
    let port = free_port()?;
    let publish = format!("127.0.0.1:{port}:80");
    let volume = format!("{vol}:/www");
    d.ok(&[
        "run",
        "-d",
        "--runtime",
        "berth-vm",
        "--name",
        &web,
        "--network",
        &net,
        "-p",
        &publish,
        "-v",
        &volume,
        "busybox",
        "sh",
        "-c",
        "echo hello-from-vm > /www/index.html; echo serving; exec httpd -f -p 80 -h /www",
    ])?;
    let addr = format!("127.0.0.1:{port}");
    let served = wait_for(Duration::from_secs(60), || {
        http_get(&addr, "/")
            .ok()
            .filter(|r| r.contains("hello-from-vm"))
    });
    ensure!(served.is_some(), "the published port never answered");

    // The volume written inside the VM is on the host.
    let mountpoint = d.ok(&["volume", "inspect", "-f", "{{.Mountpoint}}", &vol])?;
    let on_host = std::fs::read_to_string(Path::new(mountpoint.trim()).join("index.html"))?;
    ensure!(
        on_host.trim() == "hello-from-vm",
        "volume on the host: {on_host}"
    );

    // Exec (with its exit code), logs, and a second VM reaching the first by name.
    ensure!(d.ok(&["exec", &web, "cat", "/www/index.html"])?.trim() == "hello-from-vm");
    let (code, _) = d.fails(&["exec", &web, "sh", "-c", "exit 4"])?;
    ensure!(code == 4, "exec exit code {code}");
    ensure!(d.ok(&["logs", &web])?.contains("serving"));
    let url = format!("http://{web}/");
    let fetched = d.ok(&[
        "run",
        "--rm",
        "--runtime",
        "berth-vm",
        "--network",
        &net,
        "busybox",
        "wget",
        "-qO-",
        &url,
    ])?;
    ensure!(fetched.contains("hello-from-vm"), "by name: {fetched}");

    // A tty: the process sees a terminal, and its exit code comes back.
    let out = d.in_pty("run -it --rm --runtime berth-vm busybox sh -c 'tty; exit 5'")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains("/dev/pts/"), "tty: {text}");
    ensure!(out.status.code() == Some(5), "tty exit: {:?}", out.status);

    // kill -9 of every daemon leaves the VM running and serving.
    for service in Service::ALL {
        d.kill9(service)?;
    }
    let ps = d.ok(&["ps", "--format", "{{.Names}} {{.Status}}"])?;
    ensure!(
        ps.contains(&format!("{web} Up")),
        "after the restarts: {ps}"
    );
    ensure!(
        http_get(&addr, "/")?.contains("hello-from-vm"),
        "the published port after the restarts"
    );
    ensure!(d.ok(&["exec", &web, "true"]).is_ok());

    // docker stop: SIGTERM reaches the process in the guest.
    let trap = format!("vmtrap{tag}");
    d.ok(&[
        "run",
        "-d",
        "--runtime",
        "berth-vm",
        "--name",
        &trap,
        "busybox",
        "sh",
        "-c",
        "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 1; done",
    ])?;
    ensure!(
        wait_for(Duration::from_secs(60), || d
            .ok(&["logs", &trap])
            .ok()
            .filter(|l| l.contains("ready")))
        .is_some(),
        "the trap container never started"
    );
    d.ok(&["stop", "-t", "30", &trap])?;
    let code = d.ok(&["inspect", "-f", "{{.State.ExitCode}}", &trap])?;
    ensure!(code.trim() == "7", "exit code after stop: {code}");
    ensure!(d.ok(&["logs", &trap])?.contains("got-term"));

    // docker kill: 137.
    d.ok(&["kill", &web])?;
    let code = d.ok(&["wait", &web])?;
    ensure!(code.trim() == "137", "exit code after kill: {code}");
    d.ok(&["rm", "-f", &web, &trap])?;
    d.ok(&["network", "rm", &net])?;
    d.ok(&["volume", "rm", &vol])?;
    Ok(())
}

#[test]
fn a_missing_qemu_or_kernel_and_a_silent_guest_fail_clearly_and_leave_nothing() -> Result<()> {
    if let Some(why) = missing() {
        println!("skipped: {why}");
        return Ok(());
    }
    let cases: [(&[&str], &str); 3] = [
        (&["--qemu=/nonexistent/qemu-system-x86_64"], "qemu"),
        (&["--kernel=/nonexistent/linux-image.deb"], "kernel"),
        // busybox as the guest's init: the guest boots and never answers.
        (
            &["--agent=/bin/busybox", "--agent-timeout=8"],
            "did not answer",
        ),
    ];
    for (args, want) in cases {
        let cache = tempfile::tempdir()?;
        let d = DockerStack::start_from(Stack::builder().toml(&vm_toml(cache.path(), args)))?;
        let _registry = py_kit::with_busybox(&d)?;
        let (code, err) = d.fails(&["run", "--rm", "--runtime", "berth-vm", "busybox", "true"])?;
        ensure!(code != 0, "{args:?}: ran");
        ensure!(err.to_lowercase().contains(want), "{args:?}: error {err}");
        // Nothing left: no QEMU, virtiofsd or vsock device process under this stack, no
        // mount of its state.
        let dir = d.stack.dir().to_string_lossy().into_owned();
        let left = wait_for(Duration::from_secs(10), || {
            let procs = processes_mentioning(&dir);
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
            let mounted: Vec<&str> = mounts.lines().filter(|l| l.contains(&dir)).collect();
            (procs.is_empty() && mounted.is_empty()).then_some(())
        });
        if left.is_none() {
            bail!(
                "{args:?}: left behind: processes {:?}",
                processes_mentioning(&dir)
            );
        }
    }
    Ok(())
}

/// Command lines of processes (other than berth's own daemons and shims) that mention `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let first = cmd.split_whitespace().next().unwrap_or("");
        if cmd.contains(needle) && !first.contains("berth") {
            out.push(cmd);
        }
    }
    out
}
