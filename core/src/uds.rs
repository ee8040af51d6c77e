//! Unix-socket plumbing: binding with mode and group, connecting gRPC clients, listen addresses.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::{Endpoint, Uri};

use crate::error::{Context, Error, ErrorKind, Result};
use crate::telemetry::TraceInterceptor;

/// A gRPC channel to a berth service: a Unix-socket connection whose requests carry the caller's
/// trace context.
pub type Channel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, TraceInterceptor>;

/// A place a server listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

impl ListenAddr {
    /// Parses `unix:///path`, `/path` or `tcp://host:port`.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(Error::invalid_argument(format!(
                    "{s}: unix socket path must be absolute"
                )));
            }
            Ok(Self::Unix(PathBuf::from(path)))
        } else if s.starts_with('/') {
            Ok(Self::Unix(PathBuf::from(s)))
        } else if let Some(addr) = s.strip_prefix("tcp://") {
            let (host, port) = addr
                .rsplit_once(':')
                .ok_or_else(|| Error::invalid_argument(format!("{s}: tcp address needs a port")))?;
            port.parse::<u16>()
                .map_err(|_| Error::invalid_argument(format!("{s}: invalid port {port:?}")))?;
            let host = if host.is_empty() { "0.0.0.0" } else { host };
            Ok(Self::Tcp(format!("{host}:{port}")))
        } else {
            Err(Error::invalid_argument(format!(
                "{s}: unsupported address (want unix:///path or tcp://host:port)"
            )))
        }
    }
}

/// Binds a Unix socket at `path` with `mode`, owned by `group` when given.
///
/// A stale socket file (nobody accepting on it) is replaced; a live one is an error, so two
/// copies of a service never fight over one socket.
pub async fn bind(path: &Path, mode: u32, group: Option<&str>) -> Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .context(ErrorKind::Internal, format!("create {}", parent.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(Error::already_exists(format!(
                "{} is already served by another process",
                path.display()
            )));
        }
        std::fs::remove_file(path).context(
            ErrorKind::Internal,
            format!("remove stale socket {}", path.display()),
        )?;
    }
    let listener = UnixListener::bind(path)
        .context(ErrorKind::Internal, format!("bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .context(ErrorKind::Internal, format!("chmod {}", path.display()))?;
    if let Some(group) = group {
        let gid = nix::unistd::Group::from_name(group)
            .context(ErrorKind::Internal, format!("look up group {group}"))?
            .ok_or_else(|| {
                Error::invalid_argument(format!("socket group {group:?} does not exist"))
            })?
            .gid;
        nix::unistd::chown(path, None, Some(gid))
            .context(ErrorKind::Internal, format!("chown {}", path.display()))?;
    }
    Ok(listener)
}

/// A channel to the gRPC server on `path`.
///
/// The connection is made lazily and remade after failures, so a client outlives restarts of
/// the server; a call while the socket is gone fails with `Unavailable` naming the socket.
pub fn channel(path: impl Into<PathBuf>) -> Channel {
    let path: PathBuf = path.into();
    let endpoint = Endpoint::from_static("http://berth.local")
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    let inner = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            UnixStream::connect(&path)
                .await
                .map(TokioIo::new)
                .map_err(|e| {
                    std::io::Error::new(e.kind(), format!("connect {}: {e}", path.display()))
                })
        }
    }));
    tonic::service::interceptor::InterceptedService::new(inner, TraceInterceptor)
}

/// Waits until `path` accepts connections, for at most `timeout`.
pub async fn wait_for_socket(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if UnixStream::connect(path).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::new(
                ErrorKind::DeadlineExceeded,
                format!(
                    "{} did not accept connections within {timeout:?}",
                    path.display()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            ListenAddr::parse("unix:///run/x.sock").unwrap(),
            ListenAddr::Unix("/run/x.sock".into())
        );
        assert_eq!(
            ListenAddr::parse("/run/x.sock").unwrap(),
            ListenAddr::Unix("/run/x.sock".into())
        );
        assert_eq!(
            ListenAddr::parse("tcp://:2376").unwrap(),
            ListenAddr::Tcp("0.0.0.0:2376".into())
        );
        assert!(ListenAddr::parse("tcp://host").is_err());
        assert!(ListenAddr::parse("fd://").is_err());
        assert!(ListenAddr::parse("unix://rel").is_err());
    }

    #[tokio::test]
    async fn bind_sets_mode_and_replaces_stale_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/x.sock");
        let l = bind(&path, 0o600, None).await.unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Live: refused.
        let err = bind(&path, 0o600, None).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        drop(l);
        // Stale: replaced.
        bind(&path, 0o660, None).await.unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o660
        );
    }

    #[tokio::test]
    async fn bind_refuses_unknown_groups() {
        let dir = tempfile::tempdir().unwrap();
        let err = bind(
            &dir.path().join("y.sock"),
            0o660,
            Some("no-such-group-berth"),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }
}
