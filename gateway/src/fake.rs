//! In-memory fakes of every backend, for route tests. They keep just enough state to answer like
//! the services (name and prefix resolution, running checks, conflicts) and record each call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use berth_core::id::{ObjectKind, resolve};
use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::events::v1 as events;
use berth_proto::berth::images::v1 as images;
use berth_proto::berth::network::v1 as network;
use berth_proto::berth::types::v1 as types;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::backend::{
    Backends, ByteStream, ContainersApi, EventsApi, Fut, ImagesApi, Input, LoginResult,
    NetworksApi, Stream, SystemApi, VolumesApi,
};
use crate::{AppState, DaemonInfo};

/// Shared fake state.
#[derive(Debug, Default)]
pub struct State {
    pub containers: Vec<engine::Container>,
    pub images: Vec<images::Image>,
    pub volumes: Vec<engine::Volume>,
    pub networks: Vec<network::Network>,
    pub events: Vec<events::Envelope>,
    /// Output an attach or exec start streams, then ends.
    pub output: Vec<types::OutputChunk>,
    pub logs: Vec<types::LogEntry>,
    pub exit_code: i64,
    pub uploads: Vec<u8>,
    /// Stdin received by attach/exec, and whether stdin was closed.
    pub stdin: Vec<u8>,
    pub stdin_closed: bool,
    /// Every call, as "method arg".
    pub calls: Vec<String>,
    pub last_create: Option<engine::CreateContainerRequest>,
    pub last_update: Option<engine::UpdateContainerRequest>,
    pub last_pull: Option<images::PullRequest>,
    pub last_subscribe: Option<events::SubscribeRequest>,
    pub last_logs: Option<engine::LogsRequest>,
    pub last_exec: Option<engine::ExecCreateRequest>,
    /// When set, a wait sends its exit only after this is notified.
    pub wait_gate: Option<Arc<tokio::sync::Notify>>,
    /// Attach behaves like `cat`: stdin comes back as stdout until stdin is closed.
    pub echo: bool,
}

/// Polls `f` for up to five seconds.
pub async fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if f() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}

/// One fake implementing every backend trait.
#[derive(Debug, Clone, Default)]
pub struct Fake(pub Arc<Mutex<State>>);

impl Fake {
    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    fn call(&self, what: impl Into<String>) {
        self.state().calls.push(what.into());
    }

    pub fn backends(&self) -> Backends {
        Backends {
            containers: Arc::new(self.clone()),
            images: Arc::new(self.clone()),
            volumes: Arc::new(self.clone()),
            networks: Arc::new(self.clone()),
            events: Arc::new(self.clone()),
            system: Arc::new(self.clone()),
        }
    }

    /// The full router over this fake.
    pub fn app(&self) -> axum::Router {
        crate::app(AppState::with_backends(
            self.backends(),
            DaemonInfo {
                root: "/var/lib/berth".into(),
                driver: "overlayfs".into(),
                default_runtime: "runc".into(),
                log_driver: "json-file".into(),
                id: "id".into(),
                ..Default::default()
            },
        ))
    }

    /// Sends one request through the versioned router.
    pub async fn request(&self, method: &str, uri: &str, body: impl Into<Body>) -> Reply {
        self.request_with(method, uri, HeaderMap::new(), body).await
    }

    pub async fn request_with(
        &self,
        method: &str,
        uri: &str,
        headers: HeaderMap,
        body: impl Into<Body>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in &headers {
            req = req.header(k, v);
        }
        let req = req.body(body.into()).unwrap();
        let resp = crate::versioned(self.app()).oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    /// Adds a container and returns its id.
    pub fn add_container(&self, name: &str, status: engine::ContainerStatus) -> String {
        let id = berth_core::Id::random().to_string();
        let mut c = crate::containers::render::tests::sample();
        c.id = id.clone();
        c.name = name.to_string();
        c.state.as_mut().unwrap().status = status as i32;
        self.state().containers.push(c);
        id
    }

    pub fn add_image(&self, reference: &str) -> String {
        let id = format!("sha256:{}", berth_core::Id::random());
        self.state().images.push(images::Image {
            id: id.clone(),
            repo_tags: vec![reference.to_string()],
            size: 1000,
            created: Some(crate::time::now()),
            config: br#"{"config":{"Cmd":["sh"],"Env":["PATH=/bin"]},"os":"linux"}"#.to_vec(),
            os: "linux".into(),
            architecture: "amd64".into(),
            diff_ids: vec![format!("sha256:{}", "c".repeat(64))],
            history: vec![
                images::HistoryEntry {
                    created_by: "ADD rootfs".into(),
                    size: 1000,
                    ..Default::default()
                },
                images::HistoryEntry {
                    created_by: "CMD [\"sh\"]".into(),
                    empty_layer: true,
                    ..Default::default()
                },
            ],
            ..Default::default()
        });
        id
    }

    fn find(&self, input: &str) -> Result<usize> {
        let st = self.state();
        let pairs: Vec<(&str, &str)> = st
            .containers
            .iter()
            .map(|c| (c.id.as_str(), c.name.as_str()))
            .collect();
        let id = resolve(ObjectKind("container"), input, pairs.iter().copied())?.to_string();
        Ok(st.containers.iter().position(|c| c.id == id).unwrap())
    }

    fn with<T>(
        &self,
        input: &str,
        f: impl FnOnce(&mut engine::Container) -> Result<T>,
    ) -> Result<T> {
        let idx = self.find(input)?;
        let mut st = self.state();
        f(&mut st.containers[idx])
    }

    fn find_image(&self, input: &str) -> Result<images::Image> {
        let st = self.state();
        let full = berth_core::Reference::parse(input)
            .map(|r| r.to_string())
            .unwrap_or_default();
        st.images
            .iter()
            .find(|i| {
                i.repo_tags.contains(&full)
                    || i.id == input
                    || i.id
                        .trim_start_matches("sha256:")
                        .starts_with(input.trim_start_matches("sha256:"))
            })
            .cloned()
            .ok_or_else(|| Error::not_found(format!("image {input} not found")))
    }
}

/// A response from the router.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The JSON lines of a streamed body.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn message(&self) -> String {
        self.json()["message"].as_str().unwrap_or("").to_string()
    }
}

fn ok<'a, T: Send + 'a>(v: T) -> Fut<'a, T> {
    Box::pin(async move { Ok(v) })
}

fn done<'a, T: Send + 'a>(r: Result<T>) -> Fut<'a, T> {
    Box::pin(async move { r })
}

fn status_of(c: &engine::Container) -> engine::ContainerStatus {
    c.state
        .as_ref()
        .map_or(engine::ContainerStatus::Created, |s| s.status())
}

fn set_status(c: &mut engine::Container, s: engine::ContainerStatus) {
    c.state.get_or_insert_with(Default::default).status = s as i32;
}

impl ContainersApi for Fake {
    fn create(
        &self,
        req: engine::CreateContainerRequest,
    ) -> Fut<'_, engine::CreateContainerResponse> {
        self.call(format!("create {}", req.name));
        let image = req
            .config
            .as_ref()
            .map(|c| c.image.clone())
            .unwrap_or_default();
        if self.find_image(&image).is_err() {
            return done(Err(Error::not_found(format!("image {image}: not found"))));
        }
        if !req.name.is_empty() && self.state().containers.iter().any(|c| c.name == req.name) {
            return done(Err(Error::already_exists(format!(
                "name {} is taken",
                req.name
            ))));
        }
        let id = berth_core::Id::random().to_string();
        let c = engine::Container {
            id: id.clone(),
            name: if req.name.is_empty() {
                "eager_fake".into()
            } else {
                req.name.clone()
            },
            image: image.clone(),
            config: req.config.clone(),
            host_config: req.host_config.clone(),
            extensions: req.extensions.clone(),
            state: Some(engine::ContainerState {
                status: engine::ContainerStatus::Created as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut st = self.state();
        st.last_create = Some(req);
        st.containers.push(c.clone());
        ok(engine::CreateContainerResponse {
            container: Some(c),
            warnings: Vec::new(),
        })
    }
    fn get(&self, req: engine::GetContainerRequest) -> Fut<'_, engine::Container> {
        done(self.with(&req.id, |c| Ok(c.clone())))
    }
    fn list(&self, req: engine::ListContainersRequest) -> Fut<'_, Vec<engine::Container>> {
        let st = self.state();
        let out = st
            .containers
            .iter()
            .filter(|c| req.all || crate::containers::render::is_running(c))
            .filter(|c| {
                req.filters.iter().all(|f| match f.key.as_str() {
                    "name" => c.name.contains(&f.value),
                    "ancestor" => c.image_id == f.value || c.image == f.value,
                    "status" => crate::containers::render::status_word(c) == f.value,
                    _ => true,
                })
            })
            .cloned()
            .collect();
        ok(out)
    }
    fn update(
        &self,
        req: engine::UpdateContainerRequest,
    ) -> Fut<'_, engine::UpdateContainerResponse> {
        let r = self.with(&req.id, |c| Ok(c.clone()));
        self.state().last_update = Some(req);
        done(r.map(|c| engine::UpdateContainerResponse {
            container: Some(c),
            warnings: vec![],
        }))
    }
    fn rename(&self, req: engine::RenameContainerRequest) -> Fut<'_, ()> {
        if self
            .state()
            .containers
            .iter()
            .any(|c| c.name == req.new_name)
        {
            return done(Err(Error::already_exists("name taken")));
        }
        done(self.with(&req.id, |c| {
            c.name = req.new_name.clone();
            Ok(())
        }))
    }
    fn delete(&self, req: engine::DeleteContainerRequest) -> Fut<'_, ()> {
        let r = self.with(&req.id, |c| {
            if crate::containers::render::is_running(c) && !req.force {
                return Err(Error::failed_precondition("container is running"));
            }
            Ok(c.id.clone())
        });
        done(r.map(|id| self.state().containers.retain(|c| c.id != id)))
    }
    fn prune(&self, _: engine::PruneContainersRequest) -> Fut<'_, engine::PruneContainersResponse> {
        let mut st = self.state();
        let (gone, keep): (Vec<_>, Vec<_>) = st
            .containers
            .drain(..)
            .partition(|c| !crate::containers::render::is_running(c));
        st.containers = keep;
        ok(engine::PruneContainersResponse {
            deleted: gone.into_iter().map(|c| c.id).collect(),
            space_reclaimed: 42,
        })
    }
    fn connect_network(
        &self,
        req: engine::ConnectNetworkRequest,
    ) -> Fut<'_, engine::ConnectNetworkResponse> {
        if !self
            .state()
            .networks
            .iter()
            .any(|n| n.name == req.network || n.id == req.network)
        {
            return done(Err(Error::not_found(format!(
                "network {} not found",
                req.network
            ))));
        }
        done(self.with(&req.id, |c| {
            c.networks.insert(
                req.network.clone(),
                req.endpoint.clone().unwrap_or_default(),
            );
            Ok(engine::ConnectNetworkResponse { endpoint: None })
        }))
    }
    fn disconnect_network(&self, req: engine::DisconnectNetworkRequest) -> Fut<'_, ()> {
        done(self.with(&req.id, |c| {
            c.networks
                .remove(&req.network)
                .map(|_| ())
                .ok_or_else(|| Error::not_found(format!("network {} not connected", req.network)))
        }))
    }
    fn changes(&self, req: engine::ChangesRequest) -> Fut<'_, Vec<engine::Change>> {
        done(self.with(&req.id, |_| {
            Ok(vec![
                engine::Change {
                    path: "/tmp/x".into(),
                    kind: engine::ChangeKind::Added as i32,
                },
                engine::Change {
                    path: "/etc".into(),
                    kind: engine::ChangeKind::Modified as i32,
                },
            ])
        }))
    }
    fn commit(&self, req: engine::CommitContainerRequest) -> Fut<'_, String> {
        let parent = match self.with(&req.id, |c| Ok(c.image_id.clone())) {
            Ok(p) => p,
            Err(e) => return done(Err(e)),
        };
        let mut st = self.state();
        st.calls.push(format!(
            "commit {} {} {} {}",
            req.id,
            req.reference,
            req.pause,
            String::from_utf8_lossy(&req.config)
        ));
        let base = st.images.iter().find(|i| i.id == parent).cloned();
        let id = format!("sha256:{}", berth_core::Id::random());
        let mut history = base.map(|b| b.history).unwrap_or_default();
        history.push(images::HistoryEntry {
            created_by: "sh".into(),
            comment: req.comment.clone(),
            size: 5,
            ..Default::default()
        });
        st.images.push(images::Image {
            id: id.clone(),
            repo_tags: (!req.reference.is_empty())
                .then(|| req.reference.clone())
                .into_iter()
                .collect(),
            parent,
            history,
            config: b"{}".to_vec(),
            ..Default::default()
        });
        done(Ok(id))
    }
    fn export(&self, req: engine::ExportContainerRequest) -> Fut<'_, ByteStream> {
        done(self.with(&req.id, |_| {
            Ok(futures::stream::iter([Ok(Bytes::from_static(b"tar-data"))]).boxed())
        }))
    }
    fn archive_stat(
        &self,
        req: engine::ArchiveStatRequest,
    ) -> Fut<'_, engine::ArchiveStatResponse> {
        done(self.with(&req.id, |_| {
            if req.path == "/missing" {
                return Err(Error::not_found(
                    "Could not find the file /missing in container",
                ));
            }
            Ok(engine::ArchiveStatResponse {
                name: "etc".into(),
                size: 4096,
                mode: 0o040755,
                mtime: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                }),
                link_target: String::new(),
            })
        }))
    }
    fn archive_get(
        &self,
        req: engine::ArchiveGetRequest,
    ) -> Fut<'_, (engine::ArchiveStatResponse, ByteStream)> {
        let stat = self.archive_stat(engine::ArchiveStatRequest {
            id: req.id.clone(),
            path: req.path.clone(),
        });
        Box::pin(async move {
            let stat = stat.await?;
            let data: ByteStream = futures::stream::iter([Ok(Bytes::from_static(b"tar"))]).boxed();
            Ok((stat, data))
        })
    }
    fn archive_put(&self, options: engine::ArchivePutOptions, data: Input<Bytes>) -> Fut<'_, ()> {
        Box::pin(async move {
            self.find(&options.id)?;
            let chunks: Vec<Bytes> = data.collect().await;
            let mut st = self.state();
            st.uploads = chunks.concat();
            st.calls.push(format!("archive_put {}", options.path));
            Ok(())
        })
    }
    fn start(&self, req: engine::StartTaskRequest) -> Fut<'_, engine::StartTaskResponse> {
        done(self.with(&req.id, |c| {
            let already = status_of(c) == engine::ContainerStatus::Running;
            set_status(c, engine::ContainerStatus::Running);
            Ok(engine::StartTaskResponse {
                pid: 1,
                already_running: already,
            })
        }))
    }
    fn stop(&self, req: engine::StopTaskRequest) -> Fut<'_, engine::StopTaskResponse> {
        self.call(format!(
            "stop {} {} {:?}",
            req.id, req.signal, req.timeout_seconds
        ));
        done(self.with(&req.id, |c| {
            let already = !crate::containers::render::is_running(c);
            set_status(c, engine::ContainerStatus::Exited);
            Ok(engine::StopTaskResponse {
                already_stopped: already,
            })
        }))
    }
    fn kill(&self, req: engine::KillTaskRequest) -> Fut<'_, ()> {
        self.call(format!("kill {} {}", req.id, req.signal));
        done(self.with(&req.id, |c| {
            if !crate::containers::render::is_running(c) {
                return Err(Error::failed_precondition("not running"));
            }
            set_status(c, engine::ContainerStatus::Exited);
            Ok(())
        }))
    }
    fn restart(&self, req: engine::RestartTaskRequest) -> Fut<'_, ()> {
        done(self.with(&req.id, |c| {
            set_status(c, engine::ContainerStatus::Running);
            Ok(())
        }))
    }
    fn pause(&self, req: engine::PauseTaskRequest) -> Fut<'_, ()> {
        done(self.with(&req.id, |c| {
            set_status(c, engine::ContainerStatus::Paused);
            Ok(())
        }))
    }
    fn resume(&self, req: engine::ResumeTaskRequest) -> Fut<'_, ()> {
        done(self.with(&req.id, |c| {
            set_status(c, engine::ContainerStatus::Running);
            Ok(())
        }))
    }
    fn wait(&self, req: engine::WaitTaskRequest) -> Fut<'_, Stream<engine::WaitTaskResponse>> {
        use engine::wait_task_response::Event;
        self.call(format!("wait {} {}", req.id, req.condition));
        let code = self.state().exit_code;
        let gate = self.state().wait_gate.clone();
        done(self.with(&req.id, |c| {
            let id = c.id.clone();
            let registered = futures::stream::iter([Ok(engine::WaitTaskResponse {
                event: Some(Event::Registered(engine::WaitRegistered {
                    container_id: id,
                })),
            })]);
            let exit = futures::stream::once(async move {
                if let Some(gate) = gate {
                    gate.notified().await;
                }
                Ok(engine::WaitTaskResponse {
                    event: Some(Event::Exit(engine::WaitExit {
                        status_code: code,
                        ..Default::default()
                    })),
                })
            });
            Ok(registered.chain(exit).boxed())
        }))
    }
    fn attach(
        &self,
        input: Input<engine::AttachTaskRequest>,
    ) -> Fut<'_, Stream<engine::AttachTaskResponse>> {
        use engine::attach_task_request::Event as In;
        use engine::attach_task_response::Event as Out;
        let this = self.clone();
        Box::pin(async move {
            let mut input = input;
            let Some(engine::AttachTaskRequest {
                event: Some(In::Options(opts)),
            }) = input.next().await
            else {
                return Err(Error::invalid_argument("options first"));
            };
            let (id, tty) = this.with(&opts.id, |c| {
                Ok((c.id.clone(), c.config.as_ref().is_some_and(|c| c.tty)))
            })?;
            let (output, echo) = {
                let st = this.state();
                (st.output.clone(), st.echo)
            };
            let (echo_tx, echo_rx) = tokio::sync::mpsc::channel::<types::OutputChunk>(16);
            // Drain stdin in the background, as the shim would.
            let sink = this.clone();
            // Without echo nothing is ever sent back: drop the sender now, so the output ends
            // with the canned chunks instead of waiting for the caller's input to close.
            let mut echo_tx = echo.then_some(echo_tx);
            tokio::spawn(async move {
                while let Some(m) = input.next().await {
                    match m.event {
                        Some(In::Data(d)) => {
                            sink.state().stdin.extend_from_slice(&d);
                            if let Some(tx) = echo_tx.as_ref().filter(|_| echo) {
                                let _ = tx
                                    .send(types::OutputChunk {
                                        stream: types::OutputStream::Stdout as i32,
                                        data: d,
                                    })
                                    .await;
                            }
                        }
                        Some(In::CloseStdin(_)) => {
                            sink.state().stdin_closed = true;
                            echo_tx = None;
                        }
                        _ => {}
                    }
                }
            });
            let out = |o| {
                Ok(engine::AttachTaskResponse {
                    event: Some(Out::Output(o)),
                })
            };
            let head = futures::stream::iter(
                std::iter::once(Ok(engine::AttachTaskResponse {
                    event: Some(Out::Ready(engine::AttachReady {
                        container_id: id,
                        tty,
                    })),
                }))
                .chain(output.into_iter().map(out)),
            );
            // Without echo the output ends on its own, like a process that ignores stdin.
            let echoed = if echo {
                tokio_stream::wrappers::ReceiverStream::new(echo_rx)
                    .map(out)
                    .boxed()
            } else {
                futures::stream::empty().boxed()
            };
            let end = futures::stream::iter([Ok(engine::AttachTaskResponse {
                event: Some(Out::End(engine::AttachEnd {
                    reason: engine::AttachEndReason::Exited as i32,
                })),
            })]);
            Ok(head.chain(echoed).chain(end).boxed())
        })
    }
    fn logs(&self, req: engine::LogsRequest) -> Fut<'_, Stream<engine::LogsResponse>> {
        let entries = self.state().logs.clone();
        let r = self.with(&req.id, |_| Ok(()));
        self.state().last_logs = Some(req);
        done(r.map(|()| {
            futures::stream::iter(
                entries
                    .chunks(2)
                    .map(|c| {
                        Ok(engine::LogsResponse {
                            entries: c.to_vec(),
                        })
                    })
                    .collect::<Vec<_>>(),
            )
            .boxed()
        }))
    }
    fn stats(&self, req: engine::StatsRequest) -> Fut<'_, Stream<engine::StatsResponse>> {
        done(self.with(&req.id, |c| {
            let sample = engine::ContainerStats {
                id: c.id.clone(),
                name: c.name.clone(),
                stats: Some(types::CgroupStats {
                    read: Some(crate::time::now()),
                    cgroup_version: types::CgroupVersion::V1 as i32,
                    cpu: Some(types::CpuStats {
                        usage: Some(types::CpuUsage {
                            total_ns: 2000,
                            per_cpu_ns: vec![1000, 1000],
                            ..Default::default()
                        }),
                        system_usage_ns: 100_000,
                        online_cpus: 2,
                        ..Default::default()
                    }),
                    memory: Some(types::MemoryStats {
                        usage: 4096,
                        max_usage: 8192,
                        limit: 1 << 30,
                        stats: HashMap::from([("cache".to_string(), 1024)]),
                        ..Default::default()
                    }),
                    pids: Some(types::PidsStats {
                        current: 3,
                        limit: 0,
                    }),
                    ..Default::default()
                }),
                precpu: Some(types::CpuStats {
                    usage: Some(types::CpuUsage {
                        total_ns: 1000,
                        ..Default::default()
                    }),
                    system_usage_ns: 50_000,
                    online_cpus: 2,
                    ..Default::default()
                }),
                ..Default::default()
            };
            let n = if req.stream { 3 } else { 1 };
            Ok(futures::stream::iter((0..n).map(move |_| {
                Ok(engine::StatsResponse {
                    stats: Some(sample.clone()),
                })
            }))
            .boxed())
        }))
    }
    fn top(&self, req: engine::TopRequest) -> Fut<'_, engine::TopResponse> {
        done(self.with(&req.id, |c| {
            if !crate::containers::render::is_running(c) {
                return Err(Error::failed_precondition(format!(
                    "container {} is not running",
                    c.id
                )));
            }
            Ok(engine::TopResponse {
                titles: vec!["PID".into(), "CMD".into()],
                processes: vec![engine::TopRow {
                    values: vec!["1".into(), format!("sh {}", req.ps_args)],
                }],
            })
        }))
    }
    fn resize(&self, req: engine::ResizePtyRequest) -> Fut<'_, ()> {
        let size = req.size.unwrap_or_default();
        self.call(format!("resize {}x{}", size.width, size.height));
        done(self.with(&req.id, |_| Ok(())))
    }
    fn exec_create(&self, req: engine::ExecCreateRequest) -> Fut<'_, engine::ExecCreateResponse> {
        let r = self.with(&req.id, |c| {
            if status_of(c) != engine::ContainerStatus::Running {
                return Err(Error::failed_precondition("not running"));
            }
            Ok(())
        });
        self.state().last_exec = Some(req);
        done(r.map(|()| engine::ExecCreateResponse {
            exec_id: "e".repeat(64),
        }))
    }
    fn exec_start(
        &self,
        input: Input<engine::ExecStartRequest>,
    ) -> Fut<'_, Stream<engine::ExecStartResponse>> {
        use engine::exec_start_request::Event as In;
        use engine::exec_start_response::Event as Out;
        let this = self.clone();
        Box::pin(async move {
            let mut input = input;
            let Some(engine::ExecStartRequest {
                event: Some(In::Options(opts)),
            }) = input.next().await
            else {
                return Err(Error::invalid_argument("options first"));
            };
            if opts.exec_id != "e".repeat(64) {
                return Err(Error::not_found(format!("exec {} not found", opts.exec_id)));
            }
            let tty = opts.tty.unwrap_or(false);
            let sink = this.clone();
            tokio::spawn(async move {
                while let Some(m) = input.next().await {
                    let mut st = sink.state();
                    match m.event {
                        Some(In::Data(d)) => st.stdin.extend_from_slice(&d),
                        Some(In::CloseStdin(_)) => st.stdin_closed = true,
                        _ => {}
                    }
                }
            });
            let mut msgs = vec![Ok(engine::ExecStartResponse {
                event: Some(Out::Started(engine::ExecStarted { pid: 7, tty })),
            })];
            if !opts.detach {
                msgs.extend(this.state().output.clone().into_iter().map(|o| {
                    Ok(engine::ExecStartResponse {
                        event: Some(Out::Output(o)),
                    })
                }));
                msgs.push(Ok(engine::ExecStartResponse {
                    event: Some(Out::End(engine::ExecEnd {
                        exit_code: 0,
                        detached: false,
                    })),
                }));
            }
            Ok(futures::stream::iter(msgs).boxed())
        })
    }
    fn exec_resize(&self, req: engine::ExecResizeRequest) -> Fut<'_, ()> {
        self.call(format!("exec_resize {}", req.exec_id));
        ok(())
    }
    fn exec_inspect(
        &self,
        req: engine::ExecInspectRequest,
    ) -> Fut<'_, engine::ExecInspectResponse> {
        if req.exec_id != "e".repeat(64) {
            return done(Err(Error::not_found("exec not found")));
        }
        ok(engine::ExecInspectResponse {
            exec_id: req.exec_id,
            container_id: "c".repeat(64),
            exit_code: Some(3),
            process_config: Some(engine::ExecProcessConfig {
                entrypoint: "sh".into(),
                arguments: vec!["-c".into(), "exit 3".into()],
                ..Default::default()
            }),
            can_remove: true,
            ..Default::default()
        })
    }
}

impl ImagesApi for Fake {
    fn cache_prune(&self, _req: images::CachePruneRequest) -> Fut<'_, images::CachePruneResponse> {
        done(Ok(images::CachePruneResponse::default()))
    }
    fn pull(&self, req: images::PullRequest) -> Fut<'_, Stream<images::PullResponse>> {
        use images::pull_response::Event;
        self.state().last_pull = Some(req.clone());
        if req.reference.contains("missing") {
            return done(Err(Error::not_found(
                "pull access denied for missing, repository does not exist or may require 'docker login'",
            )));
        }
        let digest = format!("sha256:{}", "d".repeat(64));
        let layer = |phase: images::PullLayerPhase, cur: i64| {
            Ok(images::PullResponse {
                event: Some(Event::Layer(images::PullLayerProgress {
                    digest: digest.clone(),
                    phase: phase as i32,
                    current: cur,
                    total: if cur > 0 { 100 } else { 0 },
                    retry_in_seconds: 0,
                })),
            })
        };
        let msgs = vec![
            Ok(images::PullResponse {
                event: Some(Event::Started(images::PullStarted {
                    repository: "library/busybox".into(),
                    name: "docker.io/library/busybox".into(),
                    tag_or_digest: "latest".into(),
                })),
            }),
            layer(images::PullLayerPhase::PullingFsLayer, 0),
            layer(images::PullLayerPhase::Downloading, 50),
            layer(images::PullLayerPhase::PullComplete, 0),
            Ok(images::PullResponse {
                event: Some(Event::Done(images::PullDone {
                    reference: req.reference.clone(),
                    image_id: "sha256:1".into(),
                    digest: format!("sha256:{}", "e".repeat(64)),
                    updated: true,
                })),
            }),
            Err(Error::unavailable("registry went away")),
        ];
        if req.reference.contains("denied") {
            let mut msgs = msgs;
            msgs.truncate(1);
            msgs.push(Err(Error::unauthenticated("authentication required")));
            return ok(futures::stream::iter(msgs).boxed());
        }
        let fail_late = req.reference.contains("flaky");
        let n = if fail_late {
            msgs.len()
        } else {
            msgs.len() - 1
        };
        ok(futures::stream::iter(msgs.into_iter().take(n)).boxed())
    }
    fn push(&self, req: images::PushRequest) -> Fut<'_, Stream<images::PushResponse>> {
        use images::push_response::Event;
        if self.find_image(&req.reference).is_err() {
            return done(Err(Error::not_found(format!(
                "image {} not found",
                req.reference
            ))));
        }
        ok(futures::stream::iter([
            Ok(images::PushResponse {
                event: Some(Event::Started(images::PushStarted {
                    name: "127.0.0.1:5000/busybox".into(),
                })),
            }),
            Ok(images::PushResponse {
                event: Some(Event::Layer(images::PushLayerProgress {
                    diff_id: format!("sha256:{}", "f".repeat(64)),
                    phase: images::PushLayerPhase::Pushed as i32,
                    ..Default::default()
                })),
            }),
            Ok(images::PushResponse {
                event: Some(Event::TagDone(images::PushTagDone {
                    tag: "latest".into(),
                    digest: "sha256:abc".into(),
                    size: 527,
                })),
            }),
        ])
        .boxed())
    }
    fn get(&self, req: images::GetImageRequest) -> Fut<'_, images::Image> {
        done(self.find_image(&req.reference))
    }
    fn list(&self, _: images::ListImagesRequest) -> Fut<'_, Vec<images::Image>> {
        ok(self.state().images.clone())
    }
    fn tag(&self, req: images::TagImageRequest) -> Fut<'_, images::TagImageResponse> {
        let r = self.find_image(&req.source).map(|img| {
            let mut st = self.state();
            if let Some(i) = st.images.iter_mut().find(|i| i.id == img.id) {
                i.repo_tags.push(req.target.clone());
            }
            images::TagImageResponse {
                reference: req.target.clone(),
                image_id: img.id,
            }
        });
        done(r)
    }
    fn delete(&self, req: images::DeleteImageRequest) -> Fut<'_, Vec<images::ImageDeleteItem>> {
        use images::image_delete_item::Item;
        let r = self.find_image(&req.reference).and_then(|img| {
            let used = self.state().containers.iter().any(|c| c.image_id == img.id);
            if used && !req.force {
                return Err(Error::failed_precondition("image is in use"));
            }
            self.state().images.retain(|i| i.id != img.id);
            let mut items: Vec<_> = img
                .repo_tags
                .iter()
                .map(|t| images::ImageDeleteItem {
                    item: Some(Item::Untagged(t.clone())),
                })
                .collect();
            items.push(images::ImageDeleteItem {
                item: Some(Item::Deleted(img.id.clone())),
            });
            Ok(items)
        });
        done(r)
    }
    fn prune(&self, _: images::PruneImagesRequest) -> Fut<'_, images::PruneImagesResponse> {
        ok(images::PruneImagesResponse {
            items: vec![],
            space_reclaimed: 0,
        })
    }
    fn export(&self, req: images::ExportImagesRequest) -> Fut<'_, ByteStream> {
        self.call(format!("export {}", req.references.join(",")));
        ok(futures::stream::iter([Ok(Bytes::from_static(b"archive"))]).boxed())
    }
    fn import(
        &self,
        _: images::ImportOptions,
        data: Input<Bytes>,
    ) -> Fut<'_, images::ImportImagesResponse> {
        Box::pin(async move {
            let chunks: Vec<Bytes> = data.collect().await;
            self.state().uploads = chunks.concat();
            if self.state().uploads == b"garbage" {
                return Err(Error::invalid_argument("archive: not a tar archive"));
            }
            Ok(images::ImportImagesResponse {
                images: vec![
                    images::LoadedImage {
                        image_id: "sha256:1".into(),
                        references: vec!["docker.io/library/busybox:latest".into()],
                    },
                    images::LoadedImage {
                        image_id: "sha256:2".into(),
                        references: vec![],
                    },
                ],
            })
        })
    }
    fn import_rootfs(
        &self,
        options: images::ImportRootfsOptions,
        data: Input<Bytes>,
    ) -> Fut<'_, images::ImportRootfsResponse> {
        Box::pin(async move {
            let chunks: Vec<Bytes> = data.collect().await;
            self.state().uploads = chunks.concat();
            self.call(format!(
                "import_rootfs {} {:?}",
                options.reference, options.changes
            ));
            Ok(images::ImportRootfsResponse {
                image_id: "sha256:9".into(),
                reference: options.reference,
            })
        })
    }
    fn inspect_distribution(
        &self,
        req: images::InspectDistributionRequest,
    ) -> Fut<'_, images::InspectDistributionResponse> {
        self.call(format!("distribution {}", req.reference));
        done(if req.reference.contains("busybox") {
            Ok(images::InspectDistributionResponse {
                descriptor: Some(types::Descriptor {
                    media_type: "application/vnd.oci.image.index.v1+json".into(),
                    digest: format!("sha256:{}", "d".repeat(64)),
                    size: 314,
                    ..Default::default()
                }),
                platforms: vec![types::Platform {
                    os: "linux".into(),
                    architecture: "arm64".into(),
                    variant: "v8".into(),
                    ..Default::default()
                }],
            })
        } else if req.reference.contains("unreachable") {
            Err(Error::unavailable(
                "https://10.0.0.1/v2/: cannot connect: refused",
            ))
        } else {
            Err(Error::not_found(format!(
                "manifest for {} not found: manifest unknown: manifest unknown",
                req.reference
            )))
        })
    }
    fn disk_usage(&self) -> Fut<'_, images::DiskUsageResponse> {
        let imgs = self.state().images.clone();
        ok(images::DiskUsageResponse {
            layers_size: 1000,
            images: imgs
                .iter()
                .map(|i| images::ImageDiskUsage {
                    image_id: i.id.clone(),
                    size: 1000,
                    shared_size: 0,
                    containers: 1,
                })
                .collect(),
            content_size: 500,
        })
    }
}

impl VolumesApi for Fake {
    fn create(&self, req: engine::CreateVolumeRequest) -> Fut<'_, engine::Volume> {
        let v = engine::Volume {
            name: if req.name.is_empty() {
                "f".repeat(64)
            } else {
                req.name
            },
            driver: "local".into(),
            mountpoint: "/var/lib/berth/volumes/x/_data".into(),
            labels: req.labels,
            created_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            ..Default::default()
        };
        self.state().volumes.push(v.clone());
        ok(v)
    }
    fn get(&self, req: engine::GetVolumeRequest) -> Fut<'_, engine::Volume> {
        let v = self
            .state()
            .volumes
            .iter()
            .find(|v| v.name == req.name)
            .cloned();
        done(v.ok_or_else(|| Error::not_found("volume not found")))
    }
    fn list(&self, _: engine::ListVolumesRequest) -> Fut<'_, engine::ListVolumesResponse> {
        ok(engine::ListVolumesResponse {
            volumes: self.state().volumes.clone(),
            warnings: vec![],
        })
    }
    fn delete(&self, req: engine::DeleteVolumeRequest) -> Fut<'_, ()> {
        if req.name == "busy" {
            return done(Err(Error::failed_precondition("used by container abc")));
        }
        let mut st = self.state();
        let before = st.volumes.len();
        st.volumes.retain(|v| v.name != req.name);
        if st.volumes.len() == before && !req.force {
            return done(Err(Error::not_found("volume not found")));
        }
        ok(())
    }
    fn prune(&self, _: engine::PruneVolumesRequest) -> Fut<'_, engine::PruneVolumesResponse> {
        let mut st = self.state();
        let deleted = st.volumes.drain(..).map(|v| v.name).collect();
        ok(engine::PruneVolumesResponse {
            deleted,
            space_reclaimed: 10,
        })
    }
}

impl NetworksApi for Fake {
    fn create(
        &self,
        req: network::CreateNetworkRequest,
    ) -> Fut<'_, network::CreateNetworkResponse> {
        if self.state().networks.iter().any(|n| n.name == req.name) {
            return done(Err(Error::already_exists("taken")));
        }
        let n = network::Network {
            id: berth_core::Id::random().to_string(),
            name: req.name,
            driver: if req.driver.is_empty() {
                "bridge".into()
            } else {
                req.driver
            },
            ipam: req.ipam,
            labels: req.labels,
            ..Default::default()
        };
        self.state().networks.push(n.clone());
        ok(network::CreateNetworkResponse {
            network: Some(n),
            warning: String::new(),
        })
    }
    fn get(&self, req: network::GetNetworkRequest) -> Fut<'_, network::Network> {
        let n = self
            .state()
            .networks
            .iter()
            .find(|n| n.name == req.id || n.id.starts_with(&req.id))
            .cloned();
        done(n.ok_or_else(|| Error::not_found("no such network")))
    }
    fn list(&self, _: network::ListNetworksRequest) -> Fut<'_, Vec<network::Network>> {
        ok(self.state().networks.clone())
    }
    fn delete(&self, req: network::DeleteNetworkRequest) -> Fut<'_, ()> {
        let mut st = self.state();
        let before = st.networks.len();
        st.networks.retain(|n| n.name != req.id && n.id != req.id);
        if st.networks.len() == before {
            return done(Err(Error::not_found("no such network")));
        }
        ok(())
    }
    fn prune(&self, _: network::PruneNetworksRequest) -> Fut<'_, Vec<String>> {
        ok(vec!["old".into()])
    }
}

impl EventsApi for Fake {
    fn subscribe(&self, req: events::SubscribeRequest) -> Fut<'_, Stream<events::Envelope>> {
        let evs = self.state().events.clone();
        self.state().last_subscribe = Some(req);
        ok(futures::stream::iter(evs.into_iter().map(Ok)).boxed())
    }
}

impl SystemApi for Fake {
    fn ping(&self) -> Fut<'_, bool> {
        ok(true)
    }
    fn search(
        &self,
        term: String,
        limit: u32,
        _: Option<types::RegistryAuth>,
    ) -> Fut<'_, Vec<crate::backend::SearchResult>> {
        self.call(format!("search {term} {limit}"));
        let result = |name: &str, stars: i64, official: bool| crate::backend::SearchResult {
            name: name.into(),
            description: format!("{name} image"),
            star_count: stars,
            is_official: official,
            is_automated: true,
        };
        ok(vec![
            result("busybox", 3000, true),
            result("someone/busybox", 5, false),
        ])
    }
    fn login(&self, auth: types::RegistryAuth) -> Fut<'_, LoginResult> {
        if auth.password == "secret" {
            ok(LoginResult::default())
        } else {
            done(Err(Error::unauthenticated(format!(
                "login attempt to http://{}/v2/ failed with status: 401 Unauthorized",
                auth.server_address
            ))))
        }
    }
}
