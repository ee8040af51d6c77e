//! The local snapshotter: snapshot directories on this machine, records in redb.
//!
//! On disk, under the driver's root (`<root>/snapshotter/<driver>/`):
//!
//! ```text
//! metadata.redb             records (see store.rs)
//! snapshots/<id>/fs         the snapshot's tree (overlay: its upper layer; native: a full copy)
//! snapshots/<id>/work       overlay's workdir (active overlay snapshots only)
//! ```
//!
//! Numeric ids keep the paths short, so long overlay chains stay small.
//!
//! Crash safety, with one redb write transaction per operation:
//! - create: the directory is made (and its parent directory synced) *before* the transaction
//!   that records it commits. A crash in between leaves a directory without a record, which
//!   no operation ever sees and [`Snapshotter::cleanup`] removes.
//! - remove: the record is deleted first; the directory after. A crash in between again
//!   leaves only a directory without a record.
//! - commit: a single transaction renames the record; the directory does not move.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_core::mount::Mount;
use berth_core::snapshots::{Info, Kind, Labels, Snapshotter, Usage};
use berth_core::{Error, Result};
use tracing::{debug, info, warn};

use crate::filter::Filters;
use crate::fsutil;
use crate::store::{Lookup, Record, Store, StoredKind, now_nanos};

/// How snapshots are laid out and presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Driver {
    /// Overlay filesystem: each snapshot holds only its own changes; mounts stack the parent
    /// chain as overlay lower layers. The default.
    Overlayfs,
    /// Plain directories: each snapshot starts as a full copy of its parent; mounts are bind
    /// mounts. Works on any filesystem, costs a copy per snapshot.
    Native,
}

impl Driver {
    /// `overlayfs` or `native`, as in `[snapshotter] driver`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Overlayfs => "overlayfs",
            Self::Native => "native",
        }
    }

    /// The driver called `name`, if berth-snapshotter has one.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "overlayfs" => Some(Self::Overlayfs),
            "native" => Some(Self::Native),
            _ => None,
        }
    }
}

/// Largest key plus value of one label, as containerd allows.
const MAX_LABEL_BYTES: usize = 4096;

/// A [`Snapshotter`] over local directories. Cheap to clone; clones share everything.
#[derive(Debug, Clone)]
pub struct LocalSnapshotter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    driver: Driver,
    root: PathBuf,
    snapshots: PathBuf,
    store: Store,
    /// Add `index=off` to overlay mounts (when the kernel knows the option), as containerd
    /// does: the inode index would tie upper layers to one set of lower layers.
    index_off: bool,
    /// Add `userxattr` (rootless: in a user namespace overlayfs keeps whiteouts and opaque
    /// directories in `user.overlay.*`, the `trusted.*` names being out of reach).
    userxattr: bool,
}

impl LocalSnapshotter {
    /// Opens the snapshotter whose data lives under `data_dir` (berth's
    /// `config.data_dir(Service::Snapshotter)`), in `data_dir/<driver>/`. The drivers keep
    /// separate snapshots and records: switching drivers starts from an empty store, the way
    /// switching Docker's storage driver does.
    pub fn open(data_dir: &Path, driver: Driver) -> Result<Self> {
        let root = data_dir.join(driver.name());
        let snapshots = root.join("snapshots");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&snapshots)
            .map_err(|e| Error::from(e).wrap(format!("create {}", snapshots.display())))?;
        let store = Store::open(&root.join("metadata.redb"))?;
        let index_off = Path::new("/sys/module/overlay/parameters/index").exists();
        Ok(Self {
            inner: Arc::new(Inner {
                driver,
                root,
                snapshots,
                store,
                index_off,
                userxattr: berth_core::rootless::in_user_namespace(),
            }),
        })
    }

    /// The driver.
    pub fn driver(&self) -> Driver {
        self.inner.driver
    }

    /// The driver's root directory (`<data_dir>/<driver>`).
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The directory that holds every snapshot directory (`<root>/snapshots`).
    pub fn snapshots_dir(&self) -> &Path {
        &self.inner.snapshots
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Error::internal("snapshotter task failed").with_source(e))?
    }
}

trait Wrap {
    fn wrap(self, message: String) -> Error;
}

impl Wrap for Error {
    fn wrap(self, message: String) -> Error {
        Error::new(self.kind(), message).with_source(self)
    }
}

fn not_found(name: &str) -> Error {
    Error::not_found(format!("snapshot {name:?} does not exist"))
}

fn validate_name(name: &str, what: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid_argument(format!(
            "snapshot {what} must not be empty"
        )));
    }
    Ok(())
}

fn validate_labels(labels: &Labels) -> Result<()> {
    for (key, value) in labels {
        if key.is_empty() {
            return Err(Error::invalid_argument("label keys must not be empty"));
        }
        if key.len() + value.len() > MAX_LABEL_BYTES {
            return Err(Error::invalid_argument(format!(
                "label {key:?} is {} bytes, more than the {MAX_LABEL_BYTES} allowed",
                key.len() + value.len()
            )));
        }
    }
    Ok(())
}

impl Inner {
    fn dir(&self, id: u64) -> PathBuf {
        self.snapshots.join(id.to_string())
    }

    fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>> {
        validate_name(key, "key")?;
        validate_labels(&labels)?;
        let mut txn = self.store.write()?;
        if txn.get(key)?.is_some() {
            return Err(Error::already_exists(format!(
                "snapshot {key:?} already exists"
            )));
        }
        let parent_record = match parent {
            None => None,
            Some(p) => {
                let record = txn.get(p)?.ok_or_else(|| {
                    Error::not_found(format!("parent snapshot {p:?} does not exist"))
                })?;
                if record.kind != StoredKind::Committed {
                    return Err(Error::invalid_argument(format!(
                        "parent {p:?} is not a committed snapshot (it is {})",
                        record.kind()
                    )));
                }
                Some(record)
            }
        };
        let chain = txn.chain(parent)?;
        let id = txn.next_id()?;
        let dir = self.dir(id);
        // Ids are committed together with their records, so a directory with this id can only
        // be the leftover of a crash before that commit.
        fsutil::remove_all(&dir)?;
        if let Err(err) = self.make_dirs(kind, id, parent_record.as_ref()) {
            let _ = fsutil::remove_all(&dir);
            return Err(err.wrap(format!("create snapshot {key:?}")));
        }
        let now = now_nanos();
        let record = Record {
            id,
            kind: kind.into(),
            parent: parent.map(str::to_string),
            labels,
            created: now,
            updated: now,
            usage: None,
        };
        txn.put(key, &record)?;
        if let Some(p) = parent {
            txn.add_child(p, key)?;
        }
        if let Err(err) = txn.commit() {
            let _ = fsutil::remove_all(&dir);
            return Err(err);
        }
        info!(key, parent, id, kind = %kind, "snapshot created");
        Ok(self.mounts_for(kind, id, &chain))
    }

    fn make_dirs(&self, kind: Kind, id: u64, parent: Option<&Record>) -> Result<()> {
        let dir = self.dir(id);
        let mkdir = |path: &Path, mode: u32| {
            fs::DirBuilder::new()
                .mode(mode)
                .create(path)
                .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(mode)))
                .map_err(|e| Error::from(e).wrap(format!("create {}", path.display())))
        };
        mkdir(&dir, 0o700)?;
        mkdir(&dir.join("fs"), 0o755)?;
        if let Some(parent) = parent {
            // The new tree's root is the parent's root: with its owner and mode (containerd's
            // overlay snapshotter does the same), so a layer or container whose ids are
            // shifted into a user namespace keeps a `/` its root owns.
            inherit_root(&self.fs_dir(parent.id), &dir.join("fs"))?;
        }
        match self.driver {
            Driver::Overlayfs if kind == Kind::Active => mkdir(&dir.join("work"), 0o711)?,
            Driver::Overlayfs => {}
            Driver::Native => {
                if let Some(parent) = parent {
                    fsutil::copy_dir(&self.fs_dir(parent.id), &dir.join("fs"))?;
                }
            }
        }
        fsutil::sync_dir(&self.snapshots)
    }

    /// The mounts presenting snapshot `id` of `kind` whose parent chain is `chain` (nearest
    /// first).
    fn mounts_for(&self, kind: Kind, id: u64, chain: &[u64]) -> Vec<Mount> {
        let readonly = kind == Kind::View;
        let path = |id: u64| self.fs_dir(id).display().to_string();
        if self.driver == Driver::Native || chain.is_empty() {
            return vec![Mount::bind(path(id), readonly)];
        }
        if readonly && chain.len() == 1 {
            // Overlay needs two layers; one read-only layer is just a bind mount.
            return vec![Mount::bind(path(chain[0]), true)];
        }
        let mut options = Vec::new();
        if self.index_off {
            options.push("index=off".to_string());
        }
        if self.userxattr {
            options.push("userxattr".to_string());
        }
        if !readonly {
            options.push(format!("workdir={}", self.dir(id).join("work").display()));
            options.push(format!("upperdir={}", path(id)));
        }
        let lower: Vec<String> = chain.iter().map(|&id| path(id)).collect();
        options.push(format!("lowerdir={}", lower.join(":")));
        vec![Mount {
            fstype: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        }]
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let txn = self.store.read()?;
        let record = txn.get(key)?.ok_or_else(|| not_found(key))?;
        if record.kind == StoredKind::Committed {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} is committed: only active snapshots and views have mounts (make a view of it)"
            )));
        }
        let chain = txn.chain(record.parent.as_deref())?;
        Ok(self.mounts_for(record.kind(), record.id, &chain))
    }

    fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        validate_name(name, "name")?;
        validate_labels(&labels)?;
        let mut txn = self.store.write()?;
        let record = txn.get(key)?.ok_or_else(|| not_found(key))?;
        if record.kind != StoredKind::Active {
            return Err(Error::failed_precondition(format!(
                "snapshot {key:?} is {}: only active snapshots can be committed",
                record.kind()
            )));
        }
        if txn.get(name)?.is_some() {
            return Err(Error::already_exists(format!(
                "snapshot {name:?} already exists"
            )));
        }
        let usage = fsutil::disk_usage(&self.fs_dir(record.id))
            .map_err(|e| e.wrap(format!("measure snapshot {key:?}")))?;
        let now = now_nanos();
        let committed = Record {
            kind: StoredKind::Committed,
            labels,
            created: now,
            updated: now,
            usage: Some(usage.into()),
            ..record
        };
        txn.delete(key)?;
        txn.put(name, &committed)?;
        if let Some(parent) = &committed.parent {
            txn.remove_child(parent, key)?;
            txn.add_child(parent, name)?;
        }
        txn.commit()?;
        info!(
            name,
            key,
            id = committed.id,
            size = usage.size,
            "snapshot committed"
        );
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<()> {
        let mut txn = self.store.write()?;
        let record = txn.get(key)?.ok_or_else(|| not_found(key))?;
        let children = txn.children(key)?;
        if children > 0 {
            let noun = if children == 1 { "child" } else { "children" };
            return Err(Error::failed_precondition(format!(
                "cannot remove snapshot {key:?}: it has {children} {noun}"
            )));
        }
        txn.delete(key)?;
        if let Some(parent) = &record.parent {
            txn.remove_child(parent, key)?;
        }
        txn.commit()?;
        info!(key, id = record.id, "snapshot removed");
        // The record is gone, so nothing refers to the directory any more; if this fails (or
        // the process dies now), cleanup finds it.
        if let Err(err) = fsutil::remove_all(&self.dir(record.id)) {
            warn!(key, error = %err.chain(), "snapshot directory left for cleanup");
        }
        Ok(())
    }

    fn stat(&self, key: &str) -> Result<Info> {
        let txn = self.store.read()?;
        Ok(txn.get(key)?.ok_or_else(|| not_found(key))?.info(key))
    }

    fn update(&self, name: &str, labels: Labels, fieldpaths: &[String]) -> Result<Info> {
        validate_labels(&labels)?;
        let mut txn = self.store.write()?;
        let mut record = txn.get(name)?.ok_or_else(|| not_found(name))?;
        if fieldpaths.is_empty() {
            record.labels = labels;
        } else {
            for path in fieldpaths {
                if path == "labels" {
                    record.labels = labels.clone();
                } else if let Some(key) = path.strip_prefix("labels.") {
                    match labels.get(key) {
                        Some(value) => record.labels.insert(key.to_string(), value.clone()),
                        None => record.labels.remove(key),
                    };
                } else {
                    return Err(Error::invalid_argument(format!(
                        "cannot update field {path:?} of snapshot {name:?}: only labels can change"
                    )));
                }
            }
        }
        record.updated = now_nanos().max(record.updated);
        txn.put(name, &record)?;
        txn.commit()?;
        debug!(name, "snapshot labels updated");
        Ok(record.info(name))
    }

    fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filters = Filters::parse(filters)?;
        let txn = self.store.read()?;
        Ok(txn
            .all()?
            .into_iter()
            .map(|(name, record)| record.info(&name))
            .filter(|info| filters.matches(info))
            .collect())
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        let record = self.store.read()?.get(key)?.ok_or_else(|| not_found(key))?;
        if let (StoredKind::Committed, Some(usage)) = (record.kind, record.usage) {
            return Ok(usage.into());
        }
        fsutil::disk_usage(&self.fs_dir(record.id))
            .map_err(|e| e.wrap(format!("measure snapshot {key:?}")))
    }

    fn cleanup(&self) -> Result<usize> {
        // Hold the write lock while deciding and deleting, so no create can be halfway
        // through making a directory we are about to call garbage.
        let txn = self.store.write()?;
        let ids = txn.ids()?;
        let entries = fs::read_dir(&self.snapshots)
            .map_err(|e| Error::from(e).wrap(format!("read {}", self.snapshots.display())))?;
        let mut removed = 0;
        for entry in entries {
            let entry = entry
                .map_err(|e| Error::from(e).wrap(format!("read {}", self.snapshots.display())))?;
            let name = entry.file_name();
            let live = name
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| ids.contains(&id));
            if !live {
                fsutil::remove_all(&entry.path())?;
                info!(path = %entry.path().display(), "removed snapshot directory without a record");
                removed += 1;
            }
        }
        drop(txn);
        Ok(removed)
    }
}

/// Gives `dir` the owner and mode of `from`.
fn inherit_root(from: &Path, dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        fs::metadata(from).map_err(|e| Error::from(e).wrap(format!("stat {}", from.display())))?;
    if (meta.uid(), meta.gid()) != (0, 0) {
        std::os::unix::fs::chown(dir, Some(meta.uid()), Some(meta.gid()))
            .map_err(|e| Error::from(e).wrap(format!("chown {}", dir.display())))?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(|e| Error::from(e).wrap(format!("chmod {}", dir.display())))
}

/// Snapshots and their disk use, by kind (`view`, `active`, `committed`).
pub type KindTotals = std::collections::BTreeMap<&'static str, (u64, i64)>;

impl Inner {
    fn totals(&self) -> Result<KindTotals> {
        let all = self.store.read()?.all()?;
        let mut out = KindTotals::new();
        for kind in ["view", "active", "committed"] {
            out.insert(kind, (0, 0));
        }
        for (_, record) in all {
            let (kind, bytes) = match (record.kind, record.usage) {
                (StoredKind::Committed, Some(u)) => ("committed", u.size),
                (StoredKind::Committed, None) => ("committed", self.measure(record.id)),
                (StoredKind::Active, _) => ("active", self.measure(record.id)),
                // A view's directory is empty: it mounts its parent read-only.
                (StoredKind::View, _) => ("view", 0),
            };
            let t = out.entry(kind).or_default();
            t.0 += 1;
            t.1 += bytes.max(0);
        }
        Ok(out)
    }

    fn measure(&self, id: u64) -> i64 {
        fsutil::disk_usage(&self.fs_dir(id))
            .map(|u| u.size)
            .unwrap_or(0)
    }
}

impl LocalSnapshotter {
    /// Snapshots and bytes on disk by kind, for the metrics: committed snapshots from the size
    /// recorded at commit, active ones measured now (their upper directories).
    pub async fn totals(&self) -> Result<KindTotals> {
        self.blocking(|s| s.totals()).await
    }

    /// Like [`Snapshotter::cleanup`], returning how many directories were removed.
    pub async fn cleanup_count(&self) -> Result<usize> {
        self.blocking(|s| s.cleanup()).await
    }
}

impl Snapshotter for LocalSnapshotter {
    async fn stat(&self, key: &str) -> Result<Info> {
        let key = key.to_string();
        self.blocking(move |s| s.stat(&key)).await
    }

    async fn update(&self, name: &str, labels: Labels, fieldpaths: &[String]) -> Result<Info> {
        let name = name.to_string();
        let fieldpaths = fieldpaths.to_vec();
        self.blocking(move |s| s.update(&name, labels, &fieldpaths))
            .await
    }

    async fn usage(&self, key: &str) -> Result<Usage> {
        let key = key.to_string();
        self.blocking(move |s| s.usage(&key)).await
    }

    async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let key = key.to_string();
        self.blocking(move |s| s.mounts(&key)).await
    }

    async fn prepare(&self, key: &str, parent: Option<&str>, labels: Labels) -> Result<Vec<Mount>> {
        let key = key.to_string();
        let parent = parent.map(str::to_string);
        self.blocking(move |s| s.create(Kind::Active, &key, parent.as_deref(), labels))
            .await
    }

    async fn view(&self, key: &str, parent: Option<&str>, labels: Labels) -> Result<Vec<Mount>> {
        let key = key.to_string();
        let parent = parent.map(str::to_string);
        self.blocking(move |s| s.create(Kind::View, &key, parent.as_deref(), labels))
            .await
    }

    async fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        let name = name.to_string();
        let key = key.to_string();
        self.blocking(move |s| s.commit(&name, &key, labels)).await
    }

    async fn remove(&self, key: &str) -> Result<()> {
        let key = key.to_string();
        self.blocking(move |s| s.remove(&key)).await
    }

    async fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filters = filters.to_vec();
        self.blocking(move |s| s.list(&filters)).await
    }

    async fn cleanup(&self) -> Result<()> {
        self.cleanup_count().await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use berth_core::ErrorKind;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn overlay_mounts_follow_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalSnapshotter::open(dir.path(), Driver::Overlayfs).unwrap();
        let snaps = s.snapshots_dir().to_path_buf();
        let fs_of = |id: u64| snaps.join(id.to_string()).join("fs").display().to_string();

        let m = s.prepare("a", None, Labels::new()).await.unwrap();
        assert_eq!(m, [Mount::bind(fs_of(1), false)]);
        s.commit("A", "a", Labels::new()).await.unwrap();
        let m = s.view("v1", Some("A"), Labels::new()).await.unwrap();
        assert_eq!(m, [Mount::bind(fs_of(1), true)]);
        let m = s.prepare("b", Some("A"), Labels::new()).await.unwrap();
        assert_eq!(m[0].fstype, "overlay");
        assert_eq!(m[0].option("upperdir"), Some(fs_of(3).as_str()));
        assert_eq!(
            m[0].option("workdir"),
            Some(snaps.join("3/work").display().to_string().as_str())
        );
        assert_eq!(m[0].lowerdirs(), [fs_of(1)]);
        s.commit("B", "b", Labels::new()).await.unwrap();
        let m = s.view("v2", Some("B"), Labels::new()).await.unwrap();
        assert_eq!(m[0].lowerdirs(), [fs_of(3), fs_of(1)]);
        assert!(m[0].option("upperdir").is_none() && m[0].is_readonly());
        assert_eq!(s.mounts("v2").await.unwrap(), m);
    }

    #[tokio::test]
    async fn a_new_tree_takes_the_owner_and_mode_of_its_parents_root() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        for driver in [Driver::Overlayfs, Driver::Native] {
            let dir = tempfile::tempdir().unwrap();
            let s = LocalSnapshotter::open(dir.path(), driver).unwrap();
            s.prepare("a", None, Labels::new()).await.unwrap();
            let a = s.snapshots_dir().join("1/fs");
            std::os::unix::fs::chown(&a, Some(100000), Some(100001)).unwrap();
            fs::set_permissions(&a, fs::Permissions::from_mode(0o750)).unwrap();
            s.commit("A", "a", Labels::new()).await.unwrap();
            s.prepare("b", Some("A"), Labels::new()).await.unwrap();
            let b = fs::metadata(s.snapshots_dir().join("2/fs")).unwrap();
            assert_eq!(
                (b.uid(), b.gid(), b.mode() & 0o7777),
                (100000, 100001, 0o750)
            );
        }
    }

    #[tokio::test]
    async fn native_copies_the_parent() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalSnapshotter::open(dir.path(), Driver::Native).unwrap();
        s.prepare("a", None, Labels::new()).await.unwrap();
        fs::write(s.snapshots_dir().join("1/fs/file"), "hello").unwrap();
        s.commit("A", "a", Labels::new()).await.unwrap();
        let m = s.prepare("b", Some("A"), Labels::new()).await.unwrap();
        assert_eq!(
            m,
            [Mount::bind(
                s.snapshots_dir().join("2/fs").display().to_string(),
                false
            )]
        );
        assert_eq!(
            fs::read_to_string(s.snapshots_dir().join("2/fs/file")).unwrap(),
            "hello"
        );
        assert!(!s.snapshots_dir().join("2/work").exists());
    }

    #[tokio::test]
    async fn cleanup_removes_only_directories_without_records() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalSnapshotter::open(dir.path(), Driver::Overlayfs).unwrap();
        s.prepare("a", None, Labels::new()).await.unwrap();
        // What a crash between mkdir and commit leaves: the next id, and a stray temp dir.
        fs::create_dir_all(s.snapshots_dir().join("2/fs/x")).unwrap();
        fs::create_dir_all(s.snapshots_dir().join("99")).unwrap();
        assert_eq!(s.cleanup_count().await.unwrap(), 2);
        assert!(s.snapshots_dir().join("1/fs").is_dir());
        assert!(!s.snapshots_dir().join("2").exists());

        // A leftover with the next id is also replaced by the next create.
        fs::create_dir_all(s.snapshots_dir().join("2/fs/stale")).unwrap();
        s.prepare("b", None, Labels::new()).await.unwrap();
        assert!(!s.snapshots_dir().join("2/fs/stale").exists());
    }

    #[tokio::test]
    async fn records_survive_reopening_and_removal_frees_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = LocalSnapshotter::open(dir.path(), Driver::Overlayfs).unwrap();
            s.prepare("a", None, labels(&[("x", "1")])).await.unwrap();
            s.commit("A", "a", Labels::new()).await.unwrap();
            s.prepare("b", Some("A"), Labels::new()).await.unwrap();
        }
        let s = LocalSnapshotter::open(dir.path(), Driver::Overlayfs).unwrap();
        assert_eq!(s.stat("b").await.unwrap().parent.as_deref(), Some("A"));
        let err = s.remove("A").await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert_eq!(
            err.message(),
            "cannot remove snapshot \"A\": it has 1 child"
        );
        s.remove("b").await.unwrap();
        assert!(!s.snapshots_dir().join("2").exists());
        s.remove("A").await.unwrap();
        assert!(s.list(&[]).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn labels_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalSnapshotter::open(dir.path(), Driver::Native).unwrap();
        let big = labels(&[("k", &"v".repeat(MAX_LABEL_BYTES))]);
        assert_eq!(
            s.prepare("a", None, big).await.unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            s.prepare("", None, Labels::new()).await.unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }
}
