//! The `berth.images.v1.Images` gRPC service: a thin adapter from the wire to [`Images`].

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use berth_core::{Digest, Error, Reference, Result};
use berth_proto::berth::images::v1 as pb;
use berth_proto::berth::images::v1::images_server::Images as ImagesApi;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::archive::{ChannelReader, ChannelWriter, Format, ImportOptions};
use crate::convert::platform;
use crate::filters::{Filters, reference_matches};
use crate::pull::PullOptions;
use crate::push::PushOptions;
use crate::service::Images;

type Stream_<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send + 'static>>;

/// The gRPC face of the images service.
#[derive(Debug, Clone)]
pub struct ImagesService {
    images: Arc<Images>,
}

impl ImagesService {
    pub fn new(images: Arc<Images>) -> Self {
        Self { images }
    }
}

fn status(e: Error) -> Status {
    e.into()
}

/// Runs `op` in its own task, forwarding its events as stream items, then its result. The
/// operation goes on if the client goes away (a pull half done is still worth finishing),
/// unless `cancel_when_gone`: then the client's going aborts it.
fn run_streaming<E, R, T, F>(
    op: F,
    mut events: mpsc::UnboundedReceiver<E>,
    last: impl FnOnce(R) -> Option<T> + Send + 'static,
    cancel_when_gone: bool,
) -> Stream_<T>
where
    E: Into<T> + Send + 'static,
    R: Send + 'static,
    T: Send + 'static,
    F: Future<Output = Result<R>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<std::result::Result<T, Status>>(64);
    tokio::spawn(async move {
        let mut task = tokio::spawn(op);
        let mut gone = false;
        let result = loop {
            tokio::select! {
                biased;
                Some(e) = events.recv() => {
                    if !gone && tx.send(Ok(e.into())).await.is_err() {
                        gone = true;
                    }
                }
                r = &mut task => break r,
                () = tx.closed(), if cancel_when_gone => {
                    task.abort();
                    tracing::info!("caller went away; operation cancelled");
                    return;
                }
            }
        };
        while let Ok(e) = events.try_recv() {
            if !gone && tx.send(Ok(e.into())).await.is_err() {
                gone = true;
            }
        }
        let item = match result {
            Ok(Ok(r)) => last(r).map(Ok),
            Ok(Err(e)) => Some(Err(status(e))),
            Err(e) => Some(Err(Status::internal(format!("operation failed: {e}")))),
        };
        if let Some(item) = item {
            let _ = tx.send(item).await;
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl ImagesApi for ImagesService {
    type PullStream = Stream_<pb::PullResponse>;
    type PushStream = Stream_<pb::PushResponse>;
    type ExportStream = Stream_<pb::ExportImagesResponse>;
    type ReadContentStream = Stream_<pb::ReadContentResponse>;

    async fn pull(
        &self,
        req: Request<pb::PullRequest>,
    ) -> std::result::Result<Response<Self::PullStream>, Status> {
        let req = req.into_inner();
        let reference = Reference::parse(&req.reference).map_err(status)?;
        let opts = PullOptions {
            reference,
            platform: platform(req.platform, &self.images.platform),
            creds: req.auth.into(),
            snapshotter: req.snapshotter,
            skip_unpack: req.skip_unpack,
            labels: req.labels.into_iter().collect(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let images = self.images.clone();
        let cancel_when_gone = req.cancel_when_gone;
        let stream = run_streaming(
            async move {
                let done = images.pull(opts, tx).await;
                crate::metrics::pull_done(done.is_ok());
                done
            },
            rx,
            |done: crate::pull::PullDone| {
                Some(pb::PullResponse {
                    event: Some(pb::pull_response::Event::Done(pb::PullDone {
                        reference: done.reference,
                        image_id: done.image_id,
                        digest: done.digest,
                        updated: done.updated,
                    })),
                })
            },
            cancel_when_gone,
        );
        Ok(Response::new(stream))
    }

    async fn push(
        &self,
        req: Request<pb::PushRequest>,
    ) -> std::result::Result<Response<Self::PushStream>, Status> {
        let req = req.into_inner();
        Reference::parse_no_default(&req.reference).map_err(status)?;
        let opts = PushOptions {
            reference: req.reference,
            creds: req.auth.into(),
            all_tags: req.all_tags,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let images = self.images.clone();
        Ok(Response::new(run_streaming(
            async move { images.push(opts, tx).await },
            rx,
            |()| None,
            false,
        )))
    }

    async fn get(
        &self,
        req: Request<pb::GetImageRequest>,
    ) -> std::result::Result<Response<pb::GetImageResponse>, Status> {
        let req = req.into_inner();
        let found = self.images.resolve(&req.reference).map_err(status)?;
        if let Some(p) = platform(req.platform, &self.images.platform)
            && !p.matches(&found.record.platform)
        {
            return Err(status(Error::not_found(format!(
                "image {} is for {}, not {}",
                req.reference,
                found.record.platform.display(),
                p.display()
            ))));
        }
        Ok(Response::new(pb::GetImageResponse {
            image: Some(self.images.to_pb(&found.record).map_err(status)?),
        }))
    }

    async fn list(
        &self,
        req: Request<pb::ListImagesRequest>,
    ) -> std::result::Result<Response<pb::ListImagesResponse>, Status> {
        let req = req.into_inner();
        let f = Filters::parse(
            req.filters,
            &[
                "reference",
                "dangling",
                "label",
                "label!",
                "before",
                "since",
                "until",
            ],
        )
        .map_err(status)?;
        let imgs = &self.images;
        let created = |rec: &crate::meta::ImageRecord| -> SystemTime {
            imgs.config_of(rec)
                .ok()
                .and_then(|c| crate::oci::ImageConfig::parse(&c).ok())
                .and_then(|c| c.created.as_deref().and_then(crate::time::parse_rfc3339))
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        let dangling = f.dangling().map_err(status)?;
        let until = f.until(SystemTime::now()).map_err(status)?;
        let before = f
            .get("before")
            .first()
            .map(|r| imgs.resolve(r).map(|x| created(&x.record)))
            .transpose()
            .map_err(status)?;
        let since = f
            .get("since")
            .first()
            .map(|r| imgs.resolve(r).map(|x| created(&x.record)))
            .transpose()
            .map_err(status)?;
        let cached = imgs.cached_images().map_err(status)?;
        let mut out = Vec::new();
        for rec in imgs.meta.images().map_err(status)? {
            let tags = imgs.tags_of(&rec.id).map_err(status)?;
            // Build cache images are intermediate images: listed with `all` only.
            if !req.all && tags.is_empty() && cached.contains(&rec.id) {
                continue;
            }
            if let Some(d) = dangling
                && d != tags.is_empty()
            {
                continue;
            }
            if f.has("reference")
                && !f
                    .get("reference")
                    .iter()
                    .any(|p| tags.iter().any(|t| reference_matches(p, t)))
            {
                continue;
            }
            let c = created(&rec);
            if before.is_some_and(|b| c >= b)
                || since.is_some_and(|s| c <= s)
                || until.is_some_and(|u| c >= u)
            {
                continue;
            }
            if f.has("label") || f.has("label!") {
                let labels = imgs
                    .config_of(&rec)
                    .ok()
                    .and_then(|c| crate::oci::ImageConfig::parse(&c).ok())
                    .map(|c| c.labels())
                    .unwrap_or_default();
                if !f.labels_match(&labels) {
                    continue;
                }
            }
            match imgs.to_pb(&rec) {
                Ok(p) => out.push(p),
                Err(err) => {
                    tracing::warn!(image = %rec.id, error = %err.chain(), "image record unreadable; skipped")
                }
            }
        }
        Ok(Response::new(pb::ListImagesResponse { images: out }))
    }

    async fn tag(
        &self,
        req: Request<pb::TagImageRequest>,
    ) -> std::result::Result<Response<pb::TagImageResponse>, Status> {
        let req = req.into_inner();
        let (reference, image_id) = self.images.tag(&req.source, &req.target).map_err(status)?;
        Ok(Response::new(pb::TagImageResponse {
            reference,
            image_id,
        }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteImageRequest>,
    ) -> std::result::Result<Response<pb::DeleteImageResponse>, Status> {
        let req = req.into_inner();
        let items = self
            .images
            .delete(&req.reference, req.force)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteImageResponse {
            items: items.into_iter().map(Into::into).collect(),
        }))
    }

    async fn prune(
        &self,
        req: Request<pb::PruneImagesRequest>,
    ) -> std::result::Result<Response<pb::PruneImagesResponse>, Status> {
        let req = req.into_inner();
        let f = Filters::parse(req.filters, &["dangling", "until", "label", "label!"])
            .map_err(status)?;
        let only_dangling = f.dangling().map_err(status)?.unwrap_or(true);
        let until = f.until(SystemTime::now()).map_err(status)?;
        let users = self.images.meta.users().map_err(status)?;
        let before = self
            .images
            .content
            .list()
            .map_err(status)?
            .iter()
            .map(|b| b.size as u64)
            .sum::<u64>();
        let cached = self.images.cached_images().map_err(status)?;
        let mut items = Vec::new();
        for rec in self.images.meta.images().map_err(status)? {
            // The build cache keeps its images until `docker builder prune`.
            if users.iter().any(|(_, i)| *i == rec.id) || cached.contains(&rec.id) {
                continue;
            }
            let tags = self.images.tags_of(&rec.id).map_err(status)?;
            if only_dangling && !tags.is_empty() {
                continue;
            }
            let cfg = self
                .images
                .config_of(&rec)
                .ok()
                .and_then(|c| crate::oci::ImageConfig::parse(&c).ok());
            if let Some(u) = until {
                let c = cfg
                    .as_ref()
                    .and_then(|c| c.created.as_deref().and_then(crate::time::parse_rfc3339));
                if c.is_none_or(|c| c >= u) {
                    continue;
                }
            }
            if !f.labels_match(&cfg.map(|c| c.labels()).unwrap_or_default()) {
                continue;
            }
            match self.images.delete(&rec.id, true).await {
                Ok(i) => items.extend(i),
                Err(err) => tracing::warn!(image = %rec.id, error = %err.chain(), "prune"),
            }
        }
        let after = self
            .images
            .content
            .list()
            .map_err(status)?
            .iter()
            .map(|b| b.size as u64)
            .sum::<u64>();
        Ok(Response::new(pb::PruneImagesResponse {
            items: items.into_iter().map(Into::into).collect(),
            space_reclaimed: before.saturating_sub(after),
        }))
    }

    async fn export(
        &self,
        req: Request<pb::ExportImagesRequest>,
    ) -> std::result::Result<Response<Self::ExportStream>, Status> {
        let req = req.into_inner();
        if req.references.is_empty() {
            return Err(Status::invalid_argument("no images to export"));
        }
        let format = match pb::ArchiveFormat::try_from(req.format)
            .unwrap_or(pb::ArchiveFormat::Unspecified)
        {
            pb::ArchiveFormat::OciLayout => Format::Oci,
            _ => Format::Docker,
        };
        let selection = self
            .images
            .export_selection(&req.references)
            .map_err(status)?;
        let (btx, mut brx) = mpsc::channel::<bytes::Bytes>(8);
        let (tx, rx) = mpsc::channel(8);
        let images = self.images.clone();
        let job = tokio::task::spawn_blocking(move || {
            let _op = images.gc_lock.blocking_read();
            images.export(&selection, format, ChannelWriter::new(btx))
        });
        tokio::spawn(async move {
            while let Some(b) = brx.recv().await {
                if tx
                    .send(Ok(pb::ExportImagesResponse { data: b.to_vec() }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let result = job
                .await
                .map_err(|e| Error::internal("export task").with_source(e))
                .and_then(|r| r);
            if let Err(e) = result {
                let _ = tx.send(Err(status(e))).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn import(
        &self,
        req: Request<Streaming<pb::ImportImagesRequest>>,
    ) -> std::result::Result<Response<pb::ImportImagesResponse>, Status> {
        use pb::import_images_request::Part;
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty import stream"))?;
        let (opts, first_data) = match first.part {
            Some(Part::Options(o)) => (o, None),
            Some(Part::Data(d)) => (pb::ImportOptions::default(), Some(d)),
            None => {
                return Err(Status::invalid_argument(
                    "import message without options or data",
                ));
            }
        };
        let reader = upload_reader(stream, first_data, |m: pb::ImportImagesRequest| {
            match m.part {
                Some(Part::Data(d)) => Some(d),
                _ => None,
            }
        });
        let iopts = ImportOptions {
            platform: platform(opts.platform, &self.images.platform),
            snapshotter: opts.snapshotter,
            skip_unpack: opts.skip_unpack,
        };
        let loaded = self.images.import(reader, iopts).await.map_err(status)?;
        Ok(Response::new(pb::ImportImagesResponse {
            images: loaded
                .into_iter()
                .map(|(image_id, references)| pb::LoadedImage {
                    image_id,
                    references,
                })
                .collect(),
        }))
    }

    async fn import_rootfs(
        &self,
        req: Request<Streaming<pb::ImportRootfsRequest>>,
    ) -> std::result::Result<Response<pb::ImportRootfsResponse>, Status> {
        use pb::import_rootfs_request::Part;
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty import stream"))?;
        let Some(Part::Options(opts)) = first.part else {
            return Err(Status::invalid_argument(
                "the first message of an import must carry its options",
            ));
        };
        let reader = upload_reader(stream, None, |m: pb::ImportRootfsRequest| match m.part {
            Some(Part::Data(d)) => Some(d),
            _ => None,
        });
        let ro = crate::rootfs::RootfsOptions {
            reference: opts.reference,
            changes: opts.changes,
            message: opts.message,
            platform: platform(opts.platform, &self.images.platform),
            snapshotter: opts.snapshotter,
        };
        let (image_id, reference) = self
            .images
            .import_rootfs(reader, ro)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ImportRootfsResponse {
            image_id,
            reference,
        }))
    }

    async fn create_image(
        &self,
        req: Request<Streaming<pb::CreateImageRequest>>,
    ) -> std::result::Result<Response<pb::CreateImageResponse>, Status> {
        use pb::create_image_request::Part;
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty create stream"))?;
        let Some(Part::Options(o)) = first.part else {
            return Err(Status::invalid_argument(
                "the first message of a create must carry its options",
            ));
        };
        let reader = upload_reader(stream, None, |m: pb::CreateImageRequest| match m.part {
            Some(Part::Data(d)) => Some(d),
            _ => None,
        });
        let co = crate::child::ChildOptions {
            parent: o.parent,
            config: o.config,
            container_config: o.container_config,
            container: o.container,
            created_by: o.created_by,
            author: o.author,
            comment: o.comment,
            empty_layer: o.empty_layer,
            reference: o.reference,
            snapshotter: o.snapshotter,
        };
        // Run to the end even when the caller goes away: a half-made image is undone.
        let images = self.images.clone();
        let (image_id, reference) =
            tokio::spawn(async move { images.create_child(reader, co).await })
                .await
                .map_err(|e| Status::internal(format!("create task: {e}")))?
                .map_err(status)?;
        Ok(Response::new(pb::CreateImageResponse {
            image_id,
            reference,
        }))
    }

    async fn resolve(
        &self,
        req: Request<pb::ResolveImageRequest>,
    ) -> std::result::Result<Response<pb::ResolveImageResponse>, Status> {
        let req = req.into_inner();
        let found = self.images.resolve(&req.reference).map_err(status)?;
        let want = platform(req.platform, &self.images.platform)
            .unwrap_or_else(|| self.images.platform.clone());
        if !want.matches(&found.record.platform) {
            return Err(status(Error::not_found(format!(
                "image {} is for {}, not {}",
                req.reference,
                found.record.platform.display(),
                want.display()
            ))));
        }
        let view = if req.host_ids {
            self.images.plain_snapshotter_name(&req.snapshotter)
        } else {
            self.images.snapshotter_name(&req.snapshotter)
        };
        let rec = self
            .images
            .ensure_unpacked(&found.record, &view)
            .await
            .map_err(status)?;
        let config = self.images.config_of(&rec).map_err(status)?;
        let snapshot_key = if rec.chain_id.is_empty() {
            String::new()
        } else {
            self.images.snapshotter(&view).key(&rec.chain_id)
        };
        Ok(Response::new(pb::ResolveImageResponse {
            image_id: rec.id.clone(),
            reference: found.reference.map(|r| r.to_string()).unwrap_or_default(),
            chain_id: rec.chain_id.clone(),
            config,
            platform: Some((&rec.platform).into()),
            snapshotter: self.images.plain_snapshotter_name(&req.snapshotter),
            target: Some((&rec.target).into()),
            snapshot_key,
        }))
    }

    async fn disk_usage(
        &self,
        _req: Request<pb::DiskUsageRequest>,
    ) -> std::result::Result<Response<pb::DiskUsageResponse>, Status> {
        let imgs = &self.images;
        let records = imgs.meta.images().map_err(status)?;
        let users = imgs.meta.users().map_err(status)?;
        let mut count: BTreeMap<String, usize> = BTreeMap::new();
        let mut layer_size: BTreeMap<String, i64> = BTreeMap::new();
        for rec in &records {
            let chains = crate::oci::chain_ids(
                &rec.diff_ids
                    .iter()
                    .filter_map(|d| d.parse::<Digest>().ok())
                    .collect::<Vec<_>>(),
            );
            let unique: BTreeSet<String> = chains.iter().map(|c| c.to_string()).collect();
            for (c, (d, l)) in chains.iter().zip(rec.diff_ids.iter().zip(&rec.layers)) {
                if let Ok(dd) = d.parse::<Digest>() {
                    layer_size.insert(c.to_string(), imgs.layer_size(&dd, l.size));
                }
            }
            for c in unique {
                *count.entry(c).or_default() += 1;
            }
        }
        let mut images = Vec::new();
        for rec in &records {
            let chains = crate::oci::chain_ids(
                &rec.diff_ids
                    .iter()
                    .filter_map(|d| d.parse::<Digest>().ok())
                    .collect::<Vec<_>>(),
            );
            let shared: i64 = chains
                .iter()
                .filter(|c| count.get(c.as_str()).copied().unwrap_or(0) > 1)
                .map(|c| layer_size.get(c.as_str()).copied().unwrap_or(0))
                .sum();
            images.push(pb::ImageDiskUsage {
                image_id: rec.id.clone(),
                size: rec.size,
                shared_size: shared,
                containers: users.iter().filter(|(_, i)| *i == rec.id).count() as i64,
            });
        }
        let content_size = imgs
            .content
            .list()
            .map_err(status)?
            .iter()
            .map(|b| b.size)
            .sum();
        Ok(Response::new(pb::DiskUsageResponse {
            layers_size: layer_size.values().sum(),
            images,
            content_size,
        }))
    }

    async fn add_user(
        &self,
        req: Request<pb::AddImageUserRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let req = req.into_inner();
        let u = req
            .user
            .ok_or_else(|| Status::invalid_argument("user is required"))?;
        if req.owner.is_empty() || u.id.is_empty() {
            return Err(Status::invalid_argument("owner and user id are required"));
        }
        self.images
            .add_user(&req.owner, &u.kind, &u.id, &u.image_id)
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn remove_user(
        &self,
        req: Request<pb::RemoveImageUserRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let req = req.into_inner();
        let u = req
            .user
            .ok_or_else(|| Status::invalid_argument("user is required"))?;
        self.images
            .remove_user(&req.owner, &u.kind, &u.id)
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn set_users(
        &self,
        req: Request<pb::SetImageUsersRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let req = req.into_inner();
        if req.owner.is_empty() {
            return Err(Status::invalid_argument("owner is required"));
        }
        let users = req
            .users
            .into_iter()
            .map(|u| (u.kind, u.id, u.image_id))
            .collect();
        self.images
            .set_users(&req.owner, users)
            .await
            .map_err(status)?;
        Ok(Response::new(()))
    }

    async fn garbage_collect(
        &self,
        req: Request<pb::GarbageCollectRequest>,
    ) -> std::result::Result<Response<pb::GarbageCollectResponse>, Status> {
        let report = self
            .images
            .gc(req.into_inner().dry_run)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::GarbageCollectResponse {
            removed_blobs: report.blobs,
            removed_snapshots: report.snapshots,
            bytes_freed: report.bytes,
        }))
    }

    async fn content_info(
        &self,
        req: Request<pb::ContentInfoRequest>,
    ) -> std::result::Result<Response<pb::ContentInfoResponse>, Status> {
        let d: Digest = req.into_inner().digest.parse().map_err(status)?;
        let info = self.images.content.info(&d).map_err(status)?;
        Ok(Response::new(pb::ContentInfoResponse {
            info: Some(self.content_pb(info)),
        }))
    }

    async fn list_content(
        &self,
        req: Request<pb::ListContentRequest>,
    ) -> std::result::Result<Response<pb::ListContentResponse>, Status> {
        let f = Filters::parse(req.into_inner().filters, &["digest", "label"]).map_err(status)?;
        let mut infos = Vec::new();
        for info in self.images.content.list().map_err(status)? {
            if f.has("digest")
                && !f
                    .get("digest")
                    .iter()
                    .any(|p| info.digest.as_str().starts_with(p.as_str()))
            {
                continue;
            }
            let pbi = self.content_pb(info);
            if f.has("label") && !f.labels_match(&pbi.labels.clone().into_iter().collect()) {
                continue;
            }
            infos.push(pbi);
        }
        Ok(Response::new(pb::ListContentResponse { infos }))
    }

    async fn inspect_distribution(
        &self,
        req: Request<pb::InspectDistributionRequest>,
    ) -> std::result::Result<Response<pb::InspectDistributionResponse>, Status> {
        let req = req.into_inner();
        let reference = Reference::parse(&req.reference).map_err(status)?;
        let d = self
            .images
            .inspect_distribution(&reference, &req.auth.into())
            .await
            .map_err(status)?;
        Ok(Response::new(pb::InspectDistributionResponse {
            descriptor: Some((&d.descriptor).into()),
            platforms: d.platforms.iter().map(Into::into).collect(),
        }))
    }

    async fn read_content(
        &self,
        req: Request<pb::ReadContentRequest>,
    ) -> std::result::Result<Response<Self::ReadContentStream>, Status> {
        use std::io::{Read, Seek, SeekFrom};
        let req = req.into_inner();
        let d: Digest = req.digest.parse().map_err(status)?;
        if req.offset < 0 || req.size < 0 {
            return Err(Status::invalid_argument(
                "offset and size must not be negative",
            ));
        }
        let mut f = self.images.content.open_blob(&d).map_err(status)?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if req.offset as u64 > len {
            return Err(Status::out_of_range(format!(
                "offset {} is past the end of {d} ({len} bytes)",
                req.offset
            )));
        }
        let end = if req.size == 0 {
            len
        } else {
            (req.offset as u64 + req.size as u64).min(len)
        };
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut pos = req.offset as u64;
            if let Err(e) = f.seek(SeekFrom::Start(pos)) {
                let _ = tx.blocking_send(Err(Status::internal(format!("seek: {e}"))));
                return;
            }
            while pos < end {
                let mut buf = vec![0u8; ((end - pos) as usize).min(1 << 20)];
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx
                            .blocking_send(Ok(pb::ReadContentResponse {
                                offset: pos as i64,
                                data: buf,
                            }))
                            .is_err()
                        {
                            return;
                        }
                        pos += n as u64;
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::internal(format!("read {d}: {e}"))));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cache_lookup(
        &self,
        req: Request<pb::CacheLookupRequest>,
    ) -> std::result::Result<Response<pb::CacheLookupResponse>, Status> {
        let key = req.into_inner().key;
        let image_id = self.images.cache_lookup(&key).map_err(status)?;
        Ok(Response::new(pb::CacheLookupResponse {
            image_id: image_id.unwrap_or_default(),
        }))
    }

    async fn cache_store(
        &self,
        req: Request<pb::CacheStoreRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let req = req.into_inner();
        if req.key.is_empty() || req.image_id.is_empty() {
            return Err(Status::invalid_argument("key and image_id are required"));
        }
        let rec = crate::cache::CacheRecord {
            image_id: req.image_id,
            parent_id: req.parent_id,
            created_by: req.created_by,
            created_nanos: 0,
        };
        self.images.cache_store(&req.key, rec).map_err(status)?;
        Ok(Response::new(()))
    }

    async fn cache_list(
        &self,
        _req: Request<pb::CacheListRequest>,
    ) -> std::result::Result<Response<pb::CacheListResponse>, Status> {
        let entries = self
            .images
            .cache_list()
            .map_err(status)?
            .into_iter()
            .map(|(key, r, size)| pb::CacheEntry {
                key,
                image_id: r.image_id,
                parent_id: r.parent_id,
                created_by: r.created_by,
                created: Some(prost_types::Timestamp {
                    seconds: r.created_nanos / 1_000_000_000,
                    nanos: (r.created_nanos % 1_000_000_000) as i32,
                }),
                size,
            })
            .collect();
        Ok(Response::new(pb::CacheListResponse { entries }))
    }

    async fn cache_prune(
        &self,
        req: Request<pb::CachePruneRequest>,
    ) -> std::result::Result<Response<pb::CachePruneResponse>, Status> {
        let req = req.into_inner();
        let f = Filters::parse(req.filters, &["until"]).map_err(status)?;
        let until = f.until(SystemTime::now()).map_err(status)?;
        let pruned = self.images.cache_prune(until).await.map_err(status)?;
        Ok(Response::new(pb::CachePruneResponse {
            deleted: pruned.keys,
            space_reclaimed: pruned.bytes,
        }))
    }
}

impl ImagesService {
    fn content_pb(&self, info: crate::content::BlobInfo) -> pb::ContentInfo {
        let labels = self
            .images
            .meta
            .content_labels(info.digest.as_str())
            .unwrap_or_default();
        let t = crate::time::to_timestamp(info.created);
        pb::ContentInfo {
            digest: info.digest.to_string(),
            size: info.size,
            created_at: Some(t),
            updated_at: Some(t),
            labels: labels.into_iter().collect(),
        }
    }
}

/// Feeds the data parts of a client-streamed upload (after its options message) into a reader.
/// `data` returns a message's bytes, or `None` for a message that is not data, which fails the
/// upload as it does mid-stream options.
fn upload_reader<M, F>(
    mut stream: Streaming<M>,
    first_data: Option<Vec<u8>>,
    data: F,
) -> ChannelReader
where
    M: Send + 'static,
    F: Fn(M) -> Option<Vec<u8>> + Send + 'static,
{
    let (tx, reader) = ChannelReader::new();
    tokio::spawn(async move {
        if let Some(d) = first_data
            && tx.send(Ok(d.into())).await.is_err()
        {
            return;
        }
        loop {
            let next = match stream.message().await {
                Ok(Some(m)) => match data(m) {
                    Some(d) => Ok(d.into()),
                    None => Err(std::io::Error::other(
                        "unexpected options in the middle of an import",
                    )),
                },
                Ok(None) => return,
                Err(e) => Err(std::io::Error::other(format!(
                    "import stream: {}",
                    e.message()
                ))),
            };
            let failed = next.is_err();
            if tx.send(next).await.is_err() || failed {
                return;
            }
        }
    });
    reader
}
