//! The real backends: thin forwarding to berth's services over gRPC.

use std::sync::Arc;
use std::time::Duration;

use berth_core::uds::{Channel, channel};
use berth_core::{Config, Error, Service};
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::engine::v1::containers_client::ContainersClient;
use berth_proto::berth::engine::v1::tasks_client::TasksClient;
use berth_proto::berth::engine::v1::volumes_client::VolumesClient;
use berth_proto::berth::events::v1 as events;
use berth_proto::berth::events::v1::events_client::EventsClient;
use berth_proto::berth::images::v1 as images;
use berth_proto::berth::images::v1::images_client::ImagesClient;
use berth_proto::berth::network::v1 as network;
use berth_proto::berth::network::v1::networks_client::NetworksClient;
use berth_proto::berth::types::v1 as types;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus as WireStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::backend::{
    Backends, ByteStream, ContainersApi, EventsApi, Fut, ImagesApi, Input, LoginResult,
    NetworksApi, Stream, SystemApi, VolumesApi,
};

fn stream<T: Send + 'static>(s: tonic::Streaming<T>) -> Stream<T> {
    s.map_err(Error::from).boxed()
}

// Client streams go to tonic as a concrete `ReceiverStream`: handing it a boxed trait object
// makes the call's future fail the higher-ranked `Send` check.
fn feed<T: Send + 'static>(mut input: Input<T>) -> tokio_stream::wrappers::ReceiverStream<T> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Some(m) = input.next().await {
            if tx.send(m).await.is_err() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Forwards to berth-engine's `Containers` and `Tasks`.
#[derive(Debug, Clone)]
pub struct GrpcContainers {
    containers: ContainersClient<Channel>,
    tasks: TasksClient<Channel>,
}

/// Forwards to berth-images.
#[derive(Debug, Clone)]
pub struct GrpcImages(ImagesClient<Channel>);

/// Forwards to berth-engine's `Volumes`.
#[derive(Debug, Clone)]
pub struct GrpcVolumes(VolumesClient<Channel>);

/// Forwards to berth-network.
#[derive(Debug, Clone)]
pub struct GrpcNetworks(NetworksClient<Channel>);

/// Forwards to berth-engine's events hub.
#[derive(Debug, Clone)]
pub struct GrpcEvents(EventsClient<Channel>);

/// Health from the engine; registry logins checked by [`crate::registry`].
///
/// The health client shares the engine channel, so a ping (which the CLI sends before most
/// commands) is one request on an open HTTP/2 connection rather than a new connection each.
#[derive(Debug, Clone)]
pub struct GrpcSystem {
    health: HealthClient<Channel>,
    registry: crate::registry::RegistryChecker,
}

/// Largest engine answer the gateway accepts, as the engine's own limit: a listing of thousands
/// of containers exceeds tonic's default of 4 MiB.
const MAX_ENGINE_MESSAGE: usize = 64 << 20;

/// Backends for the stack `config` describes.
pub fn backends(config: &Config) -> Backends {
    let engine = channel(config.socket(Service::Engine));
    let images = channel(config.socket(Service::Images));
    let net = channel(config.socket(Service::Network));
    Backends {
        containers: Arc::new(GrpcContainers {
            containers: ContainersClient::new(engine.clone())
                .max_decoding_message_size(MAX_ENGINE_MESSAGE),
            tasks: TasksClient::new(engine.clone()),
        }),
        images: Arc::new(GrpcImages(ImagesClient::new(images))),
        volumes: Arc::new(GrpcVolumes(VolumesClient::new(engine.clone()))),
        networks: Arc::new(GrpcNetworks(NetworksClient::new(net))),
        events: Arc::new(GrpcEvents(EventsClient::new(engine.clone()))),
        system: Arc::new(GrpcSystem {
            health: HealthClient::new(engine),
            registry: crate::registry::RegistryChecker::new(&config.images),
        }),
    }
}

macro_rules! unary {
    ($client:expr, $method:ident, $req:expr) => {{
        let mut c = $client.clone();
        let req = $req;
        Box::pin(async move { Ok(c.$method(req).await.map_err(Error::from)?.into_inner()) })
    }};
    ($client:expr, $method:ident, $req:expr, |$r:ident| $map:expr) => {{
        let mut c = $client.clone();
        let req = $req;
        Box::pin(async move {
            let $r = c.$method(req).await.map_err(Error::from)?.into_inner();
            Ok($map)
        })
    }};
}

macro_rules! server_stream {
    ($client:expr, $method:ident, $req:expr) => {{
        let mut c = $client.clone();
        let req = $req;
        Box::pin(async move {
            Ok(stream(
                c.$method(req).await.map_err(Error::from)?.into_inner(),
            ))
        })
    }};
}

fn missing_field(what: &str) -> Error {
    Error::internal(format!("malformed answer from the service: {what} missing"))
}

impl ContainersApi for GrpcContainers {
    fn create(
        &self,
        req: engine::CreateContainerRequest,
    ) -> Fut<'_, engine::CreateContainerResponse> {
        unary!(self.containers, create, req)
    }
    fn get(&self, req: engine::GetContainerRequest) -> Fut<'_, engine::Container> {
        unary!(self.containers, get, req, |r| r
            .container
            .ok_or_else(|| missing_field("container"))?)
    }
    fn list(&self, req: engine::ListContainersRequest) -> Fut<'_, Vec<engine::Container>> {
        unary!(self.containers, list, req, |r| r.containers)
    }
    fn update(
        &self,
        req: engine::UpdateContainerRequest,
    ) -> Fut<'_, engine::UpdateContainerResponse> {
        unary!(self.containers, update, req)
    }
    fn rename(&self, req: engine::RenameContainerRequest) -> Fut<'_, ()> {
        unary!(self.containers, rename, req)
    }
    fn delete(&self, req: engine::DeleteContainerRequest) -> Fut<'_, ()> {
        unary!(self.containers, delete, req)
    }
    fn prune(
        &self,
        req: engine::PruneContainersRequest,
    ) -> Fut<'_, engine::PruneContainersResponse> {
        unary!(self.containers, prune, req)
    }
    fn connect_network(
        &self,
        req: engine::ConnectNetworkRequest,
    ) -> Fut<'_, engine::ConnectNetworkResponse> {
        unary!(self.containers, connect_network, req)
    }
    fn disconnect_network(&self, req: engine::DisconnectNetworkRequest) -> Fut<'_, ()> {
        unary!(self.containers, disconnect_network, req)
    }
    fn changes(&self, req: engine::ChangesRequest) -> Fut<'_, Vec<engine::Change>> {
        unary!(self.containers, changes, req, |r| r.changes)
    }
    fn commit(&self, req: engine::CommitContainerRequest) -> Fut<'_, String> {
        unary!(self.containers, commit, req, |r| r.image_id)
    }
    fn export(&self, req: engine::ExportContainerRequest) -> Fut<'_, ByteStream> {
        let mut c = self.containers.clone();
        Box::pin(async move {
            let s = c.export(req).await.map_err(Error::from)?.into_inner();
            Ok(stream(s).map_ok(|m| Bytes::from(m.data)).boxed())
        })
    }
    fn archive_stat(
        &self,
        req: engine::ArchiveStatRequest,
    ) -> Fut<'_, engine::ArchiveStatResponse> {
        unary!(self.containers, archive_stat, req)
    }
    fn archive_get(
        &self,
        req: engine::ArchiveGetRequest,
    ) -> Fut<'_, (engine::ArchiveStatResponse, ByteStream)> {
        use engine::archive_get_response::Part;
        let mut c = self.containers.clone();
        Box::pin(async move {
            let mut s = c.archive_get(req).await.map_err(Error::from)?.into_inner();
            let stat = match s.message().await.map_err(Error::from)? {
                Some(engine::ArchiveGetResponse {
                    part: Some(Part::Stat(stat)),
                }) => stat,
                _ => return Err(missing_field("archive stat")),
            };
            let data = stream(s)
                .try_filter_map(|m| async move {
                    Ok(match m.part {
                        Some(Part::Data(d)) => Some(Bytes::from(d)),
                        _ => None,
                    })
                })
                .boxed();
            Ok((stat, data))
        })
    }
    fn archive_put(&self, options: engine::ArchivePutOptions, data: Input<Bytes>) -> Fut<'_, ()> {
        use engine::archive_put_request::Part;
        let mut c = self.containers.clone();
        Box::pin(async move {
            let first = futures::stream::iter([engine::ArchivePutRequest {
                part: Some(Part::Options(options)),
            }]);
            let rest = data.map(|d| engine::ArchivePutRequest {
                part: Some(Part::Data(d.to_vec())),
            });
            c.archive_put(feed(first.chain(rest).boxed()))
                .await
                .map_err(Error::from)?;
            Ok(())
        })
    }
    fn start(&self, req: engine::StartTaskRequest) -> Fut<'_, engine::StartTaskResponse> {
        unary!(self.tasks, start, req)
    }
    fn stop(&self, req: engine::StopTaskRequest) -> Fut<'_, engine::StopTaskResponse> {
        unary!(self.tasks, stop, req)
    }
    fn kill(&self, req: engine::KillTaskRequest) -> Fut<'_, ()> {
        unary!(self.tasks, kill, req)
    }
    fn restart(&self, req: engine::RestartTaskRequest) -> Fut<'_, ()> {
        unary!(self.tasks, restart, req)
    }
    fn pause(&self, req: engine::PauseTaskRequest) -> Fut<'_, ()> {
        unary!(self.tasks, pause, req)
    }
    fn resume(&self, req: engine::ResumeTaskRequest) -> Fut<'_, ()> {
        unary!(self.tasks, resume, req)
    }
    fn wait(&self, req: engine::WaitTaskRequest) -> Fut<'_, Stream<engine::WaitTaskResponse>> {
        server_stream!(self.tasks, wait, req)
    }
    fn attach(
        &self,
        input: Input<engine::AttachTaskRequest>,
    ) -> Fut<'_, Stream<engine::AttachTaskResponse>> {
        server_stream!(self.tasks, attach, feed(input))
    }
    fn logs(&self, req: engine::LogsRequest) -> Fut<'_, Stream<engine::LogsResponse>> {
        server_stream!(self.tasks, logs, req)
    }
    fn stats(&self, req: engine::StatsRequest) -> Fut<'_, Stream<engine::StatsResponse>> {
        server_stream!(self.tasks, stats, req)
    }
    fn top(&self, req: engine::TopRequest) -> Fut<'_, engine::TopResponse> {
        unary!(self.tasks, top, req)
    }
    fn resize(&self, req: engine::ResizePtyRequest) -> Fut<'_, ()> {
        unary!(self.tasks, resize_pty, req)
    }
    fn exec_create(&self, req: engine::ExecCreateRequest) -> Fut<'_, engine::ExecCreateResponse> {
        unary!(self.tasks, exec_create, req)
    }
    fn exec_start(
        &self,
        input: Input<engine::ExecStartRequest>,
    ) -> Fut<'_, Stream<engine::ExecStartResponse>> {
        server_stream!(self.tasks, exec_start, feed(input))
    }
    fn exec_resize(&self, req: engine::ExecResizeRequest) -> Fut<'_, ()> {
        unary!(self.tasks, exec_resize, req)
    }
    fn exec_inspect(
        &self,
        req: engine::ExecInspectRequest,
    ) -> Fut<'_, engine::ExecInspectResponse> {
        unary!(self.tasks, exec_inspect, req)
    }
}

impl ImagesApi for GrpcImages {
    fn pull(&self, req: images::PullRequest) -> Fut<'_, Stream<images::PullResponse>> {
        server_stream!(self.0, pull, req)
    }
    fn push(&self, req: images::PushRequest) -> Fut<'_, Stream<images::PushResponse>> {
        server_stream!(self.0, push, req)
    }
    fn get(&self, req: images::GetImageRequest) -> Fut<'_, images::Image> {
        unary!(self.0, get, req, |r| r
            .image
            .ok_or_else(|| missing_field("image"))?)
    }
    fn list(&self, req: images::ListImagesRequest) -> Fut<'_, Vec<images::Image>> {
        unary!(self.0, list, req, |r| r.images)
    }
    fn tag(&self, req: images::TagImageRequest) -> Fut<'_, images::TagImageResponse> {
        unary!(self.0, tag, req)
    }
    fn delete(&self, req: images::DeleteImageRequest) -> Fut<'_, Vec<images::ImageDeleteItem>> {
        unary!(self.0, delete, req, |r| r.items)
    }
    fn prune(&self, req: images::PruneImagesRequest) -> Fut<'_, images::PruneImagesResponse> {
        unary!(self.0, prune, req)
    }
    fn export(&self, req: images::ExportImagesRequest) -> Fut<'_, ByteStream> {
        let mut c = self.0.clone();
        Box::pin(async move {
            let s = c.export(req).await.map_err(Error::from)?.into_inner();
            Ok(stream(s).map_ok(|m| Bytes::from(m.data)).boxed())
        })
    }
    fn import(
        &self,
        options: images::ImportOptions,
        data: Input<Bytes>,
    ) -> Fut<'_, images::ImportImagesResponse> {
        use images::import_images_request::Part;
        let mut c = self.0.clone();
        Box::pin(async move {
            let first = futures::stream::iter([images::ImportImagesRequest {
                part: Some(Part::Options(options)),
            }]);
            let rest = data.map(|d| images::ImportImagesRequest {
                part: Some(Part::Data(d.to_vec())),
            });
            Ok(c.import(feed(first.chain(rest).boxed()))
                .await
                .map_err(Error::from)?
                .into_inner())
        })
    }
    fn import_rootfs(
        &self,
        options: images::ImportRootfsOptions,
        data: Input<Bytes>,
    ) -> Fut<'_, images::ImportRootfsResponse> {
        use images::import_rootfs_request::Part;
        let mut c = self.0.clone();
        Box::pin(async move {
            let first = futures::stream::iter([images::ImportRootfsRequest {
                part: Some(Part::Options(options)),
            }]);
            let rest = data.map(|d| images::ImportRootfsRequest {
                part: Some(Part::Data(d.to_vec())),
            });
            Ok(c.import_rootfs(feed(first.chain(rest).boxed()))
                .await
                .map_err(Error::from)?
                .into_inner())
        })
    }
    fn create_config_image(&self, options: images::CreateImageOptions) -> Fut<'_, String> {
        use images::create_image_request::Part;
        let mut c = self.0.clone();
        Box::pin(async move {
            let only = futures::stream::iter([images::CreateImageRequest {
                part: Some(Part::Options(images::CreateImageOptions {
                    empty_layer: true,
                    ..options
                })),
            }]);
            Ok(c.create_image(feed(only.boxed()))
                .await
                .map_err(Error::from)?
                .into_inner()
                .image_id)
        })
    }
    fn disk_usage(&self) -> Fut<'_, images::DiskUsageResponse> {
        unary!(self.0, disk_usage, images::DiskUsageRequest {})
    }
    fn inspect_distribution(
        &self,
        req: images::InspectDistributionRequest,
    ) -> Fut<'_, images::InspectDistributionResponse> {
        unary!(self.0, inspect_distribution, req)
    }
    fn cache_lookup(&self, key: String) -> Fut<'_, Option<String>> {
        unary!(
            self.0,
            cache_lookup,
            images::CacheLookupRequest { key },
            |r| (!r.image_id.is_empty()).then_some(r.image_id)
        )
    }
    fn cache_store(&self, req: images::CacheStoreRequest) -> Fut<'_, ()> {
        unary!(self.0, cache_store, req)
    }
    fn cache_list(&self) -> Fut<'_, Vec<images::CacheEntry>> {
        unary!(self.0, cache_list, images::CacheListRequest {}, |r| r
            .entries)
    }
    fn cache_prune(&self, req: images::CachePruneRequest) -> Fut<'_, images::CachePruneResponse> {
        unary!(self.0, cache_prune, req)
    }
}

impl VolumesApi for GrpcVolumes {
    fn create(&self, req: engine::CreateVolumeRequest) -> Fut<'_, engine::Volume> {
        unary!(self.0, create, req, |r| r
            .volume
            .ok_or_else(|| missing_field("volume"))?)
    }
    fn get(&self, req: engine::GetVolumeRequest) -> Fut<'_, engine::Volume> {
        unary!(self.0, get, req, |r| r
            .volume
            .ok_or_else(|| missing_field("volume"))?)
    }
    fn list(&self, req: engine::ListVolumesRequest) -> Fut<'_, engine::ListVolumesResponse> {
        unary!(self.0, list, req)
    }
    fn delete(&self, req: engine::DeleteVolumeRequest) -> Fut<'_, ()> {
        unary!(self.0, delete, req)
    }
    fn prune(&self, req: engine::PruneVolumesRequest) -> Fut<'_, engine::PruneVolumesResponse> {
        unary!(self.0, prune, req)
    }
}

impl NetworksApi for GrpcNetworks {
    fn create(
        &self,
        req: network::CreateNetworkRequest,
    ) -> Fut<'_, network::CreateNetworkResponse> {
        unary!(self.0, create, req)
    }
    fn get(&self, req: network::GetNetworkRequest) -> Fut<'_, network::Network> {
        unary!(self.0, get, req, |r| r
            .network
            .ok_or_else(|| missing_field("network"))?)
    }
    fn list(&self, req: network::ListNetworksRequest) -> Fut<'_, Vec<network::Network>> {
        unary!(self.0, list, req, |r| r.networks)
    }
    fn delete(&self, req: network::DeleteNetworkRequest) -> Fut<'_, ()> {
        unary!(self.0, delete, req)
    }
    fn prune(&self, req: network::PruneNetworksRequest) -> Fut<'_, Vec<String>> {
        unary!(self.0, prune, req, |r| r.deleted)
    }
}

impl EventsApi for GrpcEvents {
    fn subscribe(&self, req: events::SubscribeRequest) -> Fut<'_, Stream<events::Envelope>> {
        let mut c = self.0.clone();
        Box::pin(async move {
            let s = c.subscribe(req).await.map_err(Error::from)?.into_inner();
            Ok(stream(s)
                .try_filter_map(|m| async move { Ok(m.envelope) })
                .boxed())
        })
    }
}

impl SystemApi for GrpcSystem {
    fn ping(&self) -> Fut<'_, bool> {
        let mut health = self.health.clone();
        Box::pin(async move {
            let check = health.check(HealthCheckRequest {
                service: String::new(),
            });
            let healthy = tokio::time::timeout(Duration::from_secs(2), check).await;
            Ok(matches!(healthy, Ok(Ok(r)) if r.get_ref().status() == WireStatus::Serving))
        })
    }
    fn login(&self, auth: types::RegistryAuth) -> Fut<'_, LoginResult> {
        Box::pin(async move { self.registry.login(&auth).await })
    }
    fn search(
        &self,
        term: String,
        limit: u32,
        auth: Option<types::RegistryAuth>,
    ) -> Fut<'_, Vec<crate::backend::SearchResult>> {
        Box::pin(async move { self.registry.search(&term, limit, auth.as_ref()).await })
    }
}
