//! The CRI `ImageService` over berth-images (one image store with the Docker API: an image a
//! kubelet pulls is in `docker images`, and the other way round) and the snapshotter (for the
//! image filesystem's usage).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use berth_core::uds::{Channel, channel};
use berth_core::{Config, Error, ErrorKind, Service};
use berth_proto::berth::images::v1 as images;
use berth_proto::berth::images::v1::images_client::ImagesClient;
use berth_proto::containerd::services::snapshots::v1 as snapshots;
use berth_proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use berth_proto::cri::runtime::v1 as cri;
use berth_proto::cri::runtime::v1::image_service_server::ImageService;
use futures::{StreamExt, TryStreamExt};
use tonic::{Request, Response, Status};

use crate::Sockets;
use crate::convert;

/// Snapshot usage queries in flight at once for `ImageFsInfo`.
const USAGE_CONCURRENCY: usize = 8;

/// The CRI image service.
#[derive(Debug, Clone)]
pub struct CriImages {
    images: ImagesClient<Channel>,
    snapshots: SnapshotsClient<Channel>,
    snapshotter: String,
    mountpoint: PathBuf,
    /// How long a pull may go without progress; `None`: forever.
    pull_progress_timeout: Option<Duration>,
}

impl CriImages {
    /// An image service over the services `sockets` names.
    pub fn new(config: &Config, sockets: &Sockets) -> Self {
        Self {
            images: ImagesClient::new(channel(&sockets.images))
                .max_decoding_message_size(crate::MAX_MESSAGE),
            snapshots: SnapshotsClient::new(channel(&sockets.snapshotter)),
            snapshotter: config.snapshotter.driver.clone(),
            mountpoint: config.data_dir(Service::Snapshotter),
            pull_progress_timeout: match config.cri.image_pull_progress_timeout {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
        }
    }

    /// The image `reference` names, or none.
    async fn find(&self, reference: &str) -> Result<Option<images::Image>, Error> {
        let got = self
            .images
            .clone()
            .get(images::GetImageRequest {
                reference: reference.to_string(),
                platform: None,
            })
            .await;
        match got {
            Ok(resp) => Ok(resp.into_inner().image),
            Err(status) => {
                let err = Error::from(status);
                if err.is(ErrorKind::NotFound) {
                    Ok(None)
                } else {
                    Err(err)
                }
            }
        }
    }
}

#[tonic::async_trait]
impl ImageService for CriImages {
    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let wanted = req
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|s| s.image)
            .filter(|s| !s.is_empty());
        let found = match wanted {
            Some(reference) => self.find(&reference).await?.into_iter().collect(),
            None => {
                self.images
                    .clone()
                    .list(images::ListImagesRequest::default())
                    .await?
                    .into_inner()
                    .images
            }
        };
        Ok(Response::new(cri::ListImagesResponse {
            images: found.iter().map(convert::image).collect(),
        }))
    }

    /// A missing image is an empty answer, not an error, as the CRI defines it.
    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let req = req.into_inner();
        let name = convert::image_name(req.image.as_ref())?;
        let Some(img) = self.find(name).await? else {
            return Ok(Response::new(cri::ImageStatusResponse::default()));
        };
        Ok(Response::new(cri::ImageStatusResponse {
            image: Some(convert::image(&img)),
            info: if req.verbose {
                convert::image_info(&img)
            } else {
                Default::default()
            },
        }))
    }

    /// Pulls through berth-images (its per-host registry configuration applies). When kubelet
    /// drops the call (cancellation or its deadline), this future is dropped, which drops the
    /// stream from berth-images, which cancels the pull there; so does a pull that makes no
    /// progress for `[cri] image_pull_progress_timeout`.
    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let req = req.into_inner();
        let name = convert::image_name(req.image.as_ref())?;
        let auth = convert::registry_auth(req.auth.as_ref())?;
        tracing::info!(image = name, "cri pull");
        let mut progress = self
            .images
            .clone()
            .pull(images::PullRequest {
                reference: name.to_string(),
                auth,
                cancel_when_gone: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        loop {
            let next = progress.message();
            let msg = match self.pull_progress_timeout {
                None => next.await?,
                Some(limit) => tokio::time::timeout(limit, next).await.map_err(|_| {
                    Error::new(
                        ErrorKind::DeadlineExceeded,
                        format!(
                            "pull of {name} cancelled: no progress for {}s (image_pull_progress_timeout)",
                            limit.as_secs()
                        ),
                    )
                })??,
            };
            let Some(msg) = msg else {
                break;
            };
            if let Some(images::pull_response::Event::Done(done)) = msg.event {
                return Ok(Response::new(cri::PullImageResponse {
                    image_ref: done.image_id,
                }));
            }
        }
        Err(Error::internal(format!("pull of {name} ended without a result")).into())
    }

    /// Removes the image with every name it has. An image that does not exist is success (the
    /// CRI's removals are idempotent); one that a container (of either the Docker or the CRI
    /// side) uses is refused.
    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let req = req.into_inner();
        let name = convert::image_name(req.image.as_ref())?;
        let Some(img) = self.find(name).await? else {
            return Ok(Response::new(cri::RemoveImageResponse {}));
        };
        if img.users > 0 {
            return Err(Error::failed_precondition(format!(
                "image {name} ({}) is in use by {} container(s)",
                img.id, img.users
            ))
            .into());
        }
        let deleted = self
            .images
            .clone()
            .delete(images::DeleteImageRequest {
                reference: img.id.clone(),
                // Every tag goes: the CRI removes an image, not one of its names.
                force: true,
                ..Default::default()
            })
            .await;
        match deleted {
            Ok(_) => Ok(Response::new(cri::RemoveImageResponse {})),
            Err(status) if status.code() == tonic::Code::NotFound => {
                Ok(Response::new(cri::RemoveImageResponse {}))
            }
            Err(status) => Err(status),
        }
    }

    /// What the snapshotter's snapshots (image layers and containers' writable layers) take:
    /// bytes and inodes, summed from the snapshotter's own `Usage`, as containerd reports it.
    async fn image_fs_info(
        &self,
        _req: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let infos: Vec<snapshots::ListSnapshotsResponse> = self
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
        let keys: Vec<String> = infos
            .into_iter()
            .flat_map(|r| r.info)
            .map(|i| i.name)
            .collect();
        let usages: Vec<Result<snapshots::UsageResponse, Status>> =
            futures::stream::iter(keys.into_iter().map(|key| {
                let mut client = self.snapshots.clone();
                let snapshotter = self.snapshotter.clone();
                async move {
                    client
                        .usage(snapshots::UsageRequest { snapshotter, key })
                        .await
                        .map(Response::into_inner)
                }
            }))
            .buffer_unordered(USAGE_CONCURRENCY)
            .collect()
            .await;
        let (mut bytes, mut inodes) = (0u64, 0u64);
        for usage in usages {
            match usage {
                Ok(u) => {
                    bytes += u64::try_from(u.size).unwrap_or(0);
                    inodes += u64::try_from(u.inodes).unwrap_or(0);
                }
                // Removed between the list and the question.
                Err(status) if status.code() == tonic::Code::NotFound => {}
                Err(status) => return Err(status),
            }
        }
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Ok(Response::new(cri::ImageFsInfoResponse {
            image_filesystems: vec![cri::FilesystemUsage {
                timestamp,
                fs_id: Some(cri::FilesystemIdentifier {
                    mountpoint: self.mountpoint.display().to_string(),
                }),
                used_bytes: Some(cri::UInt64Value { value: bytes }),
                inodes_used: Some(cri::UInt64Value { value: inodes }),
            }],
            container_filesystems: Vec::new(),
        }))
    }
}
