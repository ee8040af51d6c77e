//! The real namespaces of pod sandboxes: no pause process. The network, IPC and UTS
//! namespaces are made by a short-lived thread that unshares them, sets the hostname, brings
//! loopback up and bind-mounts `/proc/thread-self/ns/{net,ipc,uts}` onto files in the
//! sandbox's directory; the mounts keep them alive after the thread is gone.
//!
//! With the IPC namespace goes the pod's /dev/shm, a tmpfs at `<dir>/shm` bound into each
//! container (POSIX shared memory is files there, so sharing IPC means sharing it too).
//!
//! A PID namespace cannot be held that way: one whose init has exited takes no new processes.
//! Its holder is the smallest process that works, `berth-engine pid-holder` (this binary, a
//! few hundred KiB resident): started with `CLONE_NEWPID` unshared and a session of its own,
//! it forks the namespace's init, prints its pid and exits; the init blocks every signal,
//! reaps whatever is re-parented to it (as pause does) and nothing else. Killing it ends the
//! namespace and every process in it. Root-only; exercised by the integration tests.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use berth_core::{Error, Result};
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

use crate::deps::{PodNamespaces, PodNsPaths, PodNsWant};

/// The argument that turns `berth-engine` into the PID namespace holder.
pub const HOLDER_ARG: &str = "pid-holder";

/// `f_type` of a namespace file (`NSFS_MAGIC`).
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Namespace files under each sandbox's directory, and holders from `binary`.
#[derive(Debug, Clone)]
pub struct HostPodNamespaces {
    /// The binary run with [`HOLDER_ARG`] (this engine's own).
    pub holder_binary: PathBuf,
}

impl HostPodNamespaces {
    /// Holders are `berth-engine pid-holder` of the running engine binary.
    pub fn new() -> Self {
        Self {
            holder_binary: std::env::current_exe()
                .unwrap_or_else(|_| PathBuf::from("berth-engine")),
        }
    }
}

impl Default for HostPodNamespaces {
    fn default() -> Self {
        Self::new()
    }
}

fn bind(source: &Path, target: &Path) -> Result<()> {
    std::fs::File::create(target)
        .map_err(|e| Error::internal(format!("create {}", target.display())).with_source(e))?;
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| {
        let _ = std::fs::remove_file(target);
        Error::internal(format!(
            "bind-mount {} on {}",
            source.display(),
            target.display()
        ))
        .with_source(e)
    })
}

/// The pod's /dev/shm: what Docker gives a container (64 MiB), shared by the pod.
fn mount_shm(target: &Path) -> Result<()> {
    std::fs::create_dir_all(target)
        .map_err(|e| Error::internal(format!("create {}", target.display())).with_source(e))?;
    nix::mount::mount(
        Some("shm"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )
    .map_err(|e| {
        Error::internal(format!("mount the pod's shm on {}", target.display())).with_source(e)
    })
}

fn unmount_and_remove(path: &Path) -> Result<()> {
    match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(Error::internal(format!("unmount {}", path.display())).with_source(e));
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::internal(format!("remove {}", path.display())).with_source(e)),
    }
}

const NS_FILES: [&str; 4] = ["net", "ipc", "uts", "pid"];

fn inode(path: &Path) -> Option<u64> {
    nix::sys::stat::stat(path).ok().map(|s| s.st_ino)
}

impl PodNamespaces for HostPodNamespaces {
    fn create(&self, dir: &Path, want: PodNsWant, hostname: &str) -> Result<PodNsPaths> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::internal(format!("create {}", dir.display())).with_source(e))?;
        let mut flags = CloneFlags::empty();
        let mut kinds = Vec::new();
        for (on, flag, kind) in [
            (want.net, CloneFlags::CLONE_NEWNET, "net"),
            (want.ipc, CloneFlags::CLONE_NEWIPC, "ipc"),
            (want.uts, CloneFlags::CLONE_NEWUTS, "uts"),
        ] {
            if on {
                flags |= flag;
                kinds.push(kind);
            }
        }
        if kinds.is_empty() {
            return Ok(PodNsPaths::default());
        }
        let target = dir.to_path_buf();
        let hostname = hostname.to_string();
        let made = kinds.clone();
        // A thread of its own: unshare changes only the calling thread, which then ends.
        let result = std::thread::spawn(move || -> Result<()> {
            nix::sched::unshare(flags)
                .map_err(|e| Error::internal("unshare the pod namespaces").with_source(e))?;
            if want.uts {
                nix::unistd::sethostname(&hostname).map_err(|e| {
                    Error::invalid_argument(format!("set hostname {hostname:?}")).with_source(e)
                })?;
            }
            if want.net
                && let Err(e) = crate::host::loopback_up()
            {
                tracing::warn!(error = %e, "bringing up lo in a pod network namespace");
            }
            for kind in made {
                bind(
                    Path::new(&format!("/proc/thread-self/ns/{kind}")),
                    &target.join(kind),
                )?;
            }
            Ok(())
        })
        .join()
        .map_err(|_| Error::internal("pod namespace thread panicked"))?;
        let shm = dir.join("shm");
        let result = result.and_then(|()| if want.ipc { mount_shm(&shm) } else { Ok(()) });
        if let Err(e) = result {
            for kind in &kinds {
                let _ = unmount_and_remove(&dir.join(kind));
            }
            let _ = nix::mount::umount2(&shm, MntFlags::MNT_DETACH);
            return Err(e);
        }
        let path = |k: &str| kinds.contains(&k).then(|| dir.join(k));
        Ok(PodNsPaths {
            net: path("net"),
            ipc: path("ipc"),
            uts: path("uts"),
            shm: want.ipc.then_some(shm),
        })
    }

    fn start_pid_holder(&self, dir: &Path) -> Result<(u32, PathBuf)> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::internal(format!("create {}", dir.display())).with_source(e))?;
        let mut cmd = Command::new(&self.holder_binary);
        cmd.arg(HOLDER_ARG)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec only async-signal-safe calls (setsid, unshare).
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                nix::sched::unshare(CloneFlags::CLONE_NEWPID).map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            Error::internal(format!("start {}", self.holder_binary.display())).with_source(e)
        })?;
        let mut out = String::new();
        if let Some(mut stdout) = child.stdout.take() {
            let _ = stdout.read_to_string(&mut out);
        }
        let status = child
            .wait()
            .map_err(|e| Error::internal("wait for the pid holder's parent").with_source(e))?;
        let pid: u32 = out.trim().parse().map_err(|_| {
            Error::internal(format!(
                "pid holder did not start ({status}, output {:?})",
                out.trim()
            ))
        })?;
        let file = dir.join("pid");
        if let Err(e) = bind(Path::new(&format!("/proc/{pid}/ns/pid")), &file) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(e);
        }
        Ok((pid, file))
    }

    fn holder_alive(&self, pid: u32, ns_file: &Path) -> bool {
        pid != 0
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
            && inode(&PathBuf::from(format!("/proc/{pid}/ns/pid")))
                .is_some_and(|i| inode(ns_file) == Some(i) && self.ns_alive(ns_file))
    }

    fn stop_pid_holder(&self, pid: u32, ns_file: &Path) {
        if self.holder_alive(pid, ns_file) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    fn ns_alive(&self, path: &Path) -> bool {
        nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == NSFS_MAGIC)
    }

    fn remove(&self, dir: &Path) -> Result<()> {
        for kind in NS_FILES {
            unmount_and_remove(&dir.join(kind))?;
        }
        match nix::mount::umount2(&dir.join("shm"), MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                return Err(Error::internal("unmount the pod's shm").with_source(e));
            }
        }
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::internal(format!("remove {}", dir.display())).with_source(e)),
        }
    }
}

/// `berth-engine pid-holder`: forks the init of the PID namespace this process was started
/// for (see the module docs), prints its pid and exits; the init never returns.
pub fn holder_main() -> std::process::ExitCode {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use nix::unistd::{ForkResult, fork};
    // SAFETY: this process is single-threaded (nothing has started a thread yet), so the child
    // may run any code.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            println!("{child}");
            std::process::ExitCode::SUCCESS
        }
        Ok(ForkResult::Child) => {
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                use std::os::fd::AsRawFd;
                for fd in 0..3 {
                    // SAFETY: dup2 onto the standard descriptors of this process.
                    unsafe { libc::dup2(null.as_raw_fd(), fd) };
                }
            }
            let _ = std::env::set_current_dir("/");
            let all = SigSet::all();
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&all), None);
            let mut chld = SigSet::empty();
            chld.add(Signal::SIGCHLD);
            loop {
                // Blocked signals are kept pending even with SIGCHLD's default disposition.
                let _ = chld.wait();
                while let Ok(st) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    if st == WaitStatus::StillAlive {
                        break;
                    }
                }
            }
        }
        Err(e) => {
            eprintln!("pid-holder: fork: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_come_and_go() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("sb");
        let ns = HostPodNamespaces::new();
        let paths = ns
            .create(
                &dir,
                PodNsWant {
                    net: true,
                    ipc: true,
                    uts: true,
                },
                "pod-host",
            )
            .unwrap();
        let net = paths.net.unwrap();
        assert!(ns.ns_alive(&net));
        assert_ne!(inode(&net), inode(Path::new("/proc/self/ns/net")));
        assert!(ns.ns_alive(&paths.uts.unwrap()));
        ns.remove(&dir).unwrap();
        assert!(!dir.exists());
        ns.remove(&dir).unwrap();
    }
}
