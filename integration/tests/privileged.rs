//! `--privileged` and `--cap-add ALL` on a host whose bounding set lacks a capability (this
//! machine has no CAP_SYS_RESOURCE): the container gets every capability berth itself holds, and
//! runs, rather than failing in runc. Root only; skips cleanly otherwise.

use anyhow::{Result, ensure};
use berth_integration::gateway_kit::DockerStack;
use berth_integration::py_kit;

/// The `CapBnd` mask of `/proc/<pid>/status` text.
fn mask(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    u64::from_str_radix(line[field.len()..].trim(), 16).ok()
}

#[test]
fn privileged_gets_what_the_host_bounding_set_allows() -> Result<()> {
    if !berth_integration::gateway_kit::ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let host = mask(&std::fs::read_to_string("/proc/self/status")?, "CapBnd:").unwrap_or(0);
    for flags in [&["--privileged"][..], &["--cap-add", "ALL"][..]] {
        let mut args = vec!["run", "--rm"];
        args.extend_from_slice(flags);
        args.extend(["busybox", "cat", "/proc/self/status"]);
        let status = d.ok(&args)?;
        let eff = mask(&status, "CapEff:").unwrap_or(0);
        ensure!(
            eff == host,
            "{flags:?}: CapEff {eff:016x}, the host's bounding set {host:016x}"
        );
    }
    Ok(())
}
