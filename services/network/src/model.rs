//! The records berth-network persists: networks, attachments (endpoints) and CNI attachments.
//!
//! They are stored as JSON values in redb; every field added later must have a serde default so
//! that records written by an older berth still load.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::ipam::{Cidr, Pool};
use crate::ports::PortBinding;

/// Docker's option naming the bridge interface.
pub const OPT_BRIDGE_NAME: &str = "com.docker.network.bridge.name";
/// Docker's option for inter-container communication on a bridge.
pub const OPT_ICC: &str = "com.docker.network.bridge.enable_icc";
/// Docker's option for masquerading traffic that leaves the network.
pub const OPT_MASQUERADE: &str = "com.docker.network.bridge.enable_ip_masquerade";
/// Docker's option for the default host address of published ports.
pub const OPT_HOST_BINDING_IPV4: &str = "com.docker.network.bridge.host_binding_ipv4";
/// Docker's option for the MTU of the bridge and its veths.
pub const OPT_MTU: &str = "com.docker.network.driver.mtu";
/// Docker's option marking the default bridge.
pub const OPT_DEFAULT_BRIDGE: &str = "com.docker.network.bridge.default_bridge";

/// The network drivers berth knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Driver {
    /// A Linux bridge with veths.
    Bridge,
    /// The host's own network namespace.
    Host,
    /// No networking (Docker's `null`, the `none` network).
    Null,
}

impl Driver {
    /// Docker's driver name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bridge => "bridge",
            Self::Host => "host",
            Self::Null => "null",
        }
    }
}

/// A network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// 64 hex.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Driver.
    pub driver: Driver,
    /// Creation time, nanoseconds since the epoch.
    pub created_ns: i64,
    /// No route out.
    pub internal: bool,
    /// Docker's attachable flag (kept for inspect).
    pub attachable: bool,
    /// IPv6 addresses are given too.
    pub enable_ipv6: bool,
    /// The IPAM driver name ("default").
    pub ipam_driver: String,
    /// IPAM options (kept for inspect).
    pub ipam_options: BTreeMap<String, String>,
    /// The IPv4 pool (bridge networks).
    pub ipv4: Option<Pool>,
    /// The IPv6 pool (bridge networks with IPv6).
    pub ipv6: Option<Pool>,
    /// Driver options as given.
    pub options: BTreeMap<String, String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The Linux bridge ("" for other drivers).
    pub bridge: String,
    /// One of bridge, host, none.
    pub builtin: bool,
    /// Containers resolve each other by name (user-defined bridges).
    pub dns_enabled: bool,
    /// MTU of the bridge and its veths.
    pub mtu: u32,
    /// Inter-container communication on the bridge.
    pub icc: bool,
    /// Masquerade traffic leaving the network.
    pub masquerade: bool,
    /// Published ports without a host address bind here (`None`: all addresses).
    #[serde(default)]
    pub host_binding_ipv4: Option<IpAddr>,
    /// The last address handed out, so allocation continues after it.
    #[serde(default)]
    pub last_ipv4: Option<IpAddr>,
    /// The last IPv6 address handed out.
    #[serde(default)]
    pub last_ipv6: Option<IpAddr>,
}

impl NetworkRecord {
    /// The subnets of the network.
    pub fn subnets(&self) -> Vec<Cidr> {
        self.ipv4
            .iter()
            .chain(self.ipv6.iter())
            .map(|p| p.subnet)
            .collect()
    }

    /// Whether this is a bridge network.
    pub fn is_bridge(&self) -> bool {
        self.driver == Driver::Bridge
    }

    /// The 12-hex short id.
    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }
}

/// One container's endpoint on one network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    /// Full container id.
    pub container_id: String,
    /// Container name (DNS).
    pub container_name: String,
    /// Container hostname (DNS).
    pub hostname: String,
    /// Network id.
    pub network_id: String,
    /// 64 hex.
    pub endpoint_id: String,
    /// Network namespace path ("" for host/none).
    pub netns_path: String,
    /// Interface inside the namespace.
    pub ifname: String,
    /// Host side of the veth.
    pub host_ifname: String,
    /// `aa:bb:..`.
    pub mac: String,
    /// IPv4 address, prefix length and gateway.
    pub ipv4: Option<IpAddr>,
    /// Prefix length of `ipv4`.
    pub ipv4_prefix: u8,
    /// Gateway of `ipv4`.
    pub ipv4_gateway: Option<IpAddr>,
    /// IPv6 address.
    pub ipv6: Option<IpAddr>,
    /// Prefix length of `ipv6`.
    pub ipv6_prefix: u8,
    /// Gateway of `ipv6`.
    pub ipv6_gateway: Option<IpAddr>,
    /// Published ports as bound.
    pub ports: Vec<PortBinding>,
    /// Network-scoped aliases.
    pub aliases: Vec<String>,
    /// Names the network's DNS answers for this endpoint (lowercase).
    pub dns_names: Vec<String>,
    /// The container's own DNS servers (its --dns), used as upstreams.
    pub dns_servers: Vec<String>,
    /// The container's own search domains.
    pub dns_search: Vec<String>,
    /// The container's own resolv.conf options.
    pub dns_options: Vec<String>,
    /// Legacy links `name:alias`.
    pub links: Vec<String>,
    /// Priority for the default route.
    pub gw_priority: i32,
    /// This endpoint carries the namespace's default route.
    pub default_route: bool,
    /// Creation time, nanoseconds since the epoch.
    pub created_ns: i64,
}

impl AttachmentRecord {
    /// The store key: one attachment per container and network.
    pub fn key(&self) -> String {
        attachment_key(&self.container_id, &self.network_id)
    }

    /// The addresses of the endpoint.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ipv4.iter().chain(self.ipv6.iter()).copied()
    }
}

/// The store key of the attachment of `container_id` to `network_id`.
pub fn attachment_key(container_id: &str, network_id: &str) -> String {
    format!("{container_id}/{network_id}")
}

/// A CNI ADD that succeeded, kept so that DEL gets the same arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniRecord {
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// The config's name.
    pub config_name: String,
    /// CNI_IFNAME.
    pub ifname: String,
    /// CNI_NETNS.
    pub netns_path: String,
    /// CNI_ARGS.
    pub args: BTreeMap<String, String>,
    /// The conflist used for ADD (JSON), so DEL works after the file changes.
    pub config: serde_json::Value,
    /// runtimeConfig capabilities given at ADD.
    pub runtime_config: serde_json::Map<String, serde_json::Value>,
    /// The result of the chain (JSON).
    pub result: serde_json::Value,
    /// Creation time, nanoseconds since the epoch.
    pub created_ns: i64,
}

impl CniRecord {
    /// The store key.
    pub fn key(&self) -> String {
        cni_key(&self.container_id, &self.config_name, &self.ifname)
    }
}

/// The store key of a CNI attachment.
pub fn cni_key(container_id: &str, config_name: &str, ifname: &str) -> String {
    format!("{container_id}/{config_name}/{ifname}")
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}
