//! The gRPC adapters: `berth.engine.v1` Containers, Tasks, Volumes, Sandboxes and `berth.events.v1`
//! Events. Thin: unwrap the request, call the engine, map errors.

use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use berth_core::{Error, Result};
use berth_proto::berth::engine::v1::{
    self as pb, containers_server, sandboxes_server, tasks_server, volumes_server,
};
use berth_proto::berth::events::v1::{self as evpb, events_server};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{AttachInput, DEFAULT_NAMESPACE, Engine};
use crate::events::EventFilter;
use crate::filters::Args;

type Rsp<T> = std::result::Result<Response<T>, Status>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send + 'static>>;

/// The `berth-namespace` of a call (`default` when absent).
pub fn namespace<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("berth-namespace")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
        .to_string()
}

fn status(e: Error) -> Status {
    e.into()
}

fn to_status_stream<T: Send + 'static>(
    engine: &Engine,
    s: crate::deps::BoxStream<T>,
) -> BoxStream<T> {
    until_shutdown(engine, s.map(|r| r.map_err(status)))
}

/// Ends a response stream when the engine shuts down, so that long-lived streams (events,
/// waits, attaches, followed logs) never hold up a graceful shutdown.
fn until_shutdown<T: Send + 'static>(
    engine: &Engine,
    s: impl Stream<Item = std::result::Result<T, Status>> + Send + 'static,
) -> BoxStream<T> {
    Box::pin(s.take_until(engine.shutdown.clone().cancelled_owned()))
}

/// Containers.
#[derive(Debug, Clone)]
pub struct Containers(pub Arc<Engine>);
/// Tasks.
#[derive(Debug, Clone)]
pub struct Tasks(pub Arc<Engine>);
/// Volumes.
#[derive(Debug, Clone)]
pub struct Volumes(pub Arc<Engine>);
/// Events.
#[derive(Debug, Clone)]
pub struct Events(pub Arc<Engine>);

#[tonic::async_trait]
impl containers_server::Containers for Containers {
    async fn create(
        &self,
        req: Request<pb::CreateContainerRequest>,
    ) -> Rsp<pb::CreateContainerResponse> {
        let ns = namespace(&req);
        let (container, warnings) = self.0.create(req.into_inner(), &ns).await.map_err(status)?;
        Ok(Response::new(pb::CreateContainerResponse {
            container: Some(container),
            warnings,
        }))
    }

    async fn get(&self, req: Request<pb::GetContainerRequest>) -> Rsp<pb::GetContainerResponse> {
        let r = req.into_inner();
        let ctr = self.0.get(&r.id).map_err(status)?;
        Ok(Response::new(pb::GetContainerResponse {
            container: Some(self.0.describe(&ctr, r.size).await),
        }))
    }

    async fn list(
        &self,
        req: Request<pb::ListContainersRequest>,
    ) -> Rsp<pb::ListContainersResponse> {
        let containers = self.0.list(&req.into_inner()).await.map_err(status)?;
        Ok(Response::new(pb::ListContainersResponse { containers }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateContainerRequest>,
    ) -> Rsp<pb::UpdateContainerResponse> {
        let (container, warnings) = self.0.update(req.into_inner()).await.map_err(status)?;
        Ok(Response::new(pb::UpdateContainerResponse {
            container: Some(container),
            warnings,
        }))
    }

    async fn rename(&self, req: Request<pb::RenameContainerRequest>) -> Rsp<()> {
        let r = req.into_inner();
        self.0.rename(&r.id, &r.new_name).await.map_err(status)?;
        Ok(Response::new(()))
    }

    async fn delete(&self, req: Request<pb::DeleteContainerRequest>) -> Rsp<()> {
        let r = req.into_inner();
        if r.remove_link {
            self.0.remove_link(&r.id).await.map_err(status)?;
            return Ok(Response::new(()));
        }
        self.0
            .delete(&r.id, r.force, r.remove_volumes)
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn prune(
        &self,
        req: Request<pb::PruneContainersRequest>,
    ) -> Rsp<pb::PruneContainersResponse> {
        let (deleted, space_reclaimed) = self
            .0
            .prune(&req.into_inner().filters)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PruneContainersResponse {
            deleted,
            space_reclaimed,
        }))
    }

    async fn connect_network(
        &self,
        req: Request<pb::ConnectNetworkRequest>,
    ) -> Rsp<pb::ConnectNetworkResponse> {
        let r = req.into_inner();
        let endpoint = self
            .0
            .connect_network(&r.id, &r.network, r.endpoint.unwrap_or_default())
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ConnectNetworkResponse { endpoint }))
    }

    async fn disconnect_network(&self, req: Request<pb::DisconnectNetworkRequest>) -> Rsp<()> {
        let r = req.into_inner();
        self.0
            .disconnect_network(&r.id, &r.network, r.force)
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn changes(&self, req: Request<pb::ChangesRequest>) -> Rsp<pb::ChangesResponse> {
        let changes = self.0.changes(&req.into_inner().id).await.map_err(status)?;
        Ok(Response::new(pb::ChangesResponse { changes }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitContainerRequest>,
    ) -> Rsp<pb::CommitContainerResponse> {
        // Run to the end even when the caller goes away, so a paused container is always
        // resumed and berth-images finishes or undoes what it started.
        let engine = self.0.clone();
        let req = req.into_inner();
        let image_id = tokio::spawn(async move { engine.commit(req).await })
            .await
            .map_err(|e| status(Error::internal("commit task").with_source(e)))?
            .map_err(status)?;
        Ok(Response::new(pb::CommitContainerResponse { image_id }))
    }

    type ExportStream = BoxStream<pb::ExportContainerResponse>;

    async fn export(&self, req: Request<pb::ExportContainerRequest>) -> Rsp<Self::ExportStream> {
        let s = self.0.export(&req.into_inner().id).await.map_err(status)?;
        Ok(Response::new(to_status_stream(&self.0, s)))
    }

    async fn archive_stat(
        &self,
        req: Request<pb::ArchiveStatRequest>,
    ) -> Rsp<pb::ArchiveStatResponse> {
        let r = req.into_inner();
        Ok(Response::new(
            self.0.archive_stat(&r.id, &r.path).await.map_err(status)?,
        ))
    }

    type ArchiveGetStream = BoxStream<pb::ArchiveGetResponse>;

    async fn archive_get(
        &self,
        req: Request<pb::ArchiveGetRequest>,
    ) -> Rsp<Self::ArchiveGetStream> {
        let r = req.into_inner();
        let s = self.0.archive_get(&r.id, &r.path).await.map_err(status)?;
        Ok(Response::new(to_status_stream(&self.0, s)))
    }

    async fn archive_put(&self, req: Request<Streaming<pb::ArchivePutRequest>>) -> Rsp<()> {
        use pb::archive_put_request::Part;
        let mut stream = req.into_inner();
        let opts = match stream.next().await {
            Some(Ok(pb::ArchivePutRequest {
                part: Some(Part::Options(o)),
            })) => o,
            Some(Err(s)) => return Err(s),
            _ => {
                return Err(Status::invalid_argument(
                    "the first archive message must carry options",
                ));
            }
        };
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                if let Some(Part::Data(d)) = msg.part
                    && tx.send(d).await.is_err()
                {
                    return;
                }
            }
        });
        self.0.archive_put(opts, rx).await.map_err(status)?;
        Ok(Response::new(()))
    }
}

/// Reads the client's side of an attach or exec into engine inputs.
fn forward_input<T, F>(mut stream: Streaming<T>, map: F) -> mpsc::Receiver<AttachInput>
where
    T: Send + 'static,
    F: Fn(T) -> Option<AttachInput> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(32);
    tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            if let Some(input) = map(msg)
                && tx.send(input).await.is_err()
            {
                return;
            }
        }
    });
    rx
}

#[tonic::async_trait]
impl tasks_server::Tasks for Tasks {
    async fn start(&self, req: Request<pb::StartTaskRequest>) -> Rsp<pb::StartTaskResponse> {
        let (pid, already_running) = self.0.start(&req.into_inner().id).await.map_err(status)?;
        Ok(Response::new(pb::StartTaskResponse {
            pid: pid as i32,
            already_running,
        }))
    }

    async fn stop(&self, req: Request<pb::StopTaskRequest>) -> Rsp<pb::StopTaskResponse> {
        let r = req.into_inner();
        let already_stopped = self
            .0
            .stop(&r.id, &r.signal, r.timeout_seconds)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::StopTaskResponse { already_stopped }))
    }

    async fn kill(&self, req: Request<pb::KillTaskRequest>) -> Rsp<()> {
        let r = req.into_inner();
        self.0.kill(&r.id, &r.signal).await.map_err(status)?;
        Ok(Response::new(()))
    }

    async fn restart(&self, req: Request<pb::RestartTaskRequest>) -> Rsp<()> {
        let r = req.into_inner();
        self.0
            .restart(&r.id, &r.signal, r.timeout_seconds)
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn pause(&self, req: Request<pb::PauseTaskRequest>) -> Rsp<()> {
        self.0.pause(&req.into_inner().id).await.map_err(status)?;
        Ok(Response::new(()))
    }

    async fn resume(&self, req: Request<pb::ResumeTaskRequest>) -> Rsp<()> {
        self.0.resume(&req.into_inner().id).await.map_err(status)?;
        Ok(Response::new(()))
    }

    type WaitStream = BoxStream<pb::WaitTaskResponse>;

    async fn wait(&self, req: Request<pb::WaitTaskRequest>) -> Rsp<Self::WaitStream> {
        use pb::wait_task_response::Event;
        let r = req.into_inner();
        let (id, fut) = self.0.wait(&r.id, r.condition()).map_err(status)?;
        let (tx, rx) = mpsc::channel(2);
        let _ = tx
            .send(Ok(pb::WaitTaskResponse {
                event: Some(Event::Registered(pb::WaitRegistered { container_id: id })),
            }))
            .await;
        tokio::spawn(async move {
            tokio::select! {
                (code, error, at) = fut => {
                    let _ = tx
                        .send(Ok(pb::WaitTaskResponse {
                            event: Some(Event::Exit(pb::WaitExit {
                                status_code: code,
                                error,
                                exited_at: at,
                            })),
                        }))
                        .await;
                }
                _ = tx.closed() => {}
            }
        });
        Ok(Response::new(until_shutdown(
            &self.0,
            ReceiverStream::new(rx),
        )))
    }

    type AttachStream = BoxStream<pb::AttachTaskResponse>;

    async fn attach(
        &self,
        req: Request<Streaming<pb::AttachTaskRequest>>,
    ) -> Rsp<Self::AttachStream> {
        use pb::attach_task_request::Event;
        let mut stream = req.into_inner();
        let opts = match stream.next().await {
            Some(Ok(pb::AttachTaskRequest {
                event: Some(Event::Options(o)),
            })) => o,
            Some(Err(s)) => return Err(s),
            _ => {
                return Err(Status::invalid_argument(
                    "the first attach message must carry options",
                ));
            }
        };
        let ctr = self.0.prepare_attach(&opts).map_err(status)?;
        let input = forward_input(stream, |m: pb::AttachTaskRequest| match m.event? {
            Event::Data(d) => Some(AttachInput::Data(d)),
            Event::Resize(s) => Some(AttachInput::Resize(s)),
            Event::CloseStdin(_) => Some(AttachInput::CloseStdin),
            Event::Options(_) => None,
        });
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(self.0.clone().run_attach(ctr, opts, input, tx));
        Ok(Response::new(until_shutdown(
            &self.0,
            ReceiverStream::new(rx),
        )))
    }

    type LogsStream = BoxStream<pb::LogsResponse>;

    async fn logs(&self, req: Request<pb::LogsRequest>) -> Rsp<Self::LogsStream> {
        let s = self.0.logs(req.into_inner()).await.map_err(status)?;
        Ok(Response::new(to_status_stream(&self.0, s)))
    }

    type StatsStream = BoxStream<pb::StatsResponse>;

    async fn stats(&self, req: Request<pb::StatsRequest>) -> Rsp<Self::StatsStream> {
        let r = req.into_inner();
        let s = self
            .0
            .stats(&r.id, r.stream, r.one_shot)
            .await
            .map_err(status)?;
        Ok(Response::new(to_status_stream(&self.0, s)))
    }

    async fn top(&self, req: Request<pb::TopRequest>) -> Rsp<pb::TopResponse> {
        let r = req.into_inner();
        Ok(Response::new(
            self.0.top(&r.id, &r.ps_args).await.map_err(status)?,
        ))
    }

    async fn resize_pty(&self, req: Request<pb::ResizePtyRequest>) -> Rsp<()> {
        let r = req.into_inner();
        let size = r
            .size
            .ok_or_else(|| Status::invalid_argument("size is required"))?;
        self.0.resize(&r.id, size).await.map_err(status)?;
        Ok(Response::new(()))
    }

    async fn exec_create(
        &self,
        req: Request<pb::ExecCreateRequest>,
    ) -> Rsp<pb::ExecCreateResponse> {
        let exec_id = self.0.exec_create(req.into_inner()).map_err(status)?;
        Ok(Response::new(pb::ExecCreateResponse { exec_id }))
    }

    type ExecStartStream = BoxStream<pb::ExecStartResponse>;

    async fn exec_start(
        &self,
        req: Request<Streaming<pb::ExecStartRequest>>,
    ) -> Rsp<Self::ExecStartStream> {
        use pb::exec_start_request::Event;
        let mut stream = req.into_inner();
        let opts = match stream.next().await {
            Some(Ok(pb::ExecStartRequest {
                event: Some(Event::Options(o)),
            })) => o,
            Some(Err(s)) => return Err(s),
            _ => {
                return Err(Status::invalid_argument(
                    "the first exec start message must carry options",
                ));
            }
        };
        let (inst, ctr) = self.0.prepare_exec_start(&opts).map_err(status)?;
        let input = forward_input(stream, |m: pb::ExecStartRequest| match m.event? {
            Event::Data(d) => Some(AttachInput::Data(d)),
            Event::Resize(s) => Some(AttachInput::Resize(s)),
            Event::CloseStdin(_) => Some(AttachInput::CloseStdin),
            Event::Options(_) => None,
        });
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(self.0.clone().run_exec(inst, ctr, opts, input, tx));
        Ok(Response::new(until_shutdown(
            &self.0,
            ReceiverStream::new(rx),
        )))
    }

    async fn exec_resize(&self, req: Request<pb::ExecResizeRequest>) -> Rsp<()> {
        let r = req.into_inner();
        let size = r
            .size
            .ok_or_else(|| Status::invalid_argument("size is required"))?;
        self.0.exec_resize(&r.exec_id, size).await.map_err(status)?;
        Ok(Response::new(()))
    }

    async fn exec_inspect(
        &self,
        req: Request<pb::ExecInspectRequest>,
    ) -> Rsp<pb::ExecInspectResponse> {
        Ok(Response::new(
            self.0
                .exec_inspect(&req.into_inner().exec_id)
                .map_err(status)?,
        ))
    }

    async fn reopen_log(&self, req: Request<pb::ReopenLogRequest>) -> Rsp<()> {
        self.0
            .reopen_log(&req.into_inner().id)
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }
}

impl Volumes {
    fn usage(&self, name: &str) -> (i64, i64) {
        (
            self.0.volumes.size(name),
            self.0.volume_users(name).len() as i64,
        )
    }
}

#[tonic::async_trait]
impl volumes_server::Volumes for Volumes {
    async fn create(&self, req: Request<pb::CreateVolumeRequest>) -> Rsp<pb::CreateVolumeResponse> {
        let r = req.into_inner();
        let (rec, _) = self
            .0
            .volumes
            .create(
                Some(r.name.as_str()).filter(|n| !n.is_empty()),
                &r.driver,
                r.driver_opts.into_iter().collect(),
                r.labels.into_iter().collect(),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(self.0.volumes.to_proto(&rec, None)),
        }))
    }

    async fn get(&self, req: Request<pb::GetVolumeRequest>) -> Rsp<pb::GetVolumeResponse> {
        let r = req.into_inner();
        let rec = self.0.volumes.get(&r.name).map_err(status)?;
        let usage = r.usage.then(|| self.usage(&rec.name));
        Ok(Response::new(pb::GetVolumeResponse {
            volume: Some(self.0.volumes.to_proto(&rec, usage)),
        }))
    }

    async fn list(&self, req: Request<pb::ListVolumesRequest>) -> Rsp<pb::ListVolumesResponse> {
        let r = req.into_inner();
        let args = Args::parse(&r.filters, crate::volumes::LIST_KEYS).map_err(status)?;
        let mut volumes = Vec::new();
        for rec in self.0.volumes.all() {
            let in_use = !self.0.volume_users(&rec.name).is_empty();
            if crate::volumes::list_matches(&args, &rec, in_use).map_err(status)? {
                let usage = r.usage.then(|| self.usage(&rec.name));
                volumes.push(self.0.volumes.to_proto(&rec, usage));
            }
        }
        Ok(Response::new(pb::ListVolumesResponse {
            volumes,
            warnings: Vec::new(),
        }))
    }

    async fn delete(&self, req: Request<pb::DeleteVolumeRequest>) -> Rsp<()> {
        let r = req.into_inner();
        match self.0.volumes.get(&r.name) {
            Err(e) if r.force && e.is(berth_core::ErrorKind::NotFound) => {
                return Ok(Response::new(()));
            }
            Err(e) => return Err(status(e)),
            Ok(_) => {}
        }
        let users = self.0.volume_users(&r.name);
        self.0
            .volumes
            .remove(&r.name, &users)
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn prune(&self, req: Request<pb::PruneVolumesRequest>) -> Rsp<pb::PruneVolumesResponse> {
        let args =
            Args::parse(&req.into_inner().filters, crate::volumes::PRUNE_KEYS).map_err(status)?;
        let mut deleted = Vec::new();
        let mut space_reclaimed = 0u64;
        for rec in self.0.volumes.all() {
            if !self.0.volume_users(&rec.name).is_empty() {
                continue;
            }
            if !crate::volumes::prune_matches(&args, &rec).map_err(status)? {
                continue;
            }
            let size = self.0.volumes.size(&rec.name);
            if self.0.volumes.remove(&rec.name, &[]).await.is_ok() {
                deleted.push(rec.name.clone());
                space_reclaimed += size.max(0) as u64;
            }
        }
        Ok(Response::new(pb::PruneVolumesResponse {
            deleted,
            space_reclaimed,
        }))
    }
}

#[tonic::async_trait]
impl events_server::Events for Events {
    async fn publish(&self, req: Request<evpb::PublishRequest>) -> Rsp<()> {
        let ns = namespace(&req);
        let env = req
            .into_inner()
            .envelope
            .ok_or_else(|| Status::invalid_argument("envelope is required"))?;
        self.0.publish(env, &ns);
        Ok(Response::new(()))
    }

    type SubscribeStream = BoxStream<evpb::SubscribeResponse>;

    async fn subscribe(&self, req: Request<evpb::SubscribeRequest>) -> Rsp<Self::SubscribeStream> {
        let ns = namespace(&req);
        let r = req.into_inner();
        let filter = EventFilter::new(&r.filters, &ns).map_err(status)?;
        let time = |t: Option<berth_proto::prost_types::Timestamp>| -> Result<Option<SystemTime>> {
            t.map(|t| {
                SystemTime::try_from(t)
                    .map_err(|e| Error::invalid_argument("invalid timestamp").with_source(e))
            })
            .transpose()
        };
        let since = time(r.since).map_err(status)?;
        let until = time(r.until).map_err(status)?;
        if let (Some(s), Some(u)) = (since, until)
            && s > u
        {
            return Err(Status::invalid_argument("since must be before until"));
        }
        let mut sub = self.0.hub.subscribe(filter, since, until);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = sub.next() => match ev {
                        Some(ev) => {
                            if tx
                                .send(Ok(evpb::SubscribeResponse {
                                    envelope: Some((*ev).clone()),
                                }))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        None => return,
                    },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(until_shutdown(
            &self.0,
            ReceiverStream::new(rx),
        )))
    }
}

/// Sandboxes.
#[derive(Debug, Clone)]
pub struct Sandboxes(pub Arc<Engine>);

#[tonic::async_trait]
impl sandboxes_server::Sandboxes for Sandboxes {
    async fn run(&self, req: Request<pb::RunSandboxRequest>) -> Rsp<pb::RunSandboxResponse> {
        let ns = namespace(&req);
        let sandbox = self
            .0
            .run_sandbox(req.into_inner(), &ns)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::RunSandboxResponse {
            sandbox: Some(sandbox),
        }))
    }

    async fn stop(&self, req: Request<pb::StopSandboxRequest>) -> Rsp<()> {
        self.0
            .stop_sandbox(&req.into_inner().id)
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn remove(&self, req: Request<pb::RemoveSandboxRequest>) -> Rsp<()> {
        self.0
            .remove_sandbox(&req.into_inner().id)
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn get(&self, req: Request<pb::GetSandboxRequest>) -> Rsp<pb::GetSandboxResponse> {
        let r = req.into_inner();
        let (sandbox, info) = self.0.get_sandbox(&r.id, r.verbose).map_err(status)?;
        Ok(Response::new(pb::GetSandboxResponse {
            sandbox: Some(sandbox),
            info,
        }))
    }

    async fn list(&self, req: Request<pb::ListSandboxesRequest>) -> Rsp<pb::ListSandboxesResponse> {
        let sandboxes = self
            .0
            .list_sandboxes(&req.into_inner().filters)
            .map_err(status)?;
        Ok(Response::new(pb::ListSandboxesResponse { sandboxes }))
    }
}
