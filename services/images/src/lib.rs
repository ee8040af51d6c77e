//! berth-images: content store, registry pull and push, unpack into snapshots, import and export.

pub mod apply;
pub mod archive;
pub mod cache;
pub mod child;
pub mod content;
pub mod convert;
pub mod filters;
pub mod grpc;
pub mod hosts;
pub mod meta;
pub mod metrics;
pub mod oci;
pub mod pull;
pub mod push;
pub mod registry;
pub mod rootfs;
pub mod service;
pub mod time;
pub mod view;

use std::sync::Arc;

use berth_core::{Config, Result};
use berth_proto::berth::images::v1::images_server::ImagesServer;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

pub use grpc::ImagesService;
pub use service::Images;

/// Serves berth-images on `listener` until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listener: UnixListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let images = Arc::new(Images::open(config)?);
    let recovering = images.clone();
    let metrics_images = images.clone();
    tokio::spawn(async move { recovering.recover().await });
    let (_health, health_service) = berth_core::grpc::health().await;
    let router = berth_core::grpc::server()
        .add_service(health_service)
        .add_service(
            ImagesServer::new(ImagesService::new(images))
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
        .add_service(berth_core::metrics::service(Some(metrics::collector(
            Arc::downgrade(&metrics_images),
        ))));
    berth_core::grpc::serve(router, listener, shutdown.cancelled_owned()).await
}

/// A random tag for this process's temporary names, so a restarted process can tell its own
/// leftovers from a crashed predecessor's.
pub(crate) fn nonce() -> &'static str {
    static NONCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NONCE.get_or_init(|| {
        use rand::RngCore;
        let mut b = [0u8; 4];
        rand::rng().fill_bytes(&mut b);
        hex::encode(b)
    })
}
