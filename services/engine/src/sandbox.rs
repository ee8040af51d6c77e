//! A pod sandbox's record and the pure rules around it: the request checks, the name the CRI
//! derives from the metadata, the CNI request, list filters.
//!
//! Encoding: `b"BRS"`, a format version byte, the length-prefixed protobuf of the public part
//! (the wire `Sandbox`), then the private part as JSON (as container records are stored).

use std::collections::HashMap;
use std::path::PathBuf;

use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::network::v1 as net;
use berth_proto::berth::types::v1 as types;
use berth_proto::prost::Message;
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 3] = b"BRS";
const VERSION: u8 = 1;

/// What the engine keeps about a sandbox besides its public view.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SandboxPrivate {
    /// berth namespace of the Run call.
    pub namespace: String,
    /// Run finished; a record without it is a half-made sandbox, torn down at the next start.
    pub complete: bool,
    /// `<state>/sandboxes/<id>`: the namespace files.
    pub ns_dir: PathBuf,
    /// `<root>/engine/sandboxes/<id>`: hostname, hosts, resolv.conf.
    pub files_dir: PathBuf,
    /// A CNI ADD may have run (DEL is owed).
    pub cni_added: bool,
}

/// A sandbox record.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRecord {
    /// What Get/List return (without the computed container ids).
    pub s: pb::Sandbox,
    /// Engine bookkeeping.
    pub p: SandboxPrivate,
}

impl SandboxRecord {
    /// Serializes the record.
    pub fn encode(&self) -> Vec<u8> {
        let public = self.s.encode_to_vec();
        let private = serde_json::to_vec(&self.p).expect("private record serializes");
        let mut out = Vec::with_capacity(8 + public.len() + private.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(public.len() as u32).to_le_bytes());
        out.extend_from_slice(&public);
        out.extend_from_slice(&private);
        out
    }

    /// Parses a record written by [`Self::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let corrupt = |why: &str| Error::internal(format!("corrupt sandbox record: {why}"));
        if bytes.len() < 8 || &bytes[..3] != MAGIC {
            return Err(corrupt("bad header"));
        }
        if bytes[3] != VERSION {
            return Err(corrupt(&format!("unknown version {}", bytes[3])));
        }
        let len = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
        let public = bytes.get(8..8 + len).ok_or_else(|| corrupt("truncated"))?;
        let s = pb::Sandbox::decode(public).map_err(|e| corrupt("public part").with_source(e))?;
        let p = serde_json::from_slice(&bytes[8 + len..])
            .map_err(|e| corrupt("private part").with_source(e))?;
        Ok(Self { s, p })
    }

    /// The id.
    pub fn id(&self) -> &str {
        &self.s.id
    }

    /// The config (empty when none).
    pub fn config(&self) -> &pb::SandboxConfig {
        static EMPTY: std::sync::OnceLock<pb::SandboxConfig> = std::sync::OnceLock::new();
        self.s
            .config
            .as_ref()
            .unwrap_or_else(|| EMPTY.get_or_init(Default::default))
    }

    /// The namespace options.
    pub fn ns_options(&self) -> pb::SandboxNamespaceOptions {
        ns_options(self.config())
    }

    /// READY.
    pub fn is_ready(&self) -> bool {
        self.s.state() == pb::SandboxState::Ready
    }

    /// The namespace paths.
    pub fn namespaces(&self) -> pb::SandboxNamespacePaths {
        self.s.namespaces.clone().unwrap_or_default()
    }
}

/// The namespace options of a config (all POD when none are given, as in the CRI).
pub fn ns_options(cfg: &pb::SandboxConfig) -> pb::SandboxNamespaceOptions {
    cfg.linux
        .as_ref()
        .and_then(|l| l.security.as_ref())
        .and_then(|s| s.namespace_options.clone())
        .unwrap_or_default()
}

/// The sandbox's unique name, as containerd's CRI plugin makes it.
pub fn sandbox_name(md: &pb::SandboxMetadata) -> String {
    format!("{}_{}_{}_{}", md.name, md.namespace, md.uid, md.attempt)
}

/// Checks a Run request; returns the sandbox's name.
pub fn validate(req: &pb::RunSandboxRequest) -> Result<String> {
    let cfg = req
        .config
        .as_ref()
        .ok_or_else(|| Error::invalid_argument("sandbox config is required"))?;
    let md = cfg
        .metadata
        .as_ref()
        .ok_or_else(|| Error::invalid_argument("sandbox config metadata is required"))?;
    for (what, v) in [
        ("name", &md.name),
        ("namespace", &md.namespace),
        ("uid", &md.uid),
    ] {
        if v.is_empty() {
            return Err(Error::invalid_argument(format!(
                "sandbox metadata {what} is required"
            )));
        }
    }
    let ns = ns_options(cfg);
    let mode = |m: i32, what: &str| {
        pb::NamespaceMode::try_from(m)
            .map_err(|_| Error::invalid_argument(format!("unknown {what} namespace mode {m}")))
    };
    let network = mode(ns.network, "network")?;
    let ipc = mode(ns.ipc, "ipc")?;
    let pid = mode(ns.pid, "pid")?;
    if !matches!(network, pb::NamespaceMode::Pod | pb::NamespaceMode::Node) {
        return Err(Error::invalid_argument(
            "a pod's network namespace mode must be POD or NODE",
        ));
    }
    if !matches!(ipc, pb::NamespaceMode::Pod | pb::NamespaceMode::Node) {
        return Err(Error::invalid_argument(
            "a pod's ipc namespace mode must be POD or NODE",
        ));
    }
    if pid == pb::NamespaceMode::Target {
        return Err(Error::invalid_argument(
            "a pod's pid namespace mode cannot be TARGET (only a container's can)",
        ));
    }
    if cfg.hostname.len() > 64 || cfg.hostname.contains('\0') {
        return Err(Error::invalid_argument(format!(
            "invalid hostname {:?}",
            cfg.hostname
        )));
    }
    if let Some(linux) = &cfg.linux {
        let parent = &linux.cgroup_parent;
        if parent.ends_with(".slice") {
            return Err(Error::invalid_argument(format!(
                "cgroup parent {parent:?} is a systemd slice; berth drives cgroups with the cgroupfs driver"
            )));
        }
        if parent.split('/').any(|c| c == "..") {
            return Err(Error::invalid_argument(format!(
                "invalid cgroup parent {parent:?}"
            )));
        }
        for key in linux.sysctls.keys() {
            let ipc_key = key.starts_with("kernel.msg")
                || key.starts_with("kernel.sem")
                || key.starts_with("kernel.shm")
                || key.starts_with("fs.mqueue.");
            let net_key = key.starts_with("net.");
            let uts_key = key == "kernel.domainname" || key == "kernel.hostname";
            let ok = (ipc_key && ipc == pb::NamespaceMode::Pod)
                || (net_key && network == pb::NamespaceMode::Pod)
                || (uts_key && network == pb::NamespaceMode::Pod);
            if !ok {
                return Err(Error::invalid_argument(format!(
                    "sysctl {key:?} is not allowed in the pod's namespaces"
                )));
            }
        }
    }
    Ok(sandbox_name(md))
}

/// The CNI ADD request of a sandbox.
pub fn cni_request(
    id: &str,
    netns: &str,
    cfg: &pb::SandboxConfig,
    opts: &pb::SandboxNetworkOptions,
) -> net::CniAttachRequest {
    let md = cfg.metadata.clone().unwrap_or_default();
    let mut args: HashMap<String, String> = opts.cni_args.clone();
    for (k, v) in [
        ("IgnoreUnknown", "1".to_string()),
        ("K8S_POD_NAMESPACE", md.namespace.clone()),
        ("K8S_POD_NAME", md.name.clone()),
        ("K8S_POD_INFRA_CONTAINER_ID", id.to_string()),
        ("K8S_POD_UID", md.uid.clone()),
    ] {
        args.entry(k.into()).or_insert(v);
    }
    let dns = cfg.dns.clone().unwrap_or_default();
    net::CniAttachRequest {
        container_id: id.into(),
        netns_path: netns.into(),
        config_name: opts.cni_config_name.clone(),
        interface_name: "eth0".into(),
        args,
        capabilities: Some(net::CniCapabilities {
            // The kubelet lists every container port; only those with a host port are
            // published (as containerd does).
            port_mappings: cfg
                .port_mappings
                .iter()
                .filter(|p| p.host_port != 0)
                .cloned()
                .collect(),
            ips: Vec::new(),
            mac: String::new(),
            ingress_rate: opts.ingress_rate,
            egress_rate: opts.egress_rate,
            dns_servers: dns.servers,
            dns_search: dns.searches,
            dns_options: dns.options,
            cgroup_path: cfg
                .linux
                .as_ref()
                .map(|l| l.cgroup_parent.clone())
                .unwrap_or_default(),
            ip_ranges: opts.ip_ranges.clone(),
        }),
    }
}

/// The pod's addresses from a CNI result: the first, then the rest (without prefix lengths).
pub fn pod_ips(resp: &net::CniAttachResponse) -> (String, Vec<String>) {
    let mut ips = resp.ips.iter().map(|ip| {
        ip.address
            .split_once('/')
            .map(|(a, _)| a.to_string())
            .unwrap_or_else(|| ip.address.clone())
    });
    let first = ips.next().unwrap_or_default();
    (first, ips.collect())
}

/// Whether `s` passes List's filters (id prefix, name, state, label).
pub fn matches(s: &pb::Sandbox, filters: &[types::Filter]) -> Result<bool> {
    for f in filters {
        let ok = match f.key.as_str() {
            "id" => s.id.starts_with(&f.value),
            "name" => s.name == f.value,
            "state" => match f.value.to_ascii_lowercase().as_str() {
                "ready" => s.state() == pb::SandboxState::Ready,
                "notready" | "not_ready" => s.state() == pb::SandboxState::Notready,
                other => {
                    return Err(Error::invalid_argument(format!(
                        "invalid sandbox state filter {other:?}"
                    )));
                }
            },
            "label" => {
                let labels = s.config.as_ref().map(|c| &c.labels);
                match f.value.split_once('=') {
                    Some((k, v)) => labels.and_then(|l| l.get(k)).is_some_and(|x| x == v),
                    None => labels.is_some_and(|l| l.contains_key(&f.value)),
                }
            }
            other => {
                return Err(Error::invalid_argument(format!(
                    "invalid filter {other:?} for sandboxes"
                )));
            }
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::RunSandboxRequest {
        pb::RunSandboxRequest {
            config: Some(pb::SandboxConfig {
                metadata: Some(pb::SandboxMetadata {
                    name: "web".into(),
                    uid: "u-1".into(),
                    namespace: "default".into(),
                    attempt: 2,
                }),
                port_mappings: vec![
                    types::PortMapping {
                        container_port: 80,
                        host_port: 8080,
                        ..Default::default()
                    },
                    types::PortMapping {
                        container_port: 81,
                        ..Default::default()
                    },
                ],
                labels: [("app".to_string(), "web".to_string())].into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn names_come_from_the_metadata() {
        assert_eq!(validate(&request()).unwrap(), "web_default_u-1_2");
    }

    #[test]
    fn bad_requests_are_refused() {
        let mut r = request();
        r.config.as_mut().unwrap().metadata.as_mut().unwrap().uid = String::new();
        assert!(validate(&r).unwrap_err().message().contains("uid"));
        let mut r = request();
        r.config.as_mut().unwrap().linux = Some(pb::SandboxLinux {
            security: Some(pb::SandboxSecurity {
                namespace_options: Some(pb::SandboxNamespaceOptions {
                    pid: pb::NamespaceMode::Target.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(validate(&r).unwrap_err().message().contains("TARGET"));
        let mut r = request();
        r.config.as_mut().unwrap().linux = Some(pb::SandboxLinux {
            sysctls: [("vm.swappiness".to_string(), "1".to_string())].into(),
            ..Default::default()
        });
        assert!(
            validate(&r)
                .unwrap_err()
                .message()
                .contains("vm.swappiness")
        );
        let mut r = request();
        r.config.as_mut().unwrap().linux = Some(pb::SandboxLinux {
            cgroup_parent: "kubepods-pod1.slice".into(),
            ..Default::default()
        });
        assert!(validate(&r).unwrap_err().message().contains("slice"));
    }

    #[test]
    fn cni_request_publishes_only_host_ports_and_names_the_pod() {
        let r = request();
        let req = cni_request(
            "abc",
            "/run/ns",
            r.config.as_ref().unwrap(),
            &pb::SandboxNetworkOptions {
                ip_ranges: vec!["10.1.0.0/16".into()],
                ..Default::default()
            },
        );
        let caps = req.capabilities.unwrap();
        assert_eq!(caps.port_mappings.len(), 1);
        assert_eq!(caps.port_mappings[0].host_port, 8080);
        assert_eq!(caps.ip_ranges, ["10.1.0.0/16"]);
        assert_eq!(req.args["K8S_POD_NAME"], "web");
        assert_eq!(req.args["K8S_POD_INFRA_CONTAINER_ID"], "abc");
    }

    #[test]
    fn filters_and_ips() {
        let s = pb::Sandbox {
            id: "abcdef".into(),
            name: "web_default_u-1_2".into(),
            state: pb::SandboxState::Ready.into(),
            config: request().config,
            ..Default::default()
        };
        let f = |k: &str, v: &str| types::Filter {
            key: k.into(),
            value: v.into(),
        };
        assert!(matches(&s, &[f("id", "abc"), f("state", "ready")]).unwrap());
        assert!(!matches(&s, &[f("state", "notready")]).unwrap());
        assert!(matches(&s, &[f("label", "app=web"), f("label", "app")]).unwrap());
        assert!(!matches(&s, &[f("label", "app=db")]).unwrap());
        assert!(matches(&s, &[f("bogus", "x")]).is_err());
        let resp = net::CniAttachResponse {
            ips: vec![
                net::CniIpConfig {
                    address: "10.1.0.5/16".into(),
                    ..Default::default()
                },
                net::CniIpConfig {
                    address: "fd00::5/64".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(pod_ips(&resp), ("10.1.0.5".into(), vec!["fd00::5".into()]));
    }

    #[test]
    fn records_round_trip() {
        let r = SandboxRecord {
            s: pb::Sandbox {
                id: "a".repeat(64),
                name: "n".into(),
                ..Default::default()
            },
            p: SandboxPrivate {
                namespace: "default".into(),
                complete: true,
                ..Default::default()
            },
        };
        assert_eq!(SandboxRecord::decode(&r.encode()).unwrap(), r);
        assert!(SandboxRecord::decode(b"BRC\x01\0\0\0\0").is_err());
    }
}
