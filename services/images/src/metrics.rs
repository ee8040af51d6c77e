//! The images service's metrics: pulls, bytes downloaded and layers unpacked as they happen;
//! images and the content store's size at scrape time.

use std::sync::{Arc, Weak};

use berth_core::metrics::{Collector, Exposition, Kind};

use crate::service::Images;

/// Counts a finished pull.
pub fn pull_done(ok: bool) {
    let result = if ok { "ok" } else { "error" };
    metrics::counter!("berth_image_pulls_total", "result" => result).increment(1);
}

/// Counts bytes of blobs received from registries.
pub fn pulled_bytes(n: u64) {
    metrics::counter!("berth_image_pull_bytes_total").increment(n);
}

/// Counts a layer unpacked into a snapshot.
pub fn layer_unpacked() {
    metrics::counter!("berth_image_layers_unpacked_total").increment(1);
}

fn describe() {
    metrics::describe_counter!("berth_image_pulls_total", "Image pulls, by result.");
    metrics::describe_counter!(
        "berth_image_pull_bytes_total",
        metrics::Unit::Bytes,
        "Bytes of blobs received from registries."
    );
    metrics::describe_counter!(
        "berth_image_layers_unpacked_total",
        "Layers unpacked into snapshots (pulls, loads, commits)."
    );
}

/// Images and content store size, read at scrape time.
pub fn collector(images: Weak<Images>) -> Collector {
    describe();
    Arc::new(move || {
        let images = images.clone();
        Box::pin(async move {
            let Some(images) = images.upgrade() else {
                return String::new();
            };
            tokio::task::spawn_blocking(move || render(&images))
                .await
                .unwrap_or_default()
        })
    })
}

fn render(images: &Images) -> String {
    let mut e = Exposition::new();
    if let Ok(records) = images.meta.images() {
        e.single(
            "berth_images",
            Kind::Gauge,
            "Image records (each tag and each untagged image).",
            records.len() as f64,
        );
    }
    if let Ok(blobs) = images.content.list() {
        e.single(
            "berth_image_content_blobs",
            Kind::Gauge,
            "Blobs in the content store.",
            blobs.len() as f64,
        );
        e.single(
            "berth_image_content_store_bytes",
            Kind::Gauge,
            "Bytes of blobs in the content store.",
            blobs.iter().map(|b| b.size.max(0) as f64).sum(),
        );
    }
    e.finish()
}
