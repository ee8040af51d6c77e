//! berth-images against registries that need credentials or speak https.

use berth_integration::images_kit::{self as kit, Certs, ImagesStack, Registry, RegistryOptions};
use berth_proto::berth::images::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_needs_the_credentials() {
    if !kit::ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions {
        basic_auth: Some(("berth".into(), "s3cret".into())),
        ..Default::default()
    })
    .unwrap();
    reg.push_oci(&kit::oci_dir("busybox"), "private/busybox:latest")
        .unwrap();
    let stack = ImagesStack::start("").unwrap();
    let mut c = stack.client();
    let r = format!("{}/private/busybox:latest", reg.host);

    let err = kit::pull(&mut c, &r, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let err = kit::pull(&mut c, &r, kit::auth("berth", "wrong"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    let p = kit::pull(&mut c, &r, kit::auth("berth", "s3cret"))
        .await
        .unwrap();
    assert_eq!(
        p.done.unwrap().digest,
        reg.manifest_digest("private/busybox:latest").unwrap()
    );
    // Credentials are per call: the next anonymous pull is refused again.
    let err = kit::pull(&mut c, &r, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_ca_directory_unknown_ca_and_insecure() {
    if !kit::ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let certs = Certs::generate(&tmp.path().join("pki")).unwrap();
    // Pushed to a plain registry on 127.0.0.1, served over https from [::1]: [::1] is outside
    // Docker's default insecure range (127.0.0.0/8), so there TLS is verified.
    let plain = Registry::start(RegistryOptions::default()).unwrap();
    plain
        .push_oci(&kit::oci_dir("busybox"), "busybox:latest")
        .unwrap();
    let want = plain.manifest_digest("busybox:latest").unwrap();
    let reg = Registry::start(RegistryOptions {
        tls: Some((certs.server_crt.clone(), certs.server_key.clone())),
        ipv6: true,
        storage: Some(plain.storage.clone()),
        ..Default::default()
    })
    .unwrap();
    let r = format!("{}/busybox:latest", reg.host);

    // The test CA in the configured CA directory: verified https works.
    let certs_dir = tmp.path().join("certs.d");
    std::fs::create_dir_all(certs_dir.join(&reg.host)).unwrap();
    std::fs::copy(&certs.ca_crt, certs_dir.join(&reg.host).join("ca.crt")).unwrap();
    let stack = ImagesStack::start(&format!(
        "[images]\ncerts_dir = \"{}\"\n",
        certs_dir.display()
    ))
    .unwrap();
    let p = kit::pull(&mut stack.client(), &r, None).await.unwrap();
    assert_eq!(p.done.unwrap().digest, want);
    drop(stack);

    // No CA for it: a TLS error.
    let empty = tmp.path().join("empty.d");
    std::fs::create_dir_all(&empty).unwrap();
    let stack =
        ImagesStack::start(&format!("[images]\ncerts_dir = \"{}\"\n", empty.display())).unwrap();
    let err = kit::pull(&mut stack.client(), &r, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().starts_with("tls:"), "{err:?}");
    assert!(err.message().contains("certificate"), "{err:?}");
    drop(stack);

    // The same registry configured insecure: works without the CA.
    let stack = ImagesStack::start(&format!(
        "[images]\ncerts_dir = \"{}\"\ninsecure_registries = [\"{}\"]\n",
        empty.display(),
        reg.host
    ))
    .unwrap();
    let p = kit::pull(&mut stack.client(), &r, None).await.unwrap();
    assert_eq!(p.done.unwrap().digest, want);
    let img = stack
        .client()
        .get(pb::GetImageRequest {
            reference: r,
            platform: None,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(img.unpacked_in, vec!["overlayfs".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_hub_pulls_go_through_the_configured_mirror() {
    if !kit::ready() {
        return;
    }
    let mirror = Registry::start(RegistryOptions::default()).unwrap();
    mirror
        .push_oci(&kit::oci_dir("busybox"), "library/busybox:latest")
        .unwrap();
    let stack = ImagesStack::start(&format!(
        "[images]\nregistry_mirrors = [\"http://{}\"]\n",
        mirror.host
    ))
    .unwrap();
    let mut c = stack.client();
    let p = kit::pull(&mut c, "busybox", None).await.unwrap();
    let done = p.done.unwrap();
    assert_eq!(done.reference, "docker.io/library/busybox:latest");
    assert_eq!(
        done.digest,
        mirror.manifest_digest("library/busybox:latest").unwrap()
    );
    let img = c
        .get(pb::GetImageRequest {
            reference: "busybox".into(),
            platform: None,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(
        img.repo_digests,
        vec![format!("docker.io/library/busybox@{}", done.digest)]
    );
    assert!(
        mirror.blob_gets(&img.id) > 0,
        "the config came from the mirror"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_without_the_image_falls_through_to_the_next() {
    if !kit::ready() {
        return;
    }
    // The first mirror answers `/v2/` but has nothing: Docker moves on to the next endpoint
    // rather than failing the pull.
    let empty = Registry::start(RegistryOptions::default()).unwrap();
    let mirror = Registry::start(RegistryOptions::default()).unwrap();
    mirror
        .push_oci(&kit::oci_dir("busybox"), "library/busybox:latest")
        .unwrap();
    let stack = ImagesStack::start(&format!(
        "[images]\nregistry_mirrors = [\"http://{}\", \"http://{}\"]\n",
        empty.host, mirror.host
    ))
    .unwrap();
    let mut c = stack.client();
    let want = mirror.manifest_digest("library/busybox:latest").unwrap();
    let d = c
        .inspect_distribution(pb::InspectDistributionRequest {
            reference: "busybox".into(),
            auth: None,
        })
        .await
        .unwrap()
        .into_inner();
    let desc = d.descriptor.unwrap();
    assert_eq!(desc.digest, want);
    assert_eq!(
        desc.media_type,
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(d.platforms.len(), 1);
    assert_eq!(d.platforms[0].os, "linux");
    let p = kit::pull(&mut c, "busybox", None).await.unwrap();
    assert_eq!(p.done.unwrap().digest, want);
    assert!(
        empty
            .log_text()
            .contains("/v2/library/busybox/manifests/latest"),
        "the first mirror was asked first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_from_the_realm_the_registry_names() {
    if !kit::ready() {
        return;
    }
    let tokens = kit::TokenServer::start("berth", "tok3n").unwrap();
    let reg = Registry::start(RegistryOptions {
        basic_auth: Some(("berth".into(), "tok3n".into())),
        token: Some((tokens.realm.clone(), tokens.cert.clone())),
        ..Default::default()
    })
    .unwrap();
    reg.push_oci(&kit::oci_dir("busybox"), "team/busybox:latest")
        .unwrap();
    let stack = ImagesStack::start("").unwrap();
    let mut c = stack.client();
    let r = format!("{}/team/busybox:latest", reg.host);
    let err = kit::pull(&mut c, &r, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let err = kit::pull(&mut c, &r, kit::auth("berth", "nope"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let done = kit::pull(&mut c, &r, kit::auth("berth", "tok3n"))
        .await
        .unwrap()
        .done
        .unwrap();
    assert_eq!(
        done.digest,
        reg.manifest_digest("team/busybox:latest").unwrap()
    );

    // Push with a token too, mounting from the repository it came from.
    let dst = format!("{}/team/copy:v1", reg.host);
    c.tag(pb::TagImageRequest {
        source: r,
        target: dst.clone(),
    })
    .await
    .unwrap();
    let mut s = c
        .push(pb::PushRequest {
            reference: dst,
            auth: kit::auth("berth", "tok3n"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut tag_done = None;
    while let Some(m) = s.message().await.unwrap() {
        if let Some(pb::push_response::Event::TagDone(t)) = m.event {
            tag_done = Some(t);
        }
    }
    assert_eq!(tag_done.unwrap().digest, done.digest);
}
