//! Filesystem helpers: disk usage, a faithful tree copy (for the native driver), removal.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use berth_core::snapshots::Usage;
use berth_core::{Error, Result};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

fn io_error(what: String) -> impl FnOnce(io::Error) -> Error {
    move |e| {
        let kind = Error::from(io::Error::from(e.kind())).kind();
        Error::new(kind, what).with_source(e)
    }
}

/// Disk usage of the tree at `root`: `size` is the space allocated to it (`st_blocks` × 512,
/// so sparse files count what they occupy, not their length) and `inodes` the number of
/// distinct inodes (hard links count once, directories and the root included). Symlinks are not
/// followed.
pub(crate) fn disk_usage(root: &Path) -> Result<Usage> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Removed while we walk (an active snapshot in use): it no longer uses space.
            Err(e) if e.kind() == io::ErrorKind::NotFound && path != root => continue,
            Err(e) => return Err(io_error(format!("stat {}", path.display()))(e)),
        };
        if seen.insert((meta.dev(), meta.ino())) {
            usage.inodes += 1;
            usage.size += i64::try_from(meta.blocks() * 512).unwrap_or(i64::MAX);
        }
        if meta.is_dir() {
            let entries = match fs::read_dir(&path) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(format!("read {}", path.display()))(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_error(format!("read {}", path.display())))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}

/// Copies the tree `src` into the existing directory `dst`, keeping what a container image
/// cares about: file types (regular, directory, symlink, device, fifo, socket), contents,
/// hard links (within the tree), owners, modes including setuid/setgid/sticky, extended
/// attributes (capabilities, overlay's own) and modification times. `dst` takes `src`'s owner,
/// mode and times.
pub(crate) fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    let mut links = HashMap::new();
    copy_tree(src, dst, &mut links)?;
    copy_metadata(
        src,
        dst,
        &fs::symlink_metadata(src).map_err(io_error(format!("stat {}", src.display())))?,
    )
}

fn copy_tree(src: &Path, dst: &Path, links: &mut HashMap<(u64, u64), PathBuf>) -> Result<()> {
    let entries = fs::read_dir(src).map_err(io_error(format!("read {}", src.display())))?;
    for entry in entries {
        let entry = entry.map_err(io_error(format!("read {}", src.display())))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let meta =
            fs::symlink_metadata(&from).map_err(io_error(format!("stat {}", from.display())))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            fs::create_dir(&to).map_err(io_error(format!("create {}", to.display())))?;
            copy_tree(&from, &to, links)?;
            copy_metadata(&from, &to, &meta)?;
            continue;
        }
        if meta.nlink() > 1 {
            if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                fs::hard_link(first, &to).map_err(io_error(format!("link {}", to.display())))?;
                continue;
            }
            links.insert((meta.dev(), meta.ino()), to.clone());
        }
        if ft.is_file() {
            fs::copy(&from, &to).map_err(io_error(format!("copy {}", from.display())))?;
        } else if ft.is_symlink() {
            let target =
                fs::read_link(&from).map_err(io_error(format!("read link {}", from.display())))?;
            std::os::unix::fs::symlink(&target, &to)
                .map_err(io_error(format!("symlink {}", to.display())))?;
        } else {
            // Devices (overlay whiteouts among them), fifos and sockets.
            let kind = SFlag::from_bits_truncate(meta.mode() & libc::S_IFMT);
            let perm = Mode::from_bits_truncate(meta.mode() & 0o7777);
            nix::sys::stat::mknod(&to, kind, perm, meta.rdev())
                .map_err(|e| io_error(format!("mknod {}", to.display()))(e.into()))?;
        }
        copy_metadata(&from, &to, &meta)?;
    }
    Ok(())
}

fn copy_metadata(from: &Path, to: &Path, meta: &fs::Metadata) -> Result<()> {
    let is_link = meta.file_type().is_symlink();
    // Owner first: chown clears setuid/setgid, the mode below puts them back.
    std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()))
        .map_err(io_error(format!("chown {}", to.display())))?;
    if !is_link {
        fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(io_error(format!("chmod {}", to.display())))?;
    }
    copy_xattrs(from, to)?;
    let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        to,
        &atime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| io_error(format!("set times of {}", to.display()))(e.into()))
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::invalid_argument(format!("{} contains a NUL byte", p.display())))
}

fn copy_xattrs(from: &Path, to: &Path) -> Result<()> {
    let src = cpath(from)?;
    let dst = cpath(to)?;
    let names = match xattr_names(&src) {
        Ok(names) => names,
        // The filesystem has no xattrs: nothing to copy.
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(()),
        Err(e) => return Err(io_error(format!("list xattrs of {}", from.display()))(e)),
    };
    for name in names {
        let value = xattr_value(&src, &name)
            .map_err(io_error(format!("read xattrs of {}", from.display())))?;
        // SAFETY: `dst` and `name` are NUL-terminated; `value` is valid for `value.len()` bytes.
        let rc = unsafe {
            libc::lsetxattr(
                dst.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            // Some namespaces cannot be set here (user.* on symlinks, unsupported targets); the
            // copy is still a faithful tree.
            if !matches!(err.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::EPERM)) {
                let shown = OsStr::from_bytes(name.as_bytes())
                    .to_string_lossy()
                    .into_owned();
                return Err(io_error(format!("set xattr {shown} on {}", to.display()))(
                    err,
                ));
            }
        }
    }
    Ok(())
}

fn xattr_names(path: &CString) -> io::Result<Vec<CString>> {
    loop {
        // SAFETY: a null buffer with size 0 asks only for the needed size.
        let size = unsafe { libc::llistxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: `buf` is writable for `buf.len()` bytes.
        let got = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ERANGE) {
                continue; // grew in between
            }
            return Err(err);
        }
        buf.truncate(got as usize);
        return Ok(buf
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .filter_map(|n| CString::new(n).ok())
            .collect());
    }
}

fn xattr_value(path: &CString, name: &CString) -> io::Result<Vec<u8>> {
    loop {
        // SAFETY: a null buffer with size 0 asks only for the needed size.
        let size =
            unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: `buf` is writable for `buf.len()` bytes.
        let got = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if got < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(err);
        }
        buf.truncate(got as usize);
        return Ok(buf);
    }
}

/// Removes the tree at `path`; a tree that is already gone is fine.
pub(crate) fn remove_all(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(format!("remove {}", path.display()))(e)),
    }
}

/// Flushes the directory entries of `dir` to disk, so a record committed after this never
/// points at a directory a power loss could take back.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_error(format!("sync {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileTypeExt;

    use super::*;

    #[test]
    fn usage_counts_blocks_and_distinct_inodes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("fs");
        fs::create_dir(&root).unwrap();
        let before = disk_usage(&root).unwrap();
        assert_eq!(before.inodes, 1);
        fs::write(root.join("big"), vec![7u8; 1 << 20]).unwrap();
        fs::hard_link(root.join("big"), root.join("big2")).unwrap();
        fs::create_dir(root.join("d")).unwrap();
        std::os::unix::fs::symlink("big", root.join("d/link")).unwrap();
        let after = disk_usage(&root).unwrap();
        assert_eq!(after.inodes, 4, "root, big (twice linked), d, link");
        assert!(after.size - before.size >= 1 << 20, "{after:?}");
        assert!(
            after.size - before.size < 2 << 20,
            "hard link counted twice: {after:?}"
        );
    }

    #[test]
    fn copy_keeps_types_links_modes_and_times() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        fs::create_dir_all(src.join("sub/deeper")).unwrap();
        fs::create_dir(&dst).unwrap();
        fs::write(src.join("a"), "a").unwrap();
        fs::set_permissions(src.join("a"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::hard_link(src.join("a"), src.join("sub/a-again")).unwrap();
        std::os::unix::fs::symlink("../a", src.join("sub/link")).unwrap();
        fs::write(src.join("sub/deeper/f"), "f").unwrap();
        nix::unistd::mkfifo(&src.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o700)).unwrap();
        let mtime = TimeSpec::new(1_600_000_000, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &src.join("a"),
            &mtime,
            &mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();

        copy_dir(&src, &dst).unwrap();

        assert_eq!(fs::read_to_string(dst.join("sub/deeper/f")).unwrap(), "f");
        let a = fs::metadata(dst.join("a")).unwrap();
        assert_eq!(a.mode() & 0o7777, 0o4755);
        assert_eq!(a.mtime(), 1_600_000_000);
        assert_eq!(
            a.ino(),
            fs::metadata(dst.join("sub/a-again")).unwrap().ino()
        );
        assert_eq!(
            fs::read_link(dst.join("sub/link")).unwrap(),
            Path::new("../a")
        );
        assert!(
            fs::symlink_metadata(dst.join("fifo"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        assert_eq!(
            fs::metadata(dst.join("sub")).unwrap().mode() & 0o7777,
            0o700
        );
    }

    #[test]
    fn removing_a_missing_tree_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        remove_all(&dir.path().join("nope")).unwrap();
    }
}
