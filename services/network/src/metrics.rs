//! The network service's metrics, read at scrape time from its state: networks, endpoints and
//! published ports by driver.

use std::sync::{Arc, Weak};

use berth_core::metrics::{Collector, Exposition, Kind};

use crate::service::NetworkService;

/// The scrape-time collector.
pub fn collector(service: Weak<NetworkService>) -> Collector {
    Arc::new(move || {
        let service = service.clone();
        Box::pin(async move {
            let Some(service) = service.upgrade() else {
                return String::new();
            };
            let counts = service.counts_by_driver();
            let mut e = Exposition::new();
            let families = [
                ("berth_networks", "Networks, by driver."),
                (
                    "berth_network_endpoints",
                    "Container endpoints (attachments), by network driver.",
                ),
                (
                    "berth_network_published_ports",
                    "Published ports bound, by network driver.",
                ),
            ];
            for (i, (name, help)) in families.iter().enumerate() {
                e.family(name, Kind::Gauge, help);
                for (driver, c) in &counts {
                    e.sample(name, &[("driver", driver)], c[i] as f64);
                }
            }
            e.finish()
        })
    })
}
