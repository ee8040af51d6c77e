//! Image archives, both directions, streaming: the docker-archive (`docker save` / `docker
//! load`, here with an OCI `index.json` and `oci-layout` too, as Docker 25+ writes it, so OCI
//! tools such as `ctr images import` accept it) and the plain OCI image layout.
//!
//! Export writes the stored blobs as they are (the manifest keeps its digest; layers stay
//! compressed — `docker load` and containerd decompress them). Import streams every file of the
//! archive into the content store as it comes, verifying `blobs/<alg>/<hex>` names against their
//! bytes, and only then reads `manifest.json` / `index.json`: archives put those last as often as
//! first. Archive paths are never used as filesystem paths.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};

use berth_core::{Digest, Error, Reference, Result};
use serde::{Deserialize, Serialize};

use crate::meta::ImageRecord;
use crate::oci::{self, Compression, Descriptor, ManifestKind, Platform};
use crate::service::{Images, MAX_CONFIG};

/// Which archive format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// docker-archive (with an OCI index too).
    Docker,
    /// OCI image layout only.
    Oci,
}

/// An image read from an archive, not yet recorded.
#[derive(Debug, Clone)]
pub struct ImportedImage {
    pub record: ImageRecord,
    /// Fully qualified references the archive names it by.
    pub tags: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

const MTIME: u64 = 0;

fn tar_err(e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Error::new(
            berth_core::ErrorKind::Cancelled,
            "export stream closed by the client",
        )
        .with_source(e)
    } else {
        Error::internal("write archive").with_source(e)
    }
}

impl Images {
    /// The images `inputs` name, with the references to export each under. A repository name
    /// without a tag stands for all of its tags.
    pub fn export_selection(&self, inputs: &[String]) -> Result<Vec<(ImageRecord, Vec<String>)>> {
        let mut out: Vec<(ImageRecord, Vec<String>)> = Vec::new();
        let mut add = |rec: ImageRecord, name: Option<String>| {
            if let Some(e) = out.iter_mut().find(|(r, _)| r.id == rec.id) {
                if let Some(n) = name
                    && !e.1.contains(&n)
                {
                    e.1.push(n);
                }
            } else {
                out.push((rec, name.into_iter().collect()));
            }
        };
        for input in inputs {
            if let Ok(r) = Reference::parse_no_default(input)
                && r.tag().is_none()
                && r.digest().is_none()
                && !input.contains(':')
            {
                let prefix = format!("{}:", r.repository());
                let tagged: Vec<(String, String)> = self
                    .meta
                    .tags()?
                    .into_iter()
                    .filter(|(t, _)| t.starts_with(&prefix))
                    .collect();
                if !tagged.is_empty() {
                    for (t, id) in tagged {
                        if let Some(rec) = self.meta.image(&id)? {
                            add(rec, Some(t));
                        }
                    }
                    continue;
                }
            }
            let found = self.resolve(input)?;
            let name = found
                .reference
                .filter(|r| r.digest().is_none())
                .map(|r| r.to_string());
            add(found.record, name);
        }
        Ok(out)
    }

    /// Writes `images` as one archive to `out`.
    pub fn export(
        &self,
        images: &[(ImageRecord, Vec<String>)],
        format: Format,
        out: impl Write,
    ) -> Result<()> {
        let mut tar = tar::Builder::new(out);
        tar.mode(tar::HeaderMode::Deterministic);
        let mut written: std::collections::HashSet<String> = Default::default();
        let mut index = oci::Index {
            schema_version: 2,
            media_type: oci::OCI_INDEX.into(),
            ..Default::default()
        };
        let mut docker_manifest: Vec<DockerManifestEntry> = Vec::new();
        let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (rec, names) in images {
            let mut blobs: Vec<Descriptor> = vec![rec.target.clone(), rec.config.clone()];
            blobs.extend(rec.layers.iter().cloned());
            for b in &blobs {
                if !written.insert(b.digest.clone()) {
                    continue;
                }
                let d = b.digest()?;
                let f = self.content.open_blob(&d)?;
                let size = f.metadata().map(|m| m.len()).unwrap_or(0);
                let mut h = tar::Header::new_gnu();
                h.set_size(size);
                h.set_mode(0o444);
                h.set_mtime(MTIME);
                h.set_entry_type(tar::EntryType::Regular);
                tar.append_data(&mut h, format!("blobs/{}/{}", d.algorithm(), d.hex()), f)
                    .map_err(tar_err)?;
            }
            let mut desc = rec.target.clone();
            desc.platform = Some(rec.platform.clone()).filter(|p| !p.os.is_empty());
            if names.is_empty() {
                index.manifests.push(desc.clone());
            }
            let mut familiar = Vec::new();
            for n in names {
                let r = Reference::parse(n)?;
                let mut d = desc.clone();
                d.annotations
                    .insert(oci::ANNOTATION_IMAGE_NAME.into(), r.to_string());
                d.annotations.insert(
                    oci::ANNOTATION_REF_NAME.into(),
                    r.tag().unwrap_or("latest").to_string(),
                );
                index.manifests.push(d);
                familiar.push(r.familiar());
                if let Some(top) = rec.layers.last() {
                    repositories
                        .entry(r.familiar_repository())
                        .or_default()
                        .insert(
                            r.tag().unwrap_or("latest").to_string(),
                            top.digest()?.hex().to_string(),
                        );
                }
            }
            let cd = rec.config.digest()?;
            docker_manifest.push(DockerManifestEntry {
                config: format!("blobs/{}/{}", cd.algorithm(), cd.hex()),
                repo_tags: Some(familiar),
                layers: rec
                    .layers
                    .iter()
                    .map(|l| {
                        l.digest()
                            .map(|d| format!("blobs/{}/{}", d.algorithm(), d.hex()))
                    })
                    .collect::<Result<_>>()?,
            });
        }
        let mut small = |name: &str, data: &[u8]| -> Result<()> {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o444);
            h.set_mtime(MTIME);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, name, data).map_err(tar_err)
        };
        small("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        small(
            "index.json",
            &serde_json::to_vec(&index)
                .map_err(|e| Error::internal("encode index").with_source(e))?,
        )?;
        if format == Format::Docker {
            small(
                "manifest.json",
                &serde_json::to_vec(&docker_manifest)
                    .map_err(|e| Error::internal("encode manifest.json").with_source(e))?,
            )?;
            small(
                "repositories",
                &serde_json::to_vec(&repositories)
                    .map_err(|e| Error::internal("encode repositories").with_source(e))?,
            )?;
        }
        tar.into_inner()
            .map_err(tar_err)?
            .flush()
            .map_err(tar_err)?;
        Ok(())
    }

    /// Reads an archive into the content store and returns the images it holds (not yet
    /// recorded or unpacked). Blobs are kept by `lease`.
    pub fn import_archive(
        &self,
        reader: impl Read,
        lease: &str,
        platform: Option<&Platform>,
    ) -> Result<Vec<ImportedImage>> {
        let mut archive = tar::Archive::new(reader);
        let mut files: HashMap<String, (Digest, u64)> = HashMap::new();
        let mut small: HashMap<String, Vec<u8>> = HashMap::new();
        let entries = archive
            .entries()
            .map_err(|e| bad_archive("read archive", e))?;
        for (n, entry) in entries.enumerate() {
            let mut entry = entry.map_err(|e| bad_archive("read archive", e))?;
            if !matches!(
                entry.header().entry_type(),
                tar::EntryType::Regular | tar::EntryType::Continuous
            ) {
                continue;
            }
            let name = entry
                .path()
                .map_err(|e| bad_archive("archive entry name", e))?
                .to_string_lossy()
                .into_owned();
            let name = name.trim_start_matches("./").to_string();
            if matches!(
                name.as_str(),
                "manifest.json" | "index.json" | "repositories" | "oci-layout"
            ) {
                let mut buf = Vec::new();
                (&mut entry)
                    .take(MAX_CONFIG as u64 + 1)
                    .read_to_end(&mut buf)
                    .map_err(|e| bad_archive("read archive", e))?;
                if buf.len() > MAX_CONFIG {
                    return Err(Error::invalid_argument(format!(
                        "{name} in the archive is too large"
                    )));
                }
                small.insert(name, buf);
                continue;
            }
            let named: Option<Digest> = name
                .strip_prefix("blobs/")
                .and_then(|rest| rest.split_once('/'))
                .and_then(|(alg, hex)| format!("{alg}:{hex}").parse().ok());
            if let Some(d) = &named
                && self.content.exists(d)
            {
                self.lease_add(lease, &[d], &[])?;
                let size = self.content.info(d)?.size as u64;
                files.insert(name, (d.clone(), size));
                continue;
            }
            let mut w = self.content.writer(&format!(
                "import-{}-{}-{n}",
                crate::nonce(),
                self.next_id()
            ))?;
            w.restart()?;
            io::copy(&mut entry, &mut w).map_err(|e| bad_archive("read archive", e))?;
            let size = w.offset();
            let d = w.commit(None, named.as_ref()).map_err(|e| {
                Error::new(e.kind(), format!("archive member {name}")).with_source(e)
            })?;
            self.lease_add(lease, &[&d], &[])?;
            files.insert(name, (d, size));
        }
        let by_name = |n: &str| files.get(n.trim_start_matches("./")).cloned();
        let docker: Option<Vec<DockerManifestEntry>> = small
            .get("manifest.json")
            .map(|b| {
                serde_json::from_slice(b).map_err(|e| {
                    Error::invalid_argument("invalid manifest.json in the archive").with_source(e)
                })
            })
            .transpose()?;
        let mut out = Vec::new();
        if let Some(idx) = small.get("index.json") {
            // OCI layout (also inside Docker 25+ archives): keeps the original manifests.
            let index = oci::parse_index(idx)?;
            let want = platform.cloned().unwrap_or_else(|| self.platform.clone());
            let mut tags_by_config: HashMap<String, Vec<String>> = HashMap::new();
            for e in docker.iter().flatten() {
                if let Some((d, _)) = by_name(&e.config) {
                    tags_by_config
                        .entry(d.to_string())
                        .or_default()
                        .extend(normalize_tags(e.repo_tags.as_deref().unwrap_or_default())?);
                }
            }
            let mut stack: Vec<(Descriptor, Option<Descriptor>)> =
                index.manifests.iter().cloned().map(|d| (d, None)).collect();
            while let Some((desc, parent)) = stack.pop() {
                let d = desc.digest()?;
                let data = self
                    .content
                    .read_blob(&d, crate::registry::MAX_MANIFEST as u64)?;
                let mt = if desc.media_type.is_empty() {
                    oci::sniff_media_type(&data).unwrap_or_default()
                } else {
                    desc.media_type.clone()
                };
                match oci::manifest_kind(&mt) {
                    Some(ManifestKind::Index) => {
                        let child = oci::parse_index(&data)?;
                        let pick = crate::pull::select_platform(&child.manifests, &want)?;
                        let mut p = pick.clone();
                        p.annotations.extend(desc.annotations.clone());
                        stack.push((
                            p,
                            Some(Descriptor {
                                media_type: mt,
                                ..desc.clone()
                            }),
                        ));
                    }
                    Some(ManifestKind::Manifest) => {
                        let mut desc = desc.clone();
                        desc.media_type = mt;
                        let mut rec = self.record_from_manifest(&desc, &data)?;
                        rec.index = parent;
                        let mut tags = tags_by_config.get(&rec.id).cloned().unwrap_or_default();
                        if let Some(name) = desc.annotations.get(oci::ANNOTATION_IMAGE_NAME) {
                            tags.extend(normalize_tags(std::slice::from_ref(name))?);
                        } else if let Some(name) = desc.annotations.get(oci::ANNOTATION_REF_NAME) {
                            // A bare tag ("latest") names no repository; a full reference does.
                            if (name.contains('/') || name.contains(':'))
                                && let Ok(r) = Reference::parse(name)
                            {
                                tags.push(r.to_string());
                            }
                        }
                        tags.sort();
                        tags.dedup();
                        if let Some(e) = out
                            .iter_mut()
                            .find(|i: &&mut ImportedImage| i.record.id == rec.id)
                        {
                            e.tags.extend(tags);
                            e.tags.sort();
                            e.tags.dedup();
                        } else {
                            out.push(ImportedImage { record: rec, tags });
                        }
                    }
                    None => continue,
                }
            }
        } else if let Some(entries) = docker {
            for e in entries {
                let (cfg_d, cfg_size) = by_name(&e.config).ok_or_else(|| {
                    Error::invalid_argument(format!("archive lacks the config {}", e.config))
                })?;
                let mut layers = Vec::new();
                for l in &e.layers {
                    let (d, size) = by_name(l).ok_or_else(|| {
                        Error::invalid_argument(format!("archive lacks the layer {l}"))
                    })?;
                    let mut head = [0u8; 4];
                    let n = self.content.open_blob(&d)?.read(&mut head).unwrap_or(0);
                    let c = Compression::detect(&head[..n]);
                    layers.push(Descriptor {
                        media_type: c.docker_media_type().into(),
                        digest: d.to_string(),
                        size: size as i64,
                        ..Default::default()
                    });
                }
                let manifest = oci::Manifest {
                    schema_version: 2,
                    media_type: oci::DOCKER_MANIFEST.into(),
                    config: Descriptor {
                        media_type: oci::DOCKER_CONFIG.into(),
                        digest: cfg_d.to_string(),
                        size: cfg_size as i64,
                        ..Default::default()
                    },
                    layers,
                    annotations: BTreeMap::new(),
                };
                let data = serde_json::to_vec(&manifest)
                    .map_err(|e| Error::internal("encode manifest").with_source(e))?;
                let md = self.content.write_blob(&data, None)?;
                self.lease_add(lease, &[&md], &[])?;
                let desc = Descriptor::of(oci::DOCKER_MANIFEST, &data);
                let rec = self.record_from_manifest(&desc, &data)?;
                let tags = normalize_tags(e.repo_tags.as_deref().unwrap_or_default())?;
                out.push(ImportedImage { record: rec, tags });
            }
        } else {
            return Err(Error::invalid_argument(
                "not an image archive: it has neither manifest.json (docker-archive) nor index.json (OCI layout)",
            ));
        }
        out.reverse();
        Ok(out)
    }

    /// An image record for a manifest whose blobs are all in the store.
    pub(crate) fn record_from_manifest(
        &self,
        desc: &Descriptor,
        data: &[u8],
    ) -> Result<ImageRecord> {
        let m = oci::parse_manifest(data)?;
        let cfg_d = m.config.digest()?;
        let cfg = oci::ImageConfig::parse(&self.content.read_blob(&cfg_d, MAX_CONFIG as u64)?)?;
        let diff_ids = cfg.diff_ids();
        if diff_ids.len() != m.layers.len() {
            return Err(Error::invalid_argument(format!(
                "image {cfg_d}: the manifest has {} layers but the config {} diff ids",
                m.layers.len(),
                diff_ids.len()
            )));
        }
        for l in &m.layers {
            let d = l.digest()?;
            if !self.content.exists(&d) {
                return Err(Error::invalid_argument(format!(
                    "archive lacks the layer blob {d}"
                )));
            }
            if Compression::from_media_type(&l.media_type).is_none() {
                return Err(Error::invalid_argument(format!(
                    "layer {d}: unsupported media type {:?}",
                    l.media_type
                )));
            }
        }
        let chains = oci::chain_ids(&diff_ids);
        let content_size = desc.size + m.config.size + m.layers.iter().map(|l| l.size).sum::<i64>();
        Ok(ImageRecord {
            id: cfg_d.to_string(),
            target: Descriptor {
                platform: None,
                annotations: BTreeMap::new(),
                ..desc.clone()
            },
            config: m.config.clone(),
            layers: m.layers.clone(),
            diff_ids: diff_ids.iter().map(|d| d.to_string()).collect(),
            chain_id: chains.last().map(|c| c.to_string()).unwrap_or_default(),
            size: diff_ids
                .iter()
                .zip(&m.layers)
                .map(|(d, l)| self.layer_size(d, l.size))
                .sum(),
            content_size,
            platform: cfg.platform(),
            ..Default::default()
        })
    }
}

fn normalize_tags(tags: &[String]) -> Result<Vec<String>> {
    tags.iter()
        .map(|t| {
            Reference::parse(t).map(|r| r.to_string()).map_err(|e| {
                Error::invalid_argument(format!("invalid tag {t:?} in the archive")).with_source(e)
            })
        })
        .collect()
}

fn bad_archive(what: &str, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof
        || e.kind() == io::ErrorKind::Other
        || e.kind() == io::ErrorKind::InvalidData
    {
        Error::invalid_argument(format!("{what}: not a valid tar archive")).with_source(e)
    } else {
        Error::internal(what.to_string()).with_source(e)
    }
}

/// A blocking reader over chunks that arrive on a channel (a gRPC client stream).
#[derive(Debug)]
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::result::Result<bytes::Bytes, io::Error>>,
    cur: bytes::Bytes,
}

impl ChannelReader {
    /// A reader and the sender that feeds it.
    pub fn new() -> (
        tokio::sync::mpsc::Sender<std::result::Result<bytes::Bytes, io::Error>>,
        Self,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        (
            tx,
            Self {
                rx,
                cur: bytes::Bytes::new(),
            },
        )
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        bytes::Buf::advance(&mut self.cur, n);
        Ok(n)
    }
}

/// A blocking writer that sends what is written as chunks on a channel (a gRPC server stream).
#[derive(Debug)]
pub struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    pub fn new(tx: tokio::sync::mpsc::Sender<bytes::Bytes>) -> Self {
        Self {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }
}

const CHUNK: usize = 256 * 1024;

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = bytes::Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "receiver gone"))
    }
}

/// Options of an archive import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    pub platform: Option<Platform>,
    pub snapshotter: String,
    pub skip_unpack: bool,
}

impl Images {
    /// `docker load`: reads an archive, records its images, unpacks them.
    pub async fn import(
        self: &std::sync::Arc<Self>,
        reader: ChannelReader,
        opts: ImportOptions,
    ) -> Result<Vec<(String, Vec<String>)>> {
        let _op = self.gc_lock.read().await;
        let lease = self.lease()?;
        let me = self.clone();
        let lid = lease.id.clone();
        let platform = opts.platform.clone();
        let images =
            crate::pull::blocking(move || me.import_archive(reader, &lid, platform.as_ref()))
                .await?;
        let sn_name = self.snapshotter_name(&opts.snapshotter);
        let mut out = Vec::new();
        for mut img in images {
            if !opts.skip_unpack {
                self.unpack_local(&img.record, &sn_name, &lease.id).await?;
                img.record.unpacked_in.insert(sn_name.clone());
                let diff_ids: Vec<Digest> = img
                    .record
                    .diff_ids
                    .iter()
                    .filter_map(|d| d.parse().ok())
                    .collect();
                img.record.size = diff_ids
                    .iter()
                    .zip(&img.record.layers)
                    .map(|(d, l)| self.layer_size(d, l.size))
                    .sum();
            }
            let id = img.record.id.clone();
            self.commit_image(img.record, &img.tags)?;
            tracing::info!(image = %id, tags = ?img.tags, "imported");
            out.push((id, img.tags));
        }
        Ok(out)
    }
}
