//! Image metadata in redb: image records, tags, users, leases, layer sizes and content labels.
//!
//! One file (`<data root>/images/images.redb`), one writer at a time, every change a
//! transaction: a `kill -9` at any point leaves either the old or the new state. Values are JSON
//! so records can grow fields without a migration.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use berth_core::{Error, Result};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::oci::Descriptor;

type Def = TableDefinition<'static, &'static str, &'static [u8]>;

/// Image records by id (config digest).
pub const IMAGES: Def = TableDefinition::new("images");
/// Fully qualified `name:tag` → image id.
pub const TAGS: Def = TableDefinition::new("tags");
/// `owner\0kind\0id` → image id.
pub const USERS: Def = TableDefinition::new("users");
/// Lease id → [`Lease`].
pub const LEASES: Def = TableDefinition::new("leases");
/// Diff id → [`LayerInfo`].
pub const LAYERS: Def = TableDefinition::new("layers");
/// Blob digest → labels.
pub const CONTENT_LABELS: Def = TableDefinition::new("content_labels");
/// Build cache key → [`crate::cache::CacheRecord`].
pub const BUILD_CACHE: Def = TableDefinition::new("build_cache");

const ALL: [Def; 7] = [
    IMAGES,
    TAGS,
    USERS,
    LEASES,
    LAYERS,
    CONTENT_LABELS,
    BUILD_CACHE,
];

/// One image, as stored.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageRecord {
    /// Config digest.
    pub id: String,
    /// The manifest.
    pub target: Descriptor,
    /// The index it was picked from, if any.
    #[serde(default)]
    pub index: Option<Descriptor>,
    #[serde(default)]
    pub repo_digests: Vec<String>,
    /// Config descriptor.
    pub config: Descriptor,
    /// Layer blobs, bottom first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub diff_ids: Vec<String>,
    #[serde(default)]
    pub chain_id: String,
    /// Uncompressed size of the layers.
    #[serde(default)]
    pub size: i64,
    /// Manifest + config + layer blobs (+ index).
    #[serde(default)]
    pub content_size: i64,
    /// Snapshotters holding the unpacked layers.
    #[serde(default)]
    pub unpacked_in: BTreeSet<String>,
    /// Labels set by the caller of pull/import (config labels live in the config).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub added_nanos: i64,
    #[serde(default)]
    pub last_tag_nanos: i64,
    /// Deleted with force while users remained: goes when the last user does.
    #[serde(default)]
    pub pending_delete: bool,
    /// The config's platform.
    #[serde(default)]
    pub platform: crate::oci::Platform,
    /// The local image this one was made from (commit, build); "" for pulled and loaded ones.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent: String,
}

/// What keeps content alive while an operation runs (and, after a crash, until it expires so a
/// retried pull can resume from the blobs already fetched).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Lease {
    pub created_nanos: i64,
    pub expires_nanos: i64,
    #[serde(default)]
    pub blobs: BTreeSet<String>,
    /// Chain ids (committed snapshots) the operation made or relies on.
    #[serde(default)]
    pub snapshots: BTreeSet<String>,
}

/// What unpacking learnt about a layer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LayerInfo {
    /// Bytes of the uncompressed tar.
    pub size: i64,
}

/// A user of an image, keyed by its owner.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct UserKey {
    pub owner: String,
    pub kind: String,
    pub id: String,
}

impl UserKey {
    fn encode(&self) -> String {
        format!("{}\0{}\0{}", self.owner, self.kind, self.id)
    }

    fn decode(s: &str) -> Option<Self> {
        let mut it = s.splitn(3, '\0');
        Some(Self {
            owner: it.next()?.into(),
            kind: it.next()?.into(),
            id: it.next()?.into(),
        })
    }
}

/// The metadata database.
#[derive(Debug)]
pub struct Meta {
    db: redb::Database,
}

fn db_err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::internal("image metadata database").with_source(e)
}

impl Meta {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::internal(format!("create {}", dir.display())).with_source(e))?;
        }
        // redb caches up to 1 GiB by default and never gives it back; this database is small and
        // the kernel's page cache holds its file anyway.
        let db = redb::Builder::new()
            .set_cache_size(1 << 20)
            .create(path)
            .map_err(|e| Error::internal(format!("open {}", path.display())).with_source(e))?;
        let meta = Self { db };
        meta.write(|tx| {
            for t in ALL {
                tx.0.open_table(t).map_err(db_err)?;
            }
            Ok(())
        })?;
        Ok(meta)
    }

    /// Runs `f` in one write transaction, committed (and on disk) when it returns `Ok`.
    pub fn write<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let out = f(&Tx(&txn))?;
        txn.commit().map_err(db_err)?;
        Ok(out)
    }

    /// Like [`Meta::write`], but the commit is not flushed to disk: it becomes durable with the
    /// next [`Meta::write`], and a crash before that loses it. For records that only matter
    /// while this process runs (leases of running operations), so they cost no fsync.
    pub fn write_volatile<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        let mut txn = self.db.begin_write().map_err(db_err)?;
        txn.set_durability(redb::Durability::None).map_err(db_err)?;
        let out = f(&Tx(&txn))?;
        txn.commit().map_err(db_err)?;
        Ok(out)
    }

    /// Runs `f` on a consistent read-only view.
    pub fn read<T>(&self, f: impl FnOnce(&Rx) -> Result<T>) -> Result<T> {
        let txn = self.db.begin_read().map_err(db_err)?;
        f(&Rx(txn))
    }

    // Shorthands over single reads.

    pub fn image(&self, id: &str) -> Result<Option<ImageRecord>> {
        self.read(|r| r.get(IMAGES, id))
    }

    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        self.read(|r| {
            Ok(r.list::<ImageRecord>(IMAGES)?
                .into_iter()
                .map(|(_, v)| v)
                .collect())
        })
    }

    /// Every (reference, image id) tag.
    pub fn tags(&self) -> Result<Vec<(String, String)>> {
        self.read(|r| r.list::<String>(TAGS))
    }

    /// Every user with the image it uses.
    pub fn users(&self) -> Result<Vec<(UserKey, String)>> {
        self.read(|r| {
            Ok(r.list::<String>(USERS)?
                .into_iter()
                .filter_map(|(k, v)| Some((UserKey::decode(&k)?, v)))
                .collect())
        })
    }

    pub fn leases(&self) -> Result<Vec<(String, Lease)>> {
        self.read(|r| r.list(LEASES))
    }

    pub fn layer(&self, diff_id: &str) -> Result<Option<LayerInfo>> {
        self.read(|r| r.get(LAYERS, diff_id))
    }

    pub fn content_labels(&self, digest: &str) -> Result<BTreeMap<String, String>> {
        self.read(|r| Ok(r.get(CONTENT_LABELS, digest)?.unwrap_or_default()))
    }
}

/// A write transaction.
#[allow(missing_debug_implementations)]
pub struct Tx<'a>(&'a redb::WriteTransaction);

impl Tx<'_> {
    pub fn get<T: DeserializeOwned>(&self, table: Def, key: &str) -> Result<Option<T>> {
        let t = self.0.open_table(table).map_err(db_err)?;
        let v = t.get(key).map_err(db_err)?;
        v.map(|v| decode(v.value())).transpose()
    }

    pub fn put<T: Serialize>(&self, table: Def, key: &str, value: &T) -> Result<()> {
        let mut t = self.0.open_table(table).map_err(db_err)?;
        let bytes = serde_json::to_vec(value)
            .map_err(|e| Error::internal("encode record").with_source(e))?;
        t.insert(key, bytes.as_slice()).map_err(db_err)?;
        Ok(())
    }

    /// Removes `key`; whether it was there.
    pub fn del(&self, table: Def, key: &str) -> Result<bool> {
        let mut t = self.0.open_table(table).map_err(db_err)?;
        let removed = t.remove(key).map_err(db_err)?.is_some();
        Ok(removed)
    }

    pub fn list<T: DeserializeOwned>(&self, table: Def) -> Result<Vec<(String, T)>> {
        let t = self.0.open_table(table).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            out.push((k.value().to_string(), decode(v.value())?));
        }
        Ok(out)
    }

    pub fn put_user(&self, key: &UserKey, image: &str) -> Result<()> {
        self.put(USERS, &key.encode(), &image.to_string())
    }

    pub fn del_user(&self, key: &UserKey) -> Result<bool> {
        self.del(USERS, &key.encode())
    }

    pub fn users(&self) -> Result<Vec<(UserKey, String)>> {
        Ok(self
            .list::<String>(USERS)?
            .into_iter()
            .filter_map(|(k, v)| Some((UserKey::decode(&k)?, v)))
            .collect())
    }
}

/// A read transaction.
#[allow(missing_debug_implementations)]
pub struct Rx(redb::ReadTransaction);

impl Rx {
    pub fn get<T: DeserializeOwned>(&self, table: Def, key: &str) -> Result<Option<T>> {
        let t = self.0.open_table(table).map_err(db_err)?;
        let v = t.get(key).map_err(db_err)?;
        v.map(|v| decode(v.value())).transpose()
    }

    pub fn list<T: DeserializeOwned>(&self, table: Def) -> Result<Vec<(String, T)>> {
        let t = self.0.open_table(table).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            out.push((k.value().to_string(), decode(v.value())?));
        }
        Ok(out)
    }
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::internal("decode stored record").with_source(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("images.redb");
        {
            let m = Meta::open(&path).unwrap();
            let rec = ImageRecord {
                id: "sha256:x".into(),
                size: 3,
                ..Default::default()
            };
            m.write(|tx| {
                tx.put(IMAGES, &rec.id, &rec)?;
                tx.put(TAGS, "docker.io/library/busybox:latest", &rec.id)?;
                tx.put_user(
                    &UserKey {
                        owner: "engine".into(),
                        kind: "container".into(),
                        id: "c1".into(),
                    },
                    &rec.id,
                )
            })
            .unwrap();
            // A failed transaction changes nothing.
            let err = m
                .write(|tx| {
                    tx.del(IMAGES, "sha256:x")?;
                    Err::<(), _>(Error::internal("boom"))
                })
                .unwrap_err();
            assert_eq!(err.message(), "boom");
        }
        let m = Meta::open(&path).unwrap();
        assert_eq!(m.image("sha256:x").unwrap().unwrap().size, 3);
        assert_eq!(
            m.tags().unwrap(),
            vec![("docker.io/library/busybox:latest".into(), "sha256:x".into())]
        );
        let users = m.users().unwrap();
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].0.id, "c1");
    }
}
