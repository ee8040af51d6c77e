//! berth-engine: containers, tasks through shims, volumes and the events hub.
//!
//! [`run`] wires the real seams (the other services over gRPC, `berth-shim` processes, network
//! namespace files), reconciles the records with the shims that survived, and serves
//! `berth.engine.v1` (Containers, Tasks, Volumes, Sandboxes) and `berth.events.v1` (Events). See
//! `docs/engine.md`.

pub mod deps;
pub mod engine;
pub mod events;
pub mod filters;
pub mod grpc;
pub mod host;
pub mod hostfiles;
pub mod imageconfig;
pub mod links;
pub mod logs;
pub mod metrics;
pub mod names;
pub mod podns;
pub mod record;
pub mod remote;
pub mod restart;
pub mod rootfs;
pub mod sandbox;
pub mod signal;
pub mod spec;
pub mod store;
pub mod user;
pub mod volumes;

use std::sync::Arc;

use berth_core::snapshots::RemoteSnapshotter;
use berth_core::{Config, Error, Result, Service};
use berth_proto::berth::engine::v1::containers_server::ContainersServer;
use berth_proto::berth::engine::v1::sandboxes_server::SandboxesServer;
use berth_proto::berth::engine::v1::tasks_server::TasksServer;
use berth_proto::berth::engine::v1::volumes_server::VolumesServer;
use berth_proto::berth::events::v1::events_server::EventsServer;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::deps::Deps;
use crate::engine::Engine;

/// Largest gRPC message the engine accepts or sends (archives and logs come in chunks).
const MAX_MESSAGE: usize = 64 << 20;

/// The seams of a real engine for `config`.
pub fn real_deps(config: &Config) -> Deps {
    let default_name = config.engine.default_runtime();
    let default_runtime = config
        .engine
        .runtimes
        .get(&default_name)
        .map(|r| r.path.clone())
        .unwrap_or_else(|| default_name.clone());
    Deps {
        images: Arc::new(remote::RemoteImages::new(config.socket(Service::Images))),
        snapshots: Arc::new(remote::RemoteSnapshots(RemoteSnapshotter::from_config(
            config,
        ))),
        networks: Arc::new(remote::RemoteNetworks::new(config.socket(Service::Network))),
        netns: Arc::new(host::HostNetns::new(config.state_dir.join("netns"))),
        shims: Arc::new(host::ShimProcesses {
            binary: host::ShimProcesses::binary_for(config),
            state_dir: config.state_dir.clone(),
            bundles: config.state_dir.join("bundles"),
            events_address: format!("unix://{}", config.socket(Service::Engine).display()),
            runtime: default_runtime,
            runtime_root: config.state_dir.join("runtime").join(&default_name),
            log_buffer_bytes: config.shim.log_buffer_bytes,
            exec: config.shim.exec.clone(),
            otlp_endpoint: config.telemetry.otlp_endpoint.clone(),
        }),
        pod_ns: Arc::new(podns::HostPodNamespaces::new()),
    }
}

/// Serves berth-engine on `listener` until `shutdown` is cancelled. Containers keep running
/// when the engine stops.
pub async fn run(
    config: Config,
    listener: UnixListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let deps = real_deps(&config);
    let map_config = config.clone();
    let host = tokio::task::spawn_blocking(move || -> Result<spec::HostInfo> {
        let mut host = host::detect_host();
        host.id_map = map_config.container_id_map()?;
        Ok(host)
    })
    .await
    .map_err(|e| Error::internal("detect host features").with_source(e))??;
    if let Some(m) = &host.id_map {
        let (uid, gid) = m.root();
        tracing::info!(
            uid,
            gid,
            "containers run in user namespaces: root is mapped to {uid}:{gid}"
        );
    }
    let engine = Engine::open(config, deps, host)?;
    serve(engine, listener, shutdown).await
}

/// Reconciles `engine` with its shims, then serves it.
pub async fn serve(
    engine: Arc<Engine>,
    listener: UnixListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let recovery = engine.recover().await?;
    tracing::info!(
        reconnected = recovery.reconnected,
        exited = recovery.exited,
        took_ms = recovery.took.as_millis() as u64,
        "engine ready"
    );
    let (_health, health_service) = berth_core::grpc::health().await;
    let router = berth_core::grpc::server()
        .add_service(health_service)
        .add_service(
            ContainersServer::new(grpc::Containers(engine.clone()))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            TasksServer::new(grpc::Tasks(engine.clone()))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(VolumesServer::new(grpc::Volumes(engine.clone())))
        .add_service(SandboxesServer::new(grpc::Sandboxes(engine.clone())))
        .add_service(EventsServer::new(grpc::Events(engine.clone())))
        .add_service(berth_core::metrics::service(Some(metrics::collector(
            Arc::downgrade(&engine),
        ))));
    let stop = engine.shutdown.clone();
    let result = berth_core::grpc::serve(router, listener, async move {
        shutdown.cancelled().await;
        stop.cancel();
    })
    .await;
    engine.shutdown.cancel();
    result
}
