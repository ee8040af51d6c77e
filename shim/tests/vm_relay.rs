//! `berth-shim vm-relay` against an in-process fake agent behind the same `CONNECT`/`OK`
//! handshake vhost-device-vsock speaks. Each test names the guest process' behaviour through
//! its exec id.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

mod common;
use common::agent::{SHIM, serve};

fn relay(sock: &Path, exec_id: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(SHIM);
    cmd.arg("vm-relay")
        .arg("--vsock")
        .arg(sock)
        .args(["--container", "c1", &format!("--exec-id={exec_id}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn finish(child: tokio::process::Child) -> std::process::Output {
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the relay did not exit")
        .unwrap()
}

#[tokio::test]
async fn output_keeps_its_order_and_the_exit_code_passes_through() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vsock");
    serve(&sock);
    // stdout and stderr into one pipe, as `2>&1`: the order across both must hold.
    let (r, w) = std::io::pipe().unwrap();
    let mut cmd = relay(&sock, "order");
    cmd.stdout(w.try_clone().unwrap()).stderr(w);
    let child = cmd.spawn().unwrap();
    drop(cmd);
    let status = tokio::time::timeout(Duration::from_secs(30), async {
        let mut child = child;
        child.wait().await.unwrap()
    })
    .await
    .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut { r }, &mut text).unwrap();
    assert_eq!(text, "one\ntwo\nthree\nfour\n");
    assert_eq!(status.code(), Some(3));
}

#[tokio::test]
async fn stdin_is_relayed_and_eof_closes_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vsock");
    serve(&sock);
    let mut child = relay(&sock, "echo").stdin(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello ").await.unwrap();
    stdin.write_all(b"world").await.unwrap();
    drop(stdin);
    let output = finish(child).await;
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hello world<eof>");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
}

#[tokio::test]
async fn a_signal_reaches_the_guest_and_the_relay_dies_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vsock");
    serve(&sock);
    let mut child = relay(&sock, "signal").spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line, "ready\n");
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let output = finish(child).await;
    // As runc's process would have: killed by SIGTERM (the shim records 143).
    assert_eq!(output.status.signal(), Some(libc::SIGTERM), "{output:?}");
}

#[tokio::test]
async fn exit_status_137_is_death_by_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vsock");
    serve(&sock);
    let output = finish(relay(&sock, "killed").spawn().unwrap()).await;
    assert_eq!(output.status.signal(), Some(libc::SIGKILL), "{output:?}");
}

#[tokio::test]
async fn a_broken_stream_exits_255_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vsock");
    serve(&sock);
    let output = finish(relay(&sock, "break").spawn().unwrap()).await;
    assert_eq!(String::from_utf8_lossy(&output.stdout), "partial\n");
    assert_eq!(output.status.code(), Some(255), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("the vm is gone"), "{stderr}");
}

#[tokio::test]
async fn no_agent_exits_255() {
    let dir = tempfile::tempdir().unwrap();
    let output = finish(relay(&dir.path().join("absent"), "order").spawn().unwrap()).await;
    assert_eq!(output.status.code(), Some(255), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("dial vsock port 1024"));
}
