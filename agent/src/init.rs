//! What PID 1 does before serving: pseudo filesystems, kernel modules, the shared directory.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use berth_core::{Context, Error, ErrorKind, Result};
use nix::mount::{MsFlags, mount};

/// The module list the image builder writes (`berth_shim::vm::guest::MODULE_LIST`).
const MODULE_LIST: &str = "/etc/berth/modules";

/// Set in the environment of the agent re-executed from the tmpfs root.
const STAGE_ENV: &str = "BERTH_AGENT_ROOT";

/// Moves the guest's root off the initramfs, once: the kernel's initial root (rootfs) cannot be
/// `pivot_root`ed away from, which the runtime does for every container. The initramfs' files are
/// moved (copied, then removed) into a tmpfs, the tmpfs is moved over `/`, and the agent
/// re-executes itself from there. Returns only when already running from the new root.
pub fn switch_root() -> Result<()> {
    if std::env::var_os(STAGE_ENV).is_some() {
        return Ok(());
    }
    let new = Path::new("/newroot");
    std::fs::create_dir_all(new).internal(|| "create /newroot".into())?;
    mount(
        Some("rootfs"),
        new,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .context(ErrorKind::Internal, "mount tmpfs on /newroot")?;
    for entry in std::fs::read_dir("/").internal(|| "read /".into())? {
        let entry = entry.internal(|| "read /".into())?;
        if entry.file_name() == "newroot" {
            continue;
        }
        move_tree(&entry.path(), &new.join(entry.file_name()))?;
    }
    std::env::set_current_dir(new).internal(|| "chdir /newroot".into())?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context(ErrorKind::Internal, "move /newroot to /")?;
    nix::unistd::chroot(".").context(ErrorKind::Internal, "chroot")?;
    std::env::set_current_dir("/").internal(|| "chdir /".into())?;
    let init = CString::new("/init").unwrap_or_default();
    let env = [CString::new(format!("{STAGE_ENV}=1")).unwrap_or_default()];
    let err = nix::unistd::execve(&init, std::slice::from_ref(&init), &env).err();
    Err(
        Error::internal("re-execute /init").with_source(std::io::Error::from(
            err.unwrap_or(nix::errno::Errno::EINVAL),
        )),
    )
}

/// Copies `src` (file, directory, symlink, device) to `dst` and removes it.
fn move_tree(src: &Path, dst: &Path) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(src).internal(|| format!("stat {}", src.display()))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        std::fs::create_dir_all(dst).internal(|| format!("create {}", dst.display()))?;
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
            .internal(|| format!("chmod {}", dst.display()))?;
        for entry in std::fs::read_dir(src).internal(|| format!("read {}", src.display()))? {
            let entry = entry.internal(|| format!("read {}", src.display()))?;
            move_tree(&entry.path(), &dst.join(entry.file_name()))?;
        }
        let _ = std::fs::remove_dir(src);
    } else if ft.is_symlink() {
        let target = std::fs::read_link(src).internal(|| format!("readlink {}", src.display()))?;
        std::os::unix::fs::symlink(target, dst)
            .internal(|| format!("symlink {}", dst.display()))?;
        let _ = std::fs::remove_file(src);
    } else if ft.is_char_device() || ft.is_block_device() {
        let kind = if ft.is_char_device() {
            nix::sys::stat::SFlag::S_IFCHR
        } else {
            nix::sys::stat::SFlag::S_IFBLK
        };
        nix::sys::stat::mknod(
            dst,
            kind,
            nix::sys::stat::Mode::from_bits_truncate(meta.mode() & 0o7777),
            meta.rdev(),
        )
        .context(ErrorKind::Internal, format!("mknod {}", dst.display()))?;
    } else {
        std::fs::copy(src, dst).internal(|| format!("copy {}", src.display()))?;
        // Frees the initramfs' memory as the copy fills the tmpfs.
        let _ = std::fs::remove_file(src);
    }
    Ok(())
}

/// Mounts, modules and the share: everything the agent needs before it serves.
pub fn init_system() -> Result<()> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nosuid, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mount_fs("shm", "/dev/shm", "tmpfs", nosuid, Some("mode=1777"))?;
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_fs(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, None)?;
    // Containers get limits only for controllers the root enables for its children.
    let controllers =
        std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    let enable: Vec<String> = controllers
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect();
    if let Err(e) = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", enable.join(" ")) {
        tracing::warn!(error = %e, "enable cgroup controllers");
    }
    load_modules(Path::new(MODULE_LIST))?;
    mount_share()?;
    Ok(())
}

fn mount_fs(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    std::fs::create_dir_all(target).internal(|| format!("create {target}"))?;
    match mount(Some(src), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(Error::internal(format!("mount {fstype} on {target}")).with_source(e)),
    }
}

/// Loads every module named in `list` (one path a line, dependencies first).
pub fn load_modules(list: &Path) -> Result<()> {
    let text = match std::fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::internal(format!("read {}", list.display())).with_source(e)),
    };
    for path in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let f = File::open(path).internal(|| format!("open {path}"))?;
        let params = CString::default();
        // SAFETY: finit_module(2) with an fd we own and a NUL-terminated, empty parameter string.
        let rc =
            unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EEXIST) {
                return Err(Error::internal(format!("load module {path}")).with_source(err));
            }
        }
        tracing::debug!(module = path, "loaded");
    }
    Ok(())
}

/// Mounts the virtio-fs share, waiting for the device to be probed.
fn mount_share() -> Result<()> {
    std::fs::create_dir_all(crate::SHARE_DIR)
        .internal(|| format!("create {}", crate::SHARE_DIR))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match mount(
            Some("berth"),
            crate::SHARE_DIR,
            Some("virtiofs"),
            MsFlags::empty(),
            None::<&str>,
        ) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "virtio-fs not ready");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(
                    Error::new(ErrorKind::Unavailable, "mount virtio-fs tag berth").with_source(e),
                );
            }
        }
    }
}

/// Syncs and powers the guest off (QEMU exits).
pub fn power_off() {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // Not reached unless reboot failed: with QEMU's -no-reboot a reboot also ends the VM.
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
}
