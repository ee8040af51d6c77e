//! Docker's stdcopy framing: without a TTY, attach, exec and logs multiplex stdout and stderr
//! on one byte stream as `[stream, 0, 0, 0, len (u32 big-endian)] + payload` frames.

use berth_proto::berth::types::v1::OutputStream;
use bytes::{BufMut, Bytes, BytesMut};

/// Stream id of stdout in a frame header.
pub const STDOUT: u8 = 1;
/// Stream id of stderr in a frame header.
pub const STDERR: u8 = 2;

/// Content type of a multiplexed (framed) stream.
pub const MULTIPLEXED: &str = "application/vnd.docker.multiplexed-stream";
/// Content type of a raw (TTY) stream.
pub const RAW: &str = "application/vnd.docker.raw-stream";

/// The frame stream id for an output stream.
pub fn stream_id(stream: OutputStream) -> u8 {
    match stream {
        OutputStream::Stderr => STDERR,
        OutputStream::Stdout | OutputStream::Unspecified => STDOUT,
    }
}

/// `payload` as one or more frames (a frame holds at most `u32::MAX` bytes).
pub fn frame(stream: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 8);
    for chunk in payload.chunks(u32::MAX as usize) {
        out.put_u8(stream);
        out.put_bytes(0, 3);
        out.put_u32(chunk.len() as u32);
        out.put_slice(chunk);
    }
    out.freeze()
}

/// Output encoder for one attach/exec/logs stream: frames without a TTY, raw bytes with one.
#[derive(Debug, Clone, Copy)]
pub struct Encoder {
    /// The process has a TTY: output is raw.
    pub tty: bool,
}

impl Encoder {
    /// Encodes one chunk of output.
    pub fn encode(self, stream: OutputStream, data: &[u8]) -> Bytes {
        if self.tty {
            Bytes::copy_from_slice(data)
        } else {
            frame(stream_id(stream), data)
        }
    }

    /// The response content type.
    pub fn content_type(self) -> &'static str {
        if self.tty { RAW } else { MULTIPLEXED }
    }
}

/// Splits a framed stream back into `(stream, payload)` pairs; for tests and clients.
pub fn decode(mut data: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while data.len() >= 8 {
        let len = u32::from_be_bytes([data[4], data[5], data[6], data[7]]) as usize;
        let end = (8 + len).min(data.len());
        out.push((data[0], data[8..end].to_vec()));
        data = &data[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = frame(STDOUT, b"hello\n").to_vec();
        buf.extend_from_slice(&frame(STDERR, b"oops"));
        assert_eq!(&buf[..8], &[1, 0, 0, 0, 0, 0, 0, 6]);
        assert_eq!(
            decode(&buf),
            [(1, b"hello\n".to_vec()), (2, b"oops".to_vec())]
        );
        let raw = Encoder { tty: true }.encode(OutputStream::Stderr, b"x");
        assert_eq!(&raw[..], b"x");
        let framed = Encoder { tty: false }.encode(OutputStream::Stderr, b"x");
        assert_eq!(&framed[..], &[2, 0, 0, 0, 0, 0, 0, 1, b'x']);
    }
}
