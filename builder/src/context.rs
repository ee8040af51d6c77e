//! The build context: the tar `POST /build` receives, unpacked into a directory, and the COPY/ADD
//! sources taken from it.
//!
//! - [`unpack`] sniffs the compression (plain, gzip, bzip2, xz) and refuses entries with `..` or
//!   an absolute path, and links that point out of the context;
//! - [`prepare`] also reads the Dockerfile and `.dockerignore`, then removes what `.dockerignore`
//!   excludes (the Dockerfile and `.dockerignore` included when listed, after reading them: moby's
//!   `removeDockerfile`);
//! - [`resolve_sources`] turns COPY/ADD sources into context paths (Go `filepath.Match`
//!   wildcards, moby's errors for missing files and paths outside the context);
//! - [`digest_sources`] is the content digest of those sources for the build cache: names,
//!   contents, modes, the `--chown` owner and symlink targets, not mtimes.

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::dockerignore::{self, Matcher, PatternError};

/// Context errors; messages are moby's where moby has one.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("build context entry {0:?} has an absolute path")]
    AbsolutePath(String),
    #[error("build context entry {0:?} points outside the build context")]
    Escape(String),
    #[error("forbidden path outside the build context: {0}")]
    OutsideContext(String),
    #[error(
        "file not found in build context or excluded by .dockerignore: stat {0}: file does not exist"
    )]
    NotFound(String),
    #[error("no source files were specified")]
    NoSources,
    #[error("Cannot locate specified Dockerfile: {0}")]
    NoDockerfile(String),
    #[error("error processing .dockerignore: {0}")]
    Dockerignore(#[from] PatternError),
    #[error("reading the build context: {0}")]
    Io(#[from] io::Error),
}

/// The compression of a context stream, from its first bytes (moby's `DetectCompression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Bzip2,
    Xz,
    Zstd,
}

impl Compression {
    pub fn sniff(head: &[u8]) -> Self {
        if head.starts_with(&[0x1f, 0x8b, 0x08]) {
            Compression::Gzip
        } else if head.starts_with(b"BZh") {
            Compression::Bzip2
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Compression::Xz
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

/// Wraps a context stream in the decompressor its first bytes call for.
pub fn decompress<'a, R: Read + 'a>(reader: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut reader = BufReader::new(reader);
    let head = reader.fill_buf()?.to_vec();
    Ok(match Compression::sniff(&head) {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(reader)),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(reader)),
        Compression::Zstd => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "zstd-compressed build contexts are not supported",
            ));
        }
    })
}

/// Checks a tar entry path: relative, no `..`. Returns it normalized (no `.` parts).
fn safe_relative(raw: &Path) -> Result<PathBuf, ContextError> {
    let shown = || raw.to_string_lossy().into_owned();
    let mut out = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(ContextError::Escape(shown())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(ContextError::AbsolutePath(shown()));
            }
        }
    }
    Ok(out)
}

/// Unpacks a (possibly compressed) context tar into `dir`, which must exist. Entries with an
/// absolute path or `..`, and hard links to such paths, are refused before anything is written
/// for them. Symlinks are written as they are (they are data: COPY copies the link itself when
/// it is inside a copied directory, and resolves top-level sources within the context).
pub fn unpack<R: Read>(reader: R, dir: &Path) -> Result<(), ContextError> {
    let mut archive = tar::Archive::new(decompress(reader)?);
    archive.set_preserve_permissions(true);
    archive.set_overwrite(true);
    archive.set_unpack_xattrs(false);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let raw = entry.path()?.into_owned();
        let rel = safe_relative(&raw)?;
        if let Some(link) = entry.link_name()?
            && entry.header().entry_type().is_hard_link()
        {
            safe_relative(&link)?;
        }
        if rel.as_os_str().is_empty() {
            continue;
        }
        let target = dir.join(&rel);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        // `unpack_in` also refuses paths escaping `dir` through symlinks already unpacked.
        if !entry.unpack_in(dir)? {
            return Err(ContextError::Escape(raw.to_string_lossy().into_owned()));
        }
    }
    Ok(())
}

/// A context ready for the build.
#[derive(Debug)]
pub struct Prepared {
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// The `.dockerignore` matcher (empty when there is none).
    pub ignore: Matcher,
}

/// Unpacks the context into `dir`, reads the Dockerfile at `dockerfile_path` (relative to the
/// context; `Dockerfile` falls back to `dockerfile` as moby does) and `.dockerignore`, then
/// removes the excluded files.
pub fn prepare<R: Read>(
    reader: R,
    dir: &Path,
    dockerfile_path: &str,
) -> Result<Prepared, ContextError> {
    unpack(reader, dir)?;
    let dockerfile_path = if dockerfile_path.is_empty() {
        "Dockerfile"
    } else {
        dockerfile_path
    };
    let rel = safe_relative(Path::new(dockerfile_path.trim_start_matches('/')))
        .map_err(|_| ContextError::NoDockerfile(dockerfile_path.to_string()))?;
    let mut path = dir.join(&rel);
    if !path.is_file() && dockerfile_path == "Dockerfile" {
        path = dir.join("dockerfile");
    }
    let dockerfile = fs::read_to_string(&path)
        .map_err(|_| ContextError::NoDockerfile(dockerfile_path.to_string()))?;
    let ignore = match fs::read_to_string(dir.join(".dockerignore")) {
        Ok(text) => Matcher::from_dockerignore(&text)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Matcher::default(),
        Err(e) => return Err(e.into()),
    };
    prune(dir, &ignore)?;
    Ok(Prepared { dockerfile, ignore })
}

/// Removes from `dir` everything the matcher excludes.
pub fn prune(dir: &Path, ignore: &Matcher) -> Result<(), ContextError> {
    if ignore.is_empty() {
        return Ok(());
    }
    prune_in(dir, "", ignore)
}

fn prune_in(root: &Path, rel: &str, ignore: &Matcher) -> Result<(), ContextError> {
    let mut names: Vec<String> = fs::read_dir(root.join(rel))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let child = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let path = root.join(&child);
        let is_dir = fs::symlink_metadata(&path)?.is_dir();
        if ignore.excluded(&child, is_dir) {
            if !is_dir {
                fs::remove_file(&path)?;
                continue;
            }
            if ignore.can_skip_dir(&child) {
                fs::remove_dir_all(&path)?;
                continue;
            }
            // An exception may re-include something inside: look at each entry, then drop
            // the directory if nothing stayed.
            prune_in(root, &child, ignore)?;
            if fs::read_dir(&path)?.next().is_none() {
                fs::remove_dir(&path)?;
            }
        } else if is_dir {
            prune_in(root, &child, ignore)?;
        }
    }
    Ok(())
}

/// Whether a source has Go `filepath.Match` wildcards.
pub fn has_wildcards(src: &str) -> bool {
    let mut escaped = false;
    for c in src.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '*' | '?' | '[' => return true,
            _ => {}
        }
    }
    false
}

/// Resolves COPY/ADD sources (as written after expansion) to paths relative to the context
/// root, in order. A leading `/` or `./` is dropped (sources are context-relative); `..` that
/// climbs out is refused; wildcards match with Go's `filepath.Match` against every path of the
/// context; a missing source, or sources that match nothing, fail as moby fails.
pub fn resolve_sources(root: &Path, srcs: &[String]) -> Result<Vec<PathBuf>, ContextError> {
    let mut out = Vec::new();
    for src in srcs {
        let trimmed = src
            .strip_prefix('/')
            .filter(|s| !s.is_empty())
            .unwrap_or(src);
        let trimmed = trimmed.strip_prefix("./").unwrap_or(trimmed);
        let cleaned = dockerignore::clean_path(trimmed);
        if cleaned == ".." || cleaned.starts_with("../") {
            return Err(ContextError::OutsideContext(src.clone()));
        }
        if has_wildcards(&cleaned) {
            let mut all = Vec::new();
            walk(root, "", &mut all)?;
            for path in all {
                if dockerignore::go_match(&cleaned, &path)? {
                    out.push(PathBuf::from(path));
                }
            }
            continue;
        }
        let rel = if cleaned == "." {
            PathBuf::new()
        } else {
            PathBuf::from(&cleaned)
        };
        if fs::symlink_metadata(root.join(&rel)).is_err() {
            return Err(ContextError::NotFound(trimmed.to_string()));
        }
        out.push(rel);
    }
    if out.is_empty() {
        return Err(ContextError::NoSources);
    }
    Ok(out)
}

/// Every path under `root/rel`, relative to `root`, sorted, directories before their contents.
fn walk(root: &Path, rel: &str, out: &mut Vec<String>) -> io::Result<()> {
    let mut names: Vec<String> = fs::read_dir(root.join(rel))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let child = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let is_dir = fs::symlink_metadata(root.join(&child))?.is_dir();
        out.push(child.clone());
        if is_dir {
            walk(root, &child, out)?;
        }
    }
    Ok(())
}

/// The cache digest of a COPY/ADD's sources: `sha256:<hex>` over, for each source and each
/// path under it (sorted), the path, the file type, the permission bits, the owner (`chown` as
/// given, or `0:0` — the classic builder gives copied files to root unless `--chown`), the
/// contents of files and the target of symlinks. Modification times are left out on purpose:
/// touching a file does not invalidate the cache.
pub fn digest_sources(
    root: &Path,
    sources: &[PathBuf],
    chown: Option<&str>,
) -> Result<String, ContextError> {
    let mut hasher = Sha256::new();
    let owner = chown.unwrap_or("0:0");
    hasher.update(format!("owner {owner}\0").as_bytes());
    for source in sources {
        hasher.update(format!("source {}\0", source.display()).as_bytes());
        let rel = source.to_string_lossy().into_owned();
        let mut paths = vec![rel.clone()];
        let top = root.join(source);
        if fs::metadata(&top).map(|m| m.is_dir()).unwrap_or(false) {
            walk(root, &rel, &mut paths)?;
        }
        for path in paths {
            digest_entry(&mut hasher, root, &path)?;
        }
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

fn digest_entry(hasher: &mut Sha256, root: &Path, rel: &str) -> Result<(), ContextError> {
    let path = root.join(rel);
    let meta = fs::symlink_metadata(&path)?;
    let mode = meta.permissions().mode() & 0o7777;
    let kind = if meta.is_dir() {
        "dir"
    } else if meta.file_type().is_symlink() {
        "symlink"
    } else if meta.is_file() {
        "file"
    } else {
        "other"
    };
    hasher.update(
        format!(
            "{rel}\0{kind}\0{mode:o}\0{}\0",
            meta.size() * u64::from(meta.is_file())
        )
        .as_bytes(),
    );
    if meta.file_type().is_symlink() {
        hasher.update(fs::read_link(&path)?.as_os_str().as_encoded_bytes());
    } else if meta.is_file() {
        let mut file = fs::File::open(&path)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
    }
    hasher.update(b"\0");
    Ok(())
}
