//! The gateway's side of the metrics: every Docker API request counted and timed by method,
//! route and status, and the Prometheus endpoint (`[telemetry] metrics_addr`) that serves every
//! daemon's metrics in one text.
//!
//! One endpoint for the whole stack: a scrape asks each daemon for its text over its own socket
//! (`berth.metrics.v1.Metrics/Scrape`) at once, and merges them under a `service` label with
//! `berth_up{service}` saying who answered. Prometheus needs one target per host, as with
//! dockerd's `metrics-addr`, and the daemons open no TCP port of their own.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use berth_core::{Config, Service};

/// Decrements the in-flight gauge however the request ends.
struct InFlight;

impl InFlight {
    fn start() -> Self {
        metrics::gauge!("berth_http_requests_in_flight").increment(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("berth_http_requests_in_flight").decrement(1.0);
    }
}

/// Middleware: counts and times each request under its route pattern (`/containers/{id}/json`,
/// so container ids do not become labels; `unmatched` for paths no route has).
pub async fn record(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().as_str().to_string();
    let started = Instant::now();
    let in_flight = InFlight::start();
    let resp = next.run(req).await;
    drop(in_flight);
    let status = resp.status().as_u16().to_string();
    metrics::counter!(
        "berth_http_requests_total",
        "method" => method.clone(), "route" => route.clone(), "status" => status.clone()
    )
    .increment(1);
    metrics::histogram!(
        "berth_http_request_duration_seconds",
        "method" => method, "route" => route, "status" => status
    )
    .record(started.elapsed().as_secs_f64());
    resp
}

/// The whole stack's metrics: every daemon's and the gateway's own, merged.
pub async fn render_all(config: &Config) -> String {
    let (daemons, own) = tokio::join!(
        berth_core::metrics::scrape_daemons(config),
        berth_core::metrics::render(None)
    );
    let mut parts: Vec<(&str, Option<&str>)> = daemons
        .iter()
        .map(|(s, r)| (s.name(), r.as_deref().ok()))
        .collect();
    parts.push((Service::Gateway.name(), Some(&own)));
    berth_core::metrics::merge_services(&parts)
}

async fn metrics_handler(State(config): State<Arc<Config>>) -> Response {
    let text = render_all(&config).await;
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The router of the metrics endpoint: `GET /metrics`.
pub fn router(config: Arc<Config>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .with_state(config)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn the_endpoint_answers_with_every_service_and_who_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            state_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let resp = router(Arc::new(config))
            .oneshot(
                Request::builder()
                    .uri("/metrics")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let samples = berth_core::metrics::text::parse(&String::from_utf8_lossy(&body)).unwrap();
        let up = |s: &str| {
            samples
                .iter()
                .find(|x| x.name == "berth_up" && x.label("service") == Some(s))
                .map(|x| x.value)
        };
        // No daemon runs here: each is reported down, the gateway itself up with its process.
        for s in ["snapshotter", "images", "network", "engine"] {
            assert_eq!(up(s), Some(0.0), "{s}");
        }
        assert_eq!(up("gateway"), Some(1.0));
        assert!(
            samples
                .iter()
                .any(|x| x.name == "process_open_fds" && x.label("service") == Some("gateway"))
        );
    }
}
