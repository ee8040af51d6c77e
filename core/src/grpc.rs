//! gRPC serving helpers shared by every daemon: the server builder with trace propagation,
//! `grpc.health.v1`, and a placeholder for APIs whose implementation has not landed yet.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::path::Path;
use std::task::{Context as TaskContext, Poll};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::server::NamedService;
use tonic::transport::Server;

use crate::error::{Context, ErrorKind, Result};

pub use tonic_health::ServingStatus;
pub use tonic_health::server::HealthReporter;

/// The layers [`server`] puts around every route.
pub type Layers = tower::layer::util::Stack<
    crate::deadline::DeadlineLayer,
    tower::layer::util::Stack<crate::metrics::GrpcMetricsLayer, tower::layer::util::Identity>,
>;

/// A router built from [`server`].
pub type Router = tonic::transport::server::Router<Layers>;

/// A server builder whose requests run in spans parented to the caller's trace and are counted
/// and timed in the process's metrics ([`crate::metrics::GrpcMetricsLayer`]).
pub fn server() -> Server<Layers> {
    Server::builder()
        .trace_fn(crate::telemetry::server_span)
        .layer(crate::metrics::GrpcMetricsLayer)
        .layer(crate::deadline::DeadlineLayer)
}

/// The `grpc.health.v1` service and its reporter. The overall status (service "") starts as
/// SERVING; report per-service status with the reporter.
pub async fn health() -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    (reporter, service)
}

/// Serves `router` on `listener` until `shutdown` completes, then removes the socket file.
pub async fn serve(
    router: Router,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    let result = router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context(ErrorKind::Internal, "grpc server");
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Asks the health service on `socket` for the overall status.
pub async fn check_health(socket: &Path) -> Result<ServingStatus> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    let mut client =
        tonic_health::pb::health_client::HealthClient::new(crate::uds::channel(socket));
    let resp = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(crate::Error::from)?;
    Ok(match resp.into_inner().status() {
        Wire::Serving => ServingStatus::Serving,
        Wire::NotServing => ServingStatus::NotServing,
        Wire::Unknown | Wire::ServiceUnknown => ServingStatus::Unknown,
    })
}

/// Answers every method of the gRPC service `S` with UNIMPLEMENTED and a message naming the
/// method, for APIs declared in berth-proto whose implementation has not landed yet.
///
/// `S` is the generated server type, e.g. `ImagesServer<()>`; only its name is used.
#[derive(Debug)]
pub struct Unimplemented<S>(PhantomData<fn() -> S>);

impl<S> Unimplemented<S> {
    /// A new placeholder.
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<S> Default for Unimplemented<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Clone for Unimplemented<S> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<S: NamedService> NamedService for Unimplemented<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for Unimplemented<S> {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().trim_start_matches('/').replace('/', ".");
        let status = tonic::Status::unimplemented(format!("{method} is not implemented yet"));
        std::future::ready(Ok(status.into_http()))
    }
}

#[cfg(test)]
mod tests {
    use berth_proto::berth::images::v1::images_client::ImagesClient;
    use berth_proto::berth::images::v1::images_server::ImagesServer;

    use super::*;
    use crate::ErrorKind;

    #[tokio::test]
    async fn unimplemented_apis_name_the_method_and_health_answers() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("t.sock");
        let listener = crate::uds::bind(&sock, 0o600, None).await.unwrap();
        let (_reporter, health) = health().await;
        let router = server()
            .add_service(health)
            .add_service(Unimplemented::<ImagesServer<()>>::new());
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(serve(router, listener, stop.clone().cancelled_owned()));

        assert_eq!(check_health(&sock).await.unwrap(), ServingStatus::Serving);
        let mut client = ImagesClient::new(crate::uds::channel(&sock));
        let status = client
            .get(berth_proto::berth::images::v1::GetImageRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert_eq!(
            status.message(),
            "berth.images.v1.Images.Get is not implemented yet"
        );

        stop.cancel();
        task.await.unwrap().unwrap();
        assert!(!sock.exists(), "socket removed on shutdown");
        let err = check_health(&sock).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{}", err.chain());
        assert!(err.chain().contains("t.sock"), "{}", err.chain());
    }
}
