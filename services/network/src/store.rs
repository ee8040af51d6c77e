//! `network.redb`: networks, attachments and CNI attachments as JSON values, each write in one
//! transaction so a `kill -9` leaves either the old or the new state.

use std::path::Path;

use berth_core::{Context, Error, ErrorKind, Result};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::model::{AttachmentRecord, CniRecord, NetworkRecord};

const NETWORKS: TableDefinition<&str, &[u8]> = TableDefinition::new("networks");
const ATTACHMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("attachments");
const CNI: TableDefinition<&str, &[u8]> = TableDefinition::new("cni");

/// One change in a write transaction.
#[derive(Debug)]
pub enum Op<'a> {
    /// Insert or replace a network.
    PutNetwork(&'a NetworkRecord),
    /// Remove a network by id.
    DeleteNetwork(&'a str),
    /// Insert or replace an attachment.
    PutAttachment(&'a AttachmentRecord),
    /// Remove an attachment by key.
    DeleteAttachment(String),
    /// Insert or replace a CNI attachment.
    PutCni(&'a CniRecord),
    /// Remove a CNI attachment by key.
    DeleteCni(String),
}

/// Everything the store holds, as loaded at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Networks.
    pub networks: Vec<NetworkRecord>,
    /// Attachments.
    pub attachments: Vec<AttachmentRecord>,
    /// CNI attachments.
    pub cni: Vec<CniRecord>,
}

/// The redb database.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

fn db_err(what: &'static str) -> impl FnOnce(redb::Error) -> Error {
    move |e| Error::internal(format!("network store: {what}")).with_source(e)
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).internal(|| "encode record".into())
}

fn decode<T: DeserializeOwned>(table: &str, key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).context(
        ErrorKind::Internal,
        format!("network store: corrupt {table} record {key:?}"),
    )
}

impl Store {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .context(ErrorKind::Internal, format!("create {}", dir.display()))?;
        }
        let db = redb::Builder::new()
            .set_cache_size(1 << 20)
            .create(path)
            .map_err(|e| Error::internal(format!("open {}", path.display())).with_source(e))?;
        let tx = db.begin_write().map_err(|e| db_err("begin")(e.into()))?;
        for table in [NETWORKS, ATTACHMENTS, CNI] {
            tx.open_table(table)
                .map_err(|e| db_err("open table")(e.into()))?;
        }
        tx.commit().map_err(|e| db_err("commit")(e.into()))?;
        Ok(Self { db })
    }

    /// Reads every record.
    pub fn load(&self) -> Result<Snapshot> {
        let tx = self
            .db
            .begin_read()
            .map_err(|e| db_err("begin read")(e.into()))?;
        fn all<T: DeserializeOwned>(
            tx: &redb::ReadTransaction,
            def: TableDefinition<&str, &[u8]>,
        ) -> Result<Vec<T>> {
            let table = tx
                .open_table(def)
                .map_err(|e| db_err("open table")(e.into()))?;
            let mut out = Vec::new();
            for row in table.iter().map_err(|e| db_err("iterate")(e.into()))? {
                let (k, v) = row.map_err(|e| db_err("read")(e.into()))?;
                out.push(decode(def.name(), k.value(), v.value())?);
            }
            Ok(out)
        }
        Ok(Snapshot {
            networks: all(&tx, NETWORKS)?,
            attachments: all(&tx, ATTACHMENTS)?,
            cni: all(&tx, CNI)?,
        })
    }

    /// Applies `ops` in one transaction.
    pub fn apply(&self, ops: &[Op<'_>]) -> Result<()> {
        let tx = self
            .db
            .begin_write()
            .map_err(|e| db_err("begin")(e.into()))?;
        {
            let mut networks = tx
                .open_table(NETWORKS)
                .map_err(|e| db_err("open table")(e.into()))?;
            let mut attachments = tx
                .open_table(ATTACHMENTS)
                .map_err(|e| db_err("open table")(e.into()))?;
            let mut cni = tx
                .open_table(CNI)
                .map_err(|e| db_err("open table")(e.into()))?;
            for op in ops {
                let result = match op {
                    Op::PutNetwork(n) => networks
                        .insert(n.id.as_str(), encode(n)?.as_slice())
                        .map(drop),
                    Op::DeleteNetwork(id) => networks.remove(*id).map(drop),
                    Op::PutAttachment(a) => attachments
                        .insert(a.key().as_str(), encode(a)?.as_slice())
                        .map(drop),
                    Op::DeleteAttachment(key) => attachments.remove(key.as_str()).map(drop),
                    Op::PutCni(c) => cni
                        .insert(c.key().as_str(), encode(c)?.as_slice())
                        .map(drop),
                    Op::DeleteCni(key) => cni.remove(key.as_str()).map(drop),
                };
                result.map_err(|e| db_err("write")(e.into()))?;
            }
        }
        tx.commit().map_err(|e| db_err("commit")(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::Driver;

    fn net(id: &str, name: &str) -> NetworkRecord {
        NetworkRecord {
            id: id.into(),
            name: name.into(),
            driver: Driver::Bridge,
            created_ns: 1,
            internal: false,
            attachable: false,
            enable_ipv6: false,
            ipam_driver: "default".into(),
            ipam_options: BTreeMap::new(),
            ipv4: None,
            ipv6: None,
            options: BTreeMap::new(),
            labels: BTreeMap::new(),
            bridge: "br-x".into(),
            builtin: false,
            dns_enabled: true,
            mtu: 1500,
            icc: true,
            masquerade: true,
            host_binding_ipv4: None,
            last_ipv4: None,
            last_ipv6: None,
        }
    }

    #[test]
    fn round_trip_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("network/network.redb");
        {
            let store = Store::open(&path).unwrap();
            let a = net("a", "one");
            let b = net("b", "two");
            store
                .apply(&[Op::PutNetwork(&a), Op::PutNetwork(&b)])
                .unwrap();
            store.apply(&[Op::DeleteNetwork("a")]).unwrap();
        }
        let store = Store::open(&path).unwrap();
        let snap = store.load().unwrap();
        assert_eq!(snap.networks.len(), 1);
        assert_eq!(snap.networks[0].name, "two");
        assert!(snap.attachments.is_empty());
    }
}
