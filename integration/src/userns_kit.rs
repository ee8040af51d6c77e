//! Test kit for container user namespaces: a throwaway host user with subordinate ranges of its
//! own (removed on drop, with its `/etc/subuid` and `/etc/subgid` lines and nothing else), and
//! the escape attempts every user-namespaced stack must refuse (rootful `userns-remap` and
//! rootless alike), each asserted denied.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, ensure};
use berth_core::userns::{HostIdFiles, SUBORDINATE_COUNT};

use crate::gateway_kit::DockerStack;

/// A host user and group of the same name with one subordinate range each, made for one test.
#[derive(Debug)]
pub struct SubidUser {
    /// User and group name.
    pub name: String,
    /// First subordinate uid (the host uid of a container's root).
    pub uid_start: u32,
    /// First subordinate gid.
    pub gid_start: u32,
    /// Ids in each range.
    pub count: u32,
}

impl SubidUser {
    /// Creates a system user (and its group) with a unique name starting with `prefix` (at
    /// most 8 characters) and adds a fresh range to `/etc/subuid` and `/etc/subgid` past every
    /// other one, under the lock berth's editors share.
    pub fn create(prefix: &str) -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let out = shadow_tool(
            Command::new("useradd")
                .args(["--system", "--user-group", "--no-create-home"])
                .args(["--shell", "/bin/false", &name]),
        )?;
        ensure!(
            out.status.success(),
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // From here on Drop cleans up, whatever fails next.
        let mut user = Self {
            name,
            uid_start: 0,
            gid_start: 0,
            count: SUBORDINATE_COUNT,
        };
        let (u, g) = HostIdFiles::default().add_ranges(&user.name)?;
        user.uid_start = u;
        user.gid_start = g;
        Ok(user)
    }

    /// Whether host uid `uid` is in this user's subordinate range.
    pub fn owns_uid(&self, uid: u32) -> bool {
        (self.uid_start..self.uid_start + self.count).contains(&uid)
    }
}

impl Drop for SubidUser {
    fn drop(&mut self) {
        if let Err(e) = HostIdFiles::default().remove_ranges(&self.name) {
            eprintln!("removing the subordinate ranges of {}: {e}", self.name);
        }
        let _ = shadow_tool(Command::new("userdel").arg(&self.name));
        // Gone with the user when USERGROUPS_ENAB; otherwise removed here.
        let _ = shadow_tool(Command::new("groupdel").arg(&self.name));
    }
}

/// Runs a shadow-utils tool, again while another one (a parallel test's) holds
/// `/etc/passwd`'s lock.
fn shadow_tool(cmd: &mut Command) -> Result<std::process::Output> {
    let mut tries = 0;
    loop {
        let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
        let locked = String::from_utf8_lossy(&out.stderr).contains("lock");
        tries += 1;
        if out.status.success() || !locked || tries >= 50 {
            return Ok(out);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A host directory for one test, removed on drop, traversable by everyone (so a container's
/// mapped root can reach what is bind-mounted from it).
#[derive(Debug)]
pub struct HostDir(pub tempfile::TempDir);

impl HostDir {
    /// A new empty directory under /tmp.
    pub fn new(prefix: &str) -> Result<Self> {
        let d = tempfile::Builder::new().prefix(prefix).tempdir()?;
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755))?;
        Ok(Self(d))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// The `Uid:` line of `/proc/<pid>/status`: real, effective, saved, filesystem uids.
pub fn proc_uids(pid: i32) -> Result<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .context("no Uid line")?;
    Ok(line[4..]
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect())
}

/// Something that runs the docker CLI against a stack: a rootful [`DockerStack`], or the user
/// of a rootless one (`crate::rootless_kit::TestUser`).
pub trait DockerCli {
    /// Runs `docker args...`.
    fn docker(&self, args: &[&str]) -> Result<std::process::Output>;

    /// Runs `docker args...`; its trimmed stdout, or an error with its stderr.
    fn docker_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.docker(args)?;
        ensure!(
            out.status.success(),
            "docker {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }
}

impl DockerCli for DockerStack {
    fn docker(&self, args: &[&str]) -> Result<std::process::Output> {
        self.run(args)
    }
}

/// Runs `docker run --rm <args> busybox sh -c <script>` and returns (success, stdout+stderr).
fn sh(d: &impl DockerCli, args: &[&str], script: &str) -> Result<(bool, String)> {
    let mut all = vec!["run", "--rm"];
    all.extend_from_slice(args);
    all.extend(["busybox", "sh", "-c", script]);
    let out = d.docker(&all)?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// Every escape a user-namespaced container must be refused, tried against stack `d` (which
/// has `busybox:latest`), each asserted denied and checked on the host:
///
/// - writing host files it can see but does not own (a bind-mounted root-owned file and
///   directory), and a host path that is not mounted, through `/proc/1/root` and directly;
/// - a symlink in a volume pointing out of it, followed by `docker cp` in and out;
/// - `mount` of `/` without privileges, `mknod` of a block device, and writing a host sysctl
///   after remounting `/proc/sys` even with CAP_SYS_ADMIN;
/// - loading a kernel module (`insmod`, the finit_module call), even with CAP_SYS_MODULE;
/// - changing the host's hostname, from a private UTS namespace and from the host's.
pub fn assert_escapes_refused(d: &impl DockerCli) -> Result<()> {
    let host = HostDir::new("berth-escape-")?;
    let hp = host.path().display().to_string();

    // Host files the container sees but does not own.
    std::fs::write(host.path().join("owned"), "root's\n")?;
    std::fs::set_permissions(
        host.path().join("owned"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    std::fs::create_dir(host.path().join("sub"))?;
    std::fs::set_permissions(
        host.path().join("sub"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    let bind = format!("{hp}:/h");
    let (ok, out) = sh(d, &["-v", &bind], "echo pwned >> /h/owned")?;
    ensure!(!ok, "appending to a host root's file succeeded: {out}");
    let (ok, out) = sh(d, &["-v", &bind], "touch /h/sub/new")?;
    ensure!(
        !ok,
        "creating a file in a host root's directory succeeded: {out}"
    );
    let (ok, out) = sh(d, &["-v", &bind], "chown 0:0 /h && chmod 777 /h")?;
    ensure!(!ok, "taking over the host directory succeeded: {out}");
    ensure!(std::fs::read_to_string(host.path().join("owned"))? == "root's\n");
    ensure!(!host.path().join("sub/new").exists());

    // A host path that is not mounted: through /proc/1/root and guessed directly.
    let marker = host.path().join("marker");
    let m = marker.display().to_string();
    let (ok, _) = sh(
        d,
        &[],
        &format!("echo x > /proc/1/root{m} || echo x > {m}; cat /proc/1/root{m} {m}"),
    )?;
    let _ = ok; // the container may well write into its own rootfs at that path
    ensure!(!marker.exists(), "a container wrote {m} on the host");

    // A symlink in a volume pointing out of it, followed by docker cp.
    let secret_dir = host.path().join("secret");
    std::fs::create_dir(&secret_dir)?;
    std::fs::write(secret_dir.join("file"), "host secret\n")?;
    let vol = format!("berth-esc-{}", std::process::id());
    let name = format!("berth-esc-{}", std::process::id());
    let sd = secret_dir.display().to_string();
    d.docker_ok(&[
        "run",
        "-d",
        "--name",
        &name,
        "-v",
        &format!("{vol}:/data"),
        "busybox",
        "sh",
        "-c",
        &format!(
            "ln -s {sd} /data/abs; ln -s ../../../../../../../..{sd} /data/rel; exec sleep 300"
        ),
    ])?;
    let result = (|| -> Result<()> {
        let out_dir = HostDir::new("berth-escape-out-")?;
        for link in ["abs", "rel"] {
            let dest = out_dir.path().join(link);
            let got = d.docker(&[
                "cp",
                &format!("{name}:/data/{link}/file"),
                &dest.display().to_string(),
            ])?;
            let leaked = std::fs::read_to_string(&dest).unwrap_or_default();
            ensure!(
                !leaked.contains("host secret"),
                "docker cp out through /data/{link} read the host's file ({})",
                String::from_utf8_lossy(&got.stderr)
            );
            let src = out_dir.path().join("planted");
            std::fs::write(&src, "planted\n")?;
            let _ = d.docker(&[
                "cp",
                &src.display().to_string(),
                &format!("{name}:/data/{link}/planted"),
            ])?;
            ensure!(
                !secret_dir.join("planted").exists(),
                "docker cp in through /data/{link} wrote into the host directory"
            );
        }
        Ok(())
    })();
    let _ = d.docker(&["rm", "-f", &name]);
    let _ = d.docker(&["volume", "rm", "-f", &vol]);
    result?;

    // Mounts and device nodes, even with CAP_SYS_ADMIN / CAP_MKNOD inside the namespace.
    let (ok, out) = sh(d, &[], "mkdir -p /mnt/r && mount --bind / /mnt/r")?;
    ensure!(!ok, "bind-mounting / succeeded without privileges: {out}");
    let (ok, out) = sh(d, &[], "mknod /tmp/sda b 8 0")?;
    ensure!(!ok, "mknod of a block device succeeded: {out}");
    // With CAP_SYS_ADMIN in the namespace: a host sysctl stays out of reach (the value
    // written is the current one, so nothing changes should the refusal be missing).
    let sysctl = ["kernel/panic", "vm/swappiness", "kernel/sysrq"]
        .into_iter()
        .find(|k| Path::new("/proc/sys").join(k).exists())
        .context("no host sysctl to try")?;
    let value = std::fs::read_to_string(Path::new("/proc/sys").join(sysctl))?
        .trim()
        .to_string();
    let (ok, out) = sh(
        d,
        &["--cap-add", "SYS_ADMIN"],
        &format!("mount -o remount,rw /proc/sys; echo {value} > /proc/sys/{sysctl}"),
    )?;
    ensure!(
        !ok,
        "writing a host sysctl succeeded with CAP_SYS_ADMIN: {out}"
    );

    // Kernel modules: the call itself must be refused (not merely fail on a bad module).
    let (ok, out) = sh(
        d,
        &["--cap-add", "SYS_MODULE"],
        "echo notamodule > /tmp/m.ko; insmod /tmp/m.ko",
    )?;
    ensure!(!ok, "insmod succeeded: {out}");
    if host_loads_modules() {
        ensure!(
            out.contains("not permitted"),
            "insmod failed for another reason than a refusal: {out}"
        );
    } else {
        eprintln!("this kernel cannot load modules at all (finit_module: ENOSYS): {out}");
    }

    // The host's hostname.
    let before = nix::unistd::gethostname()?.to_string_lossy().into_owned();
    // (CAP_SYS_ADMIN: sethostname needs it, in the namespace that owns the UTS namespace.)
    let (ok, out) = sh(
        d,
        &["--cap-add", "SYS_ADMIN"],
        "hostname berth-escape && hostname",
    )?;
    ensure!(
        ok && out.contains("berth-escape"),
        "hostname in the container: {out}"
    );
    ensure!(
        nix::unistd::gethostname()?.to_string_lossy() == before,
        "the host's hostname changed"
    );
    // Sharing the host's UTS namespace: setting it (to its own value, so nothing changes if
    // the refusal is missing) must be refused.
    let (ok, out) = sh(
        d,
        &["--uts", "host", "--cap-add", "SYS_ADMIN"],
        &format!("hostname {before}"),
    )?;
    ensure!(
        !ok,
        "setting the host's hostname from --uts=host succeeded: {out}"
    );
    ensure!(
        nix::unistd::gethostname()?.to_string_lossy() == before,
        "the host's hostname changed"
    );
    Ok(())
}

/// Whether this kernel loads modules: `finit_module` on a bad fd is EBADF (or EPERM) where it
/// does and ENOSYS where modules are compiled out.
pub fn host_loads_modules() -> bool {
    // SAFETY: a system call on an invalid fd with an empty, NUL-terminated string.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, -1, c"".as_ptr(), 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS)
}

/// Owner (uid, gid) of `path` on the host.
pub fn owner(path: &Path) -> Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok((m.uid(), m.gid()))
}

/// The path of `rel` under the stack's data root.
pub fn under_root(d: &DockerStack, rel: &str) -> PathBuf {
    d.stack.root().join(rel)
}
