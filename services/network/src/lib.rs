//! berth-network: networks, IP allocation, bridges and veths, published ports, container DNS,
//! CNI.
//!
//! Docker networks are built in-process: bridges, veths, addresses and routes over rtnetlink
//! ([`netlink`]), published ports and isolation as iptables rules in berth's own chains
//! ([`rules`], [`iptables`]), names served by a resolver per network ([`dns`]), addresses from
//! berth's own allocator ([`ipam`], [`ports`]) with every record in redb ([`store`]). The CNI
//! reference plugins run only for raw CNI configs, the orchestrator path ([`cni`]).
//!
//! What keeps containers reachable lives in the kernel, so `kill -9` of this process leaves
//! every published port answering; at start the records are replayed against the kernel
//! ([`service`]).

pub mod cni;
pub mod convert;
pub mod dns;
pub mod events;
pub mod grpc;
pub mod host;
pub mod ipam;
pub mod iptables;
pub mod kernel;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod ports;
pub mod rootless;
pub mod rules;
pub mod service;
pub mod store;

use std::sync::Arc;

use berth_core::grpc as core_grpc;
use berth_core::{Config, Error, Result, Service};
use berth_proto::berth::network::v1::networks_server::NetworksServer;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::service::{Deps, NetworkService, Settings};

/// Serves berth-network on `listener` until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listener: UnixListener,
    shutdown: CancellationToken,
) -> Result<()> {
    run_with(config, listener, shutdown, None).await
}

/// [`run`], rootless: `host_net` makes the host's sockets (see [`rootless::enter`]), and the
/// calling process already works in the stack's network namespace.
pub async fn run_with(
    config: Config,
    listener: UnixListener,
    shutdown: CancellationToken,
    host_net: Option<rootless::HostNet>,
) -> Result<()> {
    let settings = Settings::from_config(&config)?;
    let events = events::HubEvents::start(config.socket(Service::Engine), shutdown.clone());
    let (host, proxy): (Arc<dyn kernel::Host>, Arc<dyn kernel::PortProxy>) = match host_net {
        Some(net) => (
            Arc::new(rootless::RootlessHost {
                inner: host::RealHost::default(),
                net: net.clone(),
            }),
            Arc::new(rootless::HostProxy::new(
                net,
                tokio::runtime::Handle::current(),
            )),
        ),
        None => (
            Arc::new(host::RealHost::default()),
            Arc::new(kernel::NoProxy),
        ),
    };
    let deps = Deps {
        dataplane: Arc::new(netlink::Netlink),
        firewall: Arc::new(iptables::Iptables::default()),
        host,
        proxy,
        cni: Arc::new(cni::ExecPlugins {
            bin_dirs: settings.cni_bin_dirs.clone(),
        }),
        events: Arc::new(events),
    };
    let runtime = tokio::runtime::Handle::current();
    let service =
        tokio::task::spawn_blocking(move || NetworkService::open(settings, deps, Some(runtime)))
            .await
            .map_err(|e| Error::internal(format!("network start-up task failed: {e}")))??;
    let service = Arc::new(service);
    tracing::info!(chains = service.chains().prefix(), "network state restored");
    let (_health, health_service) = core_grpc::health().await;
    let router = core_grpc::server()
        .add_service(health_service)
        .add_service(berth_core::metrics::service(Some(metrics::collector(
            Arc::downgrade(&service),
        ))))
        .add_service(NetworksServer::new(grpc::NetworksApi::new(service)));
    core_grpc::serve(router, listener, shutdown.cancelled_owned()).await
}
