//! The `berth-vm` runtime's settings: what its entry in the runtimes table (`path = "berth-vm"`)
//! may carry as `args`, parsed in one place for the config check, `docker info` and the shim.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The runtime name and reserved path of the VM-isolated runtime.
pub const VM_RUNTIME: &str = "berth-vm";

/// The tap a VM's NIC is behind, in the container's network namespace, mirrored with its
/// `eth0`: the same traffic counted twice, so stats leave it out.
pub const VM_TAP_IFNAME: &str = "tap0";

/// Where `deploy/install-deps.sh` puts the guest kernel package.
pub const DEFAULT_KERNEL_DIR: &str = "/var/cache/berth/vm";

/// Which accelerator QEMU runs the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmAccel {
    /// KVM when the host's works (see [`host_accelerator`]), else TCG.
    Auto,
    /// Hardware virtualization.
    Kvm,
    /// QEMU's emulator: slow, works everywhere.
    Tcg,
}

impl VmAccel {
    /// `auto`, `kvm`, `tcg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }

    /// `Auto` resolved for this host.
    pub fn resolve(self) -> Self {
        match self {
            Self::Auto => host_accelerator(),
            other => other,
        }
    }
}

/// The `berth-vm` runtime's options, from its `args` (`--accel=tcg`, `--memory-mib=512`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRuntimeOptions {
    /// `--accel=auto|kvm|tcg` (default `auto`).
    pub accel: VmAccel,
    /// `--qemu=PATH` (default `qemu-system-x86_64` on PATH).
    pub qemu: PathBuf,
    /// `--virtiofsd=PATH` (default `virtiofsd` on PATH).
    pub virtiofsd: PathBuf,
    /// `--vhost-vsock=PATH` (default `vhost-device-vsock` on PATH).
    pub vhost_vsock: PathBuf,
    /// `--kernel=PATH`: the guest kernel, a `linux-image-*.deb` or a directory holding one
    /// (default [`DEFAULT_KERNEL_DIR`]).
    pub kernel: PathBuf,
    /// `--agent=PATH`: the guest agent (default `berth-agent` next to the shim binary).
    pub agent: Option<PathBuf>,
    /// `--memory-mib=N`: guest memory when the container has no memory limit (default 256).
    pub memory_mib: u32,
    /// `--memory-overhead-mib=N`: added to a container's memory limit for the guest kernel
    /// and agent (default 128).
    pub memory_overhead_mib: u32,
    /// `--agent-timeout=SECONDS`: how long the guest may take to boot (default 120: TCG is slow).
    pub agent_timeout_secs: u64,
    /// `--image-cache=DIR`: where built guest images are kept (default [`DEFAULT_IMAGE_CACHE`]).
    pub image_cache: PathBuf,
}

/// Where built guest images are cached unless `--image-cache` says otherwise.
pub const DEFAULT_IMAGE_CACHE: &str = "/var/cache/berth/vm/guest";

impl Default for VmRuntimeOptions {
    fn default() -> Self {
        Self {
            accel: VmAccel::Auto,
            qemu: "qemu-system-x86_64".into(),
            virtiofsd: "virtiofsd".into(),
            vhost_vsock: "vhost-device-vsock".into(),
            kernel: DEFAULT_KERNEL_DIR.into(),
            agent: None,
            memory_mib: 256,
            memory_overhead_mib: 128,
            agent_timeout_secs: 120,
            image_cache: DEFAULT_IMAGE_CACHE.into(),
        }
    }
}

impl VmRuntimeOptions {
    /// Parses the runtime's `args`; every one must be a known `--key=value`.
    pub fn from_args(args: &[String]) -> Result<Self> {
        let mut o = Self::default();
        for arg in args {
            let bad = || Error::invalid_argument(format!("{VM_RUNTIME}: bad option {arg:?}"));
            let (key, value) = arg
                .strip_prefix("--")
                .and_then(|a| a.split_once('='))
                .ok_or_else(bad)?;
            let number = |v: &str| v.parse::<u64>().map_err(|_| bad());
            match key {
                "accel" => {
                    o.accel = match value {
                        "auto" => VmAccel::Auto,
                        "kvm" => VmAccel::Kvm,
                        "tcg" => VmAccel::Tcg,
                        _ => return Err(bad()),
                    }
                }
                "qemu" => o.qemu = value.into(),
                "virtiofsd" => o.virtiofsd = value.into(),
                "vhost-vsock" => o.vhost_vsock = value.into(),
                "kernel" => o.kernel = value.into(),
                "agent" => o.agent = Some(value.into()),
                "memory-mib" => {
                    o.memory_mib = u32::try_from(number(value)?)
                        .ok()
                        .filter(|m| *m >= 64)
                        .ok_or_else(bad)?
                }
                "memory-overhead-mib" => {
                    o.memory_overhead_mib = u32::try_from(number(value)?).map_err(|_| bad())?
                }
                "agent-timeout" => o.agent_timeout_secs = number(value)?.max(1),
                "image-cache" => o.image_cache = value.into(),
                _ => return Err(bad()),
            }
        }
        Ok(o)
    }
}

/// The accelerator this host would give a guest: KVM when `/dev/kvm` opens and answers the
/// stable API version and is not PVM (`kvm_pvm`, a nested paravirtual KVM that stock guest
/// kernels do not boot on), else TCG.
pub fn host_accelerator() -> VmAccel {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return VmAccel::Tcg;
    }
    const KVM_GET_API_VERSION: libc::c_ulong = 0xae00;
    let Ok(kvm) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    else {
        return VmAccel::Tcg;
    };
    use std::os::fd::AsRawFd;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a number.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version == 12 {
        VmAccel::Kvm
    } else {
        VmAccel::Tcg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_parse_and_default() {
        let o = VmRuntimeOptions::from_args(&[]).unwrap();
        assert_eq!(o, VmRuntimeOptions::default());
        assert_eq!(o.accel, VmAccel::Auto);
        let o = VmRuntimeOptions::from_args(&args(&[
            "--accel=tcg",
            "--qemu=/usr/bin/qemu-system-x86_64",
            "--memory-mib=512",
            "--agent=/opt/berth-agent",
        ]))
        .unwrap();
        assert_eq!(o.accel, VmAccel::Tcg);
        assert_eq!(o.memory_mib, 512);
        assert_eq!(o.agent.as_deref(), Some(Path::new("/opt/berth-agent")));
    }

    #[test]
    fn unknown_or_malformed_options_are_refused() {
        for bad in [
            "--accel=hvf",
            "--nope=1",
            "accel=tcg",
            "--memory-mib=x",
            "--debug",
        ] {
            let err = VmRuntimeOptions::from_args(&args(&[bad])).unwrap_err();
            assert!(err.chain().contains("bad option"), "{bad}: {}", err.chain());
        }
    }

    #[test]
    fn auto_resolves_to_kvm_or_tcg() {
        assert_ne!(VmAccel::Auto.resolve(), VmAccel::Auto);
    }
}
