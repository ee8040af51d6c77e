//! The CRI streaming server: where kubelet (or crictl) connects for Exec, Attach and
//! PortForward. The RuntimeService answers those calls with a URL on this server holding a
//! single-use token; the client then upgrades an HTTP request on that URL to SPDY/3.1
//! (`X-Stream-Protocol-Version`) or to a websocket (`Sec-WebSocket-Protocol`) and speaks
//! Kubernetes' stream protocols over it.

pub mod backend;
pub mod conn;
pub mod portforward;
pub mod remotecommand;
pub mod spdy;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use base64::Engine as _;
use berth_core::{Error, ErrorKind, Result};
use http::{HeaderValue, StatusCode, header};
use hyper_util::rt::TokioIo;

use self::backend::{ExecSpec, SessionBackend};
use self::remotecommand::{Session, WsProtocol};

/// How long a URL stays usable (kubelet's `StreamIdleTimeout`-independent token TTL).
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Outstanding URLs at most (kubelet's `maxInFlight`).
const MAX_IN_FLIGHT: usize = 1000;

/// What a token stands for.
#[derive(Debug, Clone)]
pub enum Pending {
    Exec(ExecSpec),
    Attach(ExecSpec),
    /// Forwarding into the network namespace at this path; the ports the request named (what
    /// a websocket client forwards; a SPDY client names its port per stream).
    PortForward(PathBuf, Vec<u16>),
}

impl Pending {
    fn path(&self) -> &'static str {
        match self {
            Pending::Exec(_) => "exec",
            Pending::Attach(_) => "attach",
            Pending::PortForward(..) => "portforward",
        }
    }
}

/// Single-use tokens that expire.
#[derive(Debug, Default)]
struct Tokens {
    map: HashMap<String, (Pending, Instant)>,
}

impl Tokens {
    fn insert(&mut self, pending: Pending, now: Instant) -> Result<String> {
        self.map
            .retain(|_, (_, at)| now.duration_since(*at) < TOKEN_TTL);
        if self.map.len() >= MAX_IN_FLIGHT {
            return Err(Error::resource_exhausted(
                "too many streaming requests in flight",
            ));
        }
        loop {
            let token =
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 8]>());
            if !self.map.contains_key(&token) {
                self.map.insert(token.clone(), (pending, now));
                return Ok(token);
            }
        }
    }

    /// The request of `token` if it is live; it is gone afterwards either way.
    fn take(&mut self, token: &str, now: Instant) -> Option<Pending> {
        let (pending, at) = self.map.remove(token)?;
        (now.duration_since(at) < TOKEN_TTL).then_some(pending)
    }
}

/// The streaming server's shared state; cheap to clone.
#[derive(Clone)]
pub struct StreamServer {
    base: String,
    tokens: Arc<Mutex<Tokens>>,
    backend: Arc<dyn SessionBackend>,
}

impl std::fmt::Debug for StreamServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamServer")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl StreamServer {
    /// A server reachable at `addr` (where its listener is bound).
    pub fn new(addr: SocketAddr, backend: Arc<dyn SessionBackend>) -> Self {
        Self {
            base: format!("http://{addr}"),
            tokens: Arc::default(),
            backend,
        }
    }

    /// The sessions' backend.
    pub fn backend(&self) -> &Arc<dyn SessionBackend> {
        &self.backend
    }

    /// A URL for `pending`, usable once within [`TOKEN_TTL`].
    pub fn url(&self, pending: Pending) -> Result<String> {
        let path = pending.path();
        let token = self
            .tokens
            .lock()
            .unwrap()
            .insert(pending, Instant::now())?;
        Ok(format!("{}/{path}/{token}", self.base))
    }

    /// The routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/exec/{token}", any(exec))
            .route("/attach/{token}", any(attach))
            .route("/portforward/{token}", any(port_forward))
            .with_state(self.clone())
    }

    fn take(&self, token: &str) -> Option<Pending> {
        self.tokens.lock().unwrap().take(token, Instant::now())
    }
}

/// Binds the streaming server's listener on `address` (`host:port`).
pub async fn bind(address: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await.map_err(|e| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("cri stream_address {address:?}: {e}"),
        )
    })
}

fn plain(status: StatusCode, text: impl Into<String>) -> Response {
    (status, text.into()).into_response()
}

fn not_found() -> Response {
    plain(StatusCode::NOT_FOUND, "404 page not found\n")
}

async fn exec(State(s): State<StreamServer>, Path(token): Path<String>, req: Request) -> Response {
    match s.take(&token) {
        Some(Pending::Exec(spec)) => session(s, Session::Exec(spec), req).await,
        _ => not_found(),
    }
}

async fn attach(
    State(s): State<StreamServer>,
    Path(token): Path<String>,
    req: Request,
) -> Response {
    match s.take(&token) {
        Some(Pending::Attach(spec)) => session(s, Session::Attach(spec), req).await,
        _ => not_found(),
    }
}

async fn port_forward(
    State(s): State<StreamServer>,
    Path(token): Path<String>,
    req: Request,
) -> Response {
    let Some(Pending::PortForward(netns, ports)) = s.take(&token) else {
        return not_found();
    };
    if is_websocket(&req) && offers(&req, portforward::WS_TUNNEL_PROTOCOL) {
        let (mut parts, _) = req.into_parts();
        return match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(ws) => ws
                .protocols([portforward::WS_TUNNEL_PROTOCOL])
                .on_upgrade(move |socket| portforward::serve_ws_tunnel(socket, netns)),
            Err(rejection) => rejection.into_response(),
        };
    }
    if is_websocket(&req) {
        return websocket(req, portforward::WS_PROTOCOLS, move |socket, proto| {
            portforward::serve_ws(socket, proto, netns, ports)
        })
        .await;
    }
    spdy_upgrade(req, &[portforward::PROTOCOL], move |io, _| {
        portforward::serve_spdy(io, netns)
    })
}

/// The `Sec-WebSocket-Protocol`s a request offers.
fn ws_protocols(req: &Request) -> Vec<String> {
    req.headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .filter(|p| !p.is_empty())
        .collect()
}

/// Whether the request offers websocket sub-protocol `protocol`.
fn offers(req: &Request, protocol: &str) -> bool {
    ws_protocols(req).iter().any(|p| p == protocol)
}

/// Upgrades to a websocket speaking the first of the client's `Sec-WebSocket-Protocol`s that
/// is in `supported` (none offered: binary v1), then runs `serve` on it.
async fn websocket<F, Fut>(req: Request, supported: &'static [&'static str], serve: F) -> Response
where
    F: FnOnce(axum::extract::ws::WebSocket, WsProtocol) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let offered = ws_protocols(&req);
    let chosen = if offered.is_empty() {
        Some(String::new())
    } else {
        offered
            .iter()
            .find(|p| supported.contains(&p.as_str()))
            .cloned()
    };
    let Some(chosen) = chosen else {
        return plain(
            StatusCode::BAD_REQUEST,
            format!(
                "unable to upgrade: websocket protocols {offered:?} not supported; berth speaks {supported:?}"
            ),
        );
    };
    let proto = WsProtocol::parse(&chosen).expect("a listed protocol");
    let (mut parts, _) = req.into_parts();
    let ws = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let ws = if chosen.is_empty() {
        ws
    } else {
        ws.protocols([chosen])
    };
    ws.on_upgrade(move |socket| serve(socket, proto))
}

fn is_websocket(req: &Request) -> bool {
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

async fn session(s: StreamServer, session: Session, req: Request) -> Response {
    let backend = s.backend.clone();
    if is_websocket(&req) {
        return websocket(req, remotecommand::WS_PROTOCOLS, move |socket, proto| {
            remotecommand::serve_ws(socket, proto, session, backend)
        })
        .await;
    }
    spdy_upgrade(req, remotecommand::SPDY_PROTOCOLS, move |io, protocol| {
        let version = remotecommand::version(protocol).unwrap_or(remotecommand::Version::V1);
        remotecommand::serve_spdy(io, version, session, backend)
    })
}

/// Negotiates a stream protocol (`X-Stream-Protocol-Version`) and upgrades the connection to
/// SPDY/3.1, then runs `serve` on it. Answers as kubelet does: 400 without the upgrade headers,
/// 403 listing what berth speaks when no protocol fits.
fn spdy_upgrade<F, Fut>(mut req: Request, supported: &'static [&'static str], serve: F) -> Response
where
    F: FnOnce(TokioIo<hyper::upgrade::Upgraded>, &str) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let headers = req.headers();
    let has = |name: header::HeaderName, want: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|v| v.trim().eq_ignore_ascii_case(want))
    };
    if !has(header::CONNECTION, "upgrade") || !has(header::UPGRADE, "SPDY/3.1") {
        return plain(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: missing upgrade headers in request",
        );
    }
    let offered: Vec<String> = headers
        .get_all("X-Stream-Protocol-Version")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .filter(|p| !p.is_empty())
        .collect();
    // Kubelet's Handshake: the first of the client's protocols the server supports.
    let protocol = if offered.is_empty() {
        String::new()
    } else if let Some(p) = offered.iter().find(|p| supported.contains(&p.as_str())) {
        p.clone()
    } else {
        let mut r = plain(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server supports {supported:?}"
            ),
        );
        for p in supported {
            r.headers_mut().append(
                "X-Accepted-Stream-Protocol-Versions",
                HeaderValue::from_static(p),
            );
        }
        return r;
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let chosen = protocol.clone();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => serve(TokioIo::new(upgraded), &chosen).await,
            Err(e) => tracing::debug!(error = %e, "cri streaming: upgrade failed"),
        }
    });
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    if let Ok(v) = HeaderValue::from_str(&protocol)
        && !protocol.is_empty()
    {
        h.insert("X-Stream-Protocol-Version", v);
    }
    r
}

/// Serves the streaming server on `listener` until `shutdown` completes.
pub async fn serve(
    server: StreamServer,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, server.router())
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::internal(format!("cri streaming server: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_single_use_and_expire() {
        let mut t = Tokens::default();
        let now = Instant::now();
        let a = t
            .insert(Pending::PortForward("/a".into(), Vec::new()), now)
            .unwrap();
        let b = t
            .insert(Pending::PortForward("/b".into(), Vec::new()), now)
            .unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 11, "8 random bytes, base64url");
        assert!(
            matches!(t.take(&a, now), Some(Pending::PortForward(p, _)) if p == std::path::Path::new("/a"))
        );
        assert!(t.take(&a, now).is_none(), "used once");
        assert!(t.take(&b, now + TOKEN_TTL).is_none(), "expired");
        assert!(t.take("nonsense", now).is_none());
        for _ in 0..MAX_IN_FLIGHT {
            t.insert(Pending::PortForward("/c".into(), Vec::new()), now)
                .unwrap();
        }
        let err = t
            .insert(Pending::PortForward("/c".into(), Vec::new()), now)
            .unwrap_err();
        assert!(err.is(ErrorKind::ResourceExhausted));
        // Expired entries make room.
        t.insert(
            Pending::PortForward("/d".into(), Vec::new()),
            now + TOKEN_TTL,
        )
        .unwrap();
    }
}
