//! What the streaming server runs sessions on: berth-engine's exec and attach.

use std::time::Duration;

use berth_core::uds::{Channel, channel};
use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::engine::v1::containers_client::ContainersClient;
use berth_proto::berth::engine::v1::tasks_client::TasksClient;
use berth_proto::berth::types::v1 as types;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::backend::Fut;

/// What the client sends into a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Stdin(Bytes),
    /// The client's stdin ended.
    CloseStdin,
    Resize {
        width: u16,
        height: u16,
    },
}

/// What the session sends to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
}

/// A process to run in a container.
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    pub container_id: String,
    pub cmd: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// How an exec ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    /// Did not run (the message says why).
    Failed(String),
}

/// Runs exec and attach sessions. A session ends when the process's output ends; `input`
/// ending (the client went away) closes the process's stdin.
pub trait SessionBackend: Send + Sync + 'static {
    /// The full id of container `id` (an id, id prefix or name); `NotFound` when there is
    /// none, `FailedPrecondition` when it is not running.
    fn running(&self, id: &str) -> Fut<'_, String>;
    /// Runs `spec`; its exit.
    fn exec(
        &self,
        spec: ExecSpec,
        input: mpsc::Receiver<Input>,
        output: mpsc::Sender<Output>,
    ) -> Fut<'_, Exit>;
    /// Attaches to the main process of `spec.container_id` (`spec.cmd` unused) until its output
    /// ends.
    fn attach(
        &self,
        spec: ExecSpec,
        input: mpsc::Receiver<Input>,
        output: mpsc::Sender<Output>,
    ) -> Fut<'_, ()>;
    /// Runs `spec` without stdin, collecting its output; past `timeout` the process is killed
    /// and the answer is `DeadlineExceeded`.
    fn exec_sync(
        &self,
        spec: ExecSpec,
        timeout: Option<Duration>,
    ) -> Fut<'_, (Vec<u8>, Vec<u8>, i32)>;
}

/// [`SessionBackend`] over berth-engine's Tasks service.
#[derive(Debug, Clone)]
pub struct EngineSessions {
    tasks: TasksClient<Channel>,
    containers: ContainersClient<Channel>,
}

impl EngineSessions {
    /// Sessions on the engine listening on `socket`.
    pub fn new(socket: &std::path::Path) -> Self {
        Self {
            tasks: TasksClient::new(channel(socket)),
            containers: ContainersClient::new(channel(socket)),
        }
    }

    async fn start(
        &self,
        spec: &ExecSpec,
        input: mpsc::Receiver<Input>,
    ) -> Result<(String, tonic::Streaming<engine::ExecStartResponse>)> {
        let mut tasks = self.tasks.clone();
        let exec_id = tasks
            .exec_create(engine::ExecCreateRequest {
                id: spec.container_id.clone(),
                cmd: spec.cmd.clone(),
                tty: spec.tty,
                attach_stdin: spec.stdin,
                attach_stdout: spec.stdout,
                attach_stderr: spec.stderr,
                ..Default::default()
            })
            .await?
            .into_inner()
            .exec_id;
        use engine::exec_start_request::Event;
        let first = engine::ExecStartRequest {
            event: Some(Event::Options(engine::ExecStartOptions {
                exec_id: exec_id.clone(),
                ..Default::default()
            })),
        };
        let rest = tokio_stream::wrappers::ReceiverStream::new(input).map(|i| {
            let event = match i {
                Input::Stdin(b) => Event::Data(b.to_vec()),
                Input::CloseStdin => Event::CloseStdin(engine::CloseStdin {}),
                Input::Resize { width, height } => Event::Resize(types::TerminalSize {
                    width: width.into(),
                    height: height.into(),
                }),
            };
            engine::ExecStartRequest { event: Some(event) }
        });
        let stream = tasks
            .exec_start(futures::stream::iter([first]).chain(rest))
            .await?
            .into_inner();
        Ok((exec_id, stream))
    }

    /// Kills exec `exec_id`'s process, found by its host pid.
    async fn kill(&self, exec_id: &str) {
        let inspect = self
            .tasks
            .clone()
            .exec_inspect(engine::ExecInspectRequest {
                exec_id: exec_id.to_string(),
            })
            .await;
        if let Ok(i) = inspect {
            let i = i.into_inner();
            if i.running && i.pid > 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// The most ExecSync keeps of each of stdout and stderr: both together stay under the CRI's
/// 16 MiB message limit. The rest is dropped, as kubelet's own limit would.
const EXEC_SYNC_OUTPUT_LIMIT: usize = 8 << 20;

fn keep(buf: &mut Vec<u8>, data: &[u8]) {
    let room = EXEC_SYNC_OUTPUT_LIMIT.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

fn to_output(chunk: types::OutputChunk) -> Output {
    if chunk.stream == types::OutputStream::Stderr as i32 {
        Output::Stderr(chunk.data.into())
    } else {
        Output::Stdout(chunk.data.into())
    }
}

impl SessionBackend for EngineSessions {
    fn running(&self, id: &str) -> Fut<'_, String> {
        let id = id.to_string();
        Box::pin(async move {
            let c = self
                .containers
                .clone()
                .get(engine::GetContainerRequest {
                    id: id.clone(),
                    size: false,
                })
                .await?
                .into_inner()
                .container
                .ok_or_else(|| Error::not_found(format!("container {id:?} not found")))?;
            let status = c.state.map(|s| s.status).unwrap_or_default();
            if status != engine::ContainerStatus::Running as i32 {
                return Err(Error::failed_precondition(format!(
                    "container {id:?} is not running"
                )));
            }
            Ok(c.id)
        })
    }

    fn exec(
        &self,
        spec: ExecSpec,
        input: mpsc::Receiver<Input>,
        output: mpsc::Sender<Output>,
    ) -> Fut<'_, Exit> {
        Box::pin(async move {
            let (_, mut stream) = self.start(&spec, input).await?;
            use engine::exec_start_response::Event;
            while let Some(msg) = stream.next().await {
                match msg?.event {
                    Some(Event::Output(chunk)) => {
                        // A client that went away stops reading, not the process.
                        let _ = output.send(to_output(chunk)).await;
                    }
                    Some(Event::End(end)) => return Ok(Exit::Code(end.exit_code)),
                    Some(Event::Failed(f)) => return Ok(Exit::Failed(f.message)),
                    Some(Event::Started(_)) | None => {}
                }
            }
            Err(Error::unavailable(
                "berth-engine ended the exec without its exit status",
            ))
        })
    }

    fn attach(
        &self,
        spec: ExecSpec,
        input: mpsc::Receiver<Input>,
        output: mpsc::Sender<Output>,
    ) -> Fut<'_, ()> {
        Box::pin(async move {
            use engine::attach_task_request::Event;
            let first = engine::AttachTaskRequest {
                event: Some(Event::Options(engine::AttachOptions {
                    id: spec.container_id.clone(),
                    stdin: spec.stdin,
                    stdout: spec.stdout,
                    stderr: spec.stderr,
                    logs: false,
                    stream: true,
                    detach_keys: String::new(),
                })),
            };
            let rest = tokio_stream::wrappers::ReceiverStream::new(input).map(|i| {
                let event = match i {
                    Input::Stdin(b) => Event::Data(b.to_vec()),
                    Input::CloseStdin => Event::CloseStdin(engine::CloseStdin {}),
                    Input::Resize { width, height } => Event::Resize(types::TerminalSize {
                        width: width.into(),
                        height: height.into(),
                    }),
                };
                engine::AttachTaskRequest { event: Some(event) }
            });
            let mut stream = self
                .tasks
                .clone()
                .attach(futures::stream::iter([first]).chain(rest))
                .await?
                .into_inner();
            use engine::attach_task_response::Event as Ev;
            while let Some(msg) = stream.next().await {
                match msg?.event {
                    Some(Ev::Output(chunk)) => {
                        let _ = output.send(to_output(chunk)).await;
                    }
                    Some(Ev::End(_)) => return Ok(()),
                    Some(Ev::Ready(_)) | None => {}
                }
            }
            Ok(())
        })
    }

    fn exec_sync(
        &self,
        spec: ExecSpec,
        timeout: Option<Duration>,
    ) -> Fut<'_, (Vec<u8>, Vec<u8>, i32)> {
        Box::pin(async move {
            let spec = ExecSpec {
                stdin: false,
                stdout: true,
                stderr: true,
                tty: false,
                ..spec
            };
            let (_in_tx, in_rx) = mpsc::channel(1);
            let (exec_id, mut stream) = self.start(&spec, in_rx).await?;
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let collect = async {
                use engine::exec_start_response::Event;
                while let Some(msg) = stream.next().await {
                    match msg?.event {
                        Some(Event::Output(chunk)) => match to_output(chunk) {
                            Output::Stdout(b) => keep(&mut out, &b),
                            Output::Stderr(b) => keep(&mut err, &b),
                        },
                        Some(Event::End(end)) => return Ok(end.exit_code),
                        Some(Event::Failed(f)) => return Err(Error::internal(f.message)),
                        Some(Event::Started(_)) | None => {}
                    }
                }
                Err(Error::unavailable(
                    "berth-engine ended the exec without its exit status",
                ))
            };
            let code = match timeout {
                None => collect.await?,
                Some(t) => match tokio::time::timeout(t, collect).await {
                    Ok(code) => code?,
                    Err(_) => {
                        self.kill(&exec_id).await;
                        return Err(Error::new(
                            berth_core::ErrorKind::DeadlineExceeded,
                            format!(
                                "timeout {}s exceeded: command {:?} in container {} killed",
                                t.as_secs(),
                                spec.cmd,
                                spec.container_id
                            ),
                        ));
                    }
                },
            };
            Ok((out, err, code))
        })
    }
}
