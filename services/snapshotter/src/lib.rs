//! berth-snapshotter: layered filesystems behind containerd's snapshots API.
//!
//! [`LocalSnapshotter`] implements berth-core's [`Snapshotter`](berth_core::snapshots::Snapshotter)
//! trait with two drivers ([`Driver::Overlayfs`], the default, and [`Driver::Native`]);
//! [`run`] serves it as `containerd.services.snapshots.v1.Snapshots` through berth-core's
//! generic [`SnapshotsService`], so containerd can use it as a proxy plugin and berth uses it
//! through [`RemoteSnapshotter`](berth_core::snapshots::RemoteSnapshotter) like any other.
//! [`conformance`] is the suite every snapshotter (these backends and the gRPC proxy) passes.

pub mod conformance;
mod filter;
mod fsutil;
mod local;
mod metrics;
mod store;

use berth_core::snapshots::SnapshotsService;
use berth_core::{Config, Result, Service, grpc};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use local::{Driver, LocalSnapshotter};

/// Serves berth-snapshotter on `listener` until `shutdown` is cancelled.
///
/// The driver is `[snapshotter] driver`. When that names a `[proxy_plugins]` entry instead, the
/// rest of berth uses that external snapshotter and this process (if it runs at all) serves
/// the default overlayfs driver.
pub async fn run(
    config: Config,
    listener: UnixListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let driver = match Driver::from_name(&config.snapshotter.driver) {
        Some(driver) => driver,
        None => {
            warn!(
                driver = %config.snapshotter.driver,
                "snapshotter.driver names a proxy plugin; berth uses that one, this process serves overlayfs"
            );
            Driver::Overlayfs
        }
    };
    let data_dir = config.data_dir(Service::Snapshotter);
    let snapshotter = {
        let data_dir = data_dir.clone();
        tokio::task::spawn_blocking(move || LocalSnapshotter::open(&data_dir, driver))
            .await
            .map_err(|e| berth_core::Error::internal("open snapshotter").with_source(e))??
    };
    // Nothing is in flight at start, so whatever a crash left behind can go now.
    let removed = snapshotter.cleanup_count().await?;
    info!(driver = driver.name(), root = %snapshotter.root().display(), removed, "snapshotter ready");

    let (_health, health_service) = grpc::health().await;
    let router = grpc::server()
        .add_service(health_service)
        .add_service(berth_core::metrics::service(Some(metrics::collector(
            snapshotter.clone(),
        ))))
        .add_service(SnapshotsService::new(snapshotter).into_server());
    grpc::serve(router, listener, shutdown.cancelled_owned()).await
}
