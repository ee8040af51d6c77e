//! berth-engine: containers, tasks through shims, volumes and the events hub.
//!
//! The API is declared in berth-proto; until its implementation lands every method answers
//! UNIMPLEMENTED with a message naming it.

use berth_core::grpc::{self, Unimplemented};
use berth_core::{Config, Result};
use berth_proto::berth::engine::v1::containers_server::ContainersServer;
use berth_proto::berth::engine::v1::tasks_server::TasksServer;
use berth_proto::berth::engine::v1::volumes_server::VolumesServer;
use berth_proto::berth::events::v1::events_server::EventsServer;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// Serves berth-engine on `listener` until `shutdown` is cancelled.
pub async fn run(
    _config: Config,
    listener: UnixListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let (_health, health_service) = grpc::health().await;
    let router = grpc::server()
        .add_service(health_service)
        .add_service(Unimplemented::<ContainersServer<()>>::new())
        .add_service(Unimplemented::<TasksServer<()>>::new())
        .add_service(Unimplemented::<VolumesServer<()>>::new())
        .add_service(Unimplemented::<EventsServer<()>>::new());
    grpc::serve(router, listener, shutdown.cancelled_owned()).await
}
