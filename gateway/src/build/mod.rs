//! `POST /build` (the classic builder) and `POST /build/prune`.
//!
//! The request is parsed ([`options`]), the context tar streamed from the body into a temporary
//! directory (never held in memory), the Dockerfile parsed, then the [`executor`] runs it in a
//! task writing Docker's JSON stream ([`output`]). A failure before the first line is an HTTP
//! error (as dockerd answers until it has written something); later ones are error lines. A
//! client that goes away cancels the build: its running step is stopped and removed.

pub mod backend;
pub mod copy;
pub mod executor;
pub mod options;
pub mod orphans;
pub mod output;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use berth_builder::context::ContextError;
use berth_core::{Error, ErrorKind, Result};
use berth_proto::berth::images::v1 as images;
use berth_proto::berth::network::v1 as network;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::backend::{BuildBackend, Engine};
use self::options::BuildOptions;
use self::output::{Msg, Output};
use crate::query::Query;
use crate::{ApiError, AppState, json_response};

/// The routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/build", post(build))
        .route("/build/prune", post(prune))
}

fn context_error(e: ContextError) -> Error {
    match e {
        ContextError::Io(io) => Error::internal("read the build context").with_source(io),
        other => Error::invalid_argument(other.to_string()),
    }
}

/// A context and Dockerfile ready to build, in a directory removed when this is dropped.
struct Prepared {
    dir: tempfile::TempDir,
    dockerfile: String,
}

impl Prepared {
    fn context(&self) -> PathBuf {
        self.dir.path().join("context")
    }

    fn scratch(&self) -> PathBuf {
        self.dir.path().join("scratch")
    }
}

fn temp_dir() -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("berth-build-")
        .tempdir()
        .map_err(|e| Error::internal("create a build directory").with_source(e))?;
    for sub in ["context", "scratch"] {
        std::fs::create_dir(dir.path().join(sub))
            .map_err(|e| Error::internal("create a build directory").with_source(e))?;
    }
    Ok(dir)
}

/// Streams the body (a context tar, maybe compressed) into a temporary directory.
async fn receive(body: Body, dockerfile: &str) -> Result<Prepared> {
    let dir = temp_dir()?;
    let into = dir.path().join("context");
    // The body's chunks reach the blocking unpacker through a small bounded channel.
    let (tx, rx) = mpsc::channel::<std::io::Result<bytes::Bytes>>(8);
    let mut data = body.into_data_stream();
    tokio::spawn(async move {
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|e| std::io::Error::other(e.to_string()));
            let failed = chunk.is_err();
            if failed {
                let _ = tx.send(chunk).await;
                return;
            }
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
        // The unpacker stops at the archive's end marker, and may fail before it; what the
        // client still sends (padding after the marker, the rest of a bad context) is read and
        // dropped. Left unread, it would be closed on with data pending, and the client's
        // body writer, failing, tears down the connection the build's output comes back on.
        while let Some(Ok(_)) = data.next().await {}
    });
    let bridge = ChannelReader::new(rx);
    let dockerfile = dockerfile.to_string();
    let prepared = tokio::task::spawn_blocking(move || {
        berth_builder::context::prepare(bridge, &into, &dockerfile)
    })
    .await
    .map_err(|e| Error::internal("unpack the build context").with_source(e))?
    .map_err(context_error)?;
    Ok(Prepared {
        dir,
        dockerfile: prepared.dockerfile,
    })
}

/// A blocking reader over chunks sent from the async side.
///
/// The docker CLI's context for `-f -` ends right after the last entry's data, without the
/// padding and end-of-archive blocks (Go's tar reader does not mind; the tar crate does), so an
/// uncompressed stream is completed with zeros at its end.
struct ChannelReader {
    rx: mpsc::Receiver<std::io::Result<bytes::Bytes>>,
    current: bytes::Bytes,
    /// Bytes read so far.
    total: usize,
    /// Whether the stream is a plain tar (decided on its first bytes).
    plain: Option<bool>,
    /// Zeros still to add at the end; `None` until the end was reached.
    padding: Option<usize>,
}

impl ChannelReader {
    fn new(rx: mpsc::Receiver<std::io::Result<bytes::Bytes>>) -> Self {
        Self {
            rx,
            current: bytes::Bytes::new(),
            total: 0,
            plain: None,
            padding: None,
        }
    }
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() && self.padding.is_none() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => {
                    let plain = self.plain.unwrap_or(false);
                    let to_block = (512 - self.total % 512) % 512;
                    self.padding = Some(if plain && self.total > 0 {
                        to_block + 1024
                    } else {
                        0
                    });
                }
            }
        }
        if let Some(left) = &mut self.padding {
            let n = buf.len().min(*left);
            buf[..n].fill(0);
            *left -= n;
            return Ok(n);
        }
        if self.plain.is_none() {
            let head = &self.current[..];
            let compressed = head.starts_with(&[0x1f, 0x8b])
                || head.starts_with(b"BZh")
                || head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0])
                || head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
            self.plain = Some(!compressed);
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        self.total += n;
        Ok(n)
    }
}

/// `remote=`: a URL of a context tarball or of a Dockerfile (plain text). Git repositories
/// need a git checkout berth does not do.
async fn fetch_remote(url: &str, dockerfile: &str) -> Result<Prepared> {
    if url.starts_with("git@") || url.ends_with(".git") || url.starts_with("git://") {
        return Err(Error::invalid_argument(format!(
            "remote git contexts are not supported by berth: {url}"
        )));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(Error::invalid_argument(format!(
            "unable to prepare context: remote context {url:?} is not a URL"
        )));
    }
    let resp = copy::http_client()?.get(url).send().await.map_err(|e| {
        Error::invalid_argument(format!("unable to fetch the remote context {url}")).with_source(e)
    })?;
    if !resp.status().is_success() {
        return Err(Error::invalid_argument(format!(
            "unable to fetch the remote context {url}: status {}",
            resp.status()
        )));
    }
    let is_text = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/"));
    let bytes = resp.bytes().await.map_err(|e| {
        Error::invalid_argument(format!("unable to fetch the remote context {url}")).with_source(e)
    })?;
    if is_text {
        let dir = temp_dir()?;
        return Ok(Prepared {
            dir,
            dockerfile: String::from_utf8_lossy(&bytes).into_owned(),
        });
    }
    receive(Body::from(bytes), dockerfile).await
}

/// A named network for RUN steps must exist: refused before any step runs, where a container
/// would be left by a failed start.
async fn check_network(st: &AppState, mode: &str) -> Result<()> {
    if matches!(mode, "default" | "bridge" | "host" | "none") || mode.starts_with("container:") {
        return Ok(());
    }
    let req = network::GetNetworkRequest { id: mode.into() };
    match st.backends.networks.get(req).await {
        Err(e) if e.is(ErrorKind::NotFound) => {
            Err(Error::not_found(format!("network {mode} not found")))
        }
        r => r.map(drop),
    }
}

async fn build(
    State(st): State<AppState>,
    q: Query,
    headers: HeaderMap,
    body: Body,
) -> std::result::Result<Response, ApiError> {
    let opts = BuildOptions::parse(&q, &headers)?;
    check_network(&st, &opts.network_mode).await?;
    let prepared = match &opts.remote {
        Some(url) => fetch_remote(url, &opts.dockerfile).await?,
        None => receive(body, &opts.dockerfile).await?,
    };
    let dockerfile = berth_builder::dockerfile::parse(&prepared.dockerfile)
        .map_err(|e| Error::invalid_argument(e.to_string()))?;
    let backend: Arc<dyn BuildBackend> = Arc::new(Engine(st.backends.clone()));
    let (tx, mut rx) = mpsc::channel(64);
    let cancel = CancellationToken::new();
    let done = CancellationToken::new();
    // The client's disconnect drops the response body and with it the receiver.
    let watch_tx = tx.clone();
    let (watch_cancel, watch_done) = (cancel.clone(), done.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = watch_tx.closed() => watch_cancel.cancel(),
            () = watch_done.cancelled() => {}
        }
    });
    tokio::spawn(async move {
        // Also ends the watcher if the build task panics.
        let _done = done.drop_guard();
        let mut out = Output::new(tx, opts.quiet, cancel);
        let (context, scratch) = (prepared.context(), prepared.scratch());
        let result = executor::Executor::new(&*backend, &opts, &context, &scratch, &mut out)
            .run(dockerfile)
            .await;
        if let Err(err) = result {
            tracing::info!(error = %err.chain(), "build failed");
            out.fail(err).await;
        }
        drop(prepared);
    });
    let first = match rx.recv().await {
        Some(Msg::Data(b)) => b,
        Some(Msg::Failed(err)) => return Err(ApiError::from(err)),
        None => return Err(Error::internal("the build ended without an answer").into()),
    };
    let rest = futures::stream::unfold(rx, |mut rx| async move {
        let m = rx.recv().await?;
        let bytes = match m {
            Msg::Data(b) => b,
            Msg::Failed(err) => {
                let msg = err.chain();
                crate::progress::line(&json!({
                    "errorDetail": { "message": msg },
                    "error": msg,
                }))
            }
        };
        Some((Ok::<_, std::io::Error>(bytes), rx))
    });
    let stream = futures::stream::iter([Ok(first)]).chain(rest);
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `POST /build/prune`: drops build cache records (all, or those older than `until`) and the
/// intermediate images only they kept.
async fn prune(State(st): State<AppState>, q: Query) -> std::result::Result<Response, ApiError> {
    let mut filters = q.filters()?;
    // `keep-storage`/`reserved-space` and `all` have no meaning for records that are all
    // reclaimable: everything matching goes.
    for f in &filters {
        if !matches!(f.key.as_str(), "until") {
            return Err(Error::invalid_argument(format!("invalid filter '{}'", f.key)).into());
        }
    }
    filters.retain(|f| f.key == "until");
    let r = st
        .backends
        .images
        .cache_prune(images::CachePruneRequest {
            filters,
            all: q.bool("all"),
        })
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "CachesDeleted": r.deleted,
            "SpaceReclaimed": r.space_reclaimed,
        }),
    ))
}

/// One build cache record as `GET /system/df` lists it (Docker's `BuildCache`).
pub fn cache_entry_json(e: &images::CacheEntry) -> serde_json::Value {
    let at = crate::time::rfc3339(e.created.as_ref());
    json!({
        "ID": e.key.chars().take(25).collect::<String>(),
        "Parents": if e.parent_id.is_empty() { json!([]) } else { json!([e.parent_id]) },
        "Type": "regular",
        "Description": e.created_by,
        "InUse": false,
        "Shared": false,
        "Size": e.size,
        "CreatedAt": at,
        "LastUsedAt": at,
        "UsageCount": 1,
    })
}

#[cfg(test)]
mod tests;
