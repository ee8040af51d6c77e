//! `berth.shim.v1.Shim` over gRPC: a thin adapter from wire types to [`Shim`].

use std::pin::Pin;

use berth_core::{Error, Result};
use berth_proto::berth::shim::v1 as pb;
use berth_proto::berth::shim::v1::shim_server::ShimServer;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::convert;
use crate::logreader::ReadOptions;
use crate::task::{AttachOptions, CreateTask, ExecTask, Shim};
use crate::trace;

type Reply<T> = std::result::Result<Response<T>, Status>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send + 'static>>;

/// The gRPC service of one shim.
#[derive(Debug, Clone)]
pub struct ShimService {
    shim: Shim,
}

impl ShimService {
    /// Serves `shim`.
    pub fn new(shim: Shim) -> Self {
        Self { shim }
    }

    /// The tonic service.
    pub fn into_server(self) -> ShimServer<Self> {
        ShimServer::new(self)
    }
}

fn reply<T>(r: Result<T>) -> Reply<T> {
    r.map(Response::new).map_err(Into::into)
}

/// The span attribute naming an exec process (none for the init, whose exec id is empty).
fn exec_attr(exec_id: &str) -> Vec<(&'static str, String)> {
    if exec_id.is_empty() {
        Vec::new()
    } else {
        vec![("berth.exec.id", exec_id.to_string())]
    }
}

#[tonic::async_trait]
impl pb::shim_server::Shim for ShimService {
    async fn create(&self, req: Request<pb::CreateRequest>) -> Reply<pb::CreateResponse> {
        let (metadata, _, req) = req.into_parts();
        trace::serve(&metadata, "Create", vec![], async {
            let task = CreateTask::try_from(req)?;
            let created = self.shim.create(task).await;
            crate::memory::trim_soon();
            reply(created.map(|pid| pb::CreateResponse { pid }))
        })
        .await
    }

    async fn start(&self, req: Request<pb::StartRequest>) -> Reply<pb::StartResponse> {
        let (metadata, _, req) = req.into_parts();
        trace::serve(&metadata, "Start", exec_attr(&req.exec_id), async {
            let started = self.shim.start(&req.exec_id).await;
            // The container (or exec) runs now and the shim goes quiet: shrink it soon.
            crate::memory::trim_soon();
            reply(started.map(|pid| pb::StartResponse { pid }))
        })
        .await
    }

    async fn state(&self, req: Request<pb::StateRequest>) -> Reply<pb::StateResponse> {
        reply(self.shim.state(&req.into_inner().exec_id).map(Into::into))
    }

    async fn kill(&self, req: Request<pb::KillRequest>) -> Reply<()> {
        let (metadata, _, req) = req.into_parts();
        let mut attributes = exec_attr(&req.exec_id);
        attributes.push(("berth.signal", req.signal.to_string()));
        trace::serve(&metadata, "Kill", attributes, async {
            reply(self.shim.kill(&req.exec_id, req.signal, req.all).await)
        })
        .await
    }

    async fn wait(&self, req: Request<pb::WaitRequest>) -> Reply<pb::WaitResponse> {
        let (metadata, _, req) = req.into_parts();
        trace::serve(&metadata, "Wait", exec_attr(&req.exec_id), async {
            reply(self.shim.wait(&req.exec_id).await.map(Into::into))
        })
        .await
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Reply<pb::DeleteResponse> {
        let (metadata, _, req) = req.into_parts();
        trace::serve(&metadata, "Delete", exec_attr(&req.exec_id), async {
            reply(
                self.shim
                    .delete(&req.exec_id, req.force)
                    .await
                    .map(Into::into),
            )
        })
        .await
    }

    async fn exec(&self, req: Request<pb::ExecRequest>) -> Reply<()> {
        let (metadata, _, req) = req.into_parts();
        trace::serve(&metadata, "Exec", exec_attr(&req.exec_id), async {
            let task = ExecTask::try_from(req)?;
            reply(self.shim.exec(task).await)
        })
        .await
    }

    async fn resize_pty(&self, req: Request<pb::ResizePtyRequest>) -> Reply<()> {
        let req = req.into_inner();
        let size = req
            .size
            .ok_or_else(|| Error::invalid_argument("size is required"))?;
        let (w, h) = convert::terminal_size(&size)?;
        reply(self.shim.resize_pty(&req.exec_id, w, h))
    }

    async fn close_io(&self, req: Request<pb::CloseIoRequest>) -> Reply<()> {
        let req = req.into_inner();
        reply(self.shim.close_io(&req.exec_id, req.stdin).await)
    }

    type AttachStream = BoxStream<pb::AttachResponse>;

    async fn attach(
        &self,
        req: Request<Streaming<pb::AttachRequest>>,
    ) -> Reply<Self::AttachStream> {
        let mut incoming = req.into_inner();
        let first = incoming.message().await?.ok_or_else(|| {
            Error::invalid_argument("attach: the stream ended before its options")
        })?;
        let Some(pb::attach_request::Event::Options(options)) = first.event else {
            return Err(
                Error::invalid_argument("attach: the first message must be options").into(),
            );
        };
        let mut attachment = self.shim.attach(AttachOptions::from(options))?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let ready = pb::AttachResponse {
            event: Some(pb::attach_response::Event::Ready(pb::AttachReady {
                terminal: attachment.terminal,
            })),
        };
        let _ = tx.send(Ok(ready)).await;
        let input = attachment.input.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = incoming.message().await {
                match convert::attach_input(msg) {
                    Ok(Some(i)) => {
                        if let Err(err) = input.send(i).await {
                            tracing::debug!(error = %err.chain(), "attach input");
                        }
                    }
                    Ok(None) => {}
                    Err(err) => tracing::debug!(error = %err.chain(), "attach input"),
                }
            }
        });
        tokio::spawn(async move {
            while let Some(event) = attachment.events.recv().await {
                if tx.send(Ok(event.into())).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type LogsStream = BoxStream<pb::LogsResponse>;

    async fn logs(&self, req: Request<pb::LogsRequest>) -> Reply<Self::LogsStream> {
        let opts = ReadOptions::try_from(req.into_inner())?;
        let mut batches = self.shim.logs(opts)?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            while let Some(batch) = batches.recv().await {
                let msg = batch
                    .map(|entries| pb::LogsResponse {
                        entries: entries.into_iter().map(Into::into).collect(),
                    })
                    .map_err(Status::from);
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn pids(&self, _req: Request<pb::PidsRequest>) -> Reply<pb::PidsResponse> {
        reply(self.shim.pids().await.map(|pids| {
            pb::PidsResponse {
                processes: pids
                    .into_iter()
                    .map(|(pid, exec_id)| pb::ProcessInfo { pid, exec_id })
                    .collect(),
            }
        }))
    }

    async fn pause(&self, _req: Request<pb::PauseRequest>) -> Reply<()> {
        reply(self.shim.pause().await)
    }

    async fn resume(&self, _req: Request<pb::ResumeRequest>) -> Reply<()> {
        reply(self.shim.resume().await)
    }

    async fn update(&self, req: Request<pb::UpdateRequest>) -> Reply<()> {
        reply(self.shim.update(&req.into_inner().resources).await)
    }

    async fn stats(&self, _req: Request<pb::StatsRequest>) -> Reply<pb::StatsResponse> {
        reply(self.shim.stats().await.map(|s| pb::StatsResponse {
            stats: Some(s.into()),
        }))
    }

    async fn info(&self, _req: Request<pb::InfoRequest>) -> Reply<pb::InfoResponse> {
        reply(Ok(self.shim.info().into()))
    }

    async fn shutdown(&self, req: Request<pb::ShutdownRequest>) -> Reply<()> {
        reply(self.shim.shutdown(req.into_inner().now).await)
    }

    async fn reopen_log(&self, _req: Request<pb::ReopenLogRequest>) -> Reply<()> {
        reply(self.shim.reopen_log().await)
    }

    async fn health(&self, _req: Request<pb::HealthRequest>) -> Reply<pb::HealthResponse> {
        reply(self.shim.health().map(|h| pb::HealthResponse {
            health: Some((&h).into()),
        }))
    }
}
