//! berth-images pulls from a real registry on loopback and unpacks into berth-snapshotter.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use berth_integration::images_kit::{
    self as kit, ImagesStack, MountedView, Registry, RegistryOptions,
};
use berth_proto::berth::images::v1 as pb;

/// Every path under `root`, relative, sorted.
fn walk(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            out.insert(p.strip_prefix(root).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                todo.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_layered_and_synthetic_pull_and_unpack() {
    if !kit::ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default()).unwrap();
    for name in ["busybox", "layered", "synthetic"] {
        reg.push_oci(&kit::oci_dir(name), &format!("{name}:latest"))
            .unwrap();
    }
    let stack = ImagesStack::start("").unwrap();
    let mut c = stack.client();

    // busybox
    let r = format!("{}/busybox:latest", reg.host);
    let p = kit::pull(&mut c, &r, None).await.unwrap();
    let done = p.done.clone().expect("PullDone");
    assert!(done.updated);
    assert_eq!(done.digest, reg.manifest_digest("busybox:latest").unwrap());
    assert_eq!(done.reference, r);
    let started = matches!(
        p.events.first().and_then(|e| e.event.as_ref()),
        Some(pb::pull_response::Event::Started(_))
    );
    assert!(started, "first message is PullStarted");
    assert_eq!(p.layers_in(pb::PullLayerPhase::PullComplete).len(), 1);
    assert!(!p.layers_in(pb::PullLayerPhase::DownloadComplete).is_empty());
    let img = c
        .get(pb::GetImageRequest {
            reference: r.clone(),
            platform: None,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(img.id, done.image_id);
    assert_eq!(img.repo_tags, vec![r.clone()]);
    assert_eq!(
        img.repo_digests,
        vec![format!("{}/busybox@{}", reg.host, done.digest)]
    );
    assert_eq!(img.os, "linux");
    assert!(img.size > 0 && img.created.is_some());
    // Pulling again changes nothing and downloads nothing.
    let again = kit::pull(&mut c, &r, None).await.unwrap();
    assert!(!again.done.as_ref().unwrap().updated);
    assert!(again.layers_in(pb::PullLayerPhase::Downloading).is_empty());
    assert_eq!(again.layers_in(pb::PullLayerPhase::AlreadyExists).len(), 1);

    // layered: exactly the final view mkimage.py's docstring lists.
    let r = format!("{}/layered:latest", reg.host);
    let p = kit::pull(&mut c, &r, None).await.unwrap();
    assert!(p.done.is_some());
    // The busybox layer was shared.
    assert_eq!(p.layers_in(pb::PullLayerPhase::AlreadyExists).len(), 1);
    let res = c
        .resolve(pb::ResolveImageRequest {
            reference: r.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!res.chain_id.is_empty());
    assert_eq!(res.snapshotter, "overlayfs");
    {
        let view = MountedView::new(stack.snapshotter(), &res.chain_id)
            .await
            .unwrap();
        let data = view.path.join("data");
        let got = walk(&data);
        let want: BTreeSet<String> = ["b", "hard", "dir", "dir/y", "link", "secret", "suid"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(got, want, "final view of /data");
        assert_eq!(std::fs::read(data.join("dir/y")).unwrap(), b"y\n");
        assert_eq!(
            std::fs::read_link(data.join("link")).unwrap(),
            Path::new("a")
        );
        assert!(
            std::fs::metadata(data.join("link")).is_err(),
            "link dangles"
        );
        let b = std::fs::metadata(data.join("b")).unwrap();
        assert_eq!(
            b.ino(),
            std::fs::metadata(data.join("hard")).unwrap().ino(),
            "hard link"
        );
        assert_eq!(
            std::fs::metadata(data.join("secret")).unwrap().mode() & 0o7777,
            0o600
        );
        assert_eq!(
            std::fs::metadata(data.join("suid")).unwrap().mode() & 0o7777,
            0o4755
        );
        assert_eq!(b.mtime(), 1_700_000_000);
        assert!(view.path.join("bin/busybox").is_file());
        assert_eq!(
            std::fs::metadata(view.path.join("tmp")).unwrap().mode() & 0o7777,
            0o1777
        );
        assert_eq!(
            std::fs::read_link(view.path.join("bin/sh")).unwrap(),
            Path::new("/bin/busybox")
        );
    }

    // synthetic: four big layers on top of busybox.
    let r = format!("{}/synthetic:latest", reg.host);
    let p = kit::pull(&mut c, &r, None).await.unwrap();
    assert_eq!(p.layers_in(pb::PullLayerPhase::PullComplete).len(), 4);
    let img = c
        .get(pb::GetImageRequest {
            reference: r,
            platform: None,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(img.diff_ids.len(), 5);
    assert!(img.size > (4 * 16) << 20);

    let list = c
        .list(pb::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.images.len(), 3);

    // Bad input gets clear errors.
    let e = kit::pull(&mut c, &format!("{}/nothing:here", reg.host), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert!(e.message().contains("repository does not exist"), "{e:?}");
    let e = kit::pull(&mut c, "Not A Reference", None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = kit::pull(&mut c, "127.0.0.1:1/closed:port", None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_blob_fails_with_a_digest_mismatch_and_leaves_nothing() {
    if !kit::ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default()).unwrap();
    reg.push_oci(&kit::oci_dir("busybox"), "tampered:latest")
        .unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(kit::oci_dir("busybox").join("index.json")).unwrap())
            .unwrap();
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            kit::oci_dir("busybox")
                .join("blobs/sha256")
                .join(&mdigest[7..]),
        )
        .unwrap(),
    )
    .unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    // Flip bytes in the middle of the stored layer, keeping its size.
    let file = reg.blob_file(&layer);
    let mut data = std::fs::read(&file).unwrap();
    let mid = data.len() / 2;
    for b in &mut data[mid..mid + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(&file, &data).unwrap();

    let stack = ImagesStack::start("").unwrap();
    let mut c = stack.client();
    let r = format!("{}/tampered:latest", reg.host);
    let err = kit::pull(&mut c, &r, None).await.unwrap_err();
    assert!(err.message().contains("digest mismatch"), "{err:?}");
    assert!(err.message().contains(&layer), "{err:?}");
    // Nothing of it is visible: no image, no blob, no committed snapshot, no active leftovers.
    let e = c
        .get(pb::GetImageRequest {
            reference: r.clone(),
            platform: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c
        .content_info(pb::ContentInfoRequest {
            digest: layer.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(!stack.stored_blobs().contains(&layer));
    use berth_core::snapshots::Snapshotter;
    let snaps = stack.snapshotter().list(&[]).await.unwrap();
    assert!(snaps.is_empty(), "no snapshots expected: {snaps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_traversal_layer_is_rejected_and_nothing_is_committed() {
    if !kit::ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "dotdot",
            kit::raw_tar(&[("ok", b"fine"), ("../../../../tmp/berth-evil", b"x")]),
        ),
        ("absolute", kit::raw_tar(&[("/tmp/berth-evil-abs", b"x")])),
        (
            "symlink",
            kit::raw_tar(&[
                ("up@", b"../../../../../.."),
                ("up/tmp/berth-evil-link", b"x"),
            ]),
        ),
    ];
    let reg = Registry::start(RegistryOptions::default()).unwrap();
    for (name, layer) in &cases {
        let dir = tmp.path().join(name);
        // A good base layer below the hostile one: the base may be committed, the bad one not.
        let base = kit::raw_tar(&[("base", b"base")]);
        kit::write_oci_layout(&dir, &[base, layer.clone()]).unwrap();
        reg.push_oci(&dir, &format!("evil-{name}:latest")).unwrap();
    }
    let stack = ImagesStack::start("").unwrap();
    let mut c = stack.client();
    use berth_core::snapshots::Snapshotter;
    for (name, _) in &cases {
        let r = format!("{}/evil-{name}:latest", reg.host);
        let err = kit::pull(&mut c, &r, None).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{name}: {err:?}");
        assert!(err.message().contains("tar entry"), "{name}: {err:?}");
        let snaps = stack.snapshotter().list(&[]).await.unwrap();
        assert!(
            snaps.len() <= 1,
            "{name}: only the base layer may be committed: {snaps:?}"
        );
        assert!(
            snaps
                .iter()
                .all(|s| s.kind == berth_core::snapshots::Kind::Committed)
        );
        let e = c
            .get(pb::GetImageRequest {
                reference: r,
                platform: None,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
    }
    for f in [
        "/tmp/berth-evil",
        "/tmp/berth-evil-abs",
        "/tmp/berth-evil-link",
    ] {
        assert!(
            !Path::new(f).exists(),
            "{f} was written outside the snapshot"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_picks_the_platform_and_any_layer_compression_unpacks() {
    use kit::LayerCompression::{Gzip, None as Plain, Zstd};
    if !kit::ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("multi");
    let index = kit::write_oci_index(
        &dir,
        &[
            (
                "linux/arm64",
                vec![
                    (kit::raw_tar(&[("arch", b"arm64")]), Zstd),
                    (kit::raw_tar(&[("more", b"m")]), Plain),
                ],
            ),
            (
                "linux/amd64",
                vec![(kit::raw_tar(&[("arch", b"amd64")]), Gzip)],
            ),
        ],
    )
    .unwrap();
    let reg = Registry::start(RegistryOptions::default()).unwrap();
    reg.push_oci(&dir, "multi:latest").unwrap();
    let stack = ImagesStack::start("").unwrap();
    let mut c = stack.client();
    let r = format!("{}/multi:latest", reg.host);
    // skopeo may re-serialise the index on the way: what the registry has is what counts.
    let _ = index;
    let index = reg.manifest_digest("multi:latest").unwrap();

    // The configured platform (linux/amd64) by default.
    let done = kit::pull(&mut c, &r, None).await.unwrap().done.unwrap();
    assert_eq!(done.digest, index, "Digest: is the index's");
    let img = c
        .get(pb::GetImageRequest {
            reference: r.clone(),
            platform: None,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(img.architecture, "amd64");
    assert_eq!(img.index.unwrap().digest, index);
    assert_eq!(
        img.repo_digests,
        vec![format!("{}/multi@{index}", reg.host)]
    );
    let view = MountedView::new(stack.snapshotter(), &img.chain_id)
        .await
        .unwrap();
    assert_eq!(std::fs::read(view.path.join("arch")).unwrap(), b"amd64");
    drop(view);

    // Another platform on request: zstd and uncompressed layers.
    let arm = berth_proto::berth::types::v1::Platform {
        os: "linux".into(),
        architecture: "arm64".into(),
        ..Default::default()
    };
    let mut s = c
        .pull(pb::PullRequest {
            reference: r.clone(),
            platform: Some(arm.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while s.message().await.unwrap().is_some() {}
    let img = c
        .get(pb::GetImageRequest {
            reference: r.clone(),
            platform: Some(arm),
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(img.architecture, "arm64");
    assert_eq!(img.diff_ids.len(), 2);
    let view = MountedView::new(stack.snapshotter(), &img.chain_id)
        .await
        .unwrap();
    assert_eq!(std::fs::read(view.path.join("arch")).unwrap(), b"arm64");
    assert_eq!(std::fs::read(view.path.join("more")).unwrap(), b"m");
    drop(view);

    // A platform the index lacks.
    let s390 = berth_proto::berth::types::v1::Platform {
        os: "linux".into(),
        architecture: "s390x".into(),
        ..Default::default()
    };
    let mut s = c
        .pull(pb::PullRequest {
            reference: r,
            platform: Some(s390),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let err = loop {
        match s.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("pull of a missing platform succeeded"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains("linux/s390x"), "{err:?}");
}
