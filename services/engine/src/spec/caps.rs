//! Capabilities: Docker's default set, `--cap-add` / `--cap-drop` (with or without `CAP_`,
//! any case, and `ALL`), and `--privileged`.

use std::collections::BTreeSet;
use std::str::FromStr;

use berth_core::{Error, Result};
use oci_spec::runtime::Capability;

/// Docker's default capability set.
pub const DEFAULT: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Every capability the kernel knows (as of Linux 6.x).
pub const ALL: &[&str] = &berth_core::caps::NAMES;

/// The capabilities `ALL` and `--privileged` give: those of [`ALL`] in the engine's own
/// bounding set. A process cannot hand out a capability it cannot hold, so runc would fail
/// ("unable to apply caps") on a host whose bounding set lacks one (this machine has no
/// `SYS_RESOURCE`); Docker grants what the environment has, too.
pub fn available() -> &'static [&'static str] {
    static AVAILABLE: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    AVAILABLE.get_or_init(|| {
        let bounding = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| bounding_set(&status));
        match bounding {
            Some(mask) => ALL
                .iter()
                .enumerate()
                .filter(|(bit, _)| *bit < 64 && mask & (1u64 << bit) != 0)
                .map(|(_, name)| *name)
                .collect(),
            None => ALL.to_vec(),
        }
    })
}

/// The `CapBnd` mask of a `/proc/<pid>/status` text.
fn bounding_set(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapBnd:"))?;
    u64::from_str_radix(line.trim_start_matches("CapBnd:").trim(), 16).ok()
}

/// `cap_sys_admin`, `CAP_SYS_ADMIN`, `sys_admin` → `SYS_ADMIN`; `all` → `ALL`.
fn normalize(name: &str) -> Result<String> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper).to_string();
    if bare == "ALL" || ALL.contains(&bare.as_str()) {
        Ok(bare)
    } else {
        Err(Error::invalid_argument(format!(
            "invalid capability: {name}"
        )))
    }
}

/// The capability set (bare names, e.g. `SYS_ADMIN`) a container gets.
pub fn effective(privileged: bool, add: &[String], drop: &[String]) -> Result<BTreeSet<String>> {
    if privileged {
        return Ok(available().iter().map(|s| s.to_string()).collect());
    }
    let add: Vec<String> = add.iter().map(|c| normalize(c)).collect::<Result<_>>()?;
    let drop: Vec<String> = drop.iter().map(|c| normalize(c)).collect::<Result<_>>()?;
    let mut caps: BTreeSet<String> = if drop.iter().any(|c| c == "ALL") {
        BTreeSet::new()
    } else {
        DEFAULT
            .iter()
            .map(|s| s.to_string())
            .filter(|c| !drop.contains(c))
            .collect()
    };
    if add.iter().any(|c| c == "ALL") {
        caps.extend(available().iter().map(|s| s.to_string()));
        // Docker: with add ALL, an explicit drop still wins.
        caps.retain(|c| !drop.contains(c) || drop.iter().any(|d| d == "ALL"));
    } else {
        caps.extend(add);
    }
    Ok(caps)
}

/// The set as oci-spec values (unknown names to oci-spec are skipped).
pub fn to_oci(caps: &BTreeSet<String>) -> oci_spec::runtime::Capabilities {
    caps.iter()
        .filter_map(|c| Capability::from_str(c).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn the_bounding_set_limits_all() {
        let status = "Name:\tx\nCapEff:\t0\nCapBnd:\t000001fffeffffff\n";
        let mask = bounding_set(status).unwrap();
        assert_eq!(mask & (1 << 24), 0, "SYS_RESOURCE is bit 24");
        assert_eq!(ALL[24], "SYS_RESOURCE");
        assert!(available().iter().all(|c| ALL.contains(c)));
    }

    #[test]
    fn default_add_and_drop() {
        let caps = effective(false, &[], &[]).unwrap();
        assert_eq!(caps.len(), DEFAULT.len());
        assert!(caps.contains("NET_RAW") && !caps.contains("SYS_ADMIN"));
        let caps = effective(
            false,
            &s(&["cap_sys_admin", "NET_ADMIN"]),
            &s(&["CAP_NET_RAW"]),
        )
        .unwrap();
        assert!(caps.contains("SYS_ADMIN") && caps.contains("NET_ADMIN"));
        assert!(!caps.contains("NET_RAW"));
        let caps = effective(false, &s(&["CHOWN"]), &s(&["all"])).unwrap();
        assert_eq!(caps.into_iter().collect::<Vec<_>>(), ["CHOWN"]);
        let caps = effective(false, &s(&["ALL"]), &s(&["MKNOD"])).unwrap();
        assert!(caps.contains("SYS_ADMIN") && !caps.contains("MKNOD"));
        assert!(effective(false, &s(&["FLY"]), &[]).is_err());
        assert_eq!(
            effective(true, &[], &s(&["ALL"])).unwrap().len(),
            available().len()
        );
    }

    #[test]
    fn every_name_converts() {
        let all = effective(true, &[], &[]).unwrap();
        assert_eq!(to_oci(&all).len(), available().len());
    }
}
