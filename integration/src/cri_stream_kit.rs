//! A client of the CRI streaming server as kubelet's is: an HTTP/1.1 upgrade to SPDY/3.1 on the
//! URL the RuntimeService hands out, then client-opened streams named by `streamType` (the
//! framing is berth-cri's own `spdy` module, the same wire format moby/spdystream speaks).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use berth_cri::streaming::spdy::{self, Decoder, Encoder, Frame, Headers};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// No single step of a session should take longer (a hung server fails the test, not hangs it).
pub const STEP: Duration = Duration::from_secs(60);

/// `(host:port, path)` of an `http://` URL.
pub fn split_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http URL: {url}"))?;
    let slash = rest.find('/').context("URL without a path")?;
    Ok((rest[..slash].to_string(), rest[slash..].to_string()))
}

/// The answer to an upgrade request that was not upgraded.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub head: String,
}

/// A client-side SPDY session.
#[derive(Debug)]
pub struct SpdyClient {
    tcp: TcpStream,
    enc: Encoder,
    dec: Decoder,
    buf: BytesMut,
    next_id: u32,
    /// The negotiated `X-Stream-Protocol-Version`.
    pub protocol: String,
}

/// Everything a stream received, by stream id.
#[derive(Debug, Default)]
pub struct Received {
    pub data: HashMap<u32, Vec<u8>>,
    pub finished: Vec<u32>,
    pub replied: Vec<u32>,
}

impl Received {
    pub fn text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.data.get(&id).map(Vec::as_slice).unwrap_or_default())
            .into_owned()
    }
}

impl SpdyClient {
    /// Upgrades `POST <url>` offering `protocols`; `Err(Refused)` inside `Ok` when the server
    /// answered anything but 101.
    pub async fn connect(
        url: &str,
        protocols: &[&str],
    ) -> Result<std::result::Result<Self, Refused>> {
        let (addr, path) = split_url(url)?;
        let mut tcp = TcpStream::connect(&addr).await?;
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nContent-Length: 0\r\n"
        );
        for p in protocols {
            req.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
        }
        req.push_str("\r\n");
        tcp.write_all(req.as_bytes()).await?;
        let mut buf = BytesMut::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = tokio::time::timeout(STEP, tcp.read_buf(&mut buf)).await??;
            if n == 0 {
                bail!("connection closed before the response head");
            }
        };
        let head = String::from_utf8_lossy(&buf.split_to(end)).into_owned();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("status line")?;
        if status != 101 {
            // The body, if any came with the head.
            let mut body = buf.to_vec();
            let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut body)).await;
            let head = format!("{head}{}", String::from_utf8_lossy(&body));
            return Ok(Err(Refused { status, head }));
        }
        let protocol = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("X-Stream-Protocol-Version")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        Ok(Ok(Self {
            tcp,
            enc: Encoder::default(),
            dec: Decoder::default(),
            buf,
            next_id: 1,
            protocol,
        }))
    }

    /// Opens a stream with `headers`; its id.
    pub async fn open(&mut self, headers: &[(&str, &str)]) -> Result<u32> {
        let id = self.next_id;
        self.next_id += 2;
        self.send(Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: spdy::headers(headers.iter().copied()),
        })
        .await?;
        Ok(id)
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: Frame) -> Result<()> {
        let mut out = BytesMut::new();
        self.enc.encode(&frame, &mut out);
        self.tcp.write_all(&out).await?;
        Ok(())
    }

    /// Sends `data` on stream `id`, with FIN when `fin`.
    pub async fn data(&mut self, id: u32, data: &[u8], fin: bool) -> Result<()> {
        self.send(Frame::Data {
            stream_id: id,
            fin,
            data: Bytes::copy_from_slice(data),
        })
        .await
    }

    /// The next frame; `None` when the server closed the connection.
    pub async fn next(&mut self) -> Result<Option<Frame>> {
        loop {
            if let Some(f) = self.dec.decode(&mut self.buf)? {
                return Ok(Some(f));
            }
            let n = tokio::time::timeout(STEP, self.tcp.read_buf(&mut self.buf))
                .await
                .context("no frame from the server in time")??;
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// Reads frames until every stream of `ids` is finished (or the connection ends), answering
    /// nothing; what arrived.
    pub async fn until_finished(&mut self, ids: &[u32]) -> Result<Received> {
        let mut r = Received::default();
        self.collect(&mut r, |r| ids.iter().all(|id| r.finished.contains(id)))
            .await?;
        Ok(r)
    }

    /// Reads frames into `r` until `done(r)` holds or the connection ends.
    pub async fn collect(
        &mut self,
        r: &mut Received,
        done: impl Fn(&Received) -> bool,
    ) -> Result<()> {
        while !done(r) {
            match self.next().await? {
                None => break,
                Some(Frame::Data {
                    stream_id,
                    fin,
                    data,
                }) => {
                    r.data
                        .entry(stream_id)
                        .or_default()
                        .extend_from_slice(&data);
                    if fin {
                        r.finished.push(stream_id);
                    }
                }
                Some(Frame::SynReply { stream_id, .. }) => r.replied.push(stream_id),
                Some(Frame::Ping { id }) => self.send(Frame::Ping { id }).await?,
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// The headers of a frame, for assertions.
pub fn header_of(h: &Headers, name: &str) -> Option<String> {
    spdy::header(h, name).map(str::to_string)
}
