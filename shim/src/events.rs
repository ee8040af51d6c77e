//! Task events (start, exit, OOM, exec) and their delivery to the engine's events hub through a
//! bounded retry queue: the engine may be down or restarting, so events wait and are retried
//! with backoff, in order; when the queue is full the oldest event is dropped (and counted).

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use crate::runtime::BoxFuture;

/// Something that happened to a container's processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    /// The init (`exec_id` "") or an exec process started.
    Start {
        /// "" for init.
        exec_id: String,
        /// Host pid.
        pid: u32,
    },
    /// A process exited.
    Exit {
        /// "" for init.
        exec_id: String,
        /// Host pid.
        pid: u32,
        /// Exit code or 128 + signal.
        status: u32,
        /// When.
        at: SystemTime,
    },
    /// The kernel OOM-killed a process of the container.
    Oom,
    /// An exec process was registered.
    ExecAdded {
        /// Its id.
        exec_id: String,
    },
    /// An exec process started.
    ExecStarted {
        /// Its id.
        exec_id: String,
        /// Host pid.
        pid: u32,
    },
    /// A health probe changed the container's health status (`changed`), or the healthcheck
    /// stopped with the init.
    Health {
        /// The state after it.
        state: crate::health::HealthState,
        /// The status changed.
        changed: bool,
    },
}

/// An event with its time and the container it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Container id.
    pub container_id: String,
    /// berth namespace.
    pub namespace: String,
    /// When it happened.
    pub at: SystemTime,
    /// What happened.
    pub event: TaskEvent,
}

/// Delivers one event to the hub.
pub trait Transport: Send + Sync + fmt::Debug {
    /// Sends `event`; an error means "try again later".
    fn send<'a>(&'a self, event: &'a Envelope) -> BoxFuture<'a, ()>;
}

/// Queue bounds and retry timing.
#[derive(Debug, Clone, Copy)]
pub struct PublisherConfig {
    /// Events kept while the hub is unreachable.
    pub capacity: usize,
    /// First retry delay; doubles up to `max_backoff`.
    pub backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// How long one delivery attempt may take.
    pub attempt_timeout: Duration,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            capacity: 1024,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Envelope>,
    dropped: u64,
    transport: Option<Arc<dyn Transport>>,
}

/// Publishes events in order through a bounded queue. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
    /// Signalled when the queue becomes empty.
    drained: Arc<Notify>,
    config: PublisherConfig,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = self.queue.lock().unwrap();
        f.debug_struct("Publisher")
            .field("queued", &q.events.len())
            .field("dropped", &q.dropped)
            .finish()
    }
}

impl Publisher {
    /// A publisher with no destination yet: events queue until [`Publisher::set_transport`].
    /// Spawns its delivery task on the current runtime.
    pub fn new(config: PublisherConfig) -> Self {
        let this = Self {
            queue: Arc::new(Mutex::new(Queue::default())),
            wake: Arc::new(Notify::new()),
            drained: Arc::new(Notify::new()),
            config,
        };
        tokio::spawn(this.clone().deliver());
        this
    }

    /// Where events go from now on.
    pub fn set_transport(&self, transport: Arc<dyn Transport>) {
        self.queue.lock().unwrap().transport = Some(transport);
        self.wake.notify_one();
    }

    /// Queues an event; never blocks. The oldest queued event is dropped when the queue is full.
    pub fn publish(&self, envelope: Envelope) {
        {
            let mut q = self.queue.lock().unwrap();
            if q.events.len() >= self.config.capacity.max(1) {
                q.events.pop_front();
                q.dropped += 1;
                tracing::warn!(
                    dropped = q.dropped,
                    "event queue full; dropped the oldest event"
                );
            }
            q.events.push_back(envelope);
        }
        self.wake.notify_one();
    }

    /// Events waiting for delivery.
    pub fn queued(&self) -> usize {
        self.queue.lock().unwrap().events.len()
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.queue.lock().unwrap().dropped
    }

    /// Waits until every queued event is delivered, for at most `timeout` (not at all without
    /// a destination). Returns whether the queue is empty.
    pub async fn flush(&self, timeout: Duration) -> bool {
        if self.queue.lock().unwrap().transport.is_none() {
            return self.queued() == 0;
        }
        let wait = async {
            loop {
                let drained = self.drained.notified();
                if self.queued() == 0 {
                    return;
                }
                drained.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    async fn deliver(self) {
        let mut backoff = self.config.backoff;
        loop {
            let wake = self.wake.notified();
            let next = {
                let q = self.queue.lock().unwrap();
                match (&q.transport, q.events.front()) {
                    (Some(t), Some(e)) => Some((t.clone(), e.clone())),
                    _ => None,
                }
            };
            let Some((transport, event)) = next else {
                self.drained.notify_waiters();
                wake.await;
                continue;
            };
            let result =
                tokio::time::timeout(self.config.attempt_timeout, transport.send(&event)).await;
            match result {
                Ok(Ok(())) => {
                    let mut q = self.queue.lock().unwrap();
                    // Unless it was dropped as the oldest meanwhile, it is still at the front.
                    if q.events.front() == Some(&event) {
                        q.events.pop_front();
                    }
                    backoff = self.config.backoff;
                }
                Ok(Err(err)) => {
                    tracing::debug!(error = %err.chain(), ?backoff, "publish event; will retry");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
                Err(_) => {
                    tracing::debug!(?backoff, "publish event timed out; will retry");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[derive(Debug, Default)]
    struct Fake {
        up: AtomicBool,
        got: Mutex<Vec<Envelope>>,
    }

    impl Transport for Fake {
        fn send<'a>(&'a self, event: &'a Envelope) -> BoxFuture<'a, ()> {
            Box::pin(async move {
                if !self.up.load(Ordering::SeqCst) {
                    return Err(berth_core::Error::unavailable("engine down"));
                }
                self.got.lock().unwrap().push(event.clone());
                Ok(())
            })
        }
    }

    fn exit(pid: u32) -> Envelope {
        Envelope {
            container_id: "c1".into(),
            namespace: "default".into(),
            at: SystemTime::UNIX_EPOCH,
            event: TaskEvent::Exit {
                exec_id: String::new(),
                pid,
                status: 0,
                at: SystemTime::UNIX_EPOCH,
            },
        }
    }

    fn config(capacity: usize) -> PublisherConfig {
        PublisherConfig {
            capacity,
            backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            attempt_timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn retries_in_order_until_the_hub_is_back() {
        let fake = Arc::new(Fake::default());
        let p = Publisher::new(config(10));
        p.set_transport(fake.clone());
        for pid in 1..=3 {
            p.publish(exit(pid));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(p.queued(), 3);
        fake.up.store(true, Ordering::SeqCst);
        assert!(p.flush(Duration::from_secs(5)).await);
        let pids: Vec<u32> = fake
            .got
            .lock()
            .unwrap()
            .iter()
            .map(|e| match e.event {
                TaskEvent::Exit { pid, .. } => pid,
                _ => 0,
            })
            .collect();
        assert_eq!(pids, [1, 2, 3]);
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_oldest() {
        let fake = Arc::new(Fake::default());
        let p = Publisher::new(config(2));
        for pid in 1..=5 {
            p.publish(exit(pid));
        }
        assert_eq!((p.queued(), p.dropped()), (2, 3));
        fake.up.store(true, Ordering::SeqCst);
        p.set_transport(fake.clone());
        assert!(p.flush(Duration::from_secs(5)).await);
        let got = fake.got.lock().unwrap().clone();
        assert_eq!(got, [exit(4), exit(5)]);
    }
}
