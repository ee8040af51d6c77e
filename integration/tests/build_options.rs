//! `docker build` options beyond the Dockerfile, with the real docker CLI against a real stack:
//! the RUN containers' resources and isolation (`--memory`, `--shm-size`, `--ulimit`,
//! `--cpu-shares`, `--add-host`, `--network`), `--cache-from`, and a remote context (a tar served
//! over loopback HTTP, and one that cannot be reached). Root only; skips cleanly otherwise.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};
use berth_integration::gateway_kit::{DockerStack, Running};
use berth_integration::py_kit;

/// `docker build` with the classic builder (this CLI has no buildx).
fn build(d: &DockerStack, args: &[&str]) -> Result<(bool, String)> {
    let mut c = d.cmd(&["build"]);
    c.args(args).env("DOCKER_BUILDKIT", "0");
    let o = berth_integration::gateway_kit::run_for(&mut c, Duration::from_secs(300))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok((o.status.success(), text))
}

#[test]
fn run_steps_get_the_build_resources_and_isolation() -> Result<()> {
    if !berth_integration::gateway_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let ctx = tempfile::tempdir()?;
    // Everything the RUN step sees is written into the image, then read back by `docker run`.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\n\
         RUN cat /sys/fs/cgroup/memory/memory.limit_in_bytes > /mem \
         && cat /sys/fs/cgroup/cpu/cpu.shares > /shares \
         && ulimit -Sn > /nofile && ulimit -Hn >> /nofile \
         && df -k /dev/shm | tail -n 1 | awk '{print $2}' > /shm \
         && grep extra-host /etc/hosts > /hosts \
         && ls /sys/class/net > /nets\n",
    )?;
    let (ok, out) = build(
        &d,
        &[
            "-t",
            "bo:opts",
            "--memory",
            "96m",
            "--cpu-shares",
            "512",
            "--ulimit",
            "nofile=1000:2000",
            "--shm-size",
            "32m",
            "--add-host",
            "extra-host:10.1.2.3",
            "--network",
            "none",
            &ctx.path().display().to_string(),
        ],
    )?;
    ensure!(ok, "build failed: {out}");
    let read = |f: &str| d.ok(&["run", "--rm", "--network", "none", "bo:opts", "cat", f]);
    ensure!(read("/mem")? == (96u64 << 20).to_string(), "memory");
    ensure!(read("/shares")? == "512", "cpu shares");
    ensure!(
        read("/nofile")? == "1000\n2000",
        "ulimit: {}",
        read("/nofile")?
    );
    ensure!(read("/shm")? == "32768", "shm: {}", read("/shm")?);
    let hosts = read("/hosts")?;
    ensure!(
        hosts.split_whitespace().collect::<Vec<_>>() == ["10.1.2.3", "extra-host"],
        "hosts: {hosts}"
    );
    ensure!(read("/nets")? == "lo", "network none: {}", read("/nets")?);

    // A network the daemon does not know is refused before any step runs.
    let (ok, out) = build(
        &d,
        &[
            "--network",
            "no-such-net",
            "--no-cache",
            &ctx.path().display().to_string(),
        ],
    )?;
    ensure!(!ok && out.contains("no-such-net"), "{out}");
    ensure!(
        d.ok(&["ps", "-aq"])?.is_empty(),
        "a step container was left"
    );
    Ok(())
}

#[test]
fn cache_from_limits_the_cache_to_the_named_images() -> Result<()> {
    if !berth_integration::gateway_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let ctx = tempfile::tempdir()?;
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nRUN echo one > /one\nRUN echo two > /two\n",
    )?;
    let dir = ctx.path().display().to_string();
    let (ok, out) = build(&d, &["-t", "cf:first", &dir])?;
    ensure!(ok && out.contains("Running in"), "{out}");

    // Named as a cache source, the earlier image's steps are reused.
    let (ok, out) = build(&d, &["-t", "cf:second", "--cache-from", "cf:first", &dir])?;
    ensure!(ok, "{out}");
    ensure!(out.matches(" ---> Using cache").count() == 2, "{out}");
    ensure!(!out.contains("Running in"), "{out}");
    ensure!(
        d.ok(&["image", "inspect", "-f", "{{.Id}}", "cf:first"])?
            == d.ok(&["image", "inspect", "-f", "{{.Id}}", "cf:second"])?,
        "the cached build made another image"
    );

    // An unrelated cache source: the local cache is not consulted, every step runs again.
    let (ok, out) = build(&d, &["-t", "cf:third", "--cache-from", "busybox", &dir])?;
    ensure!(ok, "{out}");
    ensure!(!out.contains("Using cache"), "{out}");
    ensure!(out.matches("Running in").count() == 2, "{out}");
    Ok(())
}

/// A loopback HTTP server for `dir` (python's http.server), ended when dropped.
struct FileServer {
    _server: Running,
    port: u16,
}

impl FileServer {
    fn start(dir: &Path) -> Result<Self> {
        let script = "import http.server, sys\n\
            s = http.server.ThreadingHTTPServer(('127.0.0.1', 0), \
            lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=sys.argv[1]))\n\
            print(s.server_address[1], flush=True)\n\
            s.serve_forever()\n";
        let server = Running::spawn(Command::new("python3").args(["-c", script]).arg(dir))?;
        ensure!(
            server.wait_stdout(Duration::from_secs(20), |s| s.ends_with('\n')),
            "the file server did not start: {}",
            server.stderr()
        );
        let port = server.stdout().trim().parse()?;
        Ok(Self {
            _server: server,
            port,
        })
    }
}

#[test]
fn a_remote_context_is_fetched_or_refused_clearly() -> Result<()> {
    if !berth_integration::gateway_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let served = tempfile::tempdir()?;
    // A context tar with a Dockerfile and a file it copies.
    {
        let mut t = tar::Builder::new(std::fs::File::create(served.path().join("ctx.tar"))?);
        let mut add = |name: &str, body: &[u8]| -> Result<()> {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            t.append_data(&mut h, name, body)?;
            Ok(())
        };
        add(
            "Dockerfile",
            b"FROM busybox\nCOPY remote.txt /remote.txt\nCMD [\"cat\", \"/remote.txt\"]\n",
        )?;
        add("remote.txt", b"from a remote context\n")?;
        t.finish()?;
    }
    // A bare Dockerfile as the remote: the context is that file alone.
    std::fs::write(
        served.path().join("Dockerfile.plain"),
        "FROM busybox\nCMD [\"echo\", \"plain remote\"]\n",
    )?;
    let server = FileServer::start(served.path())?;

    let url = format!("http://127.0.0.1:{}/ctx.tar", server.port);
    let (ok, out) = build(&d, &["-t", "remote:tar", &url])?;
    ensure!(ok, "remote tar build failed: {out}");
    ensure!(d.ok(&["run", "--rm", "remote:tar"])? == "from a remote context");

    let url = format!("http://127.0.0.1:{}/Dockerfile.plain", server.port);
    let (ok, out) = build(&d, &["-t", "remote:plain", &url])?;
    ensure!(ok, "remote Dockerfile build failed: {out}");
    ensure!(d.ok(&["run", "--rm", "remote:plain"])? == "plain remote");

    // Nothing listens on a port just released: a clear error, nothing made.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{closed}/ctx.tar");
    let images_before = d.ok(&["images", "-aq"])?;
    let (ok, out) = build(&d, &["-t", "remote:none", &url])?;
    ensure!(!ok, "{out}");
    ensure!(
        out.contains("remote") && out.contains(&closed.to_string()),
        "unclear error: {out}"
    );
    ensure!(
        d.ok(&["images", "-aq"])? == images_before,
        "an image was made"
    );
    // A missing file on a reachable server: its HTTP status in the error.
    let url = format!("http://127.0.0.1:{}/missing.tar", server.port);
    let (ok, out) = build(&d, &["-t", "remote:none", &url])?;
    ensure!(!ok && out.contains("404"), "{out}");
    Ok(())
}

#[test]
fn a_gateway_killed_mid_build_leaves_no_step_container() -> Result<()> {
    if !berth_integration::gateway_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let ctx = tempfile::tempdir()?;
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nRUN echo started && sleep 300\n",
    )?;
    let mut c = d.cmd(&["build"]);
    c.arg(ctx.path()).env("DOCKER_BUILDKIT", "0");
    let build = Running::spawn(&mut c)?;
    ensure!(
        build.wait_stdout(Duration::from_secs(60), |s| s
            .lines()
            .any(|l| l.trim() == "started")),
        "the RUN step did not start: {}{}",
        build.stdout(),
        build.stderr()
    );
    let running = d.ok(&["ps", "-a", "--format", "{{.ID}} {{.Status}}"])?;
    ensure!(
        running.contains(" Up "),
        "no step container runs: {running:?}"
    );
    d.kill9_gateway()?;
    // The restarted gateway removes the step container the dead one left.
    let gone = (0..60).any(|_| {
        std::thread::sleep(Duration::from_millis(500));
        d.ok(&["ps", "-aq"]).is_ok_and(|s| s.is_empty())
    });
    ensure!(gone, "left behind: {}", d.ok(&["ps", "-a"])?);
    // Nothing of the step was committed or tagged.
    ensure!(
        d.ok(&["images", "-q", "--filter", "dangling=true"])?
            .is_empty()
    );
    Ok(())
}
