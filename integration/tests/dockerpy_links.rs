//! Legacy links, the create fields clients read back, and honest refusals, driven by docker-py
//! 7 and the real docker CLI against a real stack: `--link` variables and `/etc/hosts` on the
//! default bridge (for the process and for `docker exec`), link aliases answered by a user
//! network's DNS (from create and from network connect), link removal, `HostConfig.Links`,
//! MAC addresses, `HostConfig.Runtime`, an empty `docker diff` for a fresh container, and each
//! option berth cannot honour refused with Docker's status and message, leaving nothing behind.
//! Root only; skips cleanly otherwise.

use anyhow::{Result, ensure};
use berth_integration::gateway_kit::DockerStack;
use berth_integration::py_kit;

const LINKS: &str = r#"
import docker, subprocess
client = docker.from_env(version="auto")
api = client.api

def run_out(cid, cmd, check=True):
    # Through the docker CLI: reading exec output with docker-py is another item of the issue.
    cid = cid["Id"] if isinstance(cid, dict) else getattr(cid, "id", cid)
    r = subprocess.run(["docker", "exec", cid] + cmd, capture_output=True, check=check)
    return r.stdout.decode() + r.stderr.decode()

a = api.create_container("busybox", ["sleep", "300"], name="lk_a",
                         environment={"SECRET": "s1", "HOME": "/nohome"}, ports=[80, 81, (53, "udp")])
api.start(a)
a_info = api.inspect_container(a)
a_ip = a_info["NetworkSettings"]["Networks"]["bridge"]["IPAddress"]
a_host = a_info["Config"]["Hostname"]
assert a_ip, a_info["NetworkSettings"]

b = api.create_container("busybox", ["sleep", "300"], name="lk_b",
                         host_config=api.create_host_config(links={"lk_a": "al"}))
api.start(b)
env = run_out(b, ["env"]).splitlines()
for want in [f"AL_PORT=tcp://{a_ip}:80", f"AL_PORT_80_TCP=tcp://{a_ip}:80",
             f"AL_PORT_80_TCP_ADDR={a_ip}", "AL_PORT_80_TCP_PORT=80", "AL_PORT_80_TCP_PROTO=tcp",
             f"AL_PORT_80_TCP_START=tcp://{a_ip}:80", f"AL_PORT_80_TCP_END=tcp://{a_ip}:81",
             f"AL_PORT_53_UDP=udp://{a_ip}:53", "AL_NAME=/lk_b/al", "AL_ENV_SECRET=s1"]:
    assert want in env, (want, env)
assert not any(e.startswith("AL_ENV_HOME=") or e.startswith("AL_ENV_PATH=") for e in env), env
hosts = run_out(b, ["cat", "/etc/hosts"]).splitlines()
assert f"{a_ip}\tal {a_host} lk_a" in hosts, hosts
assert api.inspect_container(b)["HostConfig"]["Links"] == ["/lk_a:/lk_b/al"]

# Removing the link: the route with a "/" in the name.
api.remove_container("lk_b/al", link=True)
assert api.inspect_container(b)["HostConfig"]["Links"] is None
try:
    api.remove_container("lk_b/al", link=True)
    assert False, "removing a link twice succeeded"
except docker.errors.APIError as e:
    assert e.status_code == 404, e

# A link to a container that is not running: create is fine, start is refused.
c = api.create_container("busybox", ["true"], name="lk_c",
                         host_config=api.create_host_config(links={"lk_a": "al"}))
api.stop(a, timeout=0)
try:
    api.start(c)
    assert False, "start with a stopped link target succeeded"
except docker.errors.APIError as e:
    assert e.status_code == 500, e
    assert "Cannot link to a non running container: /lk_a AS /lk_c/al" in str(e), e
assert not api.inspect_container(c)["State"]["Running"]
api.remove_container(c)

# A link to a container that does not exist: refused at create, nothing left.
try:
    api.create_container("busybox", ["true"], name="lk_x",
                         host_config=api.create_host_config(links={"nope": "x"}))
    assert False, "link to a missing container accepted"
except docker.errors.APIError as e:
    assert e.status_code == 400, e
    assert "could not get container for nope" in str(e), e
assert client.containers.list(all=True, filters={"name": "lk_x"}) == []

# User-defined network: the alias resolves through the network's DNS, for the linker only.
net = client.networks.create("lk_net")
d = client.containers.run("busybox", ["sleep", "300"], name="lk_d", network="lk_net", detach=True)
d.reload()
d_ip = d.attrs["NetworkSettings"]["Networks"]["lk_net"]["IPAddress"]
e = api.create_container(
    "busybox", ["sleep", "300"], name="lk_e",
    host_config=api.create_host_config(network_mode="lk_net"),
    networking_config=api.create_networking_config(
        {"lk_net": api.create_endpoint_config(links=[("lk_d", "dbalias")])}))
api.start(e)
out = run_out(e, ["nslookup", "dbalias"])
assert d_ip in out, out
out = run_out(d, ["nslookup", "dbalias"], check=False)
assert d_ip not in out and "NXDOMAIN" in out, out
f = client.containers.run("busybox", ["sleep", "300"], name="lk_f", network="lk_net", detach=True)
# Links given at network connect, on a second network.
net2 = client.networks.create("lk_net2")
net2.connect(d)
net2.connect(f, links=[("lk_d", "viaconnect")])
out = run_out(f, ["nslookup", "viaconnect"])
assert "viaconnect" in out and "NXDOMAIN" not in out, out
try:
    api.create_container(
        "busybox", ["true"], name="lk_y",
        host_config=api.create_host_config(network_mode="lk_net"),
        networking_config=api.create_networking_config(
            {"lk_net": api.create_endpoint_config(links=[("nope", "x")])}))
    assert False, "user-network link to a missing container accepted"
except docker.errors.APIError as err:
    assert err.status_code == 400, err
    assert "could not get container for nope" in str(err), err
assert client.containers.list(all=True, filters={"name": "lk_y"}) == []

for name in ["lk_f", "lk_e", "lk_d", "lk_b", "lk_a"]:
    api.remove_container(name, force=True)
net2.remove()
net.remove()
print("ok")
"#;

const FIELDS: &str = r#"
import docker, os, subprocess

def run_out(cid, cmd):
    cid = cid["Id"] if isinstance(cid, dict) else getattr(cid, "id", cid)
    r = subprocess.run(["docker", "exec", cid] + cmd, capture_output=True, check=True)
    return r.stdout.decode()
client = docker.from_env(version="auto")
api = client.api

# Config.MacAddress as clients below API 1.44 send it.
old = docker.APIClient(base_url=os.environ["DOCKER_HOST"], version="1.43")
c = old.create_container("busybox", ["sleep", "300"], name="mac_a", mac_address="02:42:ac:11:00:99")
old.start(c)
assert run_out(c, ["cat", "/sys/class/net/eth0/address"]).strip() == "02:42:ac:11:00:99"
info = api.inspect_container(c)
assert info["NetworkSettings"]["Networks"]["bridge"]["MacAddress"] == "02:42:ac:11:00:99", info["NetworkSettings"]
assert info["HostConfig"]["Runtime"] == api.info()["DefaultRuntime"], info["HostConfig"]["Runtime"]
api.remove_container(c, force=True)

# EndpointSettings.MacAddress on a user network.
net = client.networks.create("mac_net")
c = api.create_container(
    "busybox", ["sleep", "300"], name="mac_b",
    host_config=api.create_host_config(network_mode="mac_net"),
    networking_config=api.create_networking_config(
        {"mac_net": api.create_endpoint_config(mac_address="02:42:0a:0b:0c:0d")}))
api.start(c)
assert run_out(c, ["cat", "/sys/class/net/eth0/address"]).strip() == "02:42:0a:0b:0c:0d"
api.remove_container(c, force=True)
net.remove()
try:
    api.create_container("busybox", ["true"], name="mac_bad",
                         networking_config=api.create_networking_config(
                             {"bridge": api.create_endpoint_config(mac_address="zz")}))
    assert False, "bad MAC accepted"
except docker.errors.APIError as e:
    assert e.status_code == 400 and "invalid MAC address zz" in str(e), e
print("ok")
"#;

#[test]
fn docker_py_legacy_links() -> Result<()> {
    if !py_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let out = py_kit::ok(&d, LINKS)?;
    ensure!(out.trim_end().ends_with("ok"), "{out}");

    // The docker CLI: `--link` in the process env, in `docker exec env` and in /etc/hosts.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "cli_a",
        "-e",
        "COLOR=blue",
        "--expose",
        "8080",
        "busybox",
        "sleep",
        "300",
    ])?;
    let ip = d.ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.Networks.bridge.IPAddress}}",
        "cli_a",
    ])?;
    let env = d.ok(&["run", "--rm", "--link", "cli_a:al", "busybox", "env"])?;
    for want in [
        format!("AL_PORT=tcp://{ip}:8080"),
        format!("AL_PORT_8080_TCP_ADDR={ip}"),
        "AL_ENV_COLOR=blue".to_string(),
    ] {
        ensure!(
            env.lines().any(|l| l == want),
            "{want} not in run env:\n{env}"
        );
    }
    ensure!(
        env.lines()
            .any(|l| l.starts_with("AL_NAME=/") && l.ends_with("/al")),
        "{env}"
    );
    d.ok(&[
        "run", "-d", "--name", "cli_b", "--link", "cli_a:al", "busybox", "sleep", "300",
    ])?;
    let env = d.ok(&["exec", "cli_b", "env"])?;
    ensure!(
        env.lines().any(|l| l == "AL_NAME=/cli_b/al"),
        "exec env:\n{env}"
    );
    let hosts = d.ok(&["exec", "cli_b", "cat", "/etc/hosts"])?;
    ensure!(
        hosts
            .lines()
            .any(|l| l.starts_with(&format!("{ip}\tal ")) && l.ends_with(" cli_a")),
        "{hosts}"
    );
    let links = d.ok(&["inspect", "-f", "{{json .HostConfig.Links}}", "cli_b"])?;
    ensure!(links == r#"["/cli_a:/cli_b/al"]"#, "{links}");
    // Links follow renames of either end.
    d.ok(&["rename", "cli_a", "cli_a2"])?;
    d.ok(&["rename", "cli_b", "cli_b2"])?;
    let links = d.ok(&["inspect", "-f", "{{json .HostConfig.Links}}", "cli_b2"])?;
    ensure!(links == r#"["/cli_a2:/cli_b2/al"]"#, "{links}");
    d.ok(&["rename", "cli_a2", "cli_a"])?;
    d.ok(&["rename", "cli_b2", "cli_b"])?;
    d.ok(&["rm", "--link", "/cli_b/al"])?;
    let links = d.ok(&["inspect", "-f", "{{json .HostConfig.Links}}", "cli_b"])?;
    ensure!(links == "null", "{links}");
    let hosts = d.ok(&["exec", "cli_b", "cat", "/etc/hosts"])?;
    ensure!(
        !hosts.lines().any(|l| l.starts_with(&format!("{ip}\tal "))),
        "the removed link is still in /etc/hosts:\n{hosts}"
    );
    d.ok(&["rm", "-f", "cli_b", "cli_a"])?;

    // `--link` with a user network: the alias is answered by the network's DNS.
    d.ok(&["network", "create", "cli_net"])?;
    d.ok(&[
        "run",
        "-d",
        "--name",
        "cli_d",
        "--network",
        "cli_net",
        "busybox",
        "sleep",
        "300",
    ])?;
    let d_ip = d.ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.Networks.cli_net.IPAddress}}",
        "cli_d",
    ])?;
    let out = d.ok(&[
        "run",
        "--rm",
        "--network",
        "cli_net",
        "--link",
        "cli_d:dbx",
        "busybox",
        "nslookup",
        "dbx",
    ])?;
    ensure!(out.contains(&d_ip), "{out}");
    d.ok(&["rm", "-f", "cli_d"])?;
    d.ok(&["network", "rm", "cli_net"])?;
    Ok(())
}

#[test]
fn docker_py_fields_clients_read() -> Result<()> {
    if !py_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let out = py_kit::ok(&d, FIELDS)?;
    ensure!(out.trim_end().ends_with("ok"), "{out}");

    // --mac-address from the CLI, read back inside and in inspect.
    let mac = d.ok(&[
        "run",
        "--rm",
        "--mac-address",
        "02:42:ac:11:00:42",
        "busybox",
        "cat",
        "/sys/class/net/eth0/address",
    ])?;
    ensure!(mac == "02:42:ac:11:00:42", "{mac}");
    let runtime = d.ok(&[
        "inspect",
        "-f",
        "{{.HostConfig.Runtime}}",
        &d.ok(&["create", "busybox", "true"])?,
    ])?;
    let default = d.ok(&["info", "-f", "{{.DefaultRuntime}}"])?;
    ensure!(
        runtime == default && !runtime.is_empty(),
        "{runtime} vs {default}"
    );
    Ok(())
}

/// Refusals: each gives docker-py an `APIError` with Docker's status and words, and leaves no
/// container behind. `@PRIVATE@` and `@SHARED@` are tmpfs mounts the Rust side made.
const REFUSALS: &str = r#"
import docker
from docker.types import LogConfig
client = docker.from_env(version="auto")
api = client.api
hc = api.create_host_config

def count():
    return len(api.containers(all=True))

before = count()

def refused(status, text, **kw):
    try:
        api.create_container("busybox", ["true"], name="refused", **kw)
    except docker.errors.APIError as e:
        assert e.status_code == status, (text, e.status_code, str(e))
        assert text in str(e.explanation), (text, str(e))
    else:
        raise AssertionError(f"accepted: {kw}")
    assert count() == before, f"a refused create left a container: {kw}"

refused(500, "--storage-opt is supported only for overlay over xfs with 'pquota' mount option",
        host_config=hc(storage_opt={"size": "1G"}))
refused(400, "path @PRIVATE@/src is mounted on @PRIVATE@ but it is not a shared mount",
        host_config=hc(binds=["@PRIVATE@/src:/x:rshared"]))
refused(400, "path @PRIVATE@/src is mounted on @PRIVATE@ but it is not a shared or slave mount",
        host_config=hc(binds=["@PRIVATE@/src:/x:rslave"]))
refused(400, "logger: no log driver named 'bogus' is registered",
        host_config=hc(log_config=LogConfig(type="bogus", config={})))
refused(400, "unknown log opt 'x' for json-file log driver",
        host_config=hc(log_config=LogConfig(type="json-file", config={"x": "1"})))
refused(400, "error gathering device information while adding custom device \"/dev/berth-nope\": no such file or directory",
        host_config=hc(devices=["/dev/berth-nope:/dev/x:rwm"]))
refused(400, "cpu real-time runtime cannot be higher than cpu real-time period",
        host_config=hc(cpu_rt_runtime=20000, cpu_rt_period=10000))
refused(400, "invalid PID mode: bogus", host_config=hc(pid_mode="bogus"))
refused(400, "could not select device driver \"\" with capabilities: [[gpu]]",
        host_config=hc(device_requests=[docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]))

# Over a shared host mount, rshared is what the container gets.
c = api.create_container("busybox", ["true"], name="shared_ok",
                         host_config=hc(binds=["@SHARED@/src:/x:rshared"]))
assert api.inspect_container(c)["Mounts"][0]["Propagation"] == "rshared"
api.remove_container(c)

# An update cannot change devices: refused, not dropped.
c = api.create_container("busybox", ["true"], name="upd")
r = api._post_json(api._url("/containers/{0}/update", c["Id"]),
                   data={"Devices": [{"PathOnHost": "/dev/null", "PathInContainer": "/dev/n",
                                      "CgroupPermissions": "rwm"}]})
assert r.status_code == 400, r.status_code
assert "Devices cannot be changed by a container update" in r.json()["message"], r.text
api.remove_container(c)

# NetworkDisabled: loopback only.
c = api.create_container("busybox", ["ls", "/sys/class/net"], name="nonet", network_disabled=True)
api.start(c)
assert api.wait(c)["StatusCode"] == 0
assert api.logs(c).split() == [b"lo"], api.logs(c)
api.remove_container(c)

# VolumesFrom: the other container's volume, read-only when asked.
v = client.containers.run("busybox", ["sh", "-c", "echo shared > /data/f"], name="vsrc",
                          volumes=["/data"], detach=True)
assert v.wait()["StatusCode"] == 0
out = client.containers.run("busybox", ["sh", "-c", "cat /data/f; touch /data/g || echo ro"],
                            volumes_from=["vsrc:ro"], remove=True)
assert out == b"shared\nro\n" or out.startswith(b"shared\n") and b"ro\n" in out, out
v.remove(v=True)
assert count() == before
print("ok")
"#;

/// A tmpfs mounted by the test (private or shared), unmounted when dropped.
struct TestMount(std::path::PathBuf);

impl TestMount {
    fn new(dir: &std::path::Path, shared: bool) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let run = |args: &[&str]| -> Result<()> {
            let st = std::process::Command::new("mount").args(args).status()?;
            ensure!(st.success(), "mount {args:?} failed");
            Ok(())
        };
        let path = dir.to_str().unwrap_or_default();
        run(&["-t", "tmpfs", "berth-test", path])?;
        let m = Self(dir.to_path_buf());
        run(&[
            if shared {
                "--make-shared"
            } else {
                "--make-private"
            },
            path,
        ])?;
        std::fs::create_dir_all(dir.join("src"))?;
        Ok(m)
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn docker_py_refusals_and_diff() -> Result<()> {
    if !py_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let scratch = tempfile::tempdir()?;
    let private = TestMount::new(&scratch.path().join("private"), false)?;
    let shared = TestMount::new(&scratch.path().join("shared"), true)?;
    let script = REFUSALS
        .replace("@PRIVATE@", &private.0.display().to_string())
        .replace("@SHARED@", &shared.0.display().to_string());
    // Mounts under the stack's directory (rootfs, volumes): none is left by a refused create.
    let stack_dir = d.stack.dir().display().to_string();
    let mounts = || -> Result<usize> {
        Ok(std::fs::read_to_string("/proc/self/mountinfo")?
            .lines()
            .filter(|l| l.contains(&stack_dir))
            .count())
    };
    let mounts_before = mounts()?;
    let out = py_kit::ok(&d, &script)?;
    ensure!(out.trim_end().ends_with("ok"), "{out}");
    ensure!(mounts()? == mounts_before, "mounts left under {stack_dir}");

    // The CLI shows the same refusal, and nothing is created.
    let before = d.container_ids().len();
    let (_, err) = d.fails(&["run", "--storage-opt", "size=1G", "busybox", "true"])?;
    ensure!(
        err.contains(
            "--storage-opt is supported only for overlay over xfs with 'pquota' mount option"
        ),
        "{err}"
    );
    ensure!(
        d.container_ids().len() == before,
        "a refused run left a container"
    );

    // docker diff of a fresh container: nothing (the /etc mount points are berth's own).
    d.ok(&["run", "--name", "fresh", "busybox", "true"])?;
    let diff = d.ok(&["diff", "fresh"])?;
    ensure!(diff.is_empty(), "diff of a fresh container:\n{diff}");
    d.ok(&["run", "--name", "touched", "busybox", "touch", "/tmp/x"])?;
    let diff = d.ok(&["diff", "touched"])?;
    ensure!(diff == "C /tmp\nA /tmp/x", "{diff}");
    Ok(())
}

#[test]
fn cpu_realtime_applied_and_read_back() -> Result<()> {
    if !py_kit::ready() {
        return Ok(());
    }
    let parent = std::path::Path::new("/sys/fs/cgroup/cpu/berth");
    if !std::path::Path::new("/sys/fs/cgroup/cpu/cpu.rt_runtime_us").exists() {
        eprintln!("skipped: no RT group scheduling on this host (refusal covered by unit tests)");
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let id = d.ok(&[
        "run",
        "-d",
        "--cpu-rt-runtime",
        "10000",
        "--cpu-rt-period",
        "1000000",
        "busybox",
        "sleep",
        "300",
    ])?;
    let result = (|| -> Result<()> {
        let shown = d.ok(&[
            "inspect",
            "-f",
            "{{.HostConfig.CpuRealtimeRuntime}} {{.HostConfig.CpuRealtimePeriod}}",
            &id,
        ])?;
        ensure!(shown == "10000 1000000", "{shown}");
        let pid = d.ok(&["inspect", "-f", "{{.State.Pid}}", &id])?;
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        let path = cgroups
            .lines()
            .find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
                ctrl.split(',')
                    .any(|c| c == "cpu")
                    .then(|| path.to_string())
            })
            .ok_or_else(|| anyhow::anyhow!("no cpu cgroup in {cgroups}"))?;
        let dir = std::path::Path::new("/sys/fs/cgroup/cpu").join(path.trim_start_matches('/'));
        let rt = std::fs::read_to_string(dir.join("cpu.rt_runtime_us"))?;
        let period = std::fs::read_to_string(dir.join("cpu.rt_period_us"))?;
        ensure!(
            rt.trim() == "10000" && period.trim() == "1000000",
            "{rt} {period}"
        );
        Ok(())
    })();
    d.ok(&["rm", "-f", &id])?;
    // The budget given to berth's cgroup parent goes back once no container holds it.
    let _ = std::fs::write(parent.join("cpu.rt_runtime_us"), "0");
    result
}
