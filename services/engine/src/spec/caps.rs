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
        return Ok(ALL.iter().map(|s| s.to_string()).collect());
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
        caps.extend(ALL.iter().map(|s| s.to_string()));
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
        assert_eq!(effective(true, &[], &s(&["ALL"])).unwrap().len(), ALL.len());
    }

    #[test]
    fn every_name_converts() {
        let all = effective(true, &[], &[]).unwrap();
        assert_eq!(to_oci(&all).len(), ALL.len());
    }
}
