//! Child images of a local image (`docker commit`, build steps): one more layer (or none) and one
//! more history entry, stored like a pulled image so save, push, run and history work on it.
//!
//! All or nothing: the layer blob, config and manifest that this call wrote and the snapshot it
//! committed are removed again when a later step fails, so a failed commit leaves nothing.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::SystemTime;

use berth_core::snapshots::{Kind, Snapshotter};
use berth_core::{Digest, Error, Reference, Result};
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};

use crate::archive::ChannelReader;
use crate::meta::{self, ImageRecord, LayerInfo};
use crate::oci::{self, Descriptor};
use crate::service::Images;

/// Ingest names of child image layers (`<prefix><process nonce>-<n>`).
pub const LAYER_INGEST_PREFIX: &str = "child-layer-";

/// What a child image is made of, besides its layer.
#[derive(Debug, Clone, Default)]
pub struct ChildOptions {
    /// Parent image (reference, id or id prefix); "" = none.
    pub parent: String,
    /// The image `Config` JSON; empty = the parent's.
    pub config: Vec<u8>,
    /// The config's `container_config`; empty = left out.
    pub container_config: Vec<u8>,
    /// The config's `container`; "" = left out.
    pub container: String,
    pub created_by: String,
    pub author: String,
    pub comment: String,
    /// No layer: the stream carries nothing.
    pub empty_layer: bool,
    pub reference: String,
    pub snapshotter: String,
}

/// A layer written to the content store.
struct StoredLayer {
    blob: Digest,
    size: u64,
    diff_id: Digest,
    diff_size: u64,
    /// Whether this call put the blob there (and so removes it on failure).
    new: bool,
}

/// What a failing create must undo.
#[derive(Default)]
struct Undo {
    blobs: Vec<Digest>,
    snapshot: Option<(String, String)>,
}

fn parse_json(what: &str, data: &[u8]) -> Result<Option<Value>> {
    if data.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(data)
        .map_err(|e| Error::invalid_argument(format!("invalid {what} JSON")).with_source(e))?;
    match v {
        Value::Null => Ok(None),
        Value::Object(_) => Ok(Some(v)),
        _ => Err(Error::invalid_argument(format!(
            "invalid {what} JSON: not an object"
        ))),
    }
}

/// The new image's config: the parent's platform, rootfs and history, plus `diff_id` (when a
/// layer was made) and one history entry.
pub fn child_config(
    parent: Option<&Value>,
    o: &ChildOptions,
    config: Option<Value>,
    container_config: Option<Value>,
    diff_id: Option<&Digest>,
    created: &str,
    host: &oci::Platform,
) -> Value {
    let mut out = Map::new();
    let from_parent = |k: &str| parent.and_then(|p| p.get(k)).cloned();
    let config = config
        .or_else(|| from_parent("config"))
        .unwrap_or(json!({}));
    out.insert(
        "architecture".into(),
        from_parent("architecture").unwrap_or(json!(host.architecture)),
    );
    if let Some(v) = from_parent("variant")
        .or_else(|| (parent.is_none() && !host.variant.is_empty()).then(|| json!(host.variant)))
    {
        out.insert("variant".into(), v);
    }
    out.insert("os".into(), from_parent("os").unwrap_or(json!(host.os)));
    for k in ["os.version", "os.features"] {
        if let Some(v) = from_parent(k) {
            out.insert(k.into(), v);
        }
    }
    if !o.author.is_empty() {
        out.insert("author".into(), json!(o.author));
    }
    if !o.comment.is_empty() {
        out.insert("comment".into(), json!(o.comment));
    }
    out.insert("config".into(), config);
    if !o.container.is_empty() {
        out.insert("container".into(), json!(o.container));
    }
    if let Some(cc) = container_config {
        out.insert("container_config".into(), cc);
    }
    out.insert("created".into(), json!(created));
    let mut history: Vec<Value> = from_parent("history")
        .and_then(|h| h.as_array().cloned())
        .unwrap_or_default();
    // No parent, no layer and no command: the empty base of `FROM scratch`, with no history.
    let base = parent.is_none() && diff_id.is_none() && o.created_by.is_empty();
    let mut entry = Map::new();
    if !o.author.is_empty() {
        entry.insert("author".into(), json!(o.author));
    }
    entry.insert("created".into(), json!(created));
    entry.insert("created_by".into(), json!(o.created_by));
    if !o.comment.is_empty() {
        entry.insert("comment".into(), json!(o.comment));
    }
    if diff_id.is_none() {
        entry.insert("empty_layer".into(), json!(true));
    }
    if !base {
        history.push(Value::Object(entry));
    }
    out.insert("history".into(), json!(history));
    let mut diff_ids: Vec<Value> = parent
        .and_then(|p| p.pointer("/rootfs/diff_ids"))
        .and_then(|d| d.as_array().cloned())
        .unwrap_or_default();
    if let Some(d) = diff_id {
        diff_ids.push(json!(d.to_string()));
    }
    out.insert(
        "rootfs".into(),
        json!({"type": "layers", "diff_ids": diff_ids}),
    );
    Value::Object(out)
}

impl Images {
    /// Creates a child image from `o` and the uncompressed layer tar `reader` carries. Returns
    /// the image id and the reference tagged ("" for none).
    pub async fn create_child(
        self: &Arc<Self>,
        reader: ChannelReader,
        o: ChildOptions,
    ) -> Result<(String, String)> {
        let reference = if o.reference.is_empty() {
            None
        } else {
            let r = Reference::parse(&o.reference)?;
            if r.digest().is_some() {
                return Err(Error::invalid_argument(format!(
                    "invalid reference format: {:?} must be a repository and tag, not a digest",
                    o.reference
                )));
            }
            Some(r)
        };
        let config = parse_json("config", &o.config)?;
        let container_config = parse_json("container_config", &o.container_config)?;
        let sn_name = self.snapshotter_name(&o.snapshotter);
        let parent = if o.parent.is_empty() {
            None
        } else {
            let rec = self.resolve(&o.parent)?.record;
            Some(self.ensure_unpacked(&rec, &sn_name).await?)
        };
        let _op = self.gc_lock.read().await;
        let lease = self.local_lease()?;
        let mut undo = Undo::default();
        let made = self
            .create_child_locked(
                reader,
                &o,
                parent.as_ref(),
                config,
                container_config,
                reference.as_ref(),
                &sn_name,
                &lease.id,
                &mut undo,
            )
            .await;
        if made.is_err() {
            self.undo(undo).await;
        }
        made
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_child_locked(
        self: &Arc<Self>,
        reader: ChannelReader,
        o: &ChildOptions,
        parent: Option<&ImageRecord>,
        config: Option<Value>,
        container_config: Option<Value>,
        reference: Option<&Reference>,
        sn_name: &str,
        lease: &str,
        undo: &mut Undo,
    ) -> Result<(String, String)> {
        let layer = if o.empty_layer {
            drop(reader);
            None
        } else {
            let l = self.store_layer(reader).await?;
            if l.new {
                undo.blobs.push(l.blob.clone());
            }
            self.lease_add(lease, &[&l.blob], &[])?;
            Some(l)
        };
        let parent_cfg: Option<Value> = match parent {
            Some(p) => Some(
                serde_json::from_slice(&self.config_of(p)?)
                    .map_err(|e| Error::internal("parse the parent's config").with_source(e))?,
            ),
            None => None,
        };
        let created = crate::time::format_rfc3339(SystemTime::now());
        let cfg = child_config(
            parent_cfg.as_ref(),
            o,
            config,
            container_config,
            layer.as_ref().map(|l| &l.diff_id),
            &created,
            &self.platform,
        );
        // Docker's manifest types when the parent has them, OCI's otherwise.
        let docker = parent.is_some_and(|p| p.target.media_type == oci::DOCKER_MANIFEST);
        let (m_type, c_type) = if docker {
            (oci::DOCKER_MANIFEST, oci::DOCKER_CONFIG)
        } else {
            (oci::OCI_MANIFEST, oci::OCI_CONFIG)
        };
        let cfg_bytes = serde_json::to_vec(&cfg)
            .map_err(|e| Error::internal("encode config").with_source(e))?;
        let mut layers = parent.map(|p| p.layers.clone()).unwrap_or_default();
        if let Some(l) = &layer {
            layers.push(Descriptor {
                media_type: if docker {
                    oci::DOCKER_LAYER_GZIP
                } else {
                    oci::OCI_LAYER_GZIP
                }
                .into(),
                digest: l.blob.to_string(),
                size: l.size as i64,
                ..Default::default()
            });
        }
        let manifest = oci::Manifest {
            schema_version: 2,
            media_type: m_type.into(),
            config: Descriptor::of(c_type, &cfg_bytes),
            layers,
            annotations: Default::default(),
        };
        let m_bytes = serde_json::to_vec(&manifest)
            .map_err(|e| Error::internal("encode manifest").with_source(e))?;
        for bytes in [&cfg_bytes, &m_bytes] {
            let d = Digest::sha256_of(bytes);
            let new = !self.content.exists(&d);
            self.content.write_blob(bytes, Some(&d))?;
            if new {
                undo.blobs.push(d.clone());
            }
            self.lease_add(lease, &[&d], &[])?;
        }
        if let Some(l) = &layer {
            // Made durable by commit_image's write below; worthless without it.
            self.meta.write_volatile(|tx| {
                tx.put(
                    meta::LAYERS,
                    l.diff_id.as_str(),
                    &LayerInfo {
                        size: l.diff_size as i64,
                    },
                )
            })?;
        }
        let mut rec = self.record_from_manifest(&Descriptor::of(m_type, &m_bytes), &m_bytes)?;
        rec.parent = parent.map(|p| p.id.clone()).unwrap_or_default();
        if !rec.chain_id.is_empty() {
            let sn = self.snapshotter(sn_name);
            let existed =
                matches!(sn.stat(&rec.chain_id).await, Ok(i) if i.kind == Kind::Committed);
            if !existed {
                undo.snapshot = Some((sn_name.to_string(), rec.chain_id.clone()));
            }
            self.unpack_local(&rec, sn_name, lease).await?;
        }
        rec.unpacked_in.insert(sn_name.to_string());
        let tags: Vec<String> = reference.iter().map(|r| r.to_string()).collect();
        self.commit_image(rec.clone(), &tags)?;
        Ok((rec.id, tags.into_iter().next().unwrap_or_default()))
    }

    /// Stores an uncompressed layer tar gzip-compressed, computing its diff id on the way.
    async fn store_layer(self: &Arc<Self>, mut reader: ChannelReader) -> Result<StoredLayer> {
        let me = self.clone();
        crate::pull::blocking(move || {
            let ingest = format!("{LAYER_INGEST_PREFIX}{}-{}", crate::nonce(), me.next_id());
            let mut w = me.content.writer(&ingest)?;
            let stored = (|| -> Result<(crate::content::Writer, Digest, u64)> {
                w.restart()?;
                let mut gz = flate2::write::GzEncoder::new(w, flate2::Compression::fast());
                let mut hasher = Sha256::new();
                let mut count = 0u64;
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = reader
                        .read(&mut buf)
                        .map_err(|e| Error::invalid_argument("read the layer").with_source(e))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    count += n as u64;
                    gz.write_all(&buf[..n])
                        .map_err(|e| Error::internal("write the layer").with_source(e))?;
                }
                let w = gz
                    .finish()
                    .map_err(|e| Error::internal("write the layer").with_source(e))?;
                Ok((w, Digest::from_sha256_bytes(&hasher.finalize()), count))
            })();
            let (w, diff_id, diff_size) = match stored {
                Ok(s) => s,
                Err(e) => {
                    let _ = me.content.abort(&ingest);
                    return Err(e);
                }
            };
            let size = w.offset();
            let new = !me.content.exists(&w.digest());
            let blob = w.commit(None, None)?;
            Ok(StoredLayer {
                blob,
                size,
                diff_id,
                diff_size,
                new,
            })
        })
        .await
    }

    /// Removes what a failed create made.
    async fn undo(&self, undo: Undo) {
        if let Some((sn_name, key)) = undo.snapshot {
            let sn = self.snapshotter(&sn_name);
            if matches!(sn.stat(&key).await, Ok(i) if i.kind == Kind::Committed)
                && let Err(e) = sn.remove(&key).await
            {
                tracing::warn!(key = %key, error = %e.chain(), "remove the snapshot of a failed commit");
            }
        }
        let referenced: Vec<String> = self
            .meta
            .images()
            .unwrap_or_default()
            .into_iter()
            .flat_map(|r| {
                [r.target.digest.clone(), r.config.digest.clone()]
                    .into_iter()
                    .chain(r.layers.into_iter().map(|l| l.digest))
            })
            .collect();
        for d in undo.blobs {
            if referenced.iter().any(|r| *r == d.as_str()) {
                continue;
            }
            if let Err(e) = self.content.delete(&d) {
                tracing::warn!(blob = %d, error = %e.chain(), "remove a blob of a failed commit");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_child_config_extends_the_parent() {
        let parent = json!({
            "architecture": "amd64", "os": "linux", "docker_version": "old",
            "config": {"Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:aa"]},
            "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "ADD file"}],
        });
        let o = ChildOptions {
            container: "abc".into(),
            created_by: "sh -c touch /x".into(),
            author: "me".into(),
            comment: "msg".into(),
            ..Default::default()
        };
        let d: Digest = format!("sha256:{}", "b".repeat(64)).parse().unwrap();
        let host = oci::Platform::parse("linux/amd64").unwrap();
        let c = child_config(
            Some(&parent),
            &o,
            Some(json!({"Cmd": ["cat", "/x"]})),
            Some(json!({"Cmd": ["sh"]})),
            Some(&d),
            "2026-01-01T00:00:00Z",
            &host,
        );
        assert_eq!(c["config"]["Cmd"], json!(["cat", "/x"]));
        assert_eq!(c["container"], "abc");
        assert_eq!(c["container_config"]["Cmd"], json!(["sh"]));
        assert_eq!(c["author"], "me");
        assert!(c.get("docker_version").is_none());
        assert_eq!(c["rootfs"]["diff_ids"], json!(["sha256:aa", d.to_string()]));
        let h = c["history"].as_array().unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[1]["created_by"], "sh -c touch /x");
        assert_eq!(h[1]["comment"], "msg");
        assert_eq!(h[1]["author"], "me");
        assert!(h[1].get("empty_layer").is_none());
        // No layer: an empty-layer entry, the parent's diff ids and config.
        let c = child_config(Some(&parent), &o, None, None, None, "t", &host);
        assert_eq!(c["config"]["Cmd"], json!(["sh"]));
        assert_eq!(c["rootfs"]["diff_ids"], json!(["sha256:aa"]));
        assert_eq!(c["history"][1]["empty_layer"], true);
    }

    #[test]
    fn configs_must_be_objects() {
        assert!(parse_json("config", b"").unwrap().is_none());
        assert!(parse_json("config", b"null").unwrap().is_none());
        assert!(parse_json("config", b"{").is_err());
        assert!(parse_json("config", b"[1]").is_err());
        assert!(parse_json("config", b"{\"Cmd\":null}").unwrap().is_some());
    }
}
