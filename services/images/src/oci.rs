//! The OCI / Docker image formats berth reads and writes: manifests, indexes (manifest lists),
//! image configs, media types, platforms and chain ids.
//!
//! The structs are deliberately tolerant (unknown fields are ignored, most fields optional):
//! images in the wild carry all sorts of extras, and the bytes berth stores and serves are always
//! the original blobs, never these structs re-serialised.

use std::collections::BTreeMap;

use berth_core::{Digest, Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const OCI_LAYER_ND_GZIP: &str = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_MANIFEST_V1_SIGNED: &str =
    "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_LAYER_FOREIGN: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";

/// The annotation OCI layouts name their images with (a tag or a full reference).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation containerd puts the full image name in.
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";

/// What a manifest-ish blob is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    Index,
    Manifest,
}

/// Classifies a manifest media type; `None` for anything berth cannot pull.
pub fn manifest_kind(media_type: &str) -> Option<ManifestKind> {
    match media_type {
        OCI_INDEX | DOCKER_LIST => Some(ManifestKind::Index),
        OCI_MANIFEST | DOCKER_MANIFEST => Some(ManifestKind::Manifest),
        _ => None,
    }
}

/// The Accept header for manifest requests, most wanted first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json;q=0.9";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From a layer media type; `None` when the type is not a layer berth can unpack.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        match media_type {
            OCI_LAYER
            | DOCKER_LAYER
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Self::None),
            OCI_LAYER_GZIP | DOCKER_LAYER_GZIP | DOCKER_LAYER_FOREIGN | OCI_LAYER_ND_GZIP => {
                Some(Self::Gzip)
            }
            OCI_LAYER_ZSTD | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Self::Zstd)
            }
            _ => None,
        }
    }

    /// From the first bytes of a stream.
    pub fn detect(head: &[u8]) -> Self {
        if head.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else {
            Self::None
        }
    }

    /// The OCI layer media type for this compression.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Self::None => OCI_LAYER,
            Self::Gzip => OCI_LAYER_GZIP,
            Self::Zstd => OCI_LAYER_ZSTD,
        }
    }

    /// The Docker schema 2 layer media type (zstd has none; OCI's is used).
    pub fn docker_media_type(self) -> &'static str {
        match self {
            Self::None => DOCKER_LAYER,
            Self::Gzip => DOCKER_LAYER_GZIP,
            Self::Zstd => OCI_LAYER_ZSTD,
        }
    }

    /// Wraps `r` in the matching decompressor.
    pub fn reader<'a, R: std::io::Read + 'a>(self, r: R) -> Result<Box<dyn std::io::Read + 'a>> {
        Ok(match self {
            Self::None => Box::new(r),
            Self::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
            Self::Zstd => Box::new(
                zstd::stream::read::Decoder::new(r)
                    .map_err(|e| Error::internal("start zstd decoder").with_source(e))?,
            ),
        })
    }
}

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

impl Descriptor {
    /// The digest, validated.
    pub fn digest(&self) -> Result<Digest> {
        self.digest.parse::<Digest>().map_err(|e| {
            Error::invalid_argument(format!(
                "descriptor has an invalid digest {:?}",
                self.digest
            ))
            .with_source(e)
        })
    }

    /// A descriptor of `data`.
    pub fn of(media_type: &str, data: &[u8]) -> Self {
        Self {
            media_type: media_type.into(),
            digest: Digest::sha256_of(data).to_string(),
            size: data.len() as i64,
            ..Default::default()
        }
    }
}

/// An OCI platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub os_version: String,
    #[serde(rename = "os.features", default, skip_serializing_if = "Vec::is_empty")]
    pub os_features: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub variant: String,
}

impl Platform {
    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() < 2 || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(Error::invalid_argument(format!(
                "invalid platform {s:?}: want os/arch[/variant]"
            )));
        }
        Ok(Self {
            os: parts[0].to_lowercase(),
            architecture: parts[1].to_lowercase(),
            variant: parts.get(2).map(|v| v.to_lowercase()).unwrap_or_default(),
            ..Default::default()
        }
        .normalized())
    }

    /// containerd's normalisation: `x86_64` → `amd64`, `aarch64` → `arm64` (variant `v8` is the
    /// default and dropped), `arm` defaults to `v7`.
    pub fn normalized(mut self) -> Self {
        self.os = self.os.to_lowercase();
        self.architecture = match self.architecture.to_lowercase().as_str() {
            "x86_64" | "x86-64" => "amd64".into(),
            "aarch64" => "arm64".into(),
            "armhf" => {
                self.variant = "v7".into();
                "arm".into()
            }
            "armel" => {
                self.variant = "v6".into();
                "arm".into()
            }
            "i386" => "386".into(),
            other => other.to_string(),
        };
        if self.architecture == "arm64" && self.variant == "v8" {
            self.variant.clear();
        }
        if self.architecture == "arm" && self.variant.is_empty() {
            self.variant = "v7".into();
        }
        if self.architecture == "amd64" && self.variant == "v1" {
            self.variant.clear();
        }
        self
    }

    /// Whether an index entry for `other` can run where `self` is wanted.
    pub fn matches(&self, other: &Platform) -> bool {
        let other = other.clone().normalized();
        let want = self.clone().normalized();
        want.os == other.os
            && want.architecture == other.architecture
            && (want.variant.is_empty() || want.variant == other.variant)
    }

    /// `os/arch[/variant]`.
    pub fn display(&self) -> String {
        if self.variant.is_empty() {
            format!("{}/{}", self.os, self.architecture)
        } else {
            format!("{}/{}/{}", self.os, self.architecture, self.variant)
        }
    }
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image index / manifest list.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The parts of an image config berth uses.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct ImageConfig {
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub author: Option<String>,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(rename = "os.version", default)]
    pub os_version: Option<String>,
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub config: Option<ContainerConfig>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
    #[serde(default)]
    pub history: Vec<History>,
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(default)]
    pub docker_version: Option<String>,
    #[serde(default)]
    pub parent: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct ContainerConfig {
    #[serde(rename = "Labels", default)]
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct RootFs {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct History {
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub created_by: Option<String>,
    #[serde(default)]
    pub author: Option<String>,
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(default)]
    pub empty_layer: bool,
}

impl ImageConfig {
    /// Parses a config blob and checks that it has diff ids.
    pub fn parse(data: &[u8]) -> Result<Self> {
        let cfg: Self = serde_json::from_slice(data)
            .map_err(|e| Error::invalid_argument("invalid image config").with_source(e))?;
        for d in cfg.diff_ids_raw() {
            d.parse::<Digest>().map_err(|e| {
                Error::invalid_argument("invalid diff id in image config").with_source(e)
            })?;
        }
        Ok(cfg)
    }

    fn diff_ids_raw(&self) -> &[String] {
        self.rootfs
            .as_ref()
            .map(|r| r.diff_ids.as_slice())
            .unwrap_or_default()
    }

    /// The layers' diff ids, bottom first.
    pub fn diff_ids(&self) -> Vec<Digest> {
        self.diff_ids_raw()
            .iter()
            .filter_map(|d| d.parse().ok())
            .collect()
    }

    /// The config's labels.
    pub fn labels(&self) -> BTreeMap<String, String> {
        self.config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default()
    }

    /// The config's platform.
    pub fn platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone().unwrap_or_default(),
            os_version: self.os_version.clone().unwrap_or_default(),
            os_features: Vec::new(),
        }
    }
}

/// Parses a manifest and checks what unpacking relies on.
pub fn parse_manifest(data: &[u8]) -> Result<Manifest> {
    let m: Manifest = serde_json::from_slice(data)
        .map_err(|e| Error::invalid_argument("invalid image manifest").with_source(e))?;
    if m.schema_version != 2 {
        return Err(Error::invalid_argument(format!(
            "unsupported manifest schema version {}",
            m.schema_version
        )));
    }
    m.config.digest()?;
    for l in &m.layers {
        l.digest()?;
        if l.size < 0 {
            return Err(Error::invalid_argument(
                "layer descriptor with a negative size",
            ));
        }
    }
    Ok(m)
}

/// Parses an index / manifest list.
pub fn parse_index(data: &[u8]) -> Result<Index> {
    let i: Index = serde_json::from_slice(data)
        .map_err(|e| Error::invalid_argument("invalid image index").with_source(e))?;
    for m in &i.manifests {
        m.digest()?;
    }
    Ok(i)
}

/// Guesses the media type of a manifest-ish blob that came without one (OCI layouts and
/// registries that answer `application/json`).
pub fn sniff_media_type(data: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        schema_version: Option<i64>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        config: Option<serde_json::Value>,
        #[serde(default)]
        fs_layers: Option<serde_json::Value>,
    }
    let p: Probe = serde_json::from_slice(data).ok()?;
    if let Some(mt) = p.media_type.filter(|m| !m.is_empty()) {
        return Some(mt);
    }
    if p.schema_version == Some(1) || p.fs_layers.is_some() {
        return Some(DOCKER_MANIFEST_V1.into());
    }
    if p.manifests.is_some() {
        return Some(OCI_INDEX.into());
    }
    if p.config.is_some() {
        return Some(OCI_MANIFEST.into());
    }
    None
}

/// Chain ids of a list of diff ids: `chain[0] = diff[0]`,
/// `chain[i] = sha256(chain[i-1] + " " + diff[i])`.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => {
                let mut h = Sha256::new();
                h.update(prev.as_str().as_bytes());
                h.update(b" ");
                h.update(d.as_str().as_bytes());
                Digest::from_sha256_bytes(&h.finalize())
            }
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_spec() {
        let a: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let b: Digest = format!("sha256:{}", "b".repeat(64)).parse().unwrap();
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        let want = Digest::sha256_of(format!("{a} {b}").as_bytes());
        assert_eq!(c[1], want);
    }

    #[test]
    fn platforms() {
        let want = Platform::parse("linux/amd64").unwrap();
        let p = |os: &str, arch: &str, v: &str| Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: v.into(),
            ..Default::default()
        };
        assert!(want.matches(&p("linux", "amd64", "")));
        assert!(want.matches(&p("linux", "x86_64", "")));
        assert!(!want.matches(&p("linux", "arm64", "")));
        assert!(!want.matches(&p("windows", "amd64", "")));
        let arm = Platform::parse("linux/arm64/v8").unwrap();
        assert!(arm.matches(&p("linux", "arm64", "v8")));
        assert!(arm.matches(&p("linux", "aarch64", "")));
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux/amd64/v2/x").is_err());
    }

    #[test]
    fn manifests_are_checked() {
        let good = br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","size":1},"layers":[]}"#;
        assert!(parse_manifest(good).is_ok());
        let bad =
            br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:zz","size":1}}"#;
        assert!(parse_manifest(bad).is_err());
        assert!(parse_manifest(b"not json").is_err());
        assert_eq!(sniff_media_type(good).as_deref(), Some(OCI_MANIFEST));
        assert_eq!(
            sniff_media_type(br#"{"manifests":[]}"#).as_deref(),
            Some(OCI_INDEX)
        );
    }

    #[test]
    fn compression_detection() {
        assert_eq!(Compression::detect(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(
            Compression::detect(&[0x28, 0xb5, 0x2f, 0xfd]),
            Compression::Zstd
        );
        assert_eq!(Compression::detect(b"usr/"), Compression::None);
        assert_eq!(
            Compression::from_media_type(DOCKER_LAYER_GZIP),
            Some(Compression::Gzip)
        );
        assert_eq!(Compression::from_media_type("text/plain"), None);
    }
}
