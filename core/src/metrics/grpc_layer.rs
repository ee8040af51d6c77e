//! A tower layer counting and timing every gRPC call a daemon serves, by method and status code.
//!
//! The status is the `grpc-status` of the response head: tonic puts it there for every error a
//! handler returns and for unary successes it comes in the trailers, so a head without one is
//! `OK`. An error a stream reports later, in its trailers, is not seen. The latency is the time
//! to the response head: the whole call for unary methods, the set-up for streams.

use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use tower::{Layer, Service};

/// Adds [`GrpcMetrics`] around a server's routes.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

pub(super) fn describe() {
    metrics::describe_counter!(
        "berth_grpc_requests_total",
        "gRPC calls served, by method and status code."
    );
    metrics::describe_histogram!(
        "berth_grpc_request_duration_seconds",
        metrics::Unit::Seconds,
        "gRPC call latency to the response head, by method and status code."
    );
    metrics::describe_gauge!("berth_grpc_requests_in_flight", "gRPC calls being handled.");
}

/// Decrements the in-flight gauge however the call ends (a cancelled call drops its future).
struct InFlight;

impl InFlight {
    fn start() -> Self {
        metrics::gauge!("berth_grpc_requests_in_flight").increment(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("berth_grpc_requests_in_flight").decrement(1.0);
    }
}

/// The name gRPC gives status `code` (as grpc-go and the Prometheus interceptors spell it).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

impl<S, B, R> Service<http::Request<B>> for GrpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_string();
        let started = Instant::now();
        let in_flight = InFlight::start();
        let call = self.inner.call(req);
        Box::pin(async move {
            let result = call.await;
            drop(in_flight);
            let code = match &result {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(|c| code_name(tonic::Code::from_i32(c)))
                    .unwrap_or("OK"),
                Err(_) => "Unknown",
            };
            metrics::counter!("berth_grpc_requests_total", "method" => method.clone(), "code" => code)
                .increment(1);
            metrics::histogram!("berth_grpc_request_duration_seconds", "method" => method, "code" => code)
                .record(started.elapsed().as_secs_f64());
            result
        })
    }
}
