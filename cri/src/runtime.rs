//! The CRI `RuntimeService`: what berth is and whether it is ready; pod sandboxes through
//! `crate::pods`; exec/attach into any running container and port forwarding into a pod (URLs
//! on the streaming server; `ExecSync` directly); stats and metrics through `crate::stats`;
//! container events through `crate::events`.

use std::path::{Path, PathBuf};
use std::pin::Pin;

use berth_core::grpc::ServingStatus;
use berth_core::{Config, Error, ErrorKind, Result as BerthResult, Service};
use berth_proto::cri::runtime::v1 as cri;
use berth_proto::cri::runtime::v1::runtime_service_server::RuntimeService;
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::Sockets;
use crate::backend::{GrpcRuntimeProbe, RuntimeProbe};
use crate::containers::{Containers, GrpcContainerStore};
use crate::convert;
use crate::events::{Events, GrpcEventSource};
use crate::pods::{GrpcSandboxStore, Pods};
use crate::stats::{GrpcStatsSource, Stats};
use crate::streaming::backend::ExecSpec;
use crate::streaming::{Pending, StreamServer};

/// The runtime's name in `Version` (kubelet logs it; crictl prints it).
pub const RUNTIME_NAME: &str = "berth";
/// The CRI version berth speaks.
pub const RUNTIME_API_VERSION: &str = "v1";

/// The condition kubelet reads for the network, and the reason it expects while no CNI config
/// exists.
const NETWORK_READY: &str = "NetworkReady";
const NETWORK_NOT_READY_REASON: &str = "NetworkPluginNotReady";
const RUNTIME_READY: &str = "RuntimeReady";

type EventStream = Pin<Box<dyn Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>>;

/// The CRI runtime service.
#[derive(Debug)]
pub struct CriRuntime<P = GrpcRuntimeProbe> {
    probe: P,
    cni_conf_dir: PathBuf,
    /// Where `UpdateRuntimeConfig`'s pod CIDR is kept (the state directory: kubelet sends it
    /// again after a reboot, and a gateway restart must not lose it).
    pod_cidr_file: PathBuf,
    /// The pod sandbox methods (`crate::pods`).
    pods: Pods,
    /// The streaming server that Exec, Attach and PortForward hand out URLs on.
    streams: Option<StreamServer>,
    /// The container methods (`crate::containers`).
    containers: Containers,
    /// The stats and metrics methods (`crate::stats`).
    stats: Stats,
    /// GetContainerEvents (`crate::events`).
    events: Events,
}

impl CriRuntime {
    /// A runtime service over the services `sockets` names.
    pub fn new(config: &Config, sockets: &Sockets) -> Self {
        Self::with_probe(GrpcRuntimeProbe::new(sockets), config)
    }
}

impl<P: RuntimeProbe> CriRuntime<P> {
    /// A runtime service asking `probe`.
    pub fn with_probe(probe: P, config: &Config) -> Self {
        let sockets = Sockets::from_config(config);
        let pods = Pods::new(GrpcSandboxStore::new(&sockets.engine));
        let containers = Containers::new(GrpcContainerStore::new(&sockets.engine));
        let stats = Stats::new(
            GrpcContainerStore::new(&sockets.engine),
            GrpcSandboxStore::new(&sockets.engine),
            GrpcStatsSource::new(&sockets, &config.snapshotter.driver),
            config.data_dir(Service::Snapshotter).display().to_string(),
        );
        let events = Events::new(
            GrpcEventSource::new(&sockets.engine),
            pods.clone(),
            containers.clone(),
        );
        Self {
            probe,
            cni_conf_dir: config.network.cni_conf_dir.clone(),
            pod_cidr_file: config.state_dir.join("cri").join("pod-cidr"),
            pods,
            streams: None,
            containers,
            stats,
            events,
        }
    }

    /// Exec, Attach and PortForward hand out URLs on `server` (and ExecSync runs on its
    /// backend).
    pub fn with_streaming(mut self, server: StreamServer) -> Self {
        self.streams = Some(server);
        self
    }

    fn streams(&self) -> Result<&StreamServer, Status> {
        self.streams
            .as_ref()
            .ok_or_else(|| Status::unavailable("the CRI streaming server is not running"))
    }

    /// RuntimeReady: the engine, which runs every container, answers its health check.
    async fn runtime_condition(&self) -> cri::RuntimeCondition {
        let (status, reason, message) = match self.probe.engine_health().await {
            Ok(ServingStatus::Serving) => (true, String::new(), String::new()),
            Ok(other) => (
                false,
                "EngineNotServing".to_string(),
                format!("berth-engine reports {other:?}"),
            ),
            Err(err) => (false, "EngineUnavailable".to_string(), err.chain()),
        };
        cri::RuntimeCondition {
            r#type: RUNTIME_READY.into(),
            status,
            reason,
            message,
        }
    }

    /// NetworkReady: berth-network finds a CNI config for pods.
    async fn network_condition(&self) -> (cri::RuntimeCondition, Vec<String>) {
        let not_ready = |message: String| cri::RuntimeCondition {
            r#type: NETWORK_READY.into(),
            status: false,
            reason: NETWORK_NOT_READY_REASON.into(),
            message,
        };
        match self.probe.cni_configs().await {
            Ok(names) if names.is_empty() => {
                let message = format!(
                    "Network plugin returns error: cni plugin not initialized: no network config found in {}",
                    self.cni_conf_dir.display()
                );
                (not_ready(message), names)
            }
            Ok(names) => {
                let ready = cri::RuntimeCondition {
                    r#type: NETWORK_READY.into(),
                    status: true,
                    ..Default::default()
                };
                (ready, names)
            }
            Err(err) => (
                not_ready(format!(
                    "cannot ask berth-network for CNI configs: {}",
                    err.chain()
                )),
                Vec::new(),
            ),
        }
    }

    fn pod_cidrs(&self) -> Vec<String> {
        std::fs::read_to_string(&self.pod_cidr_file)
            .ok()
            .and_then(|t| convert::pod_cidrs(&t).ok())
            .unwrap_or_default()
    }
}

/// Writes `text` to `path` so that a reader sees the old or the new contents, never a part.
fn write_atomic(path: &Path, text: &str) -> BerthResult<()> {
    use berth_core::error::Context as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .context(ErrorKind::Internal, format!("create {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).context(ErrorKind::Internal, format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).context(ErrorKind::Internal, format!("rename {}", path.display()))
}

/// kubelet's checks of a streaming request: with a TTY stdout and stderr are one stream.
fn check_streams(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> Result<(), Status> {
    if tty && stderr {
        return Err(Error::invalid_argument("tty and stderr cannot both be true").into());
    }
    if !stdin && !stdout && !stderr {
        return Err(Error::invalid_argument("one of stdin, stdout, or stderr must be set").into());
    }
    Ok(())
}

#[tonic::async_trait]
impl<P: RuntimeProbe> RuntimeService for CriRuntime<P> {
    type GetContainerEventsStream = EventStream;

    async fn version(
        &self,
        _req: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            // The version of the kubelet-runtime API (always 0.1.0 in v1).
            version: "0.1.0".into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: RUNTIME_API_VERSION.into(),
        }))
    }

    async fn status(
        &self,
        req: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let (runtime, (network, cni_configs)) =
            tokio::join!(self.runtime_condition(), self.network_condition());
        let info = if req.into_inner().verbose {
            let config = serde_json::json!({
                "cgroupDriver": "cgroupfs",
                "cniConfDir": self.cni_conf_dir,
                "cniConfigs": cni_configs,
                "podCIDRs": self.pod_cidrs(),
            });
            [("config".to_string(), config.to_string())].into()
        } else {
            Default::default()
        };
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![runtime, network],
            }),
            info,
            runtime_handlers: crate::pods::runtime_handlers(),
            features: Some(crate::pods::runtime_features()),
        }))
    }

    /// berth's engine places containers in cgroups itself (cgroupfs); the systemd driver is not
    /// available, so kubelet must run with `cgroupDriver: cgroupfs`.
    async fn runtime_config(
        &self,
        _req: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs.into(),
            }),
        }))
    }

    async fn update_runtime_config(
        &self,
        req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        let text = req
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        let cidrs = convert::pod_cidrs(&text)?;
        // An empty update carries nothing to store (kubelet sends one before it knows the CIDR).
        if !cidrs.is_empty() {
            write_atomic(&self.pod_cidr_file, &cidrs.join(","))?;
            tracing::info!(pod_cidr = %cidrs.join(","), "cri pod CIDR updated");
        }
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn checkpoint_container(
        &self,
        _req: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        Err(Error::unimplemented(
            "runtime.v1.RuntimeService.CheckpointContainer is not supported by berth: container checkpoint/restore (CRIU) is not part of berth",
        )
        .into())
    }

    async fn get_container_events(
        &self,
        _req: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        Ok(Response::new(self.events.subscribe().await?))
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        Ok(Response::new(
            self.pods.run(req.into_inner(), self.pod_cidrs()).await?,
        ))
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        Ok(Response::new(self.pods.stop(req.into_inner()).await?))
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        Ok(Response::new(self.pods.remove(req.into_inner()).await?))
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        Ok(Response::new(self.pods.status(req.into_inner()).await?))
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        Ok(Response::new(self.pods.list(req.into_inner()).await?))
    }

    async fn create_container(
        &self,
        req: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        Ok(Response::new(
            self.containers.create(req.into_inner()).await?,
        ))
    }

    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        Ok(Response::new(
            self.containers.start(req.into_inner()).await?,
        ))
    }

    async fn stop_container(
        &self,
        req: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        Ok(Response::new(self.containers.stop(req.into_inner()).await?))
    }

    async fn remove_container(
        &self,
        req: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        Ok(Response::new(
            self.containers.remove(req.into_inner()).await?,
        ))
    }

    async fn list_containers(
        &self,
        req: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        Ok(Response::new(self.containers.list(req.into_inner()).await?))
    }

    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        Ok(Response::new(
            self.containers.status(req.into_inner()).await?,
        ))
    }

    async fn update_container_resources(
        &self,
        req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        Ok(Response::new(
            self.containers.update(req.into_inner()).await?,
        ))
    }

    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        Ok(Response::new(
            self.containers.reopen_log(req.into_inner()).await?,
        ))
    }

    /// Runs the command without stdin and collects its output; past the timeout the process
    /// is killed and the call fails with DEADLINE_EXCEEDED (kubelet's probe timeout), as
    /// containerd does.
    async fn exec_sync(
        &self,
        req: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let req = req.into_inner();
        if req.cmd.is_empty() {
            return Err(Error::invalid_argument("cmd must not be empty").into());
        }
        let timeout = u64::try_from(req.timeout)
            .ok()
            .filter(|t| *t > 0)
            .map(std::time::Duration::from_secs);
        let backend = self.streams()?.backend();
        let id = backend.running(&req.container_id).await?;
        let (stdout, stderr, exit_code) = backend
            .exec_sync(
                ExecSpec {
                    container_id: id,
                    cmd: req.cmd,
                    ..Default::default()
                },
                timeout,
            )
            .await?;
        Ok(Response::new(cri::ExecSyncResponse {
            stdout,
            stderr,
            exit_code,
        }))
    }

    async fn exec(
        &self,
        req: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let req = req.into_inner();
        if req.cmd.is_empty() {
            return Err(Error::invalid_argument("cmd must not be empty").into());
        }
        check_streams(req.tty, req.stdin, req.stdout, req.stderr)?;
        let streams = self.streams()?;
        let id = streams.backend().running(&req.container_id).await?;
        let url = streams.url(Pending::Exec(ExecSpec {
            container_id: id,
            cmd: req.cmd,
            tty: req.tty,
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
        }))?;
        Ok(Response::new(cri::ExecResponse { url }))
    }

    async fn attach(
        &self,
        req: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let req = req.into_inner();
        check_streams(req.tty, req.stdin, req.stdout, req.stderr)?;
        let streams = self.streams()?;
        let id = streams.backend().running(&req.container_id).await?;
        let url = streams.url(Pending::Attach(ExecSpec {
            container_id: id,
            cmd: Vec::new(),
            tty: req.tty,
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
        }))?;
        Ok(Response::new(cri::AttachResponse { url }))
    }

    /// A URL forwarding into the pod's network namespace.
    async fn port_forward(
        &self,
        req: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let req = req.into_inner();
        let streams = self.streams()?;
        let netns = self.pods.netns(&req.pod_sandbox_id).await?;
        let mut ports = Vec::new();
        for p in req.port {
            ports.push(u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| {
                Error::invalid_argument(format!("invalid port {p}: ports are 1-65535"))
            })?);
        }
        let url = streams.url(Pending::PortForward(netns, ports))?;
        Ok(Response::new(cri::PortForwardResponse { url }))
    }

    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        Ok(Response::new(self.stats.container(req.into_inner()).await?))
    }

    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        Ok(Response::new(
            self.stats.list_containers(req.into_inner()).await?,
        ))
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        Ok(Response::new(self.stats.pod(req.into_inner()).await?))
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        Ok(Response::new(self.stats.list_pods(req.into_inner()).await?))
    }

    async fn list_metric_descriptors(
        &self,
        _req: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        Ok(Response::new(self.stats.descriptors()))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _req: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        Ok(Response::new(self.stats.metrics().await?))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::backend::Fut;

    /// Answers what it is told to.
    struct Probe {
        engine: Mutex<Result<ServingStatus, String>>,
        cni: Mutex<Result<Vec<String>, String>>,
    }

    impl RuntimeProbe for Probe {
        fn engine_health(&self) -> Fut<'_, ServingStatus> {
            let r = self
                .engine
                .lock()
                .unwrap()
                .clone()
                .map_err(Error::unavailable);
            Box::pin(async move { r })
        }

        fn cni_configs(&self) -> Fut<'_, Vec<String>> {
            let r = self.cni.lock().unwrap().clone().map_err(Error::unavailable);
            Box::pin(async move { r })
        }
    }

    fn runtime(state: &Path) -> CriRuntime<Probe> {
        let config = Config {
            state_dir: state.to_path_buf(),
            ..Default::default()
        };
        CriRuntime::with_probe(
            Probe {
                engine: Mutex::new(Ok(ServingStatus::Serving)),
                cni: Mutex::new(Ok(Vec::new())),
            },
            &config,
        )
    }

    async fn conditions(rt: &CriRuntime<Probe>) -> (cri::RuntimeCondition, cri::RuntimeCondition) {
        let s = rt
            .status(Request::new(cri::StatusRequest { verbose: false }))
            .await
            .unwrap()
            .into_inner();
        let c = s.status.unwrap().conditions;
        assert_eq!(c[0].r#type, "RuntimeReady");
        assert_eq!(c[1].r#type, "NetworkReady");
        (c[0].clone(), c[1].clone())
    }

    #[tokio::test]
    async fn readiness_follows_the_engine_and_the_cni_configs() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path());
        let (run, net) = conditions(&rt).await;
        assert!(run.status);
        assert!(!net.status);
        assert_eq!(net.reason, "NetworkPluginNotReady");
        assert!(net.message.contains("/etc/cni/net.d"), "{}", net.message);

        *rt.probe.cni.lock().unwrap() = Ok(vec!["/etc/cni/net.d/10-pods.conflist".into()]);
        let (_, net) = conditions(&rt).await;
        assert!(net.status && net.reason.is_empty());

        *rt.probe.cni.lock().unwrap() = Err("network down".into());
        *rt.probe.engine.lock().unwrap() = Err("connect engine.sock".into());
        let (run, net) = conditions(&rt).await;
        assert!(!run.status);
        assert_eq!(run.reason, "EngineUnavailable");
        assert!(run.message.contains("engine.sock"));
        assert!(!net.status);
        assert!(net.message.contains("network down"), "{}", net.message);

        *rt.probe.engine.lock().unwrap() = Ok(ServingStatus::NotServing);
        let (run, _) = conditions(&rt).await;
        assert!(!run.status);
        assert_eq!(run.reason, "EngineNotServing");
    }

    #[tokio::test]
    async fn the_pod_cidr_is_kept_in_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path());
        let update = |cidr: &str| {
            Request::new(cri::UpdateRuntimeConfigRequest {
                runtime_config: Some(cri::RuntimeConfig {
                    network_config: Some(cri::NetworkConfig {
                        pod_cidr: cidr.into(),
                    }),
                }),
            })
        };
        rt.update_runtime_config(update("10.88.0.0/16,fd00::/64"))
            .await
            .unwrap();
        // An empty update (kubelet before it knows) keeps what is there.
        rt.update_runtime_config(update("")).await.unwrap();
        let err = rt
            .update_runtime_config(update("nonsense"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        // A new process (after kill -9) reads it back.
        let again = runtime(dir.path());
        assert_eq!(again.pod_cidrs(), ["10.88.0.0/16", "fd00::/64"]);
        let s = again
            .status(Request::new(cri::StatusRequest { verbose: true }))
            .await
            .unwrap()
            .into_inner();
        let config: serde_json::Value = serde_json::from_str(&s.info["config"]).unwrap();
        assert_eq!(config["podCIDRs"][1], "fd00::/64");
        assert_eq!(config["cgroupDriver"], "cgroupfs");
    }

    #[tokio::test]
    async fn unsupported_methods_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime(dir.path());
        let err = rt
            .checkpoint_container(Request::new(cri::CheckpointContainerRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented);
        assert!(err.message().contains("CheckpointContainer"), "{err:?}");
        let d = rt
            .list_metric_descriptors(Request::new(cri::ListMetricDescriptorsRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert!(
            d.descriptors
                .iter()
                .any(|d| d.name == "container_memory_working_set_bytes")
        );
        let v = rt
            .version(Request::new(cri::VersionRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (v.runtime_name.as_str(), v.runtime_api_version.as_str()),
            ("berth", "v1")
        );
    }
}
