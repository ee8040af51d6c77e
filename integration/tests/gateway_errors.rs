//! Wrong input through the Docker API: the status and `{"message"}` clients match on, and the
//! text the real docker CLI prints for them. Root only; skips cleanly otherwise.

use anyhow::{Result, ensure};
use berth_integration::gateway_kit::{DockerStack, raw_request, ready};
use berth_integration::images_kit::{Registry, RegistryOptions, oci_dir};

#[test]
fn wrong_input_gets_dockers_statuses_and_wording() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let registry = Registry::start(RegistryOptions::default())?;
    registry.push_oci(&oci_dir("busybox"), "busybox:latest")?;
    let busybox = format!("{}/busybox:latest", registry.host);
    let d = DockerStack::start()?;
    d.ok(&["pull", "-q", &busybox])?;
    let sock = d.socket();

    // Bad JSON: 400 with a JSON message.
    let (code, head, body) = raw_request(&sock, "POST", "/v1.45/containers/create", "{not json")?;
    ensure!(code == 400, "bad JSON: {code} {body}");
    ensure!(head.contains("content-type: application/json"), "{head}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    ensure!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("invalid JSON")),
        "{body}"
    );
    let (code, _, _) = raw_request(&sock, "POST", "/v1.45/networks/create", "[]")?;
    ensure!(code == 400, "network create with a list: {code}");
    let (code, _, body) = raw_request(&sock, "GET", "/v1.45/containers/json?filters=%7Bnope", "")?;
    ensure!(
        code == 400 && body.contains("invalid filter"),
        "{code} {body}"
    );
    let (code, _, body) = raw_request(&sock, "GET", "/v1.99/version", "")?;
    ensure!(
        code == 400 && body.contains("client version 1.99 is too new"),
        "{code} {body}"
    );

    // Unknown container: 404 "No such container", and the CLI's usual lines.
    let (code, _, body) = raw_request(&sock, "GET", "/v1.45/containers/ghost/json", "")?;
    ensure!(
        code == 404 && body.contains("\"No such container: ghost\""),
        "{code} {body}"
    );
    let (_, err) = d.fails(&["logs", "ghost"])?;
    ensure!(
        err.trim() == "Error response from daemon: No such container: ghost",
        "{err}"
    );
    let (_, err) = d.fails(&["start", "ghost"])?;
    ensure!(
        err.contains("Error response from daemon: No such container: ghost")
            && err.contains("failed to start containers: ghost"),
        "{err}"
    );
    let (_, err) = d.fails(&["inspect", "ghost"])?;
    ensure!(err.contains("No such object: ghost"), "{err}");
    let (_, err) = d.fails(&["exec", "ghost", "true"])?;
    ensure!(err.contains("No such container: ghost"), "{err}");

    // A taken name: 409 Conflict with the holder's id.
    let id = d.ok(&["create", "--name", "taken", &busybox, "true"])?;
    let (_, err) = d.fails(&["create", "--name", "taken", &busybox, "true"])?;
    ensure!(
        err.contains(&format!(
            "Error response from daemon: Conflict. The container name \"/taken\" is already in use by container \"{id}\". You have to remove (or rename) that container to be able to reuse that name."
        )),
        "{err}"
    );

    // Removing a running container without force: 409.
    let running = d.ok(&["run", "-d", "--name", "busy", &busybox, "sleep", "300"])?;
    let (_, err) = d.fails(&["rm", "busy"])?;
    ensure!(
        err.contains(&format!(
            "Error response from daemon: You cannot remove a running container {running}. Stop the container before attempting removal or force remove"
        )),
        "{err}"
    );
    let (code, _, _) = raw_request(&sock, "DELETE", "/v1.45/containers/busy", "")?;
    ensure!(code == 409, "DELETE running: {code}");
    // Starting a started container: 304, which the CLI treats as success.
    let (code, _, _) = raw_request(&sock, "POST", "/v1.45/containers/busy/start", "")?;
    ensure!(code == 304, "start of a running container: {code}");
    d.ok(&["start", "busy"])?;
    // Killing a stopped one: 409.
    d.ok(&["stop", "-t", "0", "busy"])?;
    let (_, err) = d.fails(&["kill", "busy"])?;
    ensure!(err.contains("is not running"), "{err}");
    let (code, _, _) = raw_request(&sock, "POST", "/v1.45/containers/busy/stop", "")?;
    ensure!(code == 304, "stop of a stopped container: {code}");

    // Unknown image: 404 "No such image" on create, so the CLI pulls, and the pull fails.
    let missing = format!("{}/nosuch:1", registry.host);
    let (code, _, body) = raw_request(
        &sock,
        "POST",
        "/v1.45/containers/create",
        &format!(r#"{{"Image": "{missing}"}}"#),
    )?;
    ensure!(
        code == 404 && body.contains(&format!("No such image: {missing}")),
        "{code} {body}"
    );
    let (code, err) = d.fails(&["run", "--rm", &missing])?;
    ensure!(code == 125, "docker run exit: {code}");
    ensure!(
        err.contains(&format!("Unable to find image '{missing}' locally")),
        "{err}"
    );
    ensure!(err.contains("Error response from daemon:"), "{err}");
    let (_, err) = d.fails(&["rmi", "nosuch"])?;
    ensure!(
        err.trim() == "Error response from daemon: No such image: nosuch:latest",
        "{err}"
    );
    let (_, err) = d.fails(&["image", "inspect", "nosuch"])?;
    ensure!(err.contains("No such image: nosuch:latest"), "{err}");

    // Volumes and networks.
    let (_, err) = d.fails(&["volume", "inspect", "novol"])?;
    ensure!(err.contains("no such volume"), "{err}");
    let (_, err) = d.fails(&["network", "inspect", "nonet"])?;
    ensure!(err.contains("network nonet not found"), "{err}");
    d.ok(&["network", "create", "dupnet"])?;
    let (_, err) = d.fails(&["network", "create", "dupnet"])?;
    ensure!(
        err.contains("network with name dupnet already exists"),
        "{err}"
    );
    d.ok(&["network", "rm", "dupnet"])?;

    let (code, _, body) = raw_request(&sock, "POST", "/v1.45/commit?container=nosuch", "")?;
    ensure!(
        code == 404 && body.contains("No such container: nosuch"),
        "{code} {body}"
    );
    // A build without a context: Docker's 400, before any output.
    let (code, _, body) = raw_request(&sock, "POST", "/v1.45/build", "")?;
    ensure!(
        code == 400 && body.contains("Cannot locate specified Dockerfile: Dockerfile"),
        "{code} {body}"
    );
    Ok(())
}
