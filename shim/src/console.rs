//! Terminals: receiving the pty master from the runtime over its console socket, and resizing.
//!
//! With `process.terminal` set, runc and crun create the pty inside the container and connect to
//! the Unix socket named by `--console-socket`, sending one message whose payload is the
//! terminal's name and whose `SCM_RIGHTS` control message carries the master's file descriptor.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use berth_core::{Context, Error, ErrorKind, Result};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use tokio::io::Interest;
use tokio::net::UnixListener;

/// A listening console socket; removed when dropped.
#[derive(Debug)]
pub struct ConsoleSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ConsoleSocket {
    /// Listens on `path` (which must fit a Unix socket address).
    pub fn bind(path: &Path) -> Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).context(
            ErrorKind::Internal,
            format!("bind console socket {}", path.display()),
        )?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// The socket's path, for `--console-socket`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts one connection and returns the pty master it sends.
    pub async fn receive(&self) -> Result<OwnedFd> {
        let (stream, _) = self
            .listener
            .accept()
            .await
            .context(ErrorKind::Internal, "accept on console socket")?;
        loop {
            stream
                .readable()
                .await
                .context(ErrorKind::Internal, "read console socket")?;
            match stream.try_io(Interest::READABLE, || recv_fd(stream.as_raw_fd())) {
                Ok(Some(fd)) => return Ok(fd),
                Ok(None) => {
                    return Err(Error::internal(
                        "the runtime sent no terminal on the console socket",
                    ));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(Error::internal("receive terminal").with_source(e)),
            }
        }
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One `recvmsg` with room for a file descriptor; `None` when the message carried none.
fn recv_fd(sock: RawFd) -> std::io::Result<Option<OwnedFd>> {
    let mut name = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(std::io::Error::from)?;
    let mut master = None;
    for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: SCM_RIGHTS installed `fd` in this process just now and nothing else
                // refers to it; wrapping it gives it exactly one owner (extra ones are closed).
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if master.is_none() {
                    master = Some(owned);
                }
            }
        }
    }
    Ok(master)
}

/// Receives a terminal already queued on `sock` (native exec's socket pair).
pub fn recv_fd_now(sock: &OwnedFd) -> std::io::Result<OwnedFd> {
    recv_fd(sock.as_raw_fd())?.ok_or_else(|| std::io::Error::other("no terminal was sent"))
}

/// Sends `fd` over `sock` with `SCM_RIGHTS` and a one-byte payload. Async-signal-safe (no
/// allocation), for a forked child; returns `sendmsg`'s result.
///
/// # Safety
/// `sock` and `fd` must be open descriptors.
pub unsafe fn send_fd_raw(sock: RawFd, fd: RawFd) -> isize {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Aligned room for one control message carrying one descriptor.
    let mut buf = [0u64; 4];
    // SAFETY: msghdr is plain data; the control buffer is large enough for CMSG_SPACE(4) and
    // aligned for cmsghdr, and every pointer stays valid for the call.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = buf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), fd);
        libc::sendmsg(sock, &msg, 0)
    }
}

/// Sets the window size of the terminal behind `fd` (a pty master).
pub fn resize(fd: &impl AsRawFd, width: u16, height: u16) -> Result<()> {
    let ws = libc::winsize {
        ws_row: height,
        ws_col: width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which is valid for the call.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TIOCSWINSZ,
            &ws as *const libc::winsize,
        )
    };
    if rc < 0 {
        return Err(Error::internal("resize terminal").with_source(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::IoSlice;

    use nix::sys::socket::{ControlMessage, sendmsg};

    use super::*;

    #[tokio::test]
    async fn receives_a_terminal_like_runc_sends_it() {
        let dir = tempfile::tempdir().unwrap();
        let sock = ConsoleSocket::bind(&dir.path().join("c.sock")).unwrap();
        let pty = nix::pty::openpty(None, None).unwrap();
        let path = sock.path().to_path_buf();
        let master_raw = pty.master.as_raw_fd();
        let sender = std::thread::spawn(move || {
            let s = std::os::unix::net::UnixStream::connect(path).unwrap();
            let fds = [master_raw];
            sendmsg::<()>(
                s.as_raw_fd(),
                &[IoSlice::new(b"/dev/pts/9")],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            )
            .unwrap();
        });
        let got = sock.receive().await.unwrap();
        sender.join().unwrap();
        resize(&got, 100, 40).unwrap();
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, valid for the call.
        let rc = unsafe {
            libc::ioctl(
                pty.slave.as_raw_fd(),
                libc::TIOCGWINSZ,
                &mut ws as *mut libc::winsize,
            )
        };
        assert_eq!(rc, 0);
        assert_eq!((ws.ws_col, ws.ws_row), (100, 40));
        let path = sock.path().to_path_buf();
        drop(sock);
        assert!(!path.exists());
    }
}
