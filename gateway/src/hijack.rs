//! Hijacked connections for attach and exec: `101 UPGRADED`, then the client's bytes go to the
//! process' stdin and its output comes back on the same connection.
//!
//! Some clients read the `101` through a buffered reader and then switch to the raw socket
//! (docker-py does, through Python's http.client): whatever arrived together with the headers
//! is lost to them. hyper writes and flushes the headers on their own before the upgrade
//! resolves; on a Unix socket the first output then waits until the client has read them (the
//! socket's unread byte count is zero), so it cannot share their read.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::http::Extensions;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use berth_proto::berth::types::v1::OutputChunk;
use futures::TryStreamExt;

use crate::backend::Stream;
use crate::stdcopy::Encoder;

/// Whether the client asked to upgrade the connection (`Connection: Upgrade`, `Upgrade: tcp`),
/// as the Docker CLI and bollard do.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, want: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(want)))
        })
    };
    has(header::CONNECTION, "upgrade") && headers.contains_key(header::UPGRADE)
}

/// The connection a request came on, as far as a hijack needs it: the Unix socket's descriptor
/// (`None` over TCP and TLS, where the unread count is not the peer's).
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer {
    unix_fd: Option<RawFd>,
}

impl Connected<axum::serve::IncomingStream<'_, tokio::net::UnixListener>> for Peer {
    fn connect_info(s: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        Self {
            unix_fd: Some(s.io().as_raw_fd()),
        }
    }
}

impl Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(_: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Self::default()
    }
}

impl Connected<axum::serve::IncomingStream<'_, crate::tls::TlsListener>> for Peer {
    fn connect_info(_: axum::serve::IncomingStream<'_, crate::tls::TlsListener>) -> Self {
        Self::default()
    }
}

/// The request's [`Peer`], when the server recorded one.
pub fn peer(ext: &Extensions) -> Option<Peer> {
    ext.get::<ConnectInfo<Peer>>().map(|c| c.0)
}

/// How long the first output waits for the client to read the `101`: a client that does not
/// read at all still gets its output after this.
const HEADER_READ_WAIT: Duration = Duration::from_secs(2);

/// Bytes written to the Unix socket `fd` that its peer has not read yet.
fn unread(fd: RawFd) -> Option<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer, valid for the call; `fd`
    // is the connection's socket, kept open by the upgraded connection the caller holds.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    (rc == 0).then_some(n)
}

/// Waits until the client has read what was written so far (the `101`), or the wait is over.
async fn until_read(peer: Option<Peer>) {
    let Some(fd) = peer.and_then(|p| p.unix_fd) else {
        return;
    };
    let deadline = Instant::now() + HEADER_READ_WAIT;
    while unread(fd).is_some_and(|n| n > 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// One message of an engine attach or exec stream, as the client's output sees it.
#[derive(Debug)]
pub enum Frame {
    /// Output of the process.
    Output(OutputChunk),
    /// The session is over.
    End,
    /// Anything else (not sent to the client).
    Other,
}

/// The output the client gets for an engine attach or exec stream: `out`'s chunks encoded with
/// `enc`, up to its end message. `keep` (the gRPC request stream's sender, when the client
/// sends no stdin) is held until the output ends: the engine reads a closed request stream as
/// the client going away.
pub fn output<M: Send + 'static, K: Send + 'static>(
    out: Stream<M>,
    enc: Encoder,
    frame: fn(M) -> Frame,
    keep: Option<K>,
) -> Stream<Bytes> {
    out.map_ok(frame)
        .try_take_while(|f| futures::future::ready(Ok(!matches!(f, Frame::End))))
        .try_filter_map(move |f| {
            futures::future::ready(Ok(match f {
                Frame::Output(chunk) => Some(enc.encode(chunk.stream(), &chunk.data)),
                Frame::End | Frame::Other => None,
            }))
        })
        .map(move |item| {
            let _ = &keep;
            item
        })
        .boxed()
}

/// How the client's stdin reaches the process.
#[derive(Debug)]
pub struct StdinSink<M> {
    /// The request stream of the gRPC call.
    pub tx: mpsc::Sender<M>,
    /// Wraps a chunk of stdin.
    pub data: fn(Bytes) -> M,
    /// Sent when the client half-closes its side (EOF on stdin); `None` leaves stdin open.
    pub on_eof: Option<M>,
}

/// Answers a hijack request: with an upgrade, `101` and a task that pumps both directions;
/// without one, a plain `200` streaming the output (stdin is then unavailable).
///
/// `output` is already encoded (stdcopy frames or raw); its end ends the session and closes the
/// connection. The stdin sink is kept until then so the process' stdin stays open unless
/// `on_eof` closes it.
pub fn respond<M: Send + 'static>(
    on_upgrade: Option<OnUpgrade>,
    peer: Option<Peer>,
    content_type: &'static str,
    output: Stream<Bytes>,
    stdin: Option<StdinSink<M>>,
) -> Response {
    let Some(on_upgrade) = on_upgrade else {
        let body = Body::from_stream(output);
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
            body,
        )
            .into_response();
    };
    tokio::spawn(pump(on_upgrade, peer, output, stdin));
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("tcp"));
    resp
}

async fn pump<M: Send + 'static>(
    on_upgrade: OnUpgrade,
    peer: Option<Peer>,
    mut output: Stream<Bytes>,
    stdin: Option<StdinSink<M>>,
) {
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(err) => {
            tracing::debug!(error = %err, "hijack: upgrade failed");
            return;
        }
    };
    let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
    // Hold a sender until the output ends, so the request stream (and with it the process'
    // stdin) stays open after the client's EOF unless the sink says to close it.
    let _keep = stdin.as_ref().map(|s| s.tx.clone());
    let reader = stdin.map(|sink| {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        if let Some(msg) = sink.on_eof {
                            let _ = sink.tx.send(msg).await;
                        }
                        break;
                    }
                    Ok(n) => {
                        let chunk = Bytes::copy_from_slice(&buf[..n]);
                        if sink.tx.send((sink.data)(chunk)).await.is_err() {
                            break;
                        }
                    }
                }
            }
        })
    });
    let mut first = true;
    while let Some(item) = output.next().await {
        match item {
            Ok(bytes) => {
                if std::mem::take(&mut first) {
                    until_read(peer).await;
                }
                if wr.write_all(&bytes).await.is_err() || wr.flush().await.is_err() {
                    break;
                }
            }
            Err(err) => {
                tracing::debug!(error = %err.chain(), "hijack: output stream failed");
                break;
            }
        }
    }
    let _ = wr.shutdown().await;
    if let Some(reader) = reader {
        reader.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn first_output_waits_until_the_client_has_read_the_headers() {
        let (server, client) = std::os::unix::net::UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut &server, b"HTTP/1.1 101 UPGRADED\r\n\r\n").unwrap();
        let peer = Some(Peer {
            unix_fd: Some(server.as_raw_fd()),
        });
        let mut wait = Box::pin(until_read(peer));
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut wait)
                .await
                .is_err(),
            "went on while the headers were unread"
        );
        let mut buf = [0u8; 64];
        let n = std::io::Read::read(&mut &client, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"HTTP/1.1 101 UPGRADED\r\n\r\n");
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("still waiting after the client read");
        // Over TCP and TLS there is nothing to wait for.
        until_read(Some(Peer::default())).await;
        until_read(None).await;
    }

    #[test]
    fn upgrade_headers() {
        let mut h = HeaderMap::new();
        assert!(!wants_upgrade(&h));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        assert!(!wants_upgrade(&h));
        h.insert(header::UPGRADE, HeaderValue::from_static("tcp"));
        assert!(wants_upgrade(&h));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, upgrade"),
        );
        assert!(wants_upgrade(&h));
    }
}
