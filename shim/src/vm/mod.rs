//! `berth-vm`: containers in their own lightweight VM, driven through the in-guest agent.
//!
//! - [`guest`]: the guest image; [`machine`]: one VM with its agent (the agent itself is the
//!   `berth-agent` crate).
//! - [`relay`]: the host process standing in for one guest process (`berth-shim vm-relay`).
//! - [`net`]: the guest's network, mirrored from the container's network namespace with tc.
//! - [`runtime`]: [`runtime::VmRuntime`], the `berth-vm` `OciRuntime`.

pub mod guest;
pub mod machine;
pub mod net;
pub mod relay;
pub mod runtime;

use std::path::PathBuf;
use std::sync::Arc;

use runtime::{MachineLauncher, VmLauncher};

use crate::reaper::Spawner;

/// The VM launcher of this build: QEMU through [`machine`], its processes spawned by `spawner`.
pub fn launcher(spawner: Arc<dyn Spawner>, shim_exe: PathBuf) -> Box<dyn VmLauncher> {
    Box::new(MachineLauncher {
        spawner,
        cache_dir: None,
        shim_exe,
    })
}
