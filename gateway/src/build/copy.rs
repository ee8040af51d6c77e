//! COPY and ADD: resolving sources in the context, their content digest for the cache, and the
//! tar that puts them into the step's container (moby's `copy.go` rules).

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use berth_builder::context::{ContextError, SourcePath, digest_named, is_url, resolve_source};
use berth_builder::dockerignore::clean_path;
use berth_core::{Error, Result};

/// A COPY or ADD after expansion.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyPlan {
    pub add: bool,
    pub srcs: Vec<String>,
    pub dest: String,
    pub chown: Option<String>,
    pub chmod: Option<String>,
}

/// One resolved source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Where it is on this host.
    pub path: PathBuf,
    /// The name it gets under a directory destination.
    pub name: String,
    pub is_dir: bool,
    /// ADD of a local archive: extracted instead of copied.
    pub extract: bool,
    /// Fetched from a URL (mode 0600, as Docker).
    pub downloaded: bool,
}

fn io(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::internal(what.to_string()).with_source(e)
}

/// `path` made absolute and clean (`.`/`..` resolved, never above `/`), without trailing `/`.
pub fn clean(path: &str) -> String {
    clean_path(&format!("/{path}"))
}

/// The destination relative to the working directory, keeping a trailing `/` (moby's
/// `normalizeDest`).
pub fn normalize_dest(workdir: &str, dest: &str) -> String {
    let joined = if dest.starts_with('/') {
        clean(dest)
    } else {
        clean(&format!("{workdir}/{dest}"))
    };
    if (dest.ends_with('/') || dest.ends_with("/.") || dest == ".") && joined != "/" {
        format!("{joined}/")
    } else {
        joined
    }
}

/// Whether ADD extracts the file: a tar, plain or compressed (gzip, bzip2, xz, zstd), as moby's
/// `IsArchivePath` decides.
fn sniff_archive(path: &Path) -> bool {
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    let Ok(mut r) = berth_builder::context::decompress(f) else {
        return false;
    };
    let mut head = [0u8; 512];
    let mut n = 0;
    while n < head.len() {
        match r.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n == 512
        && tar::Header::from_byte_slice(&head)
            .cksum()
            .is_ok_and(|sum| {
                let mut unsigned: u32 = 0;
                for (i, b) in head.iter().enumerate() {
                    unsigned += if (148..156).contains(&i) {
                        32
                    } else {
                        u32::from(*b)
                    };
                }
                unsigned == sum
            })
}

/// The sources of `plan` under `root` (the context or a `--from` image's files); ADD's URLs are
/// fetched into `downloads`.
pub async fn resolve(
    root: &Path,
    plan: &CopyPlan,
    downloads: &Path,
    name: &str,
) -> Result<Vec<Source>> {
    let not_found = |src: &str| {
        Error::invalid_argument(format!(
            "{name} failed: {}",
            ContextError::NotFound(src.to_string())
        ))
    };
    let mut out = Vec::new();
    for src in &plan.srcs {
        if is_url(src) {
            if !plan.add {
                return Err(Error::invalid_argument("source can't be a URL for COPY"));
            }
            out.push(download(src, downloads).await?);
            continue;
        }
        let found = resolve_source(root, src).map_err(|e| match e {
            ContextError::Io(e) => Error::internal("read the build context").with_source(e),
            e @ ContextError::OutsideContext(_) => Error::invalid_argument(e.to_string()),
            e => Error::invalid_argument(format!("{name} failed: {e}")),
        })?;
        // A wildcard that matches nothing is a missing file here, not moby's "no source files".
        if found.is_empty() {
            return Err(not_found(src));
        }
        for SourcePath { matched, resolved } in found {
            let path = root.join(resolved);
            let meta = std::fs::metadata(&path).map_err(|_| not_found(src))?;
            let is_dir = meta.is_dir();
            out.push(Source {
                extract: plan.add && !is_dir && sniff_archive(&path),
                name: Path::new(&matched)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                path,
                is_dir,
                downloaded: false,
            });
        }
    }
    if out.len() > 1 && !plan.dest.ends_with('/') {
        return Err(Error::invalid_argument(format!(
            "When using {name} with more than one source file, the destination must be a \
             directory and end with a /"
        )));
    }
    Ok(out)
}

/// A client for ADD's URLs and remote contexts (rustls with ring, as the gateway's registry
/// client).
pub fn http_client() -> Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .build()
        .map_err(|e| Error::internal("http client").with_source(e))
}

async fn download(url: &str, dir: &Path) -> Result<Source> {
    std::fs::create_dir_all(dir).map_err(io("scratch directory"))?;
    let resp = http_client()?
        .get(url)
        .send()
        .await
        .map_err(|e| Error::invalid_argument(format!("failed to GET {url}")).with_source(e))?;
    if !resp.status().is_success() {
        return Err(Error::invalid_argument(format!(
            "failed to GET {url} with status {}",
            resp.status()
        )));
    }
    let name = url
        .split(['?', '#'])
        .next()
        .unwrap_or(url)
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("download")
        .to_string();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| Error::invalid_argument(format!("failed to GET {url}")).with_source(e))?;
    let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let path = dir.join(format!("{n}"));
    std::fs::write(&path, &bytes).map_err(io("write a download"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(io("write a download"))?;
    Ok(Source {
        path,
        name,
        is_dir: false,
        extract: false,
        downloaded: true,
    })
}

/// The content digest of the sources for the cache and the history, in moby's form: `file:<hex>`,
/// `dir:<hex>` or `multi:<hex>`. Contents, names, modes, the `--chown` owner and link targets
/// count, mtimes do not ([`digest_named`]).
pub fn sources_digest(sources: &[Source], chown: Option<&str>) -> Result<String> {
    let kind = match sources {
        [s] if s.is_dir => "dir",
        [_] => "file",
        _ => "multi",
    };
    let digest = digest_named(
        sources.iter().map(|s| (s.name.as_str(), s.path.as_path())),
        chown,
    )
    .map_err(|e| Error::internal("digest the sources").with_source(e))?;
    let hex = digest.strip_prefix("sha256:").unwrap_or(&digest);
    Ok(format!("{kind}:{hex}"))
}

/// `--chmod` as octal permissions.
pub fn parse_chmod(s: &str) -> Result<u32> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| Error::invalid_argument(format!("invalid chmod parameter: {s}")))
}

/// `--chown=user[:group]` against the image's `/etc/passwd` and `/etc/group` (moby's
/// `parseChownFlag`: a user without a group takes the user's id as group... as Docker does).
pub fn parse_owner(spec: &str, passwd: Option<&str>, group: Option<&str>) -> Result<(u64, u64)> {
    let (user, grp) = spec.split_once(':').unwrap_or((spec, ""));
    let lookup = |db: Option<&str>, name: &str, what: &str| -> Result<u64> {
        if let Ok(n) = name.parse::<u64>() {
            return Ok(n);
        }
        db.unwrap_or("")
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 2 && f[0] == name).then(|| f[2].parse::<u64>().ok())?
            })
            .next()
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "unable to convert uid/gid chown string to host mapping: can't find {what} \
                     with name {name}"
                ))
            })
    };
    let uid = lookup(passwd, user, "uid for user")?;
    let gid = if grp.is_empty() {
        uid
    } else {
        lookup(group, grp, "gid for group")?
    };
    Ok((uid, gid))
}

struct Writer {
    b: tar::Builder<std::fs::File>,
    owner: (u64, u64),
    chmod: Option<u32>,
}

impl Writer {
    fn header(&self, m: &std::fs::Metadata, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_mode(self.chmod.unwrap_or(mode & 0o7777));
        h.set_uid(self.owner.0);
        h.set_gid(self.owner.1);
        h.set_mtime(m.mtime().max(0) as u64);
        h
    }

    fn dir(&mut self, path: &str, m: Option<&std::fs::Metadata>) -> Result<()> {
        let mut h = match m {
            Some(m) => self.header(m, m.permissions().mode()),
            None => {
                let mut h = tar::Header::new_gnu();
                h.set_mode(self.chmod.unwrap_or(0o755));
                h.set_uid(self.owner.0);
                h.set_gid(self.owner.1);
                h
            }
        };
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        self.b
            .append_data(
                &mut h,
                format!("{}/", path.trim_start_matches('/')),
                std::io::empty(),
            )
            .map_err(io("write the step's archive"))
    }

    fn file(&mut self, src: &Path, to: &str, mode_override: Option<u32>) -> Result<()> {
        let m = std::fs::symlink_metadata(src).map_err(io("stat a source"))?;
        let to = to.trim_start_matches('/');
        if m.file_type().is_symlink() {
            let mut h = self.header(&m, 0o777);
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            let target = std::fs::read_link(src).map_err(io("read a link"))?;
            return self
                .b
                .append_link(&mut h, to, target)
                .map_err(io("write the step's archive"));
        }
        if m.is_dir() {
            self.dir(to, Some(&m))?;
            let mut names: Vec<String> = std::fs::read_dir(src)
                .map_err(io("read a source directory"))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            for n in names {
                self.file(&src.join(&n), &format!("{to}/{n}"), None)?;
            }
            return Ok(());
        }
        let mut h = self.header(&m, mode_override.unwrap_or(m.permissions().mode()));
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(m.len());
        let f = std::fs::File::open(src).map_err(io("read a source"))?;
        self.b
            .append_data(&mut h, to, f)
            .map_err(io("write the step's archive"))
    }

    /// A local archive's entries, under `dest`.
    fn extract(&mut self, archive: &Path, dest: &str) -> Result<()> {
        let f = std::fs::File::open(archive).map_err(io("read an archive"))?;
        let reader = berth_builder::context::decompress(f).map_err(io("read an archive"))?;
        let mut a = tar::Archive::new(reader);
        for e in a.entries().map_err(io("read an archive"))? {
            let mut e = e.map_err(io("read an archive"))?;
            let p = e
                .path()
                .map_err(io("read an archive"))?
                .to_string_lossy()
                .into_owned();
            if p.split('/').any(|c| c == "..") {
                return Err(Error::invalid_argument(format!(
                    "archive entry {p:?} leaves the destination"
                )));
            }
            let to = format!(
                "{}/{}",
                dest.trim_end_matches('/'),
                p.trim_start_matches("./")
            );
            let to = to.trim_start_matches('/').to_string();
            let mut h = e.header().clone();
            if e.header().entry_type().is_hard_link()
                && let Ok(Some(l)) = e.link_name()
            {
                let l = format!("{}/{}", dest.trim_end_matches('/'), l.to_string_lossy());
                h.set_link_name(l.trim_start_matches('/'))
                    .map_err(io("write the step's archive"))?;
            }
            let mut data = Vec::new();
            e.read_to_end(&mut data).map_err(io("read an archive"))?;
            self.b
                .append_data(&mut h, to, data.as_slice())
                .map_err(io("write the step's archive"))?;
        }
        Ok(())
    }
}

/// Writes the tar that puts `sources` at `dest` (paths relative to `/`). `dest_is_dir`: whether
/// `dest` is a directory in the image already.
pub fn write_tar(
    tar_path: &Path,
    sources: &[Source],
    plan: &CopyPlan,
    dest: &str,
    dest_is_dir: bool,
    owner: Option<(u64, u64)>,
) -> Result<()> {
    let chmod = plan.chmod.as_deref().map(parse_chmod).transpose()?;
    let f = std::fs::File::create(tar_path).map_err(io("create the step's archive"))?;
    let mut w = Writer {
        b: tar::Builder::new(f),
        owner: owner.unwrap_or((0, 0)),
        chmod,
    };
    w.b.follow_symlinks(false);
    let into_dir = dest.ends_with('/') || dest_is_dir;
    let dest_clean = clean(dest);
    for s in sources {
        if s.extract {
            w.extract(&s.path, &dest_clean)?;
        } else if s.is_dir {
            if !dest_is_dir {
                w.dir(&dest_clean, None)?;
            }
            let mut names: Vec<String> = std::fs::read_dir(&s.path)
                .map_err(io("read a source directory"))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            for n in names {
                w.file(&s.path.join(&n), &format!("{dest_clean}/{n}"), None)?;
            }
        } else {
            let to = if into_dir {
                format!("{}/{}", dest_clean.trim_end_matches('/'), s.name)
            } else {
                dest_clean.clone()
            };
            w.file(&s.path, &to, s.downloaded.then_some(0o600))?;
        }
    }
    let mut f = w.b.into_inner().map_err(io("write the step's archive"))?;
    f.flush().map_err(io("write the step's archive"))
}

/// A tar holding directory `dir` (WORKDIR), mode 0755, owned by root.
pub fn mkdir_tar(tar_path: &Path, dir: &str) -> Result<()> {
    let f = std::fs::File::create(tar_path).map_err(io("create the step's archive"))?;
    let mut w = Writer {
        b: tar::Builder::new(f),
        owner: (0, 0),
        chmod: None,
    };
    if dir != "/" {
        w.dir(dir, None)?;
    }
    w.b.into_inner().map_err(io("write the step's archive"))?;
    Ok(())
}

/// Unpacks a tar (from `docker cp` out of an image) into `into`.
pub fn unpack_tar(tar_path: &Path, into: &Path) -> Result<()> {
    let f = std::fs::File::open(tar_path).map_err(io("read an archive"))?;
    let mut a = tar::Archive::new(f);
    a.set_preserve_permissions(true);
    a.unpack(into)
        .map_err(|e| Error::internal("unpack files of an image").with_source(e))
}

/// The contents of the first regular file in a tar.
pub fn first_file_of_tar(tar_path: &Path) -> Result<String> {
    let f = std::fs::File::open(tar_path).map_err(io("read an archive"))?;
    let mut a = tar::Archive::new(f);
    for e in a.entries().map_err(io("read an archive"))? {
        let mut e = e.map_err(io("read an archive"))?;
        if e.header().entry_type().is_file() {
            let mut s = String::new();
            e.read_to_string(&mut s).map_err(io("read an archive"))?;
            return Ok(s);
        }
    }
    Ok(String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_destinations() {
        assert_eq!(clean("a/../../b/./c/"), "/b/c");
        assert_eq!(normalize_dest("/app", "x"), "/app/x");
        assert_eq!(normalize_dest("/app", "x/"), "/app/x/");
        assert_eq!(normalize_dest("/app", "."), "/app/");
        assert_eq!(normalize_dest("/", "/abs"), "/abs");
    }

    #[test]
    fn owners_from_passwd_and_group() {
        let passwd = "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n";
        let group = "root:x:0:\nstaff:x:50:\n";
        assert_eq!(parse_owner("1:2", None, None).unwrap(), (1, 2));
        assert_eq!(
            parse_owner("app", Some(passwd), None).unwrap(),
            (1000, 1000)
        );
        assert_eq!(
            parse_owner("app:staff", Some(passwd), Some(group)).unwrap(),
            (1000, 50)
        );
        assert!(parse_owner("nobody", Some(passwd), None).is_err());
        assert_eq!(parse_chmod("755").unwrap(), 0o755);
        assert!(parse_chmod("9").is_err());
    }

    #[tokio::test]
    async fn sources_digests_follow_contents_not_mtimes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("a.txt"), "one").unwrap();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/b"), "two").unwrap();
        let plan = |srcs: &[&str], dest: &str| CopyPlan {
            srcs: srcs.iter().map(|s| s.to_string()).collect(),
            dest: dest.into(),
            ..Default::default()
        };
        let dl = root.join("dl");
        let s = resolve(root, &plan(&["a.txt"], "/x"), &dl, "COPY")
            .await
            .unwrap();
        let first = sources_digest(&s, None).unwrap();
        assert!(first.starts_with("file:"));
        std::fs::write(root.join("a.txt"), "one").unwrap();
        assert_eq!(sources_digest(&s, None).unwrap(), first);
        std::fs::write(root.join("a.txt"), "changed").unwrap();
        assert_ne!(sources_digest(&s, None).unwrap(), first);
        let s = resolve(root, &plan(&["d"], "/x"), &dl, "COPY")
            .await
            .unwrap();
        assert!(sources_digest(&s, None).unwrap().starts_with("dir:"));
        assert_ne!(
            sources_digest(&s, Some("1000:1000")).unwrap(),
            sources_digest(&s, None).unwrap()
        );
        // A symlink source resolves inside the context and keeps its own name.
        std::os::unix::fs::symlink("/a.txt", root.join("link")).unwrap();
        let s = resolve(root, &plan(&["link"], "/x/"), &dl, "COPY")
            .await
            .unwrap();
        assert_eq!(
            (s[0].name.as_str(), &s[0].path),
            ("link", &root.join("a.txt"))
        );
        let s = resolve(root, &plan(&["d/?"], "/x"), &dl, "COPY")
            .await
            .unwrap();
        assert_eq!(s[0].path, root.join("d/b"));
        let err = resolve(root, &plan(&["*.none"], "/x"), &dl, "COPY")
            .await
            .unwrap_err();
        assert!(err.chain().contains("COPY failed: file not found"));
        let err = resolve(root, &plan(&["*"], "/x"), &dl, "COPY")
            .await
            .unwrap_err();
        assert!(err.chain().contains("must be a directory and end with a /"));
        let err = resolve(root, &plan(&["nope"], "/x"), &dl, "COPY")
            .await
            .unwrap_err();
        assert!(err.chain().contains("file not found in build context"));
        let err = resolve(root, &plan(&["../x"], "/x"), &dl, "COPY")
            .await
            .unwrap_err();
        assert!(err.chain().contains("outside the build context"));
    }

    #[tokio::test]
    async fn the_tar_places_files_as_docker_does() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("a.txt"), "one").unwrap();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/b"), "two").unwrap();
        let dl = root.join("dl");
        let names = |plan: &CopyPlan, dest: &str, is_dir: bool| {
            let tar = root.join("t.tar");
            let s = futures::executor::block_on(resolve(root, plan, &dl, "COPY")).unwrap();
            write_tar(&tar, &s, plan, dest, is_dir, Some((5, 6))).unwrap();
            let mut a = tar::Archive::new(std::fs::File::open(&tar).unwrap());
            a.entries()
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    assert_eq!(e.header().uid().unwrap(), 5);
                    e.path().unwrap().to_string_lossy().into_owned()
                })
                .collect::<Vec<_>>()
        };
        let p = CopyPlan {
            srcs: vec!["a.txt".into()],
            dest: "/x/".into(),
            ..Default::default()
        };
        assert_eq!(names(&p, "/x/", false), ["x/a.txt"]);
        assert_eq!(names(&p, "/x", false), ["x"]);
        assert_eq!(names(&p, "/x", true), ["x/a.txt"]);
        let p = CopyPlan {
            srcs: vec!["d".into()],
            dest: "/y".into(),
            ..Default::default()
        };
        assert_eq!(names(&p, "/y", false), ["y/", "y/b"]);
    }
}
