//! Port forwarding over SPDY (`portforward.k8s.io`, kubelet's `cri/streaming/portforward`):
//! for each forwarded connection the client opens an `error` and a `data` stream carrying the
//! same `port` and `requestID` headers; berth connects to that port on localhost inside the
//! pod's network namespace and copies bytes both ways. A failure is reported as text on the
//! error stream. Over a websocket the ports come from the request instead (see [`serve_ws`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use axum::extract::ws::{Message, WebSocket};

use super::conn::{self, Event, Writer};
use super::remotecommand::{WsProtocol, normal_close, ws_message, ws_parse};
use super::spdy;

/// The SPDY sub-protocol of port forwarding.
pub const PROTOCOL: &str = "portforward.k8s.io";

/// Connects to `port` on localhost (IPv4, then IPv6) inside the network namespace at `netns`.
pub async fn connect_in_netns(netns: &Path, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let netns = netns.to_path_buf();
    let std = tokio::task::spawn_blocking(move || {
        // A thread of its own: setns changes only the calling thread, and this one ends right
        // after; the socket keeps the namespace it was made in.
        std::thread::spawn(move || -> std::io::Result<std::net::TcpStream> {
            let ns = std::fs::File::open(&netns)?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            std::net::TcpStream::connect(("127.0.0.1", port))
                .or_else(|_| std::net::TcpStream::connect(("::1", port)))
        })
        .join()
        .map_err(|_| std::io::Error::other("port-forward thread panicked"))?
    })
    .await
    .map_err(std::io::Error::other)??;
    std.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(std)
}

#[derive(Debug, Default)]
struct Pair {
    port: Option<u16>,
    error: Option<u32>,
    data: Option<u32>,
    /// Bytes the client sent on the data stream before the pair was complete.
    early: Vec<(Bytes, bool)>,
}

/// Serves port forwarding into `netns` on an upgraded SPDY connection until the client closes it.
pub async fn serve_spdy<IO>(io: IO, netns: PathBuf)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (w, mut events) = conn::serve(io);
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut request_of: HashMap<u32, String> = HashMap::new();
    let mut data_tx: HashMap<u32, mpsc::Sender<(Bytes, bool)>> = HashMap::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Stream { id, headers } => {
                let kind = spdy::header(&headers, "streamType").unwrap_or_default();
                // Old clients send no request id: the error stream's id, and the data stream
                // follows it (id + 2).
                let request = match spdy::header(&headers, "requestID") {
                    Some(r) => r.to_string(),
                    None if kind == "data" => id.saturating_sub(2).to_string(),
                    None => id.to_string(),
                };
                let port = spdy::header(&headers, "port").and_then(|p| p.parse::<u16>().ok());
                let pair = pairs.entry(request.clone()).or_default();
                match (kind, port) {
                    ("error", Some(p)) if pair.error.is_none() => {
                        pair.error = Some(id);
                        pair.port = Some(p);
                    }
                    ("data", Some(p)) if pair.data.is_none() => {
                        pair.data = Some(id);
                        pair.port = Some(p);
                    }
                    _ => {
                        w.reset(id, spdy::rst::PROTOCOL_ERROR).await;
                        continue;
                    }
                }
                request_of.insert(id, request.clone());
                if let (Some(error), Some(data), Some(port)) = (pair.error, pair.data, pair.port) {
                    let pair = pairs.remove(&request).unwrap_or_default();
                    let (tx, rx) = mpsc::channel(16);
                    for early in pair.early {
                        let _ = tx.try_send(early);
                    }
                    data_tx.insert(data, tx);
                    tokio::spawn(forward(w.clone(), netns.clone(), port, error, data, rx));
                }
            }
            Event::Data { id, data, fin } => {
                if let Some(tx) = data_tx.get(&id) {
                    let _ = tx.send((data, fin)).await;
                    if fin {
                        data_tx.remove(&id);
                    }
                } else if let Some(pair) = request_of.get(&id).and_then(|r| pairs.get_mut(r))
                    && pair.data == Some(id)
                {
                    pair.early.push((data, fin));
                }
                // Anything else is the client's side of an error stream: client-go half-closes
                // it right after opening it ("we're not writing to this stream"), before the
                // data stream exists; that FIN must not end the data stream.
            }
            Event::Reset { id } => {
                // A reset data stream ends its forward (both directions, as kubelet's does):
                // client-go resets the data stream once its side is done, then waits for the
                // error stream to end.
                data_tx.remove(&id);
            }
        }
    }
    w.close().await;
}

/// One forwarded connection.
async fn forward(
    w: Writer,
    netns: PathBuf,
    port: u16,
    error: u32,
    data: u32,
    from_client: mpsc::Receiver<(Bytes, bool)>,
) {
    let tcp = match connect_in_netns(&netns, port).await {
        Ok(t) => t,
        Err(e) => {
            let msg = format!(
                "error forwarding port {port} to pod network namespace {}: {e}",
                netns.display()
            );
            w.data(error, msg.as_bytes()).await;
            w.fin(error).await;
            w.fin(data).await;
            return;
        }
    };
    let writer = w.clone();
    pipe(tcp, from_client, |b: Bytes| {
        let writer = writer.clone();
        async move { writer.data(data, &b).await }
    })
    .await;
    w.fin(data).await;
    w.fin(error).await;
}

/// The websocket sub-protocol of SPDY tunnelled over a websocket (client-go's
/// `NewSPDYOverWebsocketDialer`, what `crictl port-forward --transport websocket` and kubectl's
/// `PortForwardWebsockets` speak): each binary message carries the next bytes of a SPDY/3.1
/// port-forwarding connection.
pub const WS_TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

/// Serves port forwarding as SPDY tunnelled over `socket` (see [`WS_TUNNEL_PROTOCOL`]): the
/// binary messages are the byte stream [`serve_spdy`] reads, what it writes goes back as binary
/// messages; a close message is the stream's end.
pub async fn serve_ws_tunnel(socket: WebSocket, netns: PathBuf) {
    use futures::{SinkExt, StreamExt};
    let (ours, theirs) = tokio::io::duplex(64 << 10);
    let serving = tokio::spawn(serve_spdy(theirs, netns));
    let (mut tx, mut rx) = socket.split();
    let (mut rd, mut wr) = tokio::io::split(ours);
    let inbound = async move {
        while let Some(Ok(msg)) = rx.next().await {
            match msg {
                Message::Binary(b) if wr.write_all(&b).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = wr.shutdown().await;
    };
    let outbound = async move {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let msg = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
                    if tx.send(msg).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.send(normal_close()).await;
    };
    tokio::join!(inbound, outbound);
    let _ = serving.await;
}

/// The websocket sub-protocols of port forwarding (none offered: binary).
pub const WS_PROTOCOLS: &[&str] = &["v4.channel.k8s.io", "v4.base64.channel.k8s.io"];

/// Serves port forwarding over a websocket (kubelet's `portforward/websocket.go`): each port of
/// the request gets a data channel `2i` and an error channel `2i+1`, each opened by a message
/// holding the port (u16, little endian); one connection per port for the life of the socket.
pub async fn serve_ws(socket: WebSocket, proto: WsProtocol, netns: PathBuf, ports: Vec<u16>) {
    use futures::{SinkExt, StreamExt};
    let (mut tx, mut rx) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Bytes)>(16);
    let mut inputs = Vec::new();
    let mut tasks = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let (data_ch, error_ch) = ((2 * i) as u8, (2 * i + 1) as u8);
        for ch in [data_ch, error_ch] {
            if tx
                .send(ws_message(proto, ch, &port.to_le_bytes()))
                .await
                .is_err()
            {
                return;
            }
        }
        let (in_tx, in_rx) = mpsc::channel::<(Bytes, bool)>(16);
        inputs.push(in_tx);
        let (out, netns, port) = (out_tx.clone(), netns.clone(), *port);
        tasks.push(tokio::spawn(async move {
            match connect_in_netns(&netns, port).await {
                Ok(tcp) => {
                    let to_client = |b: Bytes| {
                        let out = out.clone();
                        async move { out.send((data_ch, b)).await.is_ok() }
                    };
                    pipe(tcp, in_rx, to_client).await;
                }
                Err(e) => {
                    let msg = format!(
                        "error forwarding port {port} to pod network namespace {}: {e}",
                        netns.display()
                    );
                    let _ = out.send((error_ch, Bytes::from(msg))).await;
                }
            }
        }));
    }
    drop(out_tx);
    let reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = rx.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            if let Some((ch, data)) = ws_parse(proto, msg)
                && ch % 2 == 0
                && let Some(input) = inputs.get(usize::from(ch / 2))
                && !data.is_empty()
            {
                let _ = input.send((data, false)).await;
            }
        }
        // Dropping the inputs half-closes every pod-side connection.
    });
    while let Some((ch, data)) = out_rx.recv().await {
        if tx.send(ws_message(proto, ch, &data)).await.is_err() {
            break;
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    reader.abort();
    let _ = tx.send(normal_close()).await;
}

/// Copies between `tcp` and the client until both directions are done: the client's bytes
/// (until its FIN) into `tcp`, `tcp`'s into `to_client`. The client's side ending without a FIN
/// (a reset stream, a closed socket) ends both directions at once.
async fn pipe<F, Fut>(
    tcp: tokio::net::TcpStream,
    mut from_client: mpsc::Receiver<(Bytes, bool)>,
    to_client: F,
) where
    F: Fn(Bytes) -> Fut,
    Fut: Future<Output = bool>,
{
    let (mut rd, mut wr) = tcp.into_split();
    // Ends only when the client's side ends without a FIN; after a FIN the pod's answer still
    // flows until the pod closes.
    let to_pod = async move {
        while let Some((bytes, fin)) = from_client.recv().await {
            if (!bytes.is_empty() && wr.write_all(&bytes).await.is_err()) || fin {
                let _ = wr.shutdown().await;
                std::future::pending::<()>().await;
            }
        }
        let _ = wr.shutdown().await;
    };
    let from_pod = async move {
        let mut buf = vec![0u8; spdy::DATA_CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !to_client(Bytes::copy_from_slice(&buf[..n])).await {
                        break;
                    }
                }
            }
        }
    };
    tokio::select! {
        () = to_pod => {}
        () = from_pod => {}
    }
}
