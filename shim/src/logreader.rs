//! Reading a container log written by [`crate::logger`]: over the whole rotated set, filtered
//! by stream and time, the last N entries, and following new entries (across rotations) until
//! the output ends.
//!
//! Reads run on a blocking thread (file reads must not stall the shim's event loop) and hand
//! batches to the caller through a small channel, so a slow client holds back only its reader.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, SystemTime};

use berth_core::{Error, Result};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::logger::{LogFormat, LogOptions, LogPosition, LogTracker, Stream};
use crate::rfc3339;

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// The stream it was written to.
    pub stream: Stream,
    /// When the shim read it.
    pub time: SystemTime,
    /// The bytes, with their newline when the line had one.
    pub data: Vec<u8>,
    /// A fragment of a longer line that continues in the next entry of the same stream.
    pub partial: bool,
    /// Attributes recorded with it.
    pub attrs: BTreeMap<String, String>,
}

/// What to read.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    /// Only entries at or after this time.
    pub since: Option<SystemTime>,
    /// Only entries at or before this time.
    pub until: Option<SystemTime>,
    /// Only the last N matching entries of what is already written.
    pub tail: Option<u64>,
    /// Keep streaming new entries until the output ends.
    pub follow: bool,
    /// Include stdout entries.
    pub stdout: bool,
    /// Include stderr entries.
    pub stderr: bool,
}

impl ReadOptions {
    fn wants(&self, e: &LogEntry) -> bool {
        let stream_ok = match e.stream {
            Stream::Stdout => self.stdout,
            Stream::Stderr => self.stderr,
        };
        stream_ok
            && self.since.is_none_or(|s| e.time >= s)
            && self.until.is_none_or(|u| e.time <= u)
    }
}

/// Parses one line of a log in `format` (without its newline).
pub fn parse_line(format: LogFormat, line: &[u8]) -> Option<LogEntry> {
    match format {
        LogFormat::JsonFile => {
            #[derive(Deserialize)]
            struct Json {
                log: String,
                stream: String,
                time: String,
                #[serde(default)]
                attrs: BTreeMap<String, String>,
            }
            let j: Json = serde_json::from_slice(line).ok()?;
            let stream = parse_stream(&j.stream)?;
            let partial = !j.log.ends_with('\n');
            Some(LogEntry {
                stream,
                time: rfc3339::parse(&j.time)?,
                // A json-file line has no partial flag; a line without newline is a fragment
                // unless it was the last output of the stream (which a reader cannot know).
                partial,
                data: j.log.into_bytes(),
                attrs: j.attrs,
            })
        }
        LogFormat::Cri => {
            let text = std::str::from_utf8(line).ok()?;
            let mut parts = text.splitn(4, ' ');
            let time = rfc3339::parse(parts.next()?)?;
            let stream = parse_stream(parts.next()?)?;
            let partial = match parts.next()? {
                "P" => true,
                "F" => false,
                _ => return None,
            };
            let mut data = parts.next().unwrap_or("").as_bytes().to_vec();
            if !partial {
                data.push(b'\n');
            }
            Some(LogEntry {
                stream,
                time,
                data,
                partial,
                attrs: BTreeMap::new(),
            })
        }
    }
}

fn parse_stream(s: &str) -> Option<Stream> {
    match s {
        "stdout" => Some(Stream::Stdout),
        "stderr" => Some(Stream::Stderr),
        _ => None,
    }
}

/// Entries per batch handed to the caller.
const BATCH: usize = 256;

/// Starts reading; batches of entries arrive on the returned channel, which closes at the end
/// (or on the first error, which is sent last).
///
/// `tracker` follows the writer (needed to follow, and to know which file is which across
/// rotations). `stop_at` bounds the read at a position the writer reported (for replay before
/// live output). Without a writer (`tracker` is `None`) the set is read as it is.
pub fn read(
    log: LogOptions,
    tracker: Option<LogTracker>,
    opts: ReadOptions,
    stop_at: Option<LogPosition>,
) -> mpsc::Receiver<Result<Vec<LogEntry>>> {
    let (tx, rx) = mpsc::channel(2);
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let mut reader = Reader {
            log,
            tracker,
            opts,
            stop_at,
            tx: tx.clone(),
            handle,
            batch: Vec::new(),
        };
        if let Err(err) = reader.run() {
            let _ = tx.blocking_send(Err(err));
        }
    });
    rx
}

/// The client went away; stop quietly.
struct Gone;

impl From<Gone> for Error {
    fn from(_: Gone) -> Self {
        Error::new(berth_core::ErrorKind::Cancelled, "log reader closed")
    }
}

struct Reader {
    log: LogOptions,
    tracker: Option<LogTracker>,
    opts: ReadOptions,
    stop_at: Option<LogPosition>,
    tx: mpsc::Sender<Result<Vec<LogEntry>>>,
    handle: tokio::runtime::Handle,
    batch: Vec<LogEntry>,
}

/// An open file of the rotated set and how far it has been read.
struct Cursor {
    file: File,
    generation: u64,
    offset: u64,
    /// Bytes after the last newline, waiting for the rest of their line.
    carry: Vec<u8>,
}

impl Reader {
    fn current(&self) -> LogPosition {
        match &self.tracker {
            Some(t) => *t.position.borrow(),
            None => LogPosition {
                generation: 0,
                offset: u64::MAX,
                closed: true,
            },
        }
    }

    /// Runs `f` while no rotation can happen.
    fn locked<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.tracker {
            Some(t) => {
                let _guard = t.rotation.read().unwrap_or_else(|e| e.into_inner());
                f()
            }
            None => f(),
        }
    }

    /// Opens every file of the set, oldest first, with the generation each belongs to.
    fn open_set(&self) -> Vec<Cursor> {
        self.locked(|| {
            let current = self.current().generation;
            let mut files = Vec::new();
            for index in (0..self.log.max_file.max(1)).rev() {
                if let Ok(file) = File::open(self.log.file(index)) {
                    let generation = current.saturating_sub(u64::from(index));
                    files.push(Cursor {
                        file,
                        generation,
                        offset: 0,
                        carry: Vec::new(),
                    });
                }
            }
            files
        })
    }

    /// Opens the file of `generation`, if it is still in the set.
    fn open_generation(&self, generation: u64) -> Option<Cursor> {
        self.locked(|| {
            let current = self.current().generation;
            let index = current.checked_sub(generation)?;
            if index >= u64::from(self.log.max_file.max(1)) {
                return None;
            }
            let file = File::open(self.log.file(index as u32)).ok()?;
            Some(Cursor {
                file,
                generation,
                offset: 0,
                carry: Vec::new(),
            })
        })
    }

    fn run(&mut self) -> Result<()> {
        let mut files = self.open_set();
        match self.run_inner(&mut files) {
            Err(e) if e.is(berth_core::ErrorKind::Cancelled) => Ok(()),
            other => other,
        }
    }

    /// How far file generation `generation` may be read: all of it, up to the stop mark, or
    /// (past the mark) nothing.
    fn limit(&self, generation: u64) -> u64 {
        match self.stop_at {
            Some(s) if generation > s.generation => 0,
            Some(s) if generation == s.generation => s.offset,
            _ => u64::MAX,
        }
    }

    fn run_inner(&mut self, files: &mut Vec<Cursor>) -> Result<()> {
        let Some(mut last) = files.pop() else {
            if !self.opts.follow {
                return Ok(());
            }
            // Nothing written yet: follow from the first file that appears.
            return self.follow(None);
        };
        // The newest file is read up to what the writer has published (a line boundary);
        // followers continue from there.
        let len = last.file.metadata().map(|m| m.len()).unwrap_or(0);
        let published = self.current();
        let end = if published.generation == last.generation {
            len.min(published.offset)
        } else {
            len
        };
        let end = end.min(self.limit(last.generation));

        if let Some(n) = self.opts.tail {
            let mut wanted = n as usize;
            let mut chunks: Vec<Vec<LogEntry>> = Vec::new();
            let newest = self.tail_file(&mut last.file, end, wanted)?;
            wanted -= newest.len();
            chunks.push(newest);
            for cur in files.iter_mut().rev() {
                if wanted == 0 {
                    break;
                }
                let len = cur.file.metadata().map(|m| m.len()).unwrap_or(0);
                let got =
                    self.tail_file(&mut cur.file, len.min(self.limit(cur.generation)), wanted)?;
                wanted -= got.len();
                chunks.push(got);
            }
            for chunk in chunks.into_iter().rev() {
                for e in chunk {
                    self.push(e)?;
                }
            }
            last.file.seek(SeekFrom::Start(end)).map_err(io_err)?;
            last.offset = end;
        } else {
            for mut cur in files.drain(..) {
                let limit = self.limit(cur.generation);
                if !self.drain(&mut cur, limit)? {
                    return self.flush();
                }
            }
            if !self.drain(&mut last, end)? {
                return self.flush();
            }
        }
        if self.opts.follow {
            self.follow(Some(last))
        } else {
            self.flush()
        }
    }

    /// Reads `cur` from its offset up to `end` bytes, emitting every complete line. Returns
    /// `false` when following must stop because an entry is past `until`.
    fn drain(&mut self, cur: &mut Cursor, end: u64) -> Result<bool> {
        let mut buf = vec![0u8; 64 * 1024];
        while cur.offset < end {
            let want = (end - cur.offset).min(buf.len() as u64) as usize;
            let n = cur.file.read(&mut buf[..want]).map_err(io_err)?;
            if n == 0 {
                break;
            }
            cur.offset += n as u64;
            cur.carry.extend_from_slice(&buf[..n]);
            let Some(last_nl) = cur.carry.iter().rposition(|&b| b == b'\n') else {
                continue;
            };
            let rest = cur.carry.split_off(last_nl + 1);
            let complete = std::mem::replace(&mut cur.carry, rest);
            for line in complete.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                if let Some(e) = parse_line(self.log.format, line) {
                    if self.past_until(&e) {
                        return Ok(false);
                    }
                    if self.opts.wants(&e) {
                        self.push(e)?;
                    }
                }
            }
        }
        Ok(true)
    }

    fn past_until(&self, e: &LogEntry) -> bool {
        self.opts.follow && self.opts.until.is_some_and(|u| e.time > u)
    }

    /// The last `n` matching entries of `file` before byte `end`, oldest first.
    fn tail_file(&self, file: &mut File, end: u64, n: usize) -> Result<Vec<LogEntry>> {
        let mut found: VecDeque<LogEntry> = VecDeque::new();
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut pos = end;
        // Bytes from the start of an incomplete line (at the block boundary) to the last line end.
        let mut tail: Vec<u8> = Vec::new();
        let block = 64 * 1024u64;
        while pos > 0 && found.len() < n {
            let start = pos.saturating_sub(block);
            let mut buf = vec![0u8; (pos - start) as usize];
            file.seek(SeekFrom::Start(start)).map_err(io_err)?;
            file.read_exact(&mut buf).map_err(io_err)?;
            buf.extend_from_slice(&tail);
            // Everything after the first newline is whole lines (unless start is 0).
            let cut = if start == 0 {
                0
            } else {
                buf.iter()
                    .position(|&b| b == b'\n')
                    .map_or(buf.len(), |p| p + 1)
            };
            tail = buf[..cut].to_vec();
            for line in buf[cut..].rsplit(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                if let Some(e) = parse_line(self.log.format, line)
                    && self.opts.wants(&e)
                {
                    found.push_front(e);
                    if found.len() == n {
                        break;
                    }
                }
            }
            pos = start;
        }
        Ok(found.into())
    }

    /// Streams new entries until the writer closes the log (or `stop_at` is reached).
    fn follow(&mut self, mut cur: Option<Cursor>) -> Result<()> {
        let Some(mut position) = self.tracker.as_ref().map(|t| t.position.clone()) else {
            return self.flush();
        };
        loop {
            let pos = *position.borrow_and_update();
            if let Some(c) = cur.as_mut() {
                let limit = self.limit(c.generation);
                if !self.drain(c, limit)? {
                    return self.flush();
                }
                if let Some(s) = self.stop_at
                    && (c.generation > s.generation
                        || (c.generation == s.generation && c.offset >= s.offset))
                {
                    return self.flush();
                }
                if pos.generation > c.generation {
                    // Our file was rotated away and everything in it is read: move to the next
                    // generation, wherever rotation has put it by now (when it was rotated out
                    // of the set before we got to it, the oldest one left).
                    let mut next = c.generation + 1;
                    cur = loop {
                        if let Some(c) = self.open_generation(next) {
                            break Some(c);
                        }
                        if next >= self.current().generation {
                            break None;
                        }
                        next += 1;
                    };
                    continue;
                }
                if pos.closed && c.offset >= pos.offset {
                    return self.flush();
                }
            } else {
                match self.open_generation(self.current().generation) {
                    Some(c) => {
                        cur = Some(c);
                        continue;
                    }
                    None if pos.closed => return self.flush(),
                    None => {}
                }
            }
            self.flush()?;
            if self.opts.until.is_some_and(|u| SystemTime::now() > u) {
                return Ok(());
            }
            // Wake up on progress, and now and then to notice a client that went away.
            let tx = self.tx.clone();
            let changed = self.handle.block_on(async {
                tokio::select! {
                    r = position.changed() => r.is_ok(),
                    _ = tx.closed() => false,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => true,
                }
            });
            if self.tx.is_closed() {
                return Err(Gone.into());
            }
            if !changed && position.has_changed().is_err() {
                // The writer is gone: read what is left and stop.
                if let Some(c) = cur.as_mut() {
                    let limit = self.limit(c.generation);
                    self.drain(c, limit)?;
                }
                return self.flush();
            }
        }
    }

    fn push(&mut self, e: LogEntry) -> Result<()> {
        self.batch.push(e);
        if self.batch.len() >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.tx.blocking_send(Ok(batch)).map_err(|_| Gone.into())
    }
}

fn io_err(e: std::io::Error) -> Error {
    Error::internal("read log").with_source(e)
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use bytes::Bytes;

    use super::*;
    use crate::logger::Logger;

    fn at(n: u64) -> SystemTime {
        UNIX_EPOCH + Duration::new(1_700_000_000 + n, 0)
    }

    fn all() -> ReadOptions {
        ReadOptions {
            stdout: true,
            stderr: true,
            ..Default::default()
        }
    }

    async fn collect(mut rx: mpsc::Receiver<Result<Vec<LogEntry>>>) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(batch) = rx.recv().await {
            for e in batch.unwrap() {
                out.push(String::from_utf8(e.data).unwrap());
            }
        }
        out
    }

    #[test]
    fn parses_both_formats() {
        let e = parse_line(
            LogFormat::JsonFile,
            br#"{"log":"hi\n","stream":"stderr","attrs":{"a":"b"},"time":"2023-11-14T22:13:20.5Z"}"#,
        )
        .unwrap();
        assert_eq!(e.stream, Stream::Stderr);
        assert_eq!(e.data, b"hi\n");
        assert!(!e.partial);
        assert_eq!(e.attrs["a"], "b");
        assert_eq!(e.time, at(0) + Duration::from_millis(500));
        let e = parse_line(LogFormat::Cri, b"2023-11-14T22:13:20Z stdout P part").unwrap();
        assert!(e.partial);
        assert_eq!(e.data, b"part");
        let e = parse_line(LogFormat::Cri, b"2023-11-14T22:13:20Z stdout F ").unwrap();
        assert_eq!(e.data, b"\n");
        assert!(parse_line(LogFormat::JsonFile, b"garbage").is_none());
    }

    async fn rotated_log(dir: &std::path::Path, lines: u64) -> (LogOptions, Logger) {
        rotated_log_keeping(dir, lines, 4).await
    }

    async fn rotated_log_keeping(
        dir: &std::path::Path,
        lines: u64,
        max_file: u32,
    ) -> (LogOptions, Logger) {
        let mut opts = LogOptions::json_file(dir.join("container.log"));
        opts.max_size = 700;
        opts.max_file = max_file;
        let logger = Logger::start(opts.clone()).unwrap();
        for i in 0..lines {
            let stream = if i % 2 == 0 {
                Stream::Stdout
            } else {
                Stream::Stderr
            };
            logger.write(stream, at(i), Bytes::from(format!("l{i}\n")));
        }
        logger.mark().await;
        (opts, logger)
    }

    #[tokio::test]
    async fn reads_the_rotated_set_in_order_with_filters_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (opts, logger) = rotated_log(dir.path(), 40).await;
        assert!(logger.tracker().position.borrow().generation >= 3);
        let got = collect(read(opts.clone(), Some(logger.tracker()), all(), None)).await;
        // Some of the oldest lines are rotated out; what is left is contiguous and ends at l39.
        let first: u64 = got[0].trim_start_matches('l').trim().parse().unwrap();
        let want: Vec<String> = (first..40).map(|i| format!("l{i}\n")).collect();
        assert_eq!(got, want);

        let tail = ReadOptions {
            tail: Some(5),
            ..all()
        };
        let got = collect(read(opts.clone(), Some(logger.tracker()), tail, None)).await;
        assert_eq!(got, ["l35\n", "l36\n", "l37\n", "l38\n", "l39\n"]);

        // Tail across a file boundary, stderr only, with a time window.
        let o = ReadOptions {
            tail: Some(12),
            stdout: false,
            until: Some(at(37)),
            ..all()
        };
        let got = collect(read(opts.clone(), Some(logger.tracker()), o, None)).await;
        let want: Vec<String> = (0..12)
            .rev()
            .map(|k| format!("l{}\n", 37 - 2 * k))
            .collect();
        assert_eq!(got, want);

        let o = ReadOptions {
            since: Some(at(38)),
            ..all()
        };
        let got = collect(read(opts, Some(logger.tracker()), o, None)).await;
        assert_eq!(got, ["l38\n", "l39\n"]);
    }

    #[tokio::test]
    async fn follow_streams_new_lines_across_rotations_until_the_output_ends() {
        let dir = tempfile::tempdir().unwrap();
        // Enough files kept that a follower that falls behind by a few rotations loses nothing
        // (one that falls behind by more than max_file rotations does, as with Docker).
        let (opts, logger) = rotated_log_keeping(dir.path(), 3, 100).await;
        let follow = ReadOptions {
            follow: true,
            tail: Some(1),
            ..all()
        };
        let mut rx = read(opts, Some(logger.tracker()), follow, None);
        let first = rx.recv().await.unwrap().unwrap();
        assert_eq!(first[0].data, b"l2\n");
        // Enough new output to rotate several times while following.
        for i in 3..60 {
            logger.write(Stream::Stdout, at(i), Bytes::from(format!("l{i}\n")));
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        logger.eof(Stream::Stdout);
        logger.eof(Stream::Stderr);
        let mut got = Vec::new();
        while let Some(batch) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
        {
            got.extend(
                batch
                    .unwrap()
                    .into_iter()
                    .map(|e| String::from_utf8(e.data).unwrap()),
            );
        }
        let want: Vec<String> = (3..60).map(|i| format!("l{i}\n")).collect();
        assert_eq!(got, want);
        assert!(logger.tracker().position.borrow().generation >= 5);
    }

    #[tokio::test]
    async fn replay_stops_at_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let (opts, logger) = rotated_log(dir.path(), 5).await;
        let mark = logger.mark().await;
        logger.write(Stream::Stdout, at(9), Bytes::from_static(b"after\n"));
        logger.mark().await;
        let o = ReadOptions {
            follow: true,
            ..all()
        };
        let got = collect(read(opts, Some(logger.tracker()), o, Some(mark))).await;
        assert_eq!(got.last().unwrap(), "l4\n");
    }

    #[tokio::test]
    async fn a_missing_log_reads_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions::json_file(dir.path().join("nope.log"));
        assert!(collect(read(opts, None, all(), None)).await.is_empty());
    }
}
