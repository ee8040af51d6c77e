//! A server-side SPDY/3.1 connection over an upgraded HTTP connection: the client opens the
//! streams (kubelet's client always does), berth accepts each with a SYN_REPLY, answers PINGs,
//! and hands the handler one ordered queue of what happens on the connection.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::spdy::{self, Decoder, Encoder, Frame, Headers};

/// How long berth waits for the client to close after berth said goodbye, so that the last
/// bytes are read rather than reset away.
const LINGER: Duration = Duration::from_secs(10);

/// What happens on the connection, in the order the client did it.
#[derive(Debug)]
pub enum Event {
    /// The client opened stream `id` (berth has accepted it).
    Stream { id: u32, headers: Headers },
    /// Bytes on stream `id`; `fin`: the client will send no more on it.
    Data { id: u32, data: Bytes, fin: bool },
    /// The client reset stream `id`.
    Reset { id: u32 },
}

enum Out {
    Frame(Frame),
    /// GOAWAY, flush, and close once the client has gone (or [`LINGER`] has passed).
    Close,
}

/// Frames queued for the socket at most: a slow client slows the session down instead of
/// growing the gateway's memory.
const QUEUE: usize = 64;

/// Sends frames on the connection; cheap to clone.
#[derive(Debug, Clone)]
pub struct Writer {
    tx: mpsc::Sender<Out>,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Out::Frame(fr) => fr.fmt(f),
            Out::Close => f.write_str("Close"),
        }
    }
}

impl Writer {
    /// Writes `data` on stream `id` in frames of at most [`spdy::DATA_CHUNK`] bytes, waiting
    /// while the queue is full. False when the connection is gone.
    pub async fn data(&self, id: u32, data: &[u8]) -> bool {
        for chunk in data.chunks(spdy::DATA_CHUNK) {
            let frame = Frame::Data {
                stream_id: id,
                fin: false,
                data: Bytes::copy_from_slice(chunk),
            };
            if !self.frame(frame).await {
                return false;
            }
        }
        true
    }

    /// Half-closes stream `id`: berth sends no more on it.
    pub async fn fin(&self, id: u32) -> bool {
        self.frame(Frame::Data {
            stream_id: id,
            fin: true,
            data: Bytes::new(),
        })
        .await
    }

    /// Refuses stream `id`.
    pub async fn reset(&self, id: u32, status: u32) -> bool {
        self.frame(Frame::RstStream {
            stream_id: id,
            status,
        })
        .await
    }

    /// Ends the connection after everything queued so far.
    pub async fn close(&self) {
        let _ = self.tx.send(Out::Close).await;
    }

    async fn frame(&self, frame: Frame) -> bool {
        self.tx.send(Out::Frame(frame)).await.is_ok()
    }
}

/// Serves SPDY on `io`: returns the writer and the queue of events; the queue ends when the
/// client closes the connection (or it breaks).
pub fn serve<IO>(io: IO) -> (Writer, mpsc::Receiver<Event>)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(QUEUE);
    let (ev_tx, ev_rx) = mpsc::channel::<Event>(64);
    let writer = Writer { tx: out_tx };
    let (gone_tx, mut gone_rx) = tokio::sync::watch::channel(false);
    let done = tokio_util::sync::CancellationToken::new();
    let reader_done = done.clone();

    tokio::spawn(async move {
        let _done = done.drop_guard();
        let mut enc = Encoder::default();
        let mut buf = BytesMut::new();
        let mut last_stream = 0u32;
        while let Some(out) = out_rx.recv().await {
            match out {
                Out::Frame(f) => {
                    if let Frame::SynReply { stream_id, .. } = &f {
                        last_stream = last_stream.max(*stream_id);
                    }
                    enc.encode(&f, &mut buf);
                    // Batch what is already queued into one write.
                    while buf.len() < 64 << 10 {
                        match out_rx.try_recv() {
                            Ok(Out::Frame(f)) => enc.encode(&f, &mut buf),
                            Ok(Out::Close) => {
                                enc.encode(
                                    &Frame::GoAway {
                                        last_good_stream_id: last_stream,
                                        status: 0,
                                    },
                                    &mut buf,
                                );
                                let _ = wr.write_all(&buf).await;
                                return linger(wr, &mut gone_rx).await;
                            }
                            Err(_) => break,
                        }
                    }
                    if wr.write_all(&buf).await.is_err() {
                        return;
                    }
                    buf.clear();
                }
                Out::Close => {
                    enc.encode(
                        &Frame::GoAway {
                            last_good_stream_id: last_stream,
                            status: 0,
                        },
                        &mut buf,
                    );
                    let _ = wr.write_all(&buf).await;
                    return linger(wr, &mut gone_rx).await;
                }
            }
        }
    });

    let replies = writer.clone();
    tokio::spawn(async move {
        let mut dec = Decoder::default();
        let mut buf = BytesMut::with_capacity(16 << 10);
        'read: loop {
            loop {
                let frame = match dec.decode(&mut buf) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(err) => {
                        tracing::debug!(error = %err, "cri streaming: bad spdy frame");
                        break 'read;
                    }
                };
                let event = match frame {
                    Frame::SynStream {
                        stream_id, headers, ..
                    } => {
                        replies
                            .frame(Frame::SynReply {
                                stream_id,
                                fin: false,
                                headers: Headers::new(),
                            })
                            .await;
                        Event::Stream {
                            id: stream_id,
                            headers,
                        }
                    }
                    Frame::Data {
                        stream_id,
                        fin,
                        data,
                    } => Event::Data {
                        id: stream_id,
                        data,
                        fin,
                    },
                    Frame::RstStream { stream_id, .. } => Event::Reset { id: stream_id },
                    // Client-initiated pings have odd ids; echo them.
                    Frame::Ping { id } if id % 2 == 1 => {
                        replies.frame(Frame::Ping { id }).await;
                        continue;
                    }
                    Frame::GoAway { .. } => break 'read,
                    // No flow control (see the module doc of `spdy`), nothing else to act on.
                    _ => continue,
                };
                if ev_tx.send(event).await.is_err() {
                    // The handler is done; keep reading so that pings are answered and the
                    // client's close is seen.
                }
            }
            tokio::select! {
                read = rd.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
                () = reader_done.cancelled() => break,
            }
        }
        let _ = gone_tx.send(true);
    });

    (writer, ev_rx)
}

async fn linger<W: AsyncWrite + Unpin>(mut wr: W, gone: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = wr.flush().await;
    let _ = tokio::time::timeout(LINGER, gone.wait_for(|g| *g)).await;
    let _ = wr.shutdown().await;
}
