//! Performing the mounts a snapshotter describes.
//!
//! A snapshotter never mounts anything for anyone: it answers with a list of [`Mount`]s
//! (containerd's `containerd.types.Mount`), and whoever needs the filesystem performs them — the
//! shim for a container's rootfs, the images service to unpack a layer into an active snapshot:
//!
//! ```no_run
//! # fn demo(mounts: Vec<berth_core::mount::Mount>) -> berth_core::Result<()> {
//! use berth_core::mount::{self, MountGuard};
//! // The shim: mounts stay until the container is deleted.
//! mount::mount_all(&mounts, "/run/berth/bundles/c1/rootfs".as_ref())?;
//! mount::unmount_all("/run/berth/bundles/c1/rootfs".as_ref())?;
//! // The images service: mounted for the duration of one unpack.
//! let guard = MountGuard::mount(&mounts, "/var/lib/berth/images/tmp/unpack-1".as_ref())?;
//! // ... write the layer under guard.target() ...
//! guard.unmount()?; // or just drop it
//! # Ok(()) }
//! ```
//!
//! Supported: `bind` (and any mount with the `bind`/`rbind` option, `ro` honoured with a bind
//! remount), `overlay`, and any other filesystem type the kernel takes through mount(2) with its
//! options as data. Overlay option strings longer than what mount(2) accepts (one page: 200+
//! layers) are mounted with the kernel's filesystem-context API instead — `fsopen("overlay")`,
//! one `lowerdir+` per layer, `fsmount`, `move_mount` (Linux 6.8 or newer) — so a chain of any
//! depth the overlay driver allows (500 layers) mounts. Each single path must stay under 256
//! bytes on that path (the kernel's limit for one parameter); snapshotters keep paths short.
//!
//! Kernel calls go through the [`Syscalls`] trait so the logic here is unit-tested with a
//! recording double; [`Host`] is the real implementation.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use crate::error::{Error, ErrorKind, Result};

/// One mount to perform, in mount(8) terms (`containerd.types.Mount`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Mount {
    /// Filesystem type: `bind`, `overlay`, `tmpfs`, ...
    pub fstype: String,
    /// Device, directory, or a placeholder such as `overlay` or `none`.
    pub source: String,
    /// Where to mount, relative to the root passed to [`mount_all`]; empty means the root itself.
    pub target: String,
    /// mount(8) options: flags such as `ro`, `rbind`, `nosuid`, and filesystem data such as
    /// `lowerdir=...`.
    pub options: Vec<String>,
}

impl Mount {
    /// A recursive bind mount of `source`, read-only when `readonly`.
    pub fn bind(source: impl Into<String>, readonly: bool) -> Self {
        Self {
            fstype: "bind".into(),
            source: source.into(),
            target: String::new(),
            options: vec!["rbind".into(), if readonly { "ro" } else { "rw" }.into()],
        }
    }

    /// The value of the `key=value` option `key` (e.g. `upperdir`), if present.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
    }

    /// Whether the mount is read-only: an explicit `ro`, or an overlay without an upper layer.
    pub fn is_readonly(&self) -> bool {
        let ro = self.options.iter().rev().find(|o| *o == "ro" || *o == "rw");
        ro.is_some_and(|o| o == "ro")
            || (self.fstype == "overlay" && self.option("upperdir").is_none())
    }

    /// The overlay layer directories, topmost first (`lowerdir=` split on unescaped `:`).
    pub fn lowerdirs(&self) -> Vec<String> {
        self.option("lowerdir")
            .map(split_lowerdir)
            .unwrap_or_default()
    }
}

/// A filesystem-context parameter for [`Syscalls::mount_fs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsParam {
    /// `FSCONFIG_SET_FLAG key`.
    Flag(String),
    /// `FSCONFIG_SET_STRING key=value`.
    String(String, String),
}

/// The kernel calls mounting needs. [`Host`] makes them; tests substitute a recorder.
pub trait Syscalls: Send + Sync {
    /// mount(2).
    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<()>;
    /// fsopen(fstype) + fsconfig(params) + FSCONFIG_CMD_CREATE + fsmount(attrs) + move_mount
    /// onto `target`. `attrs` are `MOUNT_ATTR_*` bits.
    fn mount_fs(
        &self,
        fstype: &str,
        source: &str,
        params: &[FsParam],
        attrs: u64,
        target: &Path,
    ) -> Result<()>;
    /// umount2(2).
    fn unmount(&self, target: &Path, flags: MntFlags) -> Result<()>;
    /// The text of `/proc/self/mountinfo`.
    fn mountinfo(&self) -> Result<String>;
}

/// Performs [`Mount`] lists with some [`Syscalls`].
#[derive(Debug, Clone)]
pub struct Mounter<K = Host> {
    kernel: K,
    /// The most mount(2) data the kernel copies (a page, including the final NUL).
    max_data: usize,
}

impl Mounter<Host> {
    /// A mounter that makes real kernel calls.
    pub fn host() -> Self {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Self::new(Host, usize::try_from(page).unwrap_or(4096))
    }
}

/// Mounts `mounts` in order onto `root` (each at `root/<target>`). On failure the mounts already
/// made are undone and the error names the mount that failed.
pub fn mount_all(mounts: &[Mount], root: &Path) -> Result<()> {
    Mounter::host().mount_all(mounts, root)
}

/// Unmounts everything mounted at or below `root`, deepest and most recent first. A `root`
/// that does not exist or has nothing mounted is not an error.
pub fn unmount_all(root: &Path) -> Result<()> {
    Mounter::host().unmount_all(root)
}

impl<K: Syscalls> Mounter<K> {
    /// A mounter over `kernel`; mount(2) data longer than `max_data - 1` bytes takes the
    /// filesystem-context path (overlay only).
    pub fn new(kernel: K, max_data: usize) -> Self {
        Self { kernel, max_data }
    }

    /// See [`mount_all`].
    pub fn mount_all(&self, mounts: &[Mount], root: &Path) -> Result<()> {
        let mut done: Vec<PathBuf> = Vec::new();
        for m in mounts {
            let result = resolve_target(root, &m.target).and_then(|target| {
                self.mount_one(m, &target)
                    .map(|()| target.clone())
                    .map_err(|e| {
                        wrap(
                            e,
                            format!("mount {} {} on {}", m.fstype, m.source, target.display()),
                        )
                    })
            });
            match result {
                Ok(target) => done.push(target),
                Err(err) => {
                    for target in done.iter().rev() {
                        let _ = self.kernel.unmount(target, MntFlags::MNT_DETACH);
                    }
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    fn mount_one(&self, m: &Mount, target: &Path) -> Result<()> {
        let mut opts = parse_options(&m.options);
        if m.fstype == "bind" {
            opts.flags |= MsFlags::MS_BIND;
        }
        let source = (!m.source.is_empty()).then_some(m.source.as_str());
        if opts.flags.contains(MsFlags::MS_BIND) {
            // A bind mount ignores every flag but MS_REC; the others take a remount.
            let bind = opts.flags & (MsFlags::MS_BIND | MsFlags::MS_REC);
            self.kernel.mount(source, target, None, bind, None)?;
            let per_mount = opts.flags & remount_flags();
            if !per_mount.is_empty() {
                let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | per_mount;
                if let Err(err) = self.kernel.mount(None, target, None, flags, None) {
                    let _ = self.kernel.unmount(target, MntFlags::MNT_DETACH);
                    return Err(err);
                }
            }
        } else {
            let data = opts.data.join(",");
            if m.fstype == "overlay" && data.len() + 1 > self.max_data {
                let params = fs_params(&opts.data);
                let source = source.unwrap_or("overlay");
                self.kernel.mount_fs(
                    &m.fstype,
                    source,
                    &params,
                    mount_attrs(opts.flags),
                    target,
                )?;
            } else {
                let data = (!data.is_empty()).then_some(data.as_str());
                let fstype = (!m.fstype.is_empty()).then_some(m.fstype.as_str());
                self.kernel
                    .mount(source, target, fstype, opts.flags, data)?;
            }
        }
        if !opts.propagation.is_empty() {
            self.kernel
                .mount(None, target, None, opts.propagation, None)?;
        }
        Ok(())
    }

    /// See [`unmount_all`].
    pub fn unmount_all(&self, root: &Path) -> Result<()> {
        let root = match std::fs::canonicalize(root) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::from(e)),
        };
        let info = self.kernel.mountinfo()?;
        // mountinfo lists parents before children and older mounts before the ones stacked on
        // them, so walking it backwards unmounts the top of every stack first.
        let targets: Vec<PathBuf> = mount_points(&info)
            .into_iter()
            .filter(|p| p.starts_with(&root))
            .rev()
            .collect();
        for target in targets {
            self.unmount_busy_retry(&target)?;
        }
        Ok(())
    }

    fn unmount_busy_retry(&self, target: &Path) -> Result<()> {
        // A process that just left the mount (a finished `runc`, a closing file) can keep it
        // busy for a moment.
        let mut attempts = 0;
        loop {
            match self.kernel.unmount(target, MntFlags::empty()) {
                Ok(()) => return Ok(()),
                Err(err) if err.kind() == ErrorKind::FailedPrecondition && attempts < 50 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                // Already gone (unmounted by someone else in the meantime).
                Err(err) if err.kind() == ErrorKind::InvalidArgument => return Ok(()),
                Err(err) => return Err(wrap(err, format!("unmount {}", target.display()))),
            }
        }
    }
}

/// Mounts that are undone when the guard is dropped (or explicitly with [`Self::unmount`]).
#[derive(Debug)]
pub struct MountGuard {
    target: PathBuf,
    armed: bool,
}

impl MountGuard {
    /// Mounts `mounts` on `target` (see [`mount_all`]) and returns the guard that undoes them.
    pub fn mount(mounts: &[Mount], target: &Path) -> Result<Self> {
        mount_all(mounts, target)?;
        Ok(Self {
            target: target.to_path_buf(),
            armed: true,
        })
    }

    /// Where the mounts are.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Unmounts now, reporting failure (dropping the guard only logs it).
    pub fn unmount(mut self) -> Result<()> {
        self.armed = false;
        unmount_all(&self.target)
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Err(err) = unmount_all(&self.target) {
            tracing::warn!(target = %self.target.display(), error = %err.chain(), "unmount failed; detaching");
            let _ = nix::mount::umount2(&self.target, MntFlags::MNT_DETACH);
        }
    }
}

impl<T: Syscalls + ?Sized> Syscalls for &T {
    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<()> {
        (**self).mount(source, target, fstype, flags, data)
    }
    fn mount_fs(
        &self,
        fstype: &str,
        source: &str,
        params: &[FsParam],
        attrs: u64,
        target: &Path,
    ) -> Result<()> {
        (**self).mount_fs(fstype, source, params, attrs, target)
    }
    fn unmount(&self, target: &Path, flags: MntFlags) -> Result<()> {
        (**self).unmount(target, flags)
    }
    fn mountinfo(&self) -> Result<String> {
        (**self).mountinfo()
    }
}

/// The real kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct Host;

impl Syscalls for Host {
    fn mount(
        &self,
        source: Option<&str>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<()> {
        nix::mount::mount(source, target, fstype, flags, data).map_err(|e| sys_error(e, "mount"))
    }

    fn mount_fs(
        &self,
        fstype: &str,
        source: &str,
        params: &[FsParam],
        attrs: u64,
        target: &Path,
    ) -> Result<()> {
        let fs = fsopen(fstype)?;
        let ctx = |e: Error, what: String| match fs_log(&fs) {
            Some(log) => wrap(e, format!("{what} ({log})")),
            None => wrap(e, what),
        };
        if !source.is_empty() {
            fsconfig_string(&fs, "source", source).map_err(|e| ctx(e, "fsconfig source".into()))?;
        }
        for param in params {
            match param {
                FsParam::Flag(key) => {
                    fsconfig_flag(&fs, key).map_err(|e| ctx(e, format!("fsconfig {key}")))?
                }
                FsParam::String(key, value) => fsconfig_string(&fs, key, value)
                    .map_err(|e| ctx(e, format!("fsconfig {key}={value}")))?,
            }
        }
        fsconfig_create(&fs).map_err(|e| ctx(e, format!("create {fstype} superblock")))?;
        let mnt = fsmount(&fs, attrs)?;
        move_mount(&mnt, target)
    }

    fn unmount(&self, target: &Path, flags: MntFlags) -> Result<()> {
        nix::mount::umount2(target, flags).map_err(|e| sys_error(e, "umount2"))
    }

    fn mountinfo(&self) -> Result<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| wrap(e.into(), "read mountinfo".into()))
    }
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::invalid_argument(format!("{s:?} contains a NUL byte")))
}

fn last_errno(op: &str) -> Error {
    sys_error(Errno::last(), op)
}

fn fsopen(fstype: &str) -> Result<OwnedFd> {
    let name = cstring(fstype)?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), libc::FSOPEN_CLOEXEC) };
    if fd < 0 {
        return Err(last_errno(&format!("fsopen {fstype}")));
    }
    // SAFETY: fsopen returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn fsconfig_flag(fs: &OwnedFd, key: &str) -> Result<()> {
    let key = cstring(key)?;
    // SAFETY: `fs` is an open fs context; `key` is NUL-terminated; FSCONFIG_SET_FLAG takes a
    // null value and aux 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            libc::FSCONFIG_SET_FLAG,
            key.as_ptr(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    };
    if rc < 0 {
        Err(last_errno("fsconfig"))
    } else {
        Ok(())
    }
}

fn fsconfig_string(fs: &OwnedFd, key: &str, value: &str) -> Result<()> {
    let key = cstring(key)?;
    let value = cstring(value)?;
    // SAFETY: `fs` is an open fs context; key and value are NUL-terminated strings that live
    // across the call; FSCONFIG_SET_STRING takes aux 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            libc::FSCONFIG_SET_STRING,
            key.as_ptr(),
            value.as_ptr(),
            0,
        )
    };
    if rc < 0 {
        Err(last_errno("fsconfig"))
    } else {
        Ok(())
    }
}

fn fsconfig_create(fs: &OwnedFd) -> Result<()> {
    // SAFETY: `fs` is an open fs context; FSCONFIG_CMD_CREATE takes null key and value, aux 0.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            libc::FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0,
        )
    };
    if rc < 0 {
        Err(last_errno("fsconfig create"))
    } else {
        Ok(())
    }
}

fn fsmount(fs: &OwnedFd, attrs: u64) -> Result<OwnedFd> {
    // SAFETY: `fs` is an fs context in the created state; flags and attrs are plain integers.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            libc::FSMOUNT_CLOEXEC,
            attrs,
        )
    };
    if fd < 0 {
        return Err(last_errno("fsmount"));
    }
    // SAFETY: fsmount returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn move_mount(mnt: &OwnedFd, target: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let to = CString::new(target.as_os_str().as_bytes()).map_err(|_| {
        Error::invalid_argument(format!("{} contains a NUL byte", target.display()))
    })?;
    let empty = c"";
    // SAFETY: `mnt` is a detached mount from fsmount; both paths are NUL-terminated and live
    // across the call; MOVE_MOUNT_F_EMPTY_PATH makes the kernel use `mnt` itself as the source.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        Err(last_errno("move_mount"))
    } else {
        Ok(())
    }
}

/// The kernel's own explanation of a failed fsconfig, read from the context's message log.
fn fs_log(fs: &OwnedFd) -> Option<String> {
    let mut messages = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        // SAFETY: `buf` is writable for its whole length; the fd is an open fs context.
        let n = unsafe { libc::read(fs.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        let line = String::from_utf8_lossy(&buf[..n as usize]);
        // Lines are "e overlay: message" (e = error, w = warning, i = info).
        messages.push(line.get(2..).unwrap_or(&line).trim().to_string());
    }
    (!messages.is_empty()).then(|| messages.join("; "))
}

/// Maps an errno to an [`Error`] whose kind callers can act on: `EBUSY` is `FailedPrecondition`,
/// `EINVAL` is `InvalidArgument`, `ENOENT` is `NotFound`, `EPERM`/`EACCES` are
/// `PermissionDenied`.
fn sys_error(errno: Errno, op: &str) -> Error {
    let kind = match errno {
        Errno::EBUSY => ErrorKind::FailedPrecondition,
        Errno::EINVAL => ErrorKind::InvalidArgument,
        Errno::ENOENT | Errno::ENOTDIR => ErrorKind::NotFound,
        Errno::EPERM | Errno::EACCES => ErrorKind::PermissionDenied,
        Errno::ENOSYS | Errno::ENODEV => ErrorKind::Unimplemented,
        _ => ErrorKind::Internal,
    };
    Error::new(kind, op).with_source(std::io::Error::from(errno))
}

/// Adds `message` in front of `err`, keeping its kind.
fn wrap(err: Error, message: String) -> Error {
    Error::new(err.kind(), message).with_source(err)
}

fn resolve_target(root: &Path, target: &str) -> Result<PathBuf> {
    let rel = Path::new(target.trim_start_matches('/'));
    if rel.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(Error::invalid_argument(format!(
            "mount target {target:?} leaves the root"
        )));
    }
    Ok(if rel.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    })
}

#[derive(Debug, PartialEq)]
struct Options {
    flags: MsFlags,
    propagation: MsFlags,
    data: Vec<String>,
}

/// Splits mount(8) options into mount flags, propagation flags and filesystem data, the way
/// mount(8) does: later options win over earlier ones (`ro` then `rw` is read-write).
fn parse_options(options: &[String]) -> Options {
    use MsFlags as F;
    let mut out = Options {
        flags: F::empty(),
        propagation: F::empty(),
        data: Vec::new(),
    };
    for opt in options {
        let (clear, flag) = match opt.as_str() {
            "async" => (true, F::MS_SYNCHRONOUS),
            "atime" => (true, F::MS_NOATIME),
            "bind" => (false, F::MS_BIND),
            "defaults" => (false, F::empty()),
            "dev" => (true, F::MS_NODEV),
            "diratime" => (true, F::MS_NODIRATIME),
            "dirsync" => (false, F::MS_DIRSYNC),
            "exec" => (true, F::MS_NOEXEC),
            "mand" => (false, F::MS_MANDLOCK),
            "noatime" => (false, F::MS_NOATIME),
            "nodev" => (false, F::MS_NODEV),
            "nodiratime" => (false, F::MS_NODIRATIME),
            "noexec" => (false, F::MS_NOEXEC),
            "nomand" => (true, F::MS_MANDLOCK),
            "norelatime" => (true, F::MS_RELATIME),
            "nostrictatime" => (true, F::MS_STRICTATIME),
            "nosuid" => (false, F::MS_NOSUID),
            "rbind" => (false, F::MS_BIND | F::MS_REC),
            "relatime" => (false, F::MS_RELATIME),
            "remount" => (false, F::MS_REMOUNT),
            "ro" => (false, F::MS_RDONLY),
            "rw" => (true, F::MS_RDONLY),
            "strictatime" => (false, F::MS_STRICTATIME),
            "suid" => (true, F::MS_NOSUID),
            "sync" => (false, F::MS_SYNCHRONOUS),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                out.propagation |= propagation_flag(opt);
                continue;
            }
            _ => {
                out.data.push(opt.clone());
                continue;
            }
        };
        if clear {
            out.flags &= !flag;
        } else {
            out.flags |= flag;
        }
    }
    out
}

fn propagation_flag(opt: &str) -> MsFlags {
    use MsFlags as F;
    // None of the base names starts with 'r', so a leading 'r' always means "recursive".
    let (recursive, name) = match opt.strip_prefix('r') {
        Some(rest) => (true, rest),
        None => (false, opt),
    };
    let base = match name {
        "private" => F::MS_PRIVATE,
        "shared" => F::MS_SHARED,
        "slave" => F::MS_SLAVE,
        _ => F::MS_UNBINDABLE,
    };
    if recursive { base | F::MS_REC } else { base }
}

/// Flags a bind remount applies to the new mount.
fn remount_flags() -> MsFlags {
    use MsFlags as F;
    F::MS_RDONLY
        | F::MS_NOSUID
        | F::MS_NODEV
        | F::MS_NOEXEC
        | F::MS_NOATIME
        | F::MS_NODIRATIME
        | F::MS_RELATIME
        | F::MS_STRICTATIME
}

/// `MOUNT_ATTR_*` bits for the per-mount flags among `flags`.
fn mount_attrs(flags: MsFlags) -> u64 {
    let mut attrs = 0;
    for (flag, attr) in [
        (MsFlags::MS_RDONLY, libc::MOUNT_ATTR_RDONLY),
        (MsFlags::MS_NOSUID, libc::MOUNT_ATTR_NOSUID),
        (MsFlags::MS_NODEV, libc::MOUNT_ATTR_NODEV),
        (MsFlags::MS_NOEXEC, libc::MOUNT_ATTR_NOEXEC),
        (MsFlags::MS_NOATIME, libc::MOUNT_ATTR_NOATIME),
        (MsFlags::MS_STRICTATIME, libc::MOUNT_ATTR_STRICTATIME),
        (MsFlags::MS_NODIRATIME, libc::MOUNT_ATTR_NODIRATIME),
    ] {
        if flags.contains(flag) {
            attrs |= attr;
        }
    }
    attrs
}

/// Filesystem data as fs-context parameters: `lowerdir=a:b` becomes one `lowerdir+` per layer
/// (so no single parameter grows with the chain), `k=v` a string, a bare word a flag.
fn fs_params(data: &[String]) -> Vec<FsParam> {
    let mut params = Vec::new();
    for item in data {
        match item.split_once('=') {
            Some(("lowerdir", dirs)) => {
                params.extend(
                    split_lowerdir(dirs)
                        .into_iter()
                        .map(|d| FsParam::String("lowerdir+".into(), d)),
                );
            }
            Some((key, value)) => params.push(FsParam::String(key.into(), value.into())),
            None => params.push(FsParam::Flag(item.clone())),
        }
    }
    params
}

/// Splits an overlay `lowerdir` value on `:` that is not escaped with `\`.
fn split_lowerdir(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    cur.push(next);
                }
            }
            ':' => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    if !cur.is_empty() || !out.is_empty() {
        out.push(cur);
    }
    out
}

/// The mount points listed in a mountinfo text, in order, with octal escapes decoded.
fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_octal(p)))
        .collect()
}

fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records every call; fails the calls whose rendering contains `fail_on`.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        mountinfo: String,
        fail_on: Option<&'static str>,
    }

    impl Recorder {
        fn record(&self, call: String) -> Result<()> {
            let fail = self.fail_on.is_some_and(|f| call.contains(f));
            self.calls.lock().unwrap().push(call);
            if fail {
                Err(sys_error(Errno::EINVAL, "recorded failure"))
            } else {
                Ok(())
            }
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Syscalls for Recorder {
        fn mount(
            &self,
            source: Option<&str>,
            target: &Path,
            fstype: Option<&str>,
            flags: MsFlags,
            data: Option<&str>,
        ) -> Result<()> {
            self.record(format!(
                "mount {} {} {} {} {}",
                source.unwrap_or("-"),
                target.display(),
                fstype.unwrap_or("-"),
                flag_names(flags),
                data.unwrap_or("-")
            ))
        }
        fn mount_fs(
            &self,
            fstype: &str,
            source: &str,
            params: &[FsParam],
            attrs: u64,
            target: &Path,
        ) -> Result<()> {
            self.record(format!(
                "fsmount {fstype} {source} {} params={} attrs={attrs}",
                target.display(),
                params.len()
            ))
        }
        fn unmount(&self, target: &Path, flags: MntFlags) -> Result<()> {
            let detach = if flags.contains(MntFlags::MNT_DETACH) {
                "detach"
            } else {
                "-"
            };
            self.record(format!("umount {} {detach}", target.display()))
        }
        fn mountinfo(&self) -> Result<String> {
            Ok(self.mountinfo.clone())
        }
    }

    fn flag_names(f: MsFlags) -> String {
        let names: Vec<&str> = f.iter_names().map(|(n, _)| n).collect();
        if names.is_empty() {
            "-".into()
        } else {
            names.join("|")
        }
    }

    fn opts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let o = parse_options(&opts(&[
            "ro",
            "nosuid",
            "rw",
            "rbind",
            "lowerdir=/a:/b",
            "index=off",
            "rprivate",
        ]));
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_BIND | MsFlags::MS_REC
        );
        assert_eq!(o.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        assert_eq!(o.data, ["lowerdir=/a:/b", "index=off"]);
        assert_eq!(propagation_flag("shared"), MsFlags::MS_SHARED);
        assert_eq!(
            propagation_flag("rslave"),
            MsFlags::MS_SLAVE | MsFlags::MS_REC
        );
        assert_eq!(
            propagation_flag("runbindable"),
            MsFlags::MS_UNBINDABLE | MsFlags::MS_REC
        );
    }

    #[test]
    fn read_only_bind_is_a_bind_then_a_remount() {
        let rec = Recorder::default();
        let m = Mounter::new(&rec, 4096);
        m.mount_all(&[Mount::bind("/src", true)], Path::new("/dst"))
            .unwrap();
        let calls = rec.calls();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[0], "mount /src /dst - MS_BIND|MS_REC -");
        assert_eq!(calls[1], "mount - /dst - MS_RDONLY|MS_REMOUNT|MS_BIND -");
    }

    #[test]
    fn short_overlay_uses_mount2_and_long_overlay_the_fs_context() {
        let overlay = |layers: usize| Mount {
            fstype: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![
                "workdir=/w".into(),
                "upperdir=/u".into(),
                format!(
                    "lowerdir={}",
                    (0..layers)
                        .map(|i| format!("/l/{i}"))
                        .collect::<Vec<_>>()
                        .join(":")
                ),
            ],
        };
        let rec = Recorder::default();
        let m = Mounter::new(&rec, 4096);
        m.mount_all(&[overlay(3)], Path::new("/t")).unwrap();
        m.mount_all(&[overlay(1000)], Path::new("/t")).unwrap();
        let calls = rec.calls();
        assert_eq!(
            calls[0],
            "mount overlay /t overlay - workdir=/w,upperdir=/u,lowerdir=/l/0:/l/1:/l/2"
        );
        assert_eq!(calls[1], "fsmount overlay overlay /t params=1002 attrs=0");

        let params = fs_params(&opts(&["lowerdir=/a:/b\\:c", "userxattr", "upperdir=/u"]));
        assert_eq!(
            params,
            [
                FsParam::String("lowerdir+".into(), "/a".into()),
                FsParam::String("lowerdir+".into(), "/b:c".into()),
                FsParam::Flag("userxattr".into()),
                FsParam::String("upperdir".into(), "/u".into()),
            ]
        );
        assert_eq!(
            mount_attrs(MsFlags::MS_RDONLY | MsFlags::MS_NODEV),
            libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NODEV
        );
    }

    #[test]
    fn a_failed_mount_undoes_the_earlier_ones() {
        let rec = Recorder {
            fail_on: Some("/root/sub"),
            ..Default::default()
        };
        let m = Mounter::new(&rec, 4096);
        let mut second = Mount::bind("/b", false);
        second.target = "/sub".into();
        let err = m
            .mount_all(&[Mount::bind("/a", false), second], Path::new("/root"))
            .unwrap_err();
        assert!(
            err.chain().starts_with("mount bind /b on /root/sub"),
            "{}",
            err.chain()
        );
        let calls = rec.calls();
        assert_eq!(calls.last().unwrap(), "umount /root detach");

        let mut evil = Mount::bind("/a", false);
        evil.target = "../etc".into();
        assert_eq!(
            m.mount_all(&[evil], Path::new("/root")).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn unmount_all_takes_the_deepest_and_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let line = |id: u32, p: &str| format!("{id} 1 0:1 / {p} rw - ext4 /dev/x rw\n");
        let info = [
            line(1, "/"),
            line(2, &root.display().to_string()),
            line(3, &format!("{}/a\\040b", root.display())),
            line(4, &root.display().to_string()),
            line(5, &format!("{}x", root.display())),
        ]
        .concat();
        let rec = Recorder {
            mountinfo: info,
            ..Default::default()
        };
        Mounter::new(&rec, 4096).unmount_all(&root).unwrap();
        let r = root.display();
        assert_eq!(
            rec.calls(),
            [
                format!("umount {r} -"),
                format!("umount {r}/a b -"),
                format!("umount {r} -")
            ]
        );
        // A missing root has nothing mounted.
        Mounter::new(&rec, 4096)
            .unmount_all(&root.join("missing"))
            .unwrap();
    }

    /// Root-only: the real kernel, through both overlay paths and a read-only bind.
    #[test]
    fn host_mounts_overlays_beyond_a_page_and_read_only_binds() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: mounting needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let base = dir
            .path()
            .join("a-directory-name-long-enough-to-overflow-a-page-quickly");
        let layer = |i: usize| base.join(format!("layer-{i:04}"));
        for i in 0..300 {
            std::fs::create_dir_all(layer(i)).unwrap();
            std::fs::write(layer(i).join(format!("f{i}")), i.to_string()).unwrap();
            std::fs::write(layer(i).join("top"), i.to_string()).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("upper")).unwrap();
        std::fs::create_dir_all(dir.path().join("work")).unwrap();
        let target = dir.path().join("merged");
        std::fs::create_dir_all(&target).unwrap();
        let lower: Vec<String> = (0..300)
            .rev()
            .map(|i| layer(i).display().to_string())
            .collect();
        let mut overlay = Mount {
            fstype: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![
                format!("upperdir={}", dir.path().join("upper").display()),
                format!("workdir={}", dir.path().join("work").display()),
                format!("lowerdir={}", lower.join(":")),
            ],
        };
        assert!(overlay.options[2].len() > 4096);
        let guard = MountGuard::mount(std::slice::from_ref(&overlay), &target).unwrap();
        assert_eq!(std::fs::read_to_string(target.join("f0")).unwrap(), "0");
        assert_eq!(std::fs::read_to_string(target.join("f299")).unwrap(), "299");
        assert_eq!(std::fs::read_to_string(target.join("top")).unwrap(), "299");
        std::fs::write(target.join("new"), "new").unwrap();
        guard.unmount().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("upper/new")).unwrap(),
            "new"
        );

        // Short: mount(2), read-only without an upper layer.
        overlay.options = vec![format!(
            "lowerdir={}:{}",
            layer(1).display(),
            layer(0).display()
        )];
        let guard = MountGuard::mount(&[overlay], &target).unwrap();
        assert_eq!(std::fs::read_to_string(target.join("top")).unwrap(), "1");
        let err = std::fs::write(target.join("x"), "x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        drop(guard);

        let guard = MountGuard::mount(
            &[Mount::bind(layer(7).display().to_string(), true)],
            &target,
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(target.join("f7")).unwrap(), "7");
        let err = std::fs::write(target.join("f7"), "x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        guard.unmount().unwrap();
        assert!(
            !mount_points(&std::fs::read_to_string("/proc/self/mountinfo").unwrap())
                .iter()
                .any(|p| p.starts_with(dir.path()))
        );
    }

    #[test]
    fn mount_accessors() {
        let m = Mount {
            fstype: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: opts(&["lowerdir=/a:/b"]),
        };
        assert!(m.is_readonly());
        assert_eq!(m.lowerdirs(), ["/a", "/b"]);
        assert_eq!(m.option("upperdir"), None);
        assert!(!Mount::bind("/x", false).is_readonly());
        assert!(Mount::bind("/x", true).is_readonly());
        assert_eq!(unescape_octal("a\\040b\\134"), "a b\\");
    }
}
