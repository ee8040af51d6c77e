//! The events hub through the engine's gRPC API: Docker filters, `since`/`until` over the
//! retained history, and live streaming up to `until`.

use std::time::{Duration, SystemTime};

use anyhow::{Result, ensure};
use berth_integration::engine_kit::{EngineStack, busybox, unique};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::events::v1 as evpb;
use berth_proto::berth::types::v1 as types;
use berth_proto::prost_types::Timestamp;
use tokio_stream::StreamExt;

fn filters(pairs: &[(&str, &str)]) -> Vec<types::Filter> {
    pairs
        .iter()
        .map(|(k, v)| types::Filter {
            key: k.to_string(),
            value: v.to_string(),
        })
        .collect()
}

/// Every envelope of a subscription that ends (its `until` is set).
async fn collect(
    es: &EngineStack,
    f: &[(&str, &str)],
    since: Option<Timestamp>,
    until: Option<Timestamp>,
) -> Result<Vec<evpb::Envelope>> {
    let mut s = es
        .events()
        .subscribe(evpb::SubscribeRequest {
            filters: filters(f),
            since,
            until,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(30), s.next()).await? {
        out.push(ev?.envelope.unwrap());
    }
    Ok(out)
}

fn summary(evs: &[evpb::Envelope]) -> Vec<String> {
    evs.iter()
        .map(|e| {
            let a = e.actor.as_ref().unwrap();
            let who = a
                .attributes
                .get("name")
                .cloned()
                .unwrap_or_else(|| a.id.clone());
            match a.attributes.get("exitCode") {
                Some(code) => format!("{}:{}:{who}:{code}", type_of(e), e.action),
                None => format!("{}:{}:{who}", type_of(e), e.action),
            }
        })
        .collect()
}

fn type_of(e: &evpb::Envelope) -> &'static str {
    match e.r#type() {
        evpb::EventType::Container => "container",
        evpb::EventType::Volume => "volume",
        evpb::EventType::Network => "network",
        evpb::EventType::Image => "image",
        evpb::EventType::Task => "task",
        _ => "other",
    }
}

async fn run_labelled(es: &EngineStack, name: &str, team: &str, code: i32) -> Result<String> {
    let mut cfg = busybox(&["sh", "-c", &format!("exit {code}")]);
    cfg.labels = [("team".to_string(), team.to_string())].into();
    let r = es.run(name, cfg, Default::default()).await?;
    ensure!(r.exit_code == i64::from(code), "{r:?}");
    Ok(r.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_and_since_until_return_exactly_the_expected_events() -> Result<()> {
    if !berth_integration::engine_kit::ready() {
        return Ok(());
    }
    let es = EngineStack::start().await?;
    let t0: Timestamp = SystemTime::now().into();
    let (a, b) = (unique("eva"), unique("evb"));
    let a_id = run_labelled(&es, &a, "red", 0).await?;
    let b_id = run_labelled(&es, &b, "blue", 5).await?;
    let vol = unique("evvol");
    es.volumes()
        .create(pb::CreateVolumeRequest {
            name: vol.clone(),
            ..Default::default()
        })
        .await?;
    es.remove(&a_id).await?;
    // Let the hub see everything before the window closes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t1: Timestamp = SystemTime::now().into();
    macro_rules! window {
        ($f:expr) => {
            collect(&es, $f, Some(t0), Some(t1))
        };
    }

    ensure!(
        summary(&window!(&[("container", &a)]).await?)
            == [
                format!("container:create:{a}"),
                format!("container:start:{a}"),
                format!("container:die:{a}:0"),
                format!("container:destroy:{a}"),
            ],
        "container={a}"
    );
    ensure!(
        summary(&window!(&[("container", &b_id[..10])]).await?)
            == [
                format!("container:create:{b}"),
                format!("container:start:{b}"),
                format!("container:die:{b}:5"),
            ],
        "container by id prefix"
    );
    let dies = window!(&[("event", "die"), ("type", "container")]).await?;
    ensure!(
        summary(&dies)
            == [
                format!("container:die:{a}:0"),
                format!("container:die:{b}:5")
            ],
        "{:?}",
        summary(&dies)
    );
    ensure!(
        summary(&window!(&[("label", "team=blue")]).await?)
            == [
                format!("container:create:{b}"),
                format!("container:start:{b}"),
                format!("container:die:{b}:5"),
            ],
        "label"
    );
    ensure!(
        summary(
            &window!(&[
                ("label", "team=blue"),
                ("event", "start"),
                ("event", "create")
            ])
            .await?
        ) == [
            format!("container:create:{b}"),
            format!("container:start:{b}")
        ],
        "label and two events"
    );
    ensure!(
        summary(&window!(&[("type", "volume")]).await?) == [format!("volume:create:{vol}")],
        "type=volume"
    );
    ensure!(
        summary(&window!(&[("volume", &vol)]).await?) == [format!("volume:create:{vol}")],
        "volume=name"
    );
    ensure!(
        window!(&[("image", "alpine")]).await?.is_empty(),
        "image=alpine"
    );
    ensure!(
        window!(&[("image", "busybox"), ("event", "die")])
            .await?
            .len()
            == 2,
        "image=busybox"
    );
    // Internal task events only with type=task.
    let tasks = window!(&[("type", "task"), ("container", &b_id)]).await?;
    ensure!(
        tasks.iter().all(|e| e.r#type() == evpb::EventType::Task),
        "{:?}",
        summary(&tasks)
    );

    // since/until inclusive, at the exact times of events: B's start through B's die.
    let b_events = window!(&[("container", &b)]).await?;
    let (start, die) = (&b_events[1], &b_events[2]);
    let sub = collect(&es, &[("container", &b)], start.timestamp, die.timestamp).await?;
    ensure!(
        summary(&sub)
            == [
                format!("container:start:{b}"),
                format!("container:die:{b}:5")
            ],
        "{:?}",
        summary(&sub)
    );
    let after_die = Timestamp {
        seconds: die.timestamp.unwrap().seconds,
        nanos: die.timestamp.unwrap().nanos + 1,
    };
    ensure!(
        collect(&es, &[("container", &b)], Some(after_die), Some(t1))
            .await?
            .is_empty(),
        "nothing of B after its die"
    );
    // Bad filters are INVALID_ARGUMENT.
    let err = es
        .events()
        .subscribe(evpb::SubscribeRequest {
            filters: filters(&[("colour", "red")]),
            since: None,
            until: None,
        })
        .await
        .unwrap_err();
    ensure!(err.code() == tonic::Code::InvalidArgument, "{err:?}");

    // Live: history first, then new events, until `until`.
    let c = unique("evc");
    let until: Timestamp = (SystemTime::now() + Duration::from_secs(4)).into();
    let live = {
        let es = &es;
        let c = c.clone();
        async move { collect(es, &[("container", &c)], Some(t0), Some(until)).await }
    };
    let work = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        run_labelled(&es, &c, "green", 2).await
    };
    let (live, _) = tokio::join!(live, work);
    ensure!(
        summary(&live?)
            == [
                format!("container:create:{c}"),
                format!("container:start:{c}"),
                format!("container:die:{c}:2"),
            ],
        "live"
    );
    Ok(())
}
