//! Conversions between the wire types of `berth.images.v1` and the domain types.

use berth_core::Result;
use berth_proto::berth::images::v1 as pb;
use berth_proto::berth::types::v1 as types;

use crate::meta::ImageRecord;
use crate::oci::{self, Descriptor, Platform};
use crate::pull::{Phase, PullEvent};
use crate::push::{PushEvent, PushPhase};
use crate::registry::Credentials;
use crate::service::{DeleteItem, Images};

impl From<&Platform> for types::Platform {
    fn from(p: &Platform) -> Self {
        Self {
            os: p.os.clone(),
            architecture: p.architecture.clone(),
            variant: p.variant.clone(),
            os_version: p.os_version.clone(),
            os_features: p.os_features.clone(),
        }
    }
}

/// A requested platform: fields left empty take the host's (the configured default).
pub fn platform(p: Option<types::Platform>, default: &Platform) -> Option<Platform> {
    let p = p?;
    if p.os.is_empty() && p.architecture.is_empty() && p.variant.is_empty() {
        return None;
    }
    Some(
        Platform {
            os: if p.os.is_empty() {
                default.os.clone()
            } else {
                p.os
            },
            architecture: if p.architecture.is_empty() {
                default.architecture.clone()
            } else {
                p.architecture
            },
            variant: p.variant,
            os_version: p.os_version,
            os_features: p.os_features,
        }
        .normalized(),
    )
}

impl From<Option<types::RegistryAuth>> for Credentials {
    fn from(a: Option<types::RegistryAuth>) -> Self {
        let a = a.unwrap_or_default();
        Self {
            username: a.username,
            password: a.password,
            identity_token: a.identity_token,
            registry_token: a.registry_token,
        }
    }
}

impl From<&Descriptor> for types::Descriptor {
    fn from(d: &Descriptor) -> Self {
        Self {
            media_type: d.media_type.clone(),
            digest: d.digest.clone(),
            size: d.size,
            annotations: d.annotations.clone().into_iter().collect(),
            platform: d.platform.as_ref().map(Into::into),
            urls: d.urls.clone(),
        }
    }
}

impl From<PullEvent> for pb::PullResponse {
    fn from(e: PullEvent) -> Self {
        use pb::pull_response::Event;
        let event = match e {
            PullEvent::Started {
                repository,
                name,
                tag_or_digest,
            } => Event::Started(pb::PullStarted {
                repository,
                name,
                tag_or_digest,
            }),
            PullEvent::Layer {
                digest,
                phase,
                current,
                total,
                retry_in,
            } => Event::Layer(pb::PullLayerProgress {
                digest,
                phase: pull_phase(phase) as i32,
                current,
                total,
                retry_in_seconds: retry_in,
            }),
        };
        Self { event: Some(event) }
    }
}

fn pull_phase(p: Phase) -> pb::PullLayerPhase {
    use pb::PullLayerPhase as W;
    match p {
        Phase::PullingFsLayer => W::PullingFsLayer,
        Phase::Waiting => W::Waiting,
        Phase::Downloading => W::Downloading,
        Phase::VerifyingChecksum => W::VerifyingChecksum,
        Phase::DownloadComplete => W::DownloadComplete,
        Phase::Extracting => W::Extracting,
        Phase::PullComplete => W::PullComplete,
        Phase::AlreadyExists => W::AlreadyExists,
        Phase::Retrying => W::Retrying,
    }
}

impl From<PushEvent> for pb::PushResponse {
    fn from(e: PushEvent) -> Self {
        use pb::push_response::Event;
        let event = match e {
            PushEvent::Started { name } => Event::Started(pb::PushStarted { name }),
            PushEvent::Layer {
                digest,
                diff_id,
                phase,
                current,
                total,
                mounted_from,
                retry_in,
            } => {
                use pb::PushLayerPhase as W;
                let phase = match phase {
                    PushPhase::Preparing => W::Preparing,
                    PushPhase::Waiting => W::Waiting,
                    PushPhase::Pushing => W::Pushing,
                    PushPhase::Pushed => W::Pushed,
                    PushPhase::AlreadyExists => W::AlreadyExists,
                    PushPhase::Mounted => W::Mounted,
                    PushPhase::Retrying => W::Retrying,
                };
                Event::Layer(pb::PushLayerProgress {
                    digest,
                    diff_id,
                    phase: phase as i32,
                    current,
                    total,
                    mounted_from,
                    retry_in_seconds: retry_in,
                })
            }
            PushEvent::TagDone { tag, digest, size } => {
                Event::TagDone(pb::PushTagDone { tag, digest, size })
            }
        };
        Self { event: Some(event) }
    }
}

impl From<DeleteItem> for pb::ImageDeleteItem {
    fn from(i: DeleteItem) -> Self {
        use pb::image_delete_item::Item;
        Self {
            item: Some(match i {
                DeleteItem::Untagged(s) => Item::Untagged(s),
                DeleteItem::Deleted(s) => Item::Deleted(s),
            }),
        }
    }
}

fn ts(s: Option<&str>) -> Option<prost_types::Timestamp> {
    s.and_then(crate::time::parse_rfc3339)
        .map(crate::time::to_timestamp)
}

impl Images {
    /// The wire form of an image record.
    pub fn to_pb(&self, rec: &ImageRecord) -> Result<pb::Image> {
        let config = self.config_of(rec)?;
        let cfg = oci::ImageConfig::parse(&config)?;
        let mut layers = rec.diff_ids.iter();
        let history = cfg
            .history
            .iter()
            .map(|h| {
                let (diff_id, size) = if h.empty_layer {
                    (String::new(), 0)
                } else {
                    match layers.next() {
                        Some(d) => {
                            let size = self
                                .meta
                                .layer(d)
                                .ok()
                                .flatten()
                                .map(|l| l.size)
                                .unwrap_or(0);
                            (d.clone(), size)
                        }
                        None => (String::new(), 0),
                    }
                };
                pb::HistoryEntry {
                    created: ts(h.created.as_deref()),
                    created_by: h.created_by.clone().unwrap_or_default(),
                    author: h.author.clone().unwrap_or_default(),
                    comment: h.comment.clone().unwrap_or_default(),
                    empty_layer: h.empty_layer,
                    size,
                    diff_id,
                }
            })
            .collect();
        let users = self.users_of(&rec.id)?.len() as i64;
        Ok(pb::Image {
            id: rec.id.clone(),
            repo_tags: self.tags_of(&rec.id)?,
            repo_digests: rec.repo_digests.clone(),
            created: ts(cfg.created.as_deref()),
            size: rec.size,
            content_size: rec.content_size,
            labels: cfg.labels().into_iter().collect(),
            config,
            history,
            diff_ids: rec.diff_ids.clone(),
            chain_id: rec.chain_id.clone(),
            os: cfg.os.clone(),
            architecture: cfg.architecture.clone(),
            variant: cfg.variant.clone().unwrap_or_default(),
            os_version: cfg.os_version.clone().unwrap_or_default(),
            author: cfg.author.clone().unwrap_or_default(),
            // Docker shows the last history entry's comment when the config has none (that
            // is where commit and import record theirs).
            comment: cfg
                .comment
                .clone()
                .filter(|c| !c.is_empty())
                .or_else(|| cfg.history.last().and_then(|h| h.comment.clone()))
                .unwrap_or_default(),
            docker_version: cfg.docker_version.clone().unwrap_or_default(),
            target: Some((&rec.target).into()),
            index: rec.index.as_ref().map(Into::into),
            unpacked_in: rec.unpacked_in.iter().cloned().collect(),
            users,
            last_tag_time: (rec.last_tag_nanos > 0)
                .then(|| crate::time::to_timestamp(crate::time::from_nanos(rec.last_tag_nanos))),
            parent: if rec.parent.is_empty() {
                cfg.parent.clone().unwrap_or_default()
            } else {
                rec.parent.clone()
            },
        })
    }
}
