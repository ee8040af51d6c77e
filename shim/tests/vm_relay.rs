//! `berth-shim vm-relay` against an in-process fake agent behind the same `CONNECT`/`OK`
//! handshake vhost-device-vsock speaks. Each test names the guest process' behaviour through
//! its exec id.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use berth_proto::berth::agent::v1::agent_server::{Agent, AgentServer};
use berth_proto::berth::agent::v1::*;
use futures::Stream;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

const SHIM: &str = env!("CARGO_BIN_EXE_berth-shim");

#[derive(Debug)]
struct FakeAgent {
    /// (exec id, signal) of every Signal call.
    signals: broadcast::Sender<(String, u32)>,
}

fn out(o: io_output::Output) -> Result<IoOutput, Status> {
    Ok(IoOutput { output: Some(o) })
}

type IoStream = Pin<Box<dyn Stream<Item = Result<IoOutput, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for FakeAgent {
    async fn ping(&self, _: Request<PingRequest>) -> Result<Response<PingResponse>, Status> {
        Ok(Response::new(PingResponse::default()))
    }
    async fn setup_network(
        &self,
        _: Request<SetupNetworkRequest>,
    ) -> Result<Response<Empty>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn create_container(
        &self,
        _: Request<CreateContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn start(&self, _: Request<ProcessRef>) -> Result<Response<Empty>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn exec(&self, _: Request<ExecRequest>) -> Result<Response<Empty>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn signal(&self, req: Request<SignalRequest>) -> Result<Response<Empty>, Status> {
        let req = req.into_inner();
        let _ = self.signals.send((req.exec_id, req.signal));
        Ok(Response::new(Empty {}))
    }
    async fn wait(&self, _: Request<ProcessRef>) -> Result<Response<WaitResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    type IoStream = IoStream;
    async fn io(
        &self,
        req: Request<Streaming<IoInput>>,
    ) -> Result<Response<Self::IoStream>, Status> {
        let mut input = req.into_inner();
        let open = match input.message().await? {
            Some(IoInput {
                input: Some(io_input::Input::Open(p)),
            }) => p,
            other => return Err(Status::invalid_argument(format!("first {other:?}"))),
        };
        let (tx, rx) = mpsc::channel(16);
        let mut signals = self.signals.subscribe();
        tokio::spawn(async move {
            use io_output::Output::*;
            match open.exec_id.as_str() {
                "order" => {
                    for o in [
                        Stdout(b"one\n".to_vec()),
                        Stderr(b"two\n".to_vec()),
                        Stdout(b"three\n".to_vec()),
                        Stderr(b"four\n".to_vec()),
                        ExitStatus(3),
                    ] {
                        let _ = tx.send(out(o)).await;
                    }
                }
                "echo" => {
                    while let Ok(Some(msg)) = input.message().await {
                        match msg.input {
                            Some(io_input::Input::Stdin(b)) => {
                                let _ = tx.send(out(Stdout(b))).await;
                            }
                            Some(io_input::Input::CloseStdin(_)) => {
                                let _ = tx.send(out(Stdout(b"<eof>".to_vec()))).await;
                                let _ = tx.send(out(ExitStatus(0))).await;
                                return;
                            }
                            _ => {}
                        }
                    }
                }
                "signal" => {
                    let _ = tx.send(out(Stdout(b"ready\n".to_vec()))).await;
                    while let Ok((exec, sig)) = signals.recv().await {
                        if exec == "signal" {
                            let _ = tx.send(out(ExitStatus(128 + sig))).await;
                            return;
                        }
                    }
                }
                "killed" => {
                    let _ = tx.send(out(ExitStatus(128 + 9))).await;
                }
                "break" => {
                    let _ = tx.send(out(Stdout(b"partial\n".to_vec()))).await;
                    let _ = tx.send(Err(Status::unavailable("the vm is gone"))).await;
                }
                _ => {
                    let _ = tx.send(Err(Status::not_found("no such process"))).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
    async fn pids(&self, _: Request<ContainerRef>) -> Result<Response<PidsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn stats(&self, _: Request<ContainerRef>) -> Result<Response<StatsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn delete_container(&self, _: Request<ContainerRef>) -> Result<Response<Empty>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn shutdown(&self, _: Request<Empty>) -> Result<Response<Empty>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// Serves the fake agent on `path` behind vhost-device-vsock's handshake (port 1024 only).
fn serve(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    let (tx, rx) = mpsc::channel::<std::io::Result<UnixStream>>(4);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while s.read_exact(&mut b).await.is_ok() && b[0] != b'\n' {
                    line.push(b[0]);
                }
                if line == b"CONNECT 1024" {
                    let _ = s.write_all(b"OK 7\n").await;
                    let _ = tx.send(Ok(s)).await;
                }
            });
        }
    });
    let (signals, _) = broadcast::channel(16);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServer::new(FakeAgent { signals }))
            .serve_with_incoming(ReceiverStream::new(rx)),
    );
}

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
