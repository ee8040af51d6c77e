//! berth's internal APIs, generated from the `.proto` files under `proto/`.
//!
//! Generated code only: conversions into domain types live with the services that own them.
#![allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    unused_qualifications,
    missing_debug_implementations
)]

pub use prost;
pub use prost_types;
pub use tonic;

include!(concat!(env!("OUT_DIR"), "/_includes.rs"));

/// The Kubernetes Container Runtime Interface (k8s.io/cri-api v0.32, vendored under
/// `proto/cri/`): `cri::runtime::v1::{runtime_service_server, image_service_server, …}`.
pub mod cri {
    pub use crate::runtime;
}

/// The encoded `FileDescriptorSet` of every API in this crate (for reflection and the API
/// snapshot test).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
