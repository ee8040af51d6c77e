//! The CRI `ImageService` over an [`ImageStore`] (berth-images: one image store with the Docker
//! API, so an image a kubelet pulls is in `docker images`, and the other way round).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use berth_core::{Config, Error, ErrorKind, Service};
use berth_proto::berth::images::v1 as images;
use berth_proto::cri::runtime::v1 as cri;
use berth_proto::cri::runtime::v1::image_service_server::ImageService;
use futures::StreamExt;
use tonic::{Request, Response, Status};

use crate::Sockets;
use crate::backend::{GrpcImageStore, ImageStore};
use crate::convert;

/// The CRI image service.
#[derive(Debug)]
pub struct CriImages<S = GrpcImageStore> {
    store: Arc<S>,
    mountpoint: PathBuf,
    /// How long a pull may go without progress; `None`: forever.
    pull_progress_timeout: Option<Duration>,
}

impl CriImages {
    /// An image service over the services `sockets` names.
    pub fn new(config: &Config, sockets: &Sockets) -> Self {
        Self::with_store(
            GrpcImageStore::new(sockets, &config.snapshotter.driver),
            config,
        )
    }
}

impl<S: ImageStore> CriImages<S> {
    /// An image service over `store`.
    pub fn with_store(store: S, config: &Config) -> Self {
        Self {
            store: Arc::new(store),
            mountpoint: config.data_dir(Service::Snapshotter),
            pull_progress_timeout: match config.cri.image_pull_progress_timeout {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
        }
    }
}

#[tonic::async_trait]
impl<S: ImageStore> ImageService for CriImages<S> {
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
            Some(reference) => self.store.get(&reference).await?.into_iter().collect(),
            None => self.store.list().await?,
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
        let Some(img) = self.store.get(name).await? else {
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

    /// Pulls through the store (berth-images: its per-host registry configuration applies).
    /// When kubelet drops the call (cancellation or its deadline), this future is dropped,
    /// which drops the progress stream, which cancels the pull; so does a pull that makes no
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
            .store
            .pull(images::PullRequest {
                reference: name.to_string(),
                auth,
                cancel_when_gone: true,
                ..Default::default()
            })
            .await?;
        loop {
            let next = progress.next();
            let msg = match self.pull_progress_timeout {
                None => next.await,
                Some(limit) => tokio::time::timeout(limit, next).await.map_err(|_| {
                    Error::new(
                        ErrorKind::DeadlineExceeded,
                        format!(
                            "pull of {name} cancelled: no progress for {}s (image_pull_progress_timeout)",
                            limit.as_secs()
                        ),
                    )
                })?,
            };
            let Some(msg) = msg.transpose()? else {
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
        let Some(img) = self.store.get(name).await? else {
            return Ok(Response::new(cri::RemoveImageResponse {}));
        };
        if img.users > 0 {
            return Err(Error::failed_precondition(format!(
                "image {name} ({}) is in use by {} container(s)",
                img.id, img.users
            ))
            .into());
        }
        self.store.delete(&img.id).await?;
        Ok(Response::new(cri::RemoveImageResponse {}))
    }

    /// What the snapshotter's snapshots (image layers and containers' writable layers) take.
    async fn image_fs_info(
        &self,
        _req: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        let (bytes, inodes) = self.store.usage().await?;
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures::stream;

    use super::*;
    use crate::backend::{Fut, Progress};

    /// Images in memory; pulls answer from a script.
    #[derive(Default)]
    struct Fake {
        images: Mutex<Vec<images::Image>>,
        pulls: Mutex<Vec<images::PullRequest>>,
        /// A pull that never makes progress.
        stall: bool,
    }

    impl ImageStore for Fake {
        fn get<'a>(&'a self, reference: &'a str) -> Fut<'a, Option<images::Image>> {
            let found = self
                .images
                .lock()
                .unwrap()
                .iter()
                .find(|i| i.id == reference || i.repo_tags.iter().any(|t| t == reference))
                .cloned();
            Box::pin(async move { Ok(found) })
        }

        fn list(&self) -> Fut<'_, Vec<images::Image>> {
            let all = self.images.lock().unwrap().clone();
            Box::pin(async move { Ok(all) })
        }

        fn pull(&self, req: images::PullRequest) -> Fut<'_, Progress> {
            self.pulls.lock().unwrap().push(req.clone());
            let progress: Progress = if self.stall {
                stream::pending().boxed()
            } else {
                let done = images::PullResponse {
                    event: Some(images::pull_response::Event::Done(images::PullDone {
                        reference: req.reference,
                        image_id: "sha256:new".into(),
                        ..Default::default()
                    })),
                };
                stream::iter([Ok(images::PullResponse::default()), Ok(done)]).boxed()
            };
            Box::pin(async move { Ok(progress) })
        }

        fn delete<'a>(&'a self, id: &'a str) -> Fut<'a, ()> {
            self.images.lock().unwrap().retain(|i| i.id != id);
            Box::pin(async move { Ok(()) })
        }

        fn usage(&self) -> Fut<'_, (u64, u64)> {
            Box::pin(async move { Ok((4096, 12)) })
        }
    }

    fn image(id: &str, tag: &str, users: i64) -> images::Image {
        images::Image {
            id: id.into(),
            repo_tags: vec![tag.into()],
            users,
            ..Default::default()
        }
    }

    fn service(fake: Fake, timeout: u64) -> CriImages<Fake> {
        let mut config = Config::default();
        config.cri.image_pull_progress_timeout = timeout;
        CriImages::with_store(fake, &config)
    }

    fn spec(name: &str) -> Option<cri::ImageSpec> {
        Some(cri::ImageSpec {
            image: name.into(),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn removal_is_idempotent_and_refused_while_in_use() {
        let fake = Fake::default();
        fake.images
            .lock()
            .unwrap()
            .extend([image("sha256:a", "x:1", 1), image("sha256:b", "y:1", 0)]);
        let svc = service(fake, 0);
        let remove = |name: &str| Request::new(cri::RemoveImageRequest { image: spec(name) });
        let err = svc.remove_image(remove("x:1")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.message().contains("in use by 1 container"), "{err:?}");
        svc.remove_image(remove("y:1")).await.unwrap();
        svc.remove_image(remove("y:1")).await.unwrap();
        svc.remove_image(remove("nosuch:1")).await.unwrap();
        let left = svc.store.list().await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, "sha256:a");
        let err = svc.remove_image(remove("")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn status_of_a_missing_image_is_empty_and_lists_filter() {
        let fake = Fake::default();
        fake.images
            .lock()
            .unwrap()
            .extend([image("sha256:a", "x:1", 0), image("sha256:b", "y:1", 0)]);
        let svc = service(fake, 0);
        let st = svc
            .image_status(Request::new(cri::ImageStatusRequest {
                image: spec("nosuch:1"),
                verbose: true,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(st, cri::ImageStatusResponse::default());
        let all = svc
            .list_images(Request::new(cri::ListImagesRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(all.images.len(), 2);
        let one = svc
            .list_images(Request::new(cri::ListImagesRequest {
                filter: Some(cri::ImageFilter { image: spec("y:1") }),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(one.images.len(), 1);
        assert_eq!(one.images[0].id, "sha256:b");
        let none = svc
            .list_images(Request::new(cri::ListImagesRequest {
                filter: Some(cri::ImageFilter {
                    image: spec("nosuch:1"),
                }),
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(none.images.is_empty());
    }

    #[tokio::test]
    async fn pulls_pass_credentials_and_ask_to_be_cancelled_with_the_call() {
        let svc = service(Fake::default(), 300);
        let pulled = svc
            .pull_image(Request::new(cri::PullImageRequest {
                image: spec("registry.k8s.io/pause:3.10"),
                auth: Some(cri::AuthConfig {
                    username: "u".into(),
                    password: "p".into(),
                    ..Default::default()
                }),
                sandbox_config: None,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(pulled.image_ref, "sha256:new");
        let reqs = svc.store.pulls.lock().unwrap().clone();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].reference, "registry.k8s.io/pause:3.10");
        assert!(reqs[0].cancel_when_gone);
        let auth = reqs[0].auth.as_ref().unwrap();
        assert_eq!((auth.username.as_str(), auth.password.as_str()), ("u", "p"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pull_without_progress_times_out() {
        let svc = service(
            Fake {
                stall: true,
                ..Default::default()
            },
            300,
        );
        let err = svc
            .pull_image(Request::new(cri::PullImageRequest {
                image: spec("busybox"),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert!(err.message().contains("no progress for 300s"), "{err:?}");
    }

    #[tokio::test]
    async fn image_fs_usage_comes_from_the_store() {
        let svc = service(Fake::default(), 0);
        let fs = svc
            .image_fs_info(Request::new(cri::ImageFsInfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        let u = &fs.image_filesystems[0];
        assert_eq!(u.used_bytes, Some(cri::UInt64Value { value: 4096 }));
        assert_eq!(u.inodes_used, Some(cri::UInt64Value { value: 12 }));
        assert_eq!(
            u.fs_id.as_ref().unwrap().mountpoint,
            "/var/lib/berth/snapshotter"
        );
    }
}
