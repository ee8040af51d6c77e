//! Test kit shared by the integration tests: starting real berth binaries on temp dirs, test
//! images, registries, and cleanup that runs even when a test fails.

pub mod cri_kit;
pub mod cri_stream_kit;
pub mod engine_kit;
pub mod gateway_kit;
pub mod images_kit;
pub mod network_kit;
pub mod py_kit;
pub mod rootless_kit;
pub mod shim_kit;
pub mod snapshotter_kit;
pub mod stack;
pub mod userns_kit;
