//! The Docker CLI scenario of issue 8, against a real `berth up` stack: the unmodified `docker`
//! client (28.x, negotiating API 1.45) drives every step, with a loopback registry for pulls and
//! pushes and an htpasswd registry for `docker login`. The gateway is `kill -9`ed in the middle;
//! running containers, logs and events must not notice.
//!
//! Root only (mounts, netns, cgroups); skips cleanly otherwise.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use berth_integration::gateway_kit::{DockerStack, http_get, ready, write_file};
use berth_integration::images_kit::{Registry, RegistryOptions, free_port, oci_dir};
use berth_integration::stack::wait_for;

fn has_rfc3339_prefix(line: &str) -> bool {
    // 2026-11-27T21:13:02.326384647Z tick 0
    let b = line.as_bytes();
    b.len() > 31 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && b[29] == b'Z' && b[30] == b' '
}

#[test]
fn docker_cli_scenario() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let registry = Registry::start(RegistryOptions::default())?;
    registry.push_oci(&oci_dir("busybox"), "busybox:latest")?;
    let reg = registry.host.clone();
    let busybox = format!("{reg}/busybox:latest");
    let d = DockerStack::start()?;
    let scratch = tempfile::tempdir()?;

    // --- version and info -------------------------------------------------------------------
    let v = d.ok(&[
        "version",
        "--format",
        "{{.Server.APIVersion}} {{.Client.APIVersion}}",
    ])?;
    ensure!(v.starts_with("1.45 "), "negotiated versions: {v}");
    let info = d.ok(&[
        "info",
        "--format",
        "{{.ServerVersion}}|{{.Driver}}|{{.CgroupDriver}}|{{.NCPU}}|{{.OSType}}",
    ])?;
    let parts: Vec<&str> = info.split('|').collect();
    ensure!(
        parts.len() == 5 && parts[2] == "cgroupfs" && parts[4] == "linux",
        "info: {info}"
    );
    ensure!(parts[3].parse::<u32>()? >= 1, "NCPU: {info}");

    // --- pull with progress; images --------------------------------------------------------
    let pull = d.ok(&["pull", &busybox])?;
    for want in [
        "latest: Pulling from busybox",
        "Pull complete",
        "Digest: sha256:",
        &format!("Status: Downloaded newer image for {busybox}"),
    ] {
        ensure!(pull.contains(want), "pull output lacks {want:?}:\n{pull}");
    }
    let images = d.ok(&["images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"])?;
    ensure!(images.contains(&busybox), "docker images: {images}");
    d.ok(&["tag", &busybox, "busybox"])?;

    // --- run: --rm echo, exit codes ---------------------------------------------------------
    ensure!(d.ok(&["run", "--rm", "busybox", "echo", "hello from berth"])? == "hello from berth");
    let out = d.run(&["run", "--rm", "busybox", "sh", "-c", "exit 3"])?;
    ensure!(out.status.code() == Some(3), "exit code: {:?}", out.status);
    ensure!(d.ok(&["ps", "-aq"])?.is_empty(), "--rm left a container");

    // --- published port answered on loopback -----------------------------------------------
    let port = free_port();
    d.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "-p",
        &format!("127.0.0.1:{port}:80"),
        "busybox",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/etc",
    ])?;
    let addr = format!("127.0.0.1:{port}");
    let mut last = String::new();
    let page = wait_for(Duration::from_secs(10), || {
        match http_get(&addr, "/passwd") {
            Ok(r) if r.lines().next().is_some_and(|l| l.contains(" 200 ")) => Some(r),
            Ok(r) => {
                last = r;
                None
            }
            Err(e) => {
                last = e.to_string();
                None
            }
        }
    })
    .with_context(|| {
        format!(
            "httpd never answered on {addr}: {last}; ps: {:?}; logs: {:?}",
            d.ok(&["ps", "-a"]),
            d.run(&["logs", "web"])
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        )
    })?;
    ensure!(page.contains("root:"), "{page}");

    // --- logs, with timestamps and -f -------------------------------------------------------
    d.ok(&[
        "run",
        "-d",
        "--name",
        "ticker",
        "busybox",
        "sh",
        "-c",
        "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done",
    ])?;
    let follow = d.spawn(&["logs", "-f", "-t", "ticker"])?;
    ensure!(
        follow.wait_stdout(Duration::from_secs(10), |s| s.lines().count() >= 3),
        "logs -f: {}{}",
        follow.stdout(),
        follow.stderr()
    );
    let first = follow.stdout().lines().next().unwrap_or("").to_string();
    ensure!(
        has_rfc3339_prefix(&first) && first.ends_with("tick 0"),
        "timestamped line: {first:?}"
    );
    let tail = d.ok(&["logs", "--tail", "1", "ticker"])?;
    ensure!(
        tail.starts_with("tick ") && tail.lines().count() == 1,
        "logs --tail 1: {tail}"
    );

    // --- exec: plain, env + user, exit code, stdin, -it under a pty ------------------------
    ensure!(d.ok(&["exec", "ticker", "echo", "in-exec"])? == "in-exec");
    let eu = d.ok(&[
        "exec",
        "-e",
        "FOO=bar",
        "-u",
        "nobody",
        "ticker",
        "sh",
        "-c",
        "echo $FOO; id -u",
    ])?;
    ensure!(eu == "bar\n65534", "exec env/user: {eu:?}");
    ensure!(
        d.run(&["exec", "ticker", "sh", "-c", "exit 4"])?
            .status
            .code()
            == Some(4)
    );
    let mut child = d
        .cmd(&["exec", "-i", "ticker", "cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(b"through stdin\n")?;
    }
    let out = child.wait_with_output()?;
    ensure!(
        String::from_utf8_lossy(&out.stdout) == "through stdin\n",
        "exec -i: {out:?}"
    );
    let tty = d.in_pty("exec -it ticker sh -c 'tty; echo tty-ok'")?;
    let tty_out = String::from_utf8_lossy(&tty.stdout);
    ensure!(
        tty.status.success() && tty_out.contains("/dev/pts/") && tty_out.contains("tty-ok"),
        "exec -it: {tty_out:?}"
    );

    // --- attach ------------------------------------------------------------------------------
    let attach = d.spawn(&["attach", "--no-stdin", "--sig-proxy=false", "ticker"])?;
    ensure!(
        attach.wait_stdout(Duration::from_secs(10), |s| s.contains("tick ")),
        "attach saw no output: {}",
        attach.stderr()
    );
    drop(attach);

    // --- top, stats, inspect, ps -----------------------------------------------------------
    let top = d.ok(&["top", "ticker"])?;
    ensure!(
        top.contains("PID") && top.contains("while true"),
        "top: {top}"
    );
    let stats = d.ok(&[
        "stats",
        "--no-stream",
        "--format",
        "{{.Name}} {{.CPUPerc}} {{.MemUsage}} {{.PIDs}}",
        "ticker",
    ])?;
    ensure!(
        stats.starts_with("ticker ") && stats.contains('%') && stats.contains("iB"),
        "stats: {stats}"
    );
    let ip = d.ok(&[
        "inspect",
        "-f",
        "{{.State.Running}} {{.NetworkSettings.IPAddress}} {{len .Mounts}}",
        "web",
    ])?;
    let f: Vec<&str> = ip.split(' ').collect();
    ensure!(
        f[0] == "true" && f[1].parse::<std::net::Ipv4Addr>().is_ok() && f[2] == "0",
        "inspect: {ip}"
    );
    let ports = d.ok(&["inspect", "-f", "{{json .NetworkSettings.Ports}}", "web"])?;
    ensure!(
        ports.contains(&format!("\"HostPort\":\"{port}\"")),
        "ports: {ports}"
    );
    let ps = d.ok(&[
        "ps",
        "--filter",
        "name=tick",
        "--format",
        "{{.Names}}|{{.Image}}|{{.Status}}",
    ])?;
    ensure!(ps.starts_with("ticker|busybox|Up "), "ps --filter: {ps}");
    let ps = d.ok(&[
        "ps",
        "--filter",
        "publish=80",
        "--format",
        "{{.Names}} {{.Ports}}",
    ])?;
    ensure!(
        ps == format!("web 127.0.0.1:{port}->80/tcp"),
        "ps publish filter: {ps}"
    );

    // --- gateway kill -9 in the middle -----------------------------------------------------
    let follow_across = d.spawn(&["logs", "-f", "--tail", "0", "ticker"])?;
    ensure!(follow_across.wait_stdout(Duration::from_secs(5), |s| !s.is_empty()));
    let (old, new) = d.kill9_gateway()?;
    println!("gateway kill -9: pid {old} -> {new}");
    let ps = d.ok(&["ps", "--format", "{{.Names}} {{.Status}}"])?;
    ensure!(
        ps.contains("ticker Up") && ps.contains("web Up"),
        "containers after the gateway restart: {ps}"
    );
    ensure!(
        http_get(&addr, "/passwd")?.contains(" 200 OK"),
        "published port after restart"
    );
    let follow_again = d.spawn(&["logs", "-f", "--tail", "1", "ticker"])?;
    ensure!(
        follow_again.wait_stdout(Duration::from_secs(10), |s| s.lines().count() >= 3),
        "logs -f after the restart: {}",
        follow_again.stderr()
    );
    drop(follow_again);
    drop(follow_across);
    drop(follow);

    // --- stop, start, restart, kill + wait -------------------------------------------------
    d.ok(&["stop", "-t", "1", "ticker"])?;
    let st = d.ok(&["inspect", "-f", "{{.State.Status}}", "ticker"])?;
    ensure!(st == "exited", "after stop: {st}");
    d.ok(&["start", "ticker"])?;
    d.ok(&["restart", "-t", "1", "ticker"])?;
    ensure!(d.ok(&["inspect", "-f", "{{.State.Running}}", "ticker"])? == "true");
    d.ok(&["kill", "ticker"])?;
    ensure!(d.ok(&["wait", "ticker"])? == "137", "wait after kill");

    // --- pause, unpause, rename ------------------------------------------------------------
    d.ok(&["pause", "web"])?;
    ensure!(
        d.ok(&["ps", "--filter", "name=web", "--format", "{{.Status}}"])?
            .ends_with("(Paused)")
    );
    d.ok(&["unpause", "web"])?;
    d.ok(&["rename", "web", "web2"])?;
    ensure!(d.ok(&["ps", "--format", "{{.Names}}"])? == "web2");

    // --- cp in and out ---------------------------------------------------------------------
    let src = write_file(scratch.path(), "in.txt", "copied in\n")?;
    d.ok(&["cp", src.to_str().context("path")?, "web2:/tmp/in.txt"])?;
    ensure!(d.ok(&["exec", "web2", "cat", "/tmp/in.txt"])? == "copied in");
    d.ok(&[
        "exec",
        "web2",
        "sh",
        "-c",
        "echo made inside > /tmp/out.txt",
    ])?;
    let dst = scratch.path().join("out.txt");
    d.ok(&["cp", "web2:/tmp/out.txt", dst.to_str().context("path")?])?;
    ensure!(std::fs::read_to_string(&dst)? == "made inside\n");
    let (_, err) = d.fails(&["cp", "web2:/nonexistent", dst.to_str().context("path")?])?;
    ensure!(
        err.contains("Could not find the file /nonexistent in container web2"),
        "{err}"
    );

    // --- volumes and bind mounts -----------------------------------------------------------
    d.ok(&["volume", "create", "scenario-vol"])?;
    ensure!(
        d.ok(&["volume", "ls", "--format", "{{.Name}}"])?
            .lines()
            .any(|l| l == "scenario-vol")
    );
    d.ok(&[
        "run",
        "--rm",
        "-v",
        "scenario-vol:/data",
        "busybox",
        "sh",
        "-c",
        "echo kept > /data/f",
    ])?;
    ensure!(
        d.ok(&[
            "run",
            "--rm",
            "-v",
            "scenario-vol:/data",
            "busybox",
            "cat",
            "/data/f"
        ])? == "kept"
    );
    let host_dir = scratch.path().join("bind");
    std::fs::create_dir(&host_dir)?;
    std::fs::write(host_dir.join("h"), "from host\n")?;
    let bind = format!("{}:/b", host_dir.display());
    ensure!(
        d.ok(&[
            "run",
            "--rm",
            "-v",
            &format!("{bind}:ro"),
            "busybox",
            "cat",
            "/b/h"
        ])? == "from host"
    );
    d.ok(&[
        "run",
        "--rm",
        "-v",
        &bind,
        "busybox",
        "sh",
        "-c",
        "echo from container > /b/c",
    ])?;
    ensure!(std::fs::read_to_string(host_dir.join("c"))? == "from container\n");
    d.ok(&[
        "run",
        "-d",
        "--name",
        "mounts",
        "-v",
        "scenario-vol:/data",
        "-v",
        &format!("{bind}:ro"),
        "busybox",
        "sleep",
        "300",
    ])?;
    let mounts = d.ok(&[
        "inspect",
        "-f",
        "{{range .Mounts}}{{.Type}}:{{.Destination}}:{{.RW}} {{end}}",
        "mounts",
    ])?;
    ensure!(
        mounts.contains("volume:/data:true") && mounts.contains("bind:/b:false"),
        "Mounts: {mounts}"
    );
    let (_, err) = d.fails(&["volume", "rm", "scenario-vol"])?;
    ensure!(err.contains("volume is in use"), "{err}");
    d.ok(&["rm", "-f", "mounts"])?;
    d.ok(&["volume", "rm", "scenario-vol"])?;

    // --- user network: reach each other by name; connect and disconnect ------------------
    d.ok(&["network", "create", "scenario-net"])?;
    d.ok(&[
        "run",
        "-d",
        "--name",
        "srv",
        "--network",
        "scenario-net",
        "busybox",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/etc",
    ])?;
    d.ok(&[
        "run",
        "-d",
        "--name",
        "peer",
        "--network",
        "scenario-net",
        "busybox",
        "sleep",
        "300",
    ])?;
    let got = wait_for(Duration::from_secs(10), || {
        d.ok(&[
            "exec",
            "peer",
            "wget",
            "-q",
            "-O",
            "-",
            "http://srv/hostname",
        ])
        .ok()
    })
    .context("peer never reached srv by name")?;
    ensure!(!got.is_empty());
    d.ok(&["run", "-d", "--name", "outsider", "busybox", "sleep", "300"])?;
    d.ok(&["network", "connect", "scenario-net", "outsider"])?;
    let nets = d.ok(&[
        "inspect",
        "-f",
        "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
        "outsider",
    ])?;
    ensure!(
        nets.contains("scenario-net") && nets.contains("bridge"),
        "after connect: {nets}"
    );
    let srv_ip = d.ok(&[
        "inspect",
        "-f",
        "{{(index .NetworkSettings.Networks \"scenario-net\").IPAddress}}",
        "srv",
    ])?;
    ensure!(
        d.ok(&[
            "exec",
            "outsider",
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{srv_ip}/hostname")
        ])
        .is_ok()
    );
    let members = d.ok(&[
        "network",
        "inspect",
        "-f",
        "{{range .Containers}}{{.Name}} {{end}}",
        "scenario-net",
    ])?;
    ensure!(
        members.contains("outsider") && members.contains("srv"),
        "network members: {members}"
    );
    d.ok(&["network", "disconnect", "scenario-net", "outsider"])?;
    let nets = d.ok(&[
        "inspect",
        "-f",
        "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
        "outsider",
    ])?;
    ensure!(!nets.contains("scenario-net"), "after disconnect: {nets}");

    // --- events --since/--until ------------------------------------------------------------
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        - 1;
    d.ok(&["run", "--name", "evt", "busybox", "true"])?;
    d.ok(&["rm", "evt"])?;
    // `until` a second after the last event: the CLI then waits at most that long.
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 1;
    let evs = d.ok(&[
        "events",
        "--since",
        &since.to_string(),
        "--until",
        &until.to_string(),
        "--filter",
        "container=evt",
        "--format",
        "{{.Type}} {{.Action}} {{.Actor.Attributes.name}}",
    ])?;
    for action in ["create", "start", "die", "destroy"] {
        ensure!(
            evs.contains(&format!("container {action} evt")),
            "events lack {action}:\n{evs}"
        );
    }
    let evs_json = d.ok(&[
        "events",
        "--since",
        &since.to_string(),
        "--until",
        &until.to_string(),
        "--filter",
        "event=die",
        "--format",
        "{{json .}}",
    ])?;
    ensure!(
        evs_json.contains("\"exitCode\":\"0\"") && evs_json.contains("\"status\":\"die\""),
        "{evs_json}"
    );

    // --- rm -f, rmi ------------------------------------------------------------------------
    d.ok(&["rm", "-f", "web2", "srv", "peer", "outsider"])?;
    d.ok(&["tag", &busybox, "scenario/extra:1"])?;
    let rmi = d.ok(&["rmi", "scenario/extra:1"])?;
    ensure!(rmi.contains("Untagged: scenario/extra:1"), "rmi: {rmi}");

    // --- system df -------------------------------------------------------------------------
    let df = d.ok(&["system", "df", "--format", "{{.Type}} {{.TotalCount}}"])?;
    ensure!(
        df.contains("Images ") && df.contains("Containers ") && df.contains("Local Volumes "),
        "df: {df}"
    );

    // --- save and load ---------------------------------------------------------------------
    let archive = scratch.path().join("busybox.tar");
    d.ok(&["save", "-o", archive.to_str().context("path")?, "busybox"])?;
    ensure!(
        std::fs::metadata(&archive)?.len() > 100_000,
        "saved archive too small"
    );
    d.ok(&["rm", "-f", "ticker"])?;
    d.ok(&["rmi", "busybox"])?;
    let load = d.ok(&["load", "-i", archive.to_str().context("path")?])?;
    ensure!(
        load.contains("Loaded image: busybox:latest"),
        "load: {load}"
    );
    ensure!(d.ok(&["run", "--rm", "busybox", "echo", "loaded"])? == "loaded");

    // --- tag, push to the loopback registry, pull back -------------------------------------
    let pushed = format!("{reg}/scenario/pushed:v1");
    d.ok(&["tag", "busybox", &pushed])?;
    let push = d.ok(&["push", &pushed])?;
    ensure!(
        push.contains(&format!(
            "The push refers to repository [{reg}/scenario/pushed]"
        )) && push.contains("v1: digest: sha256:"),
        "push: {push}"
    );
    d.ok(&["rmi", &pushed])?;
    let back = d.ok(&["pull", &pushed])?;
    ensure!(
        back.contains(&format!("Status: Downloaded newer image for {pushed}")),
        "pull back: {back}"
    );

    // --- login to an htpasswd registry -----------------------------------------------------
    let secured = Registry::start(RegistryOptions {
        basic_auth: Some(("alice".into(), "wonderland".into())),
        ..Default::default()
    })?;
    let mut login = d.cmd(&["login", "-u", "alice", "--password-stdin", &secured.host]);
    let (code, out) = login_with(&mut login, "wrong")?;
    ensure!(
        code != 0 && out.contains("401 Unauthorized"),
        "bad login: {out}"
    );
    let mut login = d.cmd(&["login", "-u", "alice", "--password-stdin", &secured.host]);
    let (code, out) = login_with(&mut login, "wonderland")?;
    ensure!(
        code == 0 && out.contains("Login Succeeded"),
        "good login: {out}"
    );
    let private = format!("{}/private:v1", secured.host);
    d.ok(&["tag", "busybox", &private])?;
    d.ok(&["push", &private])?;
    d.ok(&["rmi", &private])?;
    d.ok(&["pull", &private])?;
    d.ok(&["logout", &secured.host])?;
    d.ok(&["rmi", &private])?;
    let (_, err) = d.fails(&["pull", &private])?;
    ensure!(
        err.contains("Error response from daemon"),
        "pull without login: {err}"
    );
    Ok(())
}

fn login_with(cmd: &mut std::process::Command, password: &str) -> Result<(i32, String)> {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(password.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}
