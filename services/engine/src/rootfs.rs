//! Looking into a container's root filesystem before it runs: reading `/etc/passwd` for user
//! resolution, and copying an image directory into a new volume (Docker's copy-up).
//!
//! Reading single files does not mount anything when the snapshotter describes a bind mount or
//! an overlay: the file is looked up layer by layer, top first, honouring overlay whiteouts
//! (0:0 character devices) and opaque directories (`trusted.overlay.opaque=y`), which is what
//! the kernel would show. Any other mount type, and copy-up, mount the rootfs on a private
//! temporary directory for the duration of the operation.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use berth_core::mount::{Mount, MountGuard};
use berth_core::{Context, Error, ErrorKind, Result};

/// The directories a rootfs is made of, top first, when it can be read without mounting.
fn layers(mounts: &[Mount]) -> Option<Vec<PathBuf>> {
    match mounts {
        [m] if m.fstype == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind") => {
            Some(vec![PathBuf::from(&m.source)])
        }
        [m] if m.fstype == "overlay" => {
            let mut out = Vec::new();
            if let Some(upper) = m.option("upperdir") {
                out.push(PathBuf::from(upper));
            }
            out.extend(m.lowerdirs().into_iter().map(PathBuf::from));
            Some(out)
        }
        _ => None,
    }
}

/// Normal components of an absolute container path (`..` pops, `.` is dropped).
fn components(path: &Path) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => out.push(s.to_string_lossy().into_owned()),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(dir: &Path) -> bool {
    dir.join(".wh..wh..opq").exists()
        || ["trusted.overlay.opaque", "user.overlay.opaque"]
            .iter()
            .any(|name| xattr(dir, name).is_some_and(|v| v == b"y"))
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let p = CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = CString::new(name).ok()?;
    let mut buf = [0u8; 16];
    // SAFETY: both strings are NUL-terminated and live for the call; the buffer is valid for
    // `buf.len()` bytes.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| buf[..len as usize].to_vec())
}

enum Lookup {
    /// A regular file's contents.
    File(Vec<u8>),
    /// A symlink to follow (its target as written).
    Link(PathBuf),
    /// Not there (or deleted by a whiteout).
    Missing,
}

/// Finds `comps` in the layered tree `layers` (top first).
fn lookup(layers: &[PathBuf], comps: &[String]) -> Result<Lookup> {
    'layers: for layer in layers {
        // A whiteout or an opaque directory on the way down hides the lower layers.
        let mut dir = layer.clone();
        let mut stop_after = false;
        for (i, c) in comps.iter().enumerate() {
            let next = dir.join(c);
            let meta = match fs::symlink_metadata(&next) {
                Ok(m) => m,
                Err(_) => {
                    if dir.join(format!(".wh.{c}")).exists() {
                        return Ok(Lookup::Missing);
                    }
                    if stop_after {
                        return Ok(Lookup::Missing);
                    }
                    continue 'layers;
                }
            };
            if is_whiteout(&meta) {
                return Ok(Lookup::Missing);
            }
            let last = i + 1 == comps.len();
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&next)?;
                let base: PathBuf = comps[..i].iter().collect();
                let resolved = if target.is_absolute() {
                    target
                } else {
                    Path::new("/").join(base).join(target)
                };
                let rest: PathBuf = comps[i + 1..].iter().collect();
                return Ok(Lookup::Link(resolved.join(rest)));
            }
            if last {
                if meta.is_file() {
                    return Ok(Lookup::File(fs::read(&next)?));
                }
                return Ok(Lookup::Missing);
            }
            if !meta.is_dir() {
                return Ok(Lookup::Missing);
            }
            if is_opaque(&next) {
                stop_after = true;
            }
            dir = next;
        }
        if stop_after {
            return Ok(Lookup::Missing);
        }
    }
    Ok(Lookup::Missing)
}

/// Reads the regular file `path` (absolute, in the container) from the rootfs `mounts`
/// describe, following symlinks inside the rootfs. `None` when it does not exist.
/// `scratch` is a directory for temporary mount points when the rootfs must be mounted.
pub fn read_file(mounts: &[Mount], path: &str, scratch: &Path) -> Result<Option<Vec<u8>>> {
    if let Some(layers) = layers(mounts) {
        let mut comps = components(Path::new(path));
        for _ in 0..16 {
            match lookup(&layers, &comps)? {
                Lookup::File(data) => return Ok(Some(data)),
                Lookup::Missing => return Ok(None),
                Lookup::Link(target) => comps = components(&target),
            }
        }
        return Err(Error::invalid_argument(format!(
            "{path}: too many levels of symbolic links"
        )));
    }
    with_mounted(mounts, scratch, |root| {
        let comps = components(Path::new(path));
        let full: PathBuf = root.join(comps.iter().collect::<PathBuf>());
        match fs::read(&full) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    })
}

/// Mounts `mounts` on a fresh directory under `scratch`, runs `f` on it, unmounts.
pub fn with_mounted<T>(
    mounts: &[Mount],
    scratch: &Path,
    f: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    fs::create_dir_all(scratch)
        .context(ErrorKind::Internal, format!("create {}", scratch.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("rootfs-")
        .tempdir_in(scratch)
        .context(ErrorKind::Internal, "create a temporary mount point")?;
    let guard = MountGuard::mount(mounts, dir.path())?;
    let out = f(guard.target());
    guard.unmount()?;
    out
}

/// Docker's copy-up: for each `(image path, volume directory)` pair whose volume directory is
/// empty and whose image path is a directory in the rootfs, copies that directory's contents
/// (modes, owners, symlinks) into the volume and gives the volume directory the image
/// directory's mode and owner. The rootfs is mounted once for all pairs, and only when some
/// volume is empty. Returns the image paths that were copied.
pub fn copy_up(
    mounts: &[Mount],
    pairs: &[(String, PathBuf)],
    scratch: &Path,
) -> Result<Vec<String>> {
    let empty = |dir: &Path| {
        fs::read_dir(dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true)
    };
    let todo: Vec<&(String, PathBuf)> = pairs.iter().filter(|(_, dir)| empty(dir)).collect();
    if todo.is_empty() {
        return Ok(Vec::new());
    }
    with_mounted(mounts, scratch, |root| {
        let mut copied = Vec::new();
        for (image_path, volume_dir) in todo {
            let src = root.join(
                components(Path::new(image_path))
                    .iter()
                    .collect::<PathBuf>(),
            );
            // Never follow a symlink out of the rootfs: only a real directory is copied.
            if let Ok(m) = fs::symlink_metadata(&src)
                && m.is_dir()
            {
                copy_tree(&src, volume_dir)?;
                copy_owner_and_mode(&m, volume_dir)?;
                copied.push(image_path.clone());
            }
        }
        Ok(copied)
    })
}

fn copy_owner_and_mode(meta: &fs::Metadata, dst: &Path) -> Result<()> {
    std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))
        .context(ErrorKind::Internal, format!("chown {}", dst.display()))?;
    if !meta.file_type().is_symlink() {
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .context(ErrorKind::Internal, format!("chmod {}", dst.display()))?;
    }
    Ok(())
}

/// Copies the contents of `src` into the existing directory `dst`.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    for entry in
        fs::read_dir(src).context(ErrorKind::Internal, format!("read {}", src.display()))?
    {
        let entry = entry?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let meta = fs::symlink_metadata(&from)?;
        let ft = meta.file_type();
        if ft.is_dir() {
            fs::create_dir(&to).or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
            copy_tree(&from, &to)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&from)?;
            std::os::unix::fs::symlink(&target, &to)
                .context(ErrorKind::Internal, format!("symlink {}", to.display()))?;
        } else if ft.is_file() {
            fs::copy(&from, &to)
                .context(ErrorKind::Internal, format!("copy {}", from.display()))?;
        } else {
            tracing::debug!(path = %from.display(), "copy-up skips special file");
            continue;
        }
        copy_owner_and_mode(&meta, &to)?;
    }
    Ok(())
}

/// Bytes of regular files under `dir` (Docker's volume size: the sum of file sizes).
pub fn dir_size(dir: &Path) -> i64 {
    let mut total = 0i64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.len() as i64;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(upper: Option<&Path>, lowers: &[&Path]) -> Vec<Mount> {
        let mut options = Vec::new();
        if let Some(u) = upper {
            options.push(format!("upperdir={}", u.display()));
            options.push("workdir=/x".into());
        }
        let l: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        options.push(format!("lowerdir={}", l.join(":")));
        vec![Mount {
            fstype: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        }]
    }

    #[test]
    fn reads_through_layers_with_whiteouts_opaque_dirs_and_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let (up, l1, l2) = (
            t.path().join("up"),
            t.path().join("l1"),
            t.path().join("l2"),
        );
        for d in [&up, &l1, &l2] {
            fs::create_dir_all(d.join("etc")).unwrap();
        }
        fs::write(l2.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        fs::write(l2.join("etc/group"), "old\n").unwrap();
        fs::write(l1.join("etc/group"), "new\n").unwrap();
        fs::write(l2.join("etc/gone"), "x").unwrap();
        fs::write(l1.join("etc/.wh.gone"), "").unwrap();
        std::os::unix::fs::symlink("../etc/group", l1.join("etc/link")).unwrap();
        fs::create_dir_all(l2.join("data")).unwrap();
        fs::write(l2.join("data/old"), "x").unwrap();
        fs::create_dir_all(l1.join("data")).unwrap();
        fs::write(l1.join("data/.wh..wh..opq"), "").unwrap();

        let m = overlay(Some(&up), &[&l1, &l2]);
        let scratch = t.path().join("scratch");
        let read = |p: &str| read_file(&m, p, &scratch).unwrap();
        assert_eq!(read("/etc/passwd").unwrap(), b"root:x:0:0::/root:/bin/sh\n");
        assert_eq!(read("/etc/group").unwrap(), b"new\n");
        assert_eq!(read("/etc/link").unwrap(), b"new\n");
        assert!(read("/etc/gone").is_none());
        assert!(read("/data/old").is_none(), "opaque dir hides lower layers");
        assert!(read("/nope/x").is_none());
        // The upper layer wins.
        fs::write(up.join("etc/passwd"), "changed\n").unwrap();
        assert_eq!(read("/etc/passwd").unwrap(), b"changed\n");
        // Bind mounts read their source.
        let b = vec![Mount::bind(l2.display().to_string(), false)];
        assert_eq!(
            read_file(&b, "/etc/group", &scratch).unwrap().unwrap(),
            b"old\n"
        );
        assert_eq!(
            read_file(&b, "/../etc/group", &scratch).unwrap().unwrap(),
            b"old\n"
        );
    }

    #[test]
    fn symlink_loops_are_errors() {
        let t = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/b", t.path().join("a")).unwrap();
        std::os::unix::fs::symlink("/a", t.path().join("b")).unwrap();
        let b = vec![Mount::bind(t.path().display().to_string(), false)];
        assert!(read_file(&b, "/a", t.path()).is_err());
    }

    #[test]
    fn copy_tree_keeps_modes_and_links() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        let dst = t.path().join("dst");
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::create_dir_all(&dst).unwrap();
        fs::write(src.join("sub/f"), "hello").unwrap();
        fs::set_permissions(src.join("sub/f"), fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("sub/f", src.join("l")).unwrap();
        copy_tree(&src, &dst).unwrap();
        assert_eq!(fs::read_to_string(dst.join("sub/f")).unwrap(), "hello");
        assert_eq!(
            fs::metadata(dst.join("sub/f")).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_link(dst.join("l")).unwrap(), Path::new("sub/f"));
        assert_eq!(dir_size(&dst), 5);
    }
}
