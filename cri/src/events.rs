//! `GetContainerEvents`: the CRI's container and sandbox lifecycle events (kubelet's evented
//! PLEG), fed from berth-engine's events hub.
//!
//! Each call subscribes to the hub on its own (live events only) and turns a pod container's
//! `create`, `start`, `die` and `destroy`, and a sandbox's `create`, `start`, `stop` and
//! `destroy`, into `CONTAINER_{CREATED,STARTED,STOPPED,DELETED}_EVENT`, each with the pod's
//! status and the statuses of all its containers as they are when the event is sent (as
//! containerd sends them; a removed pod has none). A subscriber is its own task with its own hub
//! subscription and a bounded queue: one that reads slowly falls behind alone (the hub keeps a
//! history it catches up from), and one that goes away ends its task and its subscription.

use std::sync::Arc;

use berth_core::uds::{Channel, channel};
use berth_core::{Error, Result};
use berth_proto::berth::events::v1 as ev;
use berth_proto::berth::events::v1::events_client::EventsClient;
use berth_proto::berth::types::v1 as types;
use berth_proto::cri::runtime::v1 as cri;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tonic::Status;

use crate::backend::Fut;
use crate::containers::Containers;
use crate::convert::nanos;
use crate::pods::Pods;

/// Events queued for one subscriber before its task waits for it.
const QUEUE: usize = 64;

/// The engine attribute naming a container's pod sandbox.
const SANDBOX_ATTRIBUTE: &str = "sandboxID";

/// A stream of the hub's envelopes.
pub type Envelopes = BoxStream<'static, Result<ev::Envelope>>;

/// Where the lifecycle events come from.
pub trait EventSource: Send + Sync + 'static {
    /// Live container and sandbox lifecycle events, until the stream is dropped.
    fn subscribe(&self) -> Fut<'_, Envelopes>;
}

/// [`EventSource`] over berth-engine's events hub.
#[derive(Debug, Clone)]
pub struct GrpcEventSource {
    client: EventsClient<Channel>,
}

impl GrpcEventSource {
    /// A source over the engine listening on `engine`.
    pub fn new(engine: &std::path::Path) -> Self {
        Self {
            client: EventsClient::new(channel(engine)),
        }
    }
}

impl EventSource for GrpcEventSource {
    fn subscribe(&self) -> Fut<'_, Envelopes> {
        Box::pin(async move {
            let filter = |key: &str, value: &str| types::Filter {
                key: key.into(),
                value: value.into(),
            };
            // Values of one key are alternatives; keys must all match.
            let mut filters = vec![filter("type", "container"), filter("type", "sandbox")];
            filters.extend(
                ["create", "start", "die", "stop", "destroy"]
                    .into_iter()
                    .map(|a| filter("event", a)),
            );
            let stream = self
                .client
                .clone()
                .subscribe(ev::SubscribeRequest {
                    filters,
                    since: None,
                    until: None,
                })
                .await?
                .into_inner();
            let envelopes = stream
                .map_err(Error::from)
                .try_filter_map(|m| async move { Ok(m.envelope) });
            Ok(envelopes.boxed())
        })
    }
}

/// What an envelope means to the CRI: the container (or sandbox) id, the event, and the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Lifecycle {
    id: String,
    kind: cri::ContainerEventType,
    sandbox: String,
    at: i64,
}

/// The CRI event of `env`; `None` for containers that are not a pod's and actions the CRI has
/// no event for.
fn lifecycle(env: &ev::Envelope) -> Option<Lifecycle> {
    use cri::ContainerEventType as E;
    let actor = env.actor.as_ref()?;
    let (kind, sandbox) = match (env.r#type(), env.action.as_str()) {
        (ev::EventType::Container, action) => {
            let sandbox = actor.attributes.get(SANDBOX_ATTRIBUTE)?.clone();
            let kind = match action {
                "create" => E::ContainerCreatedEvent,
                "start" => E::ContainerStartedEvent,
                // `die` is the exit, whatever caused it (`stop` and `kill` come with one).
                "die" => E::ContainerStoppedEvent,
                "destroy" => E::ContainerDeletedEvent,
                _ => return None,
            };
            (kind, sandbox)
        }
        (ev::EventType::Sandbox, action) => {
            let kind = match action {
                "create" => E::ContainerCreatedEvent,
                "start" => E::ContainerStartedEvent,
                "stop" => E::ContainerStoppedEvent,
                "destroy" => E::ContainerDeletedEvent,
                _ => return None,
            };
            (kind, actor.id.clone())
        }
        _ => return None,
    };
    Some(Lifecycle {
        id: actor.id.clone(),
        kind,
        sandbox,
        at: nanos(env.timestamp.as_ref()),
    })
}

/// The `GetContainerEvents` method.
#[derive(Clone)]
pub struct Events {
    source: Arc<dyn EventSource>,
    pods: Pods,
    containers: Containers,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

impl Events {
    /// Events from `source`, with statuses from `pods` and `containers`.
    pub fn new(source: impl EventSource, pods: Pods, containers: Containers) -> Self {
        Self {
            source: Arc::new(source),
            pods,
            containers,
        }
    }

    /// A new subscriber's stream. It ends with UNAVAILABLE when the hub's stream breaks (the
    /// engine restarted; kubelet subscribes again).
    pub async fn subscribe(
        &self,
    ) -> Result<BoxStream<'static, Result<cri::ContainerEventResponse, Status>>> {
        let mut envelopes = self.source.subscribe().await?;
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = tx.closed() => return,
                    next = envelopes.next() => next,
                };
                let env = match next {
                    Some(Ok(env)) => env,
                    Some(Err(e)) => {
                        let err = Error::unavailable("the events hub stream broke").with_source(e);
                        let _ = tx.send(Err(err.into())).await;
                        return;
                    }
                    None => {
                        let _ = tx
                            .send(Err(Error::unavailable("the events hub stream ended").into()))
                            .await;
                        return;
                    }
                };
                let Some(event) = lifecycle(&env) else {
                    continue;
                };
                let response = this.response(event).await;
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx).boxed())
    }

    async fn response(&self, event: Lifecycle) -> cri::ContainerEventResponse {
        let pod = self
            .pods
            .status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: event.sandbox.clone(),
                verbose: false,
            })
            .await
            .ok()
            .and_then(|r| r.status);
        let mut statuses = Vec::new();
        if pod.is_some() {
            let listed = self
                .containers
                .list(cri::ListContainersRequest {
                    filter: Some(cri::ContainerFilter {
                        pod_sandbox_id: event.sandbox.clone(),
                        ..Default::default()
                    }),
                })
                .await;
            for c in listed.map(|l| l.containers).unwrap_or_default() {
                let status = self
                    .containers
                    .status(cri::ContainerStatusRequest {
                        container_id: c.id,
                        verbose: false,
                    })
                    .await;
                // One removed meanwhile is simply not there any more.
                if let Some(s) = status.ok().and_then(|s| s.status) {
                    statuses.push(s);
                }
            }
        }
        cri::ContainerEventResponse {
            container_id: event.id,
            container_event_type: event.kind as i32,
            created_at: event.at,
            pod_sandbox_status: pod,
            containers_statuses: statuses,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use berth_proto::berth::engine::v1 as pb;
    use tokio::sync::mpsc::UnboundedSender;

    use super::*;
    use crate::containers::ContainerStore;
    use crate::pods::SandboxStore;

    /// A hub that hands each subscriber its own unbounded queue (as the engine's hub gives each
    /// its own cursor into a history).
    #[derive(Clone, Default)]
    struct Hub(Arc<Mutex<Vec<UnboundedSender<Result<ev::Envelope>>>>>);

    impl Hub {
        fn send(&self, env: &ev::Envelope) {
            for tx in self.0.lock().unwrap().iter() {
                let _ = tx.send(Ok(env.clone()));
            }
        }

        fn open_subscriptions(&self) -> usize {
            self.0
                .lock()
                .unwrap()
                .iter()
                .filter(|t| !t.is_closed())
                .count()
        }
    }

    impl EventSource for Hub {
        fn subscribe(&self) -> Fut<'_, Envelopes> {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            self.0.lock().unwrap().push(tx);
            Box::pin(
                async move { Ok(tokio_stream::wrappers::UnboundedReceiverStream::new(rx).boxed()) },
            )
        }
    }

    /// Stores in which every pod is gone: events carry no statuses.
    struct Empty;

    impl SandboxStore for Empty {
        fn run(&self, _req: pb::RunSandboxRequest) -> Fut<'_, pb::Sandbox> {
            Box::pin(async { Err(Error::internal("not in this test")) })
        }
        fn stop<'a>(&'a self, _id: &'a str) -> Fut<'a, bool> {
            Box::pin(async { Ok(false) })
        }
        fn remove<'a>(&'a self, _id: &'a str) -> Fut<'a, bool> {
            Box::pin(async { Ok(false) })
        }
        fn get<'a>(&'a self, _id: &'a str, _v: bool) -> Fut<'a, Option<pb::GetSandboxResponse>> {
            Box::pin(async { Ok(None) })
        }
        fn list(&self, _filters: Vec<types::Filter>) -> Fut<'_, Vec<pb::Sandbox>> {
            Box::pin(async { Ok(Vec::new()) })
        }
    }

    impl ContainerStore for Empty {
        fn sandbox<'a>(&'a self, _id: &'a str) -> Fut<'a, Option<pb::Sandbox>> {
            Box::pin(async { Ok(None) })
        }
        fn create(&self, _req: pb::CreateContainerRequest) -> Fut<'_, pb::Container> {
            Box::pin(async { Err(Error::internal("not in this test")) })
        }
        fn get<'a>(&'a self, _id: &'a str) -> Fut<'a, Option<pb::Container>> {
            Box::pin(async { Ok(None) })
        }
        fn list(&self) -> Fut<'_, Vec<pb::Container>> {
            Box::pin(async { Ok(Vec::new()) })
        }
        fn start<'a>(&'a self, _id: &'a str) -> Fut<'a, ()> {
            Box::pin(async { Ok(()) })
        }
        fn stop<'a>(&'a self, _id: &'a str, _timeout: i64) -> Fut<'a, bool> {
            Box::pin(async { Ok(false) })
        }
        fn remove<'a>(&'a self, _id: &'a str) -> Fut<'a, bool> {
            Box::pin(async { Ok(false) })
        }
        fn update<'a>(&'a self, _id: &'a str, _r: pb::Resources) -> Fut<'a, ()> {
            Box::pin(async { Ok(()) })
        }
        fn reopen_log<'a>(&'a self, _id: &'a str) -> Fut<'a, ()> {
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn a_stalled_subscriber_holds_up_no_other_and_one_that_leaves_unsubscribes() {
        let hub = Hub::default();
        let events = Events::new(hub.clone(), Pods::new(Empty), Containers::new(Empty));
        let stalled = events.subscribe().await.unwrap();
        let mut reader = events.subscribe().await.unwrap();
        // Far more than the stalled one's queue holds.
        let n = QUEUE * 4;
        for i in 0..n {
            hub.send(&envelope(
                ev::EventType::Sandbox,
                "stop",
                &format!("p{i}"),
                None,
            ));
        }
        for i in 0..n {
            let e = reader.next().await.unwrap().unwrap();
            assert_eq!(e.container_id, format!("p{i}"));
            assert_eq!(
                e.container_event_type(),
                cri::ContainerEventType::ContainerStoppedEvent
            );
            assert!(e.pod_sandbox_status.is_none() && e.containers_statuses.is_empty());
        }
        assert_eq!(hub.open_subscriptions(), 2);
        drop(stalled);
        drop(reader);
        // Each task sees its client gone and drops its subscription.
        while hub.open_subscriptions() > 0 {
            tokio::task::yield_now().await;
        }
    }

    fn envelope(ty: ev::EventType, action: &str, id: &str, sandbox: Option<&str>) -> ev::Envelope {
        ev::Envelope {
            timestamp: Some(berth_proto::prost_types::Timestamp {
                seconds: 5,
                nanos: 7,
            }),
            r#type: ty as i32,
            action: action.into(),
            actor: Some(ev::Actor {
                id: id.into(),
                attributes: sandbox
                    .map(|s| (SANDBOX_ATTRIBUTE.to_string(), s.to_string()))
                    .into_iter()
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn lifecycle_actions_become_cri_events() {
        use cri::ContainerEventType as E;
        let c = |action| {
            lifecycle(&envelope(
                ev::EventType::Container,
                action,
                "c1",
                Some("p1"),
            ))
        };
        let got = c("create").unwrap();
        assert_eq!(
            got,
            Lifecycle {
                id: "c1".into(),
                kind: E::ContainerCreatedEvent,
                sandbox: "p1".into(),
                at: 5_000_000_007,
            }
        );
        assert_eq!(c("start").unwrap().kind, E::ContainerStartedEvent);
        assert_eq!(c("die").unwrap().kind, E::ContainerStoppedEvent);
        assert_eq!(c("destroy").unwrap().kind, E::ContainerDeletedEvent);
        // The stop that comes with a die, and other actions, are no second event.
        assert_eq!(c("stop"), None);
        assert_eq!(c("kill"), None);
        // A Docker container (no pod) is not the CRI's.
        assert_eq!(
            lifecycle(&envelope(ev::EventType::Container, "start", "d", None)),
            None
        );
        let s = |action| lifecycle(&envelope(ev::EventType::Sandbox, action, "p1", None));
        assert_eq!(s("create").unwrap().kind, E::ContainerCreatedEvent);
        assert_eq!(s("stop").unwrap().kind, E::ContainerStoppedEvent);
        let deleted = s("destroy").unwrap();
        assert_eq!(
            (deleted.id.as_str(), deleted.sandbox.as_str()),
            ("p1", "p1")
        );
        assert_eq!(
            lifecycle(&envelope(ev::EventType::Image, "pull", "busybox", None)),
            None
        );
    }
}
