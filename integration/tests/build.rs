//! `docker build` (the classic builder behind `POST /build`) with the real docker CLI, docker-py
//! and docker-compose 1.29 against a real stack: a multi-stage Dockerfile using the
//! instructions, the result run and inspected, the cache (a rebuild runs nothing, a changed
//! COPY source reruns exactly the steps after it), `.dockerignore`, ONBUILD in a child build,
//! `-f -` and a context on stdin, a failing RUN with `--force-rm`, a syntax error with its line,
//! and the result pushed to a loopback registry and read back by skopeo. Root only; skips
//! cleanly otherwise.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, ensure};
use berth_integration::gateway_kit::{DockerStack, Running};
use berth_integration::images_kit::{Registry, RegistryOptions};
use berth_integration::py_kit;

const DOCKERFILE: &str = r#"# syntax=docker/dockerfile:1
ARG BASE=busybox
FROM ${BASE} AS builder
WORKDIR /src
COPY a.txt .
RUN echo built > out.txt && cat a.txt >> out.txt

FROM busybox
MAINTAINER berth tests
LABEL org.test.stage="final" \
      other=yes
ENV GREETING=hello PATH=/usr/local/bin:/usr/bin:/bin
ARG WHO=world
RUN echo "app:x:1234:1234::/home/app:/bin/sh" >> /etc/passwd && echo "app:x:1234:" >> /etc/group && echo "$WHO" > /who
COPY --from=builder /src/out.txt /app/out.txt
COPY ctx/ /ctx/
COPY --chown=app:app --chmod=640 b.txt /app/
ADD sub.tar.gz /app/extracted/
EXPOSE 8080/tcp
VOLUME /data
USER app
WORKDIR /app
HEALTHCHECK --interval=30s --timeout=5s CMD true
STOPSIGNAL SIGTERM
SHELL ["/bin/sh", "-c"]
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["cat /app/out.txt; id -u; echo $GREETING; pwd; cat /who; ls /ctx; cat /app/extracted/inner.txt; stat -c '%u %a' /app/b.txt"]
"#;

fn write_context(dir: &Path) -> Result<()> {
    std::fs::write(dir.join("Dockerfile"), DOCKERFILE)?;
    std::fs::write(dir.join("a.txt"), "A1\n")?;
    std::fs::write(dir.join("b.txt"), "B1\n")?;
    std::fs::create_dir_all(dir.join("ctx"))?;
    std::fs::write(dir.join("ctx/kept.txt"), "kept\n")?;
    std::fs::write(dir.join("ctx/ignored.txt"), "ignored\n")?;
    std::fs::write(dir.join(".dockerignore"), "ctx/ignored.txt\n*.log\n")?;
    std::fs::write(dir.join("noise.log"), "noise\n")?;
    // A local tar.gz that ADD extracts.
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(dir.join("sub.tar.gz"))?,
        flate2::Compression::default(),
    );
    let mut t = tar::Builder::new(gz);
    let mut h = tar::Header::new_gnu();
    h.set_size(6);
    h.set_mode(0o644);
    t.append_data(&mut h, "inner.txt", &b"inner\n"[..])?;
    t.into_inner()?.finish()?;
    Ok(())
}

/// `docker build` with the classic builder (this CLI has no buildx).
fn build(d: &DockerStack, dir: &Path, args: &[&str]) -> Result<std::process::Output> {
    let mut c = d.cmd(&["build"]);
    c.args(args).arg(dir).env("DOCKER_BUILDKIT", "0");
    berth_integration::gateway_kit::run_for(&mut c, std::time::Duration::from_secs(300))
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The text of a step's output, up to the next step.
fn step<'a>(out: &'a str, instruction: &str) -> &'a str {
    out.split(instruction)
        .nth(1)
        .map(|s| s.split("\nStep ").next().unwrap_or(s))
        .unwrap_or("")
}

#[test]
fn cli_builds_runs_and_caches() -> Result<()> {
    if !berth_integration::gateway_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let registry = py_kit::with_busybox(&d)?;
    let ctx = tempfile::tempdir()?;
    write_context(ctx.path())?;
    let containers_before = d.ok(&["ps", "-aq"])?;

    let o = build(&d, ctx.path(), &["-t", "bt:one", "-t", "bt:two"])?;
    let out = text(&o);
    ensure!(o.status.success(), "build failed: {out}");
    ensure!(out.contains("Step 1/"), "{out}");
    ensure!(out.contains("Successfully tagged bt:one"), "{out}");
    ensure!(out.contains("Successfully tagged bt:two"), "{out}");
    ensure!(out.contains(" ---> Running in "), "{out}");

    // The result, run: files, user, env, workdir, build arg, .dockerignore, ADD, --chown/--chmod.
    let run = d.ok(&["run", "--rm", "bt:one"])?;
    let want = "built\nA1\n1234\nhello\n/app\nworld\nkept.txt\ninner\n1234 640";
    ensure!(run == want, "run gave {run:?}, want {want:?}");
    let inspect: serde_json::Value = serde_json::from_str(&d.ok(&["image", "inspect", "bt:one"])?)?;
    let cfg = &inspect[0]["Config"];
    ensure!(cfg["Labels"]["org.test.stage"] == "final", "{cfg}");
    ensure!(cfg["User"] == "app" && cfg["WorkingDir"] == "/app", "{cfg}");
    ensure!(
        cfg["Entrypoint"] == serde_json::json!(["/bin/sh", "-c"]),
        "{cfg}"
    );
    ensure!(
        cfg["Healthcheck"]["Test"] == serde_json::json!(["CMD-SHELL", "true"]),
        "{cfg}"
    );
    ensure!(cfg["Healthcheck"]["Interval"] == 30_000_000_000u64, "{cfg}");
    ensure!(cfg["ExposedPorts"].get("8080/tcp").is_some(), "{cfg}");
    ensure!(cfg["Volumes"].get("/data").is_some(), "{cfg}");
    ensure!(cfg["StopSignal"] == "SIGTERM", "{cfg}");
    ensure!(inspect[0]["Author"] == "berth tests", "{}", inspect[0]);
    let history = d.ok(&[
        "history",
        "--no-trunc",
        "--format",
        "{{.CreatedBy}}",
        "bt:one",
    ])?;
    ensure!(
        history.contains("|1 WHO=world /bin/sh -c echo \"app:x:1234"),
        "{history}"
    );
    ensure!(
        history.contains("/bin/sh -c #(nop)  ENV GREETING=hello"),
        "{history}"
    );
    ensure!(
        history.contains(
            r#"/bin/sh -c #(nop)  HEALTHCHECK &{["CMD-SHELL" "true"] "30s" "5s" "0s" "0s" '\x00'}"#
        ),
        "{history}"
    );

    // Nothing changed: every step from the cache, no RUN step runs.
    let o = build(&d, ctx.path(), &["-t", "bt:one"])?;
    let out = text(&o);
    ensure!(o.status.success(), "rebuild failed: {out}");
    ensure!(!out.contains("Running in"), "a step ran again: {out}");
    ensure!(out.contains(" ---> Using cache"), "{out}");

    // One COPY source changed: the steps before it are cached, it and those after it run.
    std::fs::write(ctx.path().join("b.txt"), "B2\n")?;
    let o = build(&d, ctx.path(), &["-t", "bt:one"])?;
    let out = text(&o);
    ensure!(o.status.success(), "{out}");
    ensure!(
        step(&out, ": RUN echo \"app:x").contains("Using cache"),
        "{out}"
    );
    ensure!(
        step(&out, ": COPY ctx/ /ctx/").contains("Using cache"),
        "{out}"
    );
    ensure!(
        step(&out, ": COPY --chown=app:app").contains("Running in"),
        "{out}"
    );
    ensure!(
        step(&out, ": ADD sub.tar.gz").contains("Running in"),
        "{out}"
    );

    // The cache survives removing the image; its intermediate images are not listed.
    d.ok(&["rmi", "bt:one", "bt:two"])?;
    ensure!(
        d.ok(&["images", "-q", "--filter", "dangling=true"])?
            .is_empty()
    );
    let o = build(&d, ctx.path(), &["-t", "bt:one"])?;
    let out = text(&o);
    ensure!(o.status.success() && !out.contains("Running in"), "{out}");

    // No step container is left behind.
    ensure!(
        d.ok(&["ps", "-aq"])? == containers_before,
        "containers left"
    );

    // `docker system df` counts the cache; `docker builder prune` empties it.
    let df = || d.ok(&["system", "df", "--format", "{{.Type}}={{.TotalCount}}"]);
    let count = |df: &str| -> usize {
        df.lines()
            .find_map(|l| l.strip_prefix("Build Cache="))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(usize::MAX)
    };
    let before = df()?;
    ensure!(
        count(&before) >= 20 && count(&before) != usize::MAX,
        "{before}"
    );

    // Pushed to the loopback registry, skopeo reads the layers and config the build made.
    let pushed = format!("{}/built:1", registry.host);
    d.ok(&["tag", "bt:one", &pushed])?;
    d.ok(&["push", &pushed])?;
    let sk = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--config"])
        .arg(format!("docker://{pushed}"))
        .output()?;
    ensure!(
        sk.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&sk.stderr)
    );
    let remote: serde_json::Value = serde_json::from_slice(&sk.stdout)?;
    let pruned = d.ok(&["builder", "prune", "-f"])?;
    ensure!(pruned.contains("Total reclaimed space"), "{pruned}");
    let after = df()?;
    ensure!(count(&after) == 0, "{after}");
    ensure!(
        d.ok(&["run", "--rm", "bt:one"])?.starts_with("built\n"),
        "tagged image gone"
    );
    ensure!(remote["config"]["User"] == "app", "{remote}");
    let local: serde_json::Value = serde_json::from_str(&d.ok(&["image", "inspect", "bt:one"])?)?;
    ensure!(
        remote["rootfs"]["diff_ids"] == local[0]["RootFS"]["Layers"],
        "layers differ: {remote} vs {local}"
    );
    Ok(())
}

#[test]
fn cli_stdin_forms_onbuild_failures_and_syntax_errors() -> Result<()> {
    if !berth_integration::gateway_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let ctx = tempfile::tempdir()?;
    std::fs::write(ctx.path().join("f.txt"), "from context\n")?;
    let containers_before = d.ok(&["ps", "-aq"])?;

    // -f -: the Dockerfile on stdin, the context from the directory.
    let mut c = d.cmd(&["build", "-t", "stdin-df", "-f", "-"]);
    c.arg(ctx.path())
        .env("DOCKER_BUILDKIT", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"FROM busybox\nCOPY f.txt /f.txt\nONBUILD RUN echo triggered > /trig\n")?;
    let o = child.wait_with_output()?;
    ensure!(o.status.success(), "{}", text(&o));
    ensure!(d.ok(&["run", "--rm", "stdin-df", "cat", "/f.txt"])? == "from context");

    // FROM scratch, copied out of into a second stage; nothing dangling is left listed.
    let scratch = tempfile::tempdir()?;
    std::fs::write(scratch.path().join("f.txt"), "on scratch\n")?;
    std::fs::write(
        scratch.path().join("Dockerfile"),
        "FROM scratch AS s\nCOPY f.txt /f.txt\nFROM busybox\nCOPY --from=s /f.txt /g\n",
    )?;
    let o = build(&d, scratch.path(), &["-t", "from-scratch"])?;
    ensure!(o.status.success(), "{}", text(&o));
    ensure!(d.ok(&["run", "--rm", "from-scratch", "cat", "/g"])? == "on scratch");
    ensure!(
        d.ok(&["images", "-q", "--filter", "dangling=true"])?
            .is_empty()
    );
    // The scratch stage alone: one layer and one history entry, as Docker makes it.
    let o = build(&d, scratch.path(), &["-t", "scratch-only", "--target", "s"])?;
    ensure!(o.status.success(), "{}", text(&o));
    let layers = d.ok(&[
        "image",
        "inspect",
        "-f",
        "{{len .RootFS.Layers}}",
        "scratch-only",
    ])?;
    ensure!(layers == "1", "FROM scratch + COPY gave {layers} layers");
    let history = d.ok(&["history", "-q", "scratch-only"])?;
    ensure!(history.lines().count() == 1, "history: {history}");

    // The whole context as a tar.gz on stdin; its FROM has an ONBUILD trigger that fires.
    let tgz = ctx.path().join("ctx.tar.gz");
    {
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&tgz)?,
            flate2::Compression::default(),
        );
        let mut t = tar::Builder::new(gz);
        let df = b"FROM stdin-df\nRUN cat /trig\n";
        let mut h = tar::Header::new_gnu();
        h.set_size(df.len() as u64);
        h.set_mode(0o644);
        t.append_data(&mut h, "Dockerfile", &df[..])?;
        t.into_inner()?.finish()?;
    }
    let mut c = d.cmd(&["build", "-t", "child", "-"]);
    c.env("DOCKER_BUILDKIT", "0")
        .stdin(std::fs::File::open(&tgz)?)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let o = c.output()?;
    let out = text(&o);
    ensure!(o.status.success(), "{out}");
    ensure!(out.contains("# Executing 1 build trigger"), "{out}");
    ensure!(d.ok(&["run", "--rm", "child", "cat", "/trig"])? == "triggered");

    // A failing RUN with --force-rm: Docker's words, and no container left.
    let bad = tempfile::tempdir()?;
    std::fs::write(bad.path().join("Dockerfile"), "FROM busybox\nRUN false\n")?;
    let o = build(&d, bad.path(), &["--force-rm", "-t", "never"])?;
    ensure!(!o.status.success());
    let out = text(&o);
    ensure!(
        out.contains("The command '/bin/sh -c false' returned a non-zero code: 1"),
        "{out}"
    );
    ensure!(
        d.ok(&["ps", "-aq"])? == containers_before,
        "a container was left"
    );
    ensure!(d.fails(&["image", "inspect", "never"]).is_ok());

    // Syntax errors name their line.
    std::fs::write(bad.path().join("Dockerfile"), "FROM busybox\n\nFOO bar\n")?;
    let o = build(&d, bad.path(), &[])?;
    let out = text(&o);
    ensure!(!o.status.success(), "{out}");
    ensure!(
        out.contains("line 3") && out.contains("unknown instruction"),
        "{out}"
    );

    // COPY of a missing file and of a path outside the context.
    std::fs::write(
        bad.path().join("Dockerfile"),
        "FROM busybox\nCOPY ../x /x\n",
    )?;
    let out = text(&build(&d, bad.path(), &[])?);
    ensure!(out.contains("outside the build context"), "{out}");
    std::fs::write(
        bad.path().join("Dockerfile"),
        "FROM busybox\nCOPY nope /x\n",
    )?;
    let out = text(&build(&d, bad.path(), &[])?);
    ensure!(out.contains("file not found in build context"), "{out}");
    ensure!(
        d.ok(&["ps", "-aq"])? == containers_before,
        "a container was left"
    );

    // ADD of a URL (a loopback HTTP server).
    let www = tempfile::tempdir()?;
    std::fs::write(www.path().join("remote.txt"), "fetched\n")?;
    let port = berth_integration::images_kit::free_port();
    let mut server = Command::new("python3");
    server
        .args(["-m", "http.server", "--bind", "127.0.0.1"])
        .arg(port.to_string())
        .arg("--directory")
        .arg(www.path());
    let _server = Running::spawn(&mut server)?;
    let addr = format!("127.0.0.1:{port}");
    ensure!(
        (0..100).any(|_| {
            let up = berth_integration::gateway_kit::http_get(&addr, "/remote.txt").is_ok();
            if !up {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            up
        }),
        "the loopback HTTP server did not start"
    );
    std::fs::write(
        bad.path().join("Dockerfile"),
        format!("FROM busybox\nADD http://{addr}/remote.txt /dl/\n"),
    )?;
    let o = build(&d, bad.path(), &["-t", "added"])?;
    ensure!(o.status.success(), "{}", text(&o));
    ensure!(d.ok(&["run", "--rm", "added", "cat", "/dl/remote.txt"])? == "fetched");
    ensure!(d.ok(&["run", "--rm", "added", "stat", "-c", "%a", "/dl/remote.txt"])? == "600");

    // A client that goes away mid-build: the build stops and its step container goes.
    std::fs::write(
        bad.path().join("Dockerfile"),
        "FROM busybox\nRUN echo started; sleep 600\n",
    )?;
    let mut c = d.cmd(&["build", "-t", "interrupted"]);
    c.arg(bad.path()).env("DOCKER_BUILDKIT", "0");
    let running = Running::spawn(&mut c)?;
    ensure!(
        running.wait_stdout(std::time::Duration::from_secs(60), |o| o
            .contains("started")),
        "the step never started: {}{}",
        running.stdout(),
        running.stderr()
    );
    drop(running);
    let cleaned = (0..300).any(|_| {
        let same = d
            .ok(&["ps", "-aq"])
            .is_ok_and(|ids| ids == containers_before);
        if !same {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        same
    });
    ensure!(
        cleaned,
        "the interrupted build left a container: {}",
        d.ok(&["ps", "-a"])?
    );
    ensure!(d.fails(&["image", "inspect", "interrupted"]).is_ok());

    // FROM an image of a registry that needs a login: the CLI's X-Registry-Config carries it.
    let secured = Registry::start(RegistryOptions {
        basic_auth: Some(("alice".into(), "wonderland".into())),
        ..Default::default()
    })?;
    let mut login = d.cmd(&["login", "-u", "alice", "--password-stdin", &secured.host]);
    let mut child = login
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"wonderland")?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "login: {}", text(&out));
    let private = format!("{}/private:v1", secured.host);
    d.ok(&["tag", "busybox", &private])?;
    d.ok(&["push", &private])?;
    d.ok(&["rmi", &private])?;
    std::fs::write(
        bad.path().join("Dockerfile"),
        format!("FROM {private}\nRUN echo from-private\n"),
    )?;
    let o = build(&d, bad.path(), &["-t", "from-private"])?;
    let out = text(&o);
    ensure!(o.status.success(), "{out}");
    ensure!(out.contains("from-private"), "{out}");
    d.ok(&["logout", &secured.host])?;

    // builder prune drops the records.
    let pruned = d.ok(&["builder", "prune", "-f"])?;
    ensure!(pruned.contains("Total reclaimed space"), "{pruned}");
    Ok(())
}

const PY_SCRIPT: &str = r#"
import docker, os, tempfile
client = docker.from_env(version="auto")
d = tempfile.mkdtemp()
with open(os.path.join(d, "Dockerfile"), "w") as f:
    f.write("FROM busybox\nRUN echo py > /py.txt\nCMD [\"cat\", \"/py.txt\"]\n")
image, logs = client.images.build(path=d, tag="pybuilt:1", rm=True)
lines = [l.get("stream", "") for l in logs]
assert any("Successfully built" in l for l in lines), lines
assert "pybuilt:1" in image.tags, image.tags
out = client.containers.run("pybuilt:1", remove=True)
assert out == b"py\n", out
print("ok")
"#;

#[test]
fn docker_py_and_compose_build() -> Result<()> {
    if !py_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let out = py_kit::ok(&d, PY_SCRIPT)?;
    ensure!(out.trim_end().ends_with("ok"), "{out}");

    if !py_kit::compose_ready() {
        return Ok(());
    }
    let project = tempfile::tempdir()?;
    std::fs::create_dir(project.path().join("app"))?;
    std::fs::write(
        project.path().join("app/Dockerfile"),
        "FROM busybox\nCOPY msg /msg\nCMD [\"sh\", \"-c\", \"cat /msg; sleep 3600\"]\n",
    )?;
    std::fs::write(project.path().join("app/msg"), "from compose\n")?;
    std::fs::write(
        project.path().join("docker-compose.yml"),
        "version: \"2.4\"\nservices:\n  app:\n    build: ./app\n    image: composebuilt:1\n",
    )?;
    py_kit::compose_ok(&d, project.path(), &["up", "-d"])?;
    let logs = (0..50)
        .find_map(|_| {
            let l = py_kit::compose_ok(&d, project.path(), &["logs", "app"]).ok()?;
            if l.contains("from compose") {
                Some(l)
            } else {
                std::thread::sleep(std::time::Duration::from_millis(200));
                None
            }
        })
        .context("the built service never logged its message")?;
    ensure!(logs.contains("from compose"));
    py_kit::compose_ok(&d, project.path(), &["down"])?;
    Ok(())
}
