//! Export, import and push: archives both ways (with containerd as the independent reader),
//! and a push to a second registry that pulls back to the same manifest digest.

use berth_integration::images_kit::{
    self as kit, Containerd, ImagesStack, MountedView, Registry, RegistryOptions,
};
use berth_proto::berth::images::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_archive_export_imports_into_containerd() {
    if !kit::ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default()).unwrap();
    reg.push_oci(&kit::oci_dir("busybox"), "library/busybox:latest")
        .unwrap();
    let stack = ImagesStack::start("").unwrap();
    let mut c = stack.client();
    let r = format!("{}/library/busybox:latest", reg.host);
    let digest = kit::pull(&mut c, &r, None)
        .await
        .unwrap()
        .done
        .unwrap()
        .digest;
    c.tag(pb::TagImageRequest {
        source: r.clone(),
        target: "busybox:latest".into(),
    })
    .await
    .unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let tar = tmp.path().join("busybox.tar");
    kit::export(
        &mut c,
        &["busybox:latest"],
        pb::ArchiveFormat::DockerArchive,
        &tar,
    )
    .await
    .unwrap();
    // docker-archive members are there.
    let names = kit::run(std::process::Command::new("tar").arg("-tf").arg(&tar)).unwrap();
    for want in ["manifest.json", "index.json", "oci-layout", "repositories"] {
        assert!(
            names.lines().any(|l| l == want),
            "{want} missing from {names}"
        );
    }

    let ctrd = Containerd::start().unwrap();
    let out = ctrd.ctr(&["images", "import", tar.to_str().unwrap()]);
    let out = out.unwrap_or_else(|e| panic!("ctr import: {e:#}\n{}", ctrd.log_text()));
    assert!(out.contains("docker.io/library/busybox:latest"), "{out}");
    let ls = ctrd.ctr(&["images", "ls"]).unwrap();
    assert!(ls.contains("docker.io/library/busybox:latest"), "{ls}");
    assert!(
        ls.contains(&digest),
        "containerd sees the same manifest digest: {ls}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_image_archives_import_into_berth() {
    if !kit::ready() {
        return;
    }
    let stack = ImagesStack::start("").unwrap();
    let mut c = stack.client();
    for name in ["busybox", "layered"] {
        let res = kit::import(&mut c, &kit::docker_archive(name))
            .await
            .unwrap();
        assert_eq!(res.images.len(), 1);
        assert_eq!(
            res.images[0].references,
            vec![format!("docker.io/library/{name}:latest")]
        );
    }
    let res = c
        .resolve(pb::ResolveImageRequest {
            reference: "layered".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    {
        let view = MountedView::new(stack.snapshotter(), &res.chain_id)
            .await
            .unwrap();
        assert_eq!(std::fs::read(view.path.join("data/dir/y")).unwrap(), b"y\n");
        assert!(!view.path.join("data/a").exists());
        assert!(!view.path.join("data/dir/x").exists());
    }
    let img = c
        .get(pb::GetImageRequest {
            reference: "layered".into(),
            platform: None,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(img.id, res.image_id);
    assert_eq!(img.history.len(), 3);
    assert!(img.size > 0);

    // OCI layout round trip: export, delete, import: same image id and manifest.
    let tmp = tempfile::tempdir().unwrap();
    let tar = tmp.path().join("layered-oci.tar");
    kit::export(&mut c, &["layered"], pb::ArchiveFormat::OciLayout, &tar)
        .await
        .unwrap();
    let del = c
        .delete(pb::DeleteImageRequest {
            reference: "layered".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        del.items.iter().any(
            |i| matches!(&i.item, Some(pb::image_delete_item::Item::Deleted(d)) if *d == img.id)
        )
    );
    let e = c
        .get(pb::GetImageRequest {
            reference: "layered".into(),
            platform: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let res = kit::import(&mut c, &tar).await.unwrap();
    assert_eq!(res.images[0].image_id, img.id);
    assert_eq!(
        res.images[0].references,
        vec!["docker.io/library/layered:latest".to_string()]
    );
    let back = c
        .get(pb::GetImageRequest {
            reference: "layered".into(),
            platform: None,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(back.target.unwrap().digest, img.target.unwrap().digest);

    // Not an archive: a clear error, nothing recorded.
    let junk = tmp.path().join("junk.tar");
    std::fs::write(&junk, vec![7u8; 10_000]).unwrap();
    let e = kit::import(&mut c, &junk).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // Garbage: a blob nobody references goes, referenced ones stay.
    let gc = c
        .garbage_collect(pb::GarbageCollectRequest { dry_run: false })
        .await
        .unwrap()
        .into_inner();
    assert!(
        gc.removed_blobs.is_empty(),
        "nothing unreferenced yet: {gc:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_to_a_second_registry_keeps_the_manifest_digest() {
    if !kit::ready() {
        return;
    }
    let a = Registry::start(RegistryOptions::default()).unwrap();
    let b = Registry::start(RegistryOptions::default()).unwrap();
    a.push_oci(&kit::oci_dir("layered"), "layered:latest")
        .unwrap();
    let stack = ImagesStack::start("").unwrap();
    let mut c = stack.client();
    let src = format!("{}/layered:latest", a.host);
    let original = kit::pull(&mut c, &src, None).await.unwrap().done.unwrap();

    let dst = format!("{}/copy/layered:v1", b.host);
    c.tag(pb::TagImageRequest {
        source: src.clone(),
        target: dst.clone(),
    })
    .await
    .unwrap();
    let mut s = c
        .push(pb::PushRequest {
            reference: dst.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut pushed = None;
    let mut layers_pushed = 0;
    while let Some(m) = s.message().await.unwrap() {
        match m.event {
            Some(pb::push_response::Event::TagDone(t)) => pushed = Some(t),
            Some(pb::push_response::Event::Layer(l))
                if l.phase == pb::PushLayerPhase::Pushed as i32 =>
            {
                layers_pushed += 1
            }
            _ => {}
        }
    }
    let pushed = pushed.expect("PushTagDone");
    assert_eq!(pushed.tag, "v1");
    assert_eq!(pushed.digest, original.digest);
    assert_eq!(layers_pushed, 3);
    assert_eq!(
        b.manifest_digest("copy/layered:v1").unwrap(),
        original.digest
    );

    // Pull it back from the second registry into a fresh stack: same manifest digest, same id.
    let fresh = ImagesStack::start("").unwrap();
    let back = kit::pull(&mut fresh.client(), &dst, None)
        .await
        .unwrap()
        .done
        .unwrap();
    assert_eq!(back.digest, original.digest);
    assert_eq!(back.image_id, original.image_id);

    // A push to another repository of the first registry mounts the blobs instead of uploading.
    let other = format!("{}/other:v2", a.host);
    c.tag(pb::TagImageRequest {
        source: src,
        target: other.clone(),
    })
    .await
    .unwrap();
    let mut s = c
        .push(pb::PushRequest {
            reference: other,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut mounted = 0;
    while let Some(m) = s.message().await.unwrap() {
        if let Some(pb::push_response::Event::Layer(l)) = m.event {
            assert_ne!(
                l.phase,
                pb::PushLayerPhase::Pushed as i32,
                "layer uploaded instead of mounted"
            );
            if l.phase == pb::PushLayerPhase::Mounted as i32 {
                assert_eq!(l.mounted_from, "layered");
                mounted += 1;
            }
        }
    }
    assert_eq!(mounted, 3);
}
