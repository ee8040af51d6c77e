//! Shared stats sampling: every streaming `docker stats` of a container reads the same sample,
//! taken once a second by one task per container while anyone is watching. `docker stats`
//! without arguments opens one stream per running container; with several clients (or `docker
//! stats` beside a dashboard) a container's cgroup is still read once a second.

use std::sync::{Arc, Weak};
use std::time::Duration;

use berth_proto::berth::engine::v1 as pb;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Ctr, Engine};

/// One container's sampler; subscribers hold it, and the last one to go stops the task.
pub(crate) struct Sampler {
    samples: watch::Receiver<Option<Arc<pb::ContainerStats>>>,
    _stop: DropGuard,
}

impl Sampler {
    /// A receiver of the samples; the current one (if any) is marked unseen.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Arc<pb::ContainerStats>>> {
        let mut rx = self.samples.clone();
        rx.mark_changed();
        rx
    }
}

impl Engine {
    /// The running sampler of `ctr`, or a new one.
    pub(crate) fn sampler(self: &Arc<Self>, ctr: &Arc<Ctr>) -> Arc<Sampler> {
        let mut samplers = self.samplers.lock().unwrap();
        samplers.retain(|_, s| s.strong_count() > 0);
        if let Some(s) = samplers.get(&ctr.id).and_then(Weak::upgrade) {
            return s;
        }
        let (tx, rx) = watch::channel(None);
        let stop = CancellationToken::new();
        let sampler = Arc::new(Sampler {
            samples: rx,
            _stop: stop.clone().drop_guard(),
        });
        samplers.insert(ctr.id.clone(), Arc::downgrade(&sampler));
        let engine = self.clone();
        let ctr = ctr.clone();
        tokio::spawn(async move {
            // The cgroup's files stay open while this task samples, and close with it.
            struct KeepOpen(Arc<Ctr>);
            impl Drop for KeepOpen {
                fn drop(&mut self) {
                    self.0.keep_stats_open(false);
                }
            }
            ctr.keep_stats_open(true);
            let _open = KeepOpen(ctr.clone());
            loop {
                let sample = tokio::select! {
                    s = engine.sample(&ctr) => s,
                    _ = stop.cancelled() => return,
                };
                tx.send_replace(Some(Arc::new(sample)));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => return,
                    _ = engine.shutdown.cancelled() => return,
                }
                if ctr.exits.borrow().removed {
                    return;
                }
            }
        });
        sampler
    }
}
