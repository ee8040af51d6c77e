//! `docker cp` (ArchiveStat/Get/Put), `docker export` and `docker diff` through the engine, on
//! a running and on a stopped container.

use std::io::Read;
use std::time::Duration;

use anyhow::{Result, ensure};
use berth_integration::engine_kit::{EngineStack, busybox, unique};
use berth_proto::berth::engine::v1 as pb;
use tokio_stream::StreamExt;

fn entries(tar_bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut a = tar::Archive::new(tar_bytes);
    for e in a.entries()? {
        let mut e = e?;
        let name = e.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data)?;
        out.push((name, data));
    }
    Ok(out)
}

async fn get(es: &EngineStack, id: &str, path: &str) -> Result<(pb::ArchiveStatResponse, Vec<u8>)> {
    use pb::archive_get_response::Part;
    let mut s = es
        .containers()
        .archive_get(pb::ArchiveGetRequest {
            id: id.into(),
            path: path.into(),
        })
        .await?
        .into_inner();
    let mut stat = None;
    let mut data = Vec::new();
    while let Some(m) = s.next().await {
        match m?.part {
            Some(Part::Stat(st)) => stat = Some(st),
            Some(Part::Data(d)) => data.extend_from_slice(&d),
            None => {}
        }
    }
    Ok((stat.unwrap(), data))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_export_and_diff() -> Result<()> {
    if !berth_integration::engine_kit::ready() {
        return Ok(());
    }
    let es = EngineStack::start().await?;
    let c = es
        .create(
            &unique("cp"),
            busybox(&["sh", "-c", "echo hi > /tmp/made; mkdir -p /tmp/d; echo x > /tmp/d/f; ln -s /tmp/d /tmp/ld; touch /ready; exec sleep 300"]),
            Default::default(),
        )
        .await?;
    es.start_task(&c.id).await?;
    let mut ready = false;
    for _ in 0..100 {
        if es
            .containers()
            .archive_stat(pb::ArchiveStatRequest {
                id: c.id.clone(),
                path: "/ready".into(),
            })
            .await
            .is_ok()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(ready, "container never became ready");

    let st = es
        .containers()
        .archive_stat(pb::ArchiveStatRequest {
            id: c.id.clone(),
            path: "/tmp/made".into(),
        })
        .await?
        .into_inner();
    ensure!(
        st.name == "made" && st.size == 3 && st.mode & 0o170000 == 0o100000,
        "{st:?}"
    );
    let st = es
        .containers()
        .archive_stat(pb::ArchiveStatRequest {
            id: c.id.clone(),
            path: "/tmp/ld".into(),
        })
        .await?
        .into_inner();
    ensure!(st.link_target == "/tmp/d", "{st:?}");
    let err = es
        .containers()
        .archive_stat(pb::ArchiveStatRequest {
            id: c.id.clone(),
            path: "/nope".into(),
        })
        .await
        .unwrap_err();
    ensure!(err.code() == tonic::Code::NotFound, "{err:?}");

    // Out: a directory comes as a tar rooted at its base name; through a symlinked parent too.
    let (stat, data) = get(&es, &c.id, "/tmp/ld/../d").await?;
    ensure!(stat.name == "d", "{stat:?}");
    let names: Vec<String> = entries(&data)?.into_iter().map(|(n, _)| n).collect();
    ensure!(names == ["d/", "d/f"], "{names:?}");

    // In: a tar extracted into /tmp, read back by the container.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(9);
    h.set_mode(0o600);
    b.append_data(&mut h, "sub/put.txt", &b"from cp\n\n"[..])?;
    let tar_bytes = b.into_inner()?;
    let msgs = vec![
        pb::ArchivePutRequest {
            part: Some(pb::archive_put_request::Part::Options(
                pb::ArchivePutOptions {
                    id: c.id.clone(),
                    path: "/tmp".into(),
                    ..Default::default()
                },
            )),
        },
        pb::ArchivePutRequest {
            part: Some(pb::archive_put_request::Part::Data(tar_bytes)),
        },
    ];
    es.containers()
        .archive_put(tokio_stream::iter(msgs))
        .await?;
    let (_, data) = get(&es, &c.id, "/tmp/sub/put.txt").await?;
    ensure!(entries(&data)?[0].1 == b"from cp\n\n", "round trip");

    // diff: what the container made.
    let changes = es
        .containers()
        .changes(pb::ChangesRequest { id: c.id.clone() })
        .await?
        .into_inner()
        .changes;
    let has =
        |p: &str, k: pb::ChangeKind| changes.iter().any(|c| c.path == p && c.kind == k as i32);
    ensure!(has("/tmp/made", pb::ChangeKind::Added), "{changes:?}");
    ensure!(has("/tmp", pb::ChangeKind::Modified), "{changes:?}");
    ensure!(
        !changes.iter().any(|c| c.path == "/etc/hosts"),
        "{changes:?}"
    );

    // A stopped container: its snapshot is mounted for the call.
    es.tasks()
        .kill(pb::KillTaskRequest {
            id: c.id.clone(),
            signal: String::new(),
        })
        .await?;
    for _ in 0..100 {
        if es.inspect(&c.id).await?.state.unwrap().status() == pb::ContainerStatus::Exited {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, data) = get(&es, &c.id, "/tmp/made").await?;
    ensure!(entries(&data)?[0].1 == b"hi\n");
    let mut s = es
        .containers()
        .export(pb::ExportContainerRequest { id: c.id.clone() })
        .await?
        .into_inner();
    let mut all = Vec::new();
    while let Some(m) = s.next().await {
        all.extend_from_slice(&m?.data);
    }
    let names: Vec<String> = entries(&all)?.into_iter().map(|(n, _)| n).collect();
    ensure!(
        names.iter().any(|n| n == "bin/busybox"),
        "export lacks bin/busybox"
    );
    ensure!(
        names.iter().any(|n| n == "tmp/made"),
        "export lacks tmp/made"
    );
    Ok(())
}
