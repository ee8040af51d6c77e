//! berth-gateway: the Docker Engine API (and later the CRI) in front of berth's services.
//!
//! Stateless: every answer is read back from the services over gRPC. Routes are
//! parse → typed request → backend call → Docker-shaped response; [`app`] builds the router so
//! tests can drive it without a socket.

#![recursion_limit = "256"]

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use berth_core::uds::ListenAddr;
use berth_core::{Config, Context, Error, ErrorKind, Result};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub mod backend;
pub mod build;
pub mod commit;
pub mod containers;
pub mod errors;
pub mod exec;
pub mod grpc;
pub mod hijack;
pub mod images;
pub mod metrics;
pub mod networks;
pub mod plugins;
pub mod progress;
pub mod query;
pub mod registry;
pub mod stdcopy;
pub mod swarm;
pub mod system;
pub mod time;
pub mod tls;
pub mod versions;
pub mod volumes;

#[cfg(test)]
mod api_paths;
#[cfg(test)]
pub(crate) mod fake;

pub use backend::Backends;
pub use system::DaemonInfo;

/// The API version berth advertises.
pub const API_VERSION: &str = "1.45";
/// The oldest API version berth accepts.
pub const MIN_API_VERSION: &str = "1.24";

/// The API version a request was made at: its `/v1.NN` prefix, or [`API_VERSION`] without one.
/// [`strip_version`] puts it in the request's extensions; handlers take it as an extractor and
/// pass it to the one function per resource that shapes answers for older clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiVersion(pub u32, pub u32);

impl ApiVersion {
    /// The version berth advertises ([`API_VERSION`]).
    pub const CURRENT: Self = Self(1, 45);
    /// The oldest version berth accepts ([`MIN_API_VERSION`]).
    pub const MIN: Self = Self(1, 24);

    /// `"1.41"` → `ApiVersion(1, 41)`.
    pub fn parse(v: &str) -> Option<Self> {
        let (a, b) = v.split_once('.')?;
        Some(Self(a.parse().ok()?, b.parse().ok()?))
    }

    /// Whether the request was made at a version older than `major.minor`.
    pub fn before(self, major: u32, minor: u32) -> bool {
        self < Self(major, minor)
    }
}

impl Default for ApiVersion {
    fn default() -> Self {
        Self::CURRENT
    }
}

impl std::fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ApiVersion {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _: &S,
    ) -> std::result::Result<Self, Self::Rejection> {
        Ok(parts.extensions.get::<Self>().copied().unwrap_or_default())
    }
}

/// What the handlers share: the backends and what the config says about the daemon.
#[derive(Debug, Clone)]
pub struct AppState {
    backends: Backends,
    info: Arc<DaemonInfo>,
}

impl AppState {
    /// State for a stack configured by `config`: gRPC backends to its services.
    pub fn new(config: &Config) -> Self {
        Self::with_backends(grpc::backends(config), DaemonInfo::from_config(config))
    }

    /// State with the given backends (tests use fakes).
    pub fn with_backends(backends: Backends, info: DaemonInfo) -> Self {
        Self {
            backends,
            info: Arc::new(info),
        }
    }
}

/// A Docker API error: `{"message": …}` with the status its kind maps to.
#[derive(Debug)]
pub struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        Self(err)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "message": self.0.chain() });
        (self.0.kind().http_status(), axum::Json(body)).into_response()
    }
}

/// `value` as a JSON response with `status`.
pub fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    (status, axum::Json(value)).into_response()
}

/// The Docker API router.
pub fn app(state: AppState) -> Router {
    Router::new()
        .merge(system::routes())
        .merge(containers::routes())
        .merge(exec::routes())
        .merge(images::routes())
        .merge(volumes::routes())
        .merge(networks::routes())
        .merge(swarm::routes())
        .merge(plugins::routes())
        .merge(build::routes())
        .route("/commit", post(commit::commit))
        .route("/session", post(no_buildkit))
        .route("/grpc", post(no_buildkit))
        .fallback(not_implemented)
        .layer(middleware::from_fn(metrics::record))
        .layer(middleware::from_fn(docker_headers))
        .with_state(state)
}

/// `router` behind the version-prefix handling. The layer sits outside the router so that
/// routing sees the path without its `/v1.NN` prefix.
pub fn versioned(
    router: Router,
) -> impl tower::Service<
    Request,
    Response = Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    tower::Layer::layer(&middleware::from_fn(strip_version), router)
}

/// Strips the `/v1.NN` prefix after checking the version, so routes are written once, and
/// records the version as an [`ApiVersion`] extension (none = the current one).
/// Applied outside the router because routing must see the rewritten path.
async fn strip_version(mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let mut requested = ApiVersion::CURRENT;
    if let Some(rest) = path.strip_prefix("/v") {
        let (version, tail) = rest.split_once('/').unwrap_or((rest, ""));
        if version.split_once('.').is_some_and(|(a, b)| {
            !a.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        }) {
            match check_version(version) {
                Ok(v) => requested = v,
                Err(err) => return ApiError(err).into_response(),
            }
            let new_path = format!("/{tail}");
            let pq = match req.uri().query() {
                Some(q) => format!("{new_path}?{q}"),
                None => new_path,
            };
            if let Ok(uri) = pq.parse::<Uri>() {
                *req.uri_mut() = uri;
            }
        }
    }
    let shaped = shape_for_client(requested, req.headers());
    req.extensions_mut().insert(shaped);
    next.run(req).await
}

/// The version whose answers a client gets. docker-compose 1.x (on docker-py 5) asks for the
/// server's newest version, yet was written against API 1.41 and reads fields that 1.45 no
/// longer sends (image inspect's `ContainerConfig`, to recreate a changed service): it gets
/// answers shaped as 1.44, the newest version that still has them. Every other client gets the
/// version it asked for.
fn shape_for_client(requested: ApiVersion, headers: &HeaderMap) -> ApiVersion {
    let compose_v1 = headers
        .get(header::USER_AGENT)
        .and_then(|ua| ua.to_str().ok())
        .is_some_and(|ua| ua.starts_with("docker-compose/1."));
    if compose_v1 && !requested.before(1, 45) {
        ApiVersion(1, 44)
    } else {
        requested
    }
}

/// The version `v` names, when berth serves it.
fn check_version(v: &str) -> Result<ApiVersion> {
    // Digits too many to be a number are no version berth knows: "too old", as before.
    let want = ApiVersion::parse(v).unwrap_or(ApiVersion(0, 0));
    if want > ApiVersion::CURRENT {
        return Err(Error::invalid_argument(format!(
            "client version {v} is too new. Maximum supported API version is {API_VERSION}"
        )));
    }
    if want < ApiVersion::MIN {
        return Err(Error::invalid_argument(format!(
            "client version {v} is too old. Minimum supported API version is {MIN_API_VERSION}, \
             please upgrade your client to a newer version"
        )));
    }
    Ok(want)
}

/// Every response carries Docker's identification headers; every request runs in a span that
/// continues the caller's trace.
async fn docker_headers(req: Request, next: Next) -> Response {
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format!("{} {}", req.method(), req.uri().path()),
        otel.kind = "server",
        http.method = %req.method(),
        http.path = %req.uri().path(),
    );
    berth_core::telemetry::set_remote_parent(&span, req.headers());
    let mut resp = next.run(req).instrument(span).await;
    let headers = resp.headers_mut();
    headers.insert("api-version", HeaderValue::from_static(API_VERSION));
    headers.insert("docker-experimental", HeaderValue::from_static("false"));
    headers.insert("ostype", HeaderValue::from_static("linux"));
    headers.insert(
        "server",
        HeaderValue::from_static(concat!("berth/", env!("CARGO_PKG_VERSION"), " (linux)")),
    );
    resp
}

/// The architecture as Docker names it (Go's GOARCH).
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// `/session` and `/grpc` carry BuildKit's sessions; berth has no BuildKit to hand them to.
async fn no_buildkit(uri: Uri) -> ApiError {
    ApiError(Error::new(
        ErrorKind::Unimplemented,
        format!(
            "berth has no BuildKit builder, so there is no build session to open at {}",
            uri.path()
        ),
    ))
}

/// A path the API does not have: dockerd's 404. Every path of the advertised version is
/// routed (docs/docker-api-paths.md), so this is a client error, not a missing feature.
async fn not_implemented() -> ApiError {
    ApiError(Error::new(ErrorKind::NotFound, "page not found"))
}

/// The 501 for `method path`, which berth does not serve (yet).
pub(crate) fn not_routed(method: &Method, path: &str) -> ApiError {
    ApiError(Error::new(
        ErrorKind::Unimplemented,
        format!("{method} {path} is not implemented by berth yet"),
    ))
}

/// Serves the Docker API on every host in `config` until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let state = AppState::new(&config);
    tokio::spawn(remove_interrupted_builds(
        state.backends.clone(),
        shutdown.clone(),
    ));
    let service = versioned(app(state));
    // The CRI socket is bound before the Docker API's, so it is up once `GET /version` (what
    // `berth up` waits for) answers.
    let cri = if config.cri.enabled {
        let path = config.cri_socket();
        let listener = berth_core::uds::bind(&path, 0o660, config.socket_group.as_deref()).await?;
        tracing::info!(socket = %path.display(), "serving the Kubernetes CRI");
        let cri_config = config.clone();
        let stop = shutdown.clone();
        let failed = shutdown.clone();
        Some(tokio::spawn(async move {
            let result = berth_cri::serve(&cri_config, listener, stop.cancelled_owned()).await;
            if let Err(err) = &result {
                tracing::error!(error = %err.chain(), "CRI server failed");
                failed.cancel();
            }
            result
        }))
    } else {
        None
    };
    let mut servers = tokio::task::JoinSet::new();
    let mut sockets = Vec::new();
    for host in config.gateway_hosts() {
        // The connection's socket reaches hijacked streams (see `hijack`).
        let svc = axum::ServiceExt::<Request>::into_make_service_with_connect_info::<hijack::Peer>(
            service.clone(),
        );
        let stop = shutdown.clone().cancelled_owned();
        match ListenAddr::parse(&host)? {
            ListenAddr::Unix(path) => {
                let listener =
                    berth_core::uds::bind(&path, 0o660, config.socket_group.as_deref()).await?;
                tracing::info!(socket = %path.display(), "serving the Docker API");
                sockets.push(path);
                servers.spawn(async move {
                    axum::serve(listener, svc)
                        .with_graceful_shutdown(stop)
                        .await
                });
            }
            ListenAddr::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(&addr)
                    .await
                    .context(ErrorKind::Unavailable, format!("bind {addr}"))?;
                if config.gateway.tls || config.gateway.tlsverify {
                    let tls =
                        tls::TlsListener::new(listener, tls::server_config(&config.gateway)?)?;
                    tracing::info!(
                        %addr,
                        verify_clients = config.gateway.tlsverify,
                        "serving the Docker API over TLS"
                    );
                    servers.spawn(async move {
                        axum::serve(tls, svc).with_graceful_shutdown(stop).await
                    });
                } else {
                    tracing::warn!(
                        %addr,
                        "serving the Docker API on plain TCP without TLS: anyone who reaches it controls this host"
                    );
                    servers.spawn(async move {
                        axum::serve(listener, svc)
                            .with_graceful_shutdown(stop)
                            .await
                    });
                }
            }
        }
    }
    if let Some(addr) = config.telemetry.metrics_socket_addr()? {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .context(ErrorKind::Unavailable, format!("bind metrics {addr}"))?;
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
        let router = metrics::router(Arc::new(config.clone()));
        let stop = shutdown.clone().cancelled_owned();
        servers.spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop)
                .await
        });
    }
    berth_core::daemon::notify_ready();
    let mut result = Ok(());
    while let Some(done) = servers.join_next().await {
        if let Ok(Err(err)) = done {
            tracing::error!(error = %err, "Docker API listener failed");
            result = Err(Error::internal("Docker API listener failed").with_source(err));
            shutdown.cancel();
        }
    }
    for path in sockets {
        let _ = std::fs::remove_file(path);
    }
    if let Some(cri) = cri {
        shutdown.cancel();
        match cri.await {
            Ok(Err(err)) if result.is_ok() => result = Err(err),
            Err(err) if result.is_ok() => {
                result = Err(Error::internal("CRI server panicked").with_source(err));
            }
            _ => {}
        }
    }
    result
}

/// Removes what builds cut short by an earlier gateway process left (`build::orphans`), once
/// the engine answers.
async fn remove_interrupted_builds(backends: Backends, shutdown: CancellationToken) {
    for _ in 0..30 {
        match build::orphans::remove_orphans(&backends).await {
            Ok(_) => return,
            Err(e) if e.is(ErrorKind::Unavailable) => {}
            Err(e) => {
                tracing::warn!(error = %e.chain(), "look for interrupted builds' containers");
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::HeaderMap;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    fn test_app(
        dir: &std::path::Path,
    ) -> impl tower::Service<
        Request,
        Response = Response,
        Error = std::convert::Infallible,
        Future = impl Send,
    > + Clone {
        let cfg = Config {
            state_dir: dir.to_path_buf(),
            ..Default::default()
        };
        versioned(app(AppState::new(&cfg)))
    }

    async fn call(
        dir: &std::path::Path,
        method: &str,
        uri: &str,
    ) -> (StatusCode, HeaderMap, String) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        let resp = test_app(dir).oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn version_prefixes_are_accepted_within_range() {
        let dir = tempfile::tempdir().unwrap();
        for uri in [
            "/version",
            "/v1.45/version",
            "/v1.24/version",
            "/v1.41/version",
        ] {
            let (status, headers, body) = call(dir.path(), "GET", uri).await;
            assert_eq!(status, StatusCode::OK, "{uri}");
            assert_eq!(headers["api-version"], "1.45");
            assert_eq!(headers["ostype"], "linux");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["ApiVersion"], "1.45");
            assert_eq!(v["MinAPIVersion"], "1.24");
        }
        let (status, _, body) = call(dir.path(), "GET", "/v1.50/version").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("client version 1.50 is too new"), "{body}");
        let (status, _, body) = call(dir.path(), "GET", "/v1.12/version").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body.contains("Minimum supported API version is 1.24"),
            "{body}"
        );
    }

    #[test]
    fn api_versions_match_the_advertised_strings() {
        assert_eq!(ApiVersion::CURRENT.to_string(), API_VERSION);
        assert_eq!(ApiVersion::MIN.to_string(), MIN_API_VERSION);
        assert_eq!(ApiVersion::parse("1.41"), Some(ApiVersion(1, 41)));
        assert!(ApiVersion(1, 41).before(1, 45) && !ApiVersion(1, 45).before(1, 45));
        assert!(check_version("1.99999999999").is_err());
    }

    #[test]
    fn docker_compose_v1_gets_answers_shaped_as_1_44() {
        let mut h = HeaderMap::new();
        assert_eq!(
            shape_for_client(ApiVersion::CURRENT, &h),
            ApiVersion::CURRENT
        );
        h.insert(
            "user-agent",
            "docker-compose/1.29.2 docker-py/5.0.3 Linux/6.1"
                .parse()
                .unwrap(),
        );
        assert_eq!(shape_for_client(ApiVersion::CURRENT, &h), ApiVersion(1, 44));
        assert_eq!(shape_for_client(ApiVersion(1, 38), &h), ApiVersion(1, 38));
        h.insert("user-agent", "docker-compose/2.29.0".parse().unwrap());
        assert_eq!(
            shape_for_client(ApiVersion::CURRENT, &h),
            ApiVersion::CURRENT
        );
    }

    #[tokio::test]
    async fn ping_without_an_engine_is_unavailable_and_head_has_no_body() {
        let dir = tempfile::tempdir().unwrap();
        let (status, headers, body) = call(dir.path(), "GET", "/_ping").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers["api-version"], "1.45");
        assert_eq!(body, "engine unavailable");
        let (_, _, body) = call(dir.path(), "HEAD", "/v1.45/_ping").await;
        assert!(body.is_empty());
    }

    #[tokio::test]
    async fn unbuilt_endpoints_get_a_json_501_and_unknown_paths_a_404() {
        let dir = tempfile::tempdir().unwrap();
        let (status, headers, body) = call(dir.path(), "POST", "/v1.45/session").await;
        assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
        assert_eq!(headers["content-type"], "application/json");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["message"],
            "berth has no BuildKit builder, so there is no build session to open at /session"
        );
        let (status, _, body) = call(dir.path(), "GET", "/v1.45/no/such/path").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["message"], "page not found");
    }
}
