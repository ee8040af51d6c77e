//! The build cache: a record per builder step (its key → the image it made), kept apart from
//! tags so it outlives `docker rmi` of the final image and `docker image prune` of dangling
//! images until `docker builder prune` drops it.
//!
//! The images a record names stay as untagged images; `docker images` (without `-a`) and
//! `docker image prune` leave them alone, as dockerd does with intermediate images.

use std::collections::BTreeSet;
use std::time::SystemTime;

use berth_core::Result;
use serde::{Deserialize, Serialize};

use crate::meta::{self, ImageRecord};
use crate::service::Images;

/// One step's record.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CacheRecord {
    pub image_id: String,
    #[serde(default)]
    pub parent_id: String,
    #[serde(default)]
    pub created_by: String,
    #[serde(default)]
    pub created_nanos: i64,
}

/// What a prune dropped.
#[derive(Debug, Clone, Default)]
pub struct CachePruned {
    pub keys: Vec<String>,
    pub bytes: u64,
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

impl Images {
    /// The image recorded for `key`, if the record and its image both exist.
    pub fn cache_lookup(&self, key: &str) -> Result<Option<String>> {
        let rec: Option<CacheRecord> = self.meta.read(|r| r.get(meta::BUILD_CACHE, key))?;
        let Some(rec) = rec else { return Ok(None) };
        Ok(self.meta.image(&rec.image_id)?.map(|i| i.id))
    }

    /// Records `image_id` for `key` (the image must exist).
    pub fn cache_store(&self, key: &str, mut rec: CacheRecord) -> Result<()> {
        let img = self.resolve(&rec.image_id)?;
        rec.image_id = img.record.id;
        rec.created_nanos = now_nanos();
        self.meta.write(|tx| tx.put(meta::BUILD_CACHE, key, &rec))
    }

    /// Every record with its key and the bytes its image adds to its parent.
    pub fn cache_list(&self) -> Result<Vec<(String, CacheRecord, i64)>> {
        let records = self
            .meta
            .read(|r| r.list::<CacheRecord>(meta::BUILD_CACHE))?;
        let size = |id: &str| -> Result<i64> { Ok(self.meta.image(id)?.map_or(0, |i| i.size)) };
        let mut out = Vec::new();
        for (k, r) in records {
            let own = (size(&r.image_id)? - size(&r.parent_id)?).max(0);
            out.push((k, r, own));
        }
        Ok(out)
    }

    /// Ids of the images cache records name.
    pub fn cached_images(&self) -> Result<BTreeSet<String>> {
        Ok(self
            .meta
            .read(|r| r.list::<CacheRecord>(meta::BUILD_CACHE))?
            .into_iter()
            .map(|(_, r)| r.image_id)
            .collect())
    }

    /// Whether `rec` is an untagged image only the build cache keeps (an intermediate image).
    pub fn is_cache_only(&self, rec: &ImageRecord, cached: &BTreeSet<String>) -> Result<bool> {
        Ok(cached.contains(&rec.id) && self.tags_of(&rec.id)?.is_empty())
    }

    /// Drops the records made before `until` (all without), then deletes the untagged images
    /// without users that only those records kept, and collects their content.
    pub async fn cache_prune(&self, until: Option<SystemTime>) -> Result<CachePruned> {
        let limit = until.map(|u| {
            u.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64)
        });
        let (keys, dropped) = self.meta.write(|tx| {
            let mut keys = Vec::new();
            let mut dropped = BTreeSet::new();
            for (k, r) in tx.list::<CacheRecord>(meta::BUILD_CACHE)? {
                if limit.is_some_and(|l| r.created_nanos >= l) {
                    continue;
                }
                tx.del(meta::BUILD_CACHE, &k)?;
                keys.push(k);
                dropped.insert(r.image_id);
            }
            Ok((keys, dropped))
        })?;
        let still_cached = self.cached_images()?;
        let users = self.meta.users()?;
        let removed = self.meta.write(|tx| {
            let tagged: BTreeSet<String> = tx
                .list::<String>(meta::TAGS)?
                .into_iter()
                .map(|(_, i)| i)
                .collect();
            let mut removed = 0;
            for id in &dropped {
                if still_cached.contains(id)
                    || tagged.contains(id)
                    || users.iter().any(|(_, i)| i == id)
                {
                    continue;
                }
                if tx.del(meta::IMAGES, id)? {
                    removed += 1;
                }
            }
            Ok(removed)
        })?;
        let bytes = if removed > 0 {
            self.gc(false).await?.bytes
        } else {
            0
        };
        Ok(CachePruned { keys, bytes })
    }
}

#[cfg(test)]
mod tests {
    use berth_core::Config;

    use super::*;

    fn image(images: &Images, n: u8) -> String {
        let id = format!("sha256:{}", hex::encode([n; 32]));
        let rec = ImageRecord {
            id: id.clone(),
            ..Default::default()
        };
        images
            .meta
            .write(|tx| tx.put(meta::IMAGES, &rec.id, &rec))
            .unwrap();
        id
    }

    #[tokio::test]
    async fn records_name_live_images_and_prune_drops_them() {
        let dir = tempfile::tempdir().unwrap();
        let images = Images::open(Config {
            root: dir.path().join("root"),
            state_dir: dir.path().join("state"),
            ..Default::default()
        })
        .unwrap();
        let tagged = image(&images, 1);
        let record = |id: &str| CacheRecord {
            image_id: id.to_string(),
            ..Default::default()
        };
        images.cache_store("k1", record(&tagged)).unwrap();
        assert_eq!(images.cache_lookup("k1").unwrap(), Some(tagged.clone()));
        assert_eq!(images.cache_lookup("k2").unwrap(), None);
        assert!(images.cache_store("k3", record("sha256:nope")).is_err());
        let cached = images.cached_images().unwrap();
        let rec = images.meta.image(&tagged).unwrap().unwrap();
        assert!(images.is_cache_only(&rec, &cached).unwrap());
        images
            .meta
            .write(|tx| tx.put(meta::TAGS, "docker.io/library/x:latest", &tagged))
            .unwrap();
        assert!(!images.is_cache_only(&rec, &cached).unwrap());
        // A record whose image went is a miss.
        let gone = image(&images, 2);
        images.cache_store("k4", record(&gone)).unwrap();
        images.meta.write(|tx| tx.del(meta::IMAGES, &gone)).unwrap();
        assert_eq!(images.cache_lookup("k4").unwrap(), None);
        // Prune drops every record; the tagged image stays.
        let p = images.cache_prune(None).await.unwrap();
        assert_eq!(p.keys, ["k1", "k4"]);
        assert!(images.meta.image(&tagged).unwrap().is_some());
        assert_eq!(images.cache_lookup("k1").unwrap(), None);
        // `until` keeps records made after it.
        images.cache_store("k5", record(&tagged)).unwrap();
        let p = images
            .cache_prune(Some(SystemTime::UNIX_EPOCH))
            .await
            .unwrap();
        assert!(p.keys.is_empty());
        assert_eq!(images.cache_lookup("k5").unwrap(), Some(tagged));
    }
}
