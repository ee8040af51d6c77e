//! `kill -9` of berth-images in the middle of a pull: the next pull completes without fetching
//! again the blobs already stored.

use berth_integration::images_kit::{self as kit, ImagesStack, Registry, RegistryOptions};
use berth_proto::berth::images::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pull_resumes_from_stored_blobs() {
    if !kit::ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default()).unwrap();
    reg.push_oci(&kit::oci_dir("synthetic"), "synthetic:latest")
        .unwrap();
    let mut stack = ImagesStack::start("[images]\nmax_concurrent_downloads = 1\n").unwrap();
    let r = format!("{}/synthetic:latest", reg.host);

    let mut c = stack.client();
    let mut stream = c
        .pull(pb::PullRequest {
            reference: r.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut complete = 0;
    while let Some(msg) = stream.message().await.unwrap() {
        if let Some(pb::pull_response::Event::Layer(l)) = &msg.event {
            if l.phase == pb::PullLayerPhase::DownloadComplete as i32 {
                complete += 1;
                if complete == 2 {
                    break;
                }
            }
            assert_ne!(l.phase, pb::PullLayerPhase::PullComplete as i32 + 100);
        }
        assert!(
            !matches!(msg.event, Some(pb::pull_response::Event::Done(_))),
            "the pull finished before the kill"
        );
    }
    stack.kill9_images();
    drop(stream);
    let stored = stack.stored_blobs();
    let before: Vec<(String, usize)> = stored
        .iter()
        .map(|d| (d.clone(), reg.blob_gets(d)))
        .collect();
    let layers_stored = before.iter().filter(|(_, n)| *n > 0).count();
    assert!(
        layers_stored >= 2,
        "at least two layer blobs were stored before the kill: {before:?}"
    );

    stack.start_images().unwrap();
    let mut c = stack.client();
    let p = kit::pull(&mut c, &r, None).await.unwrap();
    assert!(p.done.is_some());
    for (d, n) in &before {
        assert_eq!(
            reg.blob_gets(d),
            *n,
            "blob {d} was downloaded again after the restart"
        );
    }
    let res = c
        .resolve(pb::ResolveImageRequest {
            reference: r,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!res.chain_id.is_empty());
    // Leftovers of the killed unpack are gone: only committed snapshots remain.
    use berth_core::snapshots::{Kind, Snapshotter};
    let snaps = stack.snapshotter().list(&[]).await.unwrap();
    assert_eq!(
        snaps.iter().filter(|s| s.kind == Kind::Committed).count(),
        5,
        "{snaps:?}"
    );
    assert!(snaps.iter().all(|s| s.kind == Kind::Committed), "{snaps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_one_image_share_the_work() {
    if !kit::ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default()).unwrap();
    reg.push_oci(&kit::oci_dir("layered"), "layered:latest")
        .unwrap();
    let stack = ImagesStack::start("").unwrap();
    let r = format!("{}/layered:latest", reg.host);
    let pulls: Vec<_> = (0..4)
        .map(|_| {
            let mut c = stack.client();
            let r = r.clone();
            tokio::spawn(async move { kit::pull(&mut c, &r, None).await })
        })
        .collect();
    let mut digests = Vec::new();
    for p in pulls {
        digests.push(p.await.unwrap().unwrap().done.unwrap().digest);
    }
    digests.dedup();
    assert_eq!(digests.len(), 1);
    // Every layer blob was fetched once (small configs may be fetched by each pull).
    let stored = stack.stored_blobs();
    let blob_size = |d: &str| {
        std::fs::metadata(stack.root.join("content/blobs/sha256").join(&d[7..]))
            .unwrap()
            .len()
    };
    for d in stored.iter().filter(|d| blob_size(d) > 4096) {
        assert!(
            reg.blob_gets(d) <= 1,
            "{d} fetched {} times",
            reg.blob_gets(d)
        );
    }
    use berth_core::snapshots::{Kind, Snapshotter};
    let snaps = stack.snapshotter().list(&[]).await.unwrap();
    assert_eq!(snaps.len(), 3, "{snaps:?}");
    assert!(snaps.iter().all(|s| s.kind == Kind::Committed));
}
