//! Pushing local images to a registry: layers in parallel (cross-repository mounts when the blob
//! came from another repository of the same registry), then the config, then the manifest bytes
//! exactly as stored, so the pushed manifest has the digest the image was pulled with.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use berth_core::{Digest, Error, ErrorKind, Reference, Result};
use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc};

use crate::meta::ImageRecord;
use crate::oci::Descriptor;
use crate::registry::{Credentials, MountResult, Repository, is_tls_error};
use crate::service::Images;

/// Docker's per-layer push states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushPhase {
    Preparing,
    Waiting,
    Pushing,
    Pushed,
    AlreadyExists,
    Mounted,
    Retrying,
}

/// What a push reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushEvent {
    Started {
        name: String,
    },
    Layer {
        digest: String,
        diff_id: String,
        phase: PushPhase,
        current: i64,
        total: i64,
        mounted_from: String,
        retry_in: u32,
    },
    TagDone {
        tag: String,
        digest: String,
        size: i64,
    },
}

/// What to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// `name[:tag]`; without a tag (or with `all_tags`) every local tag of the repository.
    pub reference: String,
    pub creds: Credentials,
    pub all_tags: bool,
}

fn ev(
    events: &mpsc::UnboundedSender<PushEvent>,
    d: &Descriptor,
    diff_id: &str,
    phase: PushPhase,
    cur: u64,
    from: &str,
) {
    let _ = events.send(PushEvent::Layer {
        digest: d.digest.clone(),
        diff_id: diff_id.to_string(),
        phase,
        current: cur as i64,
        total: d.size,
        mounted_from: from.to_string(),
        retry_in: 0,
    });
}

impl Images {
    /// Pushes one tag or every tag of a repository.
    pub async fn push(
        self: &Arc<Self>,
        opts: PushOptions,
        events: mpsc::UnboundedSender<PushEvent>,
    ) -> Result<()> {
        let _op = self.gc_lock.read().await;
        let r = Reference::parse_no_default(&opts.reference)?;
        if r.digest().is_some() {
            return Err(Error::invalid_argument("cannot push a digest reference"));
        }
        let mut targets: Vec<(String, ImageRecord)> = Vec::new();
        if r.tag().is_none() || opts.all_tags {
            let prefix = format!("{}:", r.repository());
            for (t, id) in self.meta.tags()? {
                if let Some(tag) = t.strip_prefix(&prefix)
                    && let Some(rec) = self.meta.image(&id)?
                {
                    targets.push((tag.to_string(), rec));
                }
            }
            if targets.is_empty() {
                return Err(Error::not_found(format!(
                    "An image does not exist locally with the tag: {}",
                    r.familiar_repository()
                )));
            }
        } else {
            let full = r.to_string();
            let id = self
                .meta
                .read(|rx| rx.get::<String>(crate::meta::TAGS, &full))?
                .ok_or_else(|| {
                    Error::not_found(format!(
                        "An image does not exist locally with the tag: {}",
                        r.familiar()
                    ))
                })?;
            let rec = self
                .meta
                .image(&id)?
                .ok_or_else(|| Error::not_found(format!("No such image: {full}")))?;
            targets.push((r.tag().unwrap_or("latest").to_string(), rec));
        }
        let mut repo = self
            .registries
            .repository(r.domain(), r.path(), &opts.creds, true)
            .await?;
        // Where blobs came from on this registry: candidates for cross-repository mounts.
        let label = format!("containerd.io/distribution.source.{}", r.domain());
        let mut sources: std::collections::HashMap<String, String> = Default::default();
        for (_, rec) in &targets {
            for d in rec.layers.iter().chain(std::iter::once(&rec.config)) {
                let labels = self.meta.content_labels(&d.digest)?;
                if let Some(from) = labels
                    .get(&label)
                    .and_then(|v| v.split(',').find(|s| *s != r.path()))
                {
                    sources.insert(d.digest.clone(), from.to_string());
                }
            }
        }
        for from in sources.values().collect::<BTreeSet<_>>() {
            repo.add_scope(format!("repository:{from}:pull"));
        }
        let _ = events.send(PushEvent::Started {
            name: r.repository(),
        });
        let sem = Arc::new(Semaphore::new(
            self.config.images.max_concurrent_uploads.max(1) as usize,
        ));
        for (tag, rec) in targets {
            let mut tasks = Vec::new();
            for (i, layer) in rec.layers.iter().enumerate() {
                let diff_id = rec.diff_ids.get(i).cloned().unwrap_or_default();
                ev(&events, layer, &diff_id, PushPhase::Preparing, 0, "");
                let (me, repo, sem, events, layer, from) = (
                    self.clone(),
                    repo.clone(),
                    sem.clone(),
                    events.clone(),
                    layer.clone(),
                    sources.get(&layer.digest).cloned(),
                );
                tasks.push(tokio::spawn(async move {
                    me.push_blob(
                        &repo,
                        &layer,
                        &diff_id,
                        from.as_deref(),
                        &sem,
                        Some(&events),
                    )
                    .await
                }));
            }
            for t in tasks {
                t.await
                    .map_err(|e| Error::internal("push task").with_source(e))??;
            }
            let from = sources.get(&rec.config.digest).cloned();
            self.push_blob(&repo, &rec.config, "", from.as_deref(), &sem, None)
                .await?;
            let d = rec.target.digest()?;
            let data = self
                .content
                .read_blob(&d, crate::registry::MAX_MANIFEST as u64)?;
            let digest = repo
                .put_manifest(&tag, &rec.target.media_type, &data)
                .await?;
            let full = format!("{}@{}", r.repository(), digest);
            let mut pushed_rec = rec.clone();
            pushed_rec.repo_digests = vec![full];
            self.commit_image(pushed_rec, &[])?;
            let mut pushed: Vec<Digest> =
                rec.layers.iter().filter_map(|l| l.digest().ok()).collect();
            pushed.push(rec.config.digest()?);
            pushed.push(d);
            self.label_source(&pushed.iter().collect::<Vec<_>>(), r.domain(), r.path())?;
            let _ = events.send(PushEvent::TagDone {
                tag,
                digest: digest.to_string(),
                size: data.len() as i64,
            });
        }
        Ok(())
    }

    async fn push_blob(
        &self,
        repo: &Repository,
        desc: &Descriptor,
        diff_id: &str,
        mount_from: Option<&str>,
        sem: &Semaphore,
        events: Option<&mpsc::UnboundedSender<PushEvent>>,
    ) -> Result<()> {
        let digest = desc.digest()?;
        let _permit = match sem.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                if let Some(e) = events {
                    ev(e, desc, diff_id, PushPhase::Waiting, 0, "");
                }
                sem.acquire()
                    .await
                    .map_err(|e| Error::internal("upload queue").with_source(e))?
            }
        };
        if repo.has_blob(&digest).await? {
            if let Some(e) = events {
                ev(e, desc, diff_id, PushPhase::AlreadyExists, 0, "");
            }
            return Ok(());
        }
        let path = self.content.blob_path(&digest);
        if !path.exists() {
            return Err(Error::failed_precondition(format!(
                "blob {digest} is not in the content store"
            )));
        }
        let mut attempt = 0u32;
        loop {
            let location = match repo.start_upload(mount_from.map(|f| (&digest, f))).await {
                Ok(MountResult::Mounted) => {
                    if let Some(e) = events {
                        ev(
                            e,
                            desc,
                            diff_id,
                            PushPhase::Mounted,
                            0,
                            mount_from.unwrap_or(""),
                        );
                    }
                    return Ok(());
                }
                Ok(MountResult::Upload(l)) => l,
                Err(err) => return Err(err),
            };
            let sent = Arc::new(AtomicU64::new(0));
            let (p2, s2, ev2, d2, diff2) = (
                path.clone(),
                sent.clone(),
                events.cloned(),
                desc.clone(),
                diff_id.to_string(),
            );
            let body = move || {
                let p = p2.clone();
                let s = s2.clone();
                let ev3 = ev2.clone();
                let d3 = d2.clone();
                let diff3 = diff2.clone();
                s.store(0, Ordering::Relaxed);
                let stream = futures::stream::once(async move { tokio::fs::File::open(p).await })
                    .map(|f| match f {
                        Ok(f) => {
                            tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024).left_stream()
                        }
                        Err(e) => futures::stream::once(async move { Err(e) }).right_stream(),
                    })
                    .flatten();
                let mut last = Instant::now() - Duration::from_secs(1);
                let stream = stream.inspect(move |chunk| {
                    if let Ok(c) = chunk {
                        let n = s.fetch_add(c.len() as u64, Ordering::Relaxed) + c.len() as u64;
                        if let Some(e) = &ev3
                            && last.elapsed() >= Duration::from_millis(100)
                        {
                            last = Instant::now();
                            ev(e, &d3, &diff3, PushPhase::Pushing, n, "");
                        }
                    }
                });
                reqwest::Body::wrap_stream(stream)
            };
            match repo
                .put_blob(&location, &digest, desc.size as u64, body)
                .await
            {
                Ok(()) => break,
                Err(err)
                    if err.kind() == ErrorKind::Unavailable
                        && !is_tls_error(&err)
                        && attempt < 4 =>
                {
                    attempt += 1;
                    let secs = 1u32 << (attempt - 1);
                    if let Some(e) = events {
                        let _ = e.send(PushEvent::Layer {
                            digest: desc.digest.clone(),
                            diff_id: diff_id.to_string(),
                            phase: PushPhase::Retrying,
                            current: 0,
                            total: desc.size,
                            mounted_from: String::new(),
                            retry_in: secs,
                        });
                    }
                    tokio::time::sleep(Duration::from_secs(secs.into())).await;
                }
                Err(err) => return Err(err),
            }
        }
        if let Some(e) = events {
            ev(e, desc, diff_id, PushPhase::Pushed, desc.size as u64, "");
        }
        Ok(())
    }
}
