//! The engine's records in redb (`<root>/engine/engine.redb`): containers and volumes. Every
//! write is one committed transaction, so a `kill -9` at any moment leaves either the old or
//! the new record. Writes run on the blocking pool, since a commit waits for fsync.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use berth_core::{Context, Error, ErrorKind, Result};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::record::Record;

const CONTAINERS: TableDefinition<&str, &[u8]> = TableDefinition::new("containers");
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");

/// A volume's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Name (64 hex for anonymous volumes).
    pub name: String,
    /// `local`.
    pub driver: String,
    /// Creation time, seconds and nanoseconds since the epoch.
    pub created_secs: i64,
    /// Nanoseconds part.
    pub created_nanos: i32,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Driver options given at create.
    pub options: BTreeMap<String, String>,
    /// Created without a name.
    pub anonymous: bool,
}

/// The database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Arc<Database>,
}

fn db_err(what: &'static str) -> impl FnOnce(redb::Error) -> Error {
    move |e| Error::internal(format!("engine database: {what}")).with_source(e)
}

impl Store {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .context(ErrorKind::Internal, format!("create {}", dir.display()))?;
        }
        let db = Database::create(path)
            .map_err(|e| Error::internal(format!("open {}", path.display())).with_source(e))?;
        let txn = db.begin_write().map_err(|e| db_err("begin")(e.into()))?;
        txn.open_table(CONTAINERS)
            .map_err(|e| db_err("open table")(e.into()))?;
        txn.open_table(VOLUMES)
            .map_err(|e| db_err("open table")(e.into()))?;
        txn.commit().map_err(|e| db_err("commit")(e.into()))?;
        Ok(Self { db: Arc::new(db) })
    }

    fn put_raw(&self, table: TableDefinition<&str, &[u8]>, key: &str, value: &[u8]) -> Result<()> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| db_err("begin")(e.into()))?;
        {
            let mut t = txn
                .open_table(table)
                .map_err(|e| db_err("open table")(e.into()))?;
            t.insert(key, value)
                .map_err(|e| db_err("insert")(e.into()))?;
        }
        txn.commit().map_err(|e| db_err("commit")(e.into()))
    }

    fn delete_raw(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Result<()> {
        let txn = self
            .db
            .begin_write()
            .map_err(|e| db_err("begin")(e.into()))?;
        {
            let mut t = txn
                .open_table(table)
                .map_err(|e| db_err("open table")(e.into()))?;
            t.remove(key).map_err(|e| db_err("remove")(e.into()))?;
        }
        txn.commit().map_err(|e| db_err("commit")(e.into()))
    }

    fn all_raw(&self, table: TableDefinition<&str, &[u8]>) -> Result<Vec<(String, Vec<u8>)>> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| db_err("begin read")(e.into()))?;
        let t = txn
            .open_table(table)
            .map_err(|e| db_err("open table")(e.into()))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| db_err("iterate")(e.into()))? {
            let (k, v) = entry.map_err(|e| db_err("iterate")(e.into()))?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(store))
            .await
            .map_err(|e| Error::internal("engine database task").with_source(e))?
    }

    /// Writes a container record.
    pub async fn put_container(&self, rec: &Record) -> Result<()> {
        let id = rec.id().to_string();
        let bytes = rec.encode();
        self.blocking(move |s| s.put_raw(CONTAINERS, &id, &bytes))
            .await
    }

    /// Removes a container record (no error when it is gone).
    pub async fn delete_container(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.blocking(move |s| s.delete_raw(CONTAINERS, &id)).await
    }

    /// Every container record. Records that do not decode are reported and skipped, so one bad
    /// record never keeps the engine from starting.
    pub fn containers(&self) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        for (id, bytes) in self.all_raw(CONTAINERS)? {
            match Record::decode(&bytes) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::error!(id, error = %e.chain(), "skipping unreadable container record")
                }
            }
        }
        Ok(out)
    }

    /// Writes a volume record.
    pub async fn put_volume(&self, v: &VolumeRecord) -> Result<()> {
        let name = v.name.clone();
        let bytes = serde_json::to_vec(v).expect("volume record serializes");
        self.blocking(move |s| s.put_raw(VOLUMES, &name, &bytes))
            .await
    }

    /// Removes a volume record.
    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.blocking(move |s| s.delete_raw(VOLUMES, &name)).await
    }

    /// Every volume record.
    pub fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        let mut out = Vec::new();
        for (name, bytes) in self.all_raw(VOLUMES)? {
            match serde_json::from_slice(&bytes) {
                Ok(v) => out.push(v),
                Err(e) => tracing::error!(name, error = %e, "skipping unreadable volume record"),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Private;
    use berth_proto::berth::engine::v1 as pb;

    #[tokio::test]
    async fn containers_and_volumes_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine/engine.redb");
        let store = Store::open(&path).unwrap();
        let rec = Record {
            c: pb::Container {
                id: "b".repeat(64),
                name: "x".into(),
                state: Some(Default::default()),
                ..Default::default()
            },
            p: Private::default(),
        };
        store.put_container(&rec).await.unwrap();
        let vol = VolumeRecord {
            name: "data".into(),
            driver: "local".into(),
            created_secs: 1,
            created_nanos: 2,
            labels: [("a".to_string(), "b".to_string())].into(),
            options: BTreeMap::new(),
            anonymous: false,
        };
        store.put_volume(&vol).await.unwrap();
        drop(store);

        let store = Store::open(&path).unwrap();
        assert_eq!(store.containers().unwrap(), std::slice::from_ref(&rec));
        assert_eq!(store.volumes().unwrap(), [vol]);
        store.delete_container(rec.id()).await.unwrap();
        store.delete_container(rec.id()).await.unwrap();
        store.delete_volume("data").await.unwrap();
        assert!(store.containers().unwrap().is_empty());
        assert!(store.volumes().unwrap().is_empty());
    }
}
