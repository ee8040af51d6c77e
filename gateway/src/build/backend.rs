//! The seam between the build executor and berth's services.
//!
//! [`BuildBackend`] is what the executor needs, in domain terms: images to start from, step
//! containers to create, run, fill and commit, and the cache records. [`Engine`] implements it
//! with the gateway's [`Backends`] (the same calls `docker run`, `docker cp` and `docker commit`
//! make); the executor's unit tests use a fake.

use std::future::Future;
use std::path::PathBuf;

use berth_core::{Error, ErrorKind, Result};
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::images::v1 as images;
use berth_proto::berth::types::v1 as types;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::backend::{Backends, Fut, Stream};

/// An image a step starts from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildImage {
    /// `sha256:…`.
    pub id: String,
    /// The image config blob (`config`, `history`, `rootfs`, …).
    pub config: Value,
}

/// What a step's running container reports.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    /// Output (stdout and stderr as written).
    Output(Bytes),
    /// The exit status; the last event.
    Exit(i64),
}

/// A step's container to commit (Interface A's `Containers.Commit`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommitSpec {
    pub container: String,
    /// Docker's image `Config` for the new image.
    pub config: Value,
    /// The history entry's `created_by`.
    pub created_by: String,
    pub author: String,
    /// Config-only steps: no layer when the rootfs did not change.
    pub empty_layer_when_unchanged: bool,
}

/// What the executor needs from the engine and the images service.
pub trait BuildBackend: Send + Sync {
    /// The local image `name` (reference or id), or `None`.
    fn image(&self, name: &str) -> Fut<'_, Option<BuildImage>>;
    /// Pulls `reference`; the progress as Docker's JSON messages.
    fn pull(
        &self,
        reference: &str,
        auth: Option<types::RegistryAuth>,
        platform: Option<types::Platform>,
    ) -> Fut<'_, Stream<Value>>;
    /// Creates a container (not started); its full id.
    fn create(&self, req: engine::CreateContainerRequest) -> Fut<'_, String>;
    /// Starts container `id` and streams its output, then its exit status.
    fn run(&self, id: &str) -> Fut<'_, Stream<RunEvent>>;
    /// Extracts the tar at `tar` into directory `dir` of container `id` (as `docker cp`).
    fn put_archive(&self, id: &str, dir: &str, tar: PathBuf) -> Fut<'_, ()>;
    /// Whether `path` is a directory in container `id` (following symlinks); false when absent.
    fn is_dir(&self, id: &str, path: &str) -> Fut<'_, bool>;
    /// An image with an empty root filesystem, for the first layer of a `FROM scratch` stage.
    fn empty_image(&self) -> Fut<'_, String>;
    /// Writes a tar of `path` in container `id` to the file `into` (as `docker cp`).
    fn get_archive(&self, id: &str, path: &str, into: PathBuf) -> Fut<'_, ()>;
    /// Commits a step's container; the new image id.
    fn commit(&self, spec: CommitSpec) -> Fut<'_, String>;
    /// A config-only step's image, made without a container: a child of image `parent` with
    /// `spec.config` and an empty-layer history entry; `cmd` is the step's `#(nop)` command
    /// (`spec.container` is unused).
    fn commit_config(&self, parent: &str, cmd: Vec<String>, spec: CommitSpec) -> Fut<'_, String>;
    /// Removes container `id` (killing it first if it runs).
    fn remove(&self, id: &str) -> Fut<'_, ()>;
    /// Starts removing container `id` (as [`BuildBackend::remove`]) and returns at once: the
    /// removal goes on whether or not the returned future is polled, which ends with it.
    fn remove_detached(&self, id: &str) -> Fut<'static, ()>;
    /// Tags image `id` as `reference`.
    fn tag(&self, id: &str, reference: &str) -> Fut<'_, ()>;
    /// The image recorded for a step key.
    fn cache_lookup(&self, key: &str) -> Fut<'_, Option<String>>;
    /// Records a step's image.
    fn cache_store(&self, key: &str, image: &str, parent: &str, created_by: &str) -> Fut<'_, ()>;
    /// Starts [`BuildBackend::cache_store`] and returns at once: the store goes on whether or
    /// not the returned future is polled, which ends with it.
    fn cache_store_detached(
        &self,
        key: &str,
        image: &str,
        parent: &str,
        created_by: &str,
    ) -> Fut<'static, ()>;
}

/// [`BuildBackend`] over the gateway's service backends.
#[derive(Debug, Clone)]
pub struct Engine(pub Backends);

/// Runs `work` as its own task, so it goes on whether or not the returned future is polled;
/// that future ends with it (`what` names it if the task dies).
fn detached(
    what: &'static str,
    work: impl Future<Output = Result<()>> + Send + 'static,
) -> Fut<'static, ()> {
    let task = tokio::spawn(work);
    Box::pin(async move {
        task.await
            .map_err(|e| Error::internal(what).with_source(e))?
    })
}

fn not_found_is_none<T>(r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is(ErrorKind::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

impl BuildBackend for Engine {
    fn image(&self, name: &str) -> Fut<'_, Option<BuildImage>> {
        let req = images::GetImageRequest {
            reference: name.to_string(),
            ..Default::default()
        };
        Box::pin(async move {
            let Some(img) = not_found_is_none(self.0.images.get(req).await)? else {
                return Ok(None);
            };
            let config = serde_json::from_slice(&img.config)
                .map_err(|e| Error::internal("image config unreadable").with_source(e))?;
            Ok(Some(BuildImage { id: img.id, config }))
        })
    }

    fn pull(
        &self,
        reference: &str,
        auth: Option<types::RegistryAuth>,
        platform: Option<types::Platform>,
    ) -> Fut<'_, Stream<Value>> {
        let req = images::PullRequest {
            reference: reference.to_string(),
            auth,
            platform,
            ..Default::default()
        };
        Box::pin(async move {
            let s = self.0.images.pull(req).await?;
            Ok(s.map_ok(|m| {
                futures::stream::iter(
                    crate::images::pull_message(&m)
                        .unwrap_or_default()
                        .into_iter()
                        .map(Ok),
                )
            })
            .try_flatten()
            .boxed())
        })
    }

    fn create(&self, req: engine::CreateContainerRequest) -> Fut<'_, String> {
        Box::pin(async move {
            let r = self.0.containers.create(req).await?;
            r.container
                .map(|c| c.id)
                .ok_or_else(|| Error::internal("create answered no container"))
        })
    }

    fn run(&self, id: &str) -> Fut<'_, Stream<RunEvent>> {
        use engine::attach_task_request::Event as In;
        use engine::attach_task_response::Event as Out;
        use engine::wait_task_response::Event as W;
        let id = id.to_string();
        Box::pin(async move {
            let c = &self.0.containers;
            // The attach input stays open while the output is read: its end would detach.
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(engine::AttachTaskRequest {
                event: Some(In::Options(engine::AttachOptions {
                    id: id.clone(),
                    stdout: true,
                    stderr: true,
                    stream: true,
                    ..Default::default()
                })),
            })
            .await
            .map_err(|_| Error::internal("attach input closed"))?;
            let mut out = c.attach(ReceiverStream::new(rx).boxed()).await?;
            match out.try_next().await? {
                Some(engine::AttachTaskResponse {
                    event: Some(Out::Ready(_)),
                }) => {}
                _ => return Err(Error::internal("attach ended before it was ready")),
            }
            let mut wait = c
                .wait(engine::WaitTaskRequest {
                    id: id.clone(),
                    condition: engine::WaitCondition::NextExit as i32,
                })
                .await?;
            if !matches!(
                wait.try_next().await?,
                Some(engine::WaitTaskResponse {
                    event: Some(W::Registered(_))
                })
            ) {
                return Err(Error::internal("wait ended before it was registered"));
            }
            c.start(engine::StartTaskRequest { id: id.clone() }).await?;
            let output = out
                .try_take_while(|m| {
                    futures::future::ready(Ok(!matches!(m.event, Some(Out::End(_)))))
                })
                .try_filter_map(|m| async move {
                    Ok(match m.event {
                        Some(Out::Output(chunk)) => Some(RunEvent::Output(Bytes::from(chunk.data))),
                        _ => None,
                    })
                });
            let exit = futures::stream::once(async move {
                let _keep_attach_open = tx;
                while let Some(m) = wait.try_next().await? {
                    if let Some(W::Exit(e)) = m.event {
                        if !e.error.is_empty() {
                            return Err(Error::internal(e.error));
                        }
                        return Ok(RunEvent::Exit(e.status_code));
                    }
                }
                Err(Error::internal("wait ended without an exit status"))
            });
            Ok(output.chain(exit).boxed())
        })
    }

    fn put_archive(&self, id: &str, dir: &str, tar: PathBuf) -> Fut<'_, ()> {
        let options = engine::ArchivePutOptions {
            id: id.to_string(),
            path: dir.to_string(),
            no_overwrite_dir_non_dir: false,
            copy_uid_gid: true,
        };
        Box::pin(async move {
            let file = tokio::fs::File::open(&tar)
                .await
                .map_err(|e| Error::internal("open the step's archive").with_source(e))?;
            let data = tokio_util::io::ReaderStream::with_capacity(file, 256 << 10)
                .take_while(|r| futures::future::ready(r.is_ok()))
                .filter_map(|r| futures::future::ready(r.ok()))
                .boxed();
            self.0.containers.archive_put(options, data).await
        })
    }

    fn is_dir(&self, id: &str, path: &str) -> Fut<'_, bool> {
        let req = engine::ArchiveStatRequest {
            id: id.to_string(),
            path: format!("{}/.", path.trim_end_matches('/')),
        };
        Box::pin(async move {
            match self.0.containers.archive_stat(req).await {
                Ok(st) => Ok(st.mode & 0o170000 == 0o040000),
                Err(e) if e.is(ErrorKind::NotFound) || e.is(ErrorKind::InvalidArgument) => {
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        })
    }

    fn empty_image(&self) -> Fut<'_, String> {
        // No parent, no layer, no history: an empty base whose first step's layer is the
        // image's first, as with Docker.
        let options = images::CreateImageOptions {
            config: b"{}".to_vec(),
            ..Default::default()
        };
        Box::pin(async move { self.0.images.create_config_image(options).await })
    }

    fn get_archive(&self, id: &str, path: &str, into: PathBuf) -> Fut<'_, ()> {
        let req = engine::ArchiveGetRequest {
            id: id.to_string(),
            path: path.to_string(),
        };
        Box::pin(async move {
            let (_stat, mut data) = self.0.containers.archive_get(req).await?;
            let mut f = tokio::fs::File::create(&into)
                .await
                .map_err(|e| Error::internal("create a temporary archive").with_source(e))?;
            while let Some(chunk) = data.try_next().await? {
                f.write_all(&chunk)
                    .await
                    .map_err(|e| Error::internal("write a temporary archive").with_source(e))?;
            }
            f.flush()
                .await
                .map_err(|e| Error::internal("write a temporary archive").with_source(e))
        })
    }

    fn commit(&self, spec: CommitSpec) -> Fut<'_, String> {
        Box::pin(async move {
            let req = engine::CommitContainerRequest {
                id: spec.container,
                author: spec.author,
                config: serde_json::to_vec(&spec.config).unwrap_or_default(),
                created_by: spec.created_by,
                empty_layer_when_unchanged: spec.empty_layer_when_unchanged,
                ..Default::default()
            };
            self.0.containers.commit(req).await
        })
    }

    fn commit_config(&self, parent: &str, cmd: Vec<String>, spec: CommitSpec) -> Fut<'_, String> {
        // What Docker records as the step's `container_config`: its config running the
        // step's `#(nop)` command.
        let mut container_config = spec.config.clone();
        if let Some(obj) = container_config.as_object_mut() {
            obj.insert("Cmd".into(), Value::from(cmd));
        }
        let options = images::CreateImageOptions {
            parent: parent.to_string(),
            config: serde_json::to_vec(&spec.config).unwrap_or_default(),
            container_config: serde_json::to_vec(&container_config).unwrap_or_default(),
            created_by: spec.created_by,
            author: spec.author,
            empty_layer: true,
            ..Default::default()
        };
        Box::pin(async move { self.0.images.create_config_image(options).await })
    }

    fn remove(&self, id: &str) -> Fut<'_, ()> {
        let req = engine::DeleteContainerRequest {
            id: id.to_string(),
            force: true,
            remove_volumes: true,
            ..Default::default()
        };
        Box::pin(async move {
            match self.0.containers.delete(req).await {
                Err(e) if e.is(ErrorKind::NotFound) => Ok(()),
                r => r,
            }
        })
    }

    fn remove_detached(&self, id: &str) -> Fut<'static, ()> {
        let engine = self.clone();
        let id = id.to_string();
        detached("container removal", async move { engine.remove(&id).await })
    }

    fn tag(&self, id: &str, reference: &str) -> Fut<'_, ()> {
        let req = images::TagImageRequest {
            source: id.to_string(),
            target: reference.to_string(),
        };
        Box::pin(async move {
            self.0.images.tag(req).await?;
            Ok(())
        })
    }

    fn cache_lookup(&self, key: &str) -> Fut<'_, Option<String>> {
        self.0.images.cache_lookup(key.to_string())
    }

    fn cache_store(&self, key: &str, image: &str, parent: &str, created_by: &str) -> Fut<'_, ()> {
        self.0.images.cache_store(images::CacheStoreRequest {
            key: key.to_string(),
            image_id: image.to_string(),
            parent_id: parent.to_string(),
            created_by: created_by.to_string(),
        })
    }

    fn cache_store_detached(
        &self,
        key: &str,
        image: &str,
        parent: &str,
        created_by: &str,
    ) -> Fut<'static, ()> {
        let engine = self.clone();
        let (key, image, parent, created_by) = (
            key.to_string(),
            image.to_string(),
            parent.to_string(),
            created_by.to_string(),
        );
        detached("build cache record", async move {
            engine.cache_store(&key, &image, &parent, &created_by).await
        })
    }
}
