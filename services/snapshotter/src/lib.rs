//! berth-snapshotter: layered filesystems behind containerd's snapshots API.
//!
//! The API is declared in berth-proto; until its implementation lands every method answers
//! UNIMPLEMENTED with a message naming it.

use berth_core::grpc::{self, Unimplemented};
use berth_core::{Config, Result};
use berth_proto::containerd::services::snapshots::v1::snapshots_server::SnapshotsServer;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// Serves berth-snapshotter on `listener` until `shutdown` is cancelled.
pub async fn run(
    _config: Config,
    listener: UnixListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let (_health, health_service) = grpc::health().await;
    let router = grpc::server()
        .add_service(health_service)
        .add_service(Unimplemented::<SnapshotsServer<()>>::new());
    grpc::serve(router, listener, shutdown.cancelled_owned()).await
}
