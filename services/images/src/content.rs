//! The content store: blobs by digest on disk.
//!
//! Layout under its root (`<data root>/content`):
//!
//! ```text
//! blobs/sha256/<hex>        verified blobs, read-only once there
//! ingest/<sha256(ref)>/data bytes of a blob being written
//! ingest/<sha256(ref)>/ref  the ingest's reference (the expected digest for downloads)
//! ingest/.new-<nonce>-<n>/  an ingest directory being made, renamed to its place with its ref
//! ```
//!
//! A blob becomes visible only by `rename(2)` after its size and sha256 matched what the writer
//! expected, so a reader never sees half a blob and a crash never leaves a wrong one. An ingest
//! left by a crash is resumed by the next writer with the same reference: the bytes already
//! there are hashed again and the download continues from their end. What keeps blobs from
//! garbage collection (images, leases) lives in the metadata store, not here.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use berth_core::{Digest, Error, ErrorKind, Result};
use sha2::{Digest as _, Sha256};

/// The name prefix of an ingest directory being made ([`ContentStore::create_ingest`]).
const STAGING_PREFIX: &str = ".new-";

static UNIQUE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What the store knows about one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: Digest,
    pub size: i64,
    pub created: SystemTime,
}

/// An unfinished ingest.
#[derive(Debug, Clone)]
pub struct IngestInfo {
    pub reference: String,
    pub offset: u64,
    pub updated: SystemTime,
    pub dir: PathBuf,
}

/// Blobs by digest on the local disk.
#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
    active: Arc<Mutex<HashSet<String>>>,
}

impl ContentStore {
    /// Opens (creating) the store at `root`.
    pub fn open(root: &Path) -> Result<Self> {
        for d in ["blobs/sha256", "ingest"] {
            fs::create_dir_all(root.join(d)).map_err(|e| {
                Error::internal(format!("create {}", root.join(d).display())).with_source(e)
            })?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            active: Arc::default(),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob `digest` lives (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex())
    }

    /// Whether the blob is in the store.
    pub fn exists(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Size and time of one blob; `NotFound` when absent.
    pub fn info(&self, digest: &Digest) -> Result<BlobInfo> {
        let meta = fs::metadata(self.blob_path(digest)).map_err(|e| not_found(digest, e))?;
        Ok(BlobInfo {
            digest: digest.clone(),
            size: meta.len() as i64,
            created: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        })
    }

    /// Every blob in the store.
    pub fn list(&self) -> Result<Vec<BlobInfo>> {
        let mut out = Vec::new();
        let dir = self.root.join("blobs");
        for alg in read_dir(&dir)? {
            let alg = alg?;
            let alg_name = alg.file_name().to_string_lossy().into_owned();
            for entry in read_dir(&alg.path())? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let Ok(digest) = format!("{alg_name}:{name}").parse::<Digest>() else {
                    continue;
                };
                let Ok(meta) = entry.metadata() else { continue };
                out.push(BlobInfo {
                    digest,
                    size: meta.len() as i64,
                    created: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }

    /// Opens a blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        File::open(self.blob_path(digest)).map_err(|e| not_found(digest, e))
    }

    /// Reads a whole (small) blob; refuses blobs larger than `limit`.
    pub fn read_blob(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>> {
        let mut f = self.open_blob(digest)?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len > limit {
            return Err(Error::invalid_argument(format!(
                "blob {digest} is {len} bytes, more than the {limit} allowed here"
            )));
        }
        let mut buf = Vec::with_capacity(len as usize);
        f.read_to_end(&mut buf)
            .map_err(|e| Error::internal(format!("read blob {digest}")).with_source(e))?;
        Ok(buf)
    }

    /// Removes a blob; returns the bytes freed (0 when it was not there).
    pub fn delete(&self, digest: &Digest) -> Result<u64> {
        let path = self.blob_path(digest);
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        match fs::remove_file(&path) {
            Ok(()) => Ok(size),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(Error::internal(format!("delete blob {digest}")).with_source(e)),
        }
    }

    /// Stores `data` (verified against `expected` when given) and returns its digest.
    pub fn write_blob(&self, data: &[u8], expected: Option<&Digest>) -> Result<Digest> {
        let digest = Digest::sha256_of(data);
        if let Some(want) = expected
            && *want != digest
        {
            return Err(mismatch(want, &digest));
        }
        if self.exists(&digest) {
            return Ok(digest);
        }
        // Content-addressed writes are idempotent: if another writer has the usual ingest,
        // write a private copy rather than wait for it.
        let mut w = match self.writer(&format!("write-{}", digest.hex())) {
            Ok(w) => w,
            Err(e) if e.kind() == ErrorKind::Aborted => {
                let unique = UNIQUE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.writer(&format!(
                    "write-{}-{}-{unique}",
                    digest.hex(),
                    std::process::id()
                ))?
            }
            Err(e) => return Err(e),
        };
        w.restart()?;
        w.write_all(data)
            .map_err(|e| Error::internal("write blob").with_source(e))?;
        w.commit(Some(data.len() as u64), Some(&digest))
    }

    /// Opens the ingest `reference`, resuming what an earlier writer (maybe a crashed process)
    /// left. Only one writer per reference at a time: a second gets `Aborted`.
    pub fn writer(&self, reference: &str) -> Result<Writer> {
        {
            let mut active = self.active.lock().unwrap();
            if !active.insert(reference.to_string()) {
                return Err(Error::new(
                    ErrorKind::Aborted,
                    format!("ingest {reference:?} is already being written"),
                ));
            }
        }
        let release = Release {
            active: self.active.clone(),
            reference: reference.to_string(),
        };
        let dir = self.ingest_dir(reference);
        if !dir.join("ref").is_file() {
            self.create_ingest(&dir, reference)?;
        }
        let data = dir.join("data");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data)
            .map_err(|e| Error::internal(format!("open {}", data.display())).with_source(e))?;
        // Rebuild the hash state from what is already there.
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0u64;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| Error::internal("read ingest").with_source(e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        Ok(Writer {
            blobs: self.root.join("blobs"),
            dir,
            data,
            file,
            hasher,
            offset,
            flushed: offset,
            _release: release,
        })
    }

    /// Makes the ingest directory `dir` together with its `ref`: both are made under a staging
    /// name and renamed into place, so a crash never leaves an ingest that recovery cannot
    /// attribute to its reference.
    fn create_ingest(&self, dir: &Path, reference: &str) -> Result<()> {
        let staging = self.root.join("ingest").join(format!(
            "{STAGING_PREFIX}{}-{}",
            crate::nonce(),
            UNIQUE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let made = fs::create_dir(&staging)
            .and_then(|()| fs::write(staging.join("ref"), reference))
            .and_then(|()| fs::rename(&staging, dir));
        match made {
            Ok(()) => Ok(()),
            // An ingest directory without its ref (left by a crash of an older version): fill
            // it in.
            Err(_) if dir.is_dir() => {
                let _ = fs::remove_dir_all(&staging);
                fs::write(dir.join("ref"), reference)
                    .map_err(|e| Error::internal("write ingest ref").with_source(e))
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&staging);
                Err(Error::internal(format!("create {}", dir.display())).with_source(e))
            }
        }
    }

    /// Removes the staging directories of ingests that an earlier process left half made.
    pub fn remove_stale_staging(&self) {
        let mine = format!("{STAGING_PREFIX}{}-", crate::nonce());
        let Ok(rd) = fs::read_dir(self.root.join("ingest")) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(STAGING_PREFIX)
                && !name.starts_with(&mine)
                && let Err(err) = fs::remove_dir_all(e.path())
            {
                tracing::warn!(path = %e.path().display(), error = %err, "remove ingest staging directory");
            }
        }
    }

    /// Every unfinished ingest.
    pub fn ingests(&self) -> Result<Vec<IngestInfo>> {
        let mut out = Vec::new();
        for entry in read_dir(&self.root.join("ingest"))? {
            let entry = entry?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(STAGING_PREFIX)
            {
                continue;
            }
            let dir = entry.path();
            let reference = fs::read_to_string(dir.join("ref")).unwrap_or_default();
            let meta = fs::metadata(dir.join("data")).ok();
            out.push(IngestInfo {
                reference,
                offset: meta.as_ref().map(|m| m.len()).unwrap_or(0),
                updated: meta
                    .and_then(|m| m.modified().ok())
                    .or_else(|| entry.metadata().ok().and_then(|m| m.modified().ok()))
                    .unwrap_or(SystemTime::UNIX_EPOCH),
                dir,
            });
        }
        Ok(out)
    }

    /// Whether a writer for `reference` is open in this process.
    pub fn is_active(&self, reference: &str) -> bool {
        self.active.lock().unwrap().contains(reference)
    }

    /// Drops an unfinished ingest (not one that is being written).
    pub fn abort(&self, reference: &str) -> Result<()> {
        if self.is_active(reference) {
            return Err(Error::failed_precondition(format!(
                "ingest {reference:?} is being written"
            )));
        }
        let dir = self.ingest_dir(reference);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::internal(format!("remove {}", dir.display())).with_source(e)),
        }
    }

    /// The path of the data file of ingest `reference`.
    pub fn ingest_data_path(&self, reference: &str) -> PathBuf {
        self.ingest_dir(reference).join("data")
    }

    fn ingest_dir(&self, reference: &str) -> PathBuf {
        self.root
            .join("ingest")
            .join(hex::encode(Sha256::digest(reference.as_bytes())))
    }
}

struct Release {
    active: Arc<Mutex<HashSet<String>>>,
    reference: String,
}

impl Drop for Release {
    fn drop(&mut self) {
        self.active.lock().unwrap().remove(&self.reference);
    }
}

/// Writes one blob: bytes go to the ingest file and the running hash; [`Writer::commit`]
/// verifies and moves the blob into place.
pub struct Writer {
    blobs: PathBuf,
    dir: PathBuf,
    data: PathBuf,
    file: File,
    hasher: Sha256,
    offset: u64,
    /// Where the data not yet handed to the disk starts (see [`Writer::start_writeback`]).
    flushed: u64,
    _release: Release,
}

/// How much written data may sit dirty in the page cache before its writeback is started.
const WRITEBACK_CHUNK: u64 = 8 << 20;

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("data", &self.data)
            .field("offset", &self.offset)
            .finish()
    }
}

impl Writer {
    /// Bytes already written (resumed or new).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The ingest data file (readers tail it while it grows).
    pub fn data_path(&self) -> &Path {
        &self.data
    }

    /// Throws away what was written and starts again from byte 0.
    pub fn restart(&mut self) -> Result<()> {
        self.file
            .set_len(0)
            .map_err(|e| Error::internal("truncate ingest").with_source(e))?;
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(|e| Error::internal("seek ingest").with_source(e))?;
        self.hasher = Sha256::new();
        self.offset = 0;
        self.flushed = 0;
        Ok(())
    }

    /// The digest of what was written so far.
    pub fn digest(&self) -> Digest {
        Digest::from_sha256_bytes(&self.hasher.clone().finalize())
    }

    /// Makes the blob visible when its size and digest match (`None` = accept what was written).
    /// On a mismatch the ingest is deleted and the error names both digests.
    pub fn commit(mut self, size: Option<u64>, expected: Option<&Digest>) -> Result<Digest> {
        self.file.flush().ok();
        let digest = self.digest();
        let bad = match (size, expected) {
            (Some(s), _) if s != self.offset => Some(Error::failed_precondition(format!(
                "size mismatch: expected {s} bytes, got {}{}",
                self.offset,
                expected.map(|d| format!(" for {d}")).unwrap_or_default()
            ))),
            (_, Some(want)) if *want != digest => Some(mismatch(want, &digest)),
            _ => None,
        };
        if let Some(err) = bad {
            let _ = fs::remove_dir_all(&self.dir);
            return Err(err);
        }
        self.file
            .sync_all()
            .map_err(|e| Error::internal("fsync blob").with_source(e))?;
        let dir = self.blobs.join(digest.algorithm());
        fs::create_dir_all(&dir).map_err(|e| Error::internal("create blob dir").with_source(e))?;
        let target = dir.join(digest.hex());
        if target.exists() {
            let _ = fs::remove_dir_all(&self.dir);
            return Ok(digest);
        }
        // Blobs are read-only: nothing should ever change one in place.
        let _ = fs::set_permissions(
            &self.data,
            std::os::unix::fs::PermissionsExt::from_mode(0o444),
        );
        fs::rename(&self.data, &target)
            .map_err(|e| Error::internal("move blob into place").with_source(e))?;
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        let _ = fs::remove_dir_all(&self.dir);
        Ok(digest)
    }
}

impl Writer {
    /// Starts (without waiting for) the disk writes of what was written since the last call,
    /// once that is [`WRITEBACK_CHUNK`] or more: the fsync in [`Writer::commit`] then waits only
    /// for the tail instead of the whole blob, and the disk works while the download runs.
    fn start_writeback(&mut self) {
        let len = self.offset - self.flushed;
        if len < WRITEBACK_CHUNK {
            return;
        }
        // SAFETY: plain syscall on a file descriptor this writer owns; no memory is passed. A
        // failure only loses the head start: the fsync at commit still writes everything.
        unsafe {
            libc::sync_file_range(
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                self.flushed as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.flushed = self.offset;
    }
}

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.offset += n as u64;
        self.start_writeback();
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// The error for a blob whose bytes do not hash to what they should.
pub fn mismatch(want: &Digest, got: &Digest) -> Error {
    Error::failed_precondition(format!("digest mismatch: expected {want}, got {got}"))
}

fn not_found(digest: &Digest, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::not_found(format!("content {digest} not found"))
    } else {
        Error::internal(format!("open blob {digest}")).with_source(e)
    }
}

fn read_dir(dir: &Path) -> Result<impl Iterator<Item = Result<fs::DirEntry>>> {
    let it = fs::read_dir(dir)
        .map_err(|e| Error::internal(format!("read {}", dir.display())).with_source(e))?;
    Ok(it.map(|e| e.map_err(|e| Error::internal("read dir entry").with_source(e))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_verify_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(dir.path()).unwrap();
        let d = cs.write_blob(b"hello", None).unwrap();
        assert_eq!(d, Digest::sha256_of(b"hello"));
        assert!(cs.exists(&d));
        assert_eq!(cs.read_blob(&d, 100).unwrap(), b"hello");
        assert_eq!(cs.info(&d).unwrap().size, 5);
        assert_eq!(cs.list().unwrap().len(), 1);
        assert!(cs.ingests().unwrap().is_empty());
        assert_eq!(cs.delete(&d).unwrap(), 5);
        assert!(!cs.exists(&d));
        assert_eq!(cs.info(&d).unwrap_err().kind(), ErrorKind::NotFound);
    }

    #[test]
    fn a_wrong_digest_never_becomes_visible() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(dir.path()).unwrap();
        let want = Digest::sha256_of(b"good");
        let mut w = cs.writer(want.as_str()).unwrap();
        w.write_all(b"evil").unwrap();
        let err = w.commit(Some(4), Some(&want)).unwrap_err();
        assert!(err.message().contains("digest mismatch"), "{}", err.chain());
        assert!(!cs.exists(&want));
        assert!(cs.list().unwrap().is_empty());
        assert!(cs.ingests().unwrap().is_empty());
        // Wrong size.
        let mut w = cs.writer(want.as_str()).unwrap();
        w.write_all(b"goo").unwrap();
        assert!(
            w.commit(Some(4), Some(&want))
                .unwrap_err()
                .message()
                .contains("size mismatch")
        );
    }

    #[test]
    fn a_crash_while_an_ingest_is_made_leaves_nothing_unattributed() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(dir.path()).unwrap();
        // What a process killed between making an ingest's directory and writing its ref
        // leaves: a staging directory of another nonce, and (from older versions) an ingest
        // directory without a ref.
        let stale = dir
            .path()
            .join("ingest")
            .join(format!("{STAGING_PREFIX}0000-1"));
        fs::create_dir(&stale).unwrap();
        let reference = "layer-x";
        fs::create_dir(cs.ingest_dir(reference)).unwrap();
        let mine = cs.writer("layer-y").unwrap();
        assert!(
            cs.ingests()
                .unwrap()
                .iter()
                .all(|i| !i.dir.starts_with(&stale))
        );
        cs.remove_stale_staging();
        assert!(!stale.exists());
        // A writer fills in the ref of the directory the old version left.
        drop(cs.writer(reference).unwrap());
        let mut refs: Vec<String> = cs
            .ingests()
            .unwrap()
            .into_iter()
            .map(|i| i.reference)
            .collect();
        refs.sort();
        assert_eq!(refs, ["layer-x", "layer-y"]);
        drop(mine);
    }

    #[test]
    fn ingests_resume_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let want = Digest::sha256_of(&data);
        {
            let cs = ContentStore::open(dir.path()).unwrap();
            let mut w = cs.writer(want.as_str()).unwrap();
            w.write_all(&data[..40_000]).unwrap();
            // Dropped without commit: a crash.
        }
        let cs = ContentStore::open(dir.path()).unwrap();
        let ingests = cs.ingests().unwrap();
        assert_eq!(ingests.len(), 1);
        assert_eq!(ingests[0].reference, want.as_str());
        let mut w = cs.writer(want.as_str()).unwrap();
        assert_eq!(w.offset(), 40_000);
        // A second writer on the same ingest is refused while the first is open.
        assert_eq!(
            cs.writer(want.as_str()).unwrap_err().kind(),
            ErrorKind::Aborted
        );
        w.write_all(&data[40_000..]).unwrap();
        assert_eq!(
            w.commit(Some(data.len() as u64), Some(&want)).unwrap(),
            want
        );
        assert_eq!(fs::read(cs.blob_path(&want)).unwrap(), data);
        assert!(cs.ingests().unwrap().is_empty());
    }

    #[test]
    fn restart_discards_partial_data() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(dir.path()).unwrap();
        let mut w = cs.writer("x").unwrap();
        w.write_all(b"garbage").unwrap();
        w.restart().unwrap();
        w.write_all(b"ok").unwrap();
        assert_eq!(w.commit(None, None).unwrap(), Digest::sha256_of(b"ok"));
        cs.abort("nothing").unwrap();
    }
}
