//! Spawning host processes and learning how they ended.
//!
//! The shim is a child subreaper: the container's init and exec processes are re-parented to it
//! when the runtime that started them exits, and it must reap them to learn their exit statuses.
//! One [`Reaper`] owns `waitpid(-1)` for the whole process and hands each exit to whoever
//! subscribed to that pid. Everything the shim spawns goes through [`Spawner`] so that no other
//! code (tokio's process support, std's `Child::wait`) ever races the reaper for a status.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::SystemTime;

use berth_core::{Error, ErrorKind, Result};
use nix::errno::Errno;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Its host pid.
    pub pid: u32,
    /// The exit code, or 128 + the signal that killed it (the shell's convention: TERM → 143).
    pub status: u32,
    /// When the shim learned of it.
    pub at: SystemTime,
}

impl Exit {
    /// The exit of `pid` from a `waitpid` status; `None` for stops and continues.
    pub fn from_wait_status(status: WaitStatus, at: SystemTime) -> Option<Self> {
        match status {
            WaitStatus::Exited(pid, code) => Some(Self {
                pid: pid.as_raw() as u32,
                status: code as u32 & 0xff,
                at,
            }),
            WaitStatus::Signaled(pid, sig, _) => Some(Self {
                pid: pid.as_raw() as u32,
                status: 128 + sig as u32,
                at,
            }),
            _ => None,
        }
    }
}

/// A future that resolves when the process it was made for exits.
pub struct ExitFuture(Pin<Box<dyn Future<Output = Result<Exit>> + Send>>);

impl ExitFuture {
    /// Wraps any future that yields the exit.
    pub fn new(fut: impl Future<Output = Result<Exit>> + Send + 'static) -> Self {
        Self(Box::pin(fut))
    }
}

impl fmt::Debug for ExitFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ExitFuture")
    }
}

impl Future for ExitFuture {
    type Output = Result<Exit>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

/// Starts host processes (the OCI runtime) and reports their exits.
///
/// Contract: the exit of every process started with [`Spawner::spawn`] is delivered to the
/// returned future exactly once, even when the process exits before the caller polls it; and
/// [`Spawner::watch`] does the same for a process the caller did not start but that will be
/// reaped by this spawner (a container process re-parented to the shim), including one that
/// already exited before `watch` was called.
pub trait Spawner: Send + Sync + fmt::Debug {
    /// Spawns `cmd` and returns its pid and a future of its exit.
    fn spawn(&self, cmd: &mut Command) -> Result<(u32, ExitFuture)>;
    /// A future of the exit of `pid`.
    fn watch(&self, pid: u32) -> ExitFuture;
}

/// How many exits nobody asked for are remembered, for processes whose pid the shim learns only
/// after they may have exited (exec processes, read from the runtime's pid file).
const UNCLAIMED_LIMIT: usize = 256;

#[derive(Default)]
struct ReaperState {
    waiting: HashMap<u32, oneshot::Sender<Exit>>,
    unclaimed: VecDeque<Exit>,
}

/// The shim's subreaper: reaps every child on SIGCHLD and dispatches exits by pid.
#[derive(Clone, Default)]
pub struct Reaper {
    state: Arc<Mutex<ReaperState>>,
}

impl fmt::Debug for Reaper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reaper").finish_non_exhaustive()
    }
}

impl Reaper {
    /// A reaper that does nothing until [`Reaper::run`] is polled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reaps children whenever SIGCHLD arrives, forever. Install it (spawn it on the runtime)
    /// before the first child is started.
    pub fn run(&self) -> Result<impl Future<Output = ()> + Send + 'static> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sigchld = signal(SignalKind::child())
            .map_err(|e| Error::internal("install SIGCHLD handler").with_source(e))?;
        let this = self.clone();
        Ok(async move {
            loop {
                // Children that exited before the handler existed are collected on the first
                // pass; signals that arrive while reaping coalesce into one more pass.
                this.reap_all();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        })
    }

    /// Collects every exited child and hands each exit to its subscriber.
    pub fn reap_all(&self) {
        loop {
            let mut state = self.state.lock().unwrap();
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Err(err) => {
                    tracing::warn!(%err, "waitpid failed");
                    return;
                }
                Ok(status) => status,
            };
            let Some(exit) = Exit::from_wait_status(status, SystemTime::now()) else {
                continue;
            };
            match state.waiting.remove(&exit.pid) {
                Some(tx) => {
                    let _ = tx.send(exit);
                }
                None => {
                    if state.unclaimed.len() == UNCLAIMED_LIMIT {
                        state.unclaimed.pop_front();
                    }
                    state.unclaimed.push_back(exit);
                }
            }
        }
    }

    fn subscribe(state: &mut ReaperState, pid: u32) -> ExitFuture {
        let (tx, rx) = oneshot::channel();
        if let Some(i) = state.unclaimed.iter().position(|e| e.pid == pid) {
            let exit = state.unclaimed.remove(i).expect("index from position");
            let _ = tx.send(exit);
        } else {
            state.waiting.insert(pid, tx);
        }
        ExitFuture::new(async move {
            rx.await
                .map_err(|_| Error::new(ErrorKind::Internal, format!("reaper dropped pid {pid}")))
        })
    }
}

impl Spawner for Reaper {
    fn spawn(&self, cmd: &mut Command) -> Result<(u32, ExitFuture)> {
        // Holding the lock across fork+exec keeps `reap_all` from collecting the child (or std's
        // own cleanup of a failed exec) before it is registered.
        let mut state = self.state.lock().unwrap();
        let child = cmd.spawn().map_err(|e| spawn_error(cmd, e))?;
        let pid = child.id();
        // Dropping a `Child` neither waits nor kills: the reaper owns its status.
        drop(child);
        Ok((pid, Self::subscribe(&mut state, pid)))
    }

    fn watch(&self, pid: u32) -> ExitFuture {
        let mut state = self.state.lock().unwrap();
        Self::subscribe(&mut state, pid)
    }
}

/// The error for a command that could not be started, naming the program.
pub fn spawn_error(cmd: &Command, err: std::io::Error) -> Error {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let kind = match err.kind() {
        std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        _ => ErrorKind::Internal,
    };
    Error::new(kind, format!("start {program}")).with_source(err)
}

/// A [`Spawner`] on tokio's process support, for tests and tools that do not run as a subreaper:
/// it waits for each child by pid and cannot watch processes it did not start.
#[derive(Debug, Default, Clone, Copy)]
pub struct TokioSpawner;

impl Spawner for TokioSpawner {
    fn spawn(&self, cmd: &mut Command) -> Result<(u32, ExitFuture)> {
        let program = Command::new(cmd.get_program());
        let mut child = tokio::process::Command::from(std::mem::replace(cmd, Command::new("")))
            .spawn()
            .map_err(|e| spawn_error(&program, e))?;
        let pid = child.id().unwrap_or_default();
        Ok((
            pid,
            ExitFuture::new(async move {
                use std::os::unix::process::ExitStatusExt;
                let status = child
                    .wait()
                    .await
                    .map_err(|e| Error::internal("wait").with_source(e))?;
                let code = match (status.code(), status.signal()) {
                    (Some(code), _) => code as u32,
                    (None, Some(sig)) => 128 + sig as u32,
                    (None, None) => 255,
                };
                Ok(Exit {
                    pid,
                    status: code,
                    at: SystemTime::now(),
                })
            }),
        ))
    }

    fn watch(&self, pid: u32) -> ExitFuture {
        ExitFuture::new(async move {
            Err(Error::unimplemented(format!(
                "TokioSpawner cannot watch pid {pid}"
            )))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_follows_the_shell_convention() {
        let at = SystemTime::now();
        let pid = Pid::from_raw(42);
        let e = Exit::from_wait_status(WaitStatus::Exited(pid, 3), at).unwrap();
        assert_eq!((e.pid, e.status), (42, 3));
        let e = Exit::from_wait_status(
            WaitStatus::Signaled(pid, nix::sys::signal::Signal::SIGTERM, false),
            at,
        )
        .unwrap();
        assert_eq!(e.status, 143);
        assert!(Exit::from_wait_status(WaitStatus::StillAlive, at).is_none());
    }

    #[tokio::test]
    async fn tokio_spawner_reports_exit_codes() {
        let (_, exit) = TokioSpawner.spawn(&mut Command::new("/bin/false")).unwrap();
        assert_eq!(exit.await.unwrap().status, 1);
        let (_, exit) = TokioSpawner
            .spawn(Command::new("/bin/sh").args(["-c", "kill -TERM $$"]))
            .unwrap();
        assert_eq!(exit.await.unwrap().status, 143);
    }
}
