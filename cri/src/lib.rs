//! The Kubernetes Container Runtime Interface (`runtime.v1`) in front of berth's services.
//!
//! Hosted by berth-gateway on `<state_dir>/cri.sock`. Like the Docker API beside it, it keeps
//! no state of its own that matters: every answer is read from the images, engine, network and
//! snapshotter services, so a `kill -9` of the gateway loses nothing. The one thing kubelet
//! tells the runtime (`UpdateRuntimeConfig`'s pod CIDR) is kept in the state directory.

pub mod backend;
mod containers;
mod convert;
mod events;
mod image;
mod pods;
mod runtime;
mod stats;
pub mod streaming;

use std::path::PathBuf;
use std::sync::Arc;

use berth_core::{Config, Result, Service};
use berth_proto::cri::runtime::v1::image_service_server::ImageServiceServer;
use berth_proto::cri::runtime::v1::runtime_service_server::RuntimeServiceServer;
use tokio::net::UnixListener;

pub use image::CriImages;
pub use runtime::CriRuntime;

/// The largest message either side sends: kubelet's own limit (16 MiB).
const MAX_MESSAGE: usize = 16 << 20;

/// Where the pieces of a berth stack are, for the CRI servers.
#[derive(Debug, Clone)]
pub struct Sockets {
    pub images: PathBuf,
    pub engine: PathBuf,
    pub network: PathBuf,
    pub snapshotter: PathBuf,
}

impl Sockets {
    /// The sockets `config` puts the services on.
    pub fn from_config(config: &Config) -> Self {
        Self {
            images: config.socket(Service::Images),
            engine: config.socket(Service::Engine),
            network: config.socket(Service::Network),
            snapshotter: config.snapshotter_address(),
        }
    }
}

/// Serves the RuntimeService and ImageService on `listener` until `shutdown` completes; the
/// socket file is removed on the way out.
pub async fn serve(
    config: &Config,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let sockets = Sockets::from_config(config);
    let stream_listener = streaming::bind(&config.cri.stream_address).await?;
    let stream_addr = stream_listener
        .local_addr()
        .map_err(|e| berth_core::Error::internal(format!("cri stream address: {e}")))?;
    let streams = streaming::StreamServer::new(
        stream_addr,
        Arc::new(streaming::backend::EngineSessions::new(&sockets.engine)),
    );
    tracing::info!(address = %stream_addr, "cri streaming server listening");
    let stop = tokio_util::sync::CancellationToken::new();
    let stream_task = tokio::spawn(streaming::serve(
        streams.clone(),
        stream_listener,
        stop.clone().cancelled_owned(),
    ));
    let runtime = CriRuntime::new(config, &sockets).with_streaming(streams);
    let router = berth_core::grpc::server()
        .add_service(
            RuntimeServiceServer::new(runtime)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            ImageServiceServer::new(CriImages::new(config, &sockets))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        );
    let result = berth_core::grpc::serve(router, listener, shutdown).await;
    stop.cancel();
    // Sessions in progress (upgraded connections) are not waited for.
    stream_task.abort();
    result
}
