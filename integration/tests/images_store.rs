//! Image records: tags, users, deletion with Docker's rules, garbage collection of blobs and
//! snapshots.

use berth_core::snapshots::Snapshotter;
use berth_integration::images_kit::{self as kit, ImagesStack};
use berth_proto::berth::images::v1 as pb;

fn user(image: &str, id: &str) -> Option<pb::ImageUser> {
    Some(pb::ImageUser {
        image_id: image.into(),
        kind: "container".into(),
        id: id.into(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_users_delete_and_gc() {
    if !kit::ready() {
        return;
    }
    let stack = ImagesStack::start("").unwrap();
    let mut c = stack.client();
    kit::import(&mut c, &kit::docker_archive("busybox"))
        .await
        .unwrap();
    let layered = kit::import(&mut c, &kit::docker_archive("layered"))
        .await
        .unwrap()
        .images
        .remove(0);
    let id = layered.image_id.clone();
    let sn = stack.snapshotter();
    assert_eq!(sn.list(&[]).await.unwrap().len(), 3, "busybox layer shared");

    // Lookup by id, short id prefix and name.
    for input in [
        id.clone(),
        id[7..19].to_string(),
        "layered".into(),
        "docker.io/library/layered:latest".into(),
    ] {
        let img = c
            .get(pb::GetImageRequest {
                reference: input.clone(),
                platform: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(img.image.unwrap().id, id, "{input}");
    }
    let e = c
        .get(pb::GetImageRequest {
            reference: "nope".into(),
            platform: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert_eq!(e.message(), "No such image: nope");
    let e = c
        .get(pb::GetImageRequest {
            reference: "Bad Ref".into(),
            platform: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    c.tag(pb::TagImageRequest {
        source: "layered".into(),
        target: "example.com/l:v2".into(),
    })
    .await
    .unwrap();
    let img = c
        .get(pb::GetImageRequest {
            reference: id.clone(),
            platform: None,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(
        img.repo_tags,
        vec!["docker.io/library/layered:latest", "example.com/l:v2"]
    );

    // A user blocks deletion by id (and of the last tag) unless forced.
    c.add_user(pb::AddImageUserRequest {
        owner: "engine".into(),
        user: user(&id, "c1"),
    })
    .await
    .unwrap();
    c.add_user(pb::AddImageUserRequest {
        owner: "engine".into(),
        user: user(&id, "c1"),
    })
    .await
    .unwrap();
    let img = c
        .get(pb::GetImageRequest {
            reference: id.clone(),
            platform: None,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(img.users, 1);
    let e = c
        .delete(pb::DeleteImageRequest {
            reference: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    // Untagging one of two tags is fine.
    let d = c
        .delete(pb::DeleteImageRequest {
            reference: "example.com/l:v2".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.items.len(), 1);
    let e = c
        .delete(pb::DeleteImageRequest {
            reference: "layered".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    // Forced: untagged, kept for its user, gone with it.
    c.delete(pb::DeleteImageRequest {
        reference: "layered".into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let img = c
        .get(pb::GetImageRequest {
            reference: id.clone(),
            platform: None,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert!(img.repo_tags.is_empty());
    let dangling = c
        .list(pb::ListImagesRequest {
            filters: vec![berth_proto::berth::types::v1::Filter {
                key: "dangling".into(),
                value: "true".into(),
            }],
            all: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dangling.images.len(), 1);
    c.remove_user(pb::RemoveImageUserRequest {
        owner: "engine".into(),
        user: user(&id, "c1"),
    })
    .await
    .unwrap();
    let e = c
        .get(pb::GetImageRequest {
            reference: id.clone(),
            platform: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    // Its own two layers are collected; busybox's stays.
    let snaps = sn.list(&[]).await.unwrap();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    let busybox = c
        .get(pb::GetImageRequest {
            reference: "busybox".into(),
            platform: None,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(snaps[0].name, busybox.chain_id);

    // SetUsers reconciles an owner's users.
    c.set_users(pb::SetImageUsersRequest {
        owner: "engine".into(),
        users: vec![pb::ImageUser {
            image_id: busybox.id.clone(),
            kind: "container".into(),
            id: "c9".into(),
        }],
    })
    .await
    .unwrap();
    let e = c
        .delete(pb::DeleteImageRequest {
            reference: busybox.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    c.set_users(pb::SetImageUsersRequest {
        owner: "engine".into(),
        users: vec![],
    })
    .await
    .unwrap();
    let d = c
        .delete(pb::DeleteImageRequest {
            reference: "busybox".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.items.iter().any(
        |i| matches!(&i.item, Some(pb::image_delete_item::Item::Deleted(x)) if *x == busybox.id)
    ));
    assert!(sn.list(&[]).await.unwrap().is_empty());
    assert!(
        stack.stored_blobs().is_empty(),
        "{:?}",
        stack.stored_blobs()
    );
    let du = c
        .disk_usage(pb::DiskUsageRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(du.content_size, 0);
}
