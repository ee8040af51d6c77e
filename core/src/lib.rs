//! berth-core: what every berth process shares and nothing more — the error type and its
//! mappings, validated ids and image references, typed config and the daemon.json mapping,
//! telemetry, Unix-socket gRPC helpers and the daemon `main` harness. No daemon logic lives here.

pub mod caps;
pub mod cgroup;
pub mod config;
pub mod daemon;
pub mod daemon_json;
pub mod deadline;
pub mod duration;
pub mod error;
pub mod grpc;
pub mod id;
pub mod memory;
pub mod metrics;
pub mod mount;
pub mod procfs;
pub mod reference;
pub mod rootless;
pub mod snapshots;
pub mod telemetry;
pub mod uds;
pub mod userns;
pub mod vm;

pub use config::{Config, Service};
pub use error::{Context, Error, ErrorKind, Result};
pub use id::{Digest, Id};
pub use reference::Reference;
