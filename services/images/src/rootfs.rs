//! `docker import`: a root filesystem tarball becomes a one-layer image, with Dockerfile-style
//! `--change` instructions applied to its config.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::SystemTime;

use berth_core::{Error, Reference, Result};
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};

use crate::archive::ChannelReader;
use crate::oci::{self, Compression, Descriptor, Platform};
use crate::service::Images;

/// Options of a rootfs import.
#[derive(Debug, Clone, Default)]
pub struct RootfsOptions {
    pub reference: String,
    pub changes: Vec<String>,
    pub message: String,
    pub platform: Option<Platform>,
    pub snapshotter: String,
}

impl Images {
    /// Imports a rootfs tarball (plain, gzip or zstd). Returns the image id and the reference
    /// tagged ("" for none).
    pub async fn import_rootfs(
        self: &Arc<Self>,
        mut reader: ChannelReader,
        o: RootfsOptions,
    ) -> Result<(String, String)> {
        let reference = if o.reference.is_empty() {
            None
        } else {
            Some(Reference::parse(&o.reference)?)
        };
        let mut container_config = Map::new();
        for c in &o.changes {
            apply_change(&mut container_config, c)?;
        }
        let _op = self.gc_lock.read().await;
        let lease = self.lease()?;
        let me = self.clone();
        let (blob, size, compression, diff_id, diff_size) = crate::pull::blocking(move || {
            let mut head = vec![0u8; 6];
            let mut n = 0;
            while n < head.len() {
                let got = reader
                    .read(&mut head[n..])
                    .map_err(|e| Error::invalid_argument("read tarball").with_source(e))?;
                if got == 0 {
                    break;
                }
                n += got;
            }
            head.truncate(n);
            if head.starts_with(b"BZh") || head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
                return Err(Error::invalid_argument(
                    "bzip2 and xz tarballs are not supported; use plain, gzip or zstd",
                ));
            }
            let compression = Compression::detect(&head);
            let mut w =
                me.content
                    .writer(&format!("rootfs-{}-{}", crate::nonce(), me.next_id()))?;
            w.restart()?;
            io::copy(&mut io::Cursor::new(head).chain(reader), &mut w)
                .map_err(|e| Error::invalid_argument("read tarball").with_source(e))?;
            let size = w.offset();
            let blob = w.commit(None, None)?;
            let f = me.content.open_blob(&blob)?;
            let mut h = crate::apply::HashingReader {
                inner: compression.reader(f)?,
                hasher: Sha256::new(),
                count: 0,
            };
            io::copy(&mut h, &mut io::sink())
                .map_err(|e| Error::invalid_argument("decompress tarball").with_source(e))?;
            let diff = berth_core::Digest::from_sha256_bytes(&h.hasher.finalize());
            Ok((blob, size, compression, diff, h.count))
        })
        .await?;
        self.lease_add(&lease.id, &[&blob], &[])?;
        let p = o.platform.clone().unwrap_or_else(|| self.platform.clone());
        let now = crate::time::format_rfc3339(SystemTime::now());
        let mut config = json!({
            "created": now,
            "architecture": p.architecture,
            "os": p.os,
            "config": Value::Object(container_config),
            "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
            "history": [{"created": now, "created_by": "", "comment": if o.message.is_empty() { "Imported from -".to_string() } else { o.message.clone() }}],
        });
        if !p.variant.is_empty() {
            config["variant"] = json!(p.variant);
        }
        let cfg_bytes = serde_json::to_vec(&config)
            .map_err(|e| Error::internal("encode config").with_source(e))?;
        let cfg_d = self.content.write_blob(&cfg_bytes, None)?;
        let manifest = oci::Manifest {
            schema_version: 2,
            media_type: oci::OCI_MANIFEST.into(),
            config: Descriptor::of(oci::OCI_CONFIG, &cfg_bytes),
            layers: vec![Descriptor {
                media_type: compression.oci_media_type().into(),
                digest: blob.to_string(),
                size: size as i64,
                ..Default::default()
            }],
            annotations: Default::default(),
        };
        let m_bytes = serde_json::to_vec(&manifest)
            .map_err(|e| Error::internal("encode manifest").with_source(e))?;
        let m_d = self.content.write_blob(&m_bytes, None)?;
        self.lease_add(&lease.id, &[&cfg_d, &m_d], &[])?;
        self.meta.write(|tx| {
            tx.put(
                crate::meta::LAYERS,
                diff_id.as_str(),
                &crate::meta::LayerInfo {
                    size: diff_size as i64,
                },
            )
        })?;
        let mut rec =
            self.record_from_manifest(&Descriptor::of(oci::OCI_MANIFEST, &m_bytes), &m_bytes)?;
        let sn = self.snapshotter_name(&o.snapshotter);
        self.unpack_local(&rec, &sn, &lease.id).await?;
        rec.unpacked_in.insert(sn);
        let tags: Vec<String> = reference.iter().map(|r| r.to_string()).collect();
        self.commit_image(rec.clone(), &tags)?;
        Ok((rec.id, tags.into_iter().next().unwrap_or_default()))
    }
}

/// Applies one Dockerfile instruction to a container config (Docker's `--change`).
pub fn apply_change(cfg: &mut Map<String, Value>, change: &str) -> Result<()> {
    let change = change.trim();
    let (instr, rest) = change
        .split_once(char::is_whitespace)
        .unwrap_or((change, ""));
    let rest = rest.trim();
    let list = |s: &str| -> Value {
        if s.starts_with('[')
            && let Ok(v) = serde_json::from_str::<Vec<String>>(s)
        {
            return json!(v);
        }
        json!(["/bin/sh", "-c", s])
    };
    let pairs = |s: &str| -> Vec<(String, String)> {
        if s.contains('=') {
            s.split_whitespace()
                .filter_map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect()
        } else {
            s.split_once(char::is_whitespace)
                .map(|(k, v)| vec![(k.to_string(), v.trim().to_string())])
                .unwrap_or_default()
        }
    };
    match instr.to_ascii_uppercase().as_str() {
        "CMD" => {
            cfg.insert("Cmd".into(), list(rest));
        }
        "ENTRYPOINT" => {
            cfg.insert("Entrypoint".into(), list(rest));
        }
        "ENV" => {
            let env = cfg.entry("Env").or_insert_with(|| json!([]));
            for (k, v) in pairs(rest) {
                if let Some(a) = env.as_array_mut() {
                    a.retain(|e| !e.as_str().is_some_and(|e| e.starts_with(&format!("{k}="))));
                    a.push(json!(format!("{k}={v}")));
                }
            }
        }
        "LABEL" => {
            let labels = cfg.entry("Labels").or_insert_with(|| json!({}));
            for (k, v) in pairs(rest) {
                labels[k] = json!(v);
            }
        }
        "EXPOSE" => {
            let ports = cfg.entry("ExposedPorts").or_insert_with(|| json!({}));
            for p in rest.split_whitespace() {
                let p = if p.contains('/') {
                    p.to_string()
                } else {
                    format!("{p}/tcp")
                };
                ports[p] = json!({});
            }
        }
        "VOLUME" => {
            let vols = cfg.entry("Volumes").or_insert_with(|| json!({}));
            let paths: Vec<String> = serde_json::from_str(rest)
                .unwrap_or_else(|_| rest.split_whitespace().map(str::to_string).collect());
            for v in paths {
                vols[v] = json!({});
            }
        }
        "USER" => {
            cfg.insert("User".into(), json!(rest));
        }
        "WORKDIR" => {
            cfg.insert("WorkingDir".into(), json!(rest));
        }
        "STOPSIGNAL" => {
            cfg.insert("StopSignal".into(), json!(rest));
        }
        "ONBUILD" => {
            let ob = cfg.entry("OnBuild").or_insert_with(|| json!([]));
            if let Some(a) = ob.as_array_mut() {
                a.push(json!(rest));
            }
        }
        other => {
            return Err(Error::invalid_argument(format!(
                "{other} is not a valid change command"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes() {
        let mut c = Map::new();
        apply_change(&mut c, r#"CMD ["sh","-c","echo hi"]"#).unwrap();
        apply_change(&mut c, "ENTRYPOINT /bin/app").unwrap();
        apply_change(&mut c, "ENV A=1 B=2").unwrap();
        apply_change(&mut c, "ENV A 3").unwrap();
        apply_change(&mut c, "EXPOSE 80 53/udp").unwrap();
        apply_change(&mut c, "LABEL x=y").unwrap();
        apply_change(&mut c, "WORKDIR /srv").unwrap();
        let v = Value::Object(c.clone());
        assert_eq!(v["Cmd"], json!(["sh", "-c", "echo hi"]));
        assert_eq!(v["Entrypoint"], json!(["/bin/sh", "-c", "/bin/app"]));
        assert_eq!(v["Env"], json!(["B=2", "A=3"]));
        assert_eq!(v["ExposedPorts"], json!({"80/tcp": {}, "53/udp": {}}));
        assert_eq!(v["Labels"], json!({"x": "y"}));
        assert_eq!(v["WorkingDir"], json!("/srv"));
        assert!(apply_change(&mut c, "RUN rm -rf /").is_err());
    }
}
