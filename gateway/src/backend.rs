//! The narrow backend traits the routes call, one per area of the Docker API.
//!
//! Each method is one call on berth's internal APIs, in their own (generated) message types: the
//! routes parse Docker requests into these messages and render the answers Docker-shaped. The
//! real implementations ([`crate::grpc`]) forward to the services over gRPC; unit tests plug in
//! fakes. Every method has a default body answering `Unimplemented`, so a fake only implements
//! what its test needs.
//!
//! Streams: server streams come back as [`Stream`]s of messages; client streams (stdin, uploads)
//! go in as [`Input`]s. Dropping a returned stream cancels the call.

use std::sync::Arc;

use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::events::v1 as events;
use berth_proto::berth::images::v1 as images;
use berth_proto::berth::network::v1 as network;
use berth_proto::berth::types::v1 as types;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

/// A boxed backend call.
pub type Fut<'a, T> = BoxFuture<'a, Result<T>>;
/// A server stream of messages.
pub type Stream<T> = BoxStream<'static, Result<T>>;
/// A client stream of messages.
pub type Input<T> = BoxStream<'static, T>;
/// A stream of raw bytes (tar archives).
pub type ByteStream = Stream<Bytes>;

fn missing<'a, T: Send + 'a>(what: &'static str) -> Fut<'a, T> {
    Box::pin(async move { Err(Error::unimplemented(format!("{what} is not available"))) })
}

/// Containers and their tasks (berth-engine's `Containers` and `Tasks`).
#[allow(unused_variables)]
pub trait ContainersApi: Send + Sync {
    /// `Containers.Create`.
    fn create(
        &self,
        req: engine::CreateContainerRequest,
    ) -> Fut<'_, engine::CreateContainerResponse> {
        missing("container create")
    }
    /// `Containers.Get`.
    fn get(&self, req: engine::GetContainerRequest) -> Fut<'_, engine::Container> {
        missing("container get")
    }
    /// `Containers.List`.
    fn list(&self, req: engine::ListContainersRequest) -> Fut<'_, Vec<engine::Container>> {
        missing("container list")
    }
    /// `Containers.Update`.
    fn update(
        &self,
        req: engine::UpdateContainerRequest,
    ) -> Fut<'_, engine::UpdateContainerResponse> {
        missing("container update")
    }
    /// `Containers.Rename`.
    fn rename(&self, req: engine::RenameContainerRequest) -> Fut<'_, ()> {
        missing("container rename")
    }
    /// `Containers.Delete`.
    fn delete(&self, req: engine::DeleteContainerRequest) -> Fut<'_, ()> {
        missing("container delete")
    }
    /// `Containers.Prune`.
    fn prune(
        &self,
        req: engine::PruneContainersRequest,
    ) -> Fut<'_, engine::PruneContainersResponse> {
        missing("container prune")
    }
    /// `Containers.ConnectNetwork`.
    fn connect_network(
        &self,
        req: engine::ConnectNetworkRequest,
    ) -> Fut<'_, engine::ConnectNetworkResponse> {
        missing("network connect")
    }
    /// `Containers.DisconnectNetwork`.
    fn disconnect_network(&self, req: engine::DisconnectNetworkRequest) -> Fut<'_, ()> {
        missing("network disconnect")
    }
    /// `Containers.Changes`.
    fn changes(&self, req: engine::ChangesRequest) -> Fut<'_, Vec<engine::Change>> {
        missing("container changes")
    }
    /// `Containers.Export`: the tar stream.
    fn export(&self, req: engine::ExportContainerRequest) -> Fut<'_, ByteStream> {
        missing("container export")
    }
    /// `Containers.Commit`: the new image's id.
    fn commit(&self, req: engine::CommitContainerRequest) -> Fut<'_, String> {
        missing("container commit")
    }
    /// `Containers.ArchiveStat`.
    fn archive_stat(
        &self,
        req: engine::ArchiveStatRequest,
    ) -> Fut<'_, engine::ArchiveStatResponse> {
        missing("container archive")
    }
    /// `Containers.ArchiveGet`: the stat (first message), then the tar stream.
    fn archive_get(
        &self,
        req: engine::ArchiveGetRequest,
    ) -> Fut<'_, (engine::ArchiveStatResponse, ByteStream)> {
        missing("container archive")
    }
    /// `Containers.ArchivePut`.
    fn archive_put(&self, options: engine::ArchivePutOptions, data: Input<Bytes>) -> Fut<'_, ()> {
        missing("container archive")
    }

    /// `Tasks.Start`.
    fn start(&self, req: engine::StartTaskRequest) -> Fut<'_, engine::StartTaskResponse> {
        missing("container start")
    }
    /// `Tasks.Stop`.
    fn stop(&self, req: engine::StopTaskRequest) -> Fut<'_, engine::StopTaskResponse> {
        missing("container stop")
    }
    /// `Tasks.Kill`.
    fn kill(&self, req: engine::KillTaskRequest) -> Fut<'_, ()> {
        missing("container kill")
    }
    /// `Tasks.Restart`.
    fn restart(&self, req: engine::RestartTaskRequest) -> Fut<'_, ()> {
        missing("container restart")
    }
    /// `Tasks.Pause`.
    fn pause(&self, req: engine::PauseTaskRequest) -> Fut<'_, ()> {
        missing("container pause")
    }
    /// `Tasks.Resume`.
    fn resume(&self, req: engine::ResumeTaskRequest) -> Fut<'_, ()> {
        missing("container unpause")
    }
    /// `Tasks.Wait`: `registered`, then `exit`.
    fn wait(&self, req: engine::WaitTaskRequest) -> Fut<'_, Stream<engine::WaitTaskResponse>> {
        missing("container wait")
    }
    /// `Tasks.Attach`: `input` starts with the options.
    fn attach(
        &self,
        input: Input<engine::AttachTaskRequest>,
    ) -> Fut<'_, Stream<engine::AttachTaskResponse>> {
        missing("container attach")
    }
    /// `Tasks.Logs`.
    fn logs(&self, req: engine::LogsRequest) -> Fut<'_, Stream<engine::LogsResponse>> {
        missing("container logs")
    }
    /// `Tasks.Stats`.
    fn stats(&self, req: engine::StatsRequest) -> Fut<'_, Stream<engine::StatsResponse>> {
        missing("container stats")
    }
    /// `Tasks.Top`.
    fn top(&self, req: engine::TopRequest) -> Fut<'_, engine::TopResponse> {
        missing("container top")
    }
    /// `Tasks.ResizePty`.
    fn resize(&self, req: engine::ResizePtyRequest) -> Fut<'_, ()> {
        missing("container resize")
    }
    /// `Tasks.ExecCreate`.
    fn exec_create(&self, req: engine::ExecCreateRequest) -> Fut<'_, engine::ExecCreateResponse> {
        missing("exec create")
    }
    /// `Tasks.ExecStart`: `input` starts with the options.
    fn exec_start(
        &self,
        input: Input<engine::ExecStartRequest>,
    ) -> Fut<'_, Stream<engine::ExecStartResponse>> {
        missing("exec start")
    }
    /// `Tasks.ExecResize`.
    fn exec_resize(&self, req: engine::ExecResizeRequest) -> Fut<'_, ()> {
        missing("exec resize")
    }
    /// `Tasks.ExecInspect`.
    fn exec_inspect(
        &self,
        req: engine::ExecInspectRequest,
    ) -> Fut<'_, engine::ExecInspectResponse> {
        missing("exec inspect")
    }
}

/// Images (berth-images' `Images`).
#[allow(unused_variables)]
pub trait ImagesApi: Send + Sync {
    /// `Images.Pull`.
    fn pull(&self, req: images::PullRequest) -> Fut<'_, Stream<images::PullResponse>> {
        missing("image pull")
    }
    /// `Images.Push`.
    fn push(&self, req: images::PushRequest) -> Fut<'_, Stream<images::PushResponse>> {
        missing("image push")
    }
    /// `Images.Get`.
    fn get(&self, req: images::GetImageRequest) -> Fut<'_, images::Image> {
        missing("image inspect")
    }
    /// `Images.List`.
    fn list(&self, req: images::ListImagesRequest) -> Fut<'_, Vec<images::Image>> {
        missing("image list")
    }
    /// `Images.Tag`.
    fn tag(&self, req: images::TagImageRequest) -> Fut<'_, images::TagImageResponse> {
        missing("image tag")
    }
    /// `Images.Delete`.
    fn delete(&self, req: images::DeleteImageRequest) -> Fut<'_, Vec<images::ImageDeleteItem>> {
        missing("image delete")
    }
    /// `Images.Prune`.
    fn prune(&self, req: images::PruneImagesRequest) -> Fut<'_, images::PruneImagesResponse> {
        missing("image prune")
    }
    /// `Images.Export`: the archive.
    fn export(&self, req: images::ExportImagesRequest) -> Fut<'_, ByteStream> {
        missing("image save")
    }
    /// `Images.Import`.
    fn import(
        &self,
        options: images::ImportOptions,
        data: Input<Bytes>,
    ) -> Fut<'_, images::ImportImagesResponse> {
        missing("image load")
    }
    /// `Images.ImportRootfs`.
    fn import_rootfs(
        &self,
        options: images::ImportRootfsOptions,
        data: Input<Bytes>,
    ) -> Fut<'_, images::ImportRootfsResponse> {
        missing("image import")
    }
    /// `Images.DiskUsage`.
    fn disk_usage(&self) -> Fut<'_, images::DiskUsageResponse> {
        missing("image disk usage")
    }
    /// `Images.InspectDistribution`.
    fn inspect_distribution(
        &self,
        req: images::InspectDistributionRequest,
    ) -> Fut<'_, images::InspectDistributionResponse> {
        missing("distribution inspect")
    }
    /// `Images.CacheLookup`: the image recorded for a build step's key, if any.
    fn cache_lookup(&self, key: String) -> Fut<'_, Option<String>> {
        missing("build cache")
    }
    /// `Images.CreateImage` without a layer: a child of `options.parent` with a new config and
    /// an empty-layer history entry. The new image's id.
    fn create_config_image(&self, options: images::CreateImageOptions) -> Fut<'_, String> {
        missing("image create")
    }
    /// `Images.CacheStore`.
    fn cache_store(&self, req: images::CacheStoreRequest) -> Fut<'_, ()> {
        missing("build cache")
    }
    /// `Images.CacheList`.
    fn cache_list(&self) -> Fut<'_, Vec<images::CacheEntry>> {
        missing("build cache")
    }
    /// `Images.CachePrune`.
    fn cache_prune(&self, req: images::CachePruneRequest) -> Fut<'_, images::CachePruneResponse> {
        missing("build cache")
    }
}

/// Volumes (berth-engine's `Volumes`).
#[allow(unused_variables)]
pub trait VolumesApi: Send + Sync {
    /// `Volumes.Create`.
    fn create(&self, req: engine::CreateVolumeRequest) -> Fut<'_, engine::Volume> {
        missing("volume create")
    }
    /// `Volumes.Get`.
    fn get(&self, req: engine::GetVolumeRequest) -> Fut<'_, engine::Volume> {
        missing("volume inspect")
    }
    /// `Volumes.List`.
    fn list(&self, req: engine::ListVolumesRequest) -> Fut<'_, engine::ListVolumesResponse> {
        missing("volume list")
    }
    /// `Volumes.Delete`.
    fn delete(&self, req: engine::DeleteVolumeRequest) -> Fut<'_, ()> {
        missing("volume remove")
    }
    /// `Volumes.Prune`.
    fn prune(&self, req: engine::PruneVolumesRequest) -> Fut<'_, engine::PruneVolumesResponse> {
        missing("volume prune")
    }
}

/// Networks (berth-network's `Networks`).
#[allow(unused_variables)]
pub trait NetworksApi: Send + Sync {
    /// `Networks.Create`.
    fn create(
        &self,
        req: network::CreateNetworkRequest,
    ) -> Fut<'_, network::CreateNetworkResponse> {
        missing("network create")
    }
    /// `Networks.Get`.
    fn get(&self, req: network::GetNetworkRequest) -> Fut<'_, network::Network> {
        missing("network inspect")
    }
    /// `Networks.List`.
    fn list(&self, req: network::ListNetworksRequest) -> Fut<'_, Vec<network::Network>> {
        missing("network list")
    }
    /// `Networks.Delete`.
    fn delete(&self, req: network::DeleteNetworkRequest) -> Fut<'_, ()> {
        missing("network remove")
    }
    /// `Networks.Prune`.
    fn prune(&self, req: network::PruneNetworksRequest) -> Fut<'_, Vec<String>> {
        missing("network prune")
    }
}

/// The events hub (berth-engine's `Events`).
#[allow(unused_variables)]
pub trait EventsApi: Send + Sync {
    /// `Events.Subscribe`.
    fn subscribe(&self, req: events::SubscribeRequest) -> Fut<'_, Stream<events::Envelope>> {
        missing("events")
    }
}

/// What a registry said to a login.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoginResult {
    /// An identity token to store instead of the password, if the registry issued one.
    pub identity_token: String,
}

/// One repository a registry's search found (Docker's `ImageSearchResponseItem`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SearchResult {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub star_count: i64,
    #[serde(default)]
    pub is_official: bool,
    /// Deprecated by Docker Hub; always sent as `false`.
    #[serde(default)]
    pub is_automated: bool,
}

/// The daemon as a whole: health, the host, registry logins and searches.
#[allow(unused_variables)]
pub trait SystemApi: Send + Sync {
    /// Whether the engine answers its health check.
    fn ping(&self) -> Fut<'_, bool> {
        Box::pin(async { Ok(false) })
    }
    /// Checks credentials against a registry.
    fn login(&self, auth: types::RegistryAuth) -> Fut<'_, LoginResult> {
        missing("registry login")
    }
    /// Searches the registry `term` names (Docker Hub unless it starts with a registry host)
    /// for at most `limit` repositories (0 = the registry's default).
    fn search(
        &self,
        term: String,
        limit: u32,
        auth: Option<types::RegistryAuth>,
    ) -> Fut<'_, Vec<SearchResult>> {
        missing("image search")
    }
}

/// Every backend the routes use.
#[derive(Clone)]
pub struct Backends {
    /// Containers and tasks.
    pub containers: Arc<dyn ContainersApi>,
    /// Images.
    pub images: Arc<dyn ImagesApi>,
    /// Volumes.
    pub volumes: Arc<dyn VolumesApi>,
    /// Networks.
    pub networks: Arc<dyn NetworksApi>,
    /// Events.
    pub events: Arc<dyn EventsApi>,
    /// System.
    pub system: Arc<dyn SystemApi>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends").finish_non_exhaustive()
    }
}
