//! The events hub: every service and shim publishes here; subscribers get the retained history
//! between `since` and `until`, then live events.
//!
//! The history is a bounded ring (oldest dropped first). Each envelope gets a strictly
//! increasing sequence number and a timestamp that never goes backwards, so "history, then
//! live" has neither gaps nor duplicates: a subscription takes its history snapshot and its
//! live receiver under the same lock the publisher holds. A subscriber that falls behind the
//! live channel catches up from the ring by sequence number.
//!
//! Shims retry publishing until it succeeds, so the same task payload can arrive twice; the hub
//! keeps the keys of recent task payloads and drops repeats.
//!
//! The history is bounded by count and by age, and with a [`journal::Journal`] it is also on
//! disk: a restarted hub continues the sequence numbers and answers `since`/`until` as before.

pub mod filter;
pub mod journal;

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use berth_proto::berth::events::v1::{self as pb, EventType, envelope::Payload};
use berth_proto::prost_types::Timestamp;
use tokio::sync::broadcast;

pub use filter::EventFilter;
use journal::Journal;

/// How much history a hub keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Envelopes kept at most (at least one).
    pub max_count: usize,
    /// Envelopes older than this are dropped; `None` keeps them regardless of age.
    pub max_age: Option<Duration>,
}

impl Retention {
    /// At most `max_count` envelopes, of any age.
    pub fn count(max_count: usize) -> Self {
        Self {
            max_count,
            max_age: None,
        }
    }
}

/// The hub. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Hub {
    inner: Mutex<Inner>,
    live: broadcast::Sender<Arc<pb::Envelope>>,
    capacity: usize,
    max_age: Option<Duration>,
}

#[derive(Debug, Default)]
struct Inner {
    ring: VecDeque<Arc<pb::Envelope>>,
    journal: Option<Journal>,
    next_seq: u64,
    last_time: Option<SystemTime>,
    /// Keys of recent task payloads, to drop the repeats of retried publishes.
    seen_tasks: VecDeque<String>,
    seen_set: HashSet<String>,
}

const SEEN_TASKS: usize = 4096;

/// Converts a protobuf timestamp into a `SystemTime` (clamped to the epoch).
pub fn to_system_time(ts: &Timestamp) -> SystemTime {
    SystemTime::try_from(*ts).unwrap_or(SystemTime::UNIX_EPOCH)
}

fn task_key(ev: &pb::Envelope) -> Option<String> {
    let ts = |t: &Option<Timestamp>| {
        t.map(|t| format!("{}.{}", t.seconds, t.nanos))
            .unwrap_or_default()
    };
    Some(match ev.payload.as_ref()? {
        Payload::TaskStart(p) => format!("start/{}/{}/{}", p.container_id, p.exec_id, p.pid),
        Payload::TaskExit(p) => format!(
            "exit/{}/{}/{}/{}",
            p.container_id,
            p.exec_id,
            p.pid,
            ts(&p.exited_at)
        ),
        Payload::TaskOom(p) => format!("oom/{}/{}", p.container_id, ts(&ev.timestamp)),
        Payload::ExecAdded(p) => format!("execadd/{}/{}", p.container_id, p.exec_id),
        Payload::ExecStarted(p) => format!("execstart/{}/{}/{}", p.container_id, p.exec_id, p.pid),
        Payload::TaskHealth(p) => format!("health/{}/{}", p.container_id, ts(&ev.timestamp)),
    })
}

impl Inner {
    fn remember_task(&mut self, key: String) -> bool {
        if !self.seen_set.insert(key.clone()) {
            return false;
        }
        self.seen_tasks.push_back(key);
        if self.seen_tasks.len() > SEEN_TASKS
            && let Some(old) = self.seen_tasks.pop_front()
        {
            self.seen_set.remove(&old);
        }
        true
    }
}

impl Hub {
    /// A hub keeping `capacity` envelopes of history in memory only.
    pub fn new(capacity: usize) -> Arc<Self> {
        Self::with_inner(Inner::default(), Retention::count(capacity))
    }

    fn with_inner(inner: Inner, retention: Retention) -> Arc<Self> {
        let (live, _) = broadcast::channel(1024);
        Arc::new(Self {
            inner: Mutex::new(inner),
            live,
            capacity: retention.max_count.max(1),
            max_age: retention.max_age,
        })
    }

    /// A hub whose history is kept in the journal at `path` as well: what the journal holds
    /// within `retention` is loaded, and sequence numbers and times continue after it.
    pub fn open(path: &Path, retention: Retention) -> berth_core::Result<Arc<Self>> {
        let io_err = |e: std::io::Error| {
            berth_core::Error::internal(format!("events journal {}", path.display())).with_source(e)
        };
        let (journal, events) = Journal::open(path).map_err(io_err)?;
        let mut inner = Inner {
            journal: Some(journal),
            ..Inner::default()
        };
        for ev in events {
            if let Some(key) = task_key(&ev) {
                inner.remember_task(key);
            }
            inner.next_seq = inner.next_seq.max(ev.sequence);
            let t = ev.timestamp.as_ref().map(to_system_time);
            if let Some(t) = t
                && inner.last_time.is_none_or(|last| t > last)
            {
                inner.last_time = Some(t);
            }
            inner.ring.push_back(Arc::new(ev));
        }
        let hub = Self::with_inner(inner, retention);
        {
            let mut inner = hub.inner.lock().unwrap();
            hub.trim(&mut inner, SystemTime::now());
            let Inner { ring, journal, .. } = &mut *inner;
            let journal = journal.as_mut().expect("opened with a journal");
            if journal.records() != ring.len() {
                journal
                    .rewrite(ring.iter().map(|ev| ev.as_ref()))
                    .map_err(io_err)?;
            }
        }
        Ok(hub)
    }

    /// Drops what is beyond the count or older than the age limit, and rewrites the journal
    /// once it holds twice what is retained.
    fn trim(&self, inner: &mut Inner, now: SystemTime) {
        while inner.ring.len() > self.capacity {
            inner.ring.pop_front();
        }
        if let Some(max_age) = self.max_age
            && let Some(oldest) = now.checked_sub(max_age)
        {
            while inner.ring.front().is_some_and(|ev| {
                ev.timestamp
                    .as_ref()
                    .is_none_or(|t| to_system_time(t) < oldest)
            }) {
                inner.ring.pop_front();
            }
        }
        let Inner { ring, journal, .. } = inner;
        if let Some(journal) = journal
            && journal.records() >= 2 * self.capacity.max(ring.len()).max(64)
            && let Err(e) = journal.rewrite(ring.iter().map(|ev| ev.as_ref()))
        {
            tracing::warn!(error = %e, "events journal: rewrite failed");
        }
    }

    /// Adds `ev`, filling `timestamp` (when unset), `namespace` (when empty, with
    /// `default_namespace`), `scope` and `sequence`. Returns the stored envelope, or `None` for
    /// a repeated task payload.
    pub fn publish(
        &self,
        mut ev: pb::Envelope,
        default_namespace: &str,
    ) -> Option<Arc<pb::Envelope>> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(key) = task_key(&ev)
            && !inner.remember_task(key)
        {
            return None;
        }
        // Times never go backwards within the hub, so that `since`/`until` agree with the order
        // subscribers see.
        let now = SystemTime::now();
        let mut t = ev.timestamp.as_ref().map(to_system_time).unwrap_or(now);
        if ev.timestamp.is_none()
            && let Some(last) = inner.last_time
            && t <= last
        {
            t = last + Duration::from_nanos(1);
        }
        if inner.last_time.is_none_or(|last| t > last) {
            inner.last_time = Some(t);
        }
        ev.timestamp = Some(t.into());
        if ev.namespace.is_empty() {
            ev.namespace = default_namespace.to_string();
        }
        if ev.scope.is_empty() {
            ev.scope = "local".into();
        }
        inner.next_seq += 1;
        ev.sequence = inner.next_seq;
        if let Some(journal) = inner.journal.as_mut()
            && let Err(e) = journal.append(&ev)
        {
            // The event still reaches every subscriber; only a restart would forget it.
            tracing::warn!(error = %e, "events journal: append failed");
        }
        let ev = Arc::new(ev);
        inner.ring.push_back(ev.clone());
        self.trim(&mut inner, now);
        metrics::counter!("berth_events_total", "type" => type_name(ev.r#type())).increment(1);
        // Nobody listening is fine.
        let _ = self.live.send(ev.clone());
        Some(ev)
    }

    /// Envelopes retained for `since`.
    pub fn retained(&self) -> usize {
        self.inner.lock().unwrap().ring.len()
    }

    /// A subscription: retained events with `since <= time <= until` (none without `since`),
    /// then live events up to `until`.
    pub fn subscribe(
        self: &Arc<Self>,
        filter: EventFilter,
        since: Option<SystemTime>,
        until: Option<SystemTime>,
    ) -> Subscription {
        let inner = self.inner.lock().unwrap();
        let rx = self.live.subscribe();
        let last_seq = inner.next_seq;
        let history: VecDeque<Arc<pb::Envelope>> = match since {
            None => VecDeque::new(),
            Some(since) => inner
                .ring
                .iter()
                .filter(|ev| {
                    let t = ev.timestamp.as_ref().map(to_system_time);
                    t.is_some_and(|t| t >= since && until.is_none_or(|u| t <= u))
                })
                .filter(|ev| filter.matches(ev))
                .cloned()
                .collect(),
        };
        drop(inner);
        Subscription {
            hub: self.clone(),
            filter,
            history,
            rx,
            last_seq,
            until,
        }
    }

    /// Retained events after sequence `after` that `filter` accepts, oldest first.
    fn after(&self, after: u64, filter: &EventFilter) -> Vec<Arc<pb::Envelope>> {
        let inner = self.inner.lock().unwrap();
        inner
            .ring
            .iter()
            .filter(|ev| ev.sequence > after && filter.matches(ev))
            .cloned()
            .collect()
    }
}

/// One subscriber's view of the hub.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Hub>,
    filter: EventFilter,
    history: VecDeque<Arc<pb::Envelope>>,
    rx: broadcast::Receiver<Arc<pb::Envelope>>,
    last_seq: u64,
    until: Option<SystemTime>,
}

impl Subscription {
    /// The next event, or `None` once `until` has passed.
    pub async fn next(&mut self) -> Option<Arc<pb::Envelope>> {
        if let Some(ev) = self.history.pop_front() {
            return Some(ev);
        }
        loop {
            let deadline = match self.until {
                None => None,
                Some(until) => match until.duration_since(SystemTime::now()) {
                    Ok(left) => Some(tokio::time::Instant::now() + left),
                    Err(_) => return None,
                },
            };
            let received = match deadline {
                None => self.rx.recv().await,
                Some(d) => match tokio::time::timeout_at(d, self.rx.recv()).await {
                    Ok(r) => r,
                    Err(_) => return None,
                },
            };
            match received {
                Ok(ev) => {
                    if ev.sequence <= self.last_seq {
                        continue;
                    }
                    self.last_seq = ev.sequence;
                    if self.past_until(&ev) {
                        return None;
                    }
                    if self.filter.matches(&ev) {
                        return Some(ev);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let missed = self.hub.after(self.last_seq, &self.filter);
                    if let Some(last) = missed.last() {
                        self.last_seq = last.sequence;
                    }
                    self.history.extend(missed);
                    if let Some(ev) = self.history.pop_front() {
                        if self.past_until(&ev) {
                            return None;
                        }
                        return Some(ev);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    fn past_until(&self, ev: &pb::Envelope) -> bool {
        match (self.until, ev.timestamp.as_ref()) {
            (Some(until), Some(t)) => to_system_time(t) > until,
            _ => false,
        }
    }
}

/// Docker's name of an event type (`container`, …; `task` for shim payloads).
pub fn type_name(ty: EventType) -> &'static str {
    match ty {
        EventType::Container => "container",
        EventType::Volume => "volume",
        EventType::Network => "network",
        EventType::Image => "image",
        EventType::Daemon => "daemon",
        EventType::Plugin => "plugin",
        EventType::Task => "task",
        EventType::Sandbox => "sandbox",
        EventType::Unspecified => "unspecified",
    }
}

/// An envelope for a Docker-visible event published by the engine itself.
pub fn docker_event(
    ty: EventType,
    action: impl Into<String>,
    id: impl Into<String>,
    attributes: impl IntoIterator<Item = (String, String)>,
) -> pb::Envelope {
    let action = action.into();
    let plural = match ty {
        EventType::Container => "containers",
        EventType::Volume => "volumes",
        EventType::Network => "networks",
        EventType::Image => "images",
        EventType::Daemon => "daemon",
        EventType::Plugin => "plugins",
        EventType::Task => "tasks",
        EventType::Sandbox => "sandboxes",
        EventType::Unspecified => "events",
    };
    let topic_action = action.split(':').next().unwrap_or(&action).to_string();
    pb::Envelope {
        topic: format!("/{plural}/{topic_action}"),
        r#type: ty.into(),
        action,
        actor: Some(pb::Actor {
            id: id.into(),
            attributes: attributes.into_iter().collect(),
        }),
        scope: "local".into(),
        source: "berth-engine".into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::berth::types::v1 as types;

    fn f(pairs: &[(&str, &str)]) -> EventFilter {
        let f: Vec<types::Filter> = pairs
            .iter()
            .map(|(k, v)| types::Filter {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect();
        EventFilter::new(&f, "default").unwrap()
    }

    fn container(action: &str, id: &str) -> pb::Envelope {
        docker_event(
            EventType::Container,
            action,
            id,
            [("name".to_string(), id.to_string())],
        )
    }

    #[tokio::test]
    async fn history_between_since_and_until_then_nothing() {
        let hub = Hub::new(100);
        let before = SystemTime::now();
        let a = hub.publish(container("create", "a"), "default").unwrap();
        let b = hub.publish(container("start", "a"), "default").unwrap();
        let c = hub.publish(container("die", "a"), "default").unwrap();
        assert!(a.sequence < b.sequence && b.sequence < c.sequence);
        let tb = to_system_time(b.timestamp.as_ref().unwrap());
        // [since, until] inclusive, until in the past: history only, then the end.
        let mut s = hub.subscribe(f(&[]), Some(tb), Some(tb));
        assert_eq!(s.next().await.unwrap().action, "start");
        assert!(s.next().await.is_none());
        let mut s = hub.subscribe(
            f(&[("event", "die")]),
            Some(before),
            Some(SystemTime::now()),
        );
        assert_eq!(s.next().await.unwrap().sequence, c.sequence);
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn history_then_live_without_gaps() {
        let hub = Hub::new(100);
        let before = SystemTime::now();
        hub.publish(container("create", "x"), "default");
        let mut s = hub.subscribe(f(&[("container", "x")]), Some(before), None);
        hub.publish(container("start", "y"), "default");
        hub.publish(container("start", "x"), "default");
        assert_eq!(s.next().await.unwrap().action, "create");
        assert_eq!(s.next().await.unwrap().action, "start");
        // Live until `until`.
        let mut s = hub.subscribe(
            f(&[]),
            None,
            Some(SystemTime::now() + Duration::from_millis(200)),
        );
        let h = hub.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            h.publish(container("stop", "z"), "default");
        });
        assert_eq!(s.next().await.unwrap().action, "stop");
        assert!(s.next().await.is_none(), "ends at until");
    }

    #[tokio::test]
    async fn ring_is_bounded_and_lagging_subscribers_catch_up() {
        let hub = Hub::new(5000);
        let mut s = hub.subscribe(f(&[]), None, None);
        for i in 0..3000 {
            hub.publish(container("start", &format!("c{i}")), "default");
        }
        let mut n = 0;
        let mut last = 0;
        while n < 3000 {
            let ev = s.next().await.unwrap();
            assert!(ev.sequence > last);
            last = ev.sequence;
            n += 1;
        }
        let small = Hub::new(3);
        for i in 0..10 {
            small.publish(container("start", &format!("c{i}")), "default");
        }
        let mut s = small.subscribe(
            f(&[]),
            Some(SystemTime::UNIX_EPOCH),
            Some(SystemTime::now()),
        );
        let mut got = Vec::new();
        while let Some(ev) = s.next().await {
            got.push(ev.actor.as_ref().unwrap().id.clone());
        }
        assert_eq!(got, ["c7", "c8", "c9"]);
    }

    #[tokio::test]
    async fn a_reopened_hub_answers_the_same_and_continues_the_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        let retention = Retention {
            max_count: 5,
            max_age: None,
        };
        let hub = Hub::open(&path, retention).unwrap();
        let before = SystemTime::now();
        for i in 0..20 {
            hub.publish(container("start", &format!("c{i}")), "default");
        }
        let until = SystemTime::now();
        let read = |hub: &Arc<Hub>| {
            let mut s = hub.subscribe(f(&[]), Some(before), Some(until));
            async move {
                let mut got = Vec::new();
                while let Some(ev) = s.next().await {
                    got.push((ev.sequence, ev.actor.as_ref().unwrap().id.clone()));
                }
                got
            }
        };
        let first = read(&hub).await;
        assert_eq!(first.len(), 5);
        assert_eq!(first[0].1, "c15");
        drop(hub);
        let hub = Hub::open(&path, retention).unwrap();
        assert_eq!(read(&hub).await, first);
        let next = hub.publish(container("stop", "x"), "default").unwrap();
        assert_eq!(next.sequence, 21);
        assert!(to_system_time(next.timestamp.as_ref().unwrap()) > until);
    }

    #[tokio::test]
    async fn old_events_age_out_and_task_repeats_stay_dropped_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        let retention = Retention {
            max_count: 100,
            max_age: Some(Duration::from_secs(3600)),
        };
        let hub = Hub::open(&path, retention).unwrap();
        let mut old = container("create", "old");
        old.timestamp = Some((SystemTime::now() - Duration::from_secs(7200)).into());
        hub.publish(old, "default");
        let exit = task_exit();
        assert!(hub.publish(exit.clone(), "default").is_some());
        hub.publish(container("start", "new"), "default");
        drop(hub);
        let hub = Hub::open(&path, retention).unwrap();
        let mut s = hub.subscribe(
            f(&[]),
            Some(SystemTime::UNIX_EPOCH),
            Some(SystemTime::now()),
        );
        assert_eq!(s.next().await.unwrap().actor.as_ref().unwrap().id, "new");
        assert!(s.next().await.is_none());
        assert!(hub.publish(exit, "default").is_none(), "a retried exit");
    }

    fn task_exit() -> pb::Envelope {
        pb::Envelope {
            r#type: EventType::Task.into(),
            topic: "/tasks/exit".into(),
            payload: Some(Payload::TaskExit(pb::TaskExit {
                container_id: "c".into(),
                pid: 42,
                exit_status: 3,
                exited_at: Some(SystemTime::now().into()),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn repeated_task_payloads_are_dropped() {
        let hub = Hub::new(10);
        let exit = task_exit();
        assert!(hub.publish(exit.clone(), "default").is_some());
        assert!(hub.publish(exit, "default").is_none());
    }
}
