//! `berth-vm`: containers in their own lightweight VM, driven through the in-guest agent.
//!
//! - [`relay`]: the host process standing in for one guest process (`berth-shim vm-relay`).
//! - [`net`]: the guest's network, mirrored from the container's network namespace with tc.
//! - [`runtime`]: [`runtime::VmRuntime`], the `berth-vm` `OciRuntime`.

pub mod net;
pub mod relay;
pub mod runtime;

use runtime::{NoLauncher, VmLauncher};

/// The VM launcher of this build.
pub fn launcher() -> Box<dyn VmLauncher> {
    Box::new(NoLauncher)
}
