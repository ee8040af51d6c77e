//! The images service's domain logic: image records, references, users, deletion and garbage
//! collection. Pull, push, unpack and archives live in their own modules and use this state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use berth_core::snapshots::{Kind, RemoteSnapshotter, Snapshotter};
use berth_core::userns::{IdMap, SNAPSHOT_KEY_MARK};
use berth_core::{Config, Digest, Error, Reference, Result, Service};

use crate::content::ContentStore;
use crate::meta::{self, ImageRecord, Lease, Meta, UserKey};
use crate::oci::{self, Platform};
use crate::pull::Download;
use crate::registry::{Registries, RegistryConfig};
use crate::view::SnapshotView;

/// How long a lease left by a crashed operation protects its content.
pub const LEASE_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// Prefix of the keys of active snapshots layers are unpacked into.
pub const EXTRACT_PREFIX: &str = "extract-";
/// Largest config blob accepted.
pub const MAX_CONFIG: usize = 16 << 20;

/// The images service.
#[derive(Debug)]
pub struct Images {
    pub(crate) config: Config,
    pub(crate) content: ContentStore,
    pub(crate) meta: Meta,
    pub(crate) registries: Registries,
    pub(crate) platform: Platform,
    /// Where active snapshots are mounted while a layer is applied.
    pub(crate) tmp: PathBuf,
    /// Downloads in flight, shared by concurrent pulls of the same blob.
    pub(crate) downloads: Mutex<HashMap<Digest, Arc<Download>>>,
    /// Operations hold it shared; garbage collection takes it exclusively.
    pub(crate) gc_lock: tokio::sync::RwLock<()>,
    counter: AtomicU64,
    snapshotters: Mutex<HashMap<String, RemoteSnapshotter>>,
    /// The container id map (userns-remap, rootless): layers for containers are unpacked
    /// shifted through it, in their own snapshots (see [`SnapshotView`]).
    pub(crate) id_map: Option<Arc<IdMap>>,
}

/// An image found from user input.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub record: ImageRecord,
    /// The reference the input named (a tag or a digest reference), if it was one.
    pub reference: Option<Reference>,
}

/// One line of a delete or prune answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteItem {
    Untagged(String),
    Deleted(String),
}

/// What garbage collection removed (or would remove).
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    pub blobs: Vec<String>,
    pub snapshots: Vec<String>,
    pub bytes: u64,
}

impl Images {
    /// Opens the stores under the config's data root.
    pub fn open(config: Config) -> Result<Self> {
        let content = ContentStore::open(&config.root.join("content"))?;
        let dir = config.data_dir(Service::Images);
        let meta = Meta::open(&dir.join("images.redb"))?;
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp)
            .map_err(|e| Error::internal(format!("create {}", tmp.display())).with_source(e))?;
        let platform = Platform::parse(&config.images.platform)?;
        let id_map = config.container_id_map()?.map(Arc::new);
        if let Some(m) = &id_map {
            let (uid, gid) = m.root();
            tracing::info!(uid, gid, key = %m.snapshot_suffix(), "layers are unpacked shifted for containers' user namespaces");
        }
        let registries = Registries::new(RegistryConfig {
            insecure_registries: config.images.insecure_registries.clone(),
            registry_mirrors: config.images.registry_mirrors.clone(),
            certs_dir: config.images.certs_dir.clone(),
            registry_config_path: config.images.registry_config_path.clone(),
        });
        Ok(Self {
            config,
            content,
            meta,
            registries,
            platform,
            tmp,
            downloads: Mutex::default(),
            gc_lock: tokio::sync::RwLock::new(()),
            counter: AtomicU64::new(0),
            snapshotters: Mutex::default(),
            id_map,
        })
    }

    /// A number unique in this process (for temporary names).
    pub(crate) fn next_id(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    /// The snapshotter name a request means: `""` is the configured one. With a container id
    /// map, a name without a mapping means the view of this daemon's map (where layers for
    /// containers go); [`Self::plain_snapshotter_name`] is the unshifted one.
    pub fn snapshotter_name(&self, name: &str) -> String {
        let base = self.plain_snapshotter_name(name);
        match &self.id_map {
            Some(m) if !base.contains(SNAPSHOT_KEY_MARK) => {
                format!("{base}{}", m.snapshot_suffix())
            }
            _ => base,
        }
    }

    /// The snapshotter name a request means, without any id shifting (`--userns=host`).
    pub fn plain_snapshotter_name(&self, name: &str) -> String {
        if name.is_empty() {
            self.config.snapshotter.driver.clone()
        } else {
            name.to_string()
        }
    }

    /// The snapshotter (view) called `name` as [`Self::snapshotter_name`] or
    /// [`Self::plain_snapshotter_name`] resolved it (`""`: the configured one, with this
    /// daemon's mapping), always reached over gRPC. A name `<snapshotter>@userns-<fingerprint>` is the
    /// view of that mapping.
    pub fn snapshotter(&self, name: &str) -> SnapshotView {
        // A name given is already resolved (a view name, or the plain snapshotter's).
        let name = if name.is_empty() {
            self.snapshotter_name("")
        } else {
            name.to_string()
        };
        let (base, suffix) = match name.find(SNAPSHOT_KEY_MARK) {
            Some(at) => (name[..at].to_string(), name[at..].to_string()),
            None => (name.clone(), String::new()),
        };
        let map = self
            .id_map
            .as_ref()
            .filter(|m| !suffix.is_empty() && m.snapshot_suffix() == suffix)
            .cloned();
        SnapshotView::new(self.remote_snapshotter(&base), suffix, map)
    }

    /// The snapshotter called `name`, as it is (no view).
    fn remote_snapshotter(&self, name: &str) -> RemoteSnapshotter {
        let name = name.to_string();
        let mut map = self.snapshotters.lock().unwrap();
        map.entry(name.clone())
            .or_insert_with(|| {
                if name == self.config.snapshotter.driver {
                    RemoteSnapshotter::from_config(&self.config)
                } else if let Some(p) = self.config.proxy_plugins.get(&name) {
                    RemoteSnapshotter::new(p.address.clone(), name.clone())
                } else {
                    RemoteSnapshotter::new(self.config.socket(Service::Snapshotter), name.clone())
                }
            })
            .clone()
    }

    /// Cleans up after a crash: unmounts and removes leftover unpack mounts, removes active
    /// snapshots of unpacks that never finished and the partial layers of unfinished child
    /// images.
    pub async fn recover(&self) {
        // Pulls may already be running in this process: leave their names (this process's
        // nonce) alone.
        let mine = format!("{}-", crate::nonce());
        if let Ok(rd) = std::fs::read_dir(&self.tmp) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&mine) {
                    continue;
                }
                let p = e.path();
                if let Err(err) = berth_core::mount::unmount_all(&p) {
                    tracing::warn!(path = %p.display(), error = %err.chain(), "unmount leftover unpack mount");
                    continue;
                }
                // Never recursive: a directory still holding files is not ours to delete.
                if let Err(err) = std::fs::remove_dir(&p) {
                    tracing::warn!(path = %p.display(), error = %err, "remove leftover unpack directory");
                }
            }
        }
        // A child image's layer cannot be resumed (its stream is gone with the caller): an
        // unfinished one of an earlier process is dropped now rather than after 24 hours.
        self.content.remove_stale_staging();
        let my_layers = format!("{}{mine}", crate::child::LAYER_INGEST_PREFIX);
        if let Ok(ingests) = self.content.ingests() {
            for ing in ingests.into_iter().filter(|i| {
                i.reference.starts_with(crate::child::LAYER_INGEST_PREFIX)
                    && !i.reference.starts_with(&my_layers)
            }) {
                match std::fs::remove_dir_all(&ing.dir) {
                    Ok(()) => {
                        tracing::info!(ingest = %ing.reference, "removed unfinished commit layer")
                    }
                    Err(err) => {
                        tracing::warn!(ingest = %ing.reference, error = %err, "remove unfinished commit layer")
                    }
                }
            }
        }
        let my_keys = format!("{EXTRACT_PREFIX}{mine}");
        let mut views = vec![self.snapshotter("")];
        if self.id_map.is_some() {
            views.push(self.snapshotter(&self.plain_snapshotter_name("")));
        }
        for sn in views {
            self.remove_unfinished_unpacks(&sn, &my_keys).await;
        }
    }

    /// Removes the active snapshots of unpacks that never finished (not this process's).
    async fn remove_unfinished_unpacks(&self, sn: &SnapshotView, my_keys: &str) {
        match sn.list(&["kind==active".to_string()]).await {
            Ok(infos) => {
                for info in infos
                    .into_iter()
                    .filter(|i| i.name.starts_with(EXTRACT_PREFIX) && !i.name.starts_with(my_keys))
                {
                    match sn.remove(&info.name).await {
                        Ok(()) => {
                            tracing::info!(key = %info.name, "removed unfinished unpack snapshot")
                        }
                        Err(err) => {
                            tracing::warn!(key = %info.name, error = %err.chain(), "remove unfinished unpack snapshot")
                        }
                    }
                }
            }
            Err(err) => {
                tracing::debug!(error = %err.chain(), "snapshotter not reachable for recovery")
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Leases

    /// Starts a persisted lease; the returned guard deletes it when dropped. It outlives a crash
    /// of this process until it expires, so content a pull stored stays for the next pull.
    pub fn lease(self: &Arc<Self>) -> Result<LeaseGuard> {
        self.start_lease(format!("op-{}-{}", std::process::id(), self.next_id()))
    }

    /// Starts a lease that only guards a local operation (a commit) against a concurrent GC
    /// while this process runs: its writes cost no fsync, and a crash may forget it, which
    /// loses nothing, since what it guards is not wanted after a crash.
    pub fn local_lease(self: &Arc<Self>) -> Result<LeaseGuard> {
        self.start_lease(format!(
            "{LOCAL_LEASE_PREFIX}{}-{}",
            std::process::id(),
            self.next_id()
        ))
    }

    fn start_lease(self: &Arc<Self>, id: String) -> Result<LeaseGuard> {
        let now = SystemTime::now();
        let lease = Lease {
            created_nanos: crate::time::to_nanos(now),
            expires_nanos: crate::time::to_nanos(now + LEASE_EXPIRY),
            ..Default::default()
        };
        lease_write(&self.meta, &id, |tx| tx.put(meta::LEASES, &id, &lease))?;
        Ok(LeaseGuard {
            images: self.clone(),
            id,
        })
    }

    // ---------------------------------------------------------------------------------------
    // Lookup

    /// Finds the image `input` names: a full id (`sha256:<hex>` or `<hex>`), a reference
    /// (tag or digest), or a unique id prefix — Docker's order.
    pub fn resolve(&self, input: &str) -> Result<Resolved> {
        let not_found = || Error::not_found(format!("No such image: {input}"));
        if input.is_empty() {
            return Err(Error::invalid_argument("image reference is empty"));
        }
        let bare = input.strip_prefix("sha256:").unwrap_or(input);
        let is_hex =
            !bare.is_empty() && bare.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if is_hex && bare.len() == 64 {
            let id = format!("sha256:{bare}");
            return match self.meta.image(&id)? {
                Some(record) => Ok(Resolved {
                    record,
                    reference: None,
                }),
                None => Err(not_found()),
            };
        }
        if input.starts_with("sha256:") && !is_hex {
            return Err(Error::invalid_argument(format!(
                "invalid image id {input:?}"
            )));
        }
        if !input.starts_with("sha256:")
            && let Ok(r) = Reference::parse(input)
        {
            if let Some(d) = r.digest() {
                let want = format!("{}@{}", r.repository(), d);
                for rec in self.meta.images()? {
                    if rec.repo_digests.contains(&want) || rec.id == d.as_str() {
                        return Ok(Resolved {
                            record: rec,
                            reference: Some(r),
                        });
                    }
                }
            } else if let Some(id) = self
                .meta
                .read(|rx| rx.get::<String>(meta::TAGS, &r.to_string()))?
                && let Some(record) = self.meta.image(&id)?
            {
                return Ok(Resolved {
                    record,
                    reference: Some(r),
                });
            }
        }
        if is_hex {
            let mut found = self.meta.images()?.into_iter().filter(|r| {
                r.id.strip_prefix("sha256:")
                    .unwrap_or(&r.id)
                    .starts_with(bare)
            });
            if let Some(first) = found.next() {
                if found.next().is_some() {
                    return Err(Error::invalid_argument(format!(
                        "multiple IDs found with provided prefix: {input}"
                    )));
                }
                return Ok(Resolved {
                    record: first,
                    reference: None,
                });
            }
        }
        Err(not_found())
    }

    /// The tags pointing at image `id`, sorted.
    pub fn tags_of(&self, id: &str) -> Result<Vec<String>> {
        let mut t: Vec<String> = self
            .meta
            .tags()?
            .into_iter()
            .filter(|(_, i)| i == id)
            .map(|(r, _)| r)
            .collect();
        t.sort();
        Ok(t)
    }

    /// The users of image `id`.
    pub fn users_of(&self, id: &str) -> Result<Vec<UserKey>> {
        Ok(self
            .meta
            .users()?
            .into_iter()
            .filter(|(_, i)| i == id)
            .map(|(u, _)| u)
            .collect())
    }

    /// Records an image (merging with an existing record of the same id) and points `tags` at
    /// it, in one transaction. Returns whether anything changed.
    pub fn commit_image(&self, mut rec: ImageRecord, tags: &[String]) -> Result<bool> {
        let now = crate::time::to_nanos(SystemTime::now());
        self.meta.write(|tx| {
            let mut changed = false;
            if let Some(old) = tx.get::<ImageRecord>(meta::IMAGES, &rec.id)? {
                let mut digests = old.repo_digests.clone();
                for d in &rec.repo_digests {
                    if !digests.contains(d) {
                        digests.push(d.clone());
                        changed = true;
                    }
                }
                rec.repo_digests = digests;
                let before = old.unpacked_in.len();
                rec.unpacked_in.extend(old.unpacked_in.iter().cloned());
                changed |= rec.unpacked_in.len() != before;
                let mut labels = old.labels.clone();
                labels.extend(rec.labels.clone());
                rec.labels = labels;
                rec.added_nanos = old.added_nanos;
                rec.last_tag_nanos = old.last_tag_nanos;
                if rec.index.is_none() {
                    rec.index = old.index.clone();
                }
            } else {
                rec.added_nanos = now;
                changed = true;
            }
            for t in tags {
                let prev: Option<String> = tx.get(meta::TAGS, t)?;
                if prev.as_deref() != Some(rec.id.as_str()) {
                    tx.put(meta::TAGS, t, &rec.id)?;
                    rec.last_tag_nanos = now;
                    changed = true;
                }
            }
            rec.pending_delete = false;
            tx.put(meta::IMAGES, &rec.id.clone(), &rec)?;
            Ok(changed)
        })
    }

    // ---------------------------------------------------------------------------------------
    // Tag, delete, users

    /// Points `target` at the image `source` names. Returns the full reference.
    pub fn tag(&self, source: &str, target: &str) -> Result<(String, String)> {
        let img = self.resolve(source)?;
        let r = Reference::parse(target)?;
        if r.digest().is_some() {
            return Err(Error::invalid_argument(
                "refusing to create a tag with a digest reference",
            ));
        }
        let full = r.to_string();
        let now = crate::time::to_nanos(SystemTime::now());
        let id = img.record.id.clone();
        self.meta.write(|tx| {
            tx.put(meta::TAGS, &full, &id)?;
            if let Some(mut rec) = tx.get::<ImageRecord>(meta::IMAGES, &id)? {
                rec.last_tag_nanos = now;
                rec.pending_delete = false;
                tx.put(meta::IMAGES, &id, &rec)?;
            }
            Ok(())
        })?;
        Ok((full, id))
    }

    /// Docker's `rmi`.
    pub async fn delete(&self, input: &str, force: bool) -> Result<Vec<DeleteItem>> {
        let found = self.resolve(input)?;
        let id = found.record.id.clone();
        let short = short_id(&id);
        let tags = self.tags_of(&id)?;
        let users = self.users_of(&id)?;
        let mut items = Vec::new();
        let delete_record = match found.reference.clone() {
            Some(r) => {
                let name = match r.digest() {
                    Some(d) => format!("{}@{}", r.repository(), d),
                    None => r.to_string(),
                };
                let is_tag = r.digest().is_none();
                let remaining_tags = tags.iter().filter(|t| !is_tag || **t != name).count();
                let remaining_digests = found
                    .record
                    .repo_digests
                    .iter()
                    .filter(|d| is_tag || **d != name)
                    .count();
                let last = remaining_tags == 0;
                if last && !users.is_empty() && !force {
                    return Err(Error::failed_precondition(format!(
                        "conflict: unable to remove repository reference \"{input}\" (must force) - {} {} is using its referenced image {short}",
                        users[0].kind,
                        short_id(&users[0].id),
                    )));
                }
                self.meta.write(|tx| {
                    if is_tag {
                        tx.del(meta::TAGS, &name)?;
                    } else if let Some(mut rec) = tx.get::<ImageRecord>(meta::IMAGES, &id)? {
                        rec.repo_digests.retain(|d| *d != name);
                        tx.put(meta::IMAGES, &id, &rec)?;
                    }
                    Ok(())
                })?;
                items.push(DeleteItem::Untagged(name));
                let _ = remaining_digests;
                last
            }
            None => {
                if tags.len() > 1 && !force {
                    return Err(Error::failed_precondition(format!(
                        "conflict: unable to delete {short} (must be forced) - image is referenced in multiple repositories"
                    )));
                }
                if !users.is_empty() && !force {
                    return Err(Error::failed_precondition(format!(
                        "conflict: unable to delete {short} (must be forced) - image is being used by {} {}",
                        users[0].kind,
                        short_id(&users[0].id),
                    )));
                }
                self.meta.write(|tx| {
                    for t in &tags {
                        tx.del(meta::TAGS, t)?;
                    }
                    Ok(())
                })?;
                items.extend(tags.iter().cloned().map(DeleteItem::Untagged));
                true
            }
        };
        if delete_record {
            if users.is_empty() && self.cached_images()?.contains(&id) {
                // The build cache keeps it (untagged, hidden) until `docker builder prune`.
                items.push(DeleteItem::Deleted(id.clone()));
            } else if !users.is_empty() {
                self.meta.write(|tx| {
                    if let Some(mut rec) = tx.get::<ImageRecord>(meta::IMAGES, &id)? {
                        rec.pending_delete = true;
                        tx.put(meta::IMAGES, &id, &rec)?;
                    }
                    Ok(())
                })?;
            } else {
                items.extend(self.delete_record(&id).await?);
            }
        }
        Ok(items)
    }

    /// Removes an image record and collects what it alone referenced.
    async fn delete_record(&self, id: &str) -> Result<Vec<DeleteItem>> {
        let mut items = Vec::new();
        let rec = self.meta.write(|tx| {
            let rec: Option<ImageRecord> = tx.get(meta::IMAGES, id)?;
            for (t, i) in tx.list::<String>(meta::TAGS)? {
                if i == id {
                    tx.del(meta::TAGS, &t)?;
                }
            }
            tx.del(meta::IMAGES, id)?;
            Ok(rec)
        })?;
        if let Some(rec) = rec {
            items.extend(rec.repo_digests.iter().cloned().map(DeleteItem::Untagged));
            items.push(DeleteItem::Deleted(rec.id.clone()));
            // Collect now unless an operation holds content (a pull can take minutes): then the
            // next collection gets it.
            let report = match self.gc_lock.try_write() {
                Ok(_exclusive) => self.gc_locked(false).await,
                Err(_) => {
                    tracing::info!(image = %rec.id, "operations in flight; garbage collection deferred");
                    Ok(GcReport::default())
                }
            };
            match report {
                Ok(report) => {
                    items.extend(report.snapshots.iter().map(|s| {
                        DeleteItem::Deleted(s.rsplit('/').next().unwrap_or(s).to_string())
                    }))
                }
                Err(err) => {
                    tracing::warn!(error = %err.chain(), "garbage collection after delete failed")
                }
            }
        }
        Ok(items)
    }

    /// Records a user of an image (idempotent).
    pub fn add_user(&self, owner: &str, kind: &str, user_id: &str, image: &str) -> Result<()> {
        let img = self.resolve(image)?;
        let key = UserKey {
            owner: owner.into(),
            kind: kind.into(),
            id: user_id.into(),
        };
        self.meta.write(|tx| tx.put_user(&key, &img.record.id))
    }

    /// Drops a user (idempotent); an image deleted with force goes with its last user.
    pub async fn remove_user(&self, owner: &str, kind: &str, user_id: &str) -> Result<()> {
        let key = UserKey {
            owner: owner.into(),
            kind: kind.into(),
            id: user_id.into(),
        };
        self.meta.write(|tx| tx.del_user(&key))?;
        self.delete_pending().await
    }

    /// Replaces every user of `owner`.
    pub async fn set_users(&self, owner: &str, users: Vec<(String, String, String)>) -> Result<()> {
        let mut resolved = Vec::new();
        for (kind, id, image) in users {
            match self.resolve(&image) {
                Ok(img) => resolved.push((
                    UserKey {
                        owner: owner.into(),
                        kind,
                        id,
                    },
                    img.record.id,
                )),
                Err(err) => {
                    tracing::warn!(image = %image, error = %err.chain(), "user of an unknown image ignored")
                }
            }
        }
        self.meta.write(|tx| {
            for (k, _) in tx.users()? {
                if k.owner == owner {
                    tx.del_user(&k)?;
                }
            }
            for (k, img) in &resolved {
                tx.put_user(k, img)?;
            }
            Ok(())
        })?;
        self.delete_pending().await
    }

    async fn delete_pending(&self) -> Result<()> {
        let users = self.meta.users()?;
        for rec in self.meta.images()? {
            if rec.pending_delete
                && !users.iter().any(|(_, i)| *i == rec.id)
                && self.tags_of(&rec.id)?.is_empty()
            {
                self.delete_record(&rec.id).await?;
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Garbage collection

    /// Removes blobs and snapshots that no image, lease or in-flight operation references.
    pub async fn gc(&self, dry_run: bool) -> Result<GcReport> {
        let _exclusive = self.gc_lock.write().await;
        self.gc_locked(dry_run).await
    }

    /// [`Self::gc`] with the lock held by the caller.
    async fn gc_locked(&self, dry_run: bool) -> Result<GcReport> {
        let now = SystemTime::now();
        let images = self.meta.images()?;
        let leases = self.meta.leases()?;
        let mut blobs: BTreeSet<String> = BTreeSet::new();
        let mut chains: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let default = self.snapshotter_name("");
        chains.entry(default.clone()).or_default();
        chains.entry(self.plain_snapshotter_name("")).or_default();
        for rec in &images {
            blobs.insert(rec.target.digest.clone());
            blobs.insert(rec.config.digest.clone());
            if let Some(i) = &rec.index {
                blobs.insert(i.digest.clone());
            }
            blobs.extend(rec.layers.iter().map(|l| l.digest.clone()));
            let diff_ids: Vec<Digest> =
                rec.diff_ids.iter().filter_map(|d| d.parse().ok()).collect();
            let ids: Vec<String> = oci::chain_ids(&diff_ids)
                .into_iter()
                .map(|d| d.to_string())
                .collect();
            for sn in &rec.unpacked_in {
                chains
                    .entry(sn.clone())
                    .or_default()
                    .extend(ids.iter().cloned());
            }
        }
        let mut expired = Vec::new();
        for (id, lease) in &leases {
            if crate::time::from_nanos(lease.expires_nanos) < now {
                expired.push(id.clone());
                continue;
            }
            blobs.extend(lease.blobs.iter().cloned());
            for sn in chains.values_mut() {
                sn.extend(lease.snapshots.iter().cloned());
            }
        }
        let mut report = GcReport::default();
        for info in self.content.list()? {
            if !blobs.contains(info.digest.as_str()) {
                report.blobs.push(info.digest.to_string());
                report.bytes += info.size as u64;
                if !dry_run {
                    self.content.delete(&info.digest)?;
                    self.meta
                        .write(|tx| tx.del(meta::CONTENT_LABELS, info.digest.as_str()))?;
                }
            }
        }
        if !dry_run {
            for ing in self.content.ingests()? {
                let age = now.duration_since(ing.updated).unwrap_or_default();
                if age > LEASE_EXPIRY && !self.content.is_active(&ing.reference) {
                    let _ = std::fs::remove_dir_all(&ing.dir);
                }
            }
            self.meta.write(|tx| {
                for id in &expired {
                    tx.del(meta::LEASES, id)?;
                }
                Ok(())
            })?;
        }
        for (name, keep) in chains {
            let sn = self.snapshotter(&name);
            let infos = match sn.list(&[]).await {
                Ok(i) => i,
                Err(err) => {
                    tracing::warn!(snapshotter = %name, error = %err.chain(), "snapshot gc skipped");
                    continue;
                }
            };
            let mut candidates: BTreeSet<String> = infos
                .iter()
                .filter(|i| {
                    (i.kind == Kind::Committed
                        && i.name.starts_with("sha256:")
                        && !keep.contains(&i.name))
                        || (i.kind == Kind::Active && i.name.starts_with(EXTRACT_PREFIX))
                })
                .map(|i| i.name.clone())
                .collect();
            let mut present: Vec<(String, Option<String>)> = infos
                .iter()
                .map(|i| (i.name.clone(), i.parent.clone()))
                .collect();
            loop {
                let leaves: Vec<String> = candidates
                    .iter()
                    .filter(|c| {
                        !present
                            .iter()
                            .any(|(_, p)| p.as_deref() == Some(c.as_str()))
                    })
                    .cloned()
                    .collect();
                if leaves.is_empty() {
                    break;
                }
                for leaf in leaves {
                    candidates.remove(&leaf);
                    if !dry_run && let Err(err) = sn.remove(&leaf).await {
                        tracing::warn!(snapshot = %leaf, error = %err.chain(), "remove snapshot");
                        continue;
                    }
                    present.retain(|(n, _)| *n != leaf);
                    report.snapshots.push(format!("{name}/{leaf}"));
                }
            }
        }
        if !report.blobs.is_empty() || !report.snapshots.is_empty() {
            tracing::info!(
                blobs = report.blobs.len(),
                snapshots = report.snapshots.len(),
                bytes = report.bytes,
                dry_run,
                "garbage collected"
            );
        }
        Ok(report)
    }

    /// Reads the config blob of an image.
    pub fn config_of(&self, rec: &ImageRecord) -> Result<Vec<u8>> {
        let d = rec.config.digest()?;
        self.content.read_blob(&d, MAX_CONFIG as u64)
    }

    /// Adds `digest` to a lease (so GC keeps it after a crash).
    pub fn lease_add(&self, lease: &str, blobs: &[&Digest], snapshots: &[&Digest]) -> Result<()> {
        lease_write(&self.meta, lease, |tx| {
            let Some(mut l) = tx.get::<Lease>(meta::LEASES, lease)? else {
                return Ok(());
            };
            for b in blobs {
                l.blobs.insert(b.to_string());
            }
            for s in snapshots {
                l.snapshots.insert(s.to_string());
            }
            tx.put(meta::LEASES, lease, &l)
        })
    }

    /// Notes that `digest` came from `repository` on `host` (for cross-repository mounts).
    pub fn label_source(&self, digests: &[&Digest], host: &str, repository: &str) -> Result<()> {
        let key = format!("containerd.io/distribution.source.{host}");
        self.meta.write(|tx| {
            for d in digests {
                let mut labels: BTreeMap<String, String> = tx
                    .get(meta::CONTENT_LABELS, d.as_str())?
                    .unwrap_or_default();
                let entry = labels.entry(key.clone()).or_default();
                let mut repos: Vec<&str> = entry.split(',').filter(|s| !s.is_empty()).collect();
                if !repos.contains(&repository) {
                    repos.push(repository);
                    *entry = repos.join(",");
                    tx.put(meta::CONTENT_LABELS, d.as_str(), &labels)?;
                }
            }
            Ok(())
        })
    }
}

/// Deletes its lease when dropped.
#[derive(Debug)]
pub struct LeaseGuard {
    images: Arc<Images>,
    pub id: String,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Err(err) = lease_write(&self.images.meta, &self.id, |tx| {
            tx.del(meta::LEASES, &self.id).map(drop)
        }) {
            tracing::warn!(lease = %self.id, error = %err.chain(), "delete lease");
        }
    }
}

/// The id prefix of [`Images::local_lease`]'s leases.
const LOCAL_LEASE_PREFIX: &str = "local-";

/// A write to lease `id`: flushed to disk for persisted leases, not for local ones.
fn lease_write(meta: &Meta, id: &str, f: impl FnOnce(&meta::Tx<'_>) -> Result<()>) -> Result<()> {
    if id.starts_with(LOCAL_LEASE_PREFIX) {
        meta.write_volatile(f)
    } else {
        meta.write(f)
    }
}

/// The 12-hex short form of an id.
pub fn short_id(id: &str) -> String {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex.chars().take(12).collect()
}
