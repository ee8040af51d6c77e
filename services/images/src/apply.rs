//! Applying a layer tar to a mounted snapshot, safely.
//!
//! The target is the *mounted view* of an active snapshot (a bind mount of an empty directory for
//! the first layer, an overlay for the later ones), so whiteouts are plain deletions in that view:
//! `.wh.NAME` removes `NAME`, `.wh..wh..opq` empties its directory of everything that did not
//! come from this same layer. On overlay the kernel turns those deletions into its own whiteouts;
//! on a native (copying) snapshotter they are real removals. Both backends get the same code.
//!
//! Every entry is checked before anything is written: an absolute name, a `..` that leaves the
//! root, a parent directory reached through a symlink that points outside the root, or a hard
//! link to a path outside the root fails the whole layer with an error naming the entry. Parents
//! are resolved component by component with `lstat`, symlinks followed *inside* the root (an
//! absolute link target counts from the root, as it would in the container), and the last
//! component is never followed: an existing file, symlink or directory at that path is replaced,
//! never written through.

use std::collections::{HashSet, VecDeque};
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use berth_core::userns::IdMap;
use berth_core::{Digest, Error, Result};
use nix::sys::stat::{Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use sha2::{Digest as _, Sha256};

use crate::oci::Compression;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
const MAX_SYMLINKS: usize = 40;

/// What applying a layer found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// sha256 of the uncompressed tar: the layer's diff id.
    pub diff_id: Digest,
    /// Bytes of the uncompressed tar.
    pub size: u64,
}

/// Decompresses `blob` and applies the tar inside to `root`. Reads the stream to its end (so
/// the caller's digest check sees every byte) and returns the diff id of the uncompressed tar.
///
/// Two threads share the work: this one extracts the tar while a helper reads, decompresses and
/// hashes the stream ahead of it (in [`PIPE_CHUNK`] pieces, at most [`PIPE_DEPTH`] in flight),
/// so decompression and sha256 overlap with the file writes instead of taking turns with them.
///
/// With `map`, every entry's owner is shifted through it (container ids to host ids); an
/// owner outside the map fails the layer with an error naming the entry and the id.
pub fn apply_compressed(
    root: &Path,
    blob: impl Read + Send,
    compression: Compression,
    map: Option<&IdMap>,
) -> Result<Applied> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(PIPE_DEPTH);
    // Spent buffers go back to the producer: no allocation (and page faults) per chunk.
    let (spent_tx, spent) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let producer = scope.spawn(move || -> Result<Applied> {
            let decompressed =
                compression.reader(io::BufReader::with_capacity(PIPE_CHUNK, blob))?;
            let mut hashing = HashingReader {
                inner: decompressed,
                hasher: Sha256::new(),
                count: 0,
            };
            loop {
                let buf = spent.try_recv().unwrap_or_default();
                let chunk = read_chunk(&mut hashing, buf);
                let end = matches!(&chunk, Ok(c) if c.is_empty()) || chunk.is_err();
                // A closed channel means the extraction failed: its error is the one to report.
                if tx.send(chunk).is_err() || end {
                    break;
                }
            }
            Ok(Applied {
                diff_id: Digest::from_sha256_bytes(&hashing.hasher.finalize()),
                size: hashing.count,
            })
        });
        let mut pipe = ChannelReader {
            rx,
            spent: spent_tx,
            chunk: Vec::new(),
            pos: 0,
        };
        let extracted = apply_tar(root, &mut pipe, map).and_then(|()| {
            // Whatever follows the end-of-archive blocks is part of the diff id too.
            io::copy(&mut pipe, &mut io::sink())
                .map(|_| ())
                .map_err(|e| read_error(e, "read layer"))
        });
        drop(pipe);
        let applied = producer
            .join()
            .map_err(|_| Error::internal("layer decompression thread panicked"))??;
        extracted.map(|()| applied)
    })
}

/// Size of the pieces the decompression thread hands to the extraction.
const PIPE_CHUNK: usize = 1 << 20;
/// Pieces decompressed ahead of the extraction at most.
const PIPE_DEPTH: usize = 4;

/// Reads up to [`PIPE_CHUNK`] bytes into `buf` (fewer only at the end of the stream).
fn read_chunk(r: &mut impl Read, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
    buf.resize(PIPE_CHUNK, 0);
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

/// The extraction's end of the pipe: the decompressed stream, chunk by chunk. An error from the
/// decompression side is returned once, then the stream ends.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    spent: std::sync::mpsc::Sender<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(Ok(c)) if c.is_empty() => return Ok(0),
                Ok(Ok(c)) => {
                    let _ = self.spent.send(std::mem::replace(&mut self.chunk, c));
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Hashes and counts what passes through.
#[allow(missing_debug_implementations)]
pub struct HashingReader<R> {
    pub inner: R,
    pub hasher: Sha256,
    pub count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

fn read_error(e: io::Error, what: &str) -> Error {
    // A download that failed underneath us surfaces here as an i/o error carrying its message.
    Error::new(berth_core::ErrorKind::Unavailable, what.to_string()).with_source(e)
}

fn bad_entry(name: &Path, why: &str) -> Error {
    Error::invalid_argument(format!("tar entry {:?} {why}", name.display().to_string()))
}

/// Applies an uncompressed layer tar to `root`, owners shifted through `map` when given.
pub fn apply_tar(root: &Path, reader: impl Read, map: Option<&IdMap>) -> Result<()> {
    let mut archive = tar::Archive::new(reader);
    let mut applier = Applier {
        root: root.to_path_buf(),
        written: HashSet::new(),
        dirs: Vec::new(),
        map: map.cloned(),
    };
    let entries = archive
        .entries()
        .map_err(|e| read_error(e, "read layer tar"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| tar_error(e, "read layer tar"))?;
        applier.entry(&mut entry)?;
    }
    // Directory times last: creating their children changed them.
    for (path, mtime) in applier.dirs.iter().rev() {
        set_times(&root.join(path), *mtime)?;
    }
    Ok(())
}

fn tar_error(e: io::Error, what: &str) -> Error {
    if e.kind() == io::ErrorKind::Other || e.kind() == io::ErrorKind::InvalidData {
        // The tar crate reports malformed archives as Other; a download failure keeps its kind.
        if e.get_ref()
            .is_some_and(|inner| inner.to_string().contains("digest"))
        {
            return read_error(e, what);
        }
        return Error::invalid_argument(format!("{what}: malformed tar")).with_source(e);
    }
    read_error(e, what)
}

struct Applier {
    root: PathBuf,
    /// Paths (relative, resolved) this layer wrote: whiteouts never remove them.
    written: HashSet<PathBuf>,
    /// Directories whose times are set at the end.
    dirs: Vec<(PathBuf, TimeSpec)>,
    /// Owners are shifted through it (a container user namespace's map).
    map: Option<IdMap>,
}

struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: TimeSpec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Applier {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<()> {
        let raw_name = entry
            .path()
            .map_err(|e| tar_error(e, "entry name"))?
            .into_owned();
        let rel = clean(&raw_name)?;
        let kind = entry.header().entry_type();
        let Some(file_name) = rel.file_name().map(|n| n.to_os_string()) else {
            // The root itself ("./"): its metadata belongs to the snapshotter, not the layer.
            return Ok(());
        };
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let parent = self.resolve_dir(parent_rel, &raw_name)?;
        let name_str = file_name.to_string_lossy();

        if name_str == OPAQUE {
            return self.opaque(&parent);
        }
        if let Some(hidden) = name_str.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.starts_with(".wh.") {
                return Ok(()); // other AUFS metadata (.wh..wh.plnk, ...)
            }
            let target = parent.join(hidden);
            if !self.written.contains(&target) {
                remove_all(&self.root.join(&target))?;
            }
            return Ok(());
        }

        let rel_path = parent.join(&file_name);
        let path = self.root.join(&rel_path);
        let meta = self.meta(entry)?;
        let existing = fs::symlink_metadata(&path).ok();
        let is_dir = kind == tar::EntryType::Directory;
        if let Some(ex) = &existing
            && !(is_dir && ex.is_dir())
        {
            remove_all(&path)?;
        }
        match kind {
            tar::EntryType::Directory => {
                if existing.as_ref().is_none_or(|e| !e.is_dir()) {
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&path)
                        .map_err(|e| io_err(e, "create directory", &rel_path))?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(|e| io_err(e, "create file", &rel_path))?;
                copy(entry, &mut f).map_err(|e| match e {
                    CopyError::Read(e) => tar_error(e, "read layer"),
                    CopyError::Write(e) => io_err(e, "write file", &rel_path),
                })?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| tar_error(e, "symlink target"))?
                    .ok_or_else(|| bad_entry(&raw_name, "is a symlink without a target"))?;
                std::os::unix::fs::symlink(&*target, &path)
                    .map_err(|e| io_err(e, "create symlink", &rel_path))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| tar_error(e, "hard link target"))?
                    .ok_or_else(|| bad_entry(&raw_name, "is a hard link without a target"))?;
                let target_rel = clean(&target)
                    .map_err(|_| bad_entry(&raw_name, "links outside the layer root"))?;
                let Some(target_name) = target_rel.file_name() else {
                    return Err(bad_entry(&raw_name, "links to the layer root"));
                };
                let target_parent = self
                    .resolve_dir(target_rel.parent().unwrap_or(Path::new("")), &raw_name)
                    .map_err(|_| bad_entry(&raw_name, "links outside the layer root"))?;
                let source = self.root.join(target_parent.join(target_name));
                let sm = fs::symlink_metadata(&source)
                    .map_err(|_| bad_entry(&raw_name, "links to a file that does not exist"))?;
                if sm.is_dir() {
                    return Err(bad_entry(&raw_name, "is a hard link to a directory"));
                }
                nix::unistd::linkat(
                    nix::fcntl::AT_FDCWD,
                    &source,
                    nix::fcntl::AT_FDCWD,
                    &path,
                    nix::fcntl::AtFlags::empty(),
                )
                .map_err(|e| io_err(e.into(), "create hard link", &rel_path))?;
                // A hard link shares its inode's metadata; the header's is the target's.
                self.written.insert(rel_path);
                return Ok(());
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let (sflag, dev) = match kind {
                    tar::EntryType::Char => (SFlag::S_IFCHR, device(entry)?),
                    tar::EntryType::Block => (SFlag::S_IFBLK, device(entry)?),
                    _ => (SFlag::S_IFIFO, 0),
                };
                nix::sys::stat::mknod(&path, sflag, Mode::from_bits_truncate(0o600), dev)
                    .map_err(|e| io_err(e.into(), "create device node", &rel_path))?;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => return Ok(()),
            other => {
                return Err(bad_entry(
                    &raw_name,
                    &format!("has an unsupported type {other:?}"),
                ));
            }
        }
        self.set_meta(&path, &rel_path, &meta, kind)?;
        if is_dir {
            self.dirs.push((rel_path.clone(), meta.mtime));
        }
        self.written.insert(rel_path);
        Ok(())
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>) -> Result<Meta> {
        let h = entry.header();
        let mut m = Meta {
            uid: h.uid().unwrap_or(0) as u32,
            gid: h.gid().unwrap_or(0) as u32,
            mode: h.mode().unwrap_or(0o644) & 0o7777,
            mtime: TimeSpec::new(h.mtime().unwrap_or(0) as i64, 0),
            xattrs: Vec::new(),
        };
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts {
                let Ok(ext) = ext else { continue };
                let Ok(key) = ext.key() else { continue };
                let value = ext.value_bytes();
                let text = std::str::from_utf8(value).unwrap_or("");
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    m.xattrs.push((name.as_bytes().to_vec(), value.to_vec()));
                } else if key == "uid" {
                    m.uid = text.parse().unwrap_or(m.uid);
                } else if key == "gid" {
                    m.gid = text.parse().unwrap_or(m.gid);
                } else if key == "mtime" {
                    let (s, frac) = text.split_once('.').unwrap_or((text, ""));
                    if let Ok(secs) = s.parse::<i64>() {
                        let mut digits: String = frac.chars().take(9).collect();
                        while digits.len() < 9 {
                            digits.push('0');
                        }
                        m.mtime = TimeSpec::new(secs, digits.parse().unwrap_or(0));
                    }
                }
            }
        }
        Ok(m)
    }

    fn set_meta(&self, path: &Path, rel: &Path, m: &Meta, kind: tar::EntryType) -> Result<()> {
        let (uid, gid) = match &self.map {
            Some(map) => map.host_owner(
                &format_args!("tar entry {:?}", rel.display().to_string()),
                m.uid,
                m.gid,
            )?,
            None => (m.uid, m.gid),
        };
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            path,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| io_err(e.into(), "chown", rel))?;
        for (name, value) in &m.xattrs {
            set_xattr(path, name, value).map_err(|e| io_err(e, "set xattr", rel))?;
        }
        if kind != tar::EntryType::Symlink {
            // After chown, which clears setuid/setgid.
            fs::set_permissions(path, fs::Permissions::from_mode(m.mode))
                .map_err(|e| io_err(e, "chmod", rel))?;
        }
        if kind != tar::EntryType::Directory {
            set_times(path, m.mtime)?;
        }
        Ok(())
    }

    /// Resolves the directory `rel` inside the root, following symlinks within it and creating
    /// missing directories. Returns a path without symlinks, relative to the root.
    fn resolve_dir(&self, rel: &Path, entry_name: &Path) -> Result<PathBuf> {
        let mut todo: VecDeque<PathBuf> = rel
            .components()
            .map(|c| PathBuf::from(c.as_os_str()))
            .collect();
        let mut cur = PathBuf::new();
        let mut links = 0;
        while let Some(comp) = todo.pop_front() {
            if comp.as_os_str() == ".." {
                if !cur.pop() {
                    return Err(bad_entry(
                        entry_name,
                        "escapes the layer root through a symlink",
                    ));
                }
                continue;
            }
            if comp.as_os_str() == "." || comp.as_os_str().is_empty() {
                continue;
            }
            let next = cur.join(&comp);
            let full = self.root.join(&next);
            match fs::symlink_metadata(&full) {
                Ok(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(bad_entry(entry_name, "has too many levels of symlinks"));
                    }
                    let target =
                        fs::read_link(&full).map_err(|e| io_err(e, "read symlink", &next))?;
                    if target.is_absolute() {
                        cur = PathBuf::new();
                    }
                    let mut parts: Vec<PathBuf> = target
                        .components()
                        .filter(|c| !matches!(c, Component::RootDir))
                        .map(|c| PathBuf::from(c.as_os_str()))
                        .collect();
                    while let Some(p) = parts.pop() {
                        todo.push_front(p);
                    }
                }
                Ok(m) if m.is_dir() => cur = next,
                Ok(_) => {
                    return Err(bad_entry(
                        entry_name,
                        &format!(
                            "has a parent {:?} that is not a directory",
                            next.display().to_string()
                        ),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&full)
                        .map_err(|e| io_err(e, "create parent directory", &next))?;
                    if let Some(map) = &self.map {
                        // A directory the layer implies belongs to the container's root.
                        let (uid, gid) = map.root();
                        std::os::unix::fs::lchown(&full, Some(uid), Some(gid))
                            .map_err(|e| io_err(e, "chown parent directory", &next))?;
                    }
                    cur = next;
                }
                Err(e) => return Err(io_err(e, "stat", &next)),
            }
        }
        Ok(cur)
    }

    /// `.wh..wh..opq`: hide everything in `dir` that lower layers put there.
    fn opaque(&self, dir: &Path) -> Result<()> {
        let full = self.root.join(dir);
        let entries = match fs::read_dir(&full) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(e, "read directory", dir)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_err(e, "read directory", dir))?;
            let child = dir.join(entry.file_name());
            if !self.written.contains(&child) {
                remove_all(&self.root.join(&child))?;
            } else if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                self.opaque(&child)?;
            }
        }
        Ok(())
    }
}

/// Lexically cleans a tar entry name into a relative path; absolute names and `..` that would
/// leave the root are errors.
pub fn clean(name: &Path) -> Result<PathBuf> {
    if name.as_os_str().as_bytes().starts_with(b"/") {
        return Err(bad_entry(name, "has an absolute path"));
    }
    let mut out = PathBuf::new();
    for c in name.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return Err(bad_entry(name, "escapes the layer root with '..'"));
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(bad_entry(name, "has an absolute path"));
            }
        }
    }
    Ok(out)
}

fn device<R: Read>(entry: &tar::Entry<'_, R>) -> Result<u64> {
    let h = entry.header();
    let major = h.device_major().ok().flatten().unwrap_or(0);
    let minor = h.device_minor().ok().flatten().unwrap_or(0);
    Ok(nix::sys::stat::makedev(major as u64, minor as u64))
}

fn remove_all(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
    .map_err(|e| Error::internal(format!("remove {}", path.display())).with_source(e))
}

fn set_times(path: &Path, mtime: TimeSpec) -> Result<()> {
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &mtime,
        &mtime,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| Error::internal(format!("set times of {}", path.display())).with_source(e))
}

fn set_xattr(path: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let n = CString::new(name)?;
    // SAFETY: both strings are NUL-terminated and live across the call; `value` is a valid
    // buffer of `value.len()` bytes.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOTSUP) {
        tracing::debug!(path = %path.display(), name = %String::from_utf8_lossy(name), "xattr not supported here; skipped");
        return Ok(());
    }
    Err(err)
}

fn io_err(e: io::Error, what: &str, rel: &Path) -> Error {
    Error::internal(format!("{what} {:?}", OsStr::new(rel).to_string_lossy())).with_source(e)
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

fn copy(r: &mut impl Read, w: &mut fs::File) -> std::result::Result<(), CopyError> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        w.write_all(&buf[..n]).map_err(CopyError::Write)?;
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// A tar built entry by entry; names are written raw so hostile ones can be made.
    struct T(tar::Builder<Vec<u8>>);

    impl T {
        fn new() -> Self {
            Self(tar::Builder::new(Vec::new()))
        }
        fn header(name: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(size);
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            h
        }
        fn dir(mut self, name: &str) -> Self {
            let mut h = Self::header(name, tar::EntryType::Directory, 0o755, 0);
            h.set_cksum();
            self.0.append(&h, io::empty()).unwrap();
            self
        }
        fn file(mut self, name: &str, data: &[u8], mode: u32) -> Self {
            let mut h = Self::header(name, tar::EntryType::Regular, mode, data.len() as u64);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }
        fn link(mut self, name: &str, target: &str, kind: tar::EntryType) -> Self {
            let mut h = Self::header(name, kind, 0o777, 0);
            let t = target.as_bytes();
            h.as_old_mut().linkname[..t.len()].copy_from_slice(t);
            h.set_cksum();
            self.0.append(&h, io::empty()).unwrap();
            self
        }
        fn build(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn apply(root: &Path, tar: Vec<u8>) -> Result<Applied> {
        apply_compressed(root, &tar[..], Compression::None, None)
    }

    #[test]
    fn layers_with_whiteouts_opaque_dirs_and_links() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let l1 = T::new()
            .dir("data")
            .dir("data/dir")
            .file("data/a", b"a\n", 0o644)
            .file("data/b", b"b\n", 0o644)
            .file("data/dir/x", b"x\n", 0o644)
            .link("data/link", "a", tar::EntryType::Symlink)
            .file("data/secret", b"s\n", 0o600)
            .file("data/suid", b"#!/bin/sh\n", 0o4755)
            .link("data/hard", "data/b", tar::EntryType::Link)
            .build();
        let applied = apply(root, l1.clone()).unwrap();
        assert_eq!(applied.diff_id, Digest::sha256_of(&l1));
        assert_eq!(applied.size, l1.len() as u64);
        let l2 = T::new()
            .dir("data")
            .file("data/.wh.a", b"", 0o644)
            .dir("data/dir")
            .file("data/dir/.wh..wh..opq", b"", 0o644)
            .file("data/dir/y", b"y\n", 0o644)
            .build();
        apply(root, l2).unwrap();
        let d = root.join("data");
        assert!(!d.join("a").exists());
        assert!(!d.join("dir/x").exists());
        assert_eq!(fs::read(d.join("dir/y")).unwrap(), b"y\n");
        assert!(!d.join(".wh.a").exists());
        assert!(!d.join("dir/.wh..wh..opq").exists());
        assert_eq!(fs::read_link(d.join("link")).unwrap(), Path::new("a"));
        assert!(fs::metadata(d.join("link")).is_err(), "dangling");
        let b = fs::metadata(d.join("b")).unwrap();
        let h = fs::metadata(d.join("hard")).unwrap();
        assert_eq!(b.ino(), h.ino());
        assert_eq!(
            fs::metadata(d.join("secret")).unwrap().mode() & 0o7777,
            0o600
        );
        assert_eq!(
            fs::metadata(d.join("suid")).unwrap().mode() & 0o7777,
            0o4755
        );
        assert_eq!(
            fs::metadata(d.join("secret")).unwrap().mtime(),
            1_700_000_000
        );
        assert_eq!(fs::metadata(&d).unwrap().mtime(), 1_700_000_000);
    }

    #[test]
    fn an_opaque_dir_keeps_what_the_same_layer_wrote() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        apply(root, T::new().dir("d").file("d/old", b"o", 0o644).build()).unwrap();
        apply(
            root,
            T::new()
                .dir("d")
                .file("d/new", b"n", 0o644)
                .file("d/.wh..wh..opq", b"", 0o644)
                .build(),
        )
        .unwrap();
        assert!(!root.join("d/old").exists());
        assert!(root.join("d/new").exists());
    }

    #[test]
    fn entries_replace_and_never_write_through_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let target = outside.path().join("victim");
        fs::write(&target, b"safe").unwrap();
        apply(
            root,
            T::new()
                .link("f", target.to_str().unwrap(), tar::EntryType::Symlink)
                .build(),
        )
        .unwrap();
        apply(root, T::new().file("f", b"new", 0o644).build()).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"safe");
        assert_eq!(fs::read(root.join("f")).unwrap(), b"new");
        // A directory replaced by a file and back.
        apply(root, T::new().dir("x").file("x/y", b"", 0o644).build()).unwrap();
        apply(root, T::new().file("x", b"file", 0o644).build()).unwrap();
        assert!(root.join("x").is_file());
    }

    #[test]
    fn absolute_symlinks_resolve_inside_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        apply(
            root,
            T::new()
                .dir("usr")
                .dir("usr/lib")
                .link("lib", "/usr/lib", tar::EntryType::Symlink)
                .file("lib/libx.so", b"x", 0o644)
                .build(),
        )
        .unwrap();
        assert!(root.join("usr/lib/libx.so").is_file());
    }

    #[test]
    fn escapes_are_rejected() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("dotdot", T::new().file("../evil", b"x", 0o644).build()),
            (
                "nested dotdot",
                T::new().dir("a").file("a/../../evil", b"x", 0o644).build(),
            ),
            ("absolute", T::new().file("/evil", b"x", 0o644).build()),
            (
                "through symlink",
                T::new()
                    .link("up", "../../../../..", tar::EntryType::Symlink)
                    .file("up/evil", b"x", 0o644)
                    .build(),
            ),
            (
                "hard link out",
                T::new()
                    .link("h", "../../../etc/passwd", tar::EntryType::Link)
                    .build(),
            ),
            (
                "hard link through symlink",
                T::new()
                    .link("up", "../..", tar::EntryType::Symlink)
                    .link("h", "up/etc/passwd", tar::EntryType::Link)
                    .build(),
            ),
        ];
        for (what, tar) in cases {
            let outer = tempfile::tempdir().unwrap();
            let root = outer.path().join("a/b/root");
            fs::create_dir_all(&root).unwrap();
            let err = apply(&root, tar).unwrap_err();
            assert_eq!(
                err.kind(),
                berth_core::ErrorKind::InvalidArgument,
                "{what}: {}",
                err.chain()
            );
            assert!(
                err.message().contains("tar entry"),
                "{what}: {}",
                err.chain()
            );
            assert!(!outer.path().join("evil").exists(), "{what}");
            assert!(!outer.path().join("a/evil").exists(), "{what}");
            assert!(!outer.path().join("a/b/evil").exists(), "{what}");
        }
    }

    #[test]
    fn device_nodes_when_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut h = T::header("null", tar::EntryType::Char, 0o666, 0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_uid(70);
        h.set_gid(70);
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(&h, io::empty()).unwrap();
        apply(tmp.path(), b.into_inner().unwrap()).unwrap();
        let m = fs::symlink_metadata(tmp.path().join("null")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), nix::sys::stat::makedev(1, 3));
        assert_eq!(m.uid(), 70);
        assert_eq!(m.mode() & 0o777, 0o666);
    }

    #[test]
    fn xattrs_and_ownership_from_pax_headers() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let exts: Vec<(&str, &[u8])> = vec![
            ("SCHILY.xattr.user.berth", b"yes"),
            ("uid", b"1234"),
            ("gid", b"5678"),
            ("mtime", b"1700000000.5"),
        ];
        b.append_pax_extensions(exts).unwrap();
        let mut h = T::header("f", tar::EntryType::Regular, 0o640, 2);
        h.set_cksum();
        b.append(&h, &b"hi"[..]).unwrap();
        apply(tmp.path(), b.into_inner().unwrap()).unwrap();
        let p = tmp.path().join("f");
        let m = fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), (1234, 5678));
        assert_eq!(m.mode() & 0o7777, 0o640);
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_700_000_000, 500_000_000));
        let name = CString::new("user.berth").unwrap();
        let path = CString::new(p.as_os_str().as_bytes()).unwrap();
        let mut buf = [0u8; 16];
        // SAFETY: valid NUL-terminated strings and a buffer of the length passed.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!(n, 3, "xattr read back: {}", io::Error::last_os_error());
        assert_eq!(&buf[..3], b"yes");
    }

    #[test]
    fn gzip_and_zstd_layers() {
        let tar = T::new().file("z", b"zz", 0o644).build();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let zs = zstd::encode_all(&tar[..], 1).unwrap();
        for (blob, c) in [(gz, Compression::Gzip), (zs, Compression::Zstd)] {
            let tmp = tempfile::tempdir().unwrap();
            let a = apply_compressed(tmp.path(), &blob[..], c, None).unwrap();
            assert_eq!(a.diff_id, Digest::sha256_of(&tar));
            assert_eq!(fs::read(tmp.path().join("z")).unwrap(), b"zz");
        }
    }

    /// Bigger than the pipe between decompression and extraction, with trailing bytes after the
    /// end-of-archive blocks: the diff id covers every byte, in order.
    #[test]
    fn large_layers_stream_through_the_pipe() {
        let big: Vec<u8> = (0..(PIPE_CHUNK * PIPE_DEPTH * 2 + 12345) as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut tar = T::new().dir("d").file("d/big", &big, 0o644).build();
        tar.extend_from_slice(&[0u8; 4096]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let a = apply_compressed(tmp.path(), &gz[..], Compression::Gzip, None).unwrap();
        assert_eq!(a.diff_id, Digest::sha256_of(&tar));
        assert_eq!(a.size, tar.len() as u64);
        assert_eq!(fs::read(tmp.path().join("d/big")).unwrap(), big);
    }

    /// A blob whose reader fails half way (a download that failed underneath the unpack).
    struct FailsAfter(Vec<u8>, usize);

    impl Read for FailsAfter {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.1 >= self.0.len() {
                return Err(io::Error::other("blob sha256:x: digest mismatch"));
            }
            let n = buf.len().min(self.0.len() - self.1);
            buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
            self.1 += n;
            Ok(n)
        }
    }

    #[test]
    fn a_failing_blob_fails_the_layer_with_its_error() {
        let big = vec![1u8; PIPE_CHUNK * 3];
        let tar = T::new().file("big", &big, 0o644).build();
        let tmp = tempfile::tempdir().unwrap();
        let half = FailsAfter(tar[..tar.len() / 2].to_vec(), 0);
        let err = apply_compressed(tmp.path(), half, Compression::None, None).unwrap_err();
        assert_eq!(
            err.kind(),
            berth_core::ErrorKind::Unavailable,
            "{}",
            err.chain()
        );
        assert!(err.chain().contains("digest mismatch"), "{}", err.chain());
    }

    #[test]
    fn owners_are_shifted_through_the_map_and_ids_outside_it_refused() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let map = IdMap {
            uids: berth_core::userns::concatenate(&[(100000, 1000)]).unwrap(),
            gids: berth_core::userns::concatenate(&[(200000, 1000)]).unwrap(),
        };
        let mut b = tar::Builder::new(Vec::new());
        for (name, uid, gid) in [("etc/f", 0, 0), ("home/u", 999, 5)] {
            let mut h = tar::Header::new_gnu();
            h.set_path(name).unwrap();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(1);
            h.set_uid(uid);
            h.set_gid(gid);
            h.set_cksum();
            b.append(&h, &b"x"[..]).unwrap();
        }
        let tar = b.into_inner().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        apply_compressed(tmp.path(), &tar[..], Compression::None, Some(&map)).unwrap();
        let owner = |p: &str| {
            let m = fs::symlink_metadata(tmp.path().join(p)).unwrap();
            (m.uid(), m.gid())
        };
        assert_eq!(owner("etc/f"), (100000, 200000));
        assert_eq!(owner("home/u"), (100999, 200005));
        // Parents the layer only implies belong to the container's root.
        assert_eq!(owner("etc"), (100000, 200000));

        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_path("opt/far").unwrap();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(0);
        h.set_uid(1000);
        h.set_gid(0);
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
        let tar = b.into_inner().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let err =
            apply_compressed(tmp.path(), &tar[..], Compression::None, Some(&map)).unwrap_err();
        assert_eq!(err.kind(), berth_core::ErrorKind::InvalidArgument);
        assert!(
            err.chain().contains(
                "tar entry \"opt/far\": uid 1000 is outside the container's user namespace map"
            ),
            "{}",
            err.chain()
        );
    }
}
