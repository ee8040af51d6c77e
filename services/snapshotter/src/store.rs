//! Snapshot records in redb: one database file per driver, one write transaction per operation.
//!
//! Tables:
//! - `snapshots`: key or name → JSON [`Record`]
//! - `children`: parent name → child keys/names (multimap), so "has children" is one lookup
//! - `meta`: `next_id` (the id the next snapshot gets), `schema`
//!
//! Ids are committed together with the record that takes them, so an id at or above `next_id`
//! never belongs to a record: a directory with such an id is what a crash left behind.

use std::path::Path;
use std::time::{Duration, SystemTime};

use berth_core::snapshots::{Info, Kind, Labels, Usage};
use berth_core::{Context, Error, ErrorKind, Result};
use redb::{
    Database, MultimapTableDefinition, ReadTransaction, ReadableDatabase, ReadableMultimapTable,
    ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const CHILDREN: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("children");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const SCHEMA: u64 = 1;

/// What is stored about one snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// Names the snapshot's directory; never reused.
    pub id: u64,
    pub kind: StoredKind,
    pub parent: Option<String>,
    #[serde(default)]
    pub labels: Labels,
    /// Nanoseconds since the Unix epoch.
    pub created: u64,
    pub updated: u64,
    /// Computed at commit for committed snapshots.
    #[serde(default)]
    pub usage: Option<StoredUsage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StoredKind {
    View,
    Active,
    Committed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredUsage {
    pub size: i64,
    pub inodes: i64,
}

impl From<Kind> for StoredKind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::View => Self::View,
            Kind::Active => Self::Active,
            Kind::Committed => Self::Committed,
        }
    }
}

impl From<StoredKind> for Kind {
    fn from(kind: StoredKind) -> Self {
        match kind {
            StoredKind::View => Self::View,
            StoredKind::Active => Self::Active,
            StoredKind::Committed => Self::Committed,
        }
    }
}

impl From<Usage> for StoredUsage {
    fn from(u: Usage) -> Self {
        Self {
            size: u.size,
            inodes: u.inodes,
        }
    }
}

impl From<StoredUsage> for Usage {
    fn from(u: StoredUsage) -> Self {
        Self {
            size: u.size,
            inodes: u.inodes,
        }
    }
}

impl Record {
    pub(crate) fn kind(&self) -> Kind {
        self.kind.into()
    }

    pub(crate) fn info(&self, name: &str) -> Info {
        Info {
            name: name.to_string(),
            parent: self.parent.clone(),
            kind: self.kind(),
            labels: self.labels.clone(),
            created_at: from_nanos(self.created),
            updated_at: from_nanos(self.updated),
        }
    }
}

/// Now, in nanoseconds since the Unix epoch.
pub(crate) fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn from_nanos(ns: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(ns)
}

fn db_error<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    what: &'static str,
) -> impl FnOnce(E) -> Error {
    move |e| Error::internal(format!("metadata {what}")).with_source(e)
}

/// The metadata database.
#[derive(Debug)]
pub(crate) struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the database at `path`. Only one process can have it open.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        // redb caches up to 1 GiB by default and never gives it back; this database is small and
        // the kernel's page cache holds its file anyway.
        let db = redb::Builder::new()
            .set_cache_size(1 << 20)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "metadata database {} is in use by another process",
                        path.display()
                    ),
                ),
                other => Error::internal(format!("open metadata database {}", path.display()))
                    .with_source(other),
            })?;
        let store = Self { db };
        let mut txn = store.write()?;
        let schema = txn.meta("schema")?;
        match schema {
            None => txn.set_meta("schema", SCHEMA)?,
            Some(SCHEMA) => {}
            Some(other) => {
                return Err(Error::failed_precondition(format!(
                    "metadata database {} has schema {other}; this berth-snapshotter knows {SCHEMA}",
                    path.display()
                )));
            }
        }
        // Create every table so that read transactions find them.
        txn.txn
            .open_table(SNAPSHOTS)
            .map_err(db_error("open table"))?;
        txn.txn
            .open_multimap_table(CHILDREN)
            .map_err(db_error("open table"))?;
        txn.commit()?;
        Ok(store)
    }

    /// Begins the write transaction of one operation. Writers are serialized.
    pub(crate) fn write(&self) -> Result<Write> {
        Ok(Write {
            txn: self.db.begin_write().map_err(db_error("begin write"))?,
        })
    }

    /// A consistent read-only view.
    pub(crate) fn read(&self) -> Result<Read> {
        Ok(Read {
            txn: self.db.begin_read().map_err(db_error("begin read"))?,
        })
    }
}

fn decode(name: &str, bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).internal(|| format!("decode record of snapshot {name:?}"))
}

fn encode(record: &Record) -> Result<Vec<u8>> {
    serde_json::to_vec(record).internal(|| "encode snapshot record".into())
}

/// Reads shared by both transaction kinds.
pub(crate) trait Lookup {
    /// The record of `name`, if any.
    fn get(&self, name: &str) -> Result<Option<Record>>;

    /// The ids of `parent` and its ancestors, nearest first.
    fn chain(&self, parent: Option<&str>) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        let mut next = parent.map(str::to_string);
        while let Some(name) = next {
            let record = self.get(&name)?.ok_or_else(|| {
                Error::internal(format!(
                    "metadata is inconsistent: parent snapshot {name:?} is missing"
                ))
            })?;
            ids.push(record.id);
            next = record.parent;
            if ids.len() > 10_000 {
                return Err(Error::internal(
                    "metadata is inconsistent: parent chain loops",
                ));
            }
        }
        Ok(ids)
    }
}

/// A read transaction.
pub(crate) struct Read {
    txn: ReadTransaction,
}

impl Lookup for Read {
    fn get(&self, name: &str) -> Result<Option<Record>> {
        let table = self
            .txn
            .open_table(SNAPSHOTS)
            .map_err(db_error("open table"))?;
        let value = table.get(name).map_err(db_error("read"))?;
        value.map(|v| decode(name, v.value())).transpose()
    }
}

impl Read {
    /// Every record, in name order.
    pub(crate) fn all(&self) -> Result<Vec<(String, Record)>> {
        let table = self
            .txn
            .open_table(SNAPSHOTS)
            .map_err(db_error("open table"))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_error("read"))? {
            let (k, v) = entry.map_err(db_error("read"))?;
            let name = k.value().to_string();
            let record = decode(&name, v.value())?;
            out.push((name, record));
        }
        Ok(out)
    }
}

/// The write transaction of one operation; dropped without [`Write::commit`] it changes nothing.
pub(crate) struct Write {
    txn: WriteTransaction,
}

impl Lookup for Write {
    fn get(&self, name: &str) -> Result<Option<Record>> {
        let table = self
            .txn
            .open_table(SNAPSHOTS)
            .map_err(db_error("open table"))?;
        let value = table.get(name).map_err(db_error("read"))?;
        value.map(|v| decode(name, v.value())).transpose()
    }
}

impl Write {
    fn meta(&self, key: &str) -> Result<Option<u64>> {
        let table = self.txn.open_table(META).map_err(db_error("open table"))?;
        Ok(table.get(key).map_err(db_error("read"))?.map(|v| v.value()))
    }

    fn set_meta(&mut self, key: &str, value: u64) -> Result<()> {
        let mut table = self.txn.open_table(META).map_err(db_error("open table"))?;
        table.insert(key, value).map_err(db_error("write"))?;
        Ok(())
    }

    /// Takes the next snapshot id (returned to the pool if the transaction is not committed).
    pub(crate) fn next_id(&mut self) -> Result<u64> {
        let id = self.meta("next_id")?.unwrap_or(1);
        self.set_meta("next_id", id + 1)?;
        Ok(id)
    }

    pub(crate) fn put(&mut self, name: &str, record: &Record) -> Result<()> {
        let bytes = encode(record)?;
        let mut table = self
            .txn
            .open_table(SNAPSHOTS)
            .map_err(db_error("open table"))?;
        table
            .insert(name, bytes.as_slice())
            .map_err(db_error("write"))?;
        Ok(())
    }

    pub(crate) fn delete(&mut self, name: &str) -> Result<()> {
        let mut table = self
            .txn
            .open_table(SNAPSHOTS)
            .map_err(db_error("open table"))?;
        table.remove(name).map_err(db_error("write"))?;
        Ok(())
    }

    pub(crate) fn add_child(&mut self, parent: &str, child: &str) -> Result<()> {
        let mut table = self
            .txn
            .open_multimap_table(CHILDREN)
            .map_err(db_error("open table"))?;
        table.insert(parent, child).map_err(db_error("write"))?;
        Ok(())
    }

    pub(crate) fn remove_child(&mut self, parent: &str, child: &str) -> Result<()> {
        let mut table = self
            .txn
            .open_multimap_table(CHILDREN)
            .map_err(db_error("open table"))?;
        table.remove(parent, child).map_err(db_error("write"))?;
        Ok(())
    }

    pub(crate) fn children(&self, parent: &str) -> Result<u64> {
        let table = self
            .txn
            .open_multimap_table(CHILDREN)
            .map_err(db_error("open table"))?;
        let values = table.get(parent).map_err(db_error("read"))?;
        Ok(values.len())
    }

    /// Every id that has a record.
    pub(crate) fn ids(&self) -> Result<std::collections::HashSet<u64>> {
        let table = self
            .txn
            .open_table(SNAPSHOTS)
            .map_err(db_error("open table"))?;
        let mut out = std::collections::HashSet::new();
        for entry in table.iter().map_err(db_error("read"))? {
            let (k, v) = entry.map_err(db_error("read"))?;
            out.insert(decode(k.value(), v.value())?.id);
        }
        Ok(out)
    }

    pub(crate) fn commit(self) -> Result<()> {
        self.txn.commit().map_err(db_error("commit"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, kind: StoredKind, parent: Option<&str>) -> Record {
        Record {
            id,
            kind,
            parent: parent.map(Into::into),
            labels: Labels::new(),
            created: 1,
            updated: 2,
            usage: None,
        }
    }

    #[test]
    fn records_ids_and_children_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.redb");
        {
            let store = Store::open(&path).unwrap();
            let mut w = store.write().unwrap();
            assert_eq!(w.next_id().unwrap(), 1);
            w.put("base", &record(1, StoredKind::Committed, None))
                .unwrap();
            let id = w.next_id().unwrap();
            w.put("child", &record(id, StoredKind::Active, Some("base")))
                .unwrap();
            w.add_child("base", "child").unwrap();
            w.commit().unwrap();

            // Not committed: the id goes back to the pool and nothing is visible.
            let mut w = store.write().unwrap();
            assert_eq!(w.next_id().unwrap(), 3);
            w.put("ghost", &record(3, StoredKind::Active, None))
                .unwrap();
            drop(w);
        }
        let store = Store::open(&path).unwrap();
        let r = store.read().unwrap();
        assert_eq!(
            r.get("child").unwrap().unwrap().parent.as_deref(),
            Some("base")
        );
        assert!(r.get("ghost").unwrap().is_none());
        assert_eq!(r.chain(Some("child")).unwrap(), [2, 1]);
        assert_eq!(r.all().unwrap().len(), 2);
        let mut w = store.write().unwrap();
        assert_eq!(w.children("base").unwrap(), 1);
        assert_eq!(w.ids().unwrap(), [1, 2].into());
        assert_eq!(w.next_id().unwrap(), 3);
    }

    #[test]
    fn a_second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata.redb");
        let _first = Store::open(&path).unwrap();
        let err = Store::open(&path).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{}", err.chain());
    }
}
