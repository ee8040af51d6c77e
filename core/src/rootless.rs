//! Rootless mode: the facts every process needs — where an ordinary user's berth keeps its
//! files (the XDG layout Docker's rootless mode uses), whether this process runs in a user
//! namespace.
//!
//! `berth up --rootless` (cli/src/rootless.rs) sets the namespaces up; the services only learn
//! from `Config::rootless` that they run inside them.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The XDG paths of a rootless installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdgPaths {
    /// Data root: `$XDG_DATA_HOME/berth` (`~/.local/share/berth`).
    pub root: PathBuf,
    /// State and sockets: `$XDG_RUNTIME_DIR/berth`.
    pub state_dir: PathBuf,
    /// `$XDG_CONFIG_HOME/berth/berth.toml` (`~/.config/berth/berth.toml`).
    pub config_file: PathBuf,
}

impl XdgPaths {
    /// Resolves the paths from `env` (pass `std::env::vars()`). `XDG_RUNTIME_DIR` is required:
    /// sockets must live on a per-user tmpfs that goes away at logout, never in the home.
    pub fn from_env(env: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        let vars: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(_, v)| Path::new(v).is_absolute())
            .collect();
        let home = vars.get("HOME").map(PathBuf::from);
        let under_home = |xdg: &str, rel: &str| -> Result<PathBuf> {
            match (vars.get(xdg), &home) {
                (Some(dir), _) => Ok(PathBuf::from(dir)),
                (None, Some(home)) => Ok(home.join(rel)),
                (None, None) => Err(Error::invalid_argument(format!(
                    "rootless: neither {xdg} nor HOME is set to an absolute path"
                ))),
            }
        };
        let runtime = vars.get("XDG_RUNTIME_DIR").ok_or_else(|| {
            Error::invalid_argument(
                "rootless: XDG_RUNTIME_DIR is not set (a login session sets it to /run/user/UID; \
                 `loginctl enable-linger USER` keeps it without one)",
            )
        })?;
        Ok(Self {
            root: under_home("XDG_DATA_HOME", ".local/share")?.join("berth"),
            state_dir: PathBuf::from(runtime).join("berth"),
            config_file: under_home("XDG_CONFIG_HOME", ".config")?.join("berth/berth.toml"),
        })
    }
}

/// Whether this process runs in a user namespace other than the host's (whose map is the
/// identity over every id).
pub fn in_user_namespace() -> bool {
    std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|map| !is_identity_map(&map))
}

fn is_identity_map(map: &str) -> bool {
    let fields: Vec<&str> = map.split_whitespace().collect();
    fields == ["0", "0", "4294967295"]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn xdg_paths_follow_the_variables_then_home() {
        let p = XdgPaths::from_env(env(&[
            ("HOME", "/home/u"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ]))
        .unwrap();
        assert_eq!(p.root, PathBuf::from("/home/u/.local/share/berth"));
        assert_eq!(p.state_dir, PathBuf::from("/run/user/1000/berth"));
        assert_eq!(
            p.config_file,
            PathBuf::from("/home/u/.config/berth/berth.toml")
        );
        let p = XdgPaths::from_env(env(&[
            ("HOME", "/home/u"),
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ("XDG_DATA_HOME", "/data"),
            ("XDG_CONFIG_HOME", "relative/is/ignored"),
        ]))
        .unwrap();
        assert_eq!(p.root, PathBuf::from("/data/berth"));
        assert_eq!(
            p.config_file,
            PathBuf::from("/home/u/.config/berth/berth.toml")
        );
    }

    #[test]
    fn a_missing_runtime_dir_is_an_error_naming_it() {
        let err = XdgPaths::from_env(env(&[("HOME", "/home/u")])).unwrap_err();
        assert!(err.to_string().contains("XDG_RUNTIME_DIR"), "{err}");
    }

    #[test]
    fn identity_map_is_the_host() {
        assert!(is_identity_map("         0          0 4294967295\n"));
        assert!(!is_identity_map("0 1000 1\n1 100000 65536\n"));
    }
}
