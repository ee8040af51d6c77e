//! The snapshotter's metrics, read at scrape time: snapshots and their disk use by kind.

use std::sync::Arc;

use berth_core::metrics::{Collector, Exposition, Kind};

use crate::local::LocalSnapshotter;

/// The scrape-time collector.
pub fn collector(snapshotter: LocalSnapshotter) -> Collector {
    Arc::new(move || {
        let snapshotter = snapshotter.clone();
        Box::pin(async move {
            let Ok(totals) = snapshotter.totals().await else {
                return String::new();
            };
            let driver = snapshotter.driver().name();
            let mut e = Exposition::new();
            e.family("berth_snapshots", Kind::Gauge, "Snapshots, by kind.");
            for (kind, (n, _)) in &totals {
                e.sample(
                    "berth_snapshots",
                    &[("driver", driver), ("kind", kind)],
                    *n as f64,
                );
            }
            e.family(
                "berth_snapshot_disk_bytes",
                Kind::Gauge,
                "Bytes on disk of snapshots, by kind.",
            );
            for (kind, (_, bytes)) in &totals {
                e.sample(
                    "berth_snapshot_disk_bytes",
                    &[("driver", driver), ("kind", kind)],
                    *bytes as f64,
                );
            }
            e.finish()
        })
    })
}
