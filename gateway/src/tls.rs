//! TLS for TCP hosts: the server certificate, and client-certificate verification against the
//! configured CA when `tlsverify` is on (as dockerd's `--tlsverify`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth_core::config::GatewayConfig;
use berth_core::{Context, Error, ErrorKind, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A handshake that takes longer than this is dropped, so a silent client cannot hold a slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .context(
            ErrorKind::InvalidArgument,
            format!("read certificates {}", path.display()),
        )?
        .collect::<std::result::Result<Vec<_>, _>>()
        .context(
            ErrorKind::InvalidArgument,
            format!("parse certificates {}", path.display()),
        )?;
    if certs.is_empty() {
        return Err(Error::invalid_argument(format!(
            "no certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

/// The rustls server config for `cfg` (which must name a cert and key; validated at load).
pub fn server_config(cfg: &GatewayConfig) -> Result<Arc<rustls::ServerConfig>> {
    let missing = |what: &str| Error::invalid_argument(format!("TLS needs {what}"));
    let cert_path = cfg.tlscert.as_deref().ok_or_else(|| missing("tlscert"))?;
    let key_path = cfg.tlskey.as_deref().ok_or_else(|| missing("tlskey"))?;
    let certs = read_certs(cert_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path).context(
        ErrorKind::InvalidArgument,
        format!("read key {}", key_path.display()),
    )?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context(ErrorKind::Internal, "TLS protocol versions")?;
    let builder = if cfg.tlsverify {
        let ca_path = cfg
            .tlscacert
            .as_deref()
            .ok_or_else(|| missing("tlscacert"))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(ca_path)? {
            roots.add(cert).context(
                ErrorKind::InvalidArgument,
                format!("CA certificate {}", ca_path.display()),
            )?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context(ErrorKind::InvalidArgument, "client certificate verifier")?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder.with_single_cert(certs, key).context(
        ErrorKind::InvalidArgument,
        "server certificate and key do not match",
    )?;
    Ok(Arc::new(config))
}

/// A listener that yields only connections whose TLS handshake succeeded. Handshakes run in
/// their own tasks so one slow client does not hold up the others.
#[derive(Debug)]
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `tcp` and completes handshakes with `config`.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> Result<Self> {
        let local = tcp
            .local_addr()
            .context(ErrorKind::Internal, "local address")?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(conn) => conn,
                    Err(err) => {
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(err)) => {
                            tracing::info!(%peer, error = %err, "TLS handshake refused")
                        }
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop only ends when this listener is gone; nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
