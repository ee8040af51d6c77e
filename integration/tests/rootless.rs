//! Rootless berth end to end: an ordinary user made for the test starts `berth up --rootless`
//! and drives it with the real docker CLI — a pull from the loopback registry, containers whose
//! root is a subordinate uid on the host, a user network with DNS, a published port answered on
//! the host, volumes and bind mounts of the user's files, exec/logs/stop/rm, then `kill -9` of
//! every berth process in turn with containers running, all of them still running once `berth
//! up` is back. No process of the stack ever has uid 0 on the host. Root only (it makes the user).

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use berth_core::Service;
use berth_integration::images_kit::{Registry, RegistryOptions, free_port, oci_dir};
use berth_integration::rootless_kit::{RootlessStack, TestUser, TunAccess, proc_uids};
use berth_integration::stack::{running, wait_for};
use berth_integration::userns_kit;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `curl http://127.0.0.1:PORT/PATH` on the host; the body.
fn http_get(port: u16, path: &str) -> Result<String> {
    let out = std::process::Command::new("curl")
        .args(["-sf", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()?;
    ensure!(out.status.success(), "curl exited {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// The inode of `pid`'s user namespace.
fn userns(pid: i32) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/user"))
        .ok()
        .map(|m| m.ino())
}

/// Every process in the stack's user namespace (the supervisor, services, holder, shims).
fn stack_processes(ns: u64) -> Vec<(i32, String)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| userns(*pid) == Some(ns))
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            (pid, comm.trim().to_string())
        })
        .collect()
}

/// The host's address on the interface of its default route, if it has one.
fn host_address() -> Option<String> {
    let route = std::process::Command::new("ip")
        .args(["-4", "-o", "route", "show", "default"])
        .output()
        .ok()?;
    let route = String::from_utf8_lossy(&route.stdout).to_string();
    let dev = route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)?
        .to_string();
    let addr = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", &dev])
        .output()
        .ok()?;
    let addr = String::from_utf8_lossy(&addr.stdout).to_string();
    let cidr = addr
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)?;
    Some(cidr.split('/').next()?.to_string())
}

/// A one-line HTTP server on every host address, answering `body`, for the test's lifetime.
fn serve_on_host(body: &'static str) -> Result<u16> {
    let listener = std::net::TcpListener::bind("0.0.0.0:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(port)
}

fn slirp_pid(user: &TestUser) -> Result<i32> {
    Ok(
        std::fs::read_to_string(user.state_dir().join("rootless/slirp4netns.pid"))?
            .split_whitespace()
            .next()
            .context("slirp pid")?
            .parse()?,
    )
}

fn read_pid(user: &TestUser, name: &str) -> Option<i32> {
    berth_core::daemon::read_pid_file(&user.state_dir().join(name))
}

#[test]
fn rootless_stack_end_to_end() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: needs root to create the test user");
        return Ok(());
    }
    let _tun = TunAccess::grant()?;
    let registry = Registry::start(RegistryOptions::default())?;
    registry.push_oci(&oci_dir("busybox"), "busybox:latest")?;
    let image = format!("{}/busybox:latest", registry.host);
    let user = TestUser::create()?;
    let mut stack = RootlessStack::start(&user)?;
    let result = exercise(&user, &mut stack, &image);
    if result.is_err() {
        eprintln!("berth up log:\n{}", stack.log_text());
    }
    result
}

fn exercise(user: &TestUser, stack: &mut RootlessStack, image: &str) -> Result<()> {
    // It says what it is.
    let info = user.docker(&["info", "--format", "{{json .SecurityOptions}}"])?;
    ensure!(info.contains("name=rootless"), "docker info: {info}");
    let status = user
        .command(&user.bin.join("berth").display().to_string())
        .arg("status")
        .output()?;
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    ensure!(status.contains("mode: rootless"), "berth status:\n{status}");

    // A pull from the host's loopback registry.
    user.docker(&["pull", image])?;

    // Root inside, a subordinate uid outside.
    let id = user.docker(&["run", "--rm", image, "id"])?;
    ensure!(id.starts_with("uid=0(root) gid=0(root)"), "id: {id}");
    let sleeper = user.docker(&["run", "-d", "--name", "sleeper", image, "sleep", "1000"])?;
    let pid: i32 = user
        .docker(&["inspect", "-f", "{{.State.Pid}}", &sleeper])?
        .parse()?;
    let uids = proc_uids(pid).context("container process")?;
    ensure!(
        uids == [user.subuid.0; 4],
        "the container's root runs as {uids:?} on the host, not the first subordinate uid {}",
        user.subuid.0
    );

    // A user network: two containers reach each other by name; a published port answers on
    // the host.
    user.docker(&["network", "create", "rlnet"])?;
    let port = free_port();
    let publish = format!("127.0.0.1:{port}:80");
    user.docker(&[
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        "rlnet",
        "-p",
        &publish,
        image,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/etc",
    ])?;
    let web_by_name = || {
        user.docker(&[
            "run",
            "--rm",
            "--network",
            "rlnet",
            image,
            "wget",
            "-qO-",
            "http://web/hostname",
        ])
    };
    let by_name = web_by_name()?;
    let web_hostname = user.docker(&["exec", "web", "hostname"])?;
    ensure!(by_name == web_hostname, "{by_name:?} vs {web_hostname:?}");
    let got = wait_for(Duration::from_secs(10), || http_get(port, "/hostname").ok())
        .context("the published port does not answer on the host")?;
    ensure!(got.trim() == web_hostname, "{got:?}");

    // Out through slirp4netns, to the host's own address (no traffic leaves the machine),
    // again after slirp4netns was killed (berth up starts it again).
    match host_address() {
        Some(addr) => {
            let port = serve_on_host("out-ok")?;
            let url = format!("http://{addr}:{port}/");
            let out = user.docker(&["run", "--rm", image, "wget", "-qO-", &url])?;
            ensure!(out == "out-ok", "{out:?}");
            let slirp = slirp_pid(user)?;
            kill(Pid::from_raw(slirp), Signal::SIGKILL)?;
            let again = wait_for(Duration::from_secs(30), || {
                (slirp_pid(user).ok()? != slirp)
                    .then(|| {
                        user.docker(&["run", "--rm", image, "wget", "-qO-", &url])
                            .ok()
                    })
                    .flatten()
            });
            ensure!(
                again.as_deref() == Some("out-ok"),
                "no way out after slirp4netns was killed: {again:?}"
            );
        }
        None => eprintln!("this host has no default route: outbound connectivity not tried"),
    }

    // Volumes and bind mounts of the user's own files.
    let data = user.home.join("data");
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("mine"), "from the user\n")?;
    user.chown(&data)?;
    user.chown(&data.join("mine"))?;
    let bind = format!("{}:/data", data.display());
    let read = user.docker(&["run", "--rm", "-v", &bind, image, "cat", "/data/mine"])?;
    ensure!(read == "from the user", "{read:?}");
    // The user's directory is the user's: the container's root (a subordinate uid) may not
    // write there unless the user lets it, and what it writes is owned by that uid.
    let denied = user.docker_fails(&["run", "--rm", "-v", &bind, image, "touch", "/data/x"])?;
    ensure!(denied.contains("ermission denied"), "{denied}");
    std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    user.docker(&[
        "run",
        "--rm",
        "-v",
        &bind,
        image,
        "sh",
        "-c",
        "echo hi > /data/x",
    ])?;
    let owner = std::fs::metadata(data.join("x"))?.uid();
    ensure!(owner == user.subuid.0, "written as {owner}");
    user.docker(&[
        "run",
        "--rm",
        "-v",
        "rlvol:/v",
        image,
        "sh",
        "-c",
        "echo kept > /v/f",
    ])?;
    let kept = user.docker(&["run", "--rm", "-v", "rlvol:/v", image, "cat", "/v/f"])?;
    ensure!(kept == "kept", "{kept:?}");

    // exec, logs, stop, rm.
    user.docker(&[
        "run",
        "-d",
        "--name",
        "talker",
        image,
        "sh",
        "-c",
        "echo said; sleep 1000",
    ])?;
    ensure!(user.docker(&["exec", "talker", "echo", "exec-ok"])? == "exec-ok");
    let logs = wait_for(Duration::from_secs(10), || {
        user.docker(&["logs", "talker"])
            .ok()
            .filter(|l| l.contains("said"))
    });
    ensure!(logs.is_some(), "logs never showed the output");
    user.docker(&["stop", "-t", "1", "talker"])?;
    let state = user.docker(&["inspect", "-f", "{{.State.Status}}", "talker"])?;
    ensure!(state == "exited", "{state}");
    user.docker(&["rm", "talker"])?;

    // No process of the stack has uid 0 on the host.
    let holder = read_pid(user, "rootless/holder.pid").context("holder pid")?;
    let ns = userns(holder).context("holder's user namespace")?;
    let procs = stack_processes(ns);
    for want in [
        "berth",
        "berth-engine",
        "berth-gateway",
        "berth-network",
        "berth-shim",
    ] {
        ensure!(
            procs
                .iter()
                .any(|(_, c)| c.starts_with(&want[..want.len().min(15)])),
            "no {want} among the stack's processes {procs:?}"
        );
    }
    let slirp = slirp_pid(user)?;
    for (pid, comm) in procs.iter().cloned().chain([(slirp, "slirp4netns".into())]) {
        if let Some(uids) = proc_uids(pid) {
            ensure!(!uids.contains(&0), "{comm} ({pid}) has uids {uids:?}");
        }
    }

    // kill -9 of every berth process in turn; the containers keep running.
    let web_pid: i32 = user
        .docker(&["inspect", "-f", "{{.State.Pid}}", "web"])?
        .parse()?;
    for service in Service::ALL {
        let file = format!("{}.pid", service.name());
        let old = read_pid(user, &file).context("service pid")?;
        kill(Pid::from_raw(old), Signal::SIGKILL)?;
        let back = wait_for(Duration::from_secs(30), || {
            read_pid(user, &file)
                .filter(|p| *p != old && running(*p))
                .and_then(|_| user.docker(&["ps", "-q"]).ok())
        });
        ensure!(back.is_some(), "{} did not come back", service.name());
    }
    kill(Pid::from_raw(holder), Signal::SIGKILL)?;
    let up = read_pid(user, "berth.pid").context("berth up pid")?;
    kill(Pid::from_raw(up), Signal::SIGKILL)?;
    stack.reap();
    let services_gone = wait_for(Duration::from_secs(20), || {
        Service::ALL
            .iter()
            .all(|s| read_pid(user, &format!("{}.pid", s.name())).is_none_or(|p| !running(p)))
            .then_some(())
    });
    ensure!(services_gone.is_some(), "services outlived berth up");
    ensure!(
        running(web_pid) && running(pid),
        "containers died with the stack"
    );
    *stack = RootlessStack::start(user)?;
    let new_holder = read_pid(user, "rootless/holder.pid").context("holder pid")?;
    ensure!(new_holder != holder, "the holder was not replaced");
    ensure!(
        userns(new_holder) == Some(ns),
        "the restarted stack made new namespaces"
    );
    let ps = user.docker(&["ps", "--format", "{{.Names}}"])?;
    for name in ["web", "sleeper"] {
        ensure!(
            ps.lines().any(|l| l == name),
            "{name} not running after restart: {ps}"
        );
    }
    let got = wait_for(Duration::from_secs(20), || http_get(port, "/hostname").ok())
        .context("the published port does not answer after the restart")?;
    ensure!(got.trim() == web_hostname, "{got:?}");
    ensure!(user.docker(&["exec", "web", "echo", "still"])? == "still");
    let again = web_by_name()?;
    ensure!(again == web_hostname, "{again:?}");

    // Escapes, each refused (the same attempts as under rootful userns-remap).
    user.docker(&["tag", image, "busybox:latest"])?;
    userns_kit::assert_escapes_refused(user)?;

    user.docker(&["rm", "-f", "web", "sleeper"])?;
    user.docker(&["network", "rm", "rlnet"])?;
    stack.stop(user);
    if stack.log_text().contains("panicked") {
        bail!("a service panicked");
    }
    Ok(())
}
