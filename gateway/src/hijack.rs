//! Hijacked connections for attach and exec: `101 UPGRADED`, then the client's bytes go to the
//! process' stdin and its output comes back on the same connection.

use axum::body::Body;
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
    tokio::spawn(pump(on_upgrade, output, stdin));
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
    while let Some(item) = output.next().await {
        match item {
            Ok(bytes) => {
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
