//! Healthchecks as Docker runs them, driven by docker-py 7 and the docker CLI against a real
//! stack with real runc: healthy → unhealthy → healthy with `State.Health` and the
//! `health_status` events, `docker ps` showing `(healthy)` and the `health=` filter, an image's
//! HEALTHCHECK and `--no-healthcheck`, probes running on while the engine is `kill -9`ed, and
//! stopping with the container. Root only; skips cleanly otherwise.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use berth_core::Service;
use berth_integration::gateway_kit::DockerStack;
use berth_integration::images_kit::oci_dir;
use berth_integration::py_kit;
use berth_integration::stack::{running, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Shared helpers of the scripts.
const PRELUDE: &str = r#"
import time, docker
client = docker.from_env(version="auto")

def health(c):
    c.reload()
    return c.attrs["State"].get("Health")

def wait_status(c, want, limit=60):
    deadline = time.time() + limit
    while time.time() < deadline:
        h = health(c)
        if h and h["Status"] == want:
            return h
        time.sleep(0.1)
    raise AssertionError("never %s: %r" % (want, c.attrs["State"]))
"#;

const TRANSITIONS: &str = r#"
since = time.time() - 1
c = client.containers.run(
    "busybox", ["sh", "-c", "touch /tmp/ok; exec sleep 600"], detach=True, name="hc-py",
    healthcheck={"test": ["CMD", "test", "-f", "/tmp/ok"], "interval": 200_000_000,
                 "timeout": 5_000_000_000, "retries": 2})
try:
    h = wait_status(c, "healthy")
    assert h["FailingStreak"] == 0, h
    assert 1 <= len(h["Log"]) <= 5, h
    entry = h["Log"][-1]
    assert entry["ExitCode"] == 0 and entry["Output"] == "", entry
    assert entry["Start"] <= entry["End"], entry

    assert c.exec_run(["rm", "/tmp/ok"]).exit_code == 0
    h = wait_status(c, "unhealthy")
    assert h["FailingStreak"] >= 2, h
    assert h["Log"][-1]["ExitCode"] == 1, h
    # The log keeps the last five probes only.
    time.sleep(1.5)
    h = health(c)
    assert len(h["Log"]) == 5, h
    assert all(e["ExitCode"] == 1 for e in h["Log"]), h
    assert h["FailingStreak"] >= 7, h

    assert c.exec_run(["touch", "/tmp/ok"]).exit_code == 0
    h = wait_status(c, "healthy")
    assert h["FailingStreak"] == 0, h

    # Probes are not exec instances anyone can see.
    c.reload()
    assert len(c.attrs["ExecIDs"] or []) <= 2, c.attrs["ExecIDs"]

    # docker ps's STATUS and the health= filter.
    row = client.api.containers(filters={"id": c.id})[0]
    assert row["Status"].startswith("Up ") and row["Status"].endswith(" (healthy)"), row
    names = lambda f: [x.name for x in client.containers.list(filters={"health": f})]
    assert "hc-py" in names("healthy")
    assert "hc-py" not in names("unhealthy") and "hc-py" not in names("none")

    until = time.time() + 1
    events = client.events(decode=True, since=since, until=until,
                           filters={"container": c.id, "event": "health_status"})
    got = [(e["Type"], e["Action"], e["Actor"]["Attributes"]["name"],
            e["Actor"]["Attributes"]["image"]) for e in events]
    want = [("container", "health_status: " + s, "hc-py", "busybox")
            for s in ("healthy", "unhealthy", "healthy")]
    assert got == want, got
    # The exact action matches too.
    events = client.events(decode=True, since=since, until=time.time(),
                           filters={"container": c.id, "event": "health_status: unhealthy"})
    assert [e["Action"] for e in events] == ["health_status: unhealthy"]

    # Pausing stops the probes (Docker then says unhealthy); unpausing runs them again.
    c.pause()
    wait_status(c, "unhealthy")
    row = client.api.containers(filters={"id": c.id})[0]
    assert row["Status"].endswith(" (Paused)"), row
    c.unpause()
    wait_status(c, "healthy")

    # Stopping ends the probes; Docker then reports the last health as unhealthy.
    c.stop(timeout=1)
    h = wait_status(c, "unhealthy")
    ended = len(h["Log"]), h["Log"][-1]["End"]
    time.sleep(1)
    h = health(c)
    assert (len(h["Log"]), h["Log"][-1]["End"]) == ended, h
    row = client.api.containers(all=True, filters={"id": c.id})[0]
    assert row["Status"].startswith("Exited"), row

    # A restart starts over at "starting" (it becomes healthy again once a probe ran).
    c.start()
    h = health(c)
    assert h["Status"] in ("starting", "healthy"), h
    wait_status(c, "healthy")

    # Timeouts: killed and counted with Docker's message.
    t = client.containers.run(
        "busybox", ["sleep", "600"], detach=True, name="hc-timeout",
        healthcheck={"test": ["CMD-SHELL", "echo slow; sleep 30"], "interval": 100_000_000,
                     "timeout": 300_000_000, "retries": 1})
    try:
        h = wait_status(t, "unhealthy")
        assert h["Log"][0]["ExitCode"] == -1, h
        assert h["Log"][0]["Output"] == "Health check exceeded timeout (300ms): slow\n", h
    finally:
        t.remove(force=True)

    # Output is cut at 4096 bytes with "..." appended.
    big = client.containers.run(
        "busybox", ["sleep", "600"], detach=True, name="hc-big",
        healthcheck={"test": ["CMD-SHELL", "head -c 5000 /dev/zero | tr '\\0' x"],
                     "interval": 100_000_000})
    try:
        h = wait_status(big, "healthy")
        assert h["Log"][0]["Output"] == "x" * 4096 + "...", len(h["Log"][0]["Output"])
    finally:
        big.remove(force=True)

    # No healthcheck: no State.Health, and health=none lists it.
    p = client.containers.run("busybox", ["sleep", "600"], detach=True, name="hc-plain")
    try:
        assert health(p) is None
        assert "hc-plain" in names("none")
    finally:
        p.remove(force=True)
finally:
    c.remove(force=True)
print("ok")
"#;

#[test]
fn docker_py_sees_health_transitions_and_events() -> Result<()> {
    if !py_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let out = py_kit::ok(&d, &format!("{PRELUDE}{TRANSITIONS}"))?;
    ensure!(out.trim_end().ends_with("ok"), "{out}");
    Ok(())
}

/// The test busybox with a HEALTHCHECK in its image config, as an OCI layout at `dst`.
fn image_with_healthcheck(dst: &Path) -> Result<()> {
    const EDIT: &str = r#"
import hashlib, json, os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
shutil.copytree(src, dst)
def path(d):
    return os.path.join(dst, "blobs", *d.split(":"))
def load(d):
    return json.load(open(path(d)))
def put(obj):
    data = json.dumps(obj).encode()
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    open(path(d), "wb").write(data)
    return d, len(data)
def edit(desc):
    m = load(desc["digest"])
    if "manifests" in m:
        for sub in m["manifests"]:
            edit(sub)
    else:
        cfg = load(m["config"]["digest"])
        cfg.setdefault("config", {})["Healthcheck"] = {
            "Test": ["CMD-SHELL", "test -f /tmp/ok"], "Interval": 200000000, "Retries": 1}
        m["config"]["digest"], m["config"]["size"] = put(cfg)
    desc["digest"], desc["size"] = put(m)
index = json.load(open(os.path.join(dst, "index.json")))
for desc in index["manifests"]:
    edit(desc)
json.dump(index, open(os.path.join(dst, "index.json"), "w"))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(EDIT)
        .arg(oci_dir("busybox"))
        .arg(dst)
        .output()?;
    ensure!(
        out.status.success(),
        "edit image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The bundle (at most two levels below `dir`) whose shim keeps a health state.
fn find_health_bundle(dir: &Path) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.join("health.json").is_file() {
            return Some(p);
        }
        for sub in std::fs::read_dir(&p).into_iter().flatten().flatten() {
            if sub.path().join("health.json").is_file() {
                return Some(sub.path());
            }
        }
    }
    None
}

fn inspect_health(d: &DockerStack, name: &str) -> Result<serde_json::Value> {
    let text = d.ok(&["inspect", "-f", "{{json .State.Health}}", name])?;
    Ok(serde_json::from_str(&text)?)
}

fn wait_health(d: &DockerStack, name: &str, want: &str) -> Result<serde_json::Value> {
    wait_for(Duration::from_secs(60), || {
        inspect_health(d, name).ok().filter(|h| h["Status"] == want)
    })
    .with_context(|| format!("{name} never {want}: {:?}", inspect_health(d, name)))
}

fn ps_names(d: &DockerStack, filter: &str) -> Result<Vec<String>> {
    Ok(d.ok(&["ps", "--filter", filter, "--format", "{{.Names}}"])?
        .lines()
        .map(str::to_string)
        .collect())
}

#[test]
fn docker_cli_shows_health_and_image_healthchecks_run() -> Result<()> {
    if !berth_integration::gateway_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let registry = py_kit::with_busybox(&d)?;
    let dir = tempfile::tempdir()?;
    let layout = dir.path().join("oci");
    image_with_healthcheck(&layout)?;
    registry.push_oci(&layout, "hc:latest")?;
    let image = format!("{}/hc:latest", registry.host);
    d.ok(&["pull", "-q", &image])?;

    // The CLI's --health-* flags.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "hc-cli",
        "--health-cmd",
        "true",
        "--health-interval",
        "200ms",
        "busybox",
        "sleep",
        "600",
    ])?;
    wait_health(&d, "hc-cli", "healthy")?;
    let status = d.ok(&["ps", "--filter", "name=hc-cli", "--format", "{{.Status}}"])?;
    ensure!(
        status.starts_with("Up ") && status.ends_with(" (healthy)"),
        "{status:?}"
    );
    ensure!(ps_names(&d, "health=healthy")? == ["hc-cli"]);
    let (code, err) = d.fails(&["ps", "--filter", "health=bogus"])?;
    ensure!(code != 0, "{err}");

    // The image's HEALTHCHECK (CMD-SHELL, one retry): unhealthy until the file exists.
    d.ok(&["run", "-d", "--name", "hc-image", &image, "sleep", "600"])?;
    let h = wait_health(&d, "hc-image", "unhealthy")?;
    ensure!(h["Log"][0]["ExitCode"] == 1, "{h}");
    let status = d.ok(&["ps", "--filter", "name=hc-image", "--format", "{{.Status}}"])?;
    ensure!(status.ends_with(" (unhealthy)"), "{status:?}");
    ensure!(ps_names(&d, "health=unhealthy")? == ["hc-image"]);
    d.ok(&["exec", "hc-image", "touch", "/tmp/ok"])?;
    wait_health(&d, "hc-image", "healthy")?;
    // The container's config shows the merged healthcheck: the user's interval, the image's
    // test and retries.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "hc-merged",
        "--health-interval",
        "300ms",
        &image,
        "sleep",
        "600",
    ])?;
    let cfg: serde_json::Value = serde_json::from_str(&d.ok(&[
        "inspect",
        "-f",
        "{{json .Config.Healthcheck}}",
        "hc-merged",
    ])?)?;
    ensure!(
        cfg["Test"] == serde_json::json!(["CMD-SHELL", "test -f /tmp/ok"])
            && cfg["Interval"] == 300_000_000
            && cfg["Retries"] == 1,
        "{cfg}"
    );
    wait_health(&d, "hc-merged", "unhealthy")?;

    // --no-healthcheck turns the image's off: no State.Health, listed under health=none.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "hc-off",
        "--no-healthcheck",
        &image,
        "sleep",
        "600",
    ])?;
    ensure!(d.ok(&["inspect", "-f", "{{json .State.Health}}", "hc-off"])? == "null");
    std::thread::sleep(Duration::from_millis(600));
    ensure!(d.ok(&["inspect", "-f", "{{json .State.Health}}", "hc-off"])? == "null");
    ensure!(ps_names(&d, "health=none")? == ["hc-off"]);
    let status = d.ok(&["ps", "--filter", "name=hc-off", "--format", "{{.Status}}"])?;
    ensure!(!status.contains('('), "{status:?}");

    // An unhealthy container is not restarted by its restart policy.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "hc-restart",
        "--restart",
        "always",
        "--health-cmd",
        "false",
        "--health-interval",
        "100ms",
        "--health-retries",
        "1",
        "busybox",
        "sleep",
        "600",
    ])?;
    wait_health(&d, "hc-restart", "unhealthy")?;
    let pid = d.ok(&["inspect", "-f", "{{.State.Pid}}", "hc-restart"])?;
    std::thread::sleep(Duration::from_millis(500));
    ensure!(
        d.ok(&[
            "inspect",
            "-f",
            "{{.State.Pid}} {{.RestartCount}}",
            "hc-restart"
        ])? == format!("{pid} 0")
    );

    d.ok(&[
        "rm",
        "-f",
        "hc-cli",
        "hc-image",
        "hc-merged",
        "hc-off",
        "hc-restart",
    ])?;
    Ok(())
}

/// Open descriptors of a process at its quietest over a few samples: a probe being started
/// holds a dozen for a moment (pipes, namespace and pid descriptors).
fn fd_count(pid: i32) -> Result<usize> {
    let mut least = usize::MAX;
    for _ in 0..50 {
        least = least.min(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count());
        std::thread::sleep(Duration::from_millis(3));
    }
    Ok(least)
}

#[test]
fn probes_leak_neither_descriptors_nor_processes() -> Result<()> {
    if !berth_integration::gateway_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    d.ok(&[
        "run",
        "-d",
        "--name",
        "hc-leak",
        "--health-cmd",
        "echo probe; exit 1",
        "--health-interval",
        "10ms",
        "--health-retries",
        "100000",
        "busybox",
        "sleep",
        "600",
    ])?;
    let streak = |n: u64| {
        wait_for(Duration::from_secs(120), || {
            let h = inspect_health(&d, "hc-leak").ok()?;
            (h["FailingStreak"].as_u64()? >= n).then_some(())
        })
        .with_context(|| format!("fewer than {n} probes: {:?}", inspect_health(&d, "hc-leak")))
    };
    let bundle = find_health_bundle(&d.stack.state_dir().join("bundles")).context("bundle")?;
    let shim: i32 = std::fs::read_to_string(bundle.join("shim.pid"))?
        .trim()
        .parse()?;
    streak(20)?;
    let fds = fd_count(shim)?;
    streak(220)?;
    let later = fd_count(shim)?;
    // A probe may be running at either count (its pipes and pidfd).
    ensure!(
        later <= fds + 4,
        "shim descriptors grew from {fds} to {later}"
    );
    let h = inspect_health(&d, "hc-leak")?;
    ensure!(
        h["Status"] == "starting" && h["Log"].as_array().map(Vec::len) == Some(5),
        "{h}"
    );
    ensure!(h["Log"][4]["Output"] == "probe\n", "{h}");
    // Only the container's own process (and at most the probe of the moment) is in it.
    let top = d.ok(&["top", "hc-leak", "-o", "pid,stat,args"])?;
    let procs: Vec<&str> = top
        .lines()
        .skip(1)
        .filter(|l| !l.contains("probe"))
        .collect();
    ensure!(procs.len() == 1 && procs[0].contains("sleep 600"), "{top}");
    ensure!(!top.contains(" Z "), "{top}");
    d.ok(&["rm", "-f", "hc-leak"])?;
    Ok(())
}

#[test]
fn probes_keep_running_while_the_engine_is_killed() -> Result<()> {
    if !py_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    d.ok(&[
        "run",
        "-d",
        "--name",
        "hc-survive",
        "--health-cmd",
        "test -f /tmp/ok-survive",
        "--health-interval",
        "200ms",
        "--health-retries",
        "1",
        "busybox",
        "sh",
        "-c",
        "touch /tmp/ok-survive; exec sleep 600",
    ])?;
    wait_health(&d, "hc-survive", "healthy")?;
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();

    let engine = d.stack.pid(Service::Engine).context("engine pid")?;
    kill(Pid::from_raw(engine), Signal::SIGKILL)?;
    // While the engine is down the probes run on: one goes unhealthy, and the shim keeps the
    // event until the engine is back.
    let bundle = find_health_bundle(&d.stack.state_dir().join("bundles"))
        .context("no bundle with a health.json")?;
    let before = std::fs::read_to_string(bundle.join("health.json"))?;
    // The container is touched directly (no engine): remove the file through its rootfs.
    std::fs::remove_file(bundle.join("rootfs/tmp/ok-survive")).context("rm in the rootfs")?;
    let unhealthy = wait_for(Duration::from_secs(30), || {
        let text = std::fs::read_to_string(bundle.join("health.json")).ok()?;
        text.contains("\"status\":\"unhealthy\"").then_some(text)
    });
    ensure!(
        unhealthy.is_some(),
        "no probe ran while the engine was down; before: {before}"
    );
    let back = wait_for(Duration::from_secs(30), || {
        let pid = d.stack.pid(Service::Engine)?;
        (pid != engine && running(pid) && d.run(&["ps"]).is_ok_and(|o| o.status.success()))
            .then_some(pid)
    });
    if back.is_none() {
        bail!(
            "the engine was not restarted after kill -9; log:\n{}",
            d.stack.log_text()
        );
    }
    let h = wait_health(&d, "hc-survive", "unhealthy")?;
    ensure!(h["FailingStreak"].as_u64() >= Some(1), "{h}");
    // The event published while the engine was down arrives after it is back.
    let script = format!(
        r#"{PRELUDE}
events = client.events(decode=True, since={t0}, until=time.time() + 1,
                       filters={{"container": "hc-survive", "event": "health_status"}})
got = [e["Action"] for e in events]
assert got == ["health_status: unhealthy"], got
c = client.containers.get("hc-survive")
c.exec_run(["touch", "/tmp/ok-survive"])
wait_status(c, "healthy")
c.stop(timeout=1)
print("ok")
"#
    );
    let out = py_kit::ok(&d, &script)?;
    ensure!(out.trim_end().ends_with("ok"), "{out}");
    // Stopped: no probe processes are left, and the bundle's state says unhealthy.
    let leftover = Command::new("pgrep")
        .args(["-f", "test -f /tmp/ok-survive"])
        .output()?;
    ensure!(
        !leftover.status.success(),
        "probe processes left: {}",
        String::from_utf8_lossy(&leftover.stdout)
    );
    d.ok(&["rm", "-f", "hc-survive"])?;
    Ok(())
}
