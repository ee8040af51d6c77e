//! `docker commit` with the real docker CLI and docker-py: a changed container (added, modified
//! and deleted files, a new directory, a deleted directory replaced) becomes an image whose
//! files, config and history are right; `docker diff`/`export` stay right; the image survives
//! `docker save` + `load` into a fresh stack, `docker push` to a loopback registry and skopeo;
//! a running container is committed paused; bad input leaves nothing behind.
//! Root only; skips cleanly otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use berth_integration::gateway_kit::{DockerStack, raw_request, ready};
use berth_integration::py_kit;
use serde_json::Value;

/// What the changing container does to the busybox image.
const CHANGES: &str = "echo hello > /x \
    && echo extra:x:1:1::/:/bin/sh >> /etc/passwd \
    && rm /etc/group \
    && mkdir -p /newdir/sub && echo deep > /newdir/sub/f \
    && rm -rf /var/www && mkdir /var/www && echo fresh > /var/www/fresh";

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        out.push(e.path().display().to_string());
    }
    out.sort();
    out
}

/// Blobs, snapshots, unfinished ingests and images of a stack: what a failed commit must not
/// change.
#[derive(Debug, PartialEq)]
struct Leftovers {
    blobs: Vec<String>,
    snapshots: Vec<String>,
    ingests: Vec<String>,
    images: String,
}

fn leftovers(d: &DockerStack) -> Result<Leftovers> {
    let root = d.stack.root();
    Ok(Leftovers {
        blobs: files_under(&root.join("content/blobs/sha256")),
        snapshots: files_under(&root.join("snapshotter/overlayfs/snapshots")),
        ingests: files_under(&root.join("content/ingest")),
        images: d.ok(&["images", "-a", "-q", "--no-trunc"])?,
    })
}

fn inspect(d: &DockerStack, what: &str) -> Result<Value> {
    let out = d.ok(&["inspect", what])?;
    let v: Value = serde_json::from_str(&out)?;
    Ok(v[0].clone())
}

fn tar_list(bytes: &[u8]) -> Result<Vec<String>> {
    let mut a = tar::Archive::new(bytes);
    let mut out = Vec::new();
    for e in a.entries()? {
        out.push(e?.path()?.display().to_string());
    }
    Ok(out)
}

#[test]
fn docker_commit_with_the_cli() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let registry = py_kit::with_busybox(&d)?;
    let busybox = inspect(&d, "busybox")?;
    let base_history = d.ok(&["history", "-q", "busybox"])?.lines().count();

    d.ok(&["run", "--name", "cm-src", "busybox", "sh", "-c", CHANGES])?;
    let src_id = d.ok(&["inspect", "-f", "{{.Id}}", "cm-src"])?;
    let diff_before = d.ok(&["diff", "cm-src"])?;
    for want in ["A /x", "C /etc/passwd", "D /etc/group", "A /newdir/sub/f"] {
        ensure!(
            diff_before.lines().any(|l| l == want),
            "diff lacks {want}: {diff_before}"
        );
    }

    // --- bad input first: nothing may be left behind --------------------------------------
    let before = leftovers(&d)?;
    ensure!(
        !before.blobs.is_empty() && !before.snapshots.is_empty(),
        "no store found: {before:?}"
    );
    let (_, err) = d.fails(&["commit", "cm-nope", "cm/x"])?;
    ensure!(err.contains("No such container: cm-nope"), "{err}");
    let (_, err) = d.fails(&["commit", "cm-src", "Bad/Name"])?;
    ensure!(err.contains("invalid reference format"), "{err}");
    let (_, err) = d.fails(&["commit", "-c", "RUN rm -rf /", "cm-src", "cm/x"])?;
    ensure!(err.contains("run is not a valid change command"), "{err}");
    let sock = d.socket();
    let (code, _, body) = raw_request(&sock, "POST", "/v1.45/commit?container=cm-src", "{nope")?;
    ensure!(
        code == 400 && body.contains("invalid JSON"),
        "{code} {body}"
    );
    let (code, _, body) = raw_request(&sock, "POST", "/v1.45/commit?container=cm-nope", "")?;
    ensure!(
        code == 404 && body.contains("No such container: cm-nope"),
        "{code} {body}"
    );
    ensure!(leftovers(&d)? == before, "a refused commit left something");

    // --- the commit ---------------------------------------------------------------------
    let id = d.ok(&[
        "commit",
        "--change",
        r#"CMD ["cat","/x"]"#,
        "-c",
        "ENV A=b",
        "-m",
        "msg",
        "-a",
        "me",
        "cm-src",
        "cm/app:v1",
    ])?;
    ensure!(id.starts_with("sha256:") && id.len() == 71, "id: {id}");
    ensure!(d.ok(&["run", "--rm", "cm/app:v1"])? == "hello");
    let seen = d.ok(&[
        "run",
        "--rm",
        "cm/app:v1",
        "sh",
        "-c",
        "tail -1 /etc/passwd; test -e /etc/group || echo nogroup; cat /newdir/sub/f; ls /var/www; echo A=$A",
    ])?;
    ensure!(
        seen == "extra:x:1:1::/:/bin/sh\nnogroup\ndeep\nfresh\nA=b",
        "files in the committed image: {seen:?}"
    );
    let img = inspect(&d, "cm/app:v1")?;
    ensure!(img["Id"] == id.as_str(), "{img}");
    ensure!(
        img["Config"]["Cmd"] == serde_json::json!(["cat", "/x"]),
        "{img}"
    );
    let env: Vec<&str> = img["Config"]["Env"]
        .as_array()
        .context("env")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        env.contains(&"A=b") && env.iter().any(|e| e.starts_with("PATH=")),
        "{env:?}"
    );
    ensure!(img["Author"] == "me" && img["Comment"] == "msg", "{img}");
    ensure!(img["Parent"] == busybox["Id"], "{img}");
    // Older API versions show the committed container and its config, as Docker records them.
    let old: Value = serde_json::from_str(
        &raw_request(&d.socket(), "GET", "/v1.41/images/cm/app:v1/json", "")?.2,
    )?;
    ensure!(old["Container"] == src_id.as_str(), "{old}");
    ensure!(
        old["ContainerConfig"]["Cmd"] == serde_json::json!(["sh", "-c", CHANGES]),
        "{old}"
    );
    let layers = |v: &Value| v["RootFS"]["Layers"].as_array().map(Vec::len).unwrap_or(0);
    ensure!(layers(&img) == layers(&busybox) + 1, "{img}");

    // --- history ------------------------------------------------------------------------
    let rows = d.ok(&[
        "history",
        "--no-trunc",
        "--format",
        "{{.ID}}|{{.CreatedBy}}|{{.Comment}}",
        "cm/app:v1",
    ])?;
    let rows: Vec<&str> = rows.lines().collect();
    ensure!(rows.len() == base_history + 1, "history: {rows:?}");
    ensure!(
        rows[0].starts_with(&format!("{id}|sh -c {CHANGES}")) && rows[0].ends_with("|msg"),
        "top row: {}",
        rows[0]
    );
    let busybox_id = busybox["Id"].as_str().context("id")?;
    ensure!(rows[1].starts_with(&format!("{busybox_id}|")), "{rows:?}");
    ensure!(
        rows[2..].iter().all(|r| r.starts_with("<missing>|")),
        "{rows:?}"
    );
    let api: Value =
        serde_json::from_str(&raw_request(&sock, "GET", "/v1.45/images/cm/app:v1/history", "")?.2)?;
    ensure!(api[0]["Tags"] == serde_json::json!(["cm/app:v1"]), "{api}");
    ensure!(api[0]["Size"].as_i64().unwrap_or(0) > 0, "{api}");

    // --- diff and export stay right -----------------------------------------------------
    ensure!(d.ok(&["diff", "cm-src"])? == diff_before);
    d.ok(&[
        "run",
        "--name",
        "cm-child",
        "cm/app:v1",
        "sh",
        "-c",
        "rm /x; echo y > /y",
    ])?;
    let child_diff = d.ok(&["diff", "cm-child"])?;
    let mut lines: Vec<&str> = child_diff.lines().collect();
    lines.sort();
    ensure!(lines == ["A /y", "D /x"], "child diff: {child_diff}");
    let export = d.cmd(&["export", "cm-child"]).output()?;
    ensure!(export.status.success());
    let names = tar_list(&export.stdout)?;
    for want in ["y", "newdir/sub/f", "var/www/fresh"] {
        ensure!(names.iter().any(|n| n == want), "export lacks {want}");
    }
    ensure!(
        !names
            .iter()
            .any(|n| n == "x" || n == "etc/group" || n.starts_with("var/www/index.html")),
        "export has deleted files"
    );

    // --- a commit of a container of the committed image: the parent chain in history ---------
    let v2 = d.ok(&["commit", "cm-child", "cm/app:v2"])?;
    ensure!(
        d.ok(&[
            "run",
            "--rm",
            "cm/app:v2",
            "sh",
            "-c",
            "cat /y; test -e /x || echo nox; cat /newdir/sub/f"
        ])? == "y\nnox\ndeep"
    );
    let rows = d.ok(&["history", "-q", "--no-trunc", "cm/app:v2"])?;
    let rows: Vec<&str> = rows.lines().collect();
    ensure!(
        rows.len() == base_history + 2 && rows[..3] == [v2.as_str(), id.as_str(), busybox_id],
        "v2 history: {rows:?}"
    );

    // --- the builder's commit: nothing changed, no layer ----------------------------------
    d.ok(&["run", "--name", "cm-same", "busybox", "true"])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let same = rt.block_on(async {
        use berth_proto::berth::engine::v1 as epb;
        let mut c = epb::containers_client::ContainersClient::new(berth_core::uds::channel(
            d.stack.socket(berth_core::Service::Engine),
        ));
        c.commit(epb::CommitContainerRequest {
            id: "cm-same".into(),
            created_by: "/bin/sh -c #(nop)  LABEL a=b".into(),
            config: br#"{"Cmd":["sh"],"Labels":{"a":"b"}}"#.to_vec(),
            empty_layer_when_unchanged: true,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().image_id)
    })?;
    let same_img = inspect(&d, &same)?;
    ensure!(layers(&same_img) == layers(&busybox), "{same_img}");
    ensure!(same_img["Config"]["Labels"]["a"] == "b", "{same_img}");
    let top = d.ok(&[
        "history",
        "--no-trunc",
        "--format",
        "{{.CreatedBy}}|{{.Size}}",
        &same,
    ])?;
    ensure!(
        top.lines().next() == Some("/bin/sh -c #(nop)  LABEL a=b|0B"),
        "history: {top}"
    );

    // `docker commit` of an unchanged container records an empty layer, as moby does.
    let same_cli = d.ok(&["commit", "cm-same", "cm/same:v1"])?;
    ensure!(layers(&inspect(&d, &same_cli)?) == layers(&busybox));

    // --- push, and skopeo reads it --------------------------------------------------------
    let pushed = format!("{}/cm/app:v1", registry.host);
    d.ok(&["tag", "cm/app:v1", &pushed])?;
    d.ok(&["push", &pushed])?;
    let out = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--config"])
        .arg(format!("docker://{pushed}"))
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        cfg["config"]["Cmd"] == serde_json::json!(["cat", "/x"]),
        "{cfg}"
    );
    ensure!(
        cfg["history"].as_array().map(Vec::len) == Some(base_history + 1),
        "{cfg}"
    );
    let oci = tempfile::tempdir()?;
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{pushed}"))
        .arg(format!("oci:{}:v1", oci.path().display()))
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top = top_layer(oci.path())?;
    let names = tar_list(&top)?;
    for want in [
        "x",
        "etc/passwd",
        "etc/.wh.group",
        "newdir/sub/f",
        "var/www/.wh..wh..opq",
        "var/www/fresh",
    ] {
        ensure!(
            names.iter().any(|n| n == want),
            "layer lacks {want}: {names:?}"
        );
    }
    ensure!(
        !names
            .iter()
            .any(|n| n.starts_with("etc/hosts") || n.starts_with("proc")),
        "layer has runtime mount points: {names:?}"
    );

    // --- save, and load into a fresh stack ------------------------------------------------
    let dir = tempfile::tempdir()?;
    let archive: PathBuf = dir.path().join("cm.tar");
    d.ok(&["save", "-o", archive.to_str().context("path")?, "cm/app:v1"])?;
    let fresh = DockerStack::start()?;
    let load = fresh.ok(&["load", "-i", archive.to_str().context("path")?])?;
    ensure!(load.contains("Loaded image: cm/app:v1"), "{load}");
    ensure!(inspect(&fresh, "cm/app:v1")?["Id"] == id.as_str());
    ensure!(fresh.ok(&["run", "--rm", "cm/app:v1"])? == "hello");
    ensure!(
        fresh.ok(&[
            "run",
            "--rm",
            "cm/app:v1",
            "sh",
            "-c",
            "ls /var/www; test -e /etc/group || echo nogroup"
        ])? == "fresh\nnogroup"
    );
    // The pushed image pulled back by a stack that never saw it.
    fresh.ok(&["pull", "-q", &pushed])?;
    ensure!(fresh.ok(&["run", "--rm", &pushed])? == "hello");
    Ok(())
}

/// The uncompressed top layer of the OCI layout `dir`'s only image.
fn top_layer(dir: &Path) -> Result<Vec<u8>> {
    let blob = |digest: &str| {
        dir.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let index: Value = serde_json::from_slice(&std::fs::read(dir.join("index.json"))?)?;
    let m = index["manifests"][0]["digest"]
        .as_str()
        .context("manifest")?;
    let manifest: Value = serde_json::from_slice(&std::fs::read(blob(m))?)?;
    let layer = manifest["layers"]
        .as_array()
        .and_then(|l| l.last())
        .context("layers")?;
    let media = layer["mediaType"].as_str().unwrap_or("");
    ensure!(media.ends_with("gzip"), "layer media type {media}");
    let data = std::fs::read(blob(layer["digest"].as_str().context("digest")?))?;
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(data.as_slice()), &mut out)?;
    Ok(out)
}

const PY_SCRIPT: &str = r#"
import time
import docker
client = docker.from_env(version="auto")
c = client.containers.run("busybox", ["sh", "-c", "echo live > /live; rm /etc/group; sleep 300"],
                          detach=True, name="cm-py-live")
for _ in range(200):
    if c.exec_run(["cat", "/live"]).output == b"live\n":
        break
    time.sleep(0.05)
img = c.commit(repository="cm-py/live", tag="t", message="py", author="py",
               changes=['CMD ["cat","/live"]'])
c.reload()
assert c.status == "running", c.status
assert client.containers.run(img.id, remove=True) == b"live\n"
assert client.containers.run(img.id, ["sh", "-c", "test -e /etc/group || echo gone"],
                             remove=True) == b"gone\n"
h = img.history()
assert h[0]["Id"] == img.id and h[0]["Comment"] == "py", h[0]
assert h[0]["Tags"] == ["cm-py/live:t"], h[0]
img.reload()
assert img.attrs["Config"]["Cmd"] == ["cat", "/live"], img.attrs["Config"]
assert img.attrs["Author"] == "py"
# Without pausing, and with a body config that is merged with the container's.
img2 = c.commit(repository="cm-py/nopause", pause=False, conf={"Cmd": ["cat", "/live"]})
img2.reload()
assert img2.attrs["Config"]["Cmd"] == ["cat", "/live"]
assert any(e.startswith("PATH=") for e in img2.attrs["Config"]["Env"])
assert client.containers.run(img2.id, remove=True) == b"live\n"
c.remove(force=True)
try:
    client.api.commit("cm-py-nope")
    raise SystemExit("commit of a missing container succeeded")
except docker.errors.NotFound as e:
    assert "No such container: cm-py-nope" in str(e), e
print("ok")
"#;

#[test]
fn docker_py_commits_a_running_container() -> Result<()> {
    if !py_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let out = py_kit::ok(&d, PY_SCRIPT)?;
    ensure!(out.trim_end().ends_with("ok"), "{out}");
    // The pause was undone and its events are Docker's. `--until` counts in whole seconds:
    // let the second of the last event pass so the listing includes it.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let events = d.ok(&[
        "events",
        "--since",
        "0",
        "--until",
        "0s",
        "--filter",
        "container=cm-py-live",
        "--format",
        "{{.Action}}",
    ])?;
    ensure!(
        events.lines().filter(|l| *l == "commit").count() == 2,
        "events: {events}"
    );
    let pauses = events.lines().filter(|l| *l == "pause").count();
    let unpauses = events.lines().filter(|l| *l == "unpause").count();
    ensure!(pauses == 1 && unpauses == 1, "events: {events}");
    Ok(())
}

/// `Images.CreateImage` straight: an empty layer adds a history entry only; a layer that
/// cannot be unpacked, an unknown parent or bad config JSON leave no blob, snapshot or record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_create_is_all_or_nothing() {
    use berth_core::snapshots::Snapshotter;
    use berth_integration::images_kit::{self as kit, ImagesStack};
    use berth_proto::berth::images::v1 as pb;
    if !kit::ready() {
        return;
    }
    let stack = ImagesStack::start("").unwrap();
    let mut c = stack.client();
    let base = kit::import(&mut c, &kit::docker_archive("busybox"))
        .await
        .unwrap()
        .images
        .remove(0)
        .image_id;
    let create = |opts: pb::CreateImageOptions, data: Vec<u8>| {
        let mut c = stack.client();
        let mut msgs = vec![pb::CreateImageRequest {
            part: Some(pb::create_image_request::Part::Options(opts)),
        }];
        for chunk in data.chunks(1 << 16) {
            msgs.push(pb::CreateImageRequest {
                part: Some(pb::create_image_request::Part::Data(chunk.to_vec())),
            });
        }
        async move { c.create_image(tokio_stream::iter(msgs)).await }
    };
    let sn = stack.snapshotter();
    let snapshots = || async { sn.list(&[]).await.unwrap().len() };
    let blobs = stack.stored_blobs();
    let snaps = snapshots().await;

    // A layer tar that is not a tar: stored, then unpacking fails, and everything is undone.
    let err = create(
        pb::CreateImageOptions {
            parent: base.clone(),
            config: br#"{"Cmd":["sh"]}"#.to_vec(),
            reference: "cm/broken:v1".into(),
            ..Default::default()
        },
        vec![0x42; 5000],
    )
    .await
    .unwrap_err();
    assert!(err.message().contains("layer"), "{err:?}");
    assert_eq!(stack.stored_blobs(), blobs, "blobs left by a failed create");
    assert_eq!(snapshots().await, snaps, "snapshot left by a failed create");
    for (opts, what) in [
        (
            pb::CreateImageOptions {
                parent: "sha256:0123456789ab".into(),
                ..Default::default()
            },
            "unknown parent",
        ),
        (
            pb::CreateImageOptions {
                parent: base.clone(),
                config: b"{nope".to_vec(),
                ..Default::default()
            },
            "bad config",
        ),
    ] {
        assert!(create(opts, Vec::new()).await.is_err(), "{what}");
        assert_eq!(stack.stored_blobs(), blobs, "{what}");
    }
    let list = c
        .list(pb::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(list.len(), 1, "{list:?}");

    // An empty layer: same layers and chain, one more history entry marked empty.
    let made = create(
        pb::CreateImageOptions {
            parent: base.clone(),
            config: br#"{"Cmd":["true"]}"#.to_vec(),
            created_by: "/bin/sh -c #(nop)  CMD [\"true\"]".into(),
            empty_layer: true,
            reference: "cm/empty:v1".into(),
            ..Default::default()
        },
        Vec::new(),
    )
    .await
    .unwrap()
    .into_inner();
    let get = |r: &str| {
        let mut c = stack.client();
        let r = r.to_string();
        async move {
            c.get(pb::GetImageRequest {
                reference: r,
                platform: None,
            })
            .await
            .unwrap()
            .into_inner()
            .image
            .unwrap()
        }
    };
    let (child, parent) = (get(&made.image_id).await, get(&base).await);
    assert_eq!(made.reference, "docker.io/cm/empty:v1");
    assert_eq!(child.chain_id, parent.chain_id);
    assert_eq!(child.parent, base);
    assert_eq!(child.history.len(), parent.history.len() + 1);
    let last = child.history.last().unwrap();
    assert!(
        last.empty_layer && last.created_by.contains("CMD"),
        "{last:?}"
    );
    assert_eq!(snapshots().await, snaps, "an empty layer makes no snapshot");

    // No parent (FROM scratch): one layer, one history entry, unpacked.
    let made = create(
        pb::CreateImageOptions {
            config: br#"{"Cmd":["/hello"]}"#.to_vec(),
            created_by: "COPY hello /".into(),
            ..Default::default()
        },
        kit::raw_tar(&[("hello", b"hi")]),
    )
    .await
    .unwrap()
    .into_inner();
    let scratch = get(&made.image_id).await;
    assert_eq!(scratch.diff_ids.len(), 1);
    assert_eq!(scratch.history.len(), 1);
    assert!(scratch.parent.is_empty());
    assert_eq!(scratch.os, "linux");
    let info = sn.stat(&scratch.chain_id).await.unwrap();
    assert_eq!(info.kind, berth_core::snapshots::Kind::Committed);
    assert!(made.reference.is_empty());
}

/// A `kill -9` of berth-images in the middle of a commit's layer upload: after the restart
/// nothing of it is left (no partial layer, blob, snapshot or image).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_killed_mid_create_leaves_nothing() {
    use berth_core::snapshots::Snapshotter;
    use berth_integration::images_kit::{self as kit, ImagesStack};
    use berth_integration::stack::wait_for;
    use berth_proto::berth::images::v1 as pb;
    if !kit::ready() {
        return;
    }
    let mut stack = ImagesStack::start("").unwrap();
    let mut c = stack.client();
    let base = kit::import(&mut c, &kit::docker_archive("busybox"))
        .await
        .unwrap()
        .images
        .remove(0)
        .image_id;
    let blobs = stack.stored_blobs();
    let snaps = stack.snapshotter().list(&[]).await.unwrap().len();
    let ingest = stack.root.join("content/ingest");
    let ingests = || std::fs::read_dir(&ingest).map(|d| d.count()).unwrap_or(0);

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::CreateImageRequest {
        part: Some(pb::create_image_request::Part::Options(
            pb::CreateImageOptions {
                parent: base,
                reference: "cm/killed:v1".into(),
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let layer = kit::raw_tar(&[("big", &vec![7u8; 1 << 20])]);
    tx.send(pb::CreateImageRequest {
        part: Some(pb::create_image_request::Part::Data(
            layer[..1 << 19].to_vec(),
        )),
    })
    .await
    .unwrap();
    let call = tokio::spawn(async move {
        c.create_image(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    assert!(
        wait_for(std::time::Duration::from_secs(20), || (ingests() > 0)
            .then_some(()))
        .is_some(),
        "the layer upload never started"
    );
    stack.kill9_images();
    assert!(
        call.await.unwrap().is_err(),
        "the create outlived its daemon"
    );
    drop(tx);
    stack.start_images().unwrap();
    assert!(
        wait_for(std::time::Duration::from_secs(20), || (ingests() == 0)
            .then_some(()))
        .is_some(),
        "the partial layer survived the restart"
    );
    assert_eq!(stack.stored_blobs(), blobs);
    assert_eq!(stack.snapshotter().list(&[]).await.unwrap().len(), snaps);
    let list = stack
        .client()
        .list(pb::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(list.len(), 1, "{list:?}");
}
