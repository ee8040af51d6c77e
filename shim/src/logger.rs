//! The container log writer: Docker's `json-file` format (or the kubelet's CRI format) with
//! max-size / max-file rotation, behind a bounded buffer so that a slow log disk never stalls the
//! container.
//!
//! # Buffering policy
//!
//! Output is read from the container's pipes by the shim's event loop and handed to a dedicated
//! writer thread through a queue bounded by [`LogOptions::buffer_bytes`] (default 1 MiB, the
//! engine's `shim.log_buffer_bytes`). The event loop never waits for the disk: when the queue is
//! full, the new chunk is **dropped** and counted ([`Logger::dropped`]), and a warning is logged
//! once per burst. Attached clients still receive every byte; only the log loses data, and only
//! while the disk is slower than the container's output.
//!
//! # Files
//!
//! The current file is `path`; rotated files are `path.1` (newest) … `path.<max_file-1>`
//! (oldest), as Docker names them. A file is rotated before a line would make it exceed
//! `max_size`, so no file exceeds it unless a single line does. With `max_file` ≤ 1 the current
//! file is replaced instead. Lines longer than 16 KiB are split into partial entries, as Docker
//! does.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use bytes::Bytes;
use tokio::sync::{oneshot, watch};

use crate::rfc3339;

/// Which output stream bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Standard output (and everything, with a TTY).
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    /// `stdout` or `stderr`, as both log formats spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Stdout => 0,
            Self::Stderr => 1,
        }
    }
}

/// On-disk format of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Docker's json-file: `{"log":"…\n","stream":"stdout","time":"…"}` per line.
    JsonFile,
    /// The kubelet's: `<time> <stream> <P|F> <content>` per line.
    Cri,
}

/// Where and how the log is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogOptions {
    /// On-disk format.
    pub format: LogFormat,
    /// The current file; rotated ones get `.1`, `.2`, … appended.
    pub path: PathBuf,
    /// Rotate before the file would exceed this many bytes; 0 = never.
    pub max_size: u64,
    /// Files kept, the current one included (at least 1).
    pub max_file: u32,
    /// Attributes written with every json-file entry (Docker's `attrs`).
    pub attrs: BTreeMap<String, String>,
    /// Bytes of output queued for the disk before new output is dropped.
    pub buffer_bytes: usize,
}

impl LogOptions {
    /// json-file at `path`, no rotation, 1 MiB buffer.
    pub fn json_file(path: impl Into<PathBuf>) -> Self {
        Self {
            format: LogFormat::JsonFile,
            path: path.into(),
            max_size: 0,
            max_file: 1,
            attrs: BTreeMap::new(),
            buffer_bytes: 1 << 20,
        }
    }

    /// The path of file `index` of the rotated set (0 = current).
    pub fn file(&self, index: u32) -> PathBuf {
        rotated(&self.path, index)
    }
}

fn rotated(path: &Path, index: u32) -> PathBuf {
    if index == 0 {
        return path.to_path_buf();
    }
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{index}"));
    PathBuf::from(s)
}

/// How far the writer has got, published after every batch so that followers can wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogPosition {
    /// Incremented by every rotation; the current file belongs to this generation.
    pub generation: u64,
    /// Bytes written to the current file.
    pub offset: u64,
    /// The output ended and everything is written.
    pub closed: bool,
}

/// What a reader needs to follow the writer: its published progress, and the lock that makes
/// a rotation (renames, new file, new generation) atomic for readers that map generations to
/// file names.
#[derive(Debug, Clone)]
pub struct LogTracker {
    /// The writer's progress.
    pub position: watch::Receiver<LogPosition>,
    /// Held for writing while the writer rotates; hold it for reading while opening files.
    pub rotation: Arc<RwLock<()>>,
}

/// Docker splits lines longer than this into partial entries.
pub const MAX_LINE: usize = 16 * 1024;

enum Msg {
    Data {
        stream: Stream,
        at: SystemTime,
        bytes: Bytes,
    },
    Eof(Stream),
    /// Reply with the position once everything queued before it is written.
    Mark(oneshot::Sender<LogPosition>),
    /// Close the file and open the path again (after someone else rotated it).
    Reopen(oneshot::Sender<std::io::Result<()>>),
}

/// Handle to a log writer thread. Dropping every handle ends the thread after it has written
/// what was queued.
#[derive(Debug, Clone)]
pub struct Logger {
    tx: mpsc::Sender<Msg>,
    queued: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
    warned: Arc<AtomicBool>,
    limit: usize,
    tracker: LogTracker,
    options: Arc<LogOptions>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl Logger {
    /// Opens (appends to) the current file and starts the writer thread.
    pub fn start(options: LogOptions) -> std::io::Result<Self> {
        if let Some(dir) = options.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&options.path)?;
        let size = file.metadata()?.len();
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let (pos_tx, position) = watch::channel(LogPosition {
            generation: 0,
            offset: size,
            closed: false,
        });
        let options = Arc::new(options);
        let rotation = Arc::new(RwLock::new(()));
        let writer = Writer {
            rotation: rotation.clone(),
            options: options.clone(),
            file: BufWriter::with_capacity(16 * 1024, file),
            size,
            generation: 0,
            partial: [Vec::new(), Vec::new()],
            partial_at: [None, None],
            open_streams: [true, true],
            queued: queued.clone(),
            position: pos_tx,
            failing: false,
        };
        std::thread::Builder::new()
            .name("log-writer".into())
            // Formatting a line needs little stack; a small one keeps the shim's RSS small.
            .stack_size(128 * 1024)
            .spawn(move || writer.run(rx))?;
        Ok(Self {
            tx,
            queued,
            dropped: Arc::new(AtomicU64::new(0)),
            warned: Arc::new(AtomicBool::new(false)),
            limit: options.buffer_bytes.max(1),
            tracker: LogTracker { position, rotation },
            options,
        })
    }

    /// Queues output read at `at`. Never blocks: when the buffer is full the bytes are dropped
    /// and counted.
    pub fn write(&self, stream: Stream, at: SystemTime, bytes: Bytes) {
        let len = bytes.len();
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        if before + len > self.limit {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            let total = self.dropped.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    dropped_bytes = total,
                    limit = self.limit,
                    "log disk is slower than the container's output; dropping log data"
                );
            }
            return;
        }
        self.warned.store(false, Ordering::Relaxed);
        if self.tx.send(Msg::Data { stream, at, bytes }).is_err() {
            self.queued.fetch_sub(len, Ordering::AcqRel);
        }
    }

    /// Marks the end of `stream`: a pending partial line is written out.
    pub fn eof(&self, stream: Stream) {
        let _ = self.tx.send(Msg::Eof(stream));
    }

    /// The position once everything queued so far is on disk.
    pub async fn mark(&self) -> LogPosition {
        match self.mark_now().await {
            Ok(pos) => pos,
            Err(_) => *self.tracker.position.borrow(),
        }
    }

    /// Queues a mark now; the receiver gets the position once everything queued before it is
    /// on disk (or an error when the writer is gone).
    pub fn mark_now(&self) -> oneshot::Receiver<LogPosition> {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Msg::Mark(tx));
        rx
    }

    /// Writes what is queued, closes the file and opens the path again (creating it): the
    /// kubelet renames a CRI log to rotate it, then asks for this.
    pub async fn reopen(&self) -> std::io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Reopen(tx))
            .map_err(|_| std::io::Error::other("the log writer has stopped"))?;
        rx.await
            .map_err(|_| std::io::Error::other("the log writer has stopped"))?
    }

    /// Bytes dropped so far because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// What readers need to follow this writer.
    pub fn tracker(&self) -> LogTracker {
        self.tracker.clone()
    }

    /// The options it writes with.
    pub fn options(&self) -> &LogOptions {
        &self.options
    }
}

struct Writer {
    rotation: Arc<RwLock<()>>,
    options: Arc<LogOptions>,
    file: BufWriter<File>,
    size: u64,
    generation: u64,
    partial: [Vec<u8>; 2],
    partial_at: [Option<SystemTime>; 2],
    open_streams: [bool; 2],
    queued: Arc<AtomicUsize>,
    position: watch::Sender<LogPosition>,
    failing: bool,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        while let Ok(msg) = rx.recv() {
            self.handle(msg);
            // Drain what else is queued before paying for a flush and a wake-up.
            while let Ok(msg) = rx.try_recv() {
                self.handle(msg);
            }
            self.publish();
        }
        for s in [Stream::Stdout, Stream::Stderr] {
            self.flush_partial(s);
        }
        self.open_streams = [false, false];
        self.publish();
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Data { stream, at, bytes } => {
                self.queued.fetch_sub(bytes.len(), Ordering::AcqRel);
                self.data(stream, at, &bytes);
            }
            Msg::Eof(stream) => {
                self.flush_partial(stream);
                self.open_streams[stream.index()] = false;
            }
            Msg::Mark(reply) => {
                self.publish();
                let _ = reply.send(*self.position.borrow());
            }
            Msg::Reopen(reply) => {
                let _ = reply.send(self.reopen());
            }
        }
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        let _ = self.file.flush();
        let rotation = self.rotation.clone();
        let _guard = rotation.write().unwrap_or_else(|e| e.into_inner());
        let path = &self.options.path;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        self.size = file.metadata()?.len();
        self.file = BufWriter::with_capacity(16 * 1024, file);
        self.generation += 1;
        self.failing = false;
        self.publish();
        Ok(())
    }

    fn data(&mut self, stream: Stream, at: SystemTime, mut bytes: &[u8]) {
        let i = stream.index();
        while !bytes.is_empty() {
            if self.partial[i].is_empty() {
                self.partial_at[i] = Some(at);
            }
            let room = MAX_LINE - self.partial[i].len();
            let window = &bytes[..bytes.len().min(room)];
            match window.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    self.partial[i].extend_from_slice(&window[..=nl]);
                    bytes = &bytes[nl + 1..];
                    self.emit(stream, false);
                }
                None => {
                    self.partial[i].extend_from_slice(window);
                    bytes = &bytes[window.len()..];
                    if self.partial[i].len() == MAX_LINE {
                        self.emit(stream, true);
                    }
                }
            }
        }
    }

    fn flush_partial(&mut self, stream: Stream) {
        if !self.partial[stream.index()].is_empty() {
            // The stream ended without a newline: the fragment is complete as it is.
            self.emit(stream, false);
        }
    }

    /// Writes the buffered line of `stream`. `partial`: more of the same line follows.
    fn emit(&mut self, stream: Stream, partial: bool) {
        let i = stream.index();
        let at = self.partial_at[i].take().unwrap_or_else(SystemTime::now);
        let line = encode(&self.options, stream, at, &self.partial[i], partial);
        self.partial[i].clear();
        let len = line.len() as u64;
        if self.options.max_size > 0 && self.size > 0 && self.size + len > self.options.max_size {
            self.rotate();
        }
        match self.file.write_all(&line) {
            Ok(()) => {
                self.size += len;
                self.failing = false;
            }
            Err(err) => {
                if !self.failing {
                    tracing::warn!(%err, path = %self.options.path.display(), "write log");
                    self.failing = true;
                }
            }
        }
    }

    fn rotate(&mut self) {
        let _ = self.file.flush();
        let rotation = self.rotation.clone();
        let _guard = rotation.write().unwrap_or_else(|e| e.into_inner());
        let path = &self.options.path;
        let result = (|| -> std::io::Result<File> {
            if self.options.max_file <= 1 {
                // Followers keep reading the old file through their handle; new ones find the new.
                std::fs::remove_file(path)?;
            } else {
                for i in (1..self.options.max_file - 1).rev() {
                    let from = rotated(path, i);
                    if from.exists() {
                        std::fs::rename(&from, rotated(path, i + 1))?;
                    }
                }
                std::fs::rename(path, rotated(path, 1))?;
            }
            OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(path)
        })();
        match result {
            Ok(file) => {
                self.file = BufWriter::with_capacity(16 * 1024, file);
                self.size = 0;
                self.generation += 1;
                // Published under the lock, so readers never see files and generation disagree.
                self.publish();
            }
            Err(err) => tracing::warn!(%err, path = %path.display(), "rotate log"),
        }
    }

    fn publish(&mut self) {
        let _ = self.file.flush();
        let pos = LogPosition {
            generation: self.generation,
            offset: self.size,
            closed: self.open_streams == [false, false],
        };
        self.position.send_if_modified(|p| {
            let changed = *p != pos;
            *p = pos;
            changed
        });
    }
}

/// One log line in `options.format`, newline-terminated.
pub fn encode(
    options: &LogOptions,
    stream: Stream,
    at: SystemTime,
    data: &[u8],
    partial: bool,
) -> Vec<u8> {
    let text = String::from_utf8_lossy(data);
    let time = rfc3339::format(at);
    let mut out = Vec::with_capacity(data.len() + 64);
    match options.format {
        LogFormat::JsonFile => {
            out.extend_from_slice(b"{\"log\":");
            // Serialising a str or a map of strings into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut out, text.as_ref());
            out.extend_from_slice(b",\"stream\":\"");
            out.extend_from_slice(stream.as_str().as_bytes());
            out.push(b'"');
            if !options.attrs.is_empty() {
                out.extend_from_slice(b",\"attrs\":");
                let _ = serde_json::to_writer(&mut out, &options.attrs);
            }
            out.extend_from_slice(b",\"time\":\"");
            out.extend_from_slice(time.as_bytes());
            out.extend_from_slice(b"\"}\n");
        }
        LogFormat::Cri => {
            let body = text.strip_suffix('\n').unwrap_or(&text);
            out.extend_from_slice(time.as_bytes());
            out.push(b' ');
            out.extend_from_slice(stream.as_str().as_bytes());
            out.extend_from_slice(if partial { b" P " } else { b" F " });
            out.extend_from_slice(body.as_bytes());
            out.push(b'\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn at(n: u64) -> SystemTime {
        UNIX_EPOCH + Duration::new(1_700_000_000 + n, 5)
    }

    #[test]
    fn json_file_lines_look_like_dockers() {
        let opts = LogOptions::json_file("/x");
        let line = encode(&opts, Stream::Stderr, at(0), b"he said \"hi\"\n", false);
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "{\"log\":\"he said \\\"hi\\\"\\n\",\"stream\":\"stderr\",\"time\":\"2023-11-14T22:13:20.000000005Z\"}\n"
        );
        let mut opts = LogOptions::json_file("/x");
        opts.attrs.insert("tag".into(), "web".into());
        let line = encode(&opts, Stream::Stdout, at(0), b"x", false);
        assert!(
            String::from_utf8(line)
                .unwrap()
                .contains(",\"attrs\":{\"tag\":\"web\"},\"time\"")
        );
        let mut opts = LogOptions::json_file("/x");
        opts.format = LogFormat::Cri;
        let line = encode(&opts, Stream::Stdout, at(0), b"abc\n", false);
        assert_eq!(line, b"2023-11-14T22:13:20.000000005Z stdout F abc\n");
        let line = encode(&opts, Stream::Stdout, at(0), b"abc", true);
        assert_eq!(line, b"2023-11-14T22:13:20.000000005Z stdout P abc\n");
    }

    async fn settle(logger: &Logger) {
        logger.mark().await;
    }

    #[tokio::test]
    async fn splits_lines_per_stream_and_flushes_partials_at_eof() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("container.log");
        let logger = Logger::start(LogOptions::json_file(&path)).unwrap();
        logger.write(Stream::Stdout, at(0), Bytes::from_static(b"out1\nou"));
        logger.write(Stream::Stderr, at(1), Bytes::from_static(b"err1\n"));
        logger.write(Stream::Stdout, at(2), Bytes::from_static(b"t2\ntail"));
        logger.eof(Stream::Stdout);
        logger.eof(Stream::Stderr);
        let pos = logger.mark().await;
        assert!(pos.closed);
        let text = std::fs::read_to_string(&path).unwrap();
        let logs: Vec<(String, String)> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["stream"].as_str().unwrap().into(),
                    v["log"].as_str().unwrap().into(),
                )
            })
            .collect();
        let want = [
            ("stdout", "out1\n"),
            ("stderr", "err1\n"),
            ("stdout", "out2\n"),
            ("stdout", "tail"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(logs, want);
        assert_eq!(pos.offset, text.len() as u64);
    }

    #[tokio::test]
    async fn long_lines_become_partial_entries() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = LogOptions::json_file(dir.path().join("c.log"));
        opts.format = LogFormat::Cri;
        let logger = Logger::start(opts.clone()).unwrap();
        let mut big = vec![b'a'; MAX_LINE + 10];
        big.push(b'\n');
        logger.write(Stream::Stdout, at(0), Bytes::from(big));
        settle(&logger).await;
        let text = std::fs::read_to_string(&opts.path).unwrap();
        let tags: Vec<&str> = text.lines().map(|l| l.split(' ').nth(2).unwrap()).collect();
        assert_eq!(tags, ["P", "F"]);
        assert_eq!(
            text.lines()
                .nth(1)
                .unwrap()
                .split(' ')
                .nth(3)
                .unwrap()
                .len(),
            10
        );
    }

    #[tokio::test]
    async fn rotation_keeps_max_file_files_of_at_most_max_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = LogOptions::json_file(dir.path().join("container.log"));
        opts.max_size = 1000;
        opts.max_file = 3;
        let logger = Logger::start(opts.clone()).unwrap();
        for i in 0..200 {
            logger.write(Stream::Stdout, at(i), Bytes::from(format!("line {i:04}\n")));
        }
        let pos = logger.mark().await;
        assert!(pos.generation > 3);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["container.log", "container.log.1", "container.log.2"]
        );
        for n in &names {
            let len = std::fs::metadata(dir.path().join(n)).unwrap().len();
            assert!(len <= 1000, "{n} has {len} bytes");
        }
        // The newest line is last in the current file, and the rotated files are older.
        let cur = std::fs::read_to_string(opts.file(0)).unwrap();
        assert!(
            cur.trim_end()
                .ends_with("\"time\":\"2023-11-14T22:16:39.000000005Z\"}"),
            "{cur}"
        );
        let one = std::fs::read_to_string(opts.file(1)).unwrap();
        let two = std::fs::read_to_string(opts.file(2)).unwrap();
        assert!(two.lines().last().unwrap() < one.lines().next().unwrap());
    }

    #[tokio::test]
    async fn reopen_starts_a_new_file_after_an_outside_rename() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = LogOptions::json_file(dir.path().join("0.log"));
        opts.format = LogFormat::Cri;
        let logger = Logger::start(opts).unwrap();
        logger.write(Stream::Stdout, at(1), Bytes::from_static(b"before\n"));
        logger.mark().await;
        std::fs::rename(dir.path().join("0.log"), dir.path().join("0.log.1")).unwrap();
        logger.reopen().await.unwrap();
        logger.write(Stream::Stdout, at(2), Bytes::from_static(b"after\n"));
        logger.mark().await;
        let old = std::fs::read_to_string(dir.path().join("0.log.1")).unwrap();
        let new = std::fs::read_to_string(dir.path().join("0.log")).unwrap();
        assert!(old.ends_with("stdout F before\n"), "{old}");
        assert!(
            new.ends_with("stdout F after\n") && !new.contains("before"),
            "{new}"
        );
    }

    #[tokio::test]
    async fn max_file_one_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = LogOptions::json_file(dir.path().join("container.log"));
        opts.max_size = 500;
        let logger = Logger::start(opts.clone()).unwrap();
        for i in 0..50 {
            logger.write(Stream::Stdout, at(i), Bytes::from(format!("line {i:04}\n")));
        }
        settle(&logger).await;
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        assert!(std::fs::metadata(&opts.path).unwrap().len() <= 500);
    }

    #[tokio::test]
    async fn a_full_buffer_drops_and_counts_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = LogOptions::json_file(dir.path().join("container.log"));
        opts.buffer_bytes = 64;
        let logger = Logger::start(opts).unwrap();
        // Simulate a stalled disk by filling the accounting before the writer can drain.
        logger.queued.fetch_add(60, Ordering::AcqRel);
        logger.write(Stream::Stdout, at(0), Bytes::from_static(b"0123456789\n"));
        assert_eq!(logger.dropped(), 11);
        logger.queued.fetch_sub(60, Ordering::AcqRel);
        logger.write(Stream::Stdout, at(0), Bytes::from_static(b"fits\n"));
        assert_eq!(logger.dropped(), 11);
        settle(&logger).await;
    }
}
