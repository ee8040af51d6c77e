//! Tearing containers down through the engine with the real shim, runc, snapshotter and network:
//! auto-remove after an exit and after a start that runc refuses, force removal, many at once.
//! Whatever the order the steps run in, once the engine answers the container is gone from the
//! API, its name is free, and nothing it used is left on the host; `die` comes before `destroy`.

use std::time::{Duration, SystemTime};

use anyhow::{Result, ensure};
use berth_integration::engine_kit::{EngineStack, busybox, unique};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::events::v1 as evpb;
use berth_proto::berth::types::v1 as types;
use berth_proto::prost_types::Timestamp;
use tokio_stream::StreamExt;

fn auto_remove() -> pb::HostConfig {
    pb::HostConfig {
        auto_remove: true,
        ..Default::default()
    }
}

/// The container's actions in the events history between `since` and now.
async fn actions(es: &EngineStack, id: &str, since: SystemTime) -> Result<Vec<String>> {
    let mut s = es
        .events()
        .subscribe(evpb::SubscribeRequest {
            filters: vec![types::Filter {
                key: "container".into(),
                value: id.into(),
            }],
            since: Some(Timestamp::from(since)),
            until: Some(Timestamp::from(SystemTime::now())),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(30), s.next()).await? {
        out.push(ev?.envelope.unwrap_or_default().action);
    }
    Ok(out)
}

/// The container is unknown to the API and its name can be taken again.
async fn gone(es: &EngineStack, name: &str) -> Result<()> {
    let err = es.inspect(name).await.unwrap_err();
    let status = err.downcast_ref::<tonic::Status>();
    ensure!(
        status.is_some_and(|s| s.code() == tonic::Code::NotFound),
        "{err:?}"
    );
    let again = es
        .create(name, busybox(&["true"]), Default::default())
        .await?;
    es.remove(&again.id).await?;
    Ok(())
}

/// `docker run --rm` of a command that exists and of one that does not (runc refuses it):
/// when the wait for removal answers, nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_remove_leaves_nothing_behind_even_when_runc_fails() -> Result<()> {
    if !berth_integration::engine_kit::ready() {
        return Ok(());
    }
    let es = EngineStack::start().await?;
    let t0 = SystemTime::now();

    let name = unique("rm-ok");
    let c = es.create(&name, busybox(&["true"]), auto_remove()).await?;
    let wait = es
        .wait_registered(&c.id, pb::WaitCondition::Removed)
        .await?;
    es.start_task(&c.id).await?;
    let exit = EngineStack::wait_exit(wait, Duration::from_secs(60)).await?;
    ensure!(exit.status_code == 0, "{exit:?}");
    let left = es.leftovers(std::slice::from_ref(&c.id)).await?;
    ensure!(left.is_empty(), "left behind: {left:#?}");
    gone(&es, &name).await?;
    let seen = actions(&es, &c.id, t0).await?;
    ensure!(seen == ["create", "start", "die", "destroy"], "{seen:?}");

    let name = unique("rm-bad");
    let c = es
        .create(&name, busybox(&["nosuchbinary"]), auto_remove())
        .await?;
    let wait = es
        .wait_registered(&c.id, pb::WaitCondition::Removed)
        .await?;
    let err = es.start_task(&c.id).await.unwrap_err();
    let status = err.downcast_ref::<tonic::Status>().unwrap();
    ensure!(
        status.code() == tonic::Code::InvalidArgument
            && status.message().contains("executable file not found"),
        "{status:?}"
    );
    let exit = EngineStack::wait_exit(wait, Duration::from_secs(60)).await?;
    ensure!(exit.status_code == 127, "{exit:?}");
    let left = es.leftovers(std::slice::from_ref(&c.id)).await?;
    ensure!(left.is_empty(), "left behind: {left:#?}");
    gone(&es, &name).await?;
    Ok(())
}

/// Twenty containers at once: half run to their end with auto-remove, half run until they are
/// force-removed. Afterwards none of them is known, and nothing of any of them is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_runs_and_removals_leave_nothing_behind() -> Result<()> {
    if !berth_integration::engine_kit::ready() {
        return Ok(());
    }
    let es = EngineStack::start().await?;
    let es = &es;
    let runs = (0..20).map(|i| async move {
        let name = unique("many");
        if i % 2 == 0 {
            let c = es.create(&name, busybox(&["true"]), auto_remove()).await?;
            let wait = es
                .wait_registered(&c.id, pb::WaitCondition::Removed)
                .await?;
            es.start_task(&c.id).await?;
            let exit = EngineStack::wait_exit(wait, Duration::from_secs(120)).await?;
            ensure!(exit.status_code == 0, "{exit:?}");
            Ok::<_, anyhow::Error>((name, c.id))
        } else {
            let c = es
                .create(&name, busybox(&["sleep", "300"]), Default::default())
                .await?;
            es.start_task(&c.id).await?;
            es.remove(&c.id).await?;
            Ok((name, c.id))
        }
    });
    let done = futures::future::join_all(runs).await;
    let mut ids = Vec::new();
    for r in done {
        let (name, id) = r?;
        let err = es.inspect(&name).await.unwrap_err();
        ensure!(
            err.downcast_ref::<tonic::Status>()
                .is_some_and(|s| s.code() == tonic::Code::NotFound),
            "{name}: {err:?}"
        );
        ids.push(id);
    }
    let left = es.leftovers(&ids).await?;
    ensure!(left.is_empty(), "left behind: {left:#?}");
    let list = es
        .containers()
        .list(pb::ListContainersRequest {
            all: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(list.containers.is_empty(), "{:?}", list.containers);
    Ok(())
}
