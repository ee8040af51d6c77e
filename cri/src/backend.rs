//! The narrow seams the CRI servers stand on, and their implementations over berth's services.

use std::pin::Pin;

use std::path::PathBuf;

use berth_core::grpc::ServingStatus;
use berth_core::uds::{Channel, channel};
use berth_core::{Error, Result};
use berth_proto::berth::images::v1 as images;
use berth_proto::berth::images::v1::images_client::ImagesClient;
use berth_proto::berth::network::v1 as network;
use berth_proto::berth::network::v1::networks_client::NetworksClient;
use berth_proto::containerd::services::snapshots::v1 as snapshots;
use berth_proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use crate::Sockets;
use crate::convert::not_found_is_none;

/// A boxed future of a berth result.
pub type Fut<'a, T> = BoxFuture<'a, Result<T>>;
/// A pull's progress messages; dropping the stream cancels the pull.
pub type Progress = BoxStream<'static, Result<images::PullResponse>>;

/// Snapshot usage queries in flight at once.
const USAGE_CONCURRENCY: usize = 8;

/// The image store and the image filesystem, as the CRI image service needs them. One store
/// with the Docker API: berth-images.
pub trait ImageStore: Send + Sync + 'static {
    /// The image `reference` (a reference, id or digest reference) names; `None` when there is
    /// none.
    fn get<'a>(&'a self, reference: &'a str) -> Fut<'a, Option<images::Image>>;
    /// Every image.
    fn list(&self) -> Fut<'_, Vec<images::Image>>;
    /// Starts a pull. The pull is cancelled when the returned stream is dropped.
    fn pull(&self, req: images::PullRequest) -> Fut<'_, Progress>;
    /// Deletes image `id` with all its names; one that is already gone is success.
    fn delete<'a>(&'a self, id: &'a str) -> Fut<'a, ()>;
    /// Bytes and inodes the snapshotter's snapshots take.
    fn usage(&self) -> Fut<'_, (u64, u64)>;
}

/// [`ImageStore`] over berth-images and the snapshotter.
#[derive(Debug, Clone)]
pub struct GrpcImageStore {
    images: ImagesClient<Channel>,
    snapshots: SnapshotsClient<Channel>,
    snapshotter: String,
}

impl GrpcImageStore {
    /// A store over the services `sockets` names; `snapshotter` is the snapshotter's name.
    pub fn new(sockets: &Sockets, snapshotter: &str) -> Self {
        Self {
            images: ImagesClient::new(channel(&sockets.images))
                .max_decoding_message_size(crate::MAX_MESSAGE),
            snapshots: SnapshotsClient::new(channel(&sockets.snapshotter)),
            snapshotter: snapshotter.to_string(),
        }
    }
}

impl ImageStore for GrpcImageStore {
    fn get<'a>(&'a self, reference: &'a str) -> Fut<'a, Option<images::Image>> {
        Box::pin(async move {
            let got = self
                .images
                .clone()
                .get(images::GetImageRequest {
                    reference: reference.to_string(),
                    platform: None,
                })
                .await;
            Ok(not_found_is_none(got)?.and_then(|r| r.into_inner().image))
        })
    }

    fn list(&self) -> Fut<'_, Vec<images::Image>> {
        Box::pin(async move {
            Ok(self
                .images
                .clone()
                .list(images::ListImagesRequest::default())
                .await?
                .into_inner()
                .images)
        })
    }

    fn pull(&self, req: images::PullRequest) -> Fut<'_, Progress> {
        Box::pin(async move {
            let stream = self.images.clone().pull(req).await?.into_inner();
            let progress: Pin<Box<_>> = Box::pin(stream.map_err(Error::from));
            Ok(progress as Progress)
        })
    }

    fn delete<'a>(&'a self, id: &'a str) -> Fut<'a, ()> {
        Box::pin(async move {
            let deleted = self
                .images
                .clone()
                .delete(images::DeleteImageRequest {
                    reference: id.to_string(),
                    // Every name goes: the CRI removes an image, not one of its names.
                    force: true,
                    ..Default::default()
                })
                .await;
            not_found_is_none(deleted)?;
            Ok(())
        })
    }

    /// Summed from the snapshotter's own `Usage` of each snapshot, as containerd reports it.
    fn usage(&self) -> Fut<'_, (u64, u64)> {
        Box::pin(async move {
            let listed: Vec<snapshots::ListSnapshotsResponse> = self
                .snapshots
                .clone()
                .list(snapshots::ListSnapshotsRequest {
                    snapshotter: self.snapshotter.clone(),
                    filters: Vec::new(),
                })
                .await?
                .into_inner()
                .try_collect()
                .await?;
            let keys = listed.into_iter().flat_map(|r| r.info).map(|i| i.name);
            let usages: Vec<std::result::Result<snapshots::UsageResponse, tonic::Status>> =
                futures::stream::iter(keys.map(|key| {
                    let mut client = self.snapshots.clone();
                    let snapshotter = self.snapshotter.clone();
                    async move {
                        client
                            .usage(snapshots::UsageRequest { snapshotter, key })
                            .await
                            .map(tonic::Response::into_inner)
                    }
                }))
                .buffer_unordered(USAGE_CONCURRENCY)
                .collect()
                .await;
            let (mut bytes, mut inodes) = (0u64, 0u64);
            for usage in usages {
                // `None`: removed between the list and the question.
                if let Some(u) = not_found_is_none(usage)? {
                    bytes += u64::try_from(u.size).unwrap_or(0);
                    inodes += u64::try_from(u.inodes).unwrap_or(0);
                }
            }
            Ok((bytes, inodes))
        })
    }
}

/// What the runtime service asks the rest of berth for its readiness.
pub trait RuntimeProbe: Send + Sync + 'static {
    /// berth-engine's health.
    fn engine_health(&self) -> Fut<'_, ServingStatus>;
    /// The CNI configs berth-network finds for pods (their files, the default first).
    fn cni_configs(&self) -> Fut<'_, Vec<String>>;
}

/// [`RuntimeProbe`] over berth-engine's health service and berth-network.
#[derive(Debug, Clone)]
pub struct GrpcRuntimeProbe {
    engine: PathBuf,
    networks: NetworksClient<Channel>,
}

impl GrpcRuntimeProbe {
    /// A probe of the services `sockets` names.
    pub fn new(sockets: &Sockets) -> Self {
        Self {
            engine: sockets.engine.clone(),
            networks: NetworksClient::new(channel(&sockets.network)),
        }
    }
}

impl RuntimeProbe for GrpcRuntimeProbe {
    fn engine_health(&self) -> Fut<'_, ServingStatus> {
        Box::pin(berth_core::grpc::check_health(&self.engine))
    }

    fn cni_configs(&self) -> Fut<'_, Vec<String>> {
        Box::pin(async move {
            Ok(self
                .networks
                .clone()
                .list_cni_configs(network::ListCniConfigsRequest {})
                .await?
                .into_inner()
                .configs
                .into_iter()
                .map(|c| c.path)
                .collect())
        })
    }
}
