//! berth-network: networks, IP allocation, bridges and veths, published ports, container DNS, CNI.
//!
//! The API is declared in berth-proto; until its implementation lands every method answers
//! UNIMPLEMENTED with a message naming it.

use berth_core::grpc::{self, Unimplemented};
use berth_core::{Config, Result};
use berth_proto::berth::network::v1::networks_server::NetworksServer;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// Serves berth-network on `listener` until `shutdown` is cancelled.
pub async fn run(
    _config: Config,
    listener: UnixListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let (_health, health_service) = grpc::health().await;
    let router = grpc::server()
        .add_service(health_service)
        .add_service(Unimplemented::<NetworksServer<()>>::new());
    grpc::serve(router, listener, shutdown.cancelled_owned()).await
}
