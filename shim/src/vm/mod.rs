//! `berth-vm`: containers in their own lightweight VM, driven through the in-guest agent.
//!
//! - [`relay`]: the host process standing in for one guest process (`berth-shim vm-relay`).
//! - [`net`]: the guest's network, mirrored from the container's network namespace with tc.

pub mod net;
pub mod relay;
