//! The build context: the tar `POST /build` receives, unpacked into a directory, and the COPY/ADD
//! sources taken from it.
//!
//! - [`unpack`] sniffs the compression (plain, gzip, bzip2, xz, zstd) and refuses entries with `..` or
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

/// Context errors; messages are moby's where moby has one. For COPY/ADD sources moby shows them
/// after the instruction: the caller prefixes `COPY failed: ` / `ADD failed: `, giving e.g.
/// `COPY failed: file not found in build context or excluded by .dockerignore: stat x: file does
/// not exist`.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("build context entry {0:?} has an absolute path")]
    AbsolutePath(String),
    #[error("build context entry {0:?} points outside the build context")]
    Escape(String),
    /// moby shows the resolved path in the parentheses; it refuses before resolving, so they
    /// stay empty.
    #[error("forbidden path outside the build context: {0} ()")]
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
    /// A COPY/ADD source whose wildcard pattern is malformed (Go's `filepath.ErrBadPattern`).
    #[error("{0}")]
    SourcePattern(PatternError),
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
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(reader)?),
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
    // Symlinks resolve inside the context: a Dockerfile linked to a host file is not read.
    let mut path = dir.join(resolve_in_scope(dir, &rel)?);
    if !path.is_file() && dockerfile_path == "Dockerfile" {
        path = dir.join(resolve_in_scope(dir, Path::new("dockerfile"))?);
    }
    let dockerfile = fs::read_to_string(&path)
        .map_err(|_| ContextError::NoDockerfile(dockerfile_path.to_string()))?;
    let ignore_path = dir.join(resolve_in_scope(dir, Path::new(".dockerignore"))?);
    let ignore = match fs::read_to_string(ignore_path) {
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

/// Resolves `rel` inside `root` following symlinks the way moby's `FollowSymlinkInScope` does:
/// a link's target is taken relative to the context root when absolute, `..` never climbs above
/// the root, so the result is always inside the context (a link to `/etc` means `<root>/etc`).
/// Returns the resolved path relative to `root`; it may not exist.
pub fn resolve_in_scope(root: &Path, rel: &Path) -> io::Result<PathBuf> {
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: std::collections::VecDeque<std::ffi::OsString> =
        rel.components().filter_map(normal_or_parent).collect();
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate: PathBuf = root
            .iter()
            .chain(resolved.iter().map(|p| p.as_os_str()))
            .collect();
        let candidate = candidate.join(&part);
        match fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > 255 {
                    return Err(io::Error::other(format!(
                        "too many links resolving {}",
                        rel.display()
                    )));
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                for (i, c) in target.components().filter_map(normal_or_parent).enumerate() {
                    pending.insert(i, c);
                }
            }
            _ => resolved.push(part),
        }
    }
    Ok(resolved.iter().collect())
}

fn normal_or_parent(c: Component<'_>) -> Option<std::ffi::OsString> {
    match c {
        Component::Normal(p) => Some(p.to_os_string()),
        Component::ParentDir => Some("..".into()),
        _ => None,
    }
}

/// Whether an ADD source is a URL to fetch rather than a context path (moby's `urlutil.IsURL`:
/// `http://` or `https://`). [`resolve_sources`] is for the others.
pub fn is_url(src: &str) -> bool {
    src.starts_with("http://") || src.starts_with("https://")
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

/// One COPY/ADD source found in the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePath {
    /// The path as written, or as a wildcard matched it, cleaned and relative to the root. A
    /// copy into a directory is named after its last element even when it is a symlink (moby's
    /// `filepath.Base(origPath)`).
    pub matched: String,
    /// Where it resolves inside the root ([`resolve_in_scope`]); may be missing when a wildcard
    /// matched a dangling link.
    pub resolved: PathBuf,
}

/// Resolves COPY/ADD sources (as written after expansion) to paths relative to the context
/// root, in order; see [`resolve_source`]. Sources that match nothing at all are
/// [`ContextError::NoSources`].
pub fn resolve_sources(root: &Path, srcs: &[String]) -> Result<Vec<PathBuf>, ContextError> {
    let mut out = Vec::new();
    for src in srcs {
        out.extend(resolve_source(root, src)?.into_iter().map(|s| s.resolved));
    }
    if out.is_empty() {
        return Err(ContextError::NoSources);
    }
    Ok(out)
}

/// Resolves one COPY/ADD source. A leading `/` or `./` is dropped (sources are
/// context-relative); `..` that climbs out is refused; wildcards match with Go's
/// `filepath.Match` against every path of the context (possibly none); a missing source fails
/// as moby fails. A source that is a symlink is resolved inside the context
/// ([`resolve_in_scope`]); links inside a copied directory are copied as links.
pub fn resolve_source(root: &Path, src: &str) -> Result<Vec<SourcePath>, ContextError> {
    let trimmed = src
        .strip_prefix('/')
        .filter(|s| !s.is_empty())
        .unwrap_or(src);
    let trimmed = trimmed.strip_prefix("./").unwrap_or(trimmed);
    let cleaned = dockerignore::clean_path(trimmed);
    if cleaned == ".." || cleaned.starts_with("../") {
        return Err(ContextError::OutsideContext(src.to_string()));
    }
    if has_wildcards(&cleaned) {
        let mut all = Vec::new();
        walk(root, "", &mut all)?;
        let mut out = Vec::new();
        for path in all {
            if dockerignore::go_match(&cleaned, &path).map_err(ContextError::SourcePattern)? {
                let resolved = resolve_in_scope(root, Path::new(&path))?;
                out.push(SourcePath {
                    matched: path,
                    resolved,
                });
            }
        }
        return Ok(out);
    }
    let matched = if cleaned == "." {
        String::new()
    } else {
        cleaned
    };
    let resolved = resolve_in_scope(root, Path::new(&matched))?;
    if fs::symlink_metadata(root.join(&resolved)).is_err() {
        return Err(ContextError::NotFound(trimmed.to_string()));
    }
    Ok(vec![SourcePath { matched, resolved }])
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
    let named: Vec<(String, PathBuf)> = sources
        .iter()
        .map(|s| (s.to_string_lossy().into_owned(), root.join(s)))
        .collect();
    digest_named(named.iter().map(|(n, p)| (n.as_str(), p.as_path())), chown)
}

/// [`digest_sources`] for sources that are not all under one root (a `--from` stage's files,
/// ADD's downloads): each is `(name, path)`, hashed under `name` (so where the host keeps it
/// does not matter) with the contents found at `path`.
pub fn digest_named<'a>(
    sources: impl IntoIterator<Item = (&'a str, &'a Path)>,
    chown: Option<&str>,
) -> Result<String, ContextError> {
    let mut hasher = Sha256::new();
    let owner = chown.unwrap_or("0:0");
    hasher.update(format!("owner {owner}\0").as_bytes());
    for (name, path) in sources {
        hasher.update(format!("source {name}\0").as_bytes());
        digest_entry(&mut hasher, name, path)?;
        if fs::symlink_metadata(path)?.is_dir() {
            let mut under = Vec::new();
            walk(path, "", &mut under)?;
            for rel in under {
                let child = if name.is_empty() {
                    rel.clone()
                } else {
                    format!("{name}/{rel}")
                };
                digest_entry(&mut hasher, &child, &path.join(&rel))?;
            }
        }
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

fn digest_entry(hasher: &mut Sha256, rel: &str, path: &Path) -> Result<(), ContextError> {
    let meta = fs::symlink_metadata(path)?;
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
        hasher.update(fs::read_link(path)?.as_os_str().as_encoded_bytes());
    } else if meta.is_file() {
        let mut file = fs::File::open(path)?;
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

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// Builds a tar; entries are (path, content or None for a dir, mode). Paths are written raw
    /// into the header so tests can make hostile ones.
    fn tar_of(entries: &[(&str, Option<&str>, u32)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, content, mode) in entries {
            let mut header = tar::Header::new_gnu();
            raw_name(&mut header, path);
            header.set_mode(*mode);
            match content {
                Some(data) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(data.len() as u64);
                    header.set_cksum();
                    builder.append(&header, data.as_bytes()).unwrap();
                }
                None => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    header.set_cksum();
                    builder.append(&header, &[][..]).unwrap();
                }
            }
        }
        builder.into_inner().unwrap()
    }

    fn raw_name(header: &mut tar::Header, path: &str) {
        let name = &mut header.as_old_mut().name;
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
    }

    fn link_tar(path: &str, target: &str, kind: tar::EntryType) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        raw_name(&mut header, path);
        header.set_entry_type(kind);
        header.set_size(0);
        let link = &mut header.as_old_mut().linkname;
        link[..target.len()].copy_from_slice(target.as_bytes());
        header.set_cksum();
        builder.append(&header, &[][..]).unwrap();
        builder.into_inner().unwrap()
    }

    fn sample() -> Vec<u8> {
        tar_of(&[
            ("Dockerfile", Some("FROM scratch\nCOPY . /\n"), 0o644),
            ("app/", None, 0o755),
            ("app/main.sh", Some("echo hi\n"), 0o755),
            ("./app/data.txt", Some("data"), 0o600),
        ])
    }

    fn compressed(kind: Compression, data: &[u8]) -> Vec<u8> {
        match kind {
            Compression::None => data.to_vec(),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Bzip2 => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Xz => {
                let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Zstd => zstd::encode_all(data, 1).unwrap(),
        }
    }

    #[test]
    fn unpacks_every_compression() {
        for kind in [
            Compression::None,
            Compression::Gzip,
            Compression::Bzip2,
            Compression::Xz,
        ] {
            let data = compressed(kind, &sample());
            assert_eq!(Compression::sniff(&data), kind);
            let dir = tempfile::tempdir().unwrap();
            unpack(&data[..], dir.path()).unwrap();
            assert_eq!(
                fs::read_to_string(dir.path().join("app/main.sh")).unwrap(),
                "echo hi\n"
            );
            let mode = |p: &str| {
                fs::metadata(dir.path().join(p))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777
            };
            assert_eq!(mode("app/main.sh"), 0o755, "{kind:?}");
            assert_eq!(mode("app/data.txt"), 0o600, "{kind:?}");
        }
        // A truncated stream is an error, not a shorter context.
        for kind in [Compression::Gzip, Compression::Zstd] {
            let data = compressed(kind, &sample());
            let dir = tempfile::tempdir().unwrap();
            assert!(
                unpack(&data[..data.len() / 2], dir.path()).is_err(),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn refuses_escapes_and_absolute_paths() {
        let outer = tempfile::tempdir().unwrap();
        let dir = outer.path().join("ctx");
        fs::create_dir(&dir).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                tar_of(&[("../evil", Some("x"), 0o644)]),
                "build context entry \"../evil\" points outside the build context",
            ),
            (
                tar_of(&[("a/../../evil", Some("x"), 0o644)]),
                "build context entry \"a/../../evil\" points outside the build context",
            ),
            (
                tar_of(&[("/etc/evil", Some("x"), 0o644)]),
                "build context entry \"/etc/evil\" has an absolute path",
            ),
            (
                link_tar("hard", "../evil", tar::EntryType::Link),
                "build context entry \"../evil\" points outside the build context",
            ),
        ];
        for (data, want) in cases {
            let err = unpack(&data[..], &dir).unwrap_err();
            assert_eq!(err.to_string(), want);
            for kind in [Compression::Gzip, Compression::Xz] {
                let err = unpack(&compressed(kind, &data)[..], &dir).unwrap_err();
                assert_eq!(err.to_string(), want);
            }
        }
        assert!(!outer.path().join("evil").exists());
        // Writing through a symlink that leaves the context is refused too.
        let mut data = link_tar("out", "..", tar::EntryType::Symlink);
        data.truncate(data.len() - 1024);
        data.extend(tar_of(&[("out/evil", Some("x"), 0o644)]));
        assert!(unpack(&data[..], &dir).is_err());
        assert!(!outer.path().join("evil").exists());
    }

    #[test]
    fn prepare_reads_dockerfile_then_applies_dockerignore() {
        let data = tar_of(&[
            ("Dockerfile", Some("FROM scratch\n"), 0o644),
            (
                ".dockerignore",
                Some("# comment\n*.log\nDockerfile\n.dockerignore\nsecret/\n!secret/public\n"),
                0o644,
            ),
            ("a.log", Some("x"), 0o644),
            ("keep.txt", Some("k"), 0o644),
            ("secret/key", Some("k"), 0o600),
            ("secret/public", Some("p"), 0o644),
            ("deep/dir/b.log", Some("x"), 0o644),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let prepared = prepare(&data[..], dir.path(), "").unwrap();
        assert_eq!(prepared.dockerfile, "FROM scratch\n");
        let mut left = Vec::new();
        walk(dir.path(), "", &mut left).unwrap();
        // `*.log` only matches at the root (Docker's rule; `**/*.log` would go deeper).
        assert_eq!(
            left,
            vec![
                "deep",
                "deep/dir",
                "deep/dir/b.log",
                "keep.txt",
                "secret",
                "secret/public"
            ]
        );
        assert!(prepared.ignore.excluded("a.log", false));
    }

    #[test]
    fn prepare_dockerfile_lookup() {
        let lower = tar_of(&[("dockerfile", Some("FROM a\n"), 0o644)]);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            prepare(&lower[..], dir.path(), "Dockerfile")
                .unwrap()
                .dockerfile,
            "FROM a\n"
        );
        let custom = tar_of(&[("build/Custom.df", Some("FROM b\n"), 0o644)]);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            prepare(&custom[..], dir.path(), "build/Custom.df")
                .unwrap()
                .dockerfile,
            "FROM b\n"
        );
        for path in ["Dockerfile", "../Dockerfile", "nope"] {
            let dir = tempfile::tempdir().unwrap();
            let err = prepare(&custom[..], dir.path(), path).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("Cannot locate specified Dockerfile: {path}")
            );
        }
        let bad = tar_of(&[
            ("Dockerfile", Some("FROM b\n"), 0o644),
            (".dockerignore", Some("!\n"), 0o644),
        ]);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            prepare(&bad[..], dir.path(), "").unwrap_err().to_string(),
            "error processing .dockerignore: illegal exclusion pattern: \"!\""
        );
    }

    fn context() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let data = tar_of(&[
            ("a.txt", Some("a"), 0o644),
            ("b.txt", Some("b"), 0o644),
            ("c.md", Some("c"), 0o644),
            ("src/", None, 0o755),
            ("src/x.txt", Some("x"), 0o644),
            ("src/sub/", None, 0o755),
            ("src/sub/y.rs", Some("y"), 0o644),
        ]);
        unpack(&data[..], dir.path()).unwrap();
        dir
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn resolves_sources() {
        let ctx = context();
        let root = ctx.path();
        let paths = |srcs: &[&str]| {
            resolve_sources(root, &s(srcs)).map(|p| {
                p.iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            paths(&["a.txt", "./src", "/c.md"]).unwrap(),
            s(&["a.txt", "src", "c.md"])
        );
        assert_eq!(paths(&["*.txt"]).unwrap(), s(&["a.txt", "b.txt"]));
        assert_eq!(paths(&["src/*"]).unwrap(), s(&["src/sub", "src/x.txt"]));
        assert_eq!(paths(&["src/*/*.rs"]).unwrap(), s(&["src/sub/y.rs"]));
        assert_eq!(paths(&["[ab].txt"]).unwrap(), s(&["a.txt", "b.txt"]));
        assert_eq!(paths(&["."]).unwrap(), s(&[""]));
        assert_eq!(paths(&["src/sub/../x.txt"]).unwrap(), s(&["src/x.txt"]));
        assert_eq!(
            paths(&["missing.txt"]).unwrap_err().to_string(),
            "file not found in build context or excluded by .dockerignore: stat missing.txt: file does not exist"
        );
        assert_eq!(
            paths(&["../x"]).unwrap_err().to_string(),
            "forbidden path outside the build context: ../x ()"
        );
        assert_eq!(
            paths(&["src/../../x"]).unwrap_err().to_string(),
            "forbidden path outside the build context: src/../../x ()"
        );
        assert_eq!(
            paths(&["*.nothing"]).unwrap_err().to_string(),
            "no source files were specified"
        );
        assert_eq!(
            paths(&["[x"]).unwrap_err().to_string(),
            "syntax error in pattern"
        );
        assert!(has_wildcards("a*") && has_wildcards("a?") && has_wildcards("[a]"));
        assert!(is_url("https://x/y.tar") && is_url("http://x") && !is_url("x/http://"));
        assert!(!has_wildcards("a\\*b") && !has_wildcards("plain"));
    }

    #[test]
    fn symlinks_resolve_inside_the_context() {
        let ctx = context();
        let root = ctx.path();
        std::os::unix::fs::symlink("/src", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../src/x.txt", root.join("up")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("host")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        let one = |src: &str| resolve_sources(root, &s(&[src]));
        assert_eq!(one("abs").unwrap(), vec![PathBuf::from("src")]);
        assert_eq!(one("abs/x.txt").unwrap(), vec![PathBuf::from("src/x.txt")]);
        assert_eq!(one("up").unwrap(), vec![PathBuf::from("src/x.txt")]);
        // A link to a host file means that path inside the context: missing here.
        assert_eq!(
            one("host").unwrap_err().to_string(),
            "file not found in build context or excluded by .dockerignore: stat host: file does not exist"
        );
        assert!(one("loop").is_err());
        // The Dockerfile too.
        let data = link_tar("Dockerfile", "/etc/hostname", tar::EntryType::Symlink);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            prepare(&data[..], dir.path(), "").unwrap_err().to_string(),
            "Cannot locate specified Dockerfile: Dockerfile"
        );
    }

    #[test]
    fn digest_ignores_mtimes_but_sees_everything_else() {
        let ctx = context();
        let root = ctx.path();
        let srcs = vec![PathBuf::from("src"), PathBuf::from("a.txt")];
        let digest = || digest_sources(root, &srcs, None).unwrap();
        let first = digest();
        assert!(first.starts_with("sha256:") && first.len() == 71);
        // Same contents, new mtime: same digest.
        let file = fs::File::options()
            .write(true)
            .open(root.join("a.txt"))
            .unwrap();
        file.set_modified(std::time::SystemTime::UNIX_EPOCH)
            .unwrap();
        drop(file);
        assert_eq!(digest(), first);
        // Owner from --chown.
        assert_ne!(
            digest_sources(root, &srcs, Some("1000:1000")).unwrap(),
            first
        );
        // Contents.
        fs::write(root.join("src/sub/y.rs"), "changed").unwrap();
        let changed = digest();
        assert_ne!(changed, first);
        fs::write(root.join("src/sub/y.rs"), "y").unwrap();
        assert_eq!(digest(), first);
        // Mode.
        fs::set_permissions(root.join("src/x.txt"), fs::Permissions::from_mode(0o755)).unwrap();
        assert_ne!(digest(), first);
        fs::set_permissions(root.join("src/x.txt"), fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(digest(), first);
        // A new file, a rename, a symlink and its target.
        fs::write(root.join("src/new"), "").unwrap();
        assert_ne!(digest(), first);
        fs::rename(root.join("src/new"), root.join("src/new2")).unwrap();
        let renamed = digest();
        fs::remove_file(root.join("src/new2")).unwrap();
        assert_eq!(digest(), first);
        assert_ne!(renamed, first);
        std::os::unix::fs::symlink("a", root.join("src/link")).unwrap();
        let link_a = digest();
        fs::remove_file(root.join("src/link")).unwrap();
        std::os::unix::fs::symlink("b", root.join("src/link")).unwrap();
        assert_ne!(digest(), link_a);
        // Which sources, in which order.
        assert_ne!(
            digest_sources(root, &[PathBuf::from("a.txt")], None).unwrap(),
            first
        );
    }
}
