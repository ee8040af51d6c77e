//! Pulling: resolve the manifest, download layers in parallel into the content store, and unpack
//! them into snapshots while they download.
//!
//! Each missing blob gets a [`Download`]: a task that writes it into a content-store ingest
//! (resuming what an earlier, maybe killed, process left) and publishes how many bytes are on
//! disk. Unpacking walks the layers bottom-up, since each snapshot's parent is the one below, and
//! reads every layer through a [`TailReader`] that follows its ingest file as it grows: layer 1
//! is extracted while layers 2..n are still downloading, and each layer's extraction starts
//! before its own download ends. A snapshot is committed only after its blob's digest and its
//! diff id both checked out; on any failure the active snapshot is removed, so nothing from a bad
//! layer is ever visible.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use berth_core::mount::MountGuard;
use berth_core::snapshots::{Kind, Labels, Snapshotter};
use berth_core::{Digest, Error, ErrorKind, Reference, Result};
use bytes::BytesMut;
use io::Write as _;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::meta::{self, ImageRecord, LayerInfo};
use crate::oci::{self, Compression, Descriptor, ManifestKind, Platform};
use crate::registry::{Credentials, Repository, http_error, is_tls_error};
use crate::service::{EXTRACT_PREFIX, Images, MAX_CONFIG};
use crate::view::SnapshotView;

/// Docker's per-layer pull states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    PullingFsLayer,
    Waiting,
    Downloading,
    VerifyingChecksum,
    DownloadComplete,
    Extracting,
    PullComplete,
    AlreadyExists,
    Retrying,
}

/// What a pull reports while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    Started {
        repository: String,
        name: String,
        tag_or_digest: String,
    },
    Layer {
        digest: String,
        phase: Phase,
        current: i64,
        total: i64,
        retry_in: u32,
    },
}

/// Where pull progress goes. Unbounded so that no download or unpack ever waits on a slow
/// client; events are rate-limited at the source.
pub type Events = mpsc::UnboundedSender<PullEvent>;

fn layer_event(events: &Events, digest: &Digest, phase: Phase, current: u64, total: u64) {
    let _ = events.send(PullEvent::Layer {
        digest: digest.to_string(),
        phase,
        current: current as i64,
        total: total as i64,
        retry_in: 0,
    });
}

/// What to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub reference: Reference,
    pub platform: Option<Platform>,
    pub creds: Credentials,
    pub snapshotter: String,
    pub skip_unpack: bool,
    pub labels: BTreeMap<String, String>,
}

/// The result of a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullDone {
    pub reference: String,
    pub image_id: String,
    pub digest: String,
    pub updated: bool,
}

#[derive(Debug, Clone)]
enum Status {
    Queued,
    Running(PathBuf),
    /// All bytes are in the ingest file and their size and digest checked out; the blob is
    /// being made durable (fsync) and moved into the store.
    Verified(PathBuf),
    Done(PathBuf),
    Failed(ErrorKind, String),
}

#[derive(Debug)]
struct State {
    status: Status,
    /// Bytes of the blob on disk (in the ingest file or the blob).
    written: u64,
}

/// One blob on its way into the content store (or already there).
#[derive(Debug)]
pub struct Download {
    pub digest: Digest,
    pub size: u64,
    state: Mutex<State>,
    cv: Condvar,
    changed: watch::Sender<()>,
}

impl Download {
    fn new(digest: Digest, size: u64, status: Status, written: u64) -> Arc<Self> {
        Arc::new(Self {
            digest,
            size,
            state: Mutex::new(State { status, written }),
            cv: Condvar::new(),
            changed: watch::channel(()).0,
        })
    }

    /// A blob already in the store.
    pub fn local(digest: Digest, size: u64, path: PathBuf) -> Arc<Self> {
        Self::new(digest, size, Status::Done(path), size)
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        let mut st = self.state.lock().unwrap();
        f(&mut st);
        drop(st);
        self.cv.notify_all();
        self.changed.send_replace(());
    }

    fn fail(&self, err: &Error) {
        let (kind, msg) = (err.kind(), err.chain());
        self.update(|s| s.status = Status::Failed(kind, msg));
    }

    /// Waits until the blob is verified and in the store (or the download failed).
    pub async fn wait(&self) -> Result<()> {
        self.wait_for(false).await
    }

    /// Waits until the blob's size and digest checked out (or the download failed): enough to
    /// commit what was unpacked from it, whose bytes are then known good, without waiting for
    /// the blob's own fsync. The image record still waits for [`Download::wait`].
    pub async fn wait_verified(&self) -> Result<()> {
        self.wait_for(true).await
    }

    async fn wait_for(&self, verified_is_enough: bool) -> Result<()> {
        let mut rx = self.changed.subscribe();
        loop {
            {
                let st = self.state.lock().unwrap();
                match &st.status {
                    Status::Done(_) => return Ok(()),
                    Status::Verified(_) if verified_is_enough => return Ok(()),
                    Status::Failed(kind, msg) => return Err(Error::new(*kind, msg.clone())),
                    _ => {}
                }
            }
            if rx.changed().await.is_err() {
                return Err(Error::internal("download state dropped"));
            }
        }
    }

    /// A reader of the blob's bytes that follows the download.
    pub fn reader(self: &Arc<Self>, consumed: Arc<AtomicU64>) -> TailReader {
        TailReader {
            dl: self.clone(),
            file: None,
            pos: 0,
            consumed,
        }
    }
}

/// Reads a blob while it is being downloaded: blocks until more bytes are on disk, ends when the
/// verified blob is complete, fails when the download failed.
#[derive(Debug)]
pub struct TailReader {
    dl: Arc<Download>,
    file: Option<File>,
    pos: u64,
    consumed: Arc<AtomicU64>,
}

impl Read for TailReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut st = self.dl.state.lock().unwrap();
        loop {
            // `done`: every byte is on disk and verified; `moved`: under its final path.
            let (path, done, moved) = match &st.status {
                Status::Queued => {
                    st = self.dl.cv.wait(st).unwrap();
                    continue;
                }
                Status::Running(p) => (p, false, false),
                Status::Verified(p) => (p, true, false),
                Status::Done(p) => (p, true, true),
                Status::Failed(_, msg) => return Err(io::Error::other(msg.clone())),
            };
            if self.file.is_none() {
                // The open file stays valid across the rename that publishes the blob. Between
                // that rename and the status change to Done the ingest path is gone: wait.
                match File::open(path) {
                    Ok(f) => self.file = Some(f),
                    Err(e) if e.kind() == io::ErrorKind::NotFound && !moved => {
                        st = self
                            .dl
                            .cv
                            .wait_timeout(st, Duration::from_millis(50))
                            .unwrap()
                            .0;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            if self.pos < st.written {
                let n = (st.written - self.pos).min(buf.len() as u64) as usize;
                drop(st);
                let got = self
                    .file
                    .as_ref()
                    .expect("opened")
                    .read_at(&mut buf[..n], self.pos)?;
                self.pos += got as u64;
                self.consumed.store(self.pos, Ordering::Relaxed);
                return Ok(got);
            }
            if done {
                return Ok(0);
            }
            st = self.dl.cv.wait(st).unwrap();
        }
    }
}

/// What a registry holds for a reference: see [`Images::inspect_distribution`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distribution {
    /// The manifest or index the reference resolves to.
    pub descriptor: Descriptor,
    pub platforms: Vec<Platform>,
}

/// The platforms an index offers (its entries that name one), or `None` for a single manifest.
pub fn index_platforms(media_type: &str, data: &[u8]) -> Result<Option<Vec<Platform>>> {
    match oci::manifest_kind(media_type) {
        Some(ManifestKind::Index) => Ok(Some(
            oci::parse_index(data)?
                .manifests
                .into_iter()
                .filter_map(|m| m.platform)
                .collect(),
        )),
        Some(ManifestKind::Manifest) => Ok(None),
        None => Err(Error::invalid_argument(format!(
            "unsupported manifest media type {media_type:?}"
        ))),
    }
}

impl Images {
    /// Resolves `r` on its registry (mirrors first for Docker Hub) without pulling: the
    /// descriptor of what it names, and its platforms, from the index's entries or from a single
    /// manifest's image config (for OCI manifests as well as Docker's).
    pub async fn inspect_distribution(
        &self,
        r: &Reference,
        creds: &Credentials,
    ) -> Result<Distribution> {
        let tag_or_digest = match (r.digest(), r.tag()) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.to_string(),
            (None, None) => berth_core::reference::DEFAULT_TAG.to_string(),
        };
        let (repo, top) = self
            .registries
            .resolve(r.domain(), r.path(), creds, &tag_or_digest)
            .await
            .map_err(|err| crate::registry::not_found(err, r))?;
        let descriptor = Descriptor {
            media_type: top.media_type.clone(),
            digest: top.digest.to_string(),
            size: top.data.len() as i64,
            ..Default::default()
        };
        let platforms = match index_platforms(&top.media_type, &top.data)? {
            Some(platforms) => platforms,
            None => {
                let manifest = oci::parse_manifest(&top.data)?;
                let cfg = repo
                    .get_small_blob(&manifest.config.digest()?, MAX_CONFIG)
                    .await?;
                let platform = oci::ImageConfig::parse(&cfg)?.platform();
                if platform.os.is_empty() && platform.architecture.is_empty() {
                    Vec::new()
                } else {
                    vec![platform]
                }
            }
        };
        Ok(Distribution {
            descriptor,
            platforms,
        })
    }

    /// Pulls an image and (unless told not to) unpacks it.
    pub async fn pull(self: &Arc<Self>, opts: PullOptions, events: Events) -> Result<PullDone> {
        let _op = self.gc_lock.read().await;
        let lease = self.lease()?;
        let r = &opts.reference;
        let tag_or_digest = match (r.digest(), r.tag()) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.to_string(),
            (None, None) => berth_core::reference::DEFAULT_TAG.to_string(),
        };
        let _ = events.send(PullEvent::Started {
            repository: r.path().to_string(),
            name: r.repository(),
            tag_or_digest: tag_or_digest.clone(),
        });
        tracing::info!(reference = %r, "pull");
        let (repo, top) = self
            .registries
            .resolve(r.domain(), r.path(), &opts.creds, &tag_or_digest)
            .await
            .map_err(|err| crate::registry::not_found(err, r))?;
        let mut updated = !self.content.exists(&top.digest);
        self.store_small(&top.data, &top.digest, &lease.id).await?;
        let platform = opts
            .platform
            .clone()
            .unwrap_or_else(|| self.platform.clone());
        let (index, manifest_desc, manifest_data) = match oci::manifest_kind(&top.media_type) {
            Some(ManifestKind::Index) => {
                let idx = oci::parse_index(&top.data)?;
                let chosen = select_platform(&idx.manifests, &platform)?;
                let d = chosen.digest()?;
                let data = if self.content.exists(&d) {
                    self.content
                        .read_blob(&d, crate::registry::MAX_MANIFEST as u64)?
                } else {
                    let m = repo.get_manifest(d.as_str()).await?;
                    updated = true;
                    self.store_small(&m.data, &d, &lease.id).await?;
                    m.data
                };
                let top_desc = Descriptor {
                    media_type: top.media_type.clone(),
                    digest: top.digest.to_string(),
                    size: top.data.len() as i64,
                    ..Default::default()
                };
                let mut mdesc = chosen.clone();
                if mdesc.media_type.is_empty() {
                    mdesc.media_type =
                        oci::sniff_media_type(&data).unwrap_or_else(|| oci::OCI_MANIFEST.into());
                }
                (Some(top_desc), mdesc, data)
            }
            Some(ManifestKind::Manifest) => {
                let desc = Descriptor {
                    media_type: top.media_type.clone(),
                    digest: top.digest.to_string(),
                    size: top.data.len() as i64,
                    ..Default::default()
                };
                (None, desc, top.data.clone())
            }
            None if top.media_type == oci::DOCKER_MANIFEST_V1
                || top.media_type == oci::DOCKER_MANIFEST_V1_SIGNED =>
            {
                return Err(Error::invalid_argument(format!(
                    "{r}: Docker image manifest schema 1 is not supported; push the image again with a current client"
                )));
            }
            None => {
                return Err(Error::invalid_argument(format!(
                    "{r}: unsupported manifest media type {:?}",
                    top.media_type
                )));
            }
        };
        let manifest = oci::parse_manifest(&manifest_data)?;
        let cfg_digest = manifest.config.digest()?;
        let cfg_data = if self.content.exists(&cfg_digest) {
            self.content.read_blob(&cfg_digest, MAX_CONFIG as u64)?
        } else {
            let data = repo.get_small_blob(&cfg_digest, MAX_CONFIG).await?;
            self.store_small(&data, &cfg_digest, &lease.id).await?;
            updated = true;
            data
        };
        self.lease_add(&lease.id, &[&cfg_digest], &[])?;
        let cfg = oci::ImageConfig::parse(&cfg_data)?;
        let diff_ids = cfg.diff_ids();
        if diff_ids.len() != manifest.layers.len() {
            return Err(Error::invalid_argument(format!(
                "{r}: the manifest has {} layers but the config {} diff ids",
                manifest.layers.len(),
                diff_ids.len()
            )));
        }
        for l in &manifest.layers {
            if Compression::from_media_type(&l.media_type).is_none() {
                return Err(Error::invalid_argument(format!(
                    "{r}: layer {} has an unsupported media type {:?}",
                    l.digest, l.media_type
                )));
            }
        }
        let layer_digests: Vec<Digest> = manifest
            .layers
            .iter()
            .map(|l| l.digest())
            .collect::<Result<_>>()?;
        self.lease_add(&lease.id, &layer_digests.iter().collect::<Vec<_>>(), &[])?;

        let unpack = !opts.skip_unpack;
        let sn_name = self.snapshotter_name(&opts.snapshotter);
        let sn = self.snapshotter(&sn_name);
        let chains = oci::chain_ids(&diff_ids);
        let mut snap_exists = vec![false; chains.len()];
        if unpack {
            // Walk down from the top: a committed snapshot implies all of its parents.
            for i in (0..chains.len()).rev() {
                if matches!(sn.stat(chains[i].as_str()).await, Ok(info) if info.kind == Kind::Committed)
                {
                    for s in snap_exists.iter_mut().take(i + 1) {
                        *s = true;
                    }
                    break;
                }
            }
        }
        let sem = Arc::new(Semaphore::new(
            self.config.images.max_concurrent_downloads.max(1) as usize,
        ));
        let mut downloads = Vec::new();
        for (i, (layer, digest)) in manifest.layers.iter().zip(&layer_digests).enumerate() {
            let size = layer.size as u64;
            let (dl, fresh) = self.download(digest, size, &repo, &sem, &events);
            updated |= fresh;
            let skip = !unpack || snap_exists[i];
            if !fresh && skip && self.content.exists(digest) {
                layer_event(&events, digest, Phase::AlreadyExists, 0, 0);
            } else {
                layer_event(&events, digest, Phase::PullingFsLayer, 0, 0);
            }
            downloads.push(dl);
        }

        let mut sizes: Vec<i64> = Vec::with_capacity(chains.len());
        if unpack {
            let sn = sn.clone();
            for i in 0..chains.len() {
                if snap_exists[i] {
                    sizes.push(self.layer_size(&diff_ids[i], manifest.layers[i].size));
                    continue;
                }
                let parent = if i == 0 {
                    None
                } else {
                    Some(chains[i - 1].as_str())
                };
                let size = self
                    .apply_layer(
                        &sn,
                        parent,
                        &chains[i],
                        &manifest.layers[i],
                        &diff_ids[i],
                        &downloads[i],
                        Some(&events),
                        &lease.id,
                    )
                    .await?;
                layer_event(&events, &layer_digests[i], Phase::PullComplete, 0, 0);
                sizes.push(size);
                updated = true;
            }
        }
        for (i, dl) in downloads.iter().enumerate() {
            dl.wait().await?;
            if !unpack {
                sizes.push(self.layer_size(&diff_ids[i], manifest.layers[i].size));
            }
        }
        let mut blobs: Vec<&Digest> = layer_digests.iter().collect();
        blobs.push(&cfg_digest);
        blobs.push(&top.digest);
        let manifest_digest = manifest_desc.digest()?;
        blobs.push(&manifest_digest);
        self.label_source(&blobs, r.domain(), r.path())?;

        let mut content_size = manifest_desc.size + manifest.config.size;
        content_size += manifest.layers.iter().map(|l| l.size).sum::<i64>();
        if let Some(i) = &index {
            content_size += i.size;
        }
        let rec = ImageRecord {
            id: cfg_digest.to_string(),
            target: manifest_desc,
            index,
            repo_digests: vec![format!("{}@{}", r.repository(), top.digest)],
            config: manifest.config.clone(),
            layers: manifest.layers.clone(),
            diff_ids: diff_ids.iter().map(|d| d.to_string()).collect(),
            chain_id: chains.last().map(|c| c.to_string()).unwrap_or_default(),
            size: sizes.iter().sum(),
            content_size,
            unpacked_in: if unpack {
                [sn_name].into_iter().collect()
            } else {
                Default::default()
            },
            labels: opts.labels.clone(),
            platform: cfg.platform(),
            ..Default::default()
        };
        let tags = if r.digest().is_none() {
            vec![r.to_string()]
        } else {
            Vec::new()
        };
        updated |= self.commit_image(rec, &tags)?;
        tracing::info!(reference = %r, image = %cfg_digest, updated, "pulled");
        Ok(PullDone {
            reference: r.to_string(),
            image_id: cfg_digest.to_string(),
            digest: top.digest.to_string(),
            updated,
        })
    }

    pub(crate) fn layer_size(&self, diff_id: &Digest, fallback: i64) -> i64 {
        match self.meta.layer(diff_id.as_str()) {
            Ok(Some(l)) => l.size,
            _ => fallback,
        }
    }

    /// Stores a small blob (manifest, config) under a lease.
    pub(crate) async fn store_small(
        &self,
        data: &[u8],
        digest: &Digest,
        lease: &str,
    ) -> Result<()> {
        self.lease_add(lease, &[digest], &[])?;
        if self.content.exists(digest) {
            return Ok(());
        }
        let content = self.content.clone();
        let data = data.to_vec();
        let digest = digest.clone();
        tokio::task::spawn_blocking(move || content.write_blob(&data, Some(&digest)))
            .await
            .map_err(|e| Error::internal("store blob").with_source(e))??;
        Ok(())
    }

    /// The download of `digest`: the blob already in the store, one in flight (shared), or a
    /// new one. Returns whether a new download was started.
    fn download(
        self: &Arc<Self>,
        digest: &Digest,
        size: u64,
        repo: &Repository,
        sem: &Arc<Semaphore>,
        events: &Events,
    ) -> (Arc<Download>, bool) {
        let mut map = self.downloads.lock().unwrap();
        if let Some(dl) = map.get(digest) {
            return (dl.clone(), false);
        }
        if self.content.exists(digest) {
            return (
                Download::local(digest.clone(), size, self.content.blob_path(digest)),
                false,
            );
        }
        let dl = Download::new(digest.clone(), size, Status::Queued, 0);
        map.insert(digest.clone(), dl.clone());
        let (images, repo, sem, events, task_dl) = (
            self.clone(),
            repo.clone(),
            sem.clone(),
            events.clone(),
            dl.clone(),
        );
        tokio::spawn(async move {
            let result = images.fetch(&task_dl, &repo, &sem, &events).await;
            if let Err(err) = &result {
                tracing::warn!(digest = %task_dl.digest, error = %err.chain(), "download failed");
                task_dl.fail(err);
            }
            images.downloads.lock().unwrap().remove(&task_dl.digest);
        });
        (dl, true)
    }

    async fn fetch(
        &self,
        dl: &Arc<Download>,
        repo: &Repository,
        sem: &Semaphore,
        events: &Events,
    ) -> Result<()> {
        let _permit = match sem.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                layer_event(events, &dl.digest, Phase::Waiting, 0, 0);
                sem.acquire()
                    .await
                    .map_err(|e| Error::internal("download queue").with_source(e))?
            }
        };
        let content = self.content.clone();
        let reference = dl.digest.to_string();
        let mut writer = blocking(move || content.writer(&reference)).await?;
        if writer.offset() > dl.size {
            writer.restart()?;
        }
        if writer.offset() > 0 {
            tracing::info!(digest = %dl.digest, offset = writer.offset(), "resuming download");
        }
        let path = writer.data_path().to_path_buf();
        let start = writer.offset();
        dl.update(|s| {
            s.status = Status::Running(path);
            s.written = start;
        });
        let writer = Arc::new(Mutex::new(writer));
        let mut attempt = 0u32;
        loop {
            match self.fetch_once(dl, repo, &writer, events).await {
                Ok(()) => break,
                Err(err)
                    if err.kind() == ErrorKind::Unavailable
                        && !is_tls_error(&err)
                        && attempt < 4 =>
                {
                    attempt += 1;
                    let secs = 1u32 << (attempt - 1);
                    tracing::warn!(digest = %dl.digest, error = %err.chain(), retry_in = secs, "download interrupted");
                    let _ = events.send(PullEvent::Layer {
                        digest: dl.digest.to_string(),
                        phase: Phase::Retrying,
                        current: 0,
                        total: 0,
                        retry_in: secs,
                    });
                    tokio::time::sleep(Duration::from_secs(secs.into())).await;
                }
                Err(err) => return Err(err),
            }
        }
        layer_event(events, &dl.digest, Phase::VerifyingChecksum, 0, 0);
        let writer = Arc::try_unwrap(writer)
            .map_err(|_| Error::internal("ingest writer still shared"))?
            .into_inner()
            .unwrap();
        let (size, digest) = (dl.size, dl.digest.clone());
        if writer.offset() == size && writer.digest() == digest {
            // Unpacking may commit now; `commit` below checks again, makes the blob durable and
            // moves it into place (a mismatch is reported there, with the store cleaned up).
            let path = writer.data_path().to_path_buf();
            dl.update(|s| {
                s.status = Status::Verified(path);
                s.written = size;
            });
        }
        let d2 = digest.clone();
        blocking(move || writer.commit(Some(size), Some(&d2)))
            .await
            .map_err(|e| Error::new(e.kind(), format!("blob {digest}")).with_source(e))?;
        let blob = self.content.blob_path(&dl.digest);
        dl.update(|s| {
            s.status = Status::Done(blob);
            s.written = size;
        });
        layer_event(events, &dl.digest, Phase::DownloadComplete, 0, 0);
        Ok(())
    }

    async fn fetch_once(
        &self,
        dl: &Arc<Download>,
        repo: &Repository,
        writer: &Arc<Mutex<crate::content::Writer>>,
        events: &Events,
    ) -> Result<()> {
        let offset = writer.lock().unwrap().offset();
        if offset == dl.size {
            return Ok(());
        }
        let (mut resp, resumed) = repo.get_blob(&dl.digest, offset).await?;
        if !resumed && offset > 0 {
            writer.lock().unwrap().restart()?;
            dl.update(|s| s.written = 0);
        }
        let mut written = writer.lock().unwrap().offset();
        let mut buf = BytesMut::with_capacity(512 * 1024);
        let mut last = Instant::now();
        layer_event(events, &dl.digest, Phase::Downloading, written, dl.size);
        loop {
            let chunk = resp
                .chunk()
                .await
                .map_err(|e| http_error(e, &format!("blob {}", dl.digest)))?;
            let end = chunk.is_none();
            if let Some(c) = chunk {
                buf.extend_from_slice(&c);
            }
            if (end && !buf.is_empty()) || buf.len() >= 256 * 1024 {
                let data = buf.split().freeze();
                let n = data.len() as u64;
                if written + n > dl.size {
                    return Err(Error::failed_precondition(format!(
                        "blob {}: the registry sent more than the {} bytes the manifest says",
                        dl.digest, dl.size
                    )));
                }
                let w = writer.clone();
                blocking(move || {
                    w.lock()
                        .unwrap()
                        .write_all(&data)
                        .map_err(|e| Error::internal("write ingest").with_source(e))
                })
                .await?;
                written += n;
                crate::metrics::pulled_bytes(n);
                dl.update(|s| s.written = written);
                if last.elapsed() >= Duration::from_millis(100) {
                    last = Instant::now();
                    layer_event(events, &dl.digest, Phase::Downloading, written, dl.size);
                }
            }
            if end {
                break;
            }
        }
        layer_event(events, &dl.digest, Phase::Downloading, written, dl.size);
        if written < dl.size {
            return Err(Error::unavailable(format!(
                "blob {}: connection closed after {written} of {} bytes",
                dl.digest, dl.size
            )));
        }
        Ok(())
    }

    /// Applies one layer into a new snapshot on `parent` and commits it as `chain`. Returns the
    /// uncompressed size. On failure nothing is committed and the active snapshot is removed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn apply_layer(
        &self,
        sn: &SnapshotView,
        parent: Option<&str>,
        chain: &Digest,
        layer: &Descriptor,
        diff_id: &Digest,
        dl: &Arc<Download>,
        events: Option<&Events>,
        lease: &str,
    ) -> Result<i64> {
        if sn.is_stale() {
            return Err(Error::failed_precondition(
                "unpack into the snapshots of an id map that is no longer configured",
            ));
        }
        let layer_digest = layer.digest()?;
        let compression = Compression::from_media_type(&layer.media_type).ok_or_else(|| {
            Error::invalid_argument(format!(
                "layer {}: unsupported media type {:?}",
                layer.digest, layer.media_type
            ))
        })?;
        self.lease_add(lease, &[], &[chain])?;
        let n = self.next_id();
        let key = format!(
            "{EXTRACT_PREFIX}{}-{n}-{}",
            crate::nonce(),
            &chain.hex()[..12]
        );
        let mut labels = Labels::new();
        labels.insert("containerd.io/snapshot.ref".into(), chain.to_string());
        let mounts = sn
            .prepare(&key, parent, labels.clone())
            .await
            .map_err(|e| {
                Error::new(
                    e.kind(),
                    format!("prepare snapshot for layer {}", layer.digest),
                )
                .with_source(e)
            })?;
        let target = self.tmp.join(format!("{}-{n}", crate::nonce()));
        let consumed = Arc::new(AtomicU64::new(0));
        let reader = dl.reader(consumed.clone());
        let ticker = events.map(|ev| {
            let (ev, consumed, digest, total) =
                (ev.clone(), consumed.clone(), layer_digest.clone(), dl.size);
            tokio::spawn(async move {
                let mut last = u64::MAX;
                loop {
                    let c = consumed.load(Ordering::Relaxed);
                    if c != last && c > 0 {
                        layer_event(&ev, &digest, Phase::Extracting, c, total);
                        last = c;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        });
        let t2 = target.clone();
        let map = sn.map().cloned();
        let base_layer = parent.is_none();
        let applied = blocking(move || {
            std::fs::create_dir_all(&t2)
                .map_err(|e| Error::internal(format!("create {}", t2.display())).with_source(e))?;
            let guard = MountGuard::mount(&mounts, &t2)?;
            let result = shift_root(guard.target(), map.as_ref(), base_layer).and_then(|()| {
                crate::apply::apply_compressed(guard.target(), reader, compression, map.as_ref())
            });
            let unmounted = guard.unmount();
            let _ = std::fs::remove_dir(&t2);
            let applied = result?;
            unmounted?;
            Ok(applied)
        })
        .await;
        if let Some(t) = ticker {
            t.abort();
        }
        let downloaded = dl.wait_verified().await;
        let outcome = match (applied, downloaded) {
            (_, Err(e)) => Err(e),
            (Err(e), Ok(())) => {
                Err(Error::new(e.kind(), format!("apply layer {}", layer.digest)).with_source(e))
            }
            (Ok(a), Ok(())) if a.diff_id != *diff_id => Err(Error::failed_precondition(format!(
                "layer {}: diff id mismatch: the config says {diff_id}, the layer is {}",
                layer.digest, a.diff_id
            ))),
            (Ok(a), Ok(())) => Ok(a),
        };
        let applied = match outcome {
            Ok(a) => a,
            Err(err) => {
                if let Err(e) = sn.remove(&key).await {
                    tracing::warn!(key = %key, error = %e.chain(), "remove failed unpack snapshot");
                }
                return Err(err);
            }
        };
        if let Some(ev) = events {
            layer_event(ev, &layer_digest, Phase::Extracting, dl.size, dl.size);
        }
        match sn.commit(chain.as_str(), &key, labels).await {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                // Another pull committed the same layer first.
                let _ = sn.remove(&key).await;
            }
            Err(e) => {
                let _ = sn.remove(&key).await;
                return Err(
                    Error::new(e.kind(), format!("commit layer {}", layer.digest)).with_source(e),
                );
            }
        }
        let size = applied.size as i64;
        self.meta
            .write(|tx| tx.put(meta::LAYERS, diff_id.as_str(), &LayerInfo { size }))?;
        crate::metrics::layer_unpacked();
        Ok(size)
    }

    /// Makes sure the image's layers are unpacked in snapshotter `name`, from the content store,
    /// and records it.
    pub async fn ensure_unpacked(
        self: &Arc<Self>,
        rec: &ImageRecord,
        name: &str,
    ) -> Result<ImageRecord> {
        let sn_name = if name.is_empty() {
            self.snapshotter_name("")
        } else {
            name.to_string()
        };
        let top_ok = match rec.chain_id.as_str() {
            "" => true,
            top => {
                matches!(self.snapshotter(&sn_name).stat(top).await, Ok(i) if i.kind == Kind::Committed)
            }
        };
        if top_ok && rec.unpacked_in.contains(&sn_name) {
            return Ok(rec.clone());
        }
        if !top_ok {
            let _op = self.gc_lock.read().await;
            let lease = self.lease()?;
            self.unpack_local(rec, &sn_name, &lease.id).await?;
        }
        let id = rec.id.clone();
        self.meta.write(|tx| {
            let Some(mut r) = tx.get::<ImageRecord>(meta::IMAGES, &id)? else {
                return Err(Error::not_found(format!("No such image: {id}")));
            };
            r.unpacked_in.insert(sn_name.clone());
            tx.put(meta::IMAGES, &id, &r)?;
            Ok(r)
        })
    }

    /// Unpacks the layers of `rec` that snapshotter `sn_name` lacks, from local blobs.
    pub(crate) async fn unpack_local(
        self: &Arc<Self>,
        rec: &ImageRecord,
        sn_name: &str,
        lease: &str,
    ) -> Result<()> {
        let sn = self.snapshotter(sn_name);
        let diff_ids: Vec<Digest> = rec
            .diff_ids
            .iter()
            .map(|d| d.parse())
            .collect::<Result<_>>()?;
        let chains = oci::chain_ids(&diff_ids);
        let mut start = 0;
        for i in (0..chains.len()).rev() {
            if matches!(sn.stat(chains[i].as_str()).await, Ok(info) if info.kind == Kind::Committed)
            {
                start = i + 1;
                break;
            }
        }
        for i in start..chains.len() {
            let layer = &rec.layers[i];
            let d = layer.digest()?;
            if !self.content.exists(&d) {
                return Err(Error::failed_precondition(format!(
                    "cannot unpack image {}: layer blob {d} is not in the content store",
                    rec.id
                )));
            }
            let dl = Download::local(d.clone(), layer.size as u64, self.content.blob_path(&d));
            let parent = if i == 0 {
                None
            } else {
                Some(chains[i - 1].as_str())
            };
            self.apply_layer(
                &sn,
                parent,
                &chains[i],
                layer,
                &diff_ids[i],
                &dl,
                None,
                lease,
            )
            .await?;
        }
        Ok(())
    }
}

/// The root of a base layer unpacked for a container user namespace belongs to the
/// container's root (a layer's `./` entry never sets it; later layers' roots take their
/// parent's owner from the snapshotter).
fn shift_root(
    root: &std::path::Path,
    map: Option<&berth_core::userns::IdMap>,
    base: bool,
) -> Result<()> {
    if let (Some(map), true) = (map, base) {
        let (uid, gid) = map.root();
        std::os::unix::fs::lchown(root, Some(uid), Some(gid))
            .map_err(|e| Error::internal("chown the layer root").with_source(e))?;
    }
    Ok(())
}

/// Picks the manifest for `want` from an index.
pub fn select_platform<'a>(manifests: &'a [Descriptor], want: &Platform) -> Result<&'a Descriptor> {
    let candidates: Vec<&Descriptor> = manifests
        .iter()
        .filter(|m| oci::manifest_kind(&m.media_type) != Some(ManifestKind::Index))
        .filter(|m| m.platform.as_ref().is_some_and(|p| want.matches(p)))
        .collect();
    let exact = candidates.iter().find(|m| {
        let p = m.platform.clone().unwrap_or_default().normalized();
        p.variant == want.clone().normalized().variant
    });
    exact.or(candidates.first()).copied().ok_or_else(|| {
        Error::not_found(format!(
            "no matching manifest for {} in the manifest list entries",
            want.display()
        ))
    })
}

/// Runs blocking work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal("blocking task").with_source(e))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(arch: &str, variant: &str) -> Descriptor {
        Descriptor {
            media_type: oci::OCI_MANIFEST.into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 1,
            platform: Some(Platform {
                os: "linux".into(),
                architecture: arch.into(),
                variant: variant.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn platforms_of_oci_indexes_and_docker_lists() {
        let index = |media_type: &str| {
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": media_type,
                "manifests": [
                    {"mediaType": oci::OCI_MANIFEST, "digest": format!("sha256:{}", "a".repeat(64)),
                     "size": 1, "platform": {"architecture": "amd64", "os": "linux"}},
                    {"mediaType": oci::OCI_MANIFEST, "digest": format!("sha256:{}", "b".repeat(64)),
                     "size": 1, "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
                ],
            })
            .to_string()
        };
        for media_type in [oci::OCI_INDEX, oci::DOCKER_LIST] {
            let got = index_platforms(media_type, index(media_type).as_bytes())
                .unwrap()
                .unwrap();
            assert_eq!(got.len(), 2, "{media_type}");
            assert_eq!(got[1].architecture, "arm64");
            assert_eq!(got[1].variant, "v8");
        }
        for media_type in [oci::OCI_MANIFEST, oci::DOCKER_MANIFEST] {
            assert_eq!(index_platforms(media_type, b"{}").unwrap(), None);
        }
        assert!(index_platforms("application/x-nope", b"{}").is_err());
    }

    #[test]
    fn platform_selection() {
        let list = vec![
            desc("arm", "v6"),
            desc("arm", "v7"),
            desc("amd64", ""),
            desc("arm64", "v8"),
        ];
        let pick = |p: &str| {
            select_platform(&list, &Platform::parse(p).unwrap())
                .map(|d| d.platform.clone().unwrap())
        };
        assert_eq!(pick("linux/amd64").unwrap().architecture, "amd64");
        assert_eq!(pick("linux/arm/v7").unwrap().variant, "v7");
        assert_eq!(pick("linux/arm64").unwrap().architecture, "arm64");
        let err = pick("linux/s390x").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(err.message().contains("linux/s390x"));
    }

    #[tokio::test]
    async fn tail_reader_follows_a_growing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, b"").unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let dl = Download::new(
            Digest::sha256_of(&data),
            data.len() as u64,
            Status::Queued,
            0,
        );
        let consumed = Arc::new(AtomicU64::new(0));
        let mut r = dl.reader(consumed.clone());
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            r.read_to_end(&mut out).map(|_| out)
        });
        dl.update(|s| s.status = Status::Running(path.clone()));
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        for (i, chunk) in data.chunks(70_000).enumerate() {
            f.write_all(chunk).unwrap();
            let w = ((i + 1) * 70_000).min(data.len()) as u64;
            dl.update(|s| s.written = w);
            std::thread::sleep(Duration::from_millis(5));
        }
        dl.update(|s| s.status = Status::Done(path.clone()));
        assert_eq!(reader.join().unwrap().unwrap(), data);
        assert_eq!(consumed.load(Ordering::Relaxed), data.len() as u64);
        dl.wait().await.unwrap();

        // A failed download fails its reader.
        let dl = Download::new(Digest::sha256_of(b""), 10, Status::Queued, 0);
        let mut r = dl.reader(Arc::default());
        dl.fail(&Error::failed_precondition("digest mismatch: x"));
        let err = r.read(&mut [0u8; 4]).unwrap_err();
        assert!(err.to_string().contains("digest mismatch"));
        assert!(dl.wait().await.is_err());
    }

    /// A verified blob ends its readers and satisfies `wait_verified`, and readers keep working
    /// across the rename into the store; `wait` still waits for that rename.
    #[tokio::test]
    async fn verified_blobs_end_readers_before_they_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (ingest, blob) = (dir.path().join("ingest"), dir.path().join("blob"));
        let data = vec![9u8; 100_000];
        std::fs::write(&ingest, &data).unwrap();
        let dl = Download::new(
            Digest::sha256_of(&data),
            data.len() as u64,
            Status::Verified(ingest.clone()),
            data.len() as u64,
        );
        let mut r = dl.reader(Arc::default());
        let mut head = vec![0u8; 1000];
        r.read_exact(&mut head).unwrap();
        dl.wait_verified().await.unwrap();
        let waiting = tokio::spawn({
            let dl = dl.clone();
            async move { dl.wait().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiting.is_finished(),
            "wait must wait for the blob in the store"
        );
        std::fs::rename(&ingest, &blob).unwrap();
        dl.update(|s| s.status = Status::Done(blob.clone()));
        waiting.await.unwrap().unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(head.len() + rest.len(), data.len());
        // A reader that opens only now finds the blob under its new path.
        let mut late = Vec::new();
        dl.reader(Arc::default()).read_to_end(&mut late).unwrap();
        assert_eq!(late, data);
    }
}
