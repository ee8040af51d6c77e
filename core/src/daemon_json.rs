//! Docker's `daemon.json`, mapped onto berth's [`Config`].
//!
//! Keys berth honours are applied over the TOML config; keys that are Docker's but change
//! nothing in berth are accepted with a warning; any other key is an error naming it, as dockerd
//! does ("the following directives don't match any configuration option").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::config::{AddressPool, Config, RuntimeConfig};
use crate::error::{Context, Error, ErrorKind, Result};

/// Docker keys that berth accepts but that have no effect on it (berth always behaves as the
/// comment says).
const ACCEPTED_WITHOUT_EFFECT: &[(&str, &str)] = &[
    (
        "live-restore",
        "containers always survive daemon restarts in berth",
    ),
    ("experimental", "berth has no experimental switch"),
    ("features", "berth has no feature switches"),
    (
        "userland-proxy",
        "berth publishes ports with netfilter rules only",
    ),
    ("iptables", "berth always manages its netfilter rules"),
    (
        "ip-forward",
        "berth always enables forwarding for its bridges",
    ),
    (
        "ip-masq",
        "berth always masquerades outbound traffic of non-internal networks",
    ),
    ("storage-opts", "the snapshotter takes no options"),
    ("exec-opts", "berth picks the cgroup driver itself"),
    (
        "shutdown-timeout",
        "berth never stops containers on shutdown",
    ),
    ("containerd", "berth does not use containerd"),
    ("labels", "daemon labels are not reported"),
];

/// The outcome of applying a daemon.json: the keys that were accepted but do nothing.
#[derive(Debug, Default)]
pub struct Applied {
    /// `(key, why it has no effect)` for each such key present.
    pub ignored: Vec<(String, &'static str)>,
}

/// Reads `path` and applies it to `cfg`.
pub fn apply_file(cfg: &mut Config, path: &Path) -> Result<Applied> {
    let text = std::fs::read_to_string(path).context(
        ErrorKind::InvalidArgument,
        format!("read daemon config {}", path.display()),
    )?;
    apply_str(cfg, &text).map_err(|e| {
        Error::new(
            e.kind(),
            format!(
                "unable to configure berth with file {}: {}",
                path.display(),
                e.chain()
            ),
        )
    })
}

/// Applies the daemon.json document `text` to `cfg`.
pub fn apply_str(cfg: &mut Config, text: &str) -> Result<Applied> {
    let doc: Map<String, Value> =
        serde_json::from_str(text).context(ErrorKind::InvalidArgument, "invalid JSON")?;

    let unknown: Vec<&str> = doc
        .keys()
        .map(String::as_str)
        .filter(|k| !KNOWN.contains(k) && !ACCEPTED_WITHOUT_EFFECT.iter().any(|(a, _)| a == k))
        .collect();
    if !unknown.is_empty() {
        return Err(Error::invalid_argument(format!(
            "the following directives don't match any configuration option: {}",
            unknown.join(", ")
        )));
    }

    // Work on a copy so that a file rejected half-way changes nothing.
    let mut next = cfg.clone();
    let mut applied = Applied::default();
    for (key, value) in &doc {
        if let Some((_, why)) = ACCEPTED_WITHOUT_EFFECT.iter().find(|(a, _)| a == key) {
            applied.ignored.push((key.clone(), why));
            continue;
        }
        apply_key(&mut next, key, value.clone())
            .map_err(|e| Error::invalid_argument(format!("{key}: {}", e.chain())))?;
    }
    next.validate()?;
    *cfg = next;
    Ok(applied)
}

const KNOWN: &[&str] = &[
    "hosts",
    "data-root",
    "exec-root",
    "storage-driver",
    "tls",
    "tlsverify",
    "tlscacert",
    "tlscert",
    "tlskey",
    "insecure-registries",
    "registry-mirrors",
    "default-runtime",
    "runtimes",
    "log-driver",
    "log-opts",
    "bip",
    "bridge",
    "mtu",
    "default-address-pools",
    "dns",
    "dns-search",
    "dns-opts",
    "debug",
    "log-level",
    "log-format",
    "max-concurrent-downloads",
    "max-concurrent-uploads",
    "group",
    "cgroup-parent",
    "metrics-addr",
    "userns-remap",
];

fn value<T: DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).context(ErrorKind::InvalidArgument, "wrong type")
}

fn apply_key(cfg: &mut Config, key: &str, v: Value) -> Result<()> {
    match key {
        "hosts" => {
            let hosts: Vec<String> = value(v)?;
            cfg.gateway.hosts = hosts.into_iter().map(|h| normalise_host(&h)).collect();
        }
        "data-root" => cfg.root = value::<PathBuf>(v)?,
        "exec-root" => cfg.state_dir = value::<PathBuf>(v)?,
        "storage-driver" => {
            let name: String = value(v)?;
            cfg.snapshotter.driver = match name.as_str() {
                "overlay2" | "overlay" | "overlayfs" => "overlayfs".into(),
                "vfs" | "native" => "native".into(),
                other if cfg.proxy_plugins.contains_key(other) => other.into(),
                other => {
                    return Err(Error::invalid_argument(format!(
                        "unknown storage driver {other:?} (overlay2, vfs, or a [proxy_plugins] name)"
                    )));
                }
            };
        }
        "tls" => cfg.gateway.tls = value(v)?,
        "tlsverify" => cfg.gateway.tlsverify = value(v)?,
        "tlscacert" => cfg.gateway.tlscacert = Some(value(v)?),
        "tlscert" => cfg.gateway.tlscert = Some(value(v)?),
        "tlskey" => cfg.gateway.tlskey = Some(value(v)?),
        "insecure-registries" => cfg.images.insecure_registries = value(v)?,
        "registry-mirrors" => cfg.images.registry_mirrors = value(v)?,
        "default-runtime" => cfg.engine.default_runtime = value(v)?,
        "runtimes" => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct DockerRuntime {
                path: String,
                #[serde(default, rename = "runtimeArgs")]
                runtime_args: Vec<String>,
            }
            let runtimes: BTreeMap<String, DockerRuntime> = value(v)?;
            for (name, rt) in runtimes {
                cfg.engine.runtimes.insert(
                    name,
                    RuntimeConfig {
                        path: rt.path,
                        args: rt.runtime_args,
                    },
                );
            }
        }
        "log-driver" => cfg.engine.log_driver = value(v)?,
        "log-opts" => cfg.engine.log_opts = value(v)?,
        "bip" => cfg.network.bip = value(v)?,
        "bridge" => cfg.network.bridge = value(v)?,
        "mtu" => cfg.network.mtu = value(v)?,
        "default-address-pools" => {
            cfg.network.default_address_pools = value::<Vec<AddressPool>>(v)?
        }
        "dns" => cfg.network.dns = value(v)?,
        "dns-search" => cfg.network.dns_search = value(v)?,
        "dns-opts" => cfg.network.dns_options = value(v)?,
        "debug" => {
            if value::<bool>(v)? {
                cfg.telemetry.log_level = "debug".into();
            }
        }
        "log-level" => {
            let level: String = value(v)?;
            cfg.telemetry.log_level = match level.as_str() {
                "fatal" | "panic" => "error".into(),
                "warning" => "warn".into(),
                other => other.into(),
            };
        }
        "log-format" => cfg.telemetry.log_format = value(v)?,
        "max-concurrent-downloads" => cfg.images.max_concurrent_downloads = value(v)?,
        "max-concurrent-uploads" => cfg.images.max_concurrent_uploads = value(v)?,
        "group" => cfg.socket_group = Some(value(v)?),
        "cgroup-parent" => cfg.engine.cgroup_parent = value(v)?,
        "metrics-addr" => cfg.telemetry.metrics_addr = Some(value(v)?),
        "userns-remap" => cfg.engine.userns_remap = value(v)?,
        _ => unreachable!("key {key} is in KNOWN but not handled"),
    }
    Ok(())
}

/// Docker accepts `unix:///x`, `/x` and `tcp://h:p`; berth stores full URLs.
fn normalise_host(h: &str) -> String {
    if h.starts_with('/') {
        format!("unix://{h}")
    } else {
        h.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_keys_are_honoured() {
        let mut cfg = Config::default();
        let applied = apply_str(
            &mut cfg,
            r#"{
                "hosts": ["unix:///tmp/d.sock", "/tmp/e.sock"],
                "data-root": "/srv/berth",
                "storage-driver": "vfs",
                "insecure-registries": ["reg.local:5000"],
                "tls": true, "tlscert": "/c.pem", "tlskey": "/k.pem",
                "tlsverify": true, "tlscacert": "/ca.pem",
                "log-level": "warning",
                "userns-remap": "default",
                "metrics-addr": "127.0.0.1:9323",
                "live-restore": true,
                "runtimes": {"fast": {"path": "/usr/bin/crun", "runtimeArgs": ["--debug"]}},
                "default-address-pools": [{"base": "10.10.0.0/16", "size": 24}]
            }"#,
        )
        .unwrap();
        assert_eq!(
            cfg.gateway.hosts,
            ["unix:///tmp/d.sock", "unix:///tmp/e.sock"]
        );
        assert_eq!(cfg.root, PathBuf::from("/srv/berth"));
        assert_eq!(cfg.snapshotter.driver, "native");
        assert_eq!(cfg.images.insecure_registries, ["reg.local:5000"]);
        assert!(cfg.gateway.tls && cfg.gateway.tlsverify);
        assert_eq!(cfg.telemetry.log_level, "warn");
        assert_eq!(cfg.engine.userns_remap, "default");
        assert_eq!(
            cfg.telemetry.metrics_addr.as_deref(),
            Some("127.0.0.1:9323")
        );
        assert_eq!(cfg.engine.runtimes["fast"].args, ["--debug"]);
        assert_eq!(cfg.network.default_address_pools[0].size, 24);
        assert_eq!(applied.ignored.len(), 1);
    }

    #[test]
    fn runtimes_can_name_berth_vm_and_its_args_are_checked() {
        let mut cfg = Config::default();
        apply_str(
            &mut cfg,
            r#"{"runtimes": {"kata": {"path": "berth-vm", "runtimeArgs": ["--accel=tcg", "--memory-mib=512"]}}}"#,
        )
        .unwrap();
        assert_eq!(cfg.engine.runtimes["kata"].path, crate::vm::VM_RUNTIME);
        cfg.validate().unwrap();
        let mut cfg = Config::default();
        let err = apply_str(
            &mut cfg,
            r#"{"runtimes": {"kata": {"path": "berth-vm", "runtimeArgs": ["--accel=whpx"]}}}"#,
        )
        .unwrap_err();
        assert!(
            err.chain().contains("engine.runtimes.kata"),
            "{}",
            err.chain()
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let mut cfg = Config::default();
        let err =
            apply_str(&mut cfg, r#"{"debug": true, "bogus-key": 1, "other": 2}"#).unwrap_err();
        assert_eq!(
            err.message(),
            "the following directives don't match any configuration option: bogus-key, other"
        );
        assert_eq!(
            cfg,
            Config::default(),
            "nothing applied from a rejected file"
        );
    }

    #[test]
    fn wrong_types_and_bad_json_are_errors() {
        let mut cfg = Config::default();
        let err = apply_str(&mut cfg, r#"{"max-concurrent-downloads": "x"}"#).unwrap_err();
        assert!(
            err.message().starts_with("max-concurrent-downloads:"),
            "{}",
            err.chain()
        );
        assert!(apply_str(&mut cfg, "{not json").is_err());
        let err = apply_str(&mut cfg, r#"{"storage-driver": "zfs"}"#).unwrap_err();
        assert!(err.chain().contains("zfs"));
    }
}
