//! The host effects berth-network has, as traits: links and addresses ([`Dataplane`]), packet
//! filter rules ([`Firewall`]) and facts about the host ([`Host`]).
//!
//! The service only talks to these traits, so its record logic runs in unit tests against
//! recording fakes; the real implementations (`netlink`, `iptables`, `host`) are exercised by
//! the root-only integration tests.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use berth_core::Result;

use crate::ipam::Cidr;
use crate::model::AttachmentRecord;
use crate::ports::PortProbe;

/// A bridge as it should exist: name, MTU, addresses (gateway/prefix), up, and the sysctls
/// published ports need (`route_localnet`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSpec {
    /// Interface name.
    pub name: String,
    /// MTU.
    pub mtu: u32,
    /// Addresses with prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
}

/// A container endpoint: a veth pair with one end on `bridge` and the other, named `ifname`,
/// inside the namespace at `netns_path`, addressed and up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// The namespace (a bind-mounted nsfs file or `/proc/<pid>/ns/net`).
    pub netns_path: PathBuf,
    /// The bridge the host end is enslaved to.
    pub bridge: String,
    /// Host end of the veth.
    pub host_ifname: String,
    /// Name inside the namespace.
    pub ifname: String,
    /// MAC of the namespace end.
    pub mac: [u8; 6],
    /// MTU of both ends.
    pub mtu: u32,
    /// Addresses of the namespace end.
    pub addresses: Vec<(IpAddr, u8)>,
    /// IPv4 default route through this gateway.
    pub gateway_v4: Option<Ipv4Addr>,
    /// IPv6 default route through this gateway.
    pub gateway_v6: Option<Ipv6Addr>,
}

/// Links, addresses, routes and the sysctls that go with them.
///
/// Every method is idempotent: creating what exists or deleting what is gone succeeds, because
/// after a `kill -9` berth replays its records against whatever the kernel still holds.
pub trait Dataplane: Send + Sync {
    /// Creates the bridge if missing, sets MTU, adds missing addresses, brings it up and sets
    /// `route_localnet=1` on it (so DNAT from 127.0.0.1 can leave through it).
    fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<()>;
    /// Deletes the bridge; success when it does not exist.
    fn delete_bridge(&self, name: &str) -> Result<()>;
    /// Networks of the addresses configured on the host's interfaces, so new subnets avoid
    /// them.
    fn host_networks(&self) -> Result<Vec<Cidr>>;
    /// Turns on IPv4 forwarding (needed for traffic leaving bridges and for published ports
    /// reached from other namespaces).
    fn enable_forwarding(&self) -> Result<()>;
    /// Creates the endpoint. When the host end already exists the call succeeds without
    /// changes.
    fn create_endpoint(&self, spec: &EndpointSpec) -> Result<()>;
    /// Deletes the veth pair by its host end; success when it is gone.
    fn delete_endpoint(&self, host_ifname: &str) -> Result<()>;
    /// Whether a link of that name exists in the host namespace.
    fn link_exists(&self, name: &str) -> Result<bool>;
    /// The names of every link in the host namespace (one dump, for checking many at once).
    fn link_names(&self) -> Result<BTreeSet<String>>;
    /// Replaces the default routes in the namespace with routes through `ifname` to the
    /// gateways given; `None` removes that family's default route.
    fn set_default_route(
        &self,
        netns_path: &Path,
        ifname: &str,
        gateway_v4: Option<Ipv4Addr>,
        gateway_v6: Option<Ipv6Addr>,
    ) -> Result<()>;
    /// Whether `path` is (still) a network namespace.
    fn netns_alive(&self, path: &Path) -> bool;
}

/// A netfilter table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// `nat`.
    Nat,
    /// `filter`.
    Filter,
}

impl Table {
    /// The table's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nat => "nat",
            Self::Filter => "filter",
        }
    }
}

/// One packet filter rule. The comment identifies it: two rules with the same comment in the
/// same chain are the same rule, so ensuring is a comment lookup and removal is exact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The table.
    pub table: Table,
    /// The chain (created when it is not a built-in one).
    pub chain: String,
    /// Match and target arguments, e.g. `["-o", "br0", "-j", "ACCEPT"]`.
    pub args: Vec<String>,
    /// Unique comment.
    pub comment: String,
    /// Insert at the top of the chain instead of appending (jumps that must come first).
    pub first: bool,
}

/// The packet filter.
pub trait Firewall: Send + Sync {
    /// Adds every rule whose comment is not yet present in its chain, creating the chains.
    fn ensure(&self, rules: &[Rule]) -> Result<()>;
    /// Removes every rule whose comment starts with one of `comment_prefixes`.
    fn remove(&self, comment_prefixes: &[String]) -> Result<()>;
    /// The comments of every rule whose comment starts with `comment_prefix`.
    fn comments(&self, comment_prefix: &str) -> Result<Vec<String>>;
}

/// Serves published ports on the host where netfilter cannot (rootless mode: the bridges live
/// in a network namespace of the stack's own, see [`crate::rootless`]).
pub trait PortProxy: Send + Sync {
    /// Starts serving `att`'s published ports, replacing what served them before.
    fn publish(&self, att: &AttachmentRecord) -> Result<()>;
    /// Stops serving the endpoint's ports (nothing when none are served).
    fn unpublish(&self, endpoint_id: &str);
}

/// Rootful mode: the DNAT rules are all it takes.
#[derive(Debug)]
pub struct NoProxy;

impl PortProxy for NoProxy {
    fn publish(&self, _att: &AttachmentRecord) -> Result<()> {
        Ok(())
    }

    fn unpublish(&self, _endpoint_id: &str) {}
}

/// Facts about the host: free ports, the ephemeral range, resolvers.
pub trait Host: PortProbe {
    /// The host's `/etc/resolv.conf`, "" when unreadable.
    fn resolv_conf(&self) -> String;
}
