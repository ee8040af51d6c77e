//! Container DNS: one resolver per user-defined network, listening on the network's gateway
//! address (UDP and TCP port 53), answering A/AAAA/PTR for the names and aliases of containers
//! on the networks the asking container shares, and forwarding every other question to the
//! upstream resolvers (the container's own `--dns`, the configured `dns`, or the host's).
//!
//! The answers come from a [`DnsView`] the service rebuilds after every change, so a query never
//! waits for the service's lock.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use berth_core::{Context, ErrorKind, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::model::{AttachmentRecord, NetworkRecord};

/// TTL of local answers (Docker uses 600 s).
const TTL: u32 = 600;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
const TYPE_A: u16 = 1;
const TYPE_PTR: u16 = 12;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const RCODE_FORMERR: u8 = 1;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NOTIMP: u8 = 4;

/// One endpoint as DNS sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsEntry {
    /// Owning container.
    pub container_id: String,
    /// Lowercase names.
    pub names: Vec<String>,
    /// IPv4 address.
    pub ipv4: Option<Ipv4Addr>,
    /// IPv6 address.
    pub ipv6: Option<Ipv6Addr>,
    /// The container's own upstream servers.
    pub upstreams: Vec<SocketAddr>,
    /// Its legacy links on this network: lowercase alias → the linked container's name. Only
    /// this container's queries see them, as in Docker.
    pub links: Vec<(String, String)>,
}

/// `name:alias` (or `name`) → (alias, name), lowercase.
fn link_alias(link: &str) -> Option<(String, String)> {
    let (name, alias) = link.split_once(':').unwrap_or((link, link));
    let name = normalize(name.trim_start_matches('/'));
    let alias = normalize(alias.rsplit('/').next().unwrap_or(alias));
    (!name.is_empty() && !alias.is_empty()).then_some((alias, name))
}

/// Everything the resolvers need, rebuilt from the records after each change.
#[derive(Debug, Clone, Default)]
pub struct DnsView {
    /// Endpoints by network id (DNS-enabled networks only).
    pub networks: HashMap<String, Vec<DnsEntry>>,
    /// Networks with DNS of each container.
    pub container_networks: HashMap<String, Vec<String>>,
    /// Upstreams when the container names none.
    pub default_upstreams: Vec<SocketAddr>,
}

/// The result of a local lookup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Addresses {
    /// A records.
    pub ipv4: Vec<Ipv4Addr>,
    /// AAAA records.
    pub ipv6: Vec<Ipv6Addr>,
}

/// Parses `ip` or `ip:port` / `[ip6]:port` into a resolver address (port 53 by default).
pub fn parse_upstream(s: &str) -> Option<SocketAddr> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa);
    }
    s.trim_matches(['[', ']'])
        .parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, 53))
}

/// The `nameserver` lines of a resolv.conf.
pub fn resolv_conf_nameservers(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some("nameserver"))
                .then(|| it.next())
                .flatten()
        })
        // A zone index (fe80::1%eth0) means nothing inside a container.
        .map(|s| s.split('%').next().unwrap_or(s).to_string())
        .collect()
}

impl DnsView {
    /// Builds the view from the records. `default_upstreams` must not contain the resolvers'
    /// own addresses.
    pub fn build(
        networks: &BTreeMap<String, NetworkRecord>,
        attachments: &BTreeMap<String, AttachmentRecord>,
        default_upstreams: Vec<SocketAddr>,
    ) -> Self {
        let mut view = DnsView {
            default_upstreams,
            ..Default::default()
        };
        for att in attachments.values() {
            let Some(net) = networks.get(&att.network_id) else {
                continue;
            };
            if !net.dns_enabled {
                continue;
            }
            let ip4 = att.ipv4.and_then(|ip| match ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            });
            let ip6 = att.ipv6.and_then(|ip| match ip {
                IpAddr::V6(v6) => Some(v6),
                IpAddr::V4(_) => None,
            });
            view.networks
                .entry(net.id.clone())
                .or_default()
                .push(DnsEntry {
                    container_id: att.container_id.clone(),
                    names: att.dns_names.clone(),
                    ipv4: ip4,
                    ipv6: ip6,
                    upstreams: att
                        .dns_servers
                        .iter()
                        .filter_map(|s| parse_upstream(s))
                        .collect(),
                    links: att.links.iter().filter_map(|l| link_alias(l)).collect(),
                });
            view.container_networks
                .entry(att.container_id.clone())
                .or_default()
                .push(net.id.clone());
        }
        view
    }

    /// The container that has `ip` on `network_id`.
    pub fn client(&self, network_id: &str, ip: IpAddr) -> Option<&DnsEntry> {
        self.networks.get(network_id)?.iter().find(|e| match ip {
            IpAddr::V4(v4) => e.ipv4 == Some(v4),
            IpAddr::V6(v6) => e.ipv6 == Some(v6),
        })
    }

    /// The networks a query from `container_id` arriving on `network_id` searches: that one
    /// first, then the container's other networks.
    fn search_order<'a>(
        &'a self,
        network_id: &'a str,
        container_id: Option<&'a str>,
    ) -> Vec<&'a str> {
        let mut order = vec![network_id];
        if let Some(nets) = container_id.and_then(|c| self.container_networks.get(c)) {
            order.extend(nets.iter().map(String::as_str).filter(|n| *n != network_id));
        }
        order
    }

    /// Resolves `name` on the given networks, first network with a match wins; every
    /// endpoint with the name answers (an alias shared by several containers gives several
    /// addresses).
    pub fn lookup_in(&self, networks: &[&str], name: &str) -> Option<Addresses> {
        let name = normalize(name);
        for net in networks {
            let mut found = Addresses::default();
            let mut any = false;
            for e in self.networks.get(*net).into_iter().flatten() {
                if e.names.contains(&name) {
                    any = true;
                    found.ipv4.extend(e.ipv4);
                    found.ipv6.extend(e.ipv6);
                }
            }
            if any {
                return Some(found);
            }
        }
        None
    }

    /// Resolves `name` as `container_id` would see it on any of its networks.
    pub fn lookup_from_container(&self, container_id: &str, name: &str) -> Option<Addresses> {
        let nets: Vec<&str> = self
            .container_networks
            .get(container_id)
            .map(|v| v.iter().map(String::as_str).collect())
            .unwrap_or_default();
        self.lookup_in(&nets, name)
    }

    /// The name a query asks about: the linked container's name when `name` is a link alias
    /// of the asking container on any of its networks.
    fn link_target<'a>(
        &'a self,
        networks: &[&str],
        me: Option<&DnsEntry>,
        name: &'a str,
    ) -> &'a str {
        let Some(me) = me else {
            return name;
        };
        let asked = normalize(name);
        networks
            .iter()
            .flat_map(|n| self.networks.get(*n).into_iter().flatten())
            .filter(|e| e.container_id == me.container_id)
            .flat_map(|e| e.links.iter())
            .find(|(alias, _)| *alias == asked)
            .map(|(_, target)| target.as_str())
            .unwrap_or(name)
    }

    fn reverse(&self, networks: &[&str], ip: IpAddr) -> Option<String> {
        for net in networks {
            for e in self.networks.get(*net).into_iter().flatten() {
                let hit = match ip {
                    IpAddr::V4(v4) => e.ipv4 == Some(v4),
                    IpAddr::V6(v6) => e.ipv6 == Some(v6),
                };
                if hit {
                    return e.names.first().cloned();
                }
            }
        }
        None
    }
}

/// Lowercase without the trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Send this answer.
    Answer(Vec<u8>),
    /// Ask these upstreams and relay their answer (SERVFAIL when none answers).
    Forward(Vec<SocketAddr>),
    /// Not a query: ignore it.
    Drop,
}

/// A parsed question.
#[derive(Debug)]
struct Question {
    id: u16,
    rd: bool,
    name: String,
    qtype: u16,
    qclass: u16,
    /// The question section as received (echoed in answers).
    raw: Vec<u8>,
}

fn parse_question(msg: &[u8]) -> std::result::Result<Question, (u16, u8)> {
    if msg.len() < 12 {
        return Err((0, RCODE_FORMERR));
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    if flags & 0x8000 != 0 {
        // A response, not a question.
        return Err((id, 0xff));
    }
    if (flags >> 11) & 0xf != 0 {
        return Err((id, RCODE_NOTIMP));
    }
    if u16::from_be_bytes([msg[4], msg[5]]) != 1 {
        return Err((id, RCODE_FORMERR));
    }
    let mut pos = 12;
    let mut labels: Vec<String> = Vec::new();
    loop {
        let len = *msg.get(pos).ok_or((id, RCODE_FORMERR))? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            // Compression in a question is legal but nobody sends it.
            return Err((id, RCODE_FORMERR));
        }
        let label = msg.get(pos..pos + len).ok_or((id, RCODE_FORMERR))?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        pos += len;
    }
    let tail = msg.get(pos..pos + 4).ok_or((id, RCODE_FORMERR))?;
    let qtype = u16::from_be_bytes([tail[0], tail[1]]);
    let qclass = u16::from_be_bytes([tail[2], tail[3]]);
    Ok(Question {
        id,
        rd: flags & 0x0100 != 0,
        name: labels.join(".").to_ascii_lowercase(),
        qtype,
        qclass,
        raw: msg[12..pos + 4].to_vec(),
    })
}

fn header(id: u16, rd: bool, authoritative: bool, rcode: u8, qd: u16, an: u16) -> Vec<u8> {
    let mut flags: u16 = 0x8000 | 0x0080 | rcode as u16;
    if rd {
        flags |= 0x0100;
    }
    if authoritative {
        flags |= 0x0400;
    }
    let mut out = Vec::with_capacity(512);
    for v in [id, flags, qd, an, 0, 0] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out
}

/// An error answer without a question section (for messages that could not be parsed).
fn error_reply(id: u16, rcode: u8) -> Vec<u8> {
    header(id, false, false, rcode, 0, 0)
}

fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.').filter(|l| !l.is_empty()) {
        let bytes = &label.as_bytes()[..label.len().min(63)];
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
    }
    out.push(0);
    out
}

fn answer(q: &Question, rdatas: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut out = header(q.id, q.rd, true, 0, 1, rdatas.len() as u16);
    out.extend_from_slice(&q.raw);
    for (rtype, rdata) in rdatas {
        // Name: a pointer to the question's name at offset 12.
        out.extend_from_slice(&[0xc0, 0x0c]);
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(rdata);
    }
    out
}

/// Servfail for a query whose upstreams did not answer.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let q = parse_question(query).ok()?;
    let mut out = header(q.id, q.rd, false, RCODE_SERVFAIL, 1, 0);
    out.extend_from_slice(&q.raw);
    Some(out)
}

fn parse_reverse_v4(name: &str) -> Option<Ipv4Addr> {
    let rest = name.strip_suffix(".in-addr.arpa")?;
    let parts: Vec<u8> = rest
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    (parts.len() == 4).then(|| Ipv4Addr::new(parts[3], parts[2], parts[1], parts[0]))
}

/// Answers `query`, received on `network_id`'s resolver from `client`.
///
/// Only clients on the network (a known endpoint, or an address in one of its subnets) get
/// local answers; anything else is forwarded.
pub fn handle(view: &DnsView, network_id: &str, client: IpAddr, query: &[u8]) -> Reply {
    let q = match parse_question(query) {
        Ok(q) => q,
        Err((_, 0xff)) => return Reply::Drop,
        Err((id, rcode)) => return Reply::Answer(error_reply(id, rcode)),
    };
    let me = view.client(network_id, client);
    let order = view.search_order(network_id, me.map(|e| e.container_id.as_str()));
    let upstreams = match me {
        Some(e) if !e.upstreams.is_empty() => e.upstreams.clone(),
        _ => view.default_upstreams.clone(),
    };
    if q.qclass == CLASS_IN {
        if q.qtype == TYPE_PTR {
            if let Some(name) =
                parse_reverse_v4(&q.name).and_then(|ip| view.reverse(&order, ip.into()))
            {
                return Reply::Answer(answer(&q, &[(TYPE_PTR, encode_name(&name))]));
            }
        } else if let Some(found) = view.lookup_in(&order, view.link_target(&order, me, &q.name)) {
            // A name berth owns: answer even when the asked type has no record (NODATA), so
            // the client does not go on to ask the upstreams about a container name.
            let rdatas: Vec<(u16, Vec<u8>)> = match q.qtype {
                TYPE_A => found
                    .ipv4
                    .iter()
                    .map(|ip| (TYPE_A, ip.octets().to_vec()))
                    .collect(),
                TYPE_AAAA => found
                    .ipv6
                    .iter()
                    .map(|ip| (TYPE_AAAA, ip.octets().to_vec()))
                    .collect(),
                _ => Vec::new(),
            };
            return Reply::Answer(answer(&q, &rdatas));
        }
    }
    Reply::Forward(upstreams)
}

/// Sends `query` to each upstream over UDP in turn and returns the first answer.
pub async fn forward_udp(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for up in upstreams {
        let bind: SocketAddr = if up.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
            .parse()
            .ok()?;
        let Ok(sock) = UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.connect(up).await.is_err() || sock.send(query).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 65535];
        match tokio::time::timeout(UPSTREAM_TIMEOUT, sock.recv(&mut buf)).await {
            Ok(Ok(n)) if n >= 2 && buf[..2] == query[..2] => {
                buf.truncate(n);
                return Some(buf);
            }
            _ => tracing::debug!(upstream = %up, "dns upstream did not answer"),
        }
    }
    None
}

async fn forward_tcp(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for up in upstreams {
        let attempt = async {
            let mut s = TcpStream::connect(up).await.ok()?;
            s.write_all(&(query.len() as u16).to_be_bytes())
                .await
                .ok()?;
            s.write_all(query).await.ok()?;
            let len = s.read_u16().await.ok()? as usize;
            let mut buf = vec![0u8; len];
            s.read_exact(&mut buf).await.ok()?;
            Some(buf)
        };
        if let Ok(Some(answer)) = tokio::time::timeout(UPSTREAM_TIMEOUT, attempt).await {
            return Some(answer);
        }
    }
    None
}

/// The shared, swappable view.
#[derive(Debug, Clone, Default)]
pub struct SharedView(Arc<RwLock<Arc<DnsView>>>);

impl SharedView {
    /// The current view.
    pub fn get(&self) -> Arc<DnsView> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the view.
    pub fn set(&self, view: DnsView) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
    }
}

/// The resolvers that are running, one per network.
#[derive(Debug)]
pub struct DnsServers {
    view: SharedView,
    port: u16,
    runtime: tokio::runtime::Handle,
    running: HashMap<String, (IpAddr, CancellationToken, SocketAddr)>,
}

fn bind_socket(addr: SocketAddr, tcp: bool) -> Result<OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt,
        socket, sockopt,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let ty = if tcp {
        SockType::Stream
    } else {
        SockType::Datagram
    };
    let what = || format!("dns: bind {}/{}", addr, if tcp { "tcp" } else { "udp" });
    let fd = socket(
        family,
        ty,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .internal(what)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).internal(what)?;
    // The gateway address may not be configured yet (the bridge is being recreated after a
    // restart): bind anyway, packets flow once it is.
    if addr.is_ipv4() {
        setsockopt(&fd, sockopt::IpFreebind, &true).internal(what)?;
    }
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )
    .context(ErrorKind::Unavailable, what())?;
    if tcp {
        listen(&fd, Backlog::new(128).internal(what)?).internal(what)?;
    }
    Ok(fd)
}

impl DnsServers {
    /// Resolvers that listen on `port` (53 in production) of each gateway.
    pub fn new(view: SharedView, port: u16, runtime: tokio::runtime::Handle) -> Self {
        Self {
            view,
            port,
            runtime,
            running: HashMap::new(),
        }
    }

    /// The address the resolver of `network_id` listens on.
    pub fn local_addr(&self, network_id: &str) -> Option<SocketAddr> {
        self.running.get(network_id).map(|(_, _, a)| *a)
    }

    /// Starts the resolvers in `want` (network id → address) that are not running and stops
    /// the others. Errors are per network and do not stop the rest.
    pub fn sync(&mut self, want: &BTreeMap<String, IpAddr>) -> Vec<(String, berth_core::Error)> {
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(id, (ip, _, _))| want.get(*id) != Some(ip))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some((_, token, _)) = self.running.remove(&id) {
                token.cancel();
            }
        }
        let mut errors = Vec::new();
        for (id, ip) in want {
            if self.running.contains_key(id) {
                continue;
            }
            match self.start(id, *ip) {
                Ok(entry) => {
                    self.running.insert(id.clone(), entry);
                }
                Err(e) => errors.push((id.clone(), e)),
            }
        }
        errors
    }

    fn start(
        &self,
        network_id: &str,
        ip: IpAddr,
    ) -> Result<(IpAddr, CancellationToken, SocketAddr)> {
        let udp_fd = bind_socket(SocketAddr::new(ip, self.port), false)?;
        let udp = std::net::UdpSocket::from(udp_fd);
        let addr = udp.local_addr()?;
        let tcp = std::net::TcpListener::from(bind_socket(addr, true)?);
        let _guard = self.runtime.enter();
        let udp = Arc::new(UdpSocket::from_std(udp)?);
        let tcp = TcpListener::from_std(tcp)?;
        let token = CancellationToken::new();
        let net = network_id.to_string();
        self.runtime.spawn(serve_udp(
            udp,
            net.clone(),
            self.view.clone(),
            token.clone(),
        ));
        self.runtime
            .spawn(serve_tcp(tcp, net, self.view.clone(), token.clone()));
        tracing::debug!(network = network_id, %addr, "dns resolver listening");
        Ok((ip, token, addr))
    }

    /// Stops every resolver.
    pub fn stop_all(&mut self) {
        for (_, (_, token, _)) in self.running.drain() {
            token.cancel();
        }
    }
}

impl Drop for DnsServers {
    fn drop(&mut self) {
        self.stop_all();
    }
}

async fn serve_udp(
    sock: Arc<UdpSocket>,
    network_id: String,
    view: SharedView,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "dns: receive failed");
                    continue;
                }
            },
        };
        let query = buf[..n].to_vec();
        match handle(&view.get(), &network_id, peer.ip(), &query) {
            Reply::Answer(a) => {
                let _ = sock.send_to(&a, peer).await;
            }
            Reply::Forward(ups) => {
                let sock = sock.clone();
                tokio::spawn(async move {
                    let reply = match forward_udp(&query, &ups).await {
                        Some(a) => Some(a),
                        None => servfail(&query),
                    };
                    if let Some(a) = reply {
                        let _ = sock.send_to(&a, peer).await;
                    }
                });
            }
            Reply::Drop => {}
        }
    }
}

async fn serve_tcp(
    listener: TcpListener,
    network_id: String,
    view: SharedView,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let view = view.clone();
        let network_id = network_id.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tcp_conn(stream, peer.ip(), network_id, view) => {}
            }
        });
    }
}

async fn tcp_conn(mut stream: TcpStream, peer: IpAddr, network_id: String, view: SharedView) {
    loop {
        let read = async {
            let len = stream.read_u16().await.ok()? as usize;
            let mut q = vec![0u8; len];
            stream.read_exact(&mut q).await.ok()?;
            Some(q)
        };
        let Ok(Some(query)) = tokio::time::timeout(Duration::from_secs(10), read).await else {
            return;
        };
        let reply = match handle(&view.get(), &network_id, peer, &query) {
            Reply::Answer(a) => Some(a),
            Reply::Forward(ups) => forward_tcp(&query, &ups).await.or_else(|| servfail(&query)),
            Reply::Drop => None,
        };
        let Some(reply) = reply else { return };
        if stream
            .write_all(&(reply.len() as u16).to_be_bytes())
            .await
            .is_err()
            || stream.write_all(&reply).await.is_err()
        {
            return;
        }
    }
}

/// Builds a query (for tests and for probing a resolver).
pub fn build_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut out = Vec::new();
    for v in [id, 0x0100u16, 1, 0, 0, 0] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&encode_name(name));
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}

/// The rcode and the A/AAAA addresses of an answer (for tests and probes).
pub fn parse_answer(msg: &[u8]) -> Option<(u8, Vec<IpAddr>)> {
    if msg.len() < 12 {
        return None;
    }
    let rcode = msg[3] & 0xf;
    let qd = u16::from_be_bytes([msg[4], msg[5]]);
    let an = u16::from_be_bytes([msg[6], msg[7]]);
    let mut pos = 12;
    let skip_name = |pos: &mut usize| -> Option<()> {
        loop {
            let len = *msg.get(*pos)? as usize;
            if len & 0xc0 == 0xc0 {
                *pos += 2;
                return Some(());
            }
            *pos += 1 + len;
            if len == 0 {
                return Some(());
            }
        }
    };
    for _ in 0..qd {
        skip_name(&mut pos)?;
        pos += 4;
    }
    let mut ips = Vec::new();
    for _ in 0..an {
        skip_name(&mut pos)?;
        let rr = msg.get(pos..pos + 10)?;
        let rtype = u16::from_be_bytes([rr[0], rr[1]]);
        let len = u16::from_be_bytes([rr[8], rr[9]]) as usize;
        pos += 10;
        let data = msg.get(pos..pos + len)?;
        match (rtype, len) {
            (TYPE_A, 4) => ips.push(IpAddr::from(<[u8; 4]>::try_from(data).ok()?)),
            (TYPE_AAAA, 16) => ips.push(IpAddr::from(<[u8; 16]>::try_from(data).ok()?)),
            _ => {}
        }
        pos += len;
    }
    Some((rcode, ips))
}

/// Record types, for [`build_query`].
pub mod qtype {
    /// A.
    pub const A: u16 = super::TYPE_A;
    /// AAAA.
    pub const AAAA: u16 = super::TYPE_AAAA;
    /// PTR.
    pub const PTR: u16 = super::TYPE_PTR;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(c: &str, names: &[&str], ip: &str) -> DnsEntry {
        DnsEntry {
            container_id: c.into(),
            names: names.iter().map(|s| s.to_string()).collect(),
            ipv4: Some(ip.parse().unwrap()),
            ipv6: None,
            upstreams: vec![],
            links: vec![],
        }
    }

    fn view() -> DnsView {
        let mut v = DnsView::default();
        v.networks.insert(
            "n1".into(),
            vec![
                entry("c1", &["web", "www"], "10.0.1.2"),
                entry("c2", &["db"], "10.0.1.3"),
            ],
        );
        v.networks.insert(
            "n2".into(),
            vec![
                entry("c3", &["cache"], "10.0.2.2"),
                entry("c1", &["web"], "10.0.2.3"),
            ],
        );
        v.container_networks
            .insert("c1".into(), vec!["n1".into(), "n2".into()]);
        v.container_networks.insert("c2".into(), vec!["n1".into()]);
        v.container_networks.insert("c3".into(), vec!["n2".into()]);
        v.default_upstreams = vec!["127.0.0.1:53".parse().unwrap()];
        v
    }

    fn ask(v: &DnsView, net: &str, client: &str, name: &str, t: u16) -> Reply {
        handle(v, net, client.parse().unwrap(), &build_query(7, name, t))
    }

    fn ips(r: Reply) -> Vec<IpAddr> {
        match r {
            Reply::Answer(a) => {
                let (rcode, ips) = parse_answer(&a).unwrap();
                assert_eq!(rcode, 0);
                ips
            }
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    #[test]
    fn answers_names_and_aliases_on_shared_networks() {
        let v = view();
        assert_eq!(
            ips(ask(&v, "n1", "10.0.1.3", "web", TYPE_A)),
            ["10.0.1.2".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(ips(ask(&v, "n1", "10.0.1.3", "WWW.", TYPE_A)).len(), 1);
        // AAAA for a container without IPv6: NODATA, not forwarded.
        assert!(ips(ask(&v, "n1", "10.0.1.3", "web", TYPE_AAAA)).is_empty());
        // c2 shares no network with cache.
        assert!(matches!(
            ask(&v, "n1", "10.0.1.3", "cache", TYPE_A),
            Reply::Forward(_)
        ));
        // c1 is on both networks: it finds cache through n2.
        assert_eq!(
            ips(ask(&v, "n1", "10.0.1.2", "cache", TYPE_A)),
            ["10.0.2.2".parse::<IpAddr>().unwrap()]
        );
        // A client that is not an endpoint of the network gets only this network's names.
        assert!(matches!(
            ask(&v, "n2", "10.0.1.3", "db", TYPE_A),
            Reply::Forward(_)
        ));
        // Other names go upstream.
        assert_eq!(
            ask(&v, "n1", "10.0.1.3", "example.com", TYPE_A),
            Reply::Forward(vec!["127.0.0.1:53".parse().unwrap()])
        );
    }

    #[test]
    fn link_aliases_answer_only_for_the_linking_container() {
        let mut v = view();
        let c2 = v.networks.get_mut("n1").unwrap().get_mut(1).unwrap();
        c2.links = ["web:front", "/web:/c2/Other"]
            .iter()
            .filter_map(|l| link_alias(l))
            .collect();
        let web = ["10.0.1.2".parse::<IpAddr>().unwrap()];
        assert_eq!(ips(ask(&v, "n1", "10.0.1.3", "front", TYPE_A)), web);
        assert_eq!(ips(ask(&v, "n1", "10.0.1.3", "other.", TYPE_A)), web);
        // c1 has no such link: the alias is not a name of the network.
        assert!(matches!(
            ask(&v, "n1", "10.0.1.2", "front", TYPE_A),
            Reply::Forward(_)
        ));
    }

    #[test]
    fn reverse_lookups() {
        let v = view();
        match ask(&v, "n1", "10.0.1.3", "2.1.0.10.in-addr.arpa", TYPE_PTR) {
            Reply::Answer(a) => {
                assert_eq!(a[7], 1, "one answer");
                let tail = encode_name("web");
                assert!(a.ends_with(&tail));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_queries() {
        let v = view();
        assert!(matches!(
            handle(&v, "n1", "10.0.1.3".parse().unwrap(), &[1, 2, 3]),
            Reply::Answer(_)
        ));
        let mut resp = build_query(1, "web", TYPE_A);
        resp[2] |= 0x80;
        assert_eq!(
            handle(&v, "n1", "10.0.1.3".parse().unwrap(), &resp),
            Reply::Drop
        );
        let sf = servfail(&build_query(9, "x", TYPE_A)).unwrap();
        assert_eq!(parse_answer(&sf).unwrap().0, RCODE_SERVFAIL);
    }

    #[test]
    fn resolv_conf_parsing() {
        let text =
            "# c\nnameserver 10.0.0.53\nsearch x\nnameserver fe80::1%eth0\noptions ndots:2\n";
        assert_eq!(resolv_conf_nameservers(text), ["10.0.0.53", "fe80::1"]);
        assert_eq!(
            parse_upstream("1.2.3.4"),
            Some("1.2.3.4:53".parse().unwrap())
        );
        assert_eq!(
            parse_upstream("127.0.0.1:5353"),
            Some("127.0.0.1:5353".parse().unwrap())
        );
        assert_eq!(parse_upstream("::1"), Some("[::1]:53".parse().unwrap()));
        assert_eq!(parse_upstream("bogus"), None);
    }

    #[tokio::test]
    async fn resolver_answers_and_forwards_over_udp_and_tcp() {
        // A fake upstream on loopback that answers every question with 192.0.2.1.
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 512];
            while let Ok((n, peer)) = upstream.recv_from(&mut buf).await {
                let q = parse_question(&buf[..n]).unwrap();
                let a = answer(&q, &[(TYPE_A, vec![192, 0, 2, 1])]);
                upstream.send_to(&a, peer).await.unwrap();
            }
        });
        let shared = SharedView::default();
        let mut v = DnsView::default();
        v.networks
            .insert("n1".into(), vec![entry("c1", &["web"], "127.0.0.1")]);
        v.container_networks.insert("c1".into(), vec!["n1".into()]);
        v.default_upstreams = vec![up_addr];
        shared.set(v);
        let mut servers = DnsServers::new(shared, 0, tokio::runtime::Handle::current());
        let want = BTreeMap::from([("n1".to_string(), "127.0.0.1".parse().unwrap())]);
        assert!(servers.sync(&want).is_empty());
        let addr = servers.local_addr("n1").unwrap();

        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(addr).await.unwrap();
        let mut buf = vec![0u8; 512];
        client.send(&build_query(1, "web", TYPE_A)).await.unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(
            parse_answer(&buf[..n]).unwrap().1,
            ["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
        client
            .send(&build_query(2, "example.org", TYPE_A))
            .await
            .unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(
            parse_answer(&buf[..n]).unwrap().1,
            ["192.0.2.1".parse::<IpAddr>().unwrap()]
        );

        // TCP: a local answer (forwarding over TCP needs a TCP upstream).
        let mut s = TcpStream::connect(addr).await.unwrap();
        let q = build_query(3, "web", TYPE_A);
        s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(&q).await.unwrap();
        let len = s.read_u16().await.unwrap() as usize;
        let mut a = vec![0u8; len];
        s.read_exact(&mut a).await.unwrap();
        assert_eq!(
            parse_answer(&a).unwrap().1,
            ["127.0.0.1".parse::<IpAddr>().unwrap()]
        );

        servers.sync(&BTreeMap::new());
        assert!(servers.local_addr("n1").is_none());
    }
}
