//! The engine's records in redb (`<root>/engine/engine.redb`): containers, volumes and pod
//! sandboxes. Every write is committed before its call returns, so a `kill -9` at any moment
//! leaves either the old or the new record. Writes go to one writer thread (a commit waits for fsync) that
//! commits whatever queued up meanwhile in one transaction (group commit): redb has one write
//! transaction at a time, so 20 containers starting at once would otherwise wait for 20
//! fsyncs in a row. Writes are applied in the order they were made.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Weak, mpsc};

use berth_core::{Context, Error, ErrorKind, Result};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::record::Record;
use crate::sandbox::SandboxRecord;

const CONTAINERS: TableDefinition<&str, &[u8]> = TableDefinition::new("containers");
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
const SANDBOXES: TableDefinition<&str, &[u8]> = TableDefinition::new("sandboxes");

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

/// The most writes committed in one transaction.
const MAX_BATCH: usize = 256;

type Table = TableDefinition<'static, &'static str, &'static [u8]>;

/// One queued write: the value to store under `key`, or `None` to remove it.
struct Write {
    table: Table,
    key: String,
    value: Option<Vec<u8>>,
    done: tokio::sync::oneshot::Sender<Result<()>>,
}

/// The database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Arc<Database>,
    writes: mpsc::Sender<Write>,
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
        let db = redb::Builder::new()
            .set_cache_size(2 << 20)
            .create(path)
            .map_err(|e| Error::internal(format!("open {}", path.display())).with_source(e))?;
        let txn = db.begin_write().map_err(|e| db_err("begin")(e.into()))?;
        txn.open_table(CONTAINERS)
            .map_err(|e| db_err("open table")(e.into()))?;
        txn.open_table(VOLUMES)
            .map_err(|e| db_err("open table")(e.into()))?;
        txn.open_table(SANDBOXES)
            .map_err(|e| db_err("open table")(e.into()))?;
        txn.commit().map_err(|e| db_err("commit")(e.into()))?;
        let db = Arc::new(db);
        let (writes, queue) = mpsc::channel();
        let weak = Arc::downgrade(&db);
        std::thread::Builder::new()
            .name("engine-db".into())
            .spawn(move || write_loop(&weak, &queue))
            .context(ErrorKind::Internal, "start the database writer")?;
        Ok(Self { db, writes })
    }

    /// Queues a write and waits until it is committed.
    async fn write(&self, table: Table, key: String, value: Option<Vec<u8>>) -> Result<()> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.writes
            .send(Write {
                table,
                key,
                value,
                done,
            })
            .map_err(|_| Error::internal("engine database: the writer has stopped"))?;
        result
            .await
            .map_err(|_| Error::internal("engine database: the writer has stopped"))?
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

    /// Writes a container record.
    pub async fn put_container(&self, rec: &Record) -> Result<()> {
        let id = rec.id().to_string();
        let bytes = rec.encode();
        self.write(CONTAINERS, id, Some(bytes)).await
    }

    /// Removes a container record (no error when it is gone).
    pub async fn delete_container(&self, id: &str) -> Result<()> {
        self.write(CONTAINERS, id.to_string(), None).await
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

    /// Writes a pod sandbox record.
    pub async fn put_sandbox(&self, rec: &SandboxRecord) -> Result<()> {
        self.write(SANDBOXES, rec.id().to_string(), Some(rec.encode()))
            .await
    }

    /// Removes a pod sandbox record (no error when it is gone).
    pub async fn delete_sandbox(&self, id: &str) -> Result<()> {
        self.write(SANDBOXES, id.to_string(), None).await
    }

    /// Every pod sandbox record (unreadable ones are reported and skipped).
    pub fn sandboxes(&self) -> Result<Vec<SandboxRecord>> {
        let mut out = Vec::new();
        for (id, bytes) in self.all_raw(SANDBOXES)? {
            match SandboxRecord::decode(&bytes) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::error!(id, error = %e.chain(), "skipping unreadable sandbox record")
                }
            }
        }
        Ok(out)
    }

    /// Writes a volume record.
    pub async fn put_volume(&self, v: &VolumeRecord) -> Result<()> {
        let name = v.name.clone();
        let bytes = serde_json::to_vec(v).expect("volume record serializes");
        self.write(VOLUMES, name, Some(bytes)).await
    }

    /// Removes a volume record.
    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        self.write(VOLUMES, name.to_string(), None).await
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

/// The writer thread: takes what is queued (up to [`MAX_BATCH`]), commits it in one
/// transaction and answers each caller. Ends when every [`Store`] is gone. It holds the
/// database only while committing, so a dropped store can be opened again at once.
fn write_loop(db: &Weak<Database>, queue: &mpsc::Receiver<Write>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let Some(db) = db.upgrade() else {
            for w in batch {
                let _ = w.done.send(Err(Error::internal("engine database: closed")));
            }
            return;
        };
        let results = match commit(&db, &batch) {
            Ok(()) => batch.iter().map(|_| Ok(())).collect(),
            // Tell each caller about its own write: commit them one by one.
            Err(_) if batch.len() > 1 => batch
                .iter()
                .map(|w| commit(&db, std::slice::from_ref(w)))
                .collect(),
            Err(e) => vec![Err(e)],
        };
        drop(db);
        for (w, result) in batch.into_iter().zip(results) {
            let _ = w.done.send(result);
        }
    }
}

/// Applies `writes` in order in one write transaction and commits it.
fn commit(db: &Database, writes: &[Write]) -> Result<()> {
    let txn = db.begin_write().map_err(|e| db_err("begin")(e.into()))?;
    for w in writes {
        let mut t = txn
            .open_table(w.table)
            .map_err(|e| db_err("open table")(e.into()))?;
        match &w.value {
            Some(v) => {
                t.insert(w.key.as_str(), v.as_slice())
                    .map_err(|e| db_err("insert")(e.into()))?;
            }
            None => {
                t.remove(w.key.as_str())
                    .map_err(|e| db_err("remove")(e.into()))?;
            }
        }
    }
    txn.commit().map_err(|e| db_err("commit")(e.into()))
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writes_are_all_committed_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.redb");
        let store = Store::open(&path).unwrap();
        let record = |n: usize| Record {
            c: pb::Container {
                id: format!("{n:064x}"),
                name: format!("c{n}"),
                state: Some(Default::default()),
                ..Default::default()
            },
            p: Private::default(),
        };
        // Each task writes its record, and every odd one removes it again right away: the
        // removal must win even when both land in the same batch.
        let tasks: Vec<_> = (0..40)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move {
                    let rec = record(n);
                    store.put_container(&rec).await.unwrap();
                    if n % 2 == 1 {
                        store.delete_container(rec.id()).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        drop(store);
        let store = Store::open(&path).unwrap();
        let mut names: Vec<_> = store
            .containers()
            .unwrap()
            .into_iter()
            .map(|r| r.c.name)
            .collect();
        names.sort();
        let mut want: Vec<_> = (0..40).step_by(2).map(|n| format!("c{n}")).collect();
        want.sort();
        assert_eq!(names, want);
    }
}
