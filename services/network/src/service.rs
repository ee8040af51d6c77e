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
use crate::kernel::{BridgeSpec, Dataplane, EndpointSpec, Firewall, Host};
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
    /// CNI plugin directory.
    pub cni_bin_dir: PathBuf,
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
            cni_bin_dir: n.cni_bin_dir.clone(),
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

    // ----------------------------------------------------------------------------------------
    // Networks

    /// Creates a network. Returns it and a warning (empty when none).
    pub fn create_network(&self, req: CreateNetwork) -> Result<(NetworkInfo, String)> {
        validate_network_name(&req.name)?;
        match req.driver.as_str() {
            "" | "bridge" => {}
            d @ ("host" | "null" | "none") => {
                return Err(Error::failed_precondition(format!(
                    "only one instance of \"{d}\" network is allowed"
                )));
            }
            d => {
                return Err(Error::invalid_argument(format!(
                    "network driver {d:?} is not supported (bridge)"
                )));
            }
        }
        if !matches!(req.ipam_driver.as_str(), "" | "default") {
            return Err(Error::invalid_argument(format!(
                "IPAM driver {:?} is not supported (default)",
                req.ipam_driver
            )));
        }
        let opts = &req.options;
        let icc = parse_bool_opt(OPT_ICC, opts.get(OPT_ICC), true)?;
        let masquerade = parse_bool_opt(OPT_MASQUERADE, opts.get(OPT_MASQUERADE), true)?;
        let mtu = match opts.get(OPT_MTU) {
            None => self.settings.mtu,
            Some(v) => v
                .parse::<u32>()
                .ok()
                .filter(|m| (68..=65535).contains(m))
                .ok_or_else(|| {
                    Error::invalid_argument(format!("option {OPT_MTU}: invalid MTU {v:?}"))
                })?,
        };
        let host_binding_ipv4 = match opts.get(OPT_HOST_BINDING_IPV4).map(String::as_str) {
            None | Some("") | Some("0.0.0.0") => None,
            Some(v) => Some(v.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| {
                Error::invalid_argument(format!(
                    "option {OPT_HOST_BINDING_IPV4}: invalid address {v:?}"
                ))
            })?),
        };
        let (mut want_v4, mut want_v6) = (None, None);
        for p in &req.pools {
            if p.subnet.is_empty() {
                if !p.gateway.is_empty() || !p.ip_range.is_empty() || !p.aux_addresses.is_empty() {
                    return Err(Error::invalid_argument(
                        "a gateway, ip-range or auxiliary address needs a subnet",
                    ));
                }
                continue;
            }
            let subnet: Cidr = p.subnet.parse()?;
            let slot = if subnet.is_v4() {
                &mut want_v4
            } else {
                &mut want_v6
            };
            if slot.is_some() {
                return Err(Error::invalid_argument(
                    "only one IPv4 and one IPv6 subnet per network are supported",
                ));
            }
            *slot = Some((subnet, p));
        }
        if want_v6.is_some() && !req.enable_ipv6 {
            return Err(Error::invalid_argument(
                "an IPv6 subnet needs IPv6 enabled on the network",
            ));
        }

        let mut st = self.lock();
        if st.networks.values().any(|n| n.name == req.name) {
            return Err(Error::already_exists(format!(
                "network with name {} already exists",
                req.name
            )));
        }
        let id = Id::random().to_string();
        let bridge = match opts.get(OPT_BRIDGE_NAME) {
            Some(b) => {
                validate_ifname(b)?;
                b.clone()
            }
            None => format!("br-{}", &id[..12]),
        };
        if let Some(other) = st.networks.values().find(|n| n.bridge == bridge) {
            return Err(Error::already_exists(format!(
                "bridge {bridge} is already used by network {}",
                other.name
            )));
        }
        let existing: Vec<Cidr> = st.networks.values().flat_map(|n| n.subnets()).collect();
        let mut host = None;
        let mut pick = |want: Option<(Cidr, &PoolRequest)>, v4: bool| -> Result<Option<Pool>> {
            match want {
                Some((subnet, p)) => {
                    if let Some(o) = existing.iter().find(|o| o.overlaps(&subnet)) {
                        return Err(Error::failed_precondition(format!(
                            "invalid pool request: subnet {subnet} overlaps with {o} of another network"
                        )));
                    }
                    Pool::new(subnet, &p.gateway, &p.ip_range, &p.aux_addresses, true).map(Some)
                }
                None if v4 => {
                    if host.is_none() {
                        host = Some(self.deps.dataplane.host_networks()?);
                    }
                    let mut taken = existing.clone();
                    taken.extend(host.iter().flatten().copied());
                    let subnet = ipam::allocate_subnet(&self.settings.pools, &taken, true)?;
                    Pool::new(subnet, "", "", &BTreeMap::new(), false).map(Some)
                }
                None if req.enable_ipv6 => {
                    // An IPv6 base in the default pools, else a random unique-local /64.
                    let subnet = ipam::allocate_subnet(&self.settings.pools, &existing, false)
                        .unwrap_or_else(|_| ipam::random_ula64());
                    Pool::new(subnet, "", "", &BTreeMap::new(), false).map(Some)
                }
                None => Ok(None),
            }
        };
        let ipv4 = pick(want_v4, true)?;
        let ipv6 = pick(want_v6, false)?;
        let record = NetworkRecord {
            id,
            name: req.name.clone(),
            driver: Driver::Bridge,
            created_ns: now_ns(),
            internal: req.internal,
            attachable: req.attachable,
            enable_ipv6: req.enable_ipv6,
            ipam_driver: if req.ipam_driver.is_empty() {
                "default".into()
            } else {
                req.ipam_driver.clone()
            },
            ipam_options: req.ipam_options.clone(),
            ipv4,
            ipv6,
            options: req.options.clone(),
            labels: req.labels.clone(),
            bridge,
            builtin: false,
            dns_enabled: true,
            mtu,
            icc,
            masquerade,
            host_binding_ipv4,
            last_ipv4: None,
            last_ipv6: None,
        };
        st.store.apply(&[Op::PutNetwork(&record)])?;
        st.networks.insert(record.id.clone(), record.clone());
        if let Err(e) = self.realize_network(&record) {
            let _ = self
                .deps
                .firewall
                .remove(&[self.chains.network_tag(&record.id)]);
            let _ = self.deps.dataplane.delete_bridge(&record.bridge);
            st.networks.remove(&record.id);
            st.store.apply(&[Op::DeleteNetwork(&record.id)])?;
            return Err(e);
        }
        let warning = self
            .refresh_dns(&mut st)
            .into_iter()
            .filter(|(id, _)| *id == record.id)
            .map(|(_, e)| {
                format!(
                    "container name resolution is unavailable on this network: {}",
                    e.chain()
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        tracing::info!(network = record.name, id = record.id, bridge = record.bridge, subnets = ?record.subnets(), "network created");
        self.deps.events.publish(
            "create",
            &record.id,
            BTreeMap::from([
                ("name".into(), record.name.clone()),
                ("type".into(), "bridge".into()),
            ]),
        );
        Ok((
            NetworkInfo {
                record,
                endpoints: Vec::new(),
            },
            warning,
        ))
    }

    /// A network by id, prefix or name.
    pub fn get_network(&self, input: &str) -> Result<NetworkInfo> {
        let st = self.lock();
        let net = st.resolve(input)?;
        Ok(NetworkInfo {
            record: net.clone(),
            endpoints: st.endpoints_of(&net.id).into_iter().cloned().collect(),
        })
    }

    /// Networks matching Docker's filters (driver, id, label, label!, name, scope, type,
    /// dangling).
    pub fn list_networks(&self, filters: &[(String, String)]) -> Result<Vec<NetworkInfo>> {
        let f = group_filters(
            filters,
            &[
                "driver", "id", "label", "label!", "name", "scope", "type", "dangling",
            ],
        )?;
        for t in f.get("type").into_iter().flatten() {
            if !matches!(*t, "builtin" | "custom") {
                return Err(Error::invalid_argument(format!(
                    "invalid filter: 'type'='{t}'"
                )));
            }
        }
        let dangling = match f.get("dangling").map(|v| v.as_slice()) {
            None => None,
            Some([v]) => Some(match v.to_ascii_lowercase().as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "invalid filter 'dangling={v}'"
                    )));
                }
            }),
            Some(_) => {
                return Err(Error::invalid_argument(
                    "only one dangling filter is allowed",
                ));
            }
        };
        let st = self.lock();
        let mut out = Vec::new();
        for net in st.networks.values() {
            let endpoints: Vec<AttachmentRecord> =
                st.endpoints_of(&net.id).into_iter().cloned().collect();
            let any = |key: &str, pred: &dyn Fn(&str) -> bool| {
                f.get(key).is_none_or(|vs| vs.iter().any(|v| pred(v)))
            };
            let keep = any("driver", &|v| {
                v == net.driver.as_str() || (v == "none" && net.driver == Driver::Null)
            }) && any("id", &|v| net.id.starts_with(v))
                && any("name", &|v| net.name.contains(v))
                && any("scope", &|v| v == "local")
                && any("type", &|v| (v == "builtin") == net.builtin)
                && f.get("label")
                    .is_none_or(|vs| vs.iter().all(|v| label_matches(&net.labels, v)))
                && f.get("label!")
                    .is_none_or(|vs| vs.iter().all(|v| !label_matches(&net.labels, v)))
                && dangling.is_none_or(|d| d == (endpoints.is_empty() && !net.builtin));
            if keep {
                out.push(NetworkInfo {
                    record: net.clone(),
                    endpoints,
                });
            }
        }
        out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(out)
    }

    fn remove_network_locked(&self, st: &mut State, id: &str) -> Result<()> {
        let net = st
            .networks
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("No such network: {id}")))?;
        if net.builtin {
            return Err(Error::failed_precondition(format!(
                "{} is a pre-defined network and cannot be removed",
                net.name
            )));
        }
        let endpoints = st.endpoints_of(id);
        if !endpoints.is_empty() {
            let names: Vec<&str> = endpoints
                .iter()
                .map(|a| {
                    if a.container_name.is_empty() {
                        &a.container_id[..12]
                    } else {
                        a.container_name.as_str()
                    }
                })
                .collect();
            return Err(Error::failed_precondition(format!(
                "error while removing network: network {} id {} has active endpoints ({})",
                net.name,
                net.id,
                names.join(", ")
            )));
        }
        self.force_release(st, |a| a.network_id == id)?;
        st.store.apply(&[Op::DeleteNetwork(id)])?;
        st.networks.remove(id);
        for (net_id, e) in self.refresh_dns(st) {
            tracing::warn!(network = net_id, error = %e.chain(), "resolver");
        }
        self.deps.firewall.remove(&[self.chains.network_tag(id)])?;
        self.deps.dataplane.delete_bridge(&net.bridge)?;
        tracing::info!(network = net.name, id = net.id, "network removed");
        self.deps.events.publish(
            "destroy",
            &net.id,
            BTreeMap::from([
                ("name".into(), net.name.clone()),
                ("type".into(), net.driver.as_str().into()),
            ]),
        );
        Ok(())
    }

    /// Removes a network: refused for the predefined ones and while endpoints are attached.
    pub fn delete_network(&self, input: &str) -> Result<()> {
        let mut st = self.lock();
        let id = st.resolve(input)?.id.clone();
        self.remove_network_locked(&mut st, &id)
    }

    /// Removes unused user-defined networks matching the filters (until, label, label!).
    /// Returns their names.
    pub fn prune_networks(&self, filters: &[(String, String)]) -> Result<Vec<String>> {
        let f = group_filters(filters, &["until", "label", "label!"])?;
        let now = now_ns();
        let until = f
            .get("until")
            .map(|vs| {
                vs.iter()
                    .map(|v| parse_until(v, now))
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        let mut st = self.lock();
        let candidates: Vec<(String, String)> = st
            .networks
            .values()
            .filter(|n| !n.builtin && st.endpoints_of(&n.id).is_empty())
            .filter(|n| {
                until
                    .as_ref()
                    .is_none_or(|us| us.iter().any(|u| n.created_ns < *u))
            })
            .filter(|n| {
                f.get("label")
                    .is_none_or(|vs| vs.iter().all(|v| label_matches(&n.labels, v)))
            })
            .filter(|n| {
                f.get("label!")
                    .is_none_or(|vs| vs.iter().all(|v| !label_matches(&n.labels, v)))
            })
            .map(|n| (n.id.clone(), n.name.clone()))
            .collect();
        let mut deleted = Vec::new();
        for (id, name) in candidates {
            match self.remove_network_locked(&mut st, &id) {
                Ok(()) => deleted.push(name),
                Err(e) => {
                    tracing::warn!(network = name, error = %e.chain(), "prune: cannot remove network")
                }
            }
        }
        Ok(deleted)
    }

    // ----------------------------------------------------------------------------------------
    // Attachments

    fn describe(&self, st: &State, att: &AttachmentRecord) -> AttachmentInfo {
        let net = st.networks.get(&att.network_id);
        let resolv = self.deps.host.resolv_conf();
        let host_servers = dns::resolv_conf_nameservers(&resolv);
        let s = &self.settings;
        let dns_search = first_non_empty([
            &att.dns_search,
            &s.dns_search,
            &resolv_conf_lists(&resolv, "search"),
        ]);
        let dns_options = first_non_empty([
            &att.dns_options,
            &s.dns_options,
            &resolv_conf_lists(&resolv, "options"),
        ]);
        let dns_servers = match net {
            Some(n) if n.dns_enabled && att.ipv4_gateway.is_some() => {
                vec![att.ipv4_gateway.map(|g| g.to_string()).unwrap_or_default()]
            }
            Some(n) if n.driver == Driver::Host => {
                first_non_empty([&att.dns_servers, &s.dns, &host_servers])
            }
            _ => {
                // A resolver on the host's loopback is unreachable from the container, as in
                // Docker; fall back to public resolvers when nothing else is left.
                let reachable: Vec<String> = host_servers
                    .iter()
                    .filter(|h| h.parse::<IpAddr>().is_ok_and(|ip| !ip.is_loopback()))
                    .cloned()
                    .collect();
                let mut out = first_non_empty([&att.dns_servers, &s.dns, &reachable]);
                if out.is_empty() {
                    out = vec!["8.8.8.8".into(), "8.8.4.4".into()];
                }
                out
            }
        };
        let mut hosts: Vec<(IpAddr, Vec<String>)> = Vec::new();
        if !att.hostname.is_empty() {
            for ip in att.ips() {
                hosts.push((ip, vec![att.hostname.clone()]));
            }
        }
        if net.is_some_and(|n| !n.dns_enabled) {
            for link in &att.links {
                let (name, alias) = link
                    .split_once(':')
                    .unwrap_or((link.as_str(), link.as_str()));
                let name = name.trim_start_matches('/');
                let alias = alias.trim_start_matches('/');
                let target = st.endpoints_of(&att.network_id).into_iter().find(|o| {
                    o.container_id != att.container_id
                        && (o.container_name == name
                            || (name.len() >= 12 && o.container_id.starts_with(name)))
                });
                if let Some(ip) = target.and_then(|t| t.ipv4) {
                    let mut names = vec![alias.to_string()];
                    if alias != name {
                        names.push(name.to_string());
                    }
                    hosts.push((ip, names));
                }
            }
        }
        AttachmentInfo {
            record: att.clone(),
            network_name: net.map(|n| n.name.clone()).unwrap_or_default(),
            dns_servers,
            dns_search,
            dns_options,
            hosts,
        }
    }

    /// Connects a container's namespace to a network (see `Networks.Attach`).
    pub fn attach(&self, req: AttachRequest) -> Result<AttachmentInfo> {
        if !Id::is_valid(&req.container_id) {
            return Err(Error::invalid_argument(format!(
                "invalid container id {:?}: want 64 lowercase hex characters",
                req.container_id
            )));
        }
        if !req.ifname.is_empty() {
            validate_ifname(&req.ifname)?;
        }
        let _busy = self.busy.enter(&req.container_id);
        let mut st = self.lock();
        let net = st.resolve(&req.network)?.clone();
        let key = attachment_key(&req.container_id, &net.id);
        let mut previous_ipv4 = None;
        if let Some(existing) = st.attachments.get(&key).cloned() {
            let same_netns = existing.netns_path == req.netns_path
                && (existing.netns_path.is_empty()
                    || self
                        .deps
                        .dataplane
                        .netns_alive(Path::new(&existing.netns_path)));
            if same_netns {
                self.restore_endpoint(&net, &existing)?;
                return Ok(self.describe(&st, &existing));
            }
            // The container got a new namespace (it was restarted): replace the endpoint,
            // keeping its address when it can.
            self.drop_endpoint(&existing)?;
            st.store.apply(&[Op::DeleteAttachment(key.clone())])?;
            st.attachments.remove(&key);
            previous_ipv4 = existing.ipv4;
        }
        let others: Vec<AttachmentRecord> = st
            .of_container(&req.container_id)
            .into_iter()
            .cloned()
            .collect();
        let exclusive = |n: &NetworkRecord| matches!(n.driver, Driver::Host | Driver::Null);
        if let Some(o) = others.first() {
            let other_net = st.networks.get(&o.network_id);
            if exclusive(&net) || other_net.is_some_and(exclusive) {
                return Err(Error::failed_precondition(format!(
                    "container {} is attached to network {}: the host and none networks cannot be combined with others",
                    &req.container_id[..12],
                    other_net.map_or("?", |n| n.name.as_str())
                )));
            }
        }
        let mut record = AttachmentRecord {
            container_id: req.container_id.clone(),
            container_name: req.container_name.trim_start_matches('/').to_string(),
            hostname: req.hostname.clone(),
            network_id: net.id.clone(),
            endpoint_id: Id::random().to_string(),
            netns_path: req.netns_path.clone(),
            ifname: String::new(),
            host_ifname: String::new(),
            mac: String::new(),
            ipv4: None,
            ipv4_prefix: 0,
            ipv4_gateway: None,
            ipv6: None,
            ipv6_prefix: 0,
            ipv6_gateway: None,
            ports: Vec::new(),
            aliases: req.aliases.clone(),
            dns_names: Vec::new(),
            dns_servers: req.dns_servers.clone(),
            dns_search: req.dns_search.clone(),
            dns_options: req.dns_options.clone(),
            links: req.links.clone(),
            gw_priority: req.gw_priority,
            default_route: false,
            created_ns: now_ns(),
        };
        if !net.is_bridge() {
            st.store.apply(&[Op::PutAttachment(&record)])?;
            st.attachments.insert(key, record.clone());
            self.publish_connect(&net, &record);
            return Ok(self.describe(&st, &record));
        }

        if req.netns_path.is_empty() {
            return Err(Error::invalid_argument(
                "netns_path is required to attach to a bridge network",
            ));
        }
        if !self.deps.dataplane.netns_alive(Path::new(&req.netns_path)) {
            return Err(Error::failed_precondition(format!(
                "{} is not a network namespace",
                req.netns_path
            )));
        }
        if net.builtin && (req.ipv4.is_some() || req.ipv6.is_some()) {
            return Err(Error::invalid_argument(
                "user specified IP address is supported on user defined networks only",
            ));
        }
        if net.builtin && !req.aliases.is_empty() {
            return Err(Error::invalid_argument(
                "network-scoped aliases are supported for user-defined networks only",
            ));
        }

        // Detached endpoints keep their addresses while their veth may live. One asked for
        // again is freed now (its veth deleted), and so are all of the network's when its pool
        // has nothing else left.
        let wanted: Vec<IpAddr> = req
            .ipv4
            .iter()
            .chain(req.ipv6.iter())
            .chain(previous_ipv4.iter())
            .copied()
            .collect();
        let on_net = |a: &AttachmentRecord| a.network_id == net.id;
        if st.releasing.values().any(|r| on_net(&r.att)) {
            let exhausted = net.ipv4.as_ref().is_some_and(|pool| {
                let used: BTreeSet<IpAddr> = st
                    .holders_of(&net.id)
                    .iter()
                    .filter_map(|a| a.ipv4)
                    .collect();
                req.ipv4.is_none() && pool.allocate(&used, net.last_ipv4).is_err()
            });
            self.force_release(&mut st, |a| {
                on_net(a) && (exhausted || a.ips().any(|ip| wanted.contains(&ip)))
            })?;
        }

        // Addresses.
        let endpoints = st.holders_of(&net.id);
        let mut net_update = net.clone();
        if let Some(pool) = &net.ipv4 {
            let used: BTreeSet<IpAddr> = endpoints.iter().filter_map(|a| a.ipv4).collect();
            let ip = pick_address(pool, req.ipv4, previous_ipv4, &used, net.last_ipv4)?;
            record.ipv4 = Some(ip);
            record.ipv4_prefix = pool.subnet.prefix();
            record.ipv4_gateway = Some(pool.gateway);
            net_update.last_ipv4 = Some(ip);
        }
        if let Some(pool) = &net.ipv6 {
            let used: BTreeSet<IpAddr> = endpoints.iter().filter_map(|a| a.ipv6).collect();
            let ip = pick_address(pool, req.ipv6, None, &used, net.last_ipv6)?;
            record.ipv6 = Some(ip);
            record.ipv6_prefix = pool.subnet.prefix();
            record.ipv6_gateway = Some(pool.gateway);
            net_update.last_ipv6 = Some(ip);
        } else if req.ipv6.is_some() {
            return Err(Error::invalid_argument(format!(
                "network {} has no IPv6 subnet",
                net.name
            )));
        }
        let mac = match (req.mac, v4(record.ipv4)) {
            (Some(m), _) => m,
            (None, Some(ip)) => ipam::mac_from_ipv4(ip),
            (None, None) => ipam::random_mac(),
        };
        record.mac = ipam::format_mac(&mac);

        // Interface names.
        let taken: BTreeSet<&str> = others.iter().map(|a| a.ifname.as_str()).collect();
        record.ifname = if req.ifname.is_empty() {
            (0..)
                .map(|i| format!("eth{i}"))
                .find(|n| !taken.contains(n.as_str()))
                .unwrap_or_default()
        } else if taken.contains(req.ifname.as_str()) {
            return Err(Error::already_exists(format!(
                "interface {} is already used by another network of this container",
                req.ifname
            )));
        } else {
            req.ifname.clone()
        };
        record.host_ifname = format!("veth{}", &record.endpoint_id[..7]);

        // Published ports.
        if net.internal {
            if !req.ports.is_empty() || req.publish_all {
                tracing::warn!(
                    network = net.name,
                    "ports are not published on internal networks"
                );
            }
        } else {
            let mut wanted = req.ports.clone();
            if req.publish_all {
                for (port, proto) in &req.exposed {
                    if !wanted
                        .iter()
                        .any(|w| w.container_port == *port && w.proto == *proto)
                    {
                        wanted.push(PortRequest::new("", 0, 0, *port as u32, *proto)?);
                    }
                }
            }
            for w in &mut wanted {
                if w.host_ip.is_none() {
                    w.host_ip = net.host_binding_ipv4;
                }
            }
            let held: Vec<Held<'_>> = st
                .attachments
                .values()
                .flat_map(|a| {
                    a.ports.iter().map(move |b| Held {
                        owner: &a.container_id,
                        binding: b,
                    })
                })
                .collect();
            record.ports = ports::allocate(&wanted, &held, self.deps.host.as_ref())?;
        }

        // DNS names.
        if net.dns_enabled {
            let mut names: Vec<String> = Vec::new();
            let candidates = [
                record.container_name.clone(),
                req.hostname.clone(),
                req.container_id[..12].to_string(),
            ];
            for n in candidates.iter().chain(req.aliases.iter()) {
                let n = dns::normalize(n);
                if !n.is_empty() && !names.contains(&n) {
                    names.push(n);
                }
            }
            record.dns_names = names;
        }

        // The default route: the first non-internal network, or a higher priority.
        let holder = others.iter().find(|a| a.default_route).cloned();
        if !net.internal && record.ipv4_gateway.is_some() {
            record.default_route = holder
                .as_ref()
                .is_none_or(|h| req.gw_priority > h.gw_priority);
        }
        let demoted = holder.filter(|_| record.default_route).map(|mut h| {
            h.default_route = false;
            h
        });

        // Records first: after a crash the attachment is found and cleaned up or restored.
        let mut ops = vec![Op::PutAttachment(&record), Op::PutNetwork(&net_update)];
        if let Some(d) = &demoted {
            ops.push(Op::PutAttachment(d));
        }
        st.store.apply(&ops)?;
        st.attachments.insert(key.clone(), record.clone());
        st.networks.insert(net.id.clone(), net_update);
        if let Some(d) = &demoted {
            st.attachments.insert(d.key(), d.clone());
        }
        drop(st);

        // The kernel work runs without the lock: attaches of other containers overlap.
        let made = Self::endpoint_spec(&net, &record)
            .and_then(|spec| self.deps.dataplane.create_endpoint(&spec))
            .and_then(|()| {
                self.deps
                    .firewall
                    .ensure(&rules::port_rules(&self.chains, &record))
            });
        if let Err(e) = made {
            if !record.ports.is_empty() {
                let _ = self
                    .deps
                    .firewall
                    .remove(&[self.chains.endpoint_tag(&record.endpoint_id)]);
            }
            let _ = self.deps.dataplane.delete_endpoint(&record.host_ifname);
            let restored = demoted.map(|mut d| {
                d.default_route = true;
                d
            });
            let mut st = self.lock();
            // The network's last addresses go back unless another attach moved them meanwhile.
            let rewound = st.networks.get(&net.id).cloned().map(|mut n| {
                if n.last_ipv4 == record.ipv4 {
                    n.last_ipv4 = net.last_ipv4;
                }
                if n.last_ipv6 == record.ipv6 {
                    n.last_ipv6 = net.last_ipv6;
                }
                n
            });
            let mut ops = vec![Op::DeleteAttachment(key.clone())];
            if let Some(n) = &rewound {
                ops.push(Op::PutNetwork(n));
            }
            if let Some(d) = &restored {
                ops.push(Op::PutAttachment(d));
            }
            st.store.apply(&ops)?;
            st.attachments.remove(&key);
            if let Some(n) = rewound {
                st.networks.insert(n.id.clone(), n);
            }
            if let Some(d) = restored {
                st.attachments.insert(d.key(), d);
            }
            return Err(e);
        }
        let mut st = self.lock();
        if net.dns_enabled {
            self.refresh_dns(&mut st);
        }
        tracing::info!(
            container = record.container_id,
            network = net.name,
            ip = ?record.ipv4,
            ports = record.ports.len(),
            "attached"
        );
        self.publish_connect(&net, &record);
        Ok(self.describe(&st, &record))
    }

    fn publish_connect(&self, net: &NetworkRecord, att: &AttachmentRecord) {
        self.deps.events.publish(
            "connect",
            &net.id,
            BTreeMap::from([
                ("name".into(), net.name.clone()),
                ("type".into(), net.driver.as_str().into()),
                ("container".into(), att.container_id.clone()),
            ]),
        );
    }

    /// Makes sure an existing attachment's kernel side is there (Attach is idempotent).
    fn restore_endpoint(&self, net: &NetworkRecord, att: &AttachmentRecord) -> Result<()> {
        if !net.is_bridge() || att.host_ifname.is_empty() {
            return Ok(());
        }
        if !self.deps.dataplane.link_exists(&att.host_ifname)? {
            if !self.deps.dataplane.netns_alive(Path::new(&att.netns_path)) {
                return Err(Error::failed_precondition(format!(
                    "the attachment's namespace {} is gone; detach first",
                    att.netns_path
                )));
            }
            self.deps
                .dataplane
                .create_endpoint(&Self::endpoint_spec(net, att)?)?;
        }
        self.deps
            .firewall
            .ensure(&rules::port_rules(&self.chains, att))
    }

    /// Removes an endpoint's rules and veth.
    fn drop_endpoint(&self, att: &AttachmentRecord) -> Result<()> {
        self.drop_rules(att)?;
        match att.host_ifname.as_str() {
            "" => Ok(()),
            name => self.deps.dataplane.delete_endpoint(name),
        }
    }

    /// Removes an endpoint's port rules. Only published ports have rules of their own, so an
    /// endpoint without any costs no `iptables-save`.
    fn drop_rules(&self, att: &AttachmentRecord) -> Result<()> {
        if att.ports.is_empty() {
            return Ok(());
        }
        self.deps
            .firewall
            .remove(&[self.chains.endpoint_tag(&att.endpoint_id)])
    }

    /// Disconnects a container from one network (or, with `network` empty, from all).
    /// Returns the ids of the networks it was detached from.
    ///
    /// The records leave the API at once; the addresses stay taken until the veth is gone
    /// (see [`Releasing`]). When the namespace is already gone the kernel is removing the veth
    /// and this returns without waiting for it; otherwise the veth is deleted before it returns.
    pub fn detach(&self, container_id: &str, network: &str, force: bool) -> Result<Vec<String>> {
        if container_id.is_empty() {
            return Err(Error::invalid_argument("container_id is required"));
        }
        let _busy = self.busy.enter(container_id);
        let targets: Vec<Releasing> = {
            let mut st = self.lock();
            let targets: Vec<AttachmentRecord> = if network.is_empty() {
                st.of_container(container_id).into_iter().cloned().collect()
            } else {
                let net = st.resolve(network)?;
                let key = attachment_key(container_id, &net.id);
                match st.attachments.get(&key) {
                    Some(a) => vec![a.clone()],
                    None => {
                        return Err(Error::not_found(format!(
                            "container {container_id} is not connected to network {}",
                            net.name
                        )));
                    }
                }
            };
            let now = Instant::now();
            targets
                .into_iter()
                .map(|att| {
                    let deferred = !att.host_ifname.is_empty()
                        && !self.deps.dataplane.netns_alive(Path::new(&att.netns_path));
                    st.attachments.remove(&att.key());
                    let r = Releasing {
                        att,
                        since: now,
                        deferred,
                    };
                    st.releasing.insert(r.att.endpoint_id.clone(), r.clone());
                    r
                })
                .collect()
        };

        // Kernel work without the lock.
        let mut failed = None;
        let mut done = Vec::new();
        for r in &targets {
            let dropped = if r.deferred {
                self.drop_rules(&r.att)
            } else {
                self.drop_endpoint(&r.att)
            };
            match dropped {
                Ok(()) => {}
                Err(e) if force => {
                    tracing::warn!(container = container_id, network = r.att.network_id, error = %e.chain(), "forced detach left kernel state behind");
                }
                Err(e) => {
                    failed = Some((r.att.endpoint_id.clone(), e));
                    break;
                }
            }
            done.push(r);
        }

        let mut st = self.lock();
        if let Some((failed_id, e)) = failed {
            // Not forced: the failed endpoint and the ones not tried yet stay attached.
            let kept = targets
                .iter()
                .skip_while(|r| r.att.endpoint_id != failed_id)
                .map(|r| r.att.clone());
            for att in kept {
                st.releasing.remove(&att.endpoint_id);
                st.attachments.insert(att.key(), att);
            }
            self.finish_detach(&mut st, container_id, &done)?;
            return Err(e);
        }
        let detached = self.finish_detach(&mut st, container_id, &done)?;
        if done.iter().any(|r| r.deferred) {
            self.reaper.wake();
        }
        Ok(detached)
    }

    /// The bookkeeping after the kernel side of `done` was dealt with: records of the endpoints
    /// that are gone, default routes, events, DNS. Returns the networks detached from.
    fn finish_detach(
        &self,
        st: &mut State,
        container_id: &str,
        done: &[&Releasing],
    ) -> Result<Vec<String>> {
        let gone: Vec<String> = done
            .iter()
            .filter(|r| !r.deferred)
            .map(|r| r.att.endpoint_id.clone())
            .collect();
        st.finish_release(&gone)?;
        let mut dns = false;
        let mut detached = Vec::new();
        for r in done {
            let att = &r.att;
            if att.default_route {
                self.move_default_route(st, att);
            }
            if let Some(net) = st.networks.get(&att.network_id) {
                dns |= net.dns_enabled;
                tracing::info!(
                    container = container_id,
                    network = net.name,
                    deferred = r.deferred,
                    "detached"
                );
                self.deps.events.publish(
                    "disconnect",
                    &net.id,
                    BTreeMap::from([
                        ("name".into(), net.name.clone()),
                        ("type".into(), net.driver.as_str().into()),
                        ("container".into(), container_id.to_string()),
                    ]),
                );
            }
            detached.push(att.network_id.clone());
        }
        if dns {
            self.refresh_dns(st);
        }
        Ok(detached)
    }

    /// After the default-route endpoint left, gives the route to the best remaining one.
    fn move_default_route(&self, st: &mut State, gone: &AttachmentRecord) {
        if !self.deps.dataplane.netns_alive(Path::new(&gone.netns_path)) {
            return;
        }
        let next = st
            .of_container(&gone.container_id)
            .into_iter()
            .filter(|a| {
                a.ipv4_gateway.is_some()
                    && st
                        .networks
                        .get(&a.network_id)
                        .is_some_and(|n| n.is_bridge() && !n.internal)
            })
            .max_by_key(|a| (a.gw_priority, -a.created_ns))
            .cloned();
        let Some(mut next) = next else { return };
        let routed = self.deps.dataplane.set_default_route(
            Path::new(&next.netns_path),
            &next.ifname,
            v4(next.ipv4_gateway),
            v6(next.ipv6_gateway),
        );
        match routed {
            Ok(()) => {
                next.default_route = true;
                if st.store.apply(&[Op::PutAttachment(&next)]).is_ok() {
                    st.attachments.insert(next.key(), next);
                }
            }
            Err(e) => {
                tracing::warn!(container = gone.container_id, error = %e.chain(), "cannot move the default route")
            }
        }
    }

    /// Attachments, optionally of one container and/or one network.
    pub fn list_attachments(
        &self,
        container_id: &str,
        network: &str,
    ) -> Result<Vec<AttachmentInfo>> {
        let st = self.lock();
        let net_id = if network.is_empty() {
            None
        } else {
            Some(st.resolve(network)?.id.clone())
        };
        Ok(st
            .attachments
            .values()
            .filter(|a| container_id.is_empty() || a.container_id == container_id)
            .filter(|a| net_id.as_ref().is_none_or(|n| *n == a.network_id))
            .map(|a| self.describe(&st, a))
            .collect())
    }

    /// Resolves a name as the container DNS does, on a network or as seen by a container.
    pub fn lookup(&self, name: &str, network: &str, from_container: &str) -> Result<Addresses> {
        if name.is_empty() {
            return Err(Error::invalid_argument("name is required"));
        }
        let view = self.view.get();
        let found = if !network.is_empty() {
            let id = self.lock().resolve(network)?.id.clone();
            view.lookup_in(&[id.as_str()], name)
        } else if !from_container.is_empty() {
            view.lookup_from_container(from_container, name)
        } else {
            return Err(Error::invalid_argument(
                "either network or from_container_id is needed",
            ));
        };
        found.ok_or_else(|| Error::not_found(format!("no container named {name:?} on the network")))
    }

    // ----------------------------------------------------------------------------------------
    // CNI

    /// The CNI configs of the config directory.
    pub fn cni_configs(&self) -> Result<Vec<CniConfigFile>> {
        cni::load_dir(&self.settings.cni_conf_dir)
    }

    fn cni_del(&self, rec: &CniRecord) -> Result<()> {
        let cni_path = self.settings.cni_bin_dir.display().to_string();
        let inv = Invocation {
            container_id: &rec.container_id,
            netns: &rec.netns_path,
            ifname: &rec.ifname,
            args: &rec.args,
            runtime_config: &rec.runtime_config,
            cni_path: &cni_path,
        };
        let prev = (!rec.result.is_null()).then_some(&rec.result);
        cni::delete(self.deps.cni.as_ref(), &rec.config, &inv, prev)
    }

    /// CNI ADD of a config for a namespace; idempotent for the same container, config and
    /// interface.
    pub fn cni_attach(&self, req: CniAttachRequest) -> Result<(CniResult, Value)> {
        if req.container_id.is_empty()
            || !req
                .container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(Error::invalid_argument(format!(
                "invalid container id {:?}",
                req.container_id
            )));
        }
        if req.netns_path.is_empty() {
            return Err(Error::invalid_argument("netns_path is required"));
        }
        let ifname = if req.ifname.is_empty() {
            "eth0".to_string()
        } else {
            req.ifname.clone()
        };
        validate_ifname(&ifname)?;
        let configs = self.cni_configs()?;
        let config = if req.config_name.is_empty() {
            configs.first().ok_or_else(|| {
                Error::not_found(format!(
                    "no CNI network configs in {}",
                    self.settings.cni_conf_dir.display()
                ))
            })?
        } else {
            configs
                .iter()
                .find(|c| c.name == req.config_name)
                .ok_or_else(|| {
                    Error::not_found(format!(
                        "no CNI network config named {:?} in {}",
                        req.config_name,
                        self.settings.cni_conf_dir.display()
                    ))
                })?
        };
        let key = cni_key(&req.container_id, &config.name, &ifname);
        let mut rec = CniRecord {
            container_id: req.container_id.clone(),
            config_name: config.name.clone(),
            ifname: ifname.clone(),
            netns_path: req.netns_path.clone(),
            args: req.args.clone(),
            config: config.conflist.clone(),
            runtime_config: req.runtime_config.clone(),
            // No result yet: the record says an ADD may have run, so a crash before it
            // finishes is cleaned up (DEL) at the next start.
            result: Value::Null,
            created_ns: now_ns(),
        };
        {
            let mut st = self.lock();
            if let Some(done) = st.cni.get(&key).filter(|r| !r.result.is_null()) {
                return Ok((cni::parse_result(&done.result), done.result.clone()));
            }
            st.store.apply(&[Op::PutCni(&rec)])?;
            st.cni.insert(key.clone(), rec.clone());
        }
        // Plugins are slow (tens of ms each); they run without the service lock.
        let cni_path = self.settings.cni_bin_dir.display().to_string();
        let inv = Invocation {
            container_id: &req.container_id,
            netns: &req.netns_path,
            ifname: &ifname,
            args: &req.args,
            runtime_config: &req.runtime_config,
            cni_path: &cni_path,
        };
        let added = cni::add(self.deps.cni.as_ref(), &config.conflist, &inv);
        let mut st = self.lock();
        match added {
            Ok(result) => {
                rec.result = result.clone();
                st.store.apply(&[Op::PutCni(&rec)])?;
                st.cni.insert(key, rec);
                Ok((cni::parse_result(&result), result))
            }
            Err(e) => {
                st.store.apply(&[Op::DeleteCni(key.clone())])?;
                st.cni.remove(&key);
                Err(e)
            }
        }
    }

    /// CNI DEL with the arguments recorded at ADD. Succeeds when there is nothing to delete or
    /// the namespace is gone.
    pub fn cni_detach(&self, container_id: &str, config_name: &str, ifname: &str) -> Result<()> {
        let ifname = if ifname.is_empty() { "eth0" } else { ifname };
        let rec = {
            let st = self.lock();
            let mut matching = st.cni.values().filter(|c| {
                c.container_id == container_id
                    && c.ifname == ifname
                    && (config_name.is_empty() || c.config_name == config_name)
            });
            match (matching.next(), matching.next()) {
                (Some(r), None) => r.clone(),
                (None, _) => return Ok(()),
                (Some(_), Some(_)) => {
                    return Err(Error::invalid_argument(format!(
                        "container {container_id} has several CNI attachments on {ifname}; name the config"
                    )));
                }
            }
        };
        if let Err(e) = self.cni_del(&rec) {
            if self.deps.dataplane.netns_alive(Path::new(&rec.netns_path)) {
                return Err(e);
            }
            tracing::debug!(error = %e.chain(), "cni delete failed after the namespace was gone");
        }
        let mut st = self.lock();
        st.store.apply(&[Op::DeleteCni(rec.key())])?;
        st.cni.remove(&rec.key());
        Ok(())
    }
}

#[cfg(test)]
mod tests;
