//! berth-images: content store, registry pull and push, unpack into snapshots, import and export.
//!
//! The API is declared in berth-proto; until its implementation lands every method answers
//! UNIMPLEMENTED with a message naming it.

use berth_core::grpc::{self, Unimplemented};
use berth_core::{Config, Result};
use berth_proto::berth::images::v1::images_server::ImagesServer;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// Serves berth-images on `listener` until `shutdown` is cancelled.
pub async fn run(
    _config: Config,
    listener: UnixListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let (_health, health_service) = grpc::health().await;
    let router = grpc::server()
        .add_service(health_service)
        .add_service(Unimplemented::<ImagesServer<()>>::new());
    grpc::serve(router, listener, shutdown.cancelled_owned()).await
}
