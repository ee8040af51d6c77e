//! Network events (create, destroy, connect, disconnect) for the engine's events hub.
//!
//! Publishing never blocks or fails a network operation: events go into a bounded queue that a
//! background task drains into the hub; when the hub is down or the queue is full they are
//! dropped (and logged at debug), as Docker's network events are best effort too.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use berth_proto::berth::events::v1::events_client::EventsClient;
use berth_proto::berth::events::v1::{Actor, Envelope, EventType, PublishRequest};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Where network events go.
pub trait EventSink: Send + Sync {
    /// Publishes `action` ("create", "destroy", "connect", "disconnect") about a network.
    fn publish(&self, action: &str, network_id: &str, attributes: BTreeMap<String, String>);
}

/// Drops every event (tests, and stacks without an engine).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEvents;

impl EventSink for NoEvents {
    fn publish(&self, _: &str, _: &str, _: BTreeMap<String, String>) {}
}

/// Publishes to the engine's `berth.events.v1.Events` service.
#[derive(Debug, Clone)]
pub struct HubEvents {
    tx: mpsc::Sender<Envelope>,
}

impl HubEvents {
    /// Starts the background publisher on the current runtime; it stops with `shutdown`.
    pub fn start(engine_socket: PathBuf, shutdown: CancellationToken) -> Self {
        let (tx, mut rx) = mpsc::channel::<Envelope>(256);
        tokio::spawn(async move {
            let mut client = EventsClient::new(berth_core::uds::channel(engine_socket));
            loop {
                let envelope = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    e = rx.recv() => match e { Some(e) => e, None => return },
                };
                let mut req = tonic::Request::new(PublishRequest {
                    envelope: Some(envelope),
                });
                req.set_timeout(Duration::from_secs(2));
                if let Err(status) = client.publish(req).await {
                    tracing::debug!(error = %status.message(), "network event not published");
                }
            }
        });
        Self { tx }
    }
}

impl EventSink for HubEvents {
    fn publish(&self, action: &str, network_id: &str, attributes: BTreeMap<String, String>) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let envelope = Envelope {
            timestamp: Some(prost_types::Timestamp {
                seconds: now.as_secs() as i64,
                nanos: now.subsec_nanos() as i32,
            }),
            namespace: String::new(),
            topic: format!("/networks/{action}"),
            r#type: EventType::Network as i32,
            action: action.to_string(),
            actor: Some(Actor {
                id: network_id.to_string(),
                attributes: attributes.into_iter().collect(),
            }),
            scope: "local".into(),
            sequence: 0,
            source: "berth-network".into(),
            payload: None,
        };
        if self.tx.try_send(envelope).is_err() {
            tracing::debug!(action, "network event queue full, event dropped");
        }
    }
}
