//! Exec and attach over the wire: Kubernetes' remotecommand protocols, on SPDY streams or on
//! websocket channels (kubelet's `cri/streaming/remotecommand`).
//!
//! SPDY: the client opens one stream per role, named by its `streamType` header — `error`
//! always, `stdin`/`stdout`/`stderr` as requested, `resize` with a TTY (v3 and later). Websocket:
//! every message starts with its channel byte (0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize;
//! v5 adds 255 "close", whose second byte names the channel the client closed). The error
//! stream/channel carries the outcome once, at the end: from v4 on a JSON `metav1.Status`
//! (`Success`, or `Failure` with reason `NonZeroExitCode` and the exit code as an `ExitCode`
//! cause); before v4 only a failure's message, as text.

use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::backend::{ExecSpec, Exit, Input, Output, SessionBackend};
use super::conn::{self, Event};
use super::spdy;

/// How long the client has to open its streams (kubelet's `StreamCreationTimeout`).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The remotecommand protocol versions, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V1,
    V2,
    V3,
    V4,
    V5,
}

/// The SPDY sub-protocols berth speaks, most preferred first (`X-Stream-Protocol-Version`).
pub const SPDY_PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

/// The websocket sub-protocols berth speaks, most preferred first (`Sec-WebSocket-Protocol`).
pub const WS_PROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];

/// The version a negotiated protocol name stands for; `""` (no negotiation) is v1.
pub fn version(protocol: &str) -> Option<Version> {
    Some(match protocol {
        "v5.channel.k8s.io" => Version::V5,
        "v4.channel.k8s.io" | "v4.base64.channel.k8s.io" => Version::V4,
        "v3.channel.k8s.io" => Version::V3,
        "v2.channel.k8s.io" => Version::V2,
        "channel.k8s.io" | "base64.channel.k8s.io" | "" => Version::V1,
        _ => return None,
    })
}

/// What a session is.
#[derive(Debug, Clone)]
pub enum Session {
    Exec(ExecSpec),
    Attach(ExecSpec),
}

impl Session {
    fn spec(&self) -> &ExecSpec {
        match self {
            Session::Exec(s) | Session::Attach(s) => s,
        }
    }
}

/// How a session ended, as the error stream reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    ExitCode(i32),
    Error(String),
}

/// The bytes the error stream carries for `outcome` in `version`; empty for a v1–v3 success.
pub fn status(version: Version, outcome: &Outcome) -> Vec<u8> {
    let message = match outcome {
        Outcome::Success => None,
        Outcome::ExitCode(code) => Some(format!(
            "command terminated with non-zero exit code: command terminated with exit code {code}"
        )),
        Outcome::Error(m) => Some(format!("error executing command in container: {m}")),
    };
    if version < Version::V4 {
        return message.unwrap_or_default().into_bytes();
    }
    let value = match outcome {
        Outcome::Success => serde_json::json!({"metadata": {}, "status": "Success"}),
        Outcome::ExitCode(code) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Outcome::Error(_) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "InternalError",
            "details": {"causes": [{"message": message}]},
            "code": 500,
        }),
    };
    value.to_string().into_bytes()
}

/// Runs `session` on `backend`, fed from `input`, writing to `output`.
pub async fn run(
    backend: &dyn SessionBackend,
    session: Session,
    input: mpsc::Receiver<Input>,
    output: mpsc::Sender<Output>,
) -> Outcome {
    match session {
        Session::Exec(spec) => match backend.exec(spec, input, output).await {
            Ok(Exit::Code(0)) => Outcome::Success,
            Ok(Exit::Code(code)) => Outcome::ExitCode(code),
            Ok(Exit::Failed(m)) => Outcome::Error(m),
            Err(e) => Outcome::Error(e.chain()),
        },
        Session::Attach(spec) => match backend.attach(spec, input, output).await {
            Ok(()) => Outcome::Success,
            Err(e) => Outcome::Error(e.chain()),
        },
    }
}

/// A TTY size as the client sends it on the resize stream (Go's `remotecommand.TerminalSize`).
#[derive(Debug, Deserialize)]
struct TerminalSize {
    #[serde(rename = "Width")]
    width: u16,
    #[serde(rename = "Height")]
    height: u16,
}

/// Decodes the resize stream: a sequence of JSON objects, split across frames anyhow.
#[derive(Debug, Default)]
struct ResizeDecoder {
    buf: Vec<u8>,
}

impl ResizeDecoder {
    fn push(&mut self, data: &[u8]) -> Vec<Input> {
        self.buf.extend_from_slice(data);
        let mut sizes = Vec::new();
        let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<TerminalSize>();
        let mut used = 0;
        loop {
            match it.next() {
                Some(Ok(s)) => {
                    used = it.byte_offset();
                    sizes.push(Input::Resize {
                        width: s.width,
                        height: s.height,
                    });
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(_)) => {
                    // Garbage: drop what is there, as a decoder restart would.
                    used = self.buf.len();
                    break;
                }
                None => {
                    used = self.buf.len();
                    break;
                }
            }
        }
        self.buf.drain(..used);
        sizes
    }
}

#[derive(Debug, Default)]
struct Streams {
    error: Option<u32>,
    stdin: Option<u32>,
    stdout: Option<u32>,
    stderr: Option<u32>,
    resize: Option<u32>,
}

/// Serves `session` on an upgraded SPDY connection speaking `version`.
pub async fn serve_spdy<IO>(
    io: IO,
    version: Version,
    session: Session,
    backend: std::sync::Arc<dyn SessionBackend>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (w, mut events) = conn::serve(io);
    let spec = session.spec().clone();
    let expected = 1
        + usize::from(spec.stdin)
        + usize::from(spec.stdout)
        + usize::from(spec.stderr)
        + usize::from(spec.tty && version >= Version::V3);
    let mut streams = Streams::default();
    // Data that arrives before the last stream is opened.
    let mut early = Vec::new();
    let deadline = tokio::time::sleep(STREAM_CREATION_TIMEOUT);
    tokio::pin!(deadline);
    let mut got = 0;
    while got < expected {
        let event = tokio::select! {
            e = events.recv() => e,
            () = &mut deadline => None,
        };
        match event {
            None => {
                tracing::debug!("cri streaming: the client did not open its streams");
                w.close().await;
                return;
            }
            Some(Event::Stream { id, headers }) => {
                let slot = match spdy::header(&headers, "streamType") {
                    Some("error") => &mut streams.error,
                    Some("stdin") if spec.stdin => &mut streams.stdin,
                    Some("stdout") if spec.stdout => &mut streams.stdout,
                    Some("stderr") if spec.stderr => &mut streams.stderr,
                    Some("resize") if spec.tty => &mut streams.resize,
                    other => {
                        tracing::debug!(stream = ?other, "cri streaming: unexpected stream");
                        w.reset(id, spdy::rst::REFUSED_STREAM).await;
                        continue;
                    }
                };
                if slot.replace(id).is_none() {
                    got += 1;
                }
            }
            Some(other) => early.push(other),
        }
    }

    let (in_tx, in_rx) = mpsc::channel::<Input>(16);
    let (out_tx, mut out_rx) = mpsc::channel::<Output>(16);
    let stdin_id = streams.stdin;
    let resize_id = streams.resize;
    // The client's side: stdin bytes, its end, and resizes.
    let pump_in = tokio::spawn(async move {
        let mut resize = ResizeDecoder::default();
        let mut early = early.into_iter();
        loop {
            let event = match early.next() {
                Some(e) => e,
                None => match events.recv().await {
                    Some(e) => e,
                    None => break,
                },
            };
            let inputs = match event {
                Event::Data { id, data, fin } if Some(id) == stdin_id => {
                    let mut v = Vec::new();
                    if !data.is_empty() {
                        v.push(Input::Stdin(data));
                    }
                    if fin {
                        v.push(Input::CloseStdin);
                    }
                    v
                }
                Event::Reset { id } if Some(id) == stdin_id => vec![Input::CloseStdin],
                Event::Data { id, data, .. } if Some(id) == resize_id => resize.push(&data),
                _ => Vec::new(),
            };
            for i in inputs {
                if in_tx.send(i).await.is_err() {
                    return;
                }
            }
        }
    });
    let writer = w.clone();
    let (stdout_id, stderr_id) = (streams.stdout, streams.stderr);
    let pump_out = tokio::spawn(async move {
        while let Some(out) = out_rx.recv().await {
            let (id, data) = match out {
                Output::Stdout(d) => (stdout_id.or(stderr_id), d),
                Output::Stderr(d) => (stderr_id.or(stdout_id), d),
            };
            if let Some(id) = id {
                writer.data(id, &data).await;
            }
        }
    });

    let outcome = run(&*backend, session, in_rx, out_tx).await;
    let _ = pump_out.await;
    pump_in.abort();
    for id in [streams.stdout, streams.stderr].into_iter().flatten() {
        w.fin(id).await;
    }
    if let Some(id) = streams.error {
        let status = status(version, &outcome);
        if !status.is_empty() {
            w.data(id, &status).await;
        }
        w.fin(id).await;
    }
    w.close().await;
}

/// The websocket sub-protocol in use.
#[derive(Debug, Clone, Copy)]
pub struct WsProtocol {
    pub version: Version,
    /// Text messages: the channel as an ASCII digit, then the data in base64.
    pub base64: bool,
}

impl WsProtocol {
    /// The protocol named `name` (`""`: the client named none).
    pub fn parse(name: &str) -> Option<Self> {
        Some(Self {
            version: version(name)?,
            base64: name.contains("base64"),
        })
    }
}

const CH_STDIN: u8 = 0;
const CH_STDOUT: u8 = 1;
const CH_STDERR: u8 = 2;
const CH_ERROR: u8 = 3;
const CH_RESIZE: u8 = 4;
const CH_CLOSE: u8 = 255;

/// One message on `channel` in `proto`'s encoding.
pub fn ws_message(proto: WsProtocol, channel: u8, data: &[u8]) -> Message {
    if proto.base64 {
        let text = format!(
            "{}{}",
            char::from(b'0' + channel),
            base64::engine::general_purpose::STANDARD.encode(data)
        );
        Message::Text(text.into())
    } else {
        let mut v = Vec::with_capacity(data.len() + 1);
        v.push(channel);
        v.extend_from_slice(data);
        Message::Binary(v.into())
    }
}

/// The close message that ends a session: 1000, normal closure (client-go's websocket
/// executor reads a close without a status as an error).
pub fn normal_close() -> Message {
    Message::Close(Some(axum::extract::ws::CloseFrame {
        code: axum::extract::ws::close_code::NORMAL,
        reason: "".into(),
    }))
}

/// The channel and data of a client message; `None` for control messages and garbage. The
/// frame's opcode does not matter (Go's server reads both; the Python client sends text).
pub fn ws_parse(proto: WsProtocol, msg: Message) -> Option<(u8, Bytes)> {
    let raw: Bytes = match msg {
        Message::Binary(b) => b,
        Message::Text(t) => Bytes::copy_from_slice(t.as_str().as_bytes()),
        _ => return None,
    };
    let (&first, rest) = raw.split_first()?;
    if !proto.base64 {
        return Some((first, raw.slice(1..)));
    }
    let channel = first.checked_sub(b'0')?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .ok()?;
    Some((channel, data.into()))
}

/// Serves `session` on an upgraded websocket speaking `proto`.
pub async fn serve_ws(
    socket: WebSocket,
    proto: WsProtocol,
    session: Session,
    backend: std::sync::Arc<dyn SessionBackend>,
) {
    use futures::{SinkExt, StreamExt};
    let spec = session.spec().clone();
    let (mut tx, mut rx) = socket.split();
    // An empty message on the first channel the server writes says the session is open.
    let first = if spec.stdout {
        CH_STDOUT
    } else if spec.stderr {
        CH_STDERR
    } else {
        CH_ERROR
    };
    if tx.send(ws_message(proto, first, &[])).await.is_err() {
        return;
    }
    let (in_tx, in_rx) = mpsc::channel::<Input>(16);
    let (out_tx, mut out_rx) = mpsc::channel::<Output>(16);
    let (stdin, v5) = (spec.stdin, proto.version >= Version::V5);
    let pump_in = tokio::spawn(async move {
        let mut resize = ResizeDecoder::default();
        while let Some(Ok(msg)) = rx.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
            let inputs = match ws_parse(proto, msg) {
                Some((CH_STDIN, data)) if stdin && !data.is_empty() => vec![Input::Stdin(data)],
                Some((CH_RESIZE, data)) => resize.push(&data),
                Some((CH_CLOSE, data)) if v5 && data.first() == Some(&CH_STDIN) => {
                    vec![Input::CloseStdin]
                }
                _ => Vec::new(),
            };
            for i in inputs {
                if in_tx.send(i).await.is_err() {
                    return;
                }
            }
        }
    });
    let send_out = async {
        while let Some(out) = out_rx.recv().await {
            let (ch, data) = match out {
                Output::Stdout(d) => (CH_STDOUT, d),
                Output::Stderr(d) => (CH_STDERR, d),
            };
            if tx.send(ws_message(proto, ch, &data)).await.is_err() {
                // Keep draining so the session is not blocked on a gone client.
                while out_rx.recv().await.is_some() {}
                return false;
            }
        }
        true
    };
    let (outcome, open) = tokio::join!(run(&*backend, session, in_rx, out_tx), send_out);
    pump_in.abort();
    if open {
        let status = status(proto.version, &outcome);
        if !status.is_empty() {
            let _ = tx.send(ws_message(proto, CH_ERROR, &status)).await;
        }
        let _ = tx.send(normal_close()).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::BytesMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::backend::Fut;
    use crate::streaming::spdy::{Decoder, Encoder, Frame, headers};

    /// Echoes stdin to stdout, reports resizes on stderr, exits with the number of stdin bytes.
    struct Echo;

    impl SessionBackend for Echo {
        fn running(&self, id: &str) -> Fut<'_, String> {
            let id = id.to_string();
            Box::pin(async move { Ok(id) })
        }

        fn exec(
            &self,
            _spec: ExecSpec,
            mut input: mpsc::Receiver<Input>,
            output: mpsc::Sender<Output>,
        ) -> Fut<'_, Exit> {
            Box::pin(async move {
                let mut n = 0;
                while let Some(i) = input.recv().await {
                    match i {
                        Input::Stdin(b) => {
                            n += b.len() as i32;
                            output.send(Output::Stdout(b)).await.unwrap();
                        }
                        Input::Resize { width, height } => {
                            let text = format!("{width}x{height}");
                            output.send(Output::Stderr(text.into())).await.unwrap();
                        }
                        Input::CloseStdin => break,
                    }
                }
                Ok(Exit::Code(n))
            })
        }

        fn attach(
            &self,
            _spec: ExecSpec,
            _input: mpsc::Receiver<Input>,
            _output: mpsc::Sender<Output>,
        ) -> Fut<'_, ()> {
            Box::pin(async { Ok(()) })
        }

        fn exec_sync(
            &self,
            _spec: ExecSpec,
            _timeout: Option<Duration>,
        ) -> Fut<'_, (Vec<u8>, Vec<u8>, i32)> {
            Box::pin(async { Ok((Vec::new(), Vec::new(), 0)) })
        }
    }

    #[tokio::test]
    async fn a_spdy_session_end_to_end_over_a_pipe() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let spec = ExecSpec {
            container_id: "c".into(),
            cmd: vec!["cat".into()],
            tty: false,
            stdin: true,
            stdout: true,
            stderr: true,
        };
        tokio::spawn(serve_spdy(
            server,
            Version::V4,
            Session::Exec(spec),
            Arc::new(Echo),
        ));
        let (mut rd, mut wr) = tokio::io::split(client);
        let mut enc = Encoder::default();
        let mut out = BytesMut::new();
        let syn = |id: u32, kind: &str| Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: headers([("streamType", kind)]),
        };
        // An unknown stream is refused; the session does not wait for it.
        for f in [
            syn(1, "error"),
            syn(3, "stdin"),
            syn(5, "stdout"),
            syn(7, "bogus"),
            syn(9, "stderr"),
            Frame::Ping { id: 11 },
            Frame::Data {
                stream_id: 3,
                fin: false,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                stream_id: 3,
                fin: true,
                data: Bytes::from_static(b"!"),
            },
        ] {
            enc.encode(&f, &mut out);
        }
        wr.write_all(&out).await.unwrap();

        let mut dec = Decoder::default();
        let mut buf = BytesMut::new();
        let (mut stdout, mut status) = (Vec::new(), Vec::new());
        let (mut replies, mut fins, mut resets, mut pongs) =
            (Vec::new(), Vec::new(), Vec::new(), 0);
        // The session ends with a GOAWAY (the loop's only way out).
        'read: loop {
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                match f {
                    Frame::SynReply { stream_id, .. } => replies.push(stream_id),
                    Frame::RstStream { stream_id, .. } => resets.push(stream_id),
                    Frame::Ping { id: 11 } => pongs += 1,
                    Frame::Data {
                        stream_id,
                        fin,
                        data,
                    } => {
                        match stream_id {
                            5 => stdout.extend_from_slice(&data),
                            1 => status.extend_from_slice(&data),
                            _ => {}
                        }
                        if fin {
                            fins.push(stream_id);
                        }
                    }
                    Frame::GoAway { .. } => break 'read,
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert!(rd.read_buf(&mut buf).await.unwrap() > 0, "closed early");
        }
        assert_eq!(replies, [1, 3, 5, 7, 9]);
        assert_eq!(resets, [7]);
        assert_eq!(pongs, 1);
        assert_eq!(stdout, b"hello!");
        fins.sort();
        assert_eq!(fins, [1, 5, 9]);
        let s: serde_json::Value = serde_json::from_slice(&status).unwrap();
        assert_eq!(s["details"]["causes"][0]["message"], "6");
    }

    #[test]
    fn the_error_stream_speaks_metav1_status_from_v4() {
        let s: serde_json::Value =
            serde_json::from_slice(&status(Version::V4, &Outcome::ExitCode(3))).unwrap();
        assert_eq!(s["status"], "Failure");
        assert_eq!(s["reason"], "NonZeroExitCode");
        assert_eq!(s["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(s["details"]["causes"][0]["message"], "3");
        let ok: serde_json::Value =
            serde_json::from_slice(&status(Version::V5, &Outcome::Success)).unwrap();
        assert_eq!(ok, serde_json::json!({"metadata": {}, "status": "Success"}));
        assert!(status(Version::V3, &Outcome::Success).is_empty());
        let text = String::from_utf8(status(Version::V2, &Outcome::ExitCode(3))).unwrap();
        assert!(text.ends_with("exit code 3"), "{text}");
    }

    #[test]
    fn resize_objects_split_across_frames() {
        let mut d = ResizeDecoder::default();
        assert_eq!(d.push(br#"{"Width":80,"#), vec![]);
        assert_eq!(
            d.push(br#""Height":24}{"Width":100,"Height":30}{"Wi"#),
            vec![
                Input::Resize {
                    width: 80,
                    height: 24
                },
                Input::Resize {
                    width: 100,
                    height: 30
                }
            ]
        );
        assert_eq!(
            d.push(br#"dth":1,"Height":2}"#),
            vec![Input::Resize {
                width: 1,
                height: 2
            }]
        );
    }

    #[test]
    fn websocket_channel_framing() {
        let bin = WsProtocol::parse("v5.channel.k8s.io").unwrap();
        assert_eq!(bin.version, Version::V5);
        let m = ws_message(bin, CH_STDOUT, b"hi");
        assert_eq!(m, Message::Binary(vec![1, b'h', b'i'].into()));
        assert_eq!(ws_parse(bin, m), Some((1, Bytes::from_static(b"hi"))));
        assert_eq!(
            ws_parse(bin, Message::Binary(vec![CH_CLOSE, CH_STDIN].into())),
            Some((CH_CLOSE, Bytes::from_static(&[0])))
        );
        assert_eq!(ws_parse(bin, Message::Binary(Bytes::new())), None);
        // A text frame in a binary protocol (the Kubernetes Python client's stdin).
        assert_eq!(
            ws_parse(bin, Message::Text("\u{0}abc".into())),
            Some((0, Bytes::from_static(b"abc")))
        );

        let b64 = WsProtocol::parse("v4.base64.channel.k8s.io").unwrap();
        assert_eq!(b64.version, Version::V4);
        let m = ws_message(b64, CH_STDERR, b"hi");
        assert_eq!(m, Message::Text("2aGk=".into()));
        assert_eq!(ws_parse(b64, m), Some((2, Bytes::from_static(b"hi"))));
        assert_eq!(WsProtocol::parse("").unwrap().version, Version::V1);
        assert!(WsProtocol::parse("v9.channel.k8s.io").is_none());
    }
}
