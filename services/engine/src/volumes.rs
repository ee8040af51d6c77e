//! Volumes with Docker's `local` driver: each volume is `<root>/volumes/<name>/_data`.
//!
//! A local volume created with driver options (`type`, `device`, `o`, like `mount -t type -o o
//! device`) is mounted on its `_data` directory when a container first needs it and stays
//! mounted until the volume is removed. Which containers use a volume is the engine's
//! knowledge (its container records); this module is told, and refuses removal while in use.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use berth_core::{Context, Error, ErrorKind, Id, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::events::v1::EventType;
use berth_proto::prost_types::Timestamp;

use crate::events::{self, Hub};
use crate::filters::Args;
use crate::store::{Store, VolumeRecord};

/// The only driver.
pub const LOCAL: &str = "local";

/// Filter keys of List.
pub const LIST_KEYS: &[&str] = &["name", "label", "label!", "dangling", "driver"];
/// Filter keys of Prune.
pub const PRUNE_KEYS: &[&str] = &["label", "label!", "all"];

/// The volume store.
#[derive(Debug)]
pub struct Volumes {
    dir: PathBuf,
    store: Store,
    hub: Arc<Hub>,
    records: Mutex<HashMap<String, VolumeRecord>>,
    /// Host owner of new volumes' `_data`: the root of containers' user namespaces (with
    /// userns-remap or rootless), else none (root).
    owner: Option<(u32, u32)>,
}

fn validate_volume_name(name: &str) -> Result<()> {
    let ok = name.len() >= 2
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_argument(format!(
            "create {name}: \"{name}\" includes invalid characters for a local volume name, only \"[a-zA-Z0-9][a-zA-Z0-9_.-]\" are allowed. If you intended to pass a host directory, use absolute path"
        )))
    }
}

fn validate_options(opts: &BTreeMap<String, String>) -> Result<()> {
    for k in opts.keys() {
        if !matches!(k.as_str(), "type" | "device" | "o" | "size") {
            return Err(Error::invalid_argument(format!("invalid option: \"{k}\"")));
        }
    }
    if opts.contains_key("type") != opts.contains_key("device") && !opts.contains_key("size") {
        return Err(Error::invalid_argument(
            "missing required option: \"type\" and \"device\" go together",
        ));
    }
    Ok(())
}

impl Volumes {
    /// Loads the records; `dir` is `<root>/volumes`.
    pub fn load(dir: PathBuf, store: Store, hub: Arc<Hub>) -> Result<Self> {
        std::fs::create_dir_all(&dir)
            .context(ErrorKind::Internal, format!("create {}", dir.display()))?;
        let records = store
            .volumes()?
            .into_iter()
            .map(|v| (v.name.clone(), v))
            .collect();
        Ok(Self {
            dir,
            store,
            hub,
            records: Mutex::new(records),
            owner: None,
        })
    }

    /// New volumes' data directories belong to `owner` (host uid, gid): containers' root
    /// under a user namespace map.
    pub fn with_owner(mut self, owner: Option<(u32, u32)>) -> Self {
        self.owner = owner;
        self
    }

    /// The host directory holding a volume's data.
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name).join("_data")
    }

    /// Creates a volume, or returns the existing one of that name (Docker's behaviour; a
    /// different driver is `AlreadyExists`). `name` `None` makes an anonymous volume. Returns
    /// the record and whether it was created.
    pub async fn create(
        &self,
        name: Option<&str>,
        driver: &str,
        options: BTreeMap<String, String>,
        labels: BTreeMap<String, String>,
    ) -> Result<(VolumeRecord, bool)> {
        let driver = if driver.is_empty() { LOCAL } else { driver };
        if driver != LOCAL {
            return Err(Error::not_found(format!(
                "error looking up volume plugin {driver}: plugin \"{driver}\" not found"
            )));
        }
        let anonymous = name.is_none_or(str::is_empty);
        let name = match name {
            Some(n) if !n.is_empty() => {
                validate_volume_name(n)?;
                n.to_string()
            }
            _ => Id::random().to_string(),
        };
        validate_options(&options)?;
        if let Some(existing) = self.records.lock().unwrap().get(&name) {
            if existing.driver != driver {
                return Err(Error::already_exists(format!(
                    "volume {name} already exists with driver {}",
                    existing.driver
                )));
            }
            return Ok((existing.clone(), false));
        }
        let data = self.data_dir(&name);
        std::fs::create_dir_all(&data)
            .context(ErrorKind::Internal, format!("create {}", data.display()))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&data, Some(uid), Some(gid))
                .context(ErrorKind::Internal, format!("chown {}", data.display()))?;
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let rec = VolumeRecord {
            name: name.clone(),
            driver: driver.into(),
            created_secs: now.as_secs() as i64,
            created_nanos: now.subsec_nanos() as i32,
            labels,
            options,
            anonymous,
        };
        {
            // Two creates of the same name race: the first one wins.
            let mut recs = self.records.lock().unwrap();
            if let Some(existing) = recs.get(&name) {
                return Ok((existing.clone(), false));
            }
            recs.insert(name.clone(), rec.clone());
        }
        if let Err(e) = self.store.put_volume(&rec).await {
            self.records.lock().unwrap().remove(&name);
            return Err(e);
        }
        self.publish("create", &rec, []);
        tracing::info!(volume = %name, anonymous, "volume created");
        Ok((rec, true))
    }

    /// One volume.
    pub fn get(&self, name: &str) -> Result<VolumeRecord> {
        self.records
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("get {name}: no such volume")))
    }

    /// Every volume, by name.
    pub fn all(&self) -> Vec<VolumeRecord> {
        let mut v: Vec<VolumeRecord> = self.records.lock().unwrap().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Removes a volume that no container uses (`users` = how many do).
    pub async fn remove(&self, name: &str, users: &[String]) -> Result<()> {
        let rec = self.get(name)?;
        if !users.is_empty() {
            return Err(Error::failed_precondition(format!(
                "remove {name}: volume is in use - [{}]",
                users.join(", ")
            )));
        }
        let dir = self.dir.join(name);
        if rec.options.contains_key("type") {
            let _ = nix::mount::umount2(&self.data_dir(name), nix::mount::MntFlags::MNT_DETACH);
        }
        self.store.delete_volume(name).await?;
        self.records.lock().unwrap().remove(name);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(volume = name, error = %e, "removing volume data");
        }
        self.publish("destroy", &rec, []);
        tracing::info!(volume = name, "volume removed");
        Ok(())
    }

    /// Mounts a volume created with driver options on its data directory, once.
    pub fn ensure_mounted(&self, name: &str) -> Result<()> {
        let rec = self.get(name)?;
        let (Some(typ), Some(device)) = (rec.options.get("type"), rec.options.get("device")) else {
            return Ok(());
        };
        let data = self.data_dir(name);
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let target = data.display().to_string();
        if mountinfo
            .lines()
            .any(|l| l.split_whitespace().nth(4) == Some(target.as_str()))
        {
            return Ok(());
        }
        let mut opts = rec.options.get("o").cloned().unwrap_or_default();
        if let Some(size) = rec.options.get("size") {
            if !opts.is_empty() {
                opts.push(',');
            }
            opts.push_str(&format!("size={size}"));
        }
        nix::mount::mount(
            Some(device.as_str()),
            &data,
            Some(typ.as_str()),
            nix::mount::MsFlags::empty(),
            (!opts.is_empty()).then_some(opts.as_str()),
        )
        .map_err(|e| {
            Error::internal(format!("mount volume {name} ({typ} {device})")).with_source(e)
        })
    }

    /// Publishes a volume event.
    pub fn publish(
        &self,
        action: &str,
        rec: &VolumeRecord,
        extra: impl IntoIterator<Item = (String, String)>,
    ) {
        let mut attrs: Vec<(String, String)> = vec![("driver".into(), rec.driver.clone())];
        attrs.extend(extra);
        self.hub.publish(
            events::docker_event(EventType::Volume, action, &rec.name, attrs),
            "default",
        );
    }

    /// The wire form; `usage` = `(size, ref count)` when computed.
    pub fn to_proto(&self, rec: &VolumeRecord, usage: Option<(i64, i64)>) -> pb::Volume {
        pb::Volume {
            name: rec.name.clone(),
            driver: rec.driver.clone(),
            mountpoint: self.data_dir(&rec.name).display().to_string(),
            created_at: Some(Timestamp {
                seconds: rec.created_secs,
                nanos: rec.created_nanos,
            }),
            labels: rec.labels.clone().into_iter().collect(),
            options: rec.options.clone().into_iter().collect(),
            scope: "local".into(),
            status: Default::default(),
            anonymous: rec.anonymous,
            usage: usage.map(|(size, ref_count)| pb::VolumeUsage { size, ref_count }),
        }
    }

    /// Bytes used by a volume.
    pub fn size(&self, name: &str) -> i64 {
        crate::rootfs::dir_size(&self.data_dir(name))
    }

    /// Where volumes live.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Whether `rec` passes List `filters`; `in_use` tells whether any container uses it.
pub fn list_matches(args: &Args, rec: &VolumeRecord, in_use: bool) -> Result<bool> {
    if args.contains("name") && !args.values("name").any(|n| rec.name.contains(n)) {
        return Ok(false);
    }
    if !args.exact_match("driver", &rec.driver) {
        return Ok(false);
    }
    let get = |k: &str| rec.labels.get(k).cloned();
    if !args.match_labels("label", get) || !args.match_labels_negated("label!", get) {
        return Ok(false);
    }
    if let Some(dangling) = args.bool_value("dangling")?
        && dangling == in_use
    {
        return Ok(false);
    }
    Ok(true)
}

/// Whether prune removes `rec` (unused ones only are offered).
pub fn prune_matches(args: &Args, rec: &VolumeRecord) -> Result<bool> {
    let all = args.bool_value("all")?.unwrap_or(false);
    if !all && !rec.anonymous {
        return Ok(false);
    }
    let get = |k: &str| rec.labels.get(k).cloned();
    Ok(args.match_labels("label", get) && args.match_labels_negated("label!", get))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn volumes() -> (tempfile::TempDir, Volumes, Arc<Hub>) {
        let t = tempfile::tempdir().unwrap();
        let store = Store::open(&t.path().join("engine.redb")).unwrap();
        let hub = Hub::new(100);
        let v = Volumes::load(t.path().join("volumes"), store, hub.clone()).unwrap();
        (t, v, hub)
    }

    #[tokio::test]
    async fn create_is_idempotent_and_remove_refuses_while_in_use() {
        let (_t, v, _hub) = volumes().await;
        let (rec, created) = v
            .create(
                Some("data"),
                "",
                BTreeMap::new(),
                [("a".into(), "1".into())].into(),
            )
            .await
            .unwrap();
        assert!(created && !rec.anonymous);
        assert!(v.data_dir("data").is_dir());
        let (again, created) = v
            .create(Some("data"), "local", BTreeMap::new(), BTreeMap::new())
            .await
            .unwrap();
        assert!(!created);
        assert_eq!(again.labels["a"], "1");
        assert_eq!(
            v.create(Some("x"), "nfs", BTreeMap::new(), BTreeMap::new())
                .await
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound
        );
        assert!(
            v.create(Some("-bad"), "", BTreeMap::new(), BTreeMap::new())
                .await
                .is_err()
        );
        assert!(
            v.create(
                Some("o"),
                "",
                [("bogus".into(), "1".into())].into(),
                BTreeMap::new()
            )
            .await
            .is_err()
        );
        let err = v.remove("data", &["c1".into()]).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
        assert!(err.message().contains("volume is in use"));
        v.remove("data", &[]).await.unwrap();
        assert!(!v.data_dir("data").exists());
        assert_eq!(v.get("data").unwrap_err().kind(), ErrorKind::NotFound);
        let (anon, _) = v
            .create(None, "", BTreeMap::new(), BTreeMap::new())
            .await
            .unwrap();
        assert!(anon.anonymous && Id::is_valid(&anon.name));
    }

    #[tokio::test]
    async fn records_survive_a_reload() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("engine.redb");
        {
            let store = Store::open(&path).unwrap();
            let v = Volumes::load(t.path().join("volumes"), store, Hub::new(10)).unwrap();
            v.create(Some("keep"), "", BTreeMap::new(), BTreeMap::new())
                .await
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let v = Volumes::load(t.path().join("volumes"), store, Hub::new(10)).unwrap();
        assert_eq!(v.all().len(), 1);
    }

    #[test]
    fn filters() {
        let rec = VolumeRecord {
            name: "webdata".into(),
            driver: "local".into(),
            created_secs: 0,
            created_nanos: 0,
            labels: [("team".into(), "a".into())].into(),
            options: BTreeMap::new(),
            anonymous: false,
        };
        let m = |pairs: &[(&str, &str)], in_use| {
            list_matches(&Args::from_pairs(pairs.iter().copied()), &rec, in_use).unwrap()
        };
        assert!(m(&[("name", "web")], false));
        assert!(!m(&[("name", "db")], false));
        assert!(m(&[("label", "team=a")], false));
        assert!(!m(&[("label!", "team")], false));
        assert!(m(&[("dangling", "true")], false));
        assert!(!m(&[("dangling", "true")], true));
        let p = |pairs: &[(&str, &str)]| {
            prune_matches(&Args::from_pairs(pairs.iter().copied()), &rec).unwrap()
        };
        assert!(!p(&[]), "named volumes only with all=true");
        assert!(p(&[("all", "true")]));
        assert!(!p(&[("all", "true"), ("label", "team=b")]));
    }
}
