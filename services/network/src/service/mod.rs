//! The network service: networks, attachments and CNI attachments as records, address and port
//! allocation, and the host effects that make them real, in an order that survives `kill -9`
//! at any point: records are written before the kernel is touched, and at start every record
//! is replayed against the kernel (missing bridges and rules are recreated, attachments whose
//! namespace is gone are cleaned up).
//!
//! All methods are synchronous (redb, netlink on helper threads, iptables processes); the gRPC
//! layer runs them on blocking threads. One mutex orders all changes to the records; attach and
//! detach hold it only to allocate and record, and do their kernel work (veths, routes, rules)
//! outside it, so calls for different containers overlap. Calls for one container run one at a
//! time ([`Busy`]).
//!
//! A detached endpoint keeps its addresses and host ports ([`Releasing`]) until its veth is
//! gone, so an address is never handed out while the old namespace could still answer for it.
//! When the namespace was already removed at detach (a container being torn down), the kernel
//! deletes the veth with the namespace, batched, and a reaper thread frees the addresses once
//! the link has vanished; deleting the veth ourselves would wait for RTNL and an RCU grace
//! period (15-25 ms each, serialised).
//!
//! The service's methods are kept by seam: networks in `networks.rs`, container attachments in
//! `attach.rs`, CNI attachments in `cni_attach.rs`; start-up and recovery here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use berth_core::id::{Id, ObjectKind};
use berth_core::{Config, Context, Error, Result, Service};
use serde_json::{Map, Value};

use crate::cni::{self, CniConfigFile, CniResult, Invocation, PluginExec};
use crate::dns::{self, Addresses, DnsServers, DnsView, SharedView};
use crate::events::EventSink;
use crate::ipam::{self, Cidr, DefaultPool, Pool};
use crate::kernel::{BridgeSpec, Dataplane, EndpointSpec, Firewall, Host, PortProxy};
use crate::model::{
    AttachmentRecord, CniRecord, Driver, NetworkRecord, OPT_BRIDGE_NAME, OPT_DEFAULT_BRIDGE,
    OPT_HOST_BINDING_IPV4, OPT_ICC, OPT_MASQUERADE, OPT_MTU, attachment_key, cni_key, now_ns,
};
use crate::ports::{self, Held, PortRequest, Proto};
use crate::rules::{self, Chains};
use crate::store::{Op, Store};

/// What the service takes from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `network.redb`.
    pub db_path: PathBuf,
    /// The default bridge's interface.
    pub default_bridge: String,
    /// The default bridge's address (gateway).
    pub bip_gateway: IpAddr,
    /// The default bridge's subnet.
    pub bip_subnet: Cidr,
    /// Where user networks get subnets.
    pub pools: Vec<DefaultPool>,
    /// Default MTU.
    pub mtu: u32,
    /// Configured DNS servers (upstreams and resolv.conf of non-DNS networks).
    pub dns: Vec<String>,
    /// Configured search domains.
    pub dns_search: Vec<String>,
    /// Configured resolv.conf options.
    pub dns_options: Vec<String>,
    /// CNI config directory.
    pub cni_conf_dir: PathBuf,
    /// CNI plugin directories, in search order.
    pub cni_bin_dirs: Vec<PathBuf>,
    /// Port of the network resolvers (53).
    pub dns_port: u16,
}

impl Settings {
    /// Reads and validates the `[network]` section.
    pub fn from_config(cfg: &Config) -> Result<Self> {
        let n = &cfg.network;
        let (gw, subnet) = Cidr::parse_with_host(&n.bip)
            .map_err(|e| Error::invalid_argument(format!("network.bip: {}", e.message())))?;
        if !subnet.is_v4() || gw == subnet.network() {
            return Err(Error::invalid_argument(format!(
                "network.bip: {:?} must be an IPv4 host address with a prefix, e.g. 172.29.0.1/16",
                n.bip
            )));
        }
        validate_ifname(&n.bridge)
            .map_err(|e| Error::invalid_argument(format!("network.bridge: {}", e.message())))?;
        let pools = n
            .default_address_pools
            .iter()
            .map(|p| DefaultPool::new(&p.base, p.size))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| {
                Error::invalid_argument(format!("network.default_address_pools: {}", e.message()))
            })?;
        if !(68..=65535).contains(&n.mtu) {
            return Err(Error::invalid_argument(format!(
                "network.mtu: {} is out of range",
                n.mtu
            )));
        }
        for s in &n.dns {
            s.parse::<IpAddr>().map_err(|_| {
                Error::invalid_argument(format!("network.dns: {s:?} is not an IP address"))
            })?;
        }
        Ok(Self {
            db_path: cfg.data_dir(Service::Network).join("network.redb"),
            default_bridge: n.bridge.clone(),
            bip_gateway: gw,
            bip_subnet: subnet,
            pools,
            mtu: n.mtu,
            dns: n.dns.clone(),
            dns_search: n.dns_search.clone(),
            dns_options: n.dns_options.clone(),
            cni_conf_dir: n.cni_conf_dir.clone(),
            cni_bin_dirs: n.cni_bin_dirs.clone(),
            dns_port: 53,
        })
    }
}

/// The host effects the service uses.
#[derive(Clone)]
pub struct Deps {
    /// Links and addresses.
    pub dataplane: Arc<dyn Dataplane>,
    /// Packet filter.
    pub firewall: Arc<dyn Firewall>,
    /// Ports and resolvers of the host.
    pub host: Arc<dyn Host>,
    /// Serves published ports on the host when netfilter cannot (rootless).
    pub proxy: Arc<dyn PortProxy>,
    /// CNI plugins.
    pub cni: Arc<dyn PluginExec>,
    /// Events.
    pub events: Arc<dyn EventSink>,
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deps").finish_non_exhaustive()
    }
}

/// One address pool of a create request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolRequest {
    /// CIDR or "".
    pub subnet: String,
    /// Address or "".
    pub gateway: String,
    /// CIDR or "".
    pub ip_range: String,
    /// Reserved addresses by name.
    pub aux_addresses: BTreeMap<String, String>,
}

/// A create request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateNetwork {
    /// Name.
    pub name: String,
    /// "" or "bridge".
    pub driver: String,
    /// "" or "default".
    pub ipam_driver: String,
    /// Pools (at most one IPv4 and one IPv6).
    pub pools: Vec<PoolRequest>,
    /// IPAM options.
    pub ipam_options: BTreeMap<String, String>,
    /// IPv6.
    pub enable_ipv6: bool,
    /// No route out.
    pub internal: bool,
    /// Attachable.
    pub attachable: bool,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Driver options.
    pub options: BTreeMap<String, String>,
}

/// An attach request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachRequest {
    /// 64 hex.
    pub container_id: String,
    /// Name (DNS).
    pub container_name: String,
    /// Hostname (DNS, hosts).
    pub hostname: String,
    /// Namespace path.
    pub netns_path: String,
    /// Network id, prefix or name.
    pub network: String,
    /// "" = next free ethN.
    pub ifname: String,
    /// Aliases (DNS).
    pub aliases: Vec<String>,
    /// Static IPv4.
    pub ipv4: Option<IpAddr>,
    /// Static IPv6.
    pub ipv6: Option<IpAddr>,
    /// Static MAC.
    pub mac: Option<[u8; 6]>,
    /// Ports to publish.
    pub ports: Vec<PortRequest>,
    /// Publish every exposed port on a random host port.
    pub publish_all: bool,
    /// Exposed ports.
    pub exposed: Vec<(u16, Proto)>,
    /// The container's --dns.
    pub dns_servers: Vec<String>,
    /// The container's --dns-search.
    pub dns_search: Vec<String>,
    /// The container's --dns-option.
    pub dns_options: Vec<String>,
    /// Default route priority.
    pub gw_priority: i32,
    /// Legacy links.
    pub links: Vec<String>,
}

/// A network with its endpoints.
#[derive(Debug, Clone)]
pub struct NetworkInfo {
    /// The record.
    pub record: NetworkRecord,
    /// Its attachments.
    pub endpoints: Vec<AttachmentRecord>,
}

/// An attachment with what the engine needs to set up the container.
#[derive(Debug, Clone, PartialEq)]
pub struct AttachmentInfo {
    /// The record.
    pub record: AttachmentRecord,
    /// The network's name.
    pub network_name: String,
    /// resolv.conf nameservers.
    pub dns_servers: Vec<String>,
    /// resolv.conf search.
    pub dns_search: Vec<String>,
    /// resolv.conf options.
    pub dns_options: Vec<String>,
    /// /etc/hosts entries.
    pub hosts: Vec<(IpAddr, Vec<String>)>,
}

/// A CNI ADD request.
#[derive(Debug, Clone, Default)]
pub struct CniAttachRequest {
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_NETNS.
    pub netns_path: String,
    /// Config name, "" = the first.
    pub config_name: String,
    /// CNI_IFNAME, "" = eth0.
    pub ifname: String,
    /// CNI_ARGS.
    pub args: BTreeMap<String, String>,
    /// runtimeConfig by capability.
    pub runtime_config: Map<String, Value>,
}

/// How long a deferred release waits for the kernel to remove a veth with its namespace before
/// deleting it itself (something else still holds the namespace).
const RELEASE_WAIT: Duration = Duration::from_secs(3);
/// How often the reaper looks for the veths of deferred releases while there are any.
const REAP_INTERVAL: Duration = Duration::from_millis(20);

/// A detached endpoint whose veth may still be in the kernel. Its addresses and host ports stay
/// taken, and its record stays in the store (so a restart cleans it up), until the link is gone.
#[derive(Debug, Clone)]
struct Releasing {
    att: AttachmentRecord,
    /// When it was detached.
    since: Instant,
    /// The namespace was gone at detach: the kernel removes the veth with it and the reaper
    /// only waits for that. Otherwise the detaching call deletes the veth itself.
    deferred: bool,
}

struct State {
    store: Store,
    networks: BTreeMap<String, NetworkRecord>,
    attachments: BTreeMap<String, AttachmentRecord>,
    /// By endpoint id.
    releasing: BTreeMap<String, Releasing>,
    cni: BTreeMap<String, CniRecord>,
    dns: Option<DnsServers>,
}

impl State {
    fn resolve(&self, input: &str) -> Result<&NetworkRecord> {
        let pairs: Vec<(&str, &str)> = self
            .networks
            .values()
            .map(|n| (n.id.as_str(), n.name.as_str()))
            .collect();
        let id = berth_core::id::resolve(ObjectKind("network"), input, pairs)?;
        Ok(&self.networks[id])
    }

    fn endpoints_of(&self, network_id: &str) -> Vec<&AttachmentRecord> {
        self.attachments
            .values()
            .filter(|a| a.network_id == network_id)
            .collect()
    }

    fn of_container(&self, container_id: &str) -> Vec<&AttachmentRecord> {
        self.attachments
            .values()
            .filter(|a| a.container_id == container_id)
            .collect()
    }

    /// Endpoints of `network_id` whose addresses are still taken: attached or releasing.
    fn holders_of(&self, network_id: &str) -> Vec<&AttachmentRecord> {
        self.attachments
            .values()
            .chain(self.releasing.values().map(|r| &r.att))
            .filter(|a| a.network_id == network_id)
            .collect()
    }

    /// Ends the releases of `endpoint_ids` (their veths are gone): deletes their records in one
    /// transaction and frees their addresses.
    fn finish_release(&mut self, endpoint_ids: &[String]) -> Result<()> {
        let done: Vec<AttachmentRecord> = endpoint_ids
            .iter()
            .filter_map(|id| self.releasing.get(id).map(|r| r.att.clone()))
            .collect();
        if done.is_empty() {
            return Ok(());
        }
        // A new attachment of the same container and network (a restart) may have replaced
        // the stored record already; that one stays.
        let ops: Vec<Op> =
            done.iter()
                .filter(|a| {
                    let key = a.key();
                    !self.attachments.contains_key(&key)
                        && !self.releasing.values().any(|r| {
                            r.att.key() == key && !endpoint_ids.contains(&r.att.endpoint_id)
                        })
                })
                .map(|a| Op::DeleteAttachment(a.key()))
                .collect();
        if !ops.is_empty() {
            self.store.apply(&ops)?;
        }
        for a in &done {
            self.releasing.remove(&a.endpoint_id);
        }
        Ok(())
    }
}

fn lock_state(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Containers with an attach or detach under way: calls for one container run one at a time
/// (their kernel work runs outside the state lock), calls for different containers overlap.
#[derive(Default)]
struct Busy {
    ids: Mutex<BTreeSet<String>>,
    freed: Condvar,
}

struct BusyGuard<'a> {
    busy: &'a Busy,
    id: String,
}

impl Busy {
    fn enter(&self, id: &str) -> BusyGuard<'_> {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        while ids.contains(id) {
            ids = self.freed.wait(ids).unwrap_or_else(|e| e.into_inner());
        }
        ids.insert(id.to_string());
        BusyGuard {
            busy: self,
            id: id.to_string(),
        }
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        let mut ids = self.busy.ids.lock().unwrap_or_else(|e| e.into_inner());
        ids.remove(&self.id);
        self.busy.freed.notify_all();
    }
}

/// One pass of the reaper: ends the deferred releases whose veth is gone, and deletes the veth
/// of those that waited [`RELEASE_WAIT`] in vain. Returns whether deferred releases are left.
fn reap(state: &Mutex<State>, dataplane: &dyn Dataplane) -> bool {
    let pending: Vec<(String, String, Instant)> = lock_state(state)
        .releasing
        .values()
        .filter(|r| r.deferred)
        .map(|r| {
            (
                r.att.endpoint_id.clone(),
                r.att.host_ifname.clone(),
                r.since,
            )
        })
        .collect();
    if pending.is_empty() {
        return false;
    }
    let links = match dataplane.link_names() {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e.chain(), "reaper: cannot list links");
            return true;
        }
    };
    let mut done = Vec::new();
    for (endpoint_id, ifname, since) in pending {
        if ifname.is_empty() || !links.contains(&ifname) {
            done.push(endpoint_id);
        } else if since.elapsed() >= RELEASE_WAIT {
            match dataplane.delete_endpoint(&ifname) {
                Ok(()) => {
                    tracing::info!(veth = ifname, "namespace outlived its detach; veth deleted");
                    done.push(endpoint_id);
                }
                Err(e) => {
                    tracing::warn!(veth = ifname, error = %e.chain(), "reaper: cannot delete veth")
                }
            }
        }
    }
    let mut st = lock_state(state);
    if let Err(e) = st.finish_release(&done) {
        tracing::error!(error = %e.chain(), "reaper: cannot drop released attachments");
    }
    st.releasing.values().any(|r| r.deferred)
}

/// The reaper thread; stopped and joined when the service is dropped (so the store is closed
/// when `NetworkService` is gone).
struct Reaper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Reaper {
    fn start(state: Arc<Mutex<State>>, dataplane: Arc<dyn Dataplane>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("berth-net-reaper".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    let pending = reap(&state, dataplane.as_ref());
                    std::thread::park_timeout(if pending {
                        REAP_INTERVAL
                    } else {
                        Duration::from_secs(60)
                    });
                }
            })
            .internal(|| "spawn the reaper thread".into())?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    fn wake(&self) {
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// The service.
pub struct NetworkService {
    state: Arc<Mutex<State>>,
    busy: Busy,
    reaper: Reaper,
    deps: Deps,
    settings: Settings,
    chains: Chains,
    view: SharedView,
}

impl std::fmt::Debug for NetworkService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkService")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Interface names: 1 to 15 bytes, no '/', ':' or whitespace.
pub fn validate_ifname(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_argument(format!(
            "invalid interface name {name:?}: 1 to 15 characters without '/', ':' or spaces"
        )))
    }
}

/// Docker accepts any network name that is not blank ("my net" included): names are only
/// looked up, never used in paths or interface names (bridges are named from the id).
fn validate_network_name(name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(Error::invalid_argument(format!("invalid name: {name}")));
    }
    Ok(())
}

fn parse_bool_opt(key: &str, value: Option<&String>, default: bool) -> Result<bool> {
    match value.map(|s| s.to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if v == "true" || v == "1" => Ok(true),
        Some(v) if v == "false" || v == "0" => Ok(false),
        Some(v) => Err(Error::invalid_argument(format!(
            "option {key}: {v:?} is not true or false"
        ))),
    }
}

fn v4(ip: Option<IpAddr>) -> Option<Ipv4Addr> {
    match ip {
        Some(IpAddr::V4(a)) => Some(a),
        _ => None,
    }
}

fn v6(ip: Option<IpAddr>) -> Option<Ipv6Addr> {
    match ip {
        Some(IpAddr::V6(a)) => Some(a),
        _ => None,
    }
}

fn first_non_empty(lists: [&[String]; 3]) -> Vec<String> {
    lists
        .into_iter()
        .find(|l| !l.is_empty())
        .map(<[String]>::to_vec)
        .unwrap_or_default()
}

/// `search` and `options` of a resolv.conf.
fn resolv_conf_lists(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(key))
        .filter(|rest| rest.starts_with([' ', '\t']))
        .flat_map(|rest| rest.split_whitespace().map(str::to_string))
        .collect()
}

/// Nanoseconds for a prune `until`: Unix seconds (with fraction), an RFC 3339 date or
/// date-time, or a duration (`10m`, `24h`, `1h30m`) before now.
pub fn parse_until(s: &str, now_ns: i64) -> Result<i64> {
    let bad = || Error::invalid_argument(format!("invalid until filter {s:?}"));
    if let Ok(secs) = s.parse::<f64>() {
        return Ok((secs * 1e9) as i64);
    }
    // Go-style duration.
    if s.ends_with(['h', 'm', 's']) && s.starts_with(|c: char| c.is_ascii_digit()) {
        let mut total: f64 = 0.0;
        let mut num = String::new();
        for c in s.chars() {
            if c.is_ascii_digit() || c == '.' {
                num.push(c);
                continue;
            }
            let n: f64 = num.parse().map_err(|_| bad())?;
            num.clear();
            total += n * match c {
                'h' => 3600.0,
                'm' => 60.0,
                's' => 1.0,
                _ => return Err(bad()),
            };
        }
        if !num.is_empty() {
            return Err(bad());
        }
        return Ok(now_ns - (total * 1e9) as i64);
    }
    // RFC 3339: YYYY-MM-DD[THH:MM:SS[.frac](Z|±HH:MM)].
    let num = |x: &str| x.parse::<i64>().map_err(|_| bad());
    let (date, time) = s.split_once('T').unwrap_or((s, "00:00:00Z"));
    let d: Vec<&str> = date.split('-').collect();
    if d.len() != 3 {
        return Err(bad());
    }
    let (y, mo, da) = (num(d[0])?, num(d[1])?, num(d[2])?);
    let (clock, offset) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0)
    } else if let Some(pos) = time.rfind(['+', '-']) {
        let (c, off) = time.split_at(pos);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (oh, om) = off[1..].split_once(':').ok_or_else(bad)?;
        (c, sign * (num(oh)? * 3600 + num(om)? * 60))
    } else {
        (time, 0)
    };
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let t: Vec<&str> = hms.split(':').collect();
    if t.len() != 3 || !(1..=12).contains(&mo) || !(1..=31).contains(&da) {
        return Err(bad());
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs = days * 86400 + num(t[0])? * 3600 + num(t[1])? * 60 + num(t[2])? - offset;
    let frac_ns = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        num(&format!("{digits:0<9}"))?
    };
    Ok(secs * 1_000_000_000 + frac_ns)
}

/// The address of a new endpoint: the requested one (checked), else `preferred` when still
/// free, else the next free one after `last`.
fn pick_address(
    pool: &Pool,
    requested: Option<IpAddr>,
    preferred: Option<IpAddr>,
    used: &BTreeSet<IpAddr>,
    last: Option<IpAddr>,
) -> Result<IpAddr> {
    match requested {
        Some(ip) if ip.is_ipv4() != pool.subnet.is_v4() => Err(Error::invalid_argument(format!(
            "{ip} is not an {} address",
            if pool.subnet.is_v4() { "IPv4" } else { "IPv6" }
        ))),
        Some(ip) => pool.check_static(ip, used).map(|()| ip),
        None => match preferred {
            Some(ip) if pool.check_static(ip, used).is_ok() => Ok(ip),
            _ => pool.allocate(used, last),
        },
    }
}

fn label_matches(labels: &BTreeMap<String, String>, filter: &str) -> bool {
    match filter.split_once('=') {
        Some((k, v)) => labels.get(k).is_some_and(|x| x == v),
        None => labels.contains_key(filter),
    }
}

/// Groups filter terms by key and checks the keys against `allowed`.
fn group_filters<'a>(
    filters: &'a [(String, String)],
    allowed: &[&str],
) -> Result<BTreeMap<&'a str, Vec<&'a str>>> {
    let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (k, v) in filters {
        if !allowed.contains(&k.as_str()) {
            return Err(Error::invalid_argument(format!("invalid filter '{k}'")));
        }
        out.entry(k.as_str()).or_default().push(v.as_str());
    }
    Ok(out)
}

impl NetworkService {
    /// Opens the store and brings the kernel in line with it (see the module docs). `runtime`
    /// runs the DNS resolvers; without one (unit tests) no resolver listens.
    pub fn open(
        settings: Settings,
        deps: Deps,
        runtime: Option<tokio::runtime::Handle>,
    ) -> Result<Self> {
        let store = Store::open(&settings.db_path)?;
        let snap = store.load()?;
        let view = SharedView::default();
        let state = State {
            store,
            networks: snap
                .networks
                .into_iter()
                .map(|n| (n.id.clone(), n))
                .collect(),
            attachments: snap.attachments.into_iter().map(|a| (a.key(), a)).collect(),
            releasing: BTreeMap::new(),
            cni: snap.cni.into_iter().map(|c| (c.key(), c)).collect(),
            dns: runtime.map(|rt| DnsServers::new(view.clone(), settings.dns_port, rt)),
        };
        let chains = Chains::for_default_bridge(&settings.default_bridge);
        let state = Arc::new(Mutex::new(state));
        let reaper = Reaper::start(state.clone(), deps.dataplane.clone())?;
        let svc = Self {
            state,
            busy: Busy::default(),
            reaper,
            deps,
            settings,
            chains,
            view,
        };
        svc.recover()?;
        Ok(svc)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock_state(&self.state)
    }

    /// Deletes the veths of the releasing endpoints that match `pred` now and frees their
    /// addresses (an address or port asked for again, a network being removed).
    fn force_release(
        &self,
        st: &mut State,
        pred: impl Fn(&AttachmentRecord) -> bool,
    ) -> Result<()> {
        let hit: Vec<(String, String)> = st
            .releasing
            .values()
            .filter(|r| pred(&r.att))
            .map(|r| (r.att.endpoint_id.clone(), r.att.host_ifname.clone()))
            .collect();
        for (_, ifname) in hit.iter().filter(|(_, i)| !i.is_empty()) {
            self.deps.dataplane.delete_endpoint(ifname)?;
        }
        let ids: Vec<String> = hit.into_iter().map(|(id, _)| id).collect();
        st.finish_release(&ids)
    }

    /// Runs one reaper pass now (tests).
    #[cfg(test)]
    fn reap_now(&self) -> bool {
        reap(&self.state, self.deps.dataplane.as_ref())
    }

    /// The chains of this stack.
    pub fn chains(&self) -> &Chains {
        &self.chains
    }

    fn builtin_records(&self, st: &State) -> Vec<NetworkRecord> {
        let find = |name: &str| {
            st.networks
                .values()
                .find(|n| n.builtin && n.name == name)
                .cloned()
        };
        let base = |name: &str, driver: Driver| NetworkRecord {
            id: Id::random().to_string(),
            name: name.into(),
            driver,
            created_ns: now_ns(),
            internal: false,
            attachable: false,
            enable_ipv6: false,
            ipam_driver: "default".into(),
            ipam_options: BTreeMap::new(),
            ipv4: None,
            ipv6: None,
            options: BTreeMap::new(),
            labels: BTreeMap::new(),
            bridge: String::new(),
            builtin: true,
            dns_enabled: false,
            mtu: self.settings.mtu,
            icc: true,
            masquerade: true,
            host_binding_ipv4: None,
            last_ipv4: None,
            last_ipv6: None,
        };
        let s = &self.settings;
        let mut bridge = find("bridge").unwrap_or_else(|| base("bridge", Driver::Bridge));
        bridge.bridge = s.default_bridge.clone();
        bridge.mtu = s.mtu;
        let pool = Pool {
            subnet: s.bip_subnet,
            gateway: s.bip_gateway,
            ip_range: None,
            aux_addresses: BTreeMap::new(),
            user_subnet: true,
        };
        bridge.ipv4 = Some(pool);
        bridge.options = BTreeMap::from([
            (OPT_BRIDGE_NAME.to_string(), s.default_bridge.clone()),
            (OPT_DEFAULT_BRIDGE.to_string(), "true".to_string()),
            (OPT_ICC.to_string(), "true".to_string()),
            (OPT_MASQUERADE.to_string(), "true".to_string()),
            (OPT_HOST_BINDING_IPV4.to_string(), "0.0.0.0".to_string()),
            (OPT_MTU.to_string(), s.mtu.to_string()),
        ]);
        vec![
            bridge,
            find("host").unwrap_or_else(|| base("host", Driver::Host)),
            find("none").unwrap_or_else(|| base("none", Driver::Null)),
        ]
    }

    fn bridge_spec(net: &NetworkRecord) -> BridgeSpec {
        let addresses = net
            .ipv4
            .iter()
            .chain(net.ipv6.iter())
            .map(|p| (p.gateway, p.subnet.prefix()))
            .collect();
        BridgeSpec {
            name: net.bridge.clone(),
            mtu: net.mtu,
            addresses,
        }
    }

    fn endpoint_spec(net: &NetworkRecord, att: &AttachmentRecord) -> Result<EndpointSpec> {
        let mut addresses = Vec::new();
        if let Some(ip) = att.ipv4 {
            addresses.push((ip, att.ipv4_prefix));
        }
        if let Some(ip) = att.ipv6 {
            addresses.push((ip, att.ipv6_prefix));
        }
        Ok(EndpointSpec {
            netns_path: PathBuf::from(&att.netns_path),
            bridge: net.bridge.clone(),
            host_ifname: att.host_ifname.clone(),
            ifname: att.ifname.clone(),
            mac: ipam::parse_mac(&att.mac)?,
            mtu: net.mtu,
            addresses,
            gateway_v4: if att.default_route {
                v4(att.ipv4_gateway)
            } else {
                None
            },
            gateway_v6: if att.default_route {
                v6(att.ipv6_gateway)
            } else {
                None
            },
        })
    }

    /// Creates the bridge, turns on forwarding and installs the rules of `net`.
    fn realize_network(&self, net: &NetworkRecord) -> Result<()> {
        if !net.is_bridge() {
            return Ok(());
        }
        self.deps.dataplane.ensure_bridge(&Self::bridge_spec(net))?;
        if !net.internal {
            self.deps.dataplane.enable_forwarding()?;
        }
        self.deps
            .firewall
            .ensure(&rules::network_rules(&self.chains, net))
    }

    fn recover(&self) -> Result<()> {
        let mut st = self.lock();
        // The predefined networks, following the configuration.
        for want in self.builtin_records(&st) {
            let old = st.networks.get(&want.id).cloned();
            if old.as_ref() == Some(&want) {
                continue;
            }
            if let Some(old) = &old {
                // Rules are matched by comment, so rules rendered from the old settings would
                // count as present: drop them first.
                self.deps
                    .firewall
                    .remove(&[self.chains.network_tag(&old.id)])?;
                if old.bridge != want.bridge {
                    tracing::warn!(
                        old = old.bridge,
                        new = want.bridge,
                        "default bridge renamed; the old bridge is left alone"
                    );
                }
            }
            st.store.apply(&[Op::PutNetwork(&want)])?;
            st.networks.insert(want.id.clone(), want);
        }

        self.deps
            .firewall
            .ensure(&rules::base_rules(&self.chains))?;
        let mut rules = Vec::new();
        let mut forwarding = false;
        for net in st.networks.values().filter(|n| n.is_bridge()) {
            if let Err(e) = self.deps.dataplane.ensure_bridge(&Self::bridge_spec(net)) {
                tracing::error!(network = net.name, bridge = net.bridge, error = %e.chain(), "cannot restore bridge");
            }
            forwarding |= !net.internal;
            rules.extend(rules::network_rules(&self.chains, net));
        }
        if forwarding {
            self.deps.dataplane.enable_forwarding()?;
        }

        // Attachments: drop the ones whose namespace is gone, restore the others.
        let mut stale = Vec::new();
        for att in st.attachments.values() {
            if att.netns_path.is_empty() {
                continue;
            }
            if !self.deps.dataplane.netns_alive(Path::new(&att.netns_path)) {
                stale.push(att.clone());
                continue;
            }
            let Some(net) = st.networks.get(&att.network_id) else {
                continue;
            };
            if !att.host_ifname.is_empty() && !self.deps.dataplane.link_exists(&att.host_ifname)? {
                // The namespace lives but its veth is gone (a crash during attach, or someone
                // deleted it): make it again.
                let made = Self::endpoint_spec(net, att)
                    .and_then(|s| self.deps.dataplane.create_endpoint(&s));
                if let Err(e) = made {
                    tracing::error!(container = att.container_id, network = net.name, error = %e.chain(), "cannot restore endpoint");
                }
            }
            rules.extend(rules::port_rules(&self.chains, att));
            if !att.ports.is_empty()
                && let Err(e) = self.deps.proxy.publish(att)
            {
                tracing::error!(container = att.container_id, network = net.name, error = %e.chain(), "cannot publish ports on the host");
            }
        }
        self.deps.firewall.ensure(&rules)?;
        if !stale.is_empty() {
            let tags: Vec<String> = stale
                .iter()
                .map(|a| self.chains.endpoint_tag(&a.endpoint_id))
                .collect();
            self.deps.firewall.remove(&tags)?;
            for att in &stale {
                if !att.host_ifname.is_empty() {
                    self.deps.dataplane.delete_endpoint(&att.host_ifname)?;
                }
                tracing::info!(
                    container = att.container_id,
                    network = att.network_id,
                    netns = att.netns_path,
                    "namespace gone, attachment removed"
                );
            }
            let ops: Vec<Op> = stale
                .iter()
                .map(|a| Op::DeleteAttachment(a.key()))
                .collect();
            st.store.apply(&ops)?;
            for att in &stale {
                st.attachments.remove(&att.key());
            }
        }

        // Rules of this stack for networks or endpoints it has no record of (records lost, or
        // an earlier stack on the same default bridge with another root) would shadow or
        // duplicate ours: sweep them.
        let tag = self.chains.tag();
        let known: BTreeSet<String> = st
            .networks
            .keys()
            .map(|id| self.chains.network_tag(id))
            .chain(
                st.attachments
                    .values()
                    .map(|a| self.chains.endpoint_tag(&a.endpoint_id)),
            )
            .collect();
        let orphans: BTreeSet<String> = self
            .deps
            .firewall
            .comments(&tag)?
            .into_iter()
            .filter(|c| c.starts_with(&format!("{tag}net:")) || c.starts_with(&format!("{tag}ep:")))
            .filter_map(|c| {
                // "<tag><net|ep>:<id12>:<what>" -> "<tag><net|ep>:<id12>:"
                let rest = &c[tag.len()..];
                let mut parts = rest.splitn(3, ':');
                let scope = format!("{tag}{}:{}:", parts.next()?, parts.next()?);
                (!known.contains(&scope)).then_some(scope)
            })
            .collect();
        if !orphans.is_empty() {
            tracing::info!(
                count = orphans.len(),
                "removing rules of unknown networks and endpoints"
            );
            self.deps
                .firewall
                .remove(&orphans.into_iter().collect::<Vec<_>>())?;
        }

        // CNI attachments whose namespace is gone, or whose ADD never finished: DEL them so
        // their addresses are released.
        let gone: Vec<CniRecord> = st
            .cni
            .values()
            .filter(|c| {
                c.result.is_null() || !self.deps.dataplane.netns_alive(Path::new(&c.netns_path))
            })
            .cloned()
            .collect();
        for rec in gone {
            if let Err(e) = self.cni_del(&rec) {
                tracing::warn!(container = rec.container_id, config = rec.config_name, error = %e.chain(), "cni delete of a stale attachment failed");
            }
            st.store.apply(&[Op::DeleteCni(rec.key())])?;
            st.cni.remove(&rec.key());
        }

        for (net, e) in self.refresh_dns(&mut st) {
            tracing::error!(network = net, error = %e.chain(), "cannot start the network's resolver");
        }
        Ok(())
    }

    /// Rebuilds the DNS view and starts/stops resolvers. Returns per-network resolver errors.
    fn refresh_dns(&self, st: &mut State) -> Vec<(String, Error)> {
        let gateways: BTreeSet<IpAddr> = st
            .networks
            .values()
            .filter(|n| n.dns_enabled)
            .filter_map(|n| n.ipv4.as_ref().map(|p| p.gateway))
            .collect();
        let configured = if self.settings.dns.is_empty() {
            dns::resolv_conf_nameservers(&self.deps.host.resolv_conf())
        } else {
            self.settings.dns.clone()
        };
        let upstreams: Vec<SocketAddr> = configured
            .iter()
            .filter_map(|s| dns::parse_upstream(s))
            .filter(|sa| !gateways.contains(&sa.ip()))
            .collect();
        self.view
            .set(DnsView::build(&st.networks, &st.attachments, upstreams));
        let want: BTreeMap<String, IpAddr> = st
            .networks
            .values()
            .filter(|n| n.dns_enabled)
            .filter_map(|n| n.ipv4.as_ref().map(|p| (n.id.clone(), p.gateway)))
            .collect();
        match st.dns.as_mut() {
            Some(servers) => servers.sync(&want),
            None => Vec::new(),
        }
    }

    /// The address the resolver of `network_id` listens on, when it runs.
    pub fn resolver_addr(&self, network_id: &str) -> Option<SocketAddr> {
        self.lock()
            .dns
            .as_ref()
            .and_then(|d| d.local_addr(network_id))
    }
}

mod attach;
mod cni_attach;
mod networks;

#[cfg(test)]
mod tests;
