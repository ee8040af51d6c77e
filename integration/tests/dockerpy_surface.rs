//! docker-py 7 against the parts of the Docker API the CLI rarely touches: swarm answers as a
//! node outside a swarm (the `client.swarm` model and network cleanup tolerate them), network
//! prune and a network name with spaces, `get_registry_data()` for an image pushed as an OCI
//! index and as a Docker v2 manifest, pull errors (a missing repository is ImageNotFound, an
//! unreachable registry a 500), `images.load()` of garbage, and the `ContainerConfig` an API 1.41
//! client reads from image inspect. The real docker CLI checks the swarm answer too. Root only;
//! skips cleanly otherwise.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, ensure};
use berth_integration::gateway_kit::DockerStack;
use berth_integration::images_kit::{Registry, free_port, oci_dir};
use berth_integration::py_kit;
use sha2::{Digest as _, Sha256};

const SCRIPT: &str = r#"
import os
import docker
from docker.errors import APIError, ImageLoadError, ImageNotFound

reg = os.environ["REG"]
arch = os.environ["ARCH"]
client = docker.from_env(version="auto")

# Swarm: every call is dockerd's 503 for a node outside a swarm; the Swarm model, which reloads
# on creation, tolerates it (docker-py accepts only 503 or 406 there).
swarm = client.swarm
assert swarm.attrs == {}, swarm.attrs
assert client.info()["Swarm"]["LocalNodeState"] == "inactive"
calls = {
    "swarm inspect": lambda: client.api.inspect_swarm(),
    "swarm leave": lambda: client.api.leave_swarm(force=False),
    "nodes": lambda: client.nodes.list(),
    "services": lambda: client.services.list(),
    "tasks": lambda: client.api.tasks(),
    "secrets": lambda: client.secrets.list(),
    "configs": lambda: client.configs.list(),
    "unlock key": lambda: client.api.get_unlock_key(),
}
for name, call in calls.items():
    try:
        call()
        raise AssertionError(name + ": no error")
    except APIError as e:
        assert e.status_code == 503, (name, e.status_code, e.explanation)
        assert "not a swarm manager" in e.explanation or "not part of a swarm" in e.explanation, (
            name, e.explanation)
# With force, docker-py takes the 503 as "not in a swarm" (its cleanup does this).
assert client.swarm.leave(force=True) is True
try:
    client.swarm.init()
    raise AssertionError("swarm init: no error")
except APIError as e:
    assert e.status_code == 503, e
    assert "no Swarm mode" in e.explanation and "Kubernetes CRI" in e.explanation, e.explanation

# Networks: a name with spaces, endpoint fields null when empty, prune, and the cleanup a test
# suite does (leave the swarm tolerating 503/406, remove networks).
name = "berth surface net"
net = client.networks.create(name, labels={"t": "surface"})
assert client.networks.get(name).name == name
assert client.networks.get(net.id).attrs["Name"] == name
c = client.containers.run("busybox", ["sh", "-c", "ip -4 addr show eth0 | grep -c inet"],
                          network=name, detach=True)
assert c.wait()["StatusCode"] == 0 and c.logs() == b"1\n", c.logs()
c.reload()
ep = c.attrs["NetworkSettings"]["Networks"][name]
for key in ("IPAMConfig", "Links", "DriverOpts", "Aliases"):
    assert key in ep, (key, ep)
for key in ("IPAMConfig", "Links", "DriverOpts"):
    assert ep[key] is None, (key, ep)
c.remove(force=True)
client.networks.create("berth-prune-me")
pruned = client.networks.prune()
assert sorted(pruned["NetworksDeleted"] or []) == sorted([name, "berth-prune-me"]), pruned
left = {n.name for n in client.networks.list()}
assert not left & {name, "berth-prune-me"}, left

# Distribution: an OCI index and a Docker v2 manifest, with their platforms.
d = client.images.get_registry_data(reg + "/surface-index:latest")
assert d.attrs["Descriptor"]["mediaType"] == "application/vnd.oci.image.index.v1+json", d.attrs
assert d.id.startswith("sha256:") and d.attrs["Descriptor"]["size"] > 0, d.attrs
assert d.attrs["Platforms"] == [{"architecture": arch, "os": "linux"}], d.attrs
assert d.has_platform("linux/" + arch)
d = client.images.get_registry_data(reg + "/surface-v2:latest")
assert d.attrs["Descriptor"]["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json", d.attrs
assert d.attrs["Platforms"] == [{"architecture": arch, "os": "linux"}], d.attrs
pulled = client.images.pull(reg + "/surface-v2:latest")
assert (reg + "/surface-v2@" + d.id) in pulled.attrs["RepoDigests"], (pulled.attrs["RepoDigests"], d.id)

# Pull errors: a repository that does not exist is ImageNotFound (404, Docker's wording); an
# unreachable registry is a 500 with the cause.
try:
    client.images.pull(reg + "/doesnotexist")
    raise AssertionError("pull of a missing repository: no error")
except ImageNotFound as e:
    assert e.status_code == 404, e
    assert e.explanation.startswith(
        "pull access denied for " + reg + "/doesnotexist, repository does not exist or may "
        "require 'docker login': "), e.explanation
try:
    client.images.pull(reg + "/surface-v2:nosuchtag")
    raise AssertionError("pull of a missing tag: no error")
except APIError as e:
    assert e.status_code == 404, e
    assert e.explanation.startswith(
        "manifest for " + reg + "/surface-v2:nosuchtag not found: manifest unknown"), e.explanation
unreachable = os.environ["UNREACHABLE"]
try:
    client.images.pull(unreachable + "/x:1")
    raise AssertionError("pull from an unreachable registry: no error")
except APIError as e:
    assert e.status_code == 500, (e.status_code, e.explanation)
    assert unreachable in e.explanation and "connect" in e.explanation, e.explanation

# A load of garbage answers 200 with the error in the stream, as dockerd: docker-py raises
# ImageLoadError from that line (a status would be an APIError).
try:
    client.images.load(b"garbage")
    raise AssertionError("load of garbage: no error")
except ImageLoadError as e:
    assert str(e), e

# An API 1.41 client (docker-compose 1.29 era) reads ContainerConfig from image inspect; 1.45
# has no such field.
old = docker.APIClient(base_url=os.environ["DOCKER_HOST"], version="1.41")
i = old.inspect_image("busybox")
assert "ContainerConfig" in i and "Container" in i, sorted(i)
assert isinstance(i["ContainerConfig"], dict) and "Image" in i["ContainerConfig"], i["ContainerConfig"]
assert i["VirtualSize"] == i["Size"], i
assert "ContainerConfig" not in client.api.inspect_image("busybox")
print("ok")
"#;

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A copy of the test busybox layout whose `latest` is an OCI index with one platform entry.
fn index_layout(dir: &Path, arch: &str) -> Result<()> {
    let src = oci_dir("busybox");
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(dir)
        .status()?;
    ensure!(status.success(), "copy the busybox layout");
    let top: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)?;
    let mut manifest = top["manifests"][0].clone();
    manifest
        .as_object_mut()
        .context("manifest descriptor")?
        .remove("annotations");
    manifest["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest],
    }))?;
    let hex = sha256_hex(&index);
    std::fs::write(dir.join("blobs/sha256").join(&hex), &index)?;
    let layout = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{hex}"),
            "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&layout)?)?;
    Ok(())
}

/// `skopeo copy` of `layout:latest` to the registry, with extra arguments.
fn skopeo_push(registry: &Registry, layout: &Path, repo_tag: &str, extra: &[&str]) -> Result<()> {
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .args(extra)
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(format!("docker://{}/{repo_tag}", registry.host))
        .output()
        .context("run skopeo")?;
    ensure!(
        out.status.success(),
        "skopeo copy {repo_tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn docker_py_meets_dockerds_answers_beyond_the_cli() -> Result<()> {
    if !py_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let registry = py_kit::with_busybox(&d)?;
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let dir = tempfile::tempdir()?;
    index_layout(dir.path(), arch)?;
    skopeo_push(&registry, dir.path(), "surface-index:latest", &["--all"])?;
    skopeo_push(
        &registry,
        &oci_dir("busybox"),
        "surface-v2:latest",
        &["--format", "v2s2"],
    )?;
    // A loopback port nothing listens on.
    let unreachable = format!("127.0.0.1:{}", free_port());

    let script = format!(
        "import os\nos.environ['REG'] = {:?}\nos.environ['ARCH'] = {:?}\nos.environ['UNREACHABLE'] = {:?}\n{SCRIPT}",
        registry.host, arch, unreachable
    );
    let out = py_kit::ok(&d, &script)?;
    ensure!(out.trim_end().ends_with("ok"), "{out}");

    // The real docker CLI gets dockerd's answers too.
    let (code, err) = d.fails(&["node", "ls"])?;
    ensure!(code == 1, "docker node ls exited {code}: {err}");
    ensure!(
        err.contains("Error response from daemon: This node is not a swarm manager."),
        "{err}"
    );
    let (code, err) = d.fails(&["swarm", "leave"])?;
    ensure!(code == 1, "docker swarm leave exited {code}: {err}");
    ensure!(
        err.contains("Error response from daemon: This node is not part of a swarm"),
        "{err}"
    );
    let (code, err) = d.fails(&["swarm", "init"])?;
    ensure!(code == 1, "docker swarm init exited {code}: {err}");
    ensure!(err.contains("berth has no Swarm mode"), "{err}");
    // `docker search` asks the registry's v1 search API, which this registry does not serve:
    // dockerd's answer.
    let (code, err) = d.fails(&["search", &format!("{}/busybox", registry.host)])?;
    ensure!(code == 1, "docker search exited {code}: {err}");
    ensure!(
        err.contains("Error response from daemon: Unexpected status code 404"),
        "{err}"
    );
    Ok(())
}
