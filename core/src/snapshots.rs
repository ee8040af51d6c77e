//! The `Snapshotter` contract, its gRPC proxy and its gRPC server adapter.
//!
//! A snapshotter manages layered filesystems and answers with *descriptions* of mounts; it never
//! mounts anything for its callers (see [`crate::mount`] for performing the mounts). The wire API
//! is containerd's `containerd.services.snapshots.v1.Snapshots`, so:
//!
//! - the rest of berth always talks to the snapshotter through [`RemoteSnapshotter`], whether it
//!   is berth-snapshotter or any containerd proxy snapshotter (stargz, nydus, ...):
//!   `RemoteSnapshotter::from_config(&config)` follows `[snapshotter] driver` and
//!   `[proxy_plugins.NAME]`;
//! - berth-snapshotter serves a local backend through [`SnapshotsService`], which containerd can
//!   use as a `proxy_plugins` entry.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::SystemTime;

use berth_proto::containerd::services::snapshots::v1 as pb;
use pb::snapshots_client::SnapshotsClient;
use pb::snapshots_server::{Snapshots, SnapshotsServer};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::mount::Mount;
use crate::uds::Channel;

/// Labels of a snapshot: free-form key/value pairs, ordered by key.
pub type Labels = BTreeMap<String, String>;

/// What a snapshot is, which decides what can be done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Read-only, made by [`Snapshotter::view`]; can be mounted and removed, never committed.
    View,
    /// Writable, made by [`Snapshotter::prepare`]; can be mounted, committed and removed.
    Active,
    /// Immutable, made by [`Snapshotter::commit`]; the only kind that can be a parent. It has no
    /// mounts of its own: to look at it, make a view of it.
    Committed,
}

impl Kind {
    /// `view`, `active` or `committed`: the spelling filters use (`kind==committed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::View => "view",
            Self::Active => "active",
            Self::Committed => "committed",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "view" => Ok(Self::View),
            "active" => Ok(Self::Active),
            "committed" => Ok(Self::Committed),
            other => Err(Error::invalid_argument(format!(
                "unknown snapshot kind {other:?} (view, active, committed)"
            ))),
        }
    }
}

/// What a snapshotter knows about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The key of an active snapshot or view, or the name of a committed one.
    pub name: String,
    /// The committed snapshot this one is based on, if any.
    pub parent: Option<String>,
    /// View, active or committed.
    pub kind: Kind,
    /// Labels, as last set by prepare/view/commit or [`Snapshotter::update`].
    pub labels: Labels,
    /// When the snapshot was created (for a committed snapshot: when it was committed).
    pub created_at: SystemTime,
    /// When the snapshot's record last changed.
    pub updated_at: SystemTime,
}

/// Disk space a snapshot uses: what removing it would free (for a layered backend its own
/// layer, not its parents; for a copying one its whole copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Bytes (see the backend's documentation for how it counts).
    pub size: i64,
    /// Inodes.
    pub inodes: i64,
}

/// A snapshotter, with containerd's semantics.
///
/// # Snapshots
///
/// A snapshot is a directory tree identified by a string. There are three kinds ([`Kind`]):
/// *active* snapshots (writable, from [`prepare`](Self::prepare)), *views* (read-only, from
/// [`view`](Self::view)) and *committed* snapshots (immutable, from [`commit`](Self::commit) of
/// an active one). Only committed snapshots can be parents: an active snapshot or view starts
/// out with exactly the contents of its parent chain, or empty without a parent.
///
/// Keys (of active snapshots and views) and names (of committed snapshots) share **one
/// namespace**: a key cannot be used while a committed snapshot has that name and vice versa.
/// Every snapshot carries labels, set at creation or commit and changed with
/// [`update`](Self::update).
///
/// The typical life of a layer: `prepare(tmp, Some(parent))` → mount and write the diff →
/// `commit(chain_id, tmp)`. The life of a container rootfs: `prepare(container_id,
/// Some(top_layer))` → mount → run → `remove(container_id)`.
///
/// # Errors
///
/// | condition | kind |
/// |---|---|
/// | prepare/view/commit onto a key or name that exists | `AlreadyExists` |
/// | a key, name or parent that does not exist | `NotFound` |
/// | a parent that is not committed; an empty key or name; a bad filter or field path | `InvalidArgument` |
/// | commit of a snapshot that is not active; mounts of a committed snapshot | `FailedPrecondition` |
/// | remove of a snapshot that has children | `FailedPrecondition` |
///
/// Messages name the snapshot (`snapshot "x" already exists`, `parent "p" is not committed`).
///
/// # Futures
///
/// Every method returns a `Send` future, so the trait can be used generically from any tokio
/// task and behind the generic gRPC server [`SnapshotsService`].
pub trait Snapshotter: Send + Sync + 'static {
    /// Information about the snapshot `key` (a key or a committed name).
    fn stat(&self, key: &str) -> impl Future<Output = Result<Info>> + Send;

    /// Changes the labels of snapshot `name` and returns its new info; `updated_at` moves.
    ///
    /// `fieldpaths` say what to change: `labels` replaces all labels with `labels`;
    /// `labels.<key>` sets that one label from `labels`, or deletes it when `labels` lacks it;
    /// no paths at all means `labels`. Any other path (only labels can change) is
    /// `InvalidArgument`.
    fn update(
        &self,
        name: &str,
        labels: Labels,
        fieldpaths: &[String],
    ) -> impl Future<Output = Result<Info>> + Send;

    /// Disk usage of snapshot `key`: what removing it would free (see [`Usage`]). Committed
    /// snapshots report the value computed when they were committed; active snapshots are
    /// measured on each call.
    fn usage(&self, key: &str) -> impl Future<Output = Result<Usage>> + Send;

    /// The mounts that present the active snapshot or view `key`: the same list that
    /// [`prepare`](Self::prepare) or [`view`](Self::view) returned. A committed snapshot has no
    /// mounts (`FailedPrecondition`).
    fn mounts(&self, key: &str) -> impl Future<Output = Result<Vec<Mount>>> + Send;

    /// Creates the active (writable) snapshot `key` on top of the committed snapshot `parent`
    /// (empty without one) and returns the mounts that present it.
    fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> impl Future<Output = Result<Vec<Mount>>> + Send;

    /// Like [`prepare`](Self::prepare), but the snapshot is a read-only view: its mounts are
    /// read-only and it can never be committed.
    fn view(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> impl Future<Output = Result<Vec<Mount>>> + Send;

    /// Turns the active snapshot `key` into the committed snapshot `name`, with `labels` as its
    /// labels. `key` stops existing. The caller must have unmounted it.
    fn commit(
        &self,
        name: &str,
        key: &str,
        labels: Labels,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Removes the snapshot `key` (any kind). A snapshot that is the parent of others cannot be
    /// removed until they are. The caller must have unmounted it.
    fn remove(&self, key: &str) -> impl Future<Output = Result<()>> + Send;

    /// Every snapshot that matches any of `filters` (all snapshots when there are none), in
    /// name order: containerd's `Walk`. A filter is containerd's syntax: comma-separated
    /// selectors that must all match, e.g. `kind==committed,labels."a.b"==c`; a selector without
    /// an operator (`labels.x`) tests presence; `name`, `parent`, `kind` and `labels.<key>` are
    /// the fields; `==` and `!=` the operators.
    fn list(&self, filters: &[String]) -> impl Future<Output = Result<Vec<Info>>> + Send;

    /// Frees what the snapshotter holds on disk without a record, such as directories left by a
    /// crash in the middle of an operation. Never touches live snapshots. Optional in
    /// containerd's API: a remote snapshotter may answer `Unimplemented` (containerd's own
    /// service does), which callers treat as nothing to clean.
    fn cleanup(&self) -> impl Future<Output = Result<()>> + Send;
}

impl<S: Snapshotter> Snapshotter for Arc<S> {
    fn stat(&self, key: &str) -> impl Future<Output = Result<Info>> + Send {
        (**self).stat(key)
    }
    fn update(
        &self,
        name: &str,
        labels: Labels,
        fieldpaths: &[String],
    ) -> impl Future<Output = Result<Info>> + Send {
        (**self).update(name, labels, fieldpaths)
    }
    fn usage(&self, key: &str) -> impl Future<Output = Result<Usage>> + Send {
        (**self).usage(key)
    }
    fn mounts(&self, key: &str) -> impl Future<Output = Result<Vec<Mount>>> + Send {
        (**self).mounts(key)
    }
    fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> impl Future<Output = Result<Vec<Mount>>> + Send {
        (**self).prepare(key, parent, labels)
    }
    fn view(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> impl Future<Output = Result<Vec<Mount>>> + Send {
        (**self).view(key, parent, labels)
    }
    fn commit(
        &self,
        name: &str,
        key: &str,
        labels: Labels,
    ) -> impl Future<Output = Result<()>> + Send {
        (**self).commit(name, key, labels)
    }
    fn remove(&self, key: &str) -> impl Future<Output = Result<()>> + Send {
        (**self).remove(key)
    }
    fn list(&self, filters: &[String]) -> impl Future<Output = Result<Vec<Info>>> + Send {
        (**self).list(filters)
    }
    fn cleanup(&self) -> impl Future<Output = Result<()>> + Send {
        (**self).cleanup()
    }
}

/// A [`Snapshotter`] reached over gRPC: berth-snapshotter or any containerd proxy snapshotter.
///
/// This is how every part of berth uses the snapshotter. Cloning is cheap (clones share the
/// connection); the connection is made on first use and remade after the server restarts.
#[derive(Debug, Clone)]
pub struct RemoteSnapshotter {
    client: SnapshotsClient<Channel>,
    name: String,
    namespace: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

/// The gRPC metadata key containerd reads its namespace from.
const CONTAINERD_NAMESPACE: &str = "containerd-namespace";

impl RemoteSnapshotter {
    /// A proxy to the snapshots service on the Unix socket `socket`. `name` goes into each
    /// request's `snapshotter` field (containerd's servers use it to pick a snapshotter; berth's
    /// serves its configured driver whatever it says).
    pub fn new(socket: impl Into<PathBuf>, name: impl Into<String>) -> Self {
        Self::with_channel(crate::uds::channel(socket), name)
    }

    /// A proxy over an existing channel.
    pub fn with_channel(channel: Channel, name: impl Into<String>) -> Self {
        Self {
            client: SnapshotsClient::new(channel),
            name: name.into(),
            namespace: None,
        }
    }

    /// Sends `containerd-namespace: namespace` with every request. Only containerd's own
    /// snapshots service needs it (proxy snapshotters, berth-snapshotter included, serve one
    /// flat key space); with it, berth can use containerd's snapshotters too.
    pub fn with_namespace(mut self, namespace: &str) -> Result<Self> {
        let value = namespace
            .parse()
            .map_err(|_| Error::invalid_argument(format!("invalid namespace {namespace:?}")))?;
        self.namespace = Some(value);
        Ok(self)
    }

    /// The snapshotter berth is configured to use: berth-snapshotter's socket, or the
    /// `[proxy_plugins.NAME]` socket that `[snapshotter] driver` names.
    pub fn from_config(config: &Config) -> Self {
        Self::new(
            config.snapshotter_address(),
            config.snapshotter.driver.clone(),
        )
    }

    /// The snapshotter name sent with each request.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn client(&self) -> SnapshotsClient<Channel> {
        self.client.clone()
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(ns) = &self.namespace {
            request
                .metadata_mut()
                .insert(CONTAINERD_NAMESPACE, ns.clone());
        }
        request
    }
}

/// Wire mounts as domain mounts.
fn domain_mounts(mounts: Vec<berth_proto::containerd::types::Mount>) -> Vec<Mount> {
    mounts.into_iter().map(Mount::from).collect()
}

impl Snapshotter for RemoteSnapshotter {
    fn stat(&self, key: &str) -> impl Future<Output = Result<Info>> + Send {
        let req = self.request(pb::StatSnapshotRequest {
            snapshotter: self.name.clone(),
            key: key.into(),
        });
        let mut client = self.client();
        async move {
            let info = client.stat(req).await?.into_inner().info;
            info.ok_or_else(|| Error::internal("snapshotter answered stat without info"))?
                .try_into()
        }
    }

    fn update(
        &self,
        name: &str,
        labels: Labels,
        fieldpaths: &[String],
    ) -> impl Future<Output = Result<Info>> + Send {
        let req = self.request(pb::UpdateSnapshotRequest {
            snapshotter: self.name.clone(),
            info: Some(pb::Info {
                name: name.into(),
                labels: labels.into_iter().collect(),
                ..Default::default()
            }),
            update_mask: Some(berth_proto::prost_types::FieldMask {
                paths: fieldpaths.to_vec(),
            }),
        });
        let mut client = self.client();
        async move {
            let info = client.update(req).await?.into_inner().info;
            info.ok_or_else(|| Error::internal("snapshotter answered update without info"))?
                .try_into()
        }
    }

    fn usage(&self, key: &str) -> impl Future<Output = Result<Usage>> + Send {
        let req = self.request(pb::UsageRequest {
            snapshotter: self.name.clone(),
            key: key.into(),
        });
        let mut client = self.client();
        async move {
            let resp = client.usage(req).await?.into_inner();
            Ok(Usage {
                size: resp.size,
                inodes: resp.inodes,
            })
        }
    }

    fn mounts(&self, key: &str) -> impl Future<Output = Result<Vec<Mount>>> + Send {
        let req = self.request(pb::MountsRequest {
            snapshotter: self.name.clone(),
            key: key.into(),
        });
        let mut client = self.client();
        async move { Ok(domain_mounts(client.mounts(req).await?.into_inner().mounts)) }
    }

    fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> impl Future<Output = Result<Vec<Mount>>> + Send {
        let req = self.request(pb::PrepareSnapshotRequest {
            snapshotter: self.name.clone(),
            key: key.into(),
            parent: parent.unwrap_or_default().into(),
            labels: labels.into_iter().collect(),
        });
        let mut client = self.client();
        async move {
            Ok(domain_mounts(
                client.prepare(req).await?.into_inner().mounts,
            ))
        }
    }

    fn view(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> impl Future<Output = Result<Vec<Mount>>> + Send {
        let req = self.request(pb::ViewSnapshotRequest {
            snapshotter: self.name.clone(),
            key: key.into(),
            parent: parent.unwrap_or_default().into(),
            labels: labels.into_iter().collect(),
        });
        let mut client = self.client();
        async move { Ok(domain_mounts(client.view(req).await?.into_inner().mounts)) }
    }

    fn commit(
        &self,
        name: &str,
        key: &str,
        labels: Labels,
    ) -> impl Future<Output = Result<()>> + Send {
        let req = self.request(pb::CommitSnapshotRequest {
            snapshotter: self.name.clone(),
            name: name.into(),
            key: key.into(),
            labels: labels.into_iter().collect(),
            parent: String::new(),
        });
        let mut client = self.client();
        async move {
            client.commit(req).await?;
            Ok(())
        }
    }

    fn remove(&self, key: &str) -> impl Future<Output = Result<()>> + Send {
        let req = self.request(pb::RemoveSnapshotRequest {
            snapshotter: self.name.clone(),
            key: key.into(),
        });
        let mut client = self.client();
        async move {
            client.remove(req).await?;
            Ok(())
        }
    }

    fn list(&self, filters: &[String]) -> impl Future<Output = Result<Vec<Info>>> + Send {
        let req = self.request(pb::ListSnapshotsRequest {
            snapshotter: self.name.clone(),
            filters: filters.to_vec(),
        });
        let mut client = self.client();
        async move {
            let mut stream = client.list(req).await?.into_inner();
            let mut out = Vec::new();
            while let Some(batch) = stream.message().await? {
                for info in batch.info {
                    out.push(info.try_into()?);
                }
            }
            Ok(out)
        }
    }

    fn cleanup(&self) -> impl Future<Output = Result<()>> + Send {
        let req = self.request(pb::CleanupRequest {
            snapshotter: self.name.clone(),
        });
        let mut client = self.client();
        async move {
            client.cleanup(req).await?;
            Ok(())
        }
    }
}

/// Serves any [`Snapshotter`] as `containerd.services.snapshots.v1.Snapshots`.
///
/// A thin adapter: each method converts the request, calls the snapshotter and converts the
/// answer; errors keep their kind (→ gRPC code) and their whole message chain. The `snapshotter`
/// field of requests is ignored: one server serves one snapshotter, whatever name the client
/// (containerd sends its proxy plugin's name) gives it.
#[derive(Debug)]
pub struct SnapshotsService<S> {
    inner: Arc<S>,
}

impl<S> Clone for SnapshotsService<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

/// Infos per List message: containerd batches the same way, keeping messages small.
const LIST_BATCH: usize = 100;

impl<S: Snapshotter> SnapshotsService<S> {
    /// Serves `snapshotter`.
    pub fn new(snapshotter: S) -> Self {
        Self::from_arc(Arc::new(snapshotter))
    }

    /// Serves a shared snapshotter.
    pub fn from_arc(snapshotter: Arc<S>) -> Self {
        Self { inner: snapshotter }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> SnapshotsServer<Self> {
        SnapshotsServer::new(self)
    }
}

type Response<T> = std::result::Result<tonic::Response<T>, tonic::Status>;

#[tonic::async_trait]
impl<S: Snapshotter> Snapshots for SnapshotsService<S> {
    async fn prepare(
        &self,
        request: tonic::Request<pb::PrepareSnapshotRequest>,
    ) -> Response<pb::PrepareSnapshotResponse> {
        let req = request.into_inner();
        let mounts = self
            .inner
            .prepare(
                &req.key,
                convert::parent(&req.parent),
                convert::labels(req.labels),
            )
            .await?;
        Ok(tonic::Response::new(pb::PrepareSnapshotResponse {
            mounts: convert::mounts(mounts),
        }))
    }

    async fn view(
        &self,
        request: tonic::Request<pb::ViewSnapshotRequest>,
    ) -> Response<pb::ViewSnapshotResponse> {
        let req = request.into_inner();
        let mounts = self
            .inner
            .view(
                &req.key,
                convert::parent(&req.parent),
                convert::labels(req.labels),
            )
            .await?;
        Ok(tonic::Response::new(pb::ViewSnapshotResponse {
            mounts: convert::mounts(mounts),
        }))
    }

    async fn mounts(
        &self,
        request: tonic::Request<pb::MountsRequest>,
    ) -> Response<pb::MountsResponse> {
        let mounts = self.inner.mounts(&request.into_inner().key).await?;
        Ok(tonic::Response::new(pb::MountsResponse {
            mounts: convert::mounts(mounts),
        }))
    }

    async fn commit(&self, request: tonic::Request<pb::CommitSnapshotRequest>) -> Response<()> {
        let req = request.into_inner();
        self.inner
            .commit(&req.name, &req.key, convert::labels(req.labels))
            .await?;
        Ok(tonic::Response::new(()))
    }

    async fn remove(&self, request: tonic::Request<pb::RemoveSnapshotRequest>) -> Response<()> {
        self.inner.remove(&request.into_inner().key).await?;
        Ok(tonic::Response::new(()))
    }

    async fn stat(
        &self,
        request: tonic::Request<pb::StatSnapshotRequest>,
    ) -> Response<pb::StatSnapshotResponse> {
        let info = self.inner.stat(&request.into_inner().key).await?;
        Ok(tonic::Response::new(pb::StatSnapshotResponse {
            info: Some(info.into()),
        }))
    }

    async fn update(
        &self,
        request: tonic::Request<pb::UpdateSnapshotRequest>,
    ) -> Response<pb::UpdateSnapshotResponse> {
        let update = convert::Update::try_from(request.into_inner())?;
        let info = self
            .inner
            .update(&update.name, update.labels, &update.fieldpaths)
            .await?;
        Ok(tonic::Response::new(pb::UpdateSnapshotResponse {
            info: Some(info.into()),
        }))
    }

    type ListStream = Pin<
        Box<
            dyn futures::Stream<
                    Item = std::result::Result<pb::ListSnapshotsResponse, tonic::Status>,
                > + Send,
        >,
    >;

    async fn list(
        &self,
        request: tonic::Request<pb::ListSnapshotsRequest>,
    ) -> Response<Self::ListStream> {
        let infos = self.inner.list(&request.into_inner().filters).await?;
        let mut batches = Vec::new();
        let mut infos = infos.into_iter().map(pb::Info::from).peekable();
        while infos.peek().is_some() {
            batches.push(Ok(pb::ListSnapshotsResponse {
                info: infos.by_ref().take(LIST_BATCH).collect(),
            }));
        }
        Ok(tonic::Response::new(Box::pin(futures::stream::iter(
            batches,
        ))))
    }

    async fn usage(
        &self,
        request: tonic::Request<pb::UsageRequest>,
    ) -> Response<pb::UsageResponse> {
        let usage = self.inner.usage(&request.into_inner().key).await?;
        Ok(tonic::Response::new(pb::UsageResponse {
            size: usage.size,
            inodes: usage.inodes,
        }))
    }

    async fn cleanup(&self, _request: tonic::Request<pb::CleanupRequest>) -> Response<()> {
        self.inner.cleanup().await?;
        Ok(tonic::Response::new(()))
    }
}

/// Conversions between the wire types and the domain types.
mod convert {
    use std::collections::HashMap;
    use std::time::SystemTime;

    use berth_proto::containerd::services::snapshots::v1 as pb;
    use berth_proto::containerd::types as pbt;

    use super::{Info, Kind, Labels};
    use crate::error::{Error, Result};
    use crate::mount::Mount;

    /// `""` is "no parent" on the wire.
    pub(super) fn parent(parent: &str) -> Option<&str> {
        (!parent.is_empty()).then_some(parent)
    }

    pub(super) fn labels(labels: HashMap<String, String>) -> Labels {
        labels.into_iter().collect()
    }

    pub(super) fn mounts(mounts: Vec<Mount>) -> Vec<pbt::Mount> {
        mounts.into_iter().map(Into::into).collect()
    }

    impl From<pbt::Mount> for Mount {
        fn from(m: pbt::Mount) -> Self {
            Self {
                fstype: m.r#type,
                source: m.source,
                target: m.target,
                options: m.options,
            }
        }
    }

    impl From<Mount> for pbt::Mount {
        fn from(m: Mount) -> Self {
            Self {
                r#type: m.fstype,
                source: m.source,
                target: m.target,
                options: m.options,
            }
        }
    }

    impl From<Kind> for pb::Kind {
        fn from(kind: Kind) -> Self {
            match kind {
                Kind::View => Self::View,
                Kind::Active => Self::Active,
                Kind::Committed => Self::Committed,
            }
        }
    }

    impl TryFrom<pb::Kind> for Kind {
        type Error = Error;

        fn try_from(kind: pb::Kind) -> Result<Self> {
            match kind {
                pb::Kind::View => Ok(Self::View),
                pb::Kind::Active => Ok(Self::Active),
                pb::Kind::Committed => Ok(Self::Committed),
                pb::Kind::Unknown => Err(Error::invalid_argument("snapshot kind is unknown")),
            }
        }
    }

    impl From<Info> for pb::Info {
        fn from(info: Info) -> Self {
            Self {
                name: info.name,
                parent: info.parent.unwrap_or_default(),
                kind: pb::Kind::from(info.kind).into(),
                created_at: Some(info.created_at.into()),
                updated_at: Some(info.updated_at.into()),
                labels: info.labels.into_iter().collect(),
            }
        }
    }

    fn time(
        ts: Option<berth_proto::prost_types::Timestamp>,
        what: &str,
        name: &str,
    ) -> Result<SystemTime> {
        let ts =
            ts.ok_or_else(|| Error::invalid_argument(format!("snapshot {name:?} has no {what}")))?;
        SystemTime::try_from(ts).map_err(|e| {
            Error::invalid_argument(format!("snapshot {name:?}: invalid {what}")).with_source(e)
        })
    }

    impl TryFrom<pb::Info> for Info {
        type Error = Error;

        fn try_from(info: pb::Info) -> Result<Self> {
            let kind = pb::Kind::try_from(info.kind).map_err(|_| {
                Error::invalid_argument(format!(
                    "snapshot {:?}: unknown kind {}",
                    info.name, info.kind
                ))
            })?;
            let kind = Kind::try_from(kind).map_err(|e| {
                Error::invalid_argument(format!("snapshot {:?}", info.name)).with_source(e)
            })?;
            Ok(Self {
                created_at: time(info.created_at, "created_at", &info.name)?,
                updated_at: time(info.updated_at, "updated_at", &info.name)?,
                parent: parent(&info.parent).map(str::to_string),
                kind,
                labels: labels(info.labels),
                name: info.name,
            })
        }
    }

    /// The parts of an Update request a snapshotter acts on (only labels can change).
    pub(super) struct Update {
        pub(super) name: String,
        pub(super) labels: Labels,
        pub(super) fieldpaths: Vec<String>,
    }

    impl TryFrom<pb::UpdateSnapshotRequest> for Update {
        type Error = Error;

        fn try_from(req: pb::UpdateSnapshotRequest) -> Result<Self> {
            let info = req
                .info
                .ok_or_else(|| Error::invalid_argument("update request has no snapshot info"))?;
            Ok(Self {
                name: info.name,
                labels: labels(info.labels),
                fieldpaths: req.update_mask.map(|m| m.paths).unwrap_or_default(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::ErrorKind;

    /// Just enough of a snapshotter to check that the proxy and the adapter carry every field
    /// and error across the wire; the real conformance suite lives with berth-snapshotter.
    #[derive(Default)]
    struct Fake {
        infos: Mutex<BTreeMap<String, Info>>,
    }

    impl Fake {
        fn create(
            &self,
            kind: Kind,
            key: &str,
            parent: Option<&str>,
            labels: Labels,
        ) -> Result<Vec<Mount>> {
            let mut infos = self.infos.lock().unwrap();
            if infos.contains_key(key) {
                return Err(Error::already_exists(format!(
                    "snapshot {key:?} already exists"
                )));
            }
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
            let info = Info {
                name: key.into(),
                parent: parent.map(Into::into),
                kind,
                labels,
                created_at: now,
                updated_at: now,
            };
            infos.insert(key.into(), info);
            Ok(vec![Mount::bind(
                format!("/snap/{key}"),
                kind == Kind::View,
            )])
        }
    }

    impl Snapshotter for Fake {
        async fn stat(&self, key: &str) -> Result<Info> {
            let infos = self.infos.lock().unwrap();
            infos
                .get(key)
                .cloned()
                .ok_or_else(|| Error::not_found(format!("snapshot {key:?} does not exist")))
        }
        async fn update(&self, name: &str, labels: Labels, fieldpaths: &[String]) -> Result<Info> {
            assert_eq!(fieldpaths, ["labels.a"]);
            let mut infos = self.infos.lock().unwrap();
            let info = infos
                .get_mut(name)
                .ok_or_else(|| Error::not_found("missing"))?;
            info.labels = labels;
            Ok(info.clone())
        }
        async fn usage(&self, _key: &str) -> Result<Usage> {
            Ok(Usage {
                size: 4096,
                inodes: 2,
            })
        }
        async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
            Ok(vec![Mount::bind(format!("/snap/{key}"), false)])
        }
        async fn prepare(
            &self,
            key: &str,
            parent: Option<&str>,
            labels: Labels,
        ) -> Result<Vec<Mount>> {
            self.create(Kind::Active, key, parent, labels)
        }
        async fn view(
            &self,
            key: &str,
            parent: Option<&str>,
            labels: Labels,
        ) -> Result<Vec<Mount>> {
            self.create(Kind::View, key, parent, labels)
        }
        async fn commit(&self, _name: &str, _key: &str, _labels: Labels) -> Result<()> {
            Err(Error::failed_precondition("snapshot \"k\" is not active"))
        }
        async fn remove(&self, key: &str) -> Result<()> {
            self.infos.lock().unwrap().remove(key);
            Ok(())
        }
        async fn list(&self, _filters: &[String]) -> Result<Vec<Info>> {
            Ok(self.infos.lock().unwrap().values().cloned().collect())
        }
        async fn cleanup(&self) -> Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_proxy_carries_everything_through_the_adapter() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("snap.sock");
        let listener = crate::uds::bind(&socket, 0o600, None).await.unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let router =
            crate::grpc::server().add_service(SnapshotsService::new(Fake::default()).into_server());
        let server = tokio::spawn(crate::grpc::serve(
            router,
            listener,
            shutdown.clone().cancelled_owned(),
        ));

        let remote = RemoteSnapshotter::new(&socket, "berth");
        let labels: Labels = [("a".to_string(), "1".to_string())].into();
        let mounts = remote
            .prepare("k", Some("p"), labels.clone())
            .await
            .unwrap();
        assert_eq!(mounts, [Mount::bind("/snap/k", false)]);
        let info = remote.stat("k").await.unwrap();
        assert_eq!(info.parent.as_deref(), Some("p"));
        assert_eq!(info.kind, Kind::Active);
        assert_eq!(info.labels, labels);
        assert_eq!(
            info.created_at,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );

        let err = remote.prepare("k", None, Labels::new()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert_eq!(err.message(), "snapshot \"k\" already exists");
        let err = remote.commit("n", "k", Labels::new()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert_eq!(
            remote.stat("nope").await.unwrap_err().kind(),
            ErrorKind::NotFound
        );

        let updated = remote
            .update(
                "k",
                [("a".to_string(), "2".to_string())].into(),
                &["labels.a".to_string()],
            )
            .await
            .unwrap();
        assert_eq!(updated.labels["a"], "2");
        assert_eq!(
            remote.usage("k").await.unwrap(),
            Usage {
                size: 4096,
                inodes: 2
            }
        );

        // More than one List batch.
        for i in 0..250 {
            remote
                .view(&format!("v{i:03}"), None, Labels::new())
                .await
                .unwrap();
        }
        let all = remote.list(&[]).await.unwrap();
        assert_eq!(all.len(), 251);
        assert!(
            all.iter()
                .filter(|i| i.kind == Kind::View)
                .all(|i| i.name.starts_with('v'))
        );
        remote.cleanup().await.unwrap();

        shutdown.cancel();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn wire_info_without_kind_or_times_is_refused() {
        let info = pb::Info {
            name: "x".into(),
            kind: pb::Kind::Unknown.into(),
            ..Default::default()
        };
        assert_eq!(
            Info::try_from(info).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        let info = pb::Info {
            name: "x".into(),
            kind: pb::Kind::Active.into(),
            ..Default::default()
        };
        assert!(
            Info::try_from(info)
                .unwrap_err()
                .message()
                .contains("created_at")
        );
        assert_eq!("committed".parse::<Kind>().unwrap(), Kind::Committed);
        assert!("frozen".parse::<Kind>().is_err());
    }
}
