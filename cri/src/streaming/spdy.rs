//! SPDY/3.1 framing, as far as Kubernetes' streaming protocols use it (the draft
//! `draft-mbelshe-httpbis-spdy-00` framing layer, version 3; 3.1 only adds session flow control,
//! which kubelet's client — moby/spdystream — neither sends nor enforces).
//!
//! Every frame has an 8-byte header. A control frame: `1` bit, 15-bit version (3), 16-bit type,
//! 8-bit flags, 24-bit length. A data frame: `0` bit, 31-bit stream id, flags, length. Header
//! blocks (SYN_STREAM, SYN_REPLY, HEADERS) are zlib-compressed with the SPDY/3 dictionary, one
//! zlib stream per direction for the life of the connection, each block ending in a sync flush.

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The SPDY version of every control frame.
pub const VERSION: u16 = 3;
/// FLAG_FIN on data frames and SYN_STREAM / SYN_REPLY / HEADERS.
pub const FLAG_FIN: u8 = 0x01;
/// FLAG_UNIDIRECTIONAL on SYN_STREAM.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// The largest frame payload (24-bit length).
pub const MAX_PAYLOAD: usize = (1 << 24) - 1;
/// What berth puts in one data frame (spdystream reads frames of any size; smaller frames keep
/// one stream from holding the connection).
pub const DATA_CHUNK: usize = 32 << 10;
/// The most header bytes one block may inflate to: a bound on a hostile peer.
const MAX_HEADER_BLOCK: usize = 1 << 20;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_NOOP: u16 = 5;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// RST_STREAM status codes (the ones berth sends).
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const CANCEL: u32 = 5;
}

/// Header names and their values; a name with several values carries them NUL-separated on the
/// wire. Names are lowercase (SPDY/3 requires it).
pub type Headers = BTreeMap<String, Vec<String>>;

/// One SPDY frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream_id: u32,
        fin: bool,
        data: Bytes,
    },
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        /// (flags, id, value) triples.
        entries: Vec<(u8, u32, u32)>,
    },
    Noop,
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
}

/// A framing error: the connection cannot go on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("spdy: unsupported version {0}")]
    Version(u16),
    #[error("spdy: {0} frame of {1} bytes is malformed")]
    Malformed(&'static str, usize),
    #[error("spdy: header block: {0}")]
    HeaderBlock(String),
    #[error("spdy: frame of {0} bytes is too large")]
    TooLarge(usize),
}

/// The SPDY/3 header compression dictionary (draft section 2.6.10.1): length-prefixed header
/// names and values, then a run of common text. It must be byte-exact: zlib checks its adler32.
pub fn dictionary() -> Vec<u8> {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &str = concat!(
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417",
        "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently",
        "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error",
        "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct ",
        "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,",
        "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,",
        "publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
    );
    let mut d = Vec::with_capacity(1423);
    for w in WORDS {
        d.extend_from_slice(&(w.len() as u32).to_be_bytes());
        d.extend_from_slice(w.as_bytes());
    }
    d.extend_from_slice(TAIL.as_bytes());
    d
}

/// One direction's header compression: a single zlib stream with the dictionary.
#[derive(Debug)]
pub struct HeaderEncoder {
    z: Compress,
}

impl Default for HeaderEncoder {
    fn default() -> Self {
        let mut z = Compress::new(Compression::default(), true);
        z.set_dictionary(&dictionary())
            .expect("a fresh zlib stream takes a dictionary");
        Self { z }
    }
}

impl HeaderEncoder {
    /// The compressed block of `headers`.
    pub fn encode(&mut self, headers: &Headers) -> Vec<u8> {
        let mut raw = BytesMut::new();
        raw.put_u32(headers.len() as u32);
        for (name, values) in headers {
            let name = name.to_ascii_lowercase();
            raw.put_u32(name.len() as u32);
            raw.put_slice(name.as_bytes());
            let value = values.join("\0");
            raw.put_u32(value.len() as u32);
            raw.put_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input: &[u8] = &raw;
        loop {
            out.reserve(256);
            let before = self.z.total_in();
            self.z
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .expect("deflate of an in-memory buffer");
            input = &input[(self.z.total_in() - before) as usize..];
            // Done when everything is in and the flush had room to finish.
            if input.is_empty() && out.len() < out.capacity() {
                return out;
            }
        }
    }
}

/// One direction's header decompression.
#[derive(Debug)]
pub struct HeaderDecoder {
    z: Decompress,
}

impl Default for HeaderDecoder {
    fn default() -> Self {
        Self {
            z: Decompress::new(true),
        }
    }
}

impl HeaderDecoder {
    /// The headers of one compressed block.
    pub fn decode(&mut self, block: &[u8]) -> Result<Headers, FrameError> {
        let bad = |m: String| FrameError::HeaderBlock(m);
        let mut raw = Vec::with_capacity(block.len() * 4 + 64);
        let mut input = block;
        loop {
            raw.reserve(1024);
            let before = self.z.total_in();
            let res = self
                .z
                .decompress_vec(input, &mut raw, FlushDecompress::Sync);
            input = &input[(self.z.total_in() - before) as usize..];
            match res {
                Ok(Status::StreamEnd) => return Err(bad("zlib stream ended".into())),
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(&dictionary())
                        .map_err(|e| bad(format!("dictionary: {e}")))?;
                }
                Err(e) => return Err(bad(e.to_string())),
            }
            if raw.len() > MAX_HEADER_BLOCK {
                return Err(bad("too large".into()));
            }
            if input.is_empty() && raw.len() < raw.capacity() {
                break;
            }
        }
        parse_header_block(&raw).ok_or_else(|| bad("truncated".into()))
    }
}

fn parse_header_block(mut raw: &[u8]) -> Option<Headers> {
    fn take<'a>(raw: &mut &'a [u8]) -> Option<&'a [u8]> {
        if raw.len() < 4 {
            return None;
        }
        let n = raw.get_u32() as usize;
        if raw.len() < n {
            return None;
        }
        let (s, rest) = raw.split_at(n);
        *raw = rest;
        Some(s)
    }
    if raw.len() < 4 {
        return None;
    }
    let count = raw.get_u32();
    let mut headers = Headers::new();
    for _ in 0..count {
        let name = String::from_utf8_lossy(take(&mut raw)?).to_ascii_lowercase();
        let value = String::from_utf8_lossy(take(&mut raw)?).into_owned();
        headers
            .entry(name)
            .or_default()
            .extend(value.split('\0').map(str::to_string));
    }
    Some(headers)
}

/// Encodes frames, compressing header blocks with this direction's zlib stream.
#[derive(Debug, Default)]
pub struct Encoder {
    headers: HeaderEncoder,
}

impl Encoder {
    /// Appends `frame` to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut BytesMut) {
        let control = |out: &mut BytesMut, kind: u16, flags: u8, body: &[u8]| {
            out.put_u16(0x8000 | VERSION);
            out.put_u16(kind);
            out.put_u32((u32::from(flags) << 24) | body.len() as u32);
            out.put_slice(body);
        };
        let mut body = BytesMut::new();
        match frame {
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                out.put_u32(stream_id & 0x7fff_ffff);
                out.put_u32((u32::from(if *fin { FLAG_FIN } else { 0 }) << 24) | data.len() as u32);
                out.put_slice(data);
            }
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                headers,
            } => {
                body.put_u32(stream_id & 0x7fff_ffff);
                body.put_u32(associated_to & 0x7fff_ffff);
                body.put_u8((priority & 0x7) << 5);
                body.put_u8(0);
                body.put_slice(&self.headers.encode(headers));
                control(out, TYPE_SYN_STREAM, *flags, &body);
            }
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            } => {
                body.put_u32(stream_id & 0x7fff_ffff);
                body.put_slice(&self.headers.encode(headers));
                control(out, TYPE_SYN_REPLY, fin_flag(*fin), &body);
            }
            Frame::Headers {
                stream_id,
                fin,
                headers,
            } => {
                body.put_u32(stream_id & 0x7fff_ffff);
                body.put_slice(&self.headers.encode(headers));
                control(out, TYPE_HEADERS, fin_flag(*fin), &body);
            }
            Frame::RstStream { stream_id, status } => {
                body.put_u32(stream_id & 0x7fff_ffff);
                body.put_u32(*status);
                control(out, TYPE_RST_STREAM, 0, &body);
            }
            Frame::Settings { entries } => {
                body.put_u32(entries.len() as u32);
                for (flags, id, value) in entries {
                    body.put_u32((u32::from(*flags) << 24) | (id & 0xff_ffff));
                    body.put_u32(*value);
                }
                control(out, TYPE_SETTINGS, 0, &body);
            }
            Frame::Noop => control(out, TYPE_NOOP, 0, &[]),
            Frame::Ping { id } => control(out, TYPE_PING, 0, &id.to_be_bytes()),
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                body.put_u32(last_good_stream_id & 0x7fff_ffff);
                body.put_u32(*status);
                control(out, TYPE_GOAWAY, 0, &body);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                body.put_u32(stream_id & 0x7fff_ffff);
                body.put_u32(delta & 0x7fff_ffff);
                control(out, TYPE_WINDOW_UPDATE, 0, &body);
            }
        }
    }
}

fn fin_flag(fin: bool) -> u8 {
    if fin { FLAG_FIN } else { 0 }
}

/// Decodes frames, inflating header blocks with this direction's zlib stream.
#[derive(Debug, Default)]
pub struct Decoder {
    headers: HeaderDecoder,
}

impl Decoder {
    /// The next whole frame at the start of `buf` (consumed), or `None` until more bytes
    /// arrive. Unknown control frame types are skipped, as the spec asks.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        loop {
            if buf.len() < 8 {
                return Ok(None);
            }
            let word = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let flags = buf[4];
            let len = (u32::from_be_bytes([0, buf[5], buf[6], buf[7]])) as usize;
            if buf.len() < 8 + len {
                buf.reserve(8 + len - buf.len());
                return Ok(None);
            }
            buf.advance(8);
            let mut body = buf.split_to(len).freeze();
            if word & 0x8000_0000 == 0 {
                return Ok(Some(Frame::Data {
                    stream_id: word,
                    fin: flags & FLAG_FIN != 0,
                    data: body,
                }));
            }
            let version = ((word >> 16) & 0x7fff) as u16;
            if version != VERSION {
                return Err(FrameError::Version(version));
            }
            let fin = flags & FLAG_FIN != 0;
            let need = |min: usize, name: &'static str| {
                if len < min {
                    Err(FrameError::Malformed(name, len))
                } else {
                    Ok(())
                }
            };
            let frame = match (word & 0xffff) as u16 {
                TYPE_SYN_STREAM => {
                    need(10, "SYN_STREAM")?;
                    let stream_id = body.get_u32() & 0x7fff_ffff;
                    let associated_to = body.get_u32() & 0x7fff_ffff;
                    let priority = body.get_u8() >> 5;
                    body.advance(1);
                    Frame::SynStream {
                        stream_id,
                        associated_to,
                        priority,
                        flags,
                        headers: self.headers.decode(&body)?,
                    }
                }
                TYPE_SYN_REPLY => {
                    need(4, "SYN_REPLY")?;
                    let stream_id = body.get_u32() & 0x7fff_ffff;
                    Frame::SynReply {
                        stream_id,
                        fin,
                        headers: self.headers.decode(&body)?,
                    }
                }
                TYPE_HEADERS => {
                    need(4, "HEADERS")?;
                    let stream_id = body.get_u32() & 0x7fff_ffff;
                    Frame::Headers {
                        stream_id,
                        fin,
                        headers: self.headers.decode(&body)?,
                    }
                }
                TYPE_RST_STREAM => {
                    need(8, "RST_STREAM")?;
                    Frame::RstStream {
                        stream_id: body.get_u32() & 0x7fff_ffff,
                        status: body.get_u32(),
                    }
                }
                TYPE_SETTINGS => {
                    need(4, "SETTINGS")?;
                    let n = body.get_u32() as usize;
                    if body.len() < n.saturating_mul(8) {
                        return Err(FrameError::Malformed("SETTINGS", len));
                    }
                    let entries = (0..n)
                        .map(|_| {
                            let fid = body.get_u32();
                            ((fid >> 24) as u8, fid & 0xff_ffff, body.get_u32())
                        })
                        .collect();
                    Frame::Settings { entries }
                }
                TYPE_NOOP => Frame::Noop,
                TYPE_PING => {
                    need(4, "PING")?;
                    Frame::Ping { id: body.get_u32() }
                }
                TYPE_GOAWAY => {
                    need(8, "GOAWAY")?;
                    Frame::GoAway {
                        last_good_stream_id: body.get_u32() & 0x7fff_ffff,
                        status: body.get_u32(),
                    }
                }
                TYPE_WINDOW_UPDATE => {
                    need(8, "WINDOW_UPDATE")?;
                    Frame::WindowUpdate {
                        stream_id: body.get_u32() & 0x7fff_ffff,
                        delta: body.get_u32() & 0x7fff_ffff,
                    }
                }
                _ => continue,
            };
            return Ok(Some(frame));
        }
    }
}

/// `headers` with one value per name, from `pairs`.
pub fn headers<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Headers {
    let mut h = Headers::new();
    for (k, v) in pairs {
        h.entry(k.to_ascii_lowercase())
            .or_default()
            .push(v.to_string());
    }
    h
}

/// The first value of header `name` (case-insensitive, as Go's `http.Header.Get`).
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .get(&name.to_ascii_lowercase())
        .and_then(|v| v.first())
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use sha2::Digest;

    use super::*;

    #[test]
    fn the_dictionary_is_the_specs() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        // The sha256 of Go's `headerDictionary` (moby/spdystream spdy/dictionary.go), which
        // kubelet's client uses; the adler32 is the DICTID zlib puts in the stream header.
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&d)),
            "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"
        );
        let mut enc = HeaderEncoder::default();
        let block = enc.encode(&headers([("streamtype", "error")]));
        // zlib header (CMF, FLG with FDICT), then the DICTID.
        assert_eq!(block[1] & 0x20, 0x20, "FDICT set");
        assert_eq!(block[2..6], 0xe3c6_a7c2u32.to_be_bytes());
    }

    #[test]
    fn header_blocks_share_one_zlib_stream_per_direction() {
        let mut enc = HeaderEncoder::default();
        let mut dec = HeaderDecoder::default();
        let a = headers([("streamType", "stdout"), ("port", "80")]);
        let mut b = headers([("streamtype", "error")]);
        b.entry("x".into()).or_default().push("two".into());
        b.get_mut("x").unwrap().push("values".into());
        for h in [&a, &b, &a, &Headers::new()] {
            let block = enc.encode(h);
            let got = dec.decode(&block).unwrap();
            let want: Headers = h
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect();
            assert_eq!(got, want);
        }
        assert_eq!(header(&dec_roundtrip(&a), "StreamType"), Some("stdout"));
        // A block from another stream (a fresh compressor) cannot be read mid-stream.
        let stray = HeaderEncoder::default().encode(&a);
        assert!(dec.decode(&stray).is_err());
    }

    fn dec_roundtrip(h: &Headers) -> Headers {
        HeaderDecoder::default()
            .decode(&HeaderEncoder::default().encode(h))
            .unwrap()
    }

    #[test]
    fn frames_round_trip() {
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: headers([("streamtype", "error")]),
            },
            Frame::SynStream {
                stream_id: 3,
                associated_to: 1,
                priority: 7,
                flags: FLAG_UNIDIRECTIONAL | FLAG_FIN,
                headers: headers([("streamtype", "stdin"), ("requestid", "0")]),
            },
            Frame::SynReply {
                stream_id: 3,
                fin: false,
                headers: Headers::new(),
            },
            Frame::Headers {
                stream_id: 3,
                fin: true,
                headers: headers([("a", "b")]),
            },
            Frame::Data {
                stream_id: 3,
                fin: false,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                stream_id: 5,
                fin: true,
                data: Bytes::new(),
            },
            Frame::RstStream {
                stream_id: 7,
                status: rst::CANCEL,
            },
            Frame::Settings {
                entries: vec![(0, 7, 65536), (1, 4, 100)],
            },
            Frame::Noop,
            Frame::Ping { id: 2 },
            Frame::GoAway {
                last_good_stream_id: 5,
                status: 0,
            },
            Frame::WindowUpdate {
                stream_id: 1,
                delta: 4096,
            },
        ];
        let mut enc = Encoder::default();
        let mut wire = BytesMut::new();
        for f in &frames {
            enc.encode(f, &mut wire);
        }
        // Byte layout of two simple frames, as the draft draws them.
        let mut ping = BytesMut::new();
        Encoder::default().encode(&Frame::Ping { id: 2 }, &mut ping);
        assert_eq!(&ping[..], [0x80, 3, 0, 6, 0, 0, 0, 4, 0, 0, 0, 2]);
        let mut data = BytesMut::new();
        Encoder::default().encode(
            &Frame::Data {
                stream_id: 3,
                fin: true,
                data: Bytes::from_static(b"hi"),
            },
            &mut data,
        );
        assert_eq!(&data[..], [0, 0, 0, 3, 1, 0, 0, 2, b'h', b'i']);

        // Fed a byte at a time, the decoder waits for whole frames.
        let mut dec = Decoder::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            buf.put_u8(*b);
            while let Some(f) = dec.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        assert!(buf.is_empty());
    }

    #[test]
    fn bad_frames_are_errors_and_unknown_types_are_skipped() {
        let mut dec = Decoder::default();
        let mut buf = BytesMut::from(&[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1][..]);
        assert_eq!(dec.decode(&mut buf), Err(FrameError::Version(2)));
        let mut buf = BytesMut::from(&[0x80, 3, 0, 3, 0, 0, 0, 2, 0, 0][..]);
        assert!(matches!(
            dec.decode(&mut buf),
            Err(FrameError::Malformed("RST_STREAM", 2))
        ));
        let mut buf = BytesMut::from(
            &[
                0x80, 3, 0, 0x63, 0, 0, 0, 1, 9, // unknown type 0x63
                0x80, 3, 0, 6, 0, 0, 0, 4, 0, 0, 0, 9,
            ][..],
        );
        assert_eq!(dec.decode(&mut buf), Ok(Some(Frame::Ping { id: 9 })));
    }
}
