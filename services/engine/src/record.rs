//! A container's record: the public view (the wire `Container`, which already carries config,
//! host config, state, mounts, network settings and the front ends' extension blobs) plus the
//! engine's private bookkeeping.
//!
//! Encoding: `b"BRC"`, a format version byte, the length-prefixed protobuf of the public part,
//! then the private part as JSON. Protobuf keeps the public part forward compatible as the API
//! grows; the private part is small and engine-internal.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::prost::Message;
use serde::{Deserialize, Serialize};

use crate::restart::{Policy, RestartState};

const MAGIC: &[u8; 3] = b"BRC";
const VERSION: u8 = 1;

/// What the engine keeps about a container besides its public view.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Private {
    /// berth namespace (`berth-namespace` of the create call).
    pub namespace: String,
    /// Host pid of the current task's init (0 when none); exits of other pids are stale.
    pub task_pid: u32,
    /// The shim's bundle and socket exist (a task was created and not yet cleaned up).
    pub has_task: bool,
    /// Network namespace bind mount owned by this container, while it exists.
    pub netns: Option<PathBuf>,
    /// Networks attached in the kernel (to detach on exit).
    pub attached: bool,
    /// Restart manager state.
    pub restart: RestartState,
    /// Anonymous volumes created for this container (removed with `remove_volumes`).
    pub anonymous_volumes: Vec<String>,
    /// The user config as given at create (protobuf), before merging with the image.
    pub user_config: Vec<u8>,
    /// Fingerprint of the user namespace map its rootfs was made for (`""`: none): a start
    /// under another map is refused.
    pub id_map: String,
}

/// A container record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// What Get/List return.
    pub c: pb::Container,
    /// Engine bookkeeping.
    pub p: Private,
}

impl Record {
    /// Serializes the record.
    pub fn encode(&self) -> Vec<u8> {
        let public = self.c.encode_to_vec();
        let private = serde_json::to_vec(&self.p).expect("private record serializes");
        let mut out = Vec::with_capacity(8 + public.len() + private.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(public.len() as u32).to_le_bytes());
        out.extend_from_slice(&public);
        out.extend_from_slice(&private);
        out
    }

    /// Parses a record written by [`Self::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let corrupt = |why: &str| Error::internal(format!("corrupt container record: {why}"));
        if bytes.len() < 8 || &bytes[..3] != MAGIC {
            return Err(corrupt("bad header"));
        }
        if bytes[3] != VERSION {
            return Err(corrupt(&format!("unknown version {}", bytes[3])));
        }
        let len = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
        let public = bytes.get(8..8 + len).ok_or_else(|| corrupt("truncated"))?;
        let c = pb::Container::decode(public).map_err(|e| corrupt("public part").with_source(e))?;
        let p = serde_json::from_slice(&bytes[8 + len..])
            .map_err(|e| corrupt("private part").with_source(e))?;
        Ok(Self { c, p })
    }

    /// The container id.
    pub fn id(&self) -> &str {
        &self.c.id
    }

    /// The state (always present on records the engine wrote).
    pub fn state(&self) -> &pb::ContainerState {
        self.c.state.as_ref().expect("records carry a state")
    }

    /// The state, mutably.
    pub fn state_mut(&mut self) -> &mut pb::ContainerState {
        self.c.state.get_or_insert_with(Default::default)
    }

    /// The status.
    pub fn status(&self) -> pb::ContainerStatus {
        self.state().status()
    }

    /// Running or paused: a task exists and its init has not exited.
    pub fn is_running(&self) -> bool {
        matches!(
            self.status(),
            pb::ContainerStatus::Running | pb::ContainerStatus::Paused
        )
    }

    /// The host config (empty when none was given).
    pub fn host_config(&self) -> &pb::HostConfig {
        static EMPTY: std::sync::OnceLock<pb::HostConfig> = std::sync::OnceLock::new();
        self.c
            .host_config
            .as_ref()
            .unwrap_or_else(|| EMPTY.get_or_init(Default::default))
    }

    /// The restart policy.
    pub fn restart_policy(&self) -> Policy {
        Policy::from_proto(self.host_config().restart_policy.as_ref()).unwrap_or_default()
    }

    /// The merged config.
    pub fn config(&self) -> &pb::ContainerConfig {
        static EMPTY: std::sync::OnceLock<pb::ContainerConfig> = std::sync::OnceLock::new();
        self.c
            .config
            .as_ref()
            .unwrap_or_else(|| EMPTY.get_or_init(Default::default))
    }

    /// How long the last run lasted (zero when unknown).
    pub fn ran_for(&self) -> Duration {
        let st = self.state();
        match (&st.started_at, &st.finished_at) {
            (Some(a), Some(b)) => {
                let a = SystemTime::try_from(*a).unwrap_or(SystemTime::UNIX_EPOCH);
                let b = SystemTime::try_from(*b).unwrap_or(SystemTime::UNIX_EPOCH);
                b.duration_since(a).unwrap_or_default()
            }
            _ => Duration::ZERO,
        }
    }

    /// Labels of the container (merged config).
    pub fn labels(&self) -> &std::collections::HashMap<String, String> {
        &self.config().labels
    }

    /// Docker's event attributes of this container: name, image, its labels, and the pod
    /// sandbox it belongs to (`sandboxID`), if any.
    pub fn event_attributes(&self) -> Vec<(String, String)> {
        let mut attrs: Vec<(String, String)> = self
            .labels()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        attrs.push(("name".into(), self.c.name.clone()));
        attrs.push(("image".into(), self.c.image.clone()));
        let sandbox = &self.host_config().sandbox_id;
        if !sandbox.is_empty() {
            // The CRI's container events name the pod sandbox.
            attrs.push(("sandboxID".into(), sandbox.clone()));
        }
        attrs
    }
}

/// Docker's status word for a status.
pub fn status_name(s: pb::ContainerStatus) -> &'static str {
    match s {
        pb::ContainerStatus::Unspecified => "unknown",
        pb::ContainerStatus::Created => "created",
        pb::ContainerStatus::Running => "running",
        pb::ContainerStatus::Paused => "paused",
        pb::ContainerStatus::Restarting => "restarting",
        pb::ContainerStatus::Removing => "removing",
        pb::ContainerStatus::Exited => "exited",
        pb::ContainerStatus::Dead => "dead",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::berth::types::v1 as types;

    fn record() -> Record {
        Record {
            c: pb::Container {
                id: "a".repeat(64),
                name: "web".into(),
                image: "busybox".into(),
                state: Some(pb::ContainerState {
                    status: pb::ContainerStatus::Running.into(),
                    pid: 42,
                    ..Default::default()
                }),
                extensions: [(
                    "docker".to_string(),
                    types::Extension {
                        version: 3,
                        data: b"{\"x\":1}".to_vec(),
                    },
                )]
                .into(),
                ..Default::default()
            },
            p: Private {
                namespace: "default".into(),
                task_pid: 42,
                has_task: true,
                netns: Some("/run/berth/netns/a".into()),
                anonymous_volumes: vec!["v".into()],
                ..Default::default()
            },
        }
    }

    #[test]
    fn round_trip_keeps_extensions_and_private_state() {
        let r = record();
        let back = Record::decode(&r.encode()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.c.extensions["docker"].version, 3);
        assert!(back.is_running());
    }

    #[test]
    fn corrupt_records_are_errors() {
        assert!(Record::decode(b"").is_err());
        assert!(Record::decode(b"XXX\x01\0\0\0\0").is_err());
        let mut bytes = record().encode();
        bytes[3] = 9;
        assert!(
            Record::decode(&bytes)
                .unwrap_err()
                .message()
                .contains("version")
        );
        let bytes = record().encode();
        assert!(Record::decode(&bytes[..20]).is_err());
    }

    #[test]
    fn private_part_tolerates_missing_fields() {
        let mut bytes = record().encode();
        let len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
        bytes.truncate(8 + len);
        bytes.extend_from_slice(b"{\"namespace\":\"x\"}");
        let r = Record::decode(&bytes).unwrap();
        assert_eq!(r.p.namespace, "x");
        assert_eq!(r.p.task_pid, 0);
    }
}
