//! Step containers of builds that a gateway crash cut short.
//!
//! A build lives in the gateway process: if the gateway dies mid-build (`kill -9`), the step's
//! container stays behind, running or created. Every step container carries the
//! [`STEP_EXTENSION`] extension naming the gateway process that made it and whether the build
//! removes its containers (`rm`). A gateway, once up, removes the step containers of earlier
//! gateway processes that the build would have removed: all of them but a failed step's (exited
//! non-zero), which Docker keeps for inspection as a finished build does.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use berth_core::Result;
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::types::v1 as types;
use serde::{Deserialize, Serialize};

use crate::backend::Backends;

/// The engine extension that marks a build's step container.
pub const STEP_EXTENSION: &str = "berth.build.step";

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct StepMark {
    /// The gateway process that runs the build.
    gateway: String,
    /// The build removes its step containers (`rm` or `forcerm`).
    rm: bool,
}

/// This gateway process: its pid and start time, unique across restarts.
fn instance() -> &'static str {
    static INSTANCE: OnceLock<String> = OnceLock::new();
    INSTANCE.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        format!("{}-{nanos}", std::process::id())
    })
}

/// The extensions of a step container made by this gateway.
pub fn step_extensions(rm: bool) -> HashMap<String, types::Extension> {
    let mark = StepMark {
        gateway: instance().to_string(),
        rm,
    };
    let data = serde_json::to_vec(&mark).unwrap_or_default();
    HashMap::from([(
        STEP_EXTENSION.to_string(),
        types::Extension { version: 1, data },
    )])
}

/// Whether a step container should go: made by another gateway process, by a build that
/// removes its containers, and not a failed step's.
fn orphaned(c: &engine::Container) -> bool {
    let Some(ext) = c.extensions.get(STEP_EXTENSION) else {
        return false;
    };
    let Ok(mark) = serde_json::from_slice::<StepMark>(&ext.data) else {
        return false;
    };
    if mark.gateway == instance() || !mark.rm {
        return false;
    }
    let state = c.state.clone().unwrap_or_default();
    !(state.status() == engine::ContainerStatus::Exited && state.exit_code != 0)
}

/// Removes the step containers earlier gateway processes left (see the module docs).
pub async fn remove_orphans(backends: &Backends) -> Result<usize> {
    let req = engine::ListContainersRequest {
        all: true,
        filters: vec![types::Filter {
            key: "berth.extension".into(),
            value: STEP_EXTENSION.into(),
        }],
        ..Default::default()
    };
    let mut removed = 0;
    for summary in backends.containers.list(req).await? {
        let get = engine::GetContainerRequest {
            id: summary.id.clone(),
            ..Default::default()
        };
        let Ok(c) = backends.containers.get(get).await else {
            continue;
        };
        if !orphaned(&c) {
            continue;
        }
        let del = engine::DeleteContainerRequest {
            id: c.id.clone(),
            force: true,
            remove_volumes: true,
            ..Default::default()
        };
        match backends.containers.delete(del).await {
            Ok(()) => {
                tracing::info!(container = %c.id, "removed the step container of an interrupted build");
                removed += 1;
            }
            Err(e) => {
                tracing::warn!(container = %c.id, error = %e.chain(), "remove an interrupted build's step container")
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(mark: &StepMark, status: engine::ContainerStatus, code: i32) -> engine::Container {
        let mut state = engine::ContainerState {
            exit_code: code,
            ..Default::default()
        };
        state.set_status(status);
        engine::Container {
            extensions: HashMap::from([(
                STEP_EXTENSION.to_string(),
                types::Extension {
                    version: 1,
                    data: serde_json::to_vec(mark).unwrap(),
                },
            )]),
            state: Some(state),
            ..Default::default()
        }
    }

    #[test]
    fn only_another_gateways_removable_steps_are_orphans() {
        use engine::ContainerStatus::{Created, Exited, Running};
        let other = |rm| StepMark {
            gateway: "1-2".into(),
            rm,
        };
        let mine = StepMark {
            gateway: instance().into(),
            rm: true,
        };
        assert!(orphaned(&container(&other(true), Running, 0)));
        assert!(orphaned(&container(&other(true), Created, 0)));
        assert!(orphaned(&container(&other(true), Exited, 0)));
        // A failed step is kept for inspection; `--rm=false` keeps everything.
        assert!(!orphaned(&container(&other(true), Exited, 1)));
        assert!(!orphaned(&container(&other(false), Running, 0)));
        // This gateway's own builds are running.
        assert!(!orphaned(&container(&mine, Running, 0)));
        assert!(!orphaned(&engine::Container::default()));
    }
}
