//! docker-py 7 (Docker's Python SDK, from PyPI) against a real stack: version negotiation, a
//! container run with its output, logs, wait, inspect and removal, images and volumes listed.
//! Root only; skips cleanly otherwise.

use anyhow::Result;
use berth_integration::gateway_kit::DockerStack;
use berth_integration::py_kit;

const SCRIPT: &str = r#"
import docker
client = docker.from_env(version="auto")
assert client.ping()
v = client.version()
assert v["ApiVersion"] == "1.45", v
out = client.containers.run("busybox", ["sh", "-c", "echo hello; echo oops >&2"], remove=True,
                            stdout=True, stderr=True)
assert out == b"hello\noops\n", out
c = client.containers.run("busybox", ["sh", "-c", "echo one; exit 3"], detach=True,
                          labels={"t": "basics"})
assert c.wait()["StatusCode"] == 3
assert c.logs() == b"one\n", c.logs()
c.reload()
assert c.status == "exited", c.status
assert c.labels["t"] == "basics"
assert [x.id for x in client.containers.list(all=True, filters={"label": "t=basics"})] == [c.id]
c.remove()
assert client.containers.list(all=True, filters={"label": "t=basics"}) == []
assert any("busybox:latest" in i.tags for i in client.images.list())
vol = client.volumes.create("pyvol")
assert vol.name == "pyvol"
vol.remove()
print("ok")
"#;

#[test]
fn docker_py_runs_containers() -> Result<()> {
    if !py_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let out = py_kit::ok(&d, SCRIPT)?;
    anyhow::ensure!(out.trim_end().ends_with("ok"), "{out}");
    Ok(())
}
