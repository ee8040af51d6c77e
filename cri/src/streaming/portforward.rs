//! Port forwarding over SPDY (`portforward.k8s.io`, kubelet's `cri/streaming/portforward`):
//! for each forwarded connection the client opens an `error` and a `data` stream carrying the
//! same `port` and `requestID` headers; berth connects to that port on localhost inside the
//! pod's network namespace and copies bytes both ways. A failure is reported as text on the
//! error stream.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::conn::{self, Event, Writer};
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
                        w.reset(id, spdy::rst::PROTOCOL_ERROR);
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
                } else if let Some(pair) = request_of.get(&id).and_then(|r| pairs.get_mut(r)) {
                    pair.early.push((data, fin));
                }
            }
            Event::Reset { id } => {
                data_tx.remove(&id);
            }
        }
    }
    w.close();
}

/// One forwarded connection.
async fn forward(
    w: Writer,
    netns: PathBuf,
    port: u16,
    error: u32,
    data: u32,
    mut from_client: mpsc::Receiver<(Bytes, bool)>,
) {
    let tcp = match connect_in_netns(&netns, port).await {
        Ok(t) => t,
        Err(e) => {
            let msg = format!(
                "error forwarding port {port} to pod network namespace {}: {e}",
                netns.display()
            );
            w.data(error, msg.as_bytes());
            w.fin(error);
            w.fin(data);
            return;
        }
    };
    let (mut rd, mut wr) = tcp.into_split();
    let to_pod = async move {
        while let Some((bytes, fin)) = from_client.recv().await {
            if !bytes.is_empty() && wr.write_all(&bytes).await.is_err() {
                break;
            }
            if fin {
                break;
            }
        }
        let _ = wr.shutdown().await;
    };
    let writer = w.clone();
    let from_pod = async move {
        let mut buf = vec![0u8; spdy::DATA_CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !writer.data(data, &buf[..n]) {
                        break;
                    }
                }
            }
        }
        writer.fin(data);
    };
    tokio::join!(to_pod, from_pod);
    w.fin(error);
}
