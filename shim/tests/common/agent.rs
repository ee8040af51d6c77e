//! A fake berth-agent behind vhost-device-vsock's `CONNECT`/`OK` handshake, for the relay and
//! runtime tests. Each guest process behaves as its exec id says (see [`FakeAgent::io`]).
#![allow(dead_code)]

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use berth_proto::berth::agent::v1::agent_server::{Agent, AgentServer};
use berth_proto::berth::agent::v1::*;
use futures::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub const SHIM: &str = env!("CARGO_BIN_EXE_berth-shim");

/// What the fake was asked, in order ("create c1", "start c1/", "signal c1/ 15", …), and the
/// spec CreateContainer received.
#[derive(Debug, Default)]
pub struct Calls {
    pub log: Mutex<Vec<String>>,
    pub spec: Mutex<Option<serde_json::Value>>,
    pub hostname: Mutex<String>,
}

impl Calls {
    fn push(&self, s: String) {
        self.log.lock().unwrap().push(s);
    }
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

#[derive(Debug)]
struct FakeAgent {
    /// (exec id, signal) of every Signal call.
    signals: broadcast::Sender<(String, u32)>,
    /// Exec ids started so far.
    started: watch::Sender<Vec<String>>,
    calls: Arc<Calls>,
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
        req: Request<SetupNetworkRequest>,
    ) -> Result<Response<Empty>, Status> {
        let req = req.into_inner();
        *self.calls.hostname.lock().unwrap() = req.hostname.clone();
        self.calls
            .push(format!("network {} interfaces", req.interfaces.len()));
        Ok(Response::new(Empty {}))
    }
    async fn create_container(
        &self,
        req: Request<CreateContainerRequest>,
    ) -> Result<Response<Empty>, Status> {
        let req = req.into_inner();
        let spec = serde_json::from_slice(&req.spec)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        *self.calls.spec.lock().unwrap() = Some(spec);
        self.calls.push(format!("create {}", req.container_id));
        Ok(Response::new(Empty {}))
    }
    async fn start(&self, req: Request<ProcessRef>) -> Result<Response<Empty>, Status> {
        let req = req.into_inner();
        self.calls
            .push(format!("start {}/{}", req.container_id, req.exec_id));
        self.started.send_modify(|s| s.push(req.exec_id));
        Ok(Response::new(Empty {}))
    }
    async fn exec(&self, req: Request<ExecRequest>) -> Result<Response<Empty>, Status> {
        let req = req.into_inner();
        self.calls
            .push(format!("exec {}/{}", req.container_id, req.exec_id));
        Ok(Response::new(Empty {}))
    }
    async fn signal(&self, req: Request<SignalRequest>) -> Result<Response<Empty>, Status> {
        let req = req.into_inner();
        self.calls.push(format!(
            "signal {}/{} {}",
            req.container_id, req.exec_id, req.signal
        ));
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
        let mut started = self.started.subscribe();
        tokio::spawn(async move {
            use io_output::Output::*;
            let id = open.exec_id.clone();
            let start = async move {
                let _ = started.wait_for(|s| s.contains(&id)).await;
            };
            match open.exec_id.as_str() {
                // The container's init: runs once started, until signalled.
                "" => {
                    start.await;
                    let _ = tx.send(out(Stdout(b"started\n".to_vec()))).await;
                    while let Ok((exec, sig)) = signals.recv().await {
                        if exec.is_empty() {
                            let _ = tx.send(out(ExitStatus(128 + sig))).await;
                            return;
                        }
                    }
                }
                // The first exec: prints and exits 7 once started.
                "exec-0" => {
                    start.await;
                    let _ = tx.send(out(Stderr(b"exec ran\n".to_vec()))).await;
                    let _ = tx.send(out(ExitStatus(7))).await;
                }
                // The second exec, with a terminal: reports resizes, echoes its input, and
                // exits 9 on "bye".
                "exec-1" => {
                    while let Ok(Some(msg)) = input.message().await {
                        match msg.input {
                            Some(io_input::Input::Resize(w)) => {
                                let line = format!("resize {}x{}\n", w.width, w.height);
                                let _ = tx.send(out(Stdout(line.into_bytes()))).await;
                            }
                            Some(io_input::Input::Stdin(b)) => {
                                let bye = b.windows(3).any(|w| w == b"bye");
                                let _ = tx.send(out(Stdout(b))).await;
                                if bye {
                                    let _ = tx.send(out(ExitStatus(9))).await;
                                    return;
                                }
                            }
                            _ => {}
                        }
                    }
                }
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
    /// Fixed counters: 200 MiB limit, 5 MiB used (1 MiB inactive file), 1.5 s of CPU, 2 pids.
    async fn stats(&self, req: Request<ContainerRef>) -> Result<Response<StatsResponse>, Status> {
        self.calls
            .push(format!("stats {}", req.into_inner().container_id));
        Ok(Response::new(StatsResponse {
            memory_usage_bytes: 5 << 20,
            memory_limit_bytes: 200 << 20,
            cpu_usage_nanos: 1_500_000_000,
            pids: 2,
            guest_memory_total_bytes: 328 << 20,
            pids_limit: 0,
            memory_stat: [("inactive_file".to_string(), 1 << 20)].into(),
        }))
    }
    async fn delete_container(
        &self,
        req: Request<ContainerRef>,
    ) -> Result<Response<Empty>, Status> {
        self.calls
            .push(format!("delete {}", req.into_inner().container_id));
        Ok(Response::new(Empty {}))
    }
    async fn shutdown(&self, _: Request<Empty>) -> Result<Response<Empty>, Status> {
        self.calls.push("shutdown".into());
        Ok(Response::new(Empty {}))
    }
}

/// Serves the fake agent on `path` behind vhost-device-vsock's handshake (port 1024 only);
/// returns what it is asked.
pub fn serve(path: &Path) -> Arc<Calls> {
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
    let calls = Arc::new(Calls::default());
    let agent = FakeAgent {
        signals,
        started: watch::channel(Vec::new()).0,
        calls: calls.clone(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServer::new(agent))
            .serve_with_incoming(ReceiverStream::new(rx)),
    );
    calls
}
