//! Address management: CIDR arithmetic, address pools of a network (subnet, gateway, ip-range,
//! reserved addresses), sequential address allocation and subnet allocation from the default
//! address pools.
//!
//! Everything here is pure: which addresses are in use comes from the caller (the attachment
//! records in the store), so the allocator cannot drift from what is persisted.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use berth_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// An IP network: an address with its host bits cleared and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

fn bits(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// The address as an integer (IPv4 in the low 32 bits).
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The inverse of [`to_u128`] for the family of `like`.
pub fn from_u128(value: u128, like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(value as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(value)),
    }
}

fn mask(prefix: u8, width: u8) -> u128 {
    let all = if width == 32 {
        u32::MAX as u128
    } else {
        u128::MAX
    };
    all & !all.checked_shr(prefix as u32).unwrap_or(0)
}

impl Cidr {
    /// The network of `addr` with `prefix` (host bits are cleared).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self> {
        if prefix > bits(addr) {
            return Err(Error::invalid_argument(format!(
                "invalid prefix length /{prefix} for {addr}"
            )));
        }
        let network = from_u128(to_u128(addr) & mask(prefix, bits(addr)), addr);
        Ok(Self { network, prefix })
    }

    /// Parses `addr/prefix` and also returns the address as written (e.g. a gateway in
    /// `172.29.0.1/16`).
    pub fn parse_with_host(s: &str) -> Result<(IpAddr, Self)> {
        let invalid = || Error::invalid_argument(format!("invalid CIDR {s:?}"));
        let (addr, prefix) = s.trim().split_once('/').ok_or_else(invalid)?;
        let addr: IpAddr = addr.parse().map_err(|_| invalid())?;
        let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
        Ok((addr, Self::new(addr, prefix)?))
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether this is an IPv4 network.
    pub fn is_v4(&self) -> bool {
        self.network.is_ipv4()
    }

    fn width(&self) -> u8 {
        bits(self.network)
    }

    /// Number of addresses (saturating for huge IPv6 networks).
    pub fn size(&self) -> u128 {
        let host_bits = (self.width() - self.prefix) as u32;
        1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
    }

    /// The last address of the network (IPv4 broadcast).
    pub fn last(&self) -> IpAddr {
        let base = to_u128(self.network);
        from_u128(
            base | !mask(self.prefix, self.width()) & mask(self.width(), self.width()),
            self.network,
        )
    }

    /// Whether `ip` is inside the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.is_v4()
            && to_u128(ip) & mask(self.prefix, self.width()) == to_u128(self.network)
    }

    /// Whether `other` lies entirely inside this network.
    pub fn contains_net(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && self.contains(other.network)
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains_net(other) || other.contains_net(self)
    }

    /// The `n`th address of the network, if there is one.
    pub fn nth(&self, n: u128) -> Option<IpAddr> {
        (n < self.size()).then(|| from_u128(to_u128(self.network) + n, self.network))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(Self::parse_with_host(s)?.1)
    }
}

impl TryFrom<String> for Cidr {
    type Error = Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

/// One address pool of a network: where its containers' addresses come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// The network's subnet.
    pub subnet: Cidr,
    /// The bridge's address, never given to a container.
    pub gateway: IpAddr,
    /// Container addresses come from here when set (inside the subnet).
    pub ip_range: Option<Cidr>,
    /// Addresses reserved by name (Docker's aux-addresses).
    pub aux_addresses: BTreeMap<String, IpAddr>,
    /// The subnet was chosen by the user rather than allocated from the default pools.
    pub user_subnet: bool,
}

fn parse_ip(what: &str, s: &str) -> Result<IpAddr> {
    s.trim()
        .parse()
        .map_err(|_| Error::invalid_argument(format!("invalid {what} {s:?}")))
}

impl Pool {
    /// Validates a pool as given in a create request (`subnet` already chosen).
    pub fn new(
        subnet: Cidr,
        gateway: &str,
        ip_range: &str,
        aux: &BTreeMap<String, String>,
        user_subnet: bool,
    ) -> Result<Self> {
        let gateway = if gateway.is_empty() {
            first_usable(&subnet).ok_or_else(|| {
                Error::invalid_argument(format!("subnet {subnet} has no usable address"))
            })?
        } else {
            let gw = parse_ip("gateway", gateway)?;
            if !subnet.contains(gw) {
                return Err(Error::invalid_argument(format!(
                    "gateway {gw} is not in subnet {subnet}"
                )));
            }
            gw
        };
        let ip_range = if ip_range.is_empty() {
            None
        } else {
            let range: Cidr = ip_range.parse()?;
            if !subnet.contains_net(&range) {
                return Err(Error::invalid_argument(format!(
                    "ip-range {range} is not inside subnet {subnet}"
                )));
            }
            Some(range)
        };
        let mut aux_addresses = BTreeMap::new();
        for (name, value) in aux {
            let ip = parse_ip("auxiliary address", value)?;
            if !subnet.contains(ip) {
                return Err(Error::invalid_argument(format!(
                    "auxiliary address {name}={ip} is not in subnet {subnet}"
                )));
            }
            aux_addresses.insert(name.clone(), ip);
        }
        Ok(Self {
            subnet,
            gateway,
            ip_range,
            aux_addresses,
            user_subnet,
        })
    }

    /// Addresses that are never handed to containers.
    pub fn reserved(&self) -> BTreeSet<IpAddr> {
        let mut out: BTreeSet<IpAddr> = self.aux_addresses.values().copied().collect();
        out.insert(self.gateway);
        out
    }

    fn is_assignable(&self, ip: IpAddr) -> bool {
        if !self.subnet.contains(ip) || ip == self.subnet.network() {
            return false;
        }
        // The IPv4 broadcast address, except on /31 and /32 point-to-point networks.
        !(self.subnet.is_v4() && self.subnet.prefix() < 31 && ip == self.subnet.last())
    }

    /// Checks that a requested static address can be given: inside the subnet, not reserved,
    /// not in use.
    pub fn check_static(&self, ip: IpAddr, used: &BTreeSet<IpAddr>) -> Result<()> {
        if !self.is_assignable(ip) {
            return Err(Error::invalid_argument(format!(
                "address {ip} is not a usable address of subnet {}",
                self.subnet
            )));
        }
        if self.reserved().contains(&ip) {
            return Err(Error::already_exists(format!(
                "address {ip} is reserved on this network (gateway or auxiliary address)"
            )));
        }
        if used.contains(&ip) {
            return Err(Error::already_exists(format!(
                "address {ip} is already in use"
            )));
        }
        Ok(())
    }

    /// The next free address after `after` (wrapping), from the ip-range or the subnet.
    ///
    /// Sequential allocation, as Docker does, so that a released address is not handed out
    /// again at once.
    pub fn allocate(&self, used: &BTreeSet<IpAddr>, after: Option<IpAddr>) -> Result<IpAddr> {
        let range = self.ip_range.unwrap_or(self.subnet);
        let reserved = self.reserved();
        let size = range.size();
        let base = to_u128(range.network());
        let start = match after {
            Some(ip) if range.contains(ip) => (to_u128(ip) - base).wrapping_add(1) % size.max(1),
            _ => 0,
        };
        // At most used + reserved + 3 (network, broadcast, wrap) candidates are unusable in a
        // row, so the scan is bounded by the records, not by the size of the range.
        let limit = size.min((used.len() + reserved.len() + 3) as u128);
        let mut offset = start;
        for _ in 0..limit {
            let ip = from_u128(base + offset, range.network());
            if self.is_assignable(ip) && !reserved.contains(&ip) && !used.contains(&ip) {
                return Ok(ip);
            }
            offset = (offset + 1) % size;
        }
        Err(Error::resource_exhausted(format!(
            "no free address left in {range}"
        )))
    }
}

/// The first address after the network address (the default gateway).
pub fn first_usable(subnet: &Cidr) -> Option<IpAddr> {
    let n = if subnet.size() > 2 { 1 } else { 0 };
    subnet.nth(n)
}

/// One of the default address pools: networks of `/size` taken from `base`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultPool {
    /// Where subnets come from.
    pub base: Cidr,
    /// Prefix length of each subnet.
    pub size: u8,
}

impl DefaultPool {
    /// Parses a configured pool.
    pub fn new(base: &str, size: u8) -> Result<Self> {
        let base: Cidr = base.parse()?;
        if size < base.prefix() || size > base.width() {
            return Err(Error::invalid_argument(format!(
                "default address pool {base}: size /{size} must be between /{} and /{}",
                base.prefix(),
                base.width()
            )));
        }
        Ok(Self { base, size })
    }
}

/// The first subnet of the default pools that overlaps none of `taken` (other networks'
/// subnets and the host's own addresses).
pub fn allocate_subnet(pools: &[DefaultPool], taken: &[Cidr], v4: bool) -> Result<Cidr> {
    for pool in pools.iter().filter(|p| p.base.is_v4() == v4) {
        let count = 1u128
            .checked_shl((pool.size - pool.base.prefix()) as u32)
            .unwrap_or(u128::MAX);
        let step = 1u128
            .checked_shl((pool.base.width() - pool.size) as u32)
            .unwrap_or(0);
        let base = to_u128(pool.base.network());
        // Bounded: a pool larger than this is a configuration mistake, not a reason to spin.
        for i in 0..count.min(1 << 20) {
            let candidate = Cidr::new(from_u128(base + i * step, pool.base.network()), pool.size)?;
            if !taken.iter().any(|t| t.overlaps(&candidate)) {
                return Ok(candidate);
            }
        }
    }
    Err(Error::resource_exhausted(
        "all predefined address pools have been fully subnetted",
    ))
}

/// A random unique-local IPv6 /64 (RFC 4193), for networks with IPv6 and no subnet given.
pub fn random_ula64() -> Cidr {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = 0xfd;
    bytes[8..].fill(0);
    Cidr::new(IpAddr::V6(Ipv6Addr::from(bytes)), 64).expect("/64 is a valid IPv6 prefix")
}

/// The MAC address Docker derives from an IPv4 address: `02:42` and the four address bytes.
pub fn mac_from_ipv4(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x42, o[0], o[1], o[2], o[3]]
}

/// A random locally administered unicast MAC.
pub fn random_mac() -> [u8; 6] {
    let mut mac: [u8; 6] = rand::random();
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with dashes); refuses multicast addresses.
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let invalid = || Error::invalid_argument(format!("invalid MAC address {s:?}"));
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(invalid());
    }
    let mut mac = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return Err(invalid());
        }
        mac[i] = u8::from_str_radix(p, 16).map_err(|_| invalid())?;
    }
    if mac[0] & 1 == 1 {
        return Err(Error::invalid_argument(format!(
            "MAC address {s} is a multicast address"
        )));
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_arithmetic() {
        let c = cidr("10.1.2.3/24");
        assert_eq!(c.to_string(), "10.1.2.0/24");
        assert_eq!(c.size(), 256);
        assert_eq!(c.last(), ip("10.1.2.255"));
        assert!(c.contains(ip("10.1.2.200")));
        assert!(!c.contains(ip("10.1.3.1")));
        assert!(!c.contains(ip("::1")));
        assert!(cidr("10.1.0.0/16").overlaps(&c));
        assert!(c.overlaps(&cidr("10.1.0.0/16")));
        assert!(!c.overlaps(&cidr("10.1.3.0/24")));
        assert_eq!(cidr("0.0.0.0/0").size(), 1 << 32);
        assert!(cidr("0.0.0.0/0").contains(ip("8.8.8.8")));
        let v6 = cidr("fd00:1::5/64");
        assert_eq!(v6.to_string(), "fd00:1::/64");
        assert_eq!(v6.last(), ip("fd00:1::ffff:ffff:ffff:ffff"));
        assert_eq!(cidr("::/0").size(), u128::MAX);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0.0".parse::<Cidr>().is_err());
        assert!("x/8".parse::<Cidr>().is_err());
        let (host, net) = Cidr::parse_with_host("172.29.0.1/16").unwrap();
        assert_eq!(host, ip("172.29.0.1"));
        assert_eq!(net, cidr("172.29.0.0/16"));
    }

    #[test]
    fn cidr_serde_is_a_string() {
        let json = serde_json::to_string(&cidr("10.0.0.0/8")).unwrap();
        assert_eq!(json, "\"10.0.0.0/8\"");
        assert_eq!(
            serde_json::from_str::<Cidr>(&json).unwrap(),
            cidr("10.0.0.0/8")
        );
    }

    #[test]
    fn pool_validation() {
        let none = BTreeMap::new();
        let p = Pool::new(cidr("10.5.0.0/24"), "", "", &none, true).unwrap();
        assert_eq!(p.gateway, ip("10.5.0.1"));
        let err = Pool::new(cidr("10.5.0.0/24"), "10.6.0.1", "", &none, true).unwrap_err();
        assert!(err.message().contains("not in subnet"), "{}", err.message());
        let err = Pool::new(cidr("10.5.0.0/24"), "", "10.5.1.0/28", &none, true).unwrap_err();
        assert!(err.message().contains("ip-range"));
        let aux = BTreeMap::from([("router".to_string(), "10.5.1.1".to_string())]);
        assert!(Pool::new(cidr("10.5.0.0/24"), "", "", &aux, true).is_err());
        assert!(Pool::new(cidr("10.5.0.0/24"), "bogus", "", &none, true).is_err());
    }

    #[test]
    fn sequential_allocation_skips_reserved_and_used_and_wraps() {
        let aux = BTreeMap::from([("r".to_string(), "10.5.0.3".to_string())]);
        let p = Pool::new(cidr("10.5.0.0/29"), "", "", &aux, true).unwrap();
        let mut used = BTreeSet::new();
        let a = p.allocate(&used, None).unwrap();
        assert_eq!(a, ip("10.5.0.2"));
        used.insert(a);
        let b = p.allocate(&used, Some(a)).unwrap();
        assert_eq!(b, ip("10.5.0.4"), "skips the aux address");
        used.insert(b);
        for expect in ["10.5.0.5", "10.5.0.6"] {
            let last = *used.iter().max().unwrap();
            let n = p.allocate(&used, Some(last)).unwrap();
            assert_eq!(n, ip(expect));
            used.insert(n);
        }
        // .7 is the broadcast address: the pool is full.
        let err = p.allocate(&used, Some(ip("10.5.0.6"))).unwrap_err();
        assert_eq!(err.kind(), berth_core::ErrorKind::ResourceExhausted);
        // A released address is found again after wrapping.
        used.remove(&ip("10.5.0.2"));
        assert_eq!(
            p.allocate(&used, Some(ip("10.5.0.6"))).unwrap(),
            ip("10.5.0.2")
        );
    }

    #[test]
    fn allocation_honours_the_ip_range() {
        let none = BTreeMap::new();
        let p = Pool::new(cidr("10.5.0.0/16"), "", "10.5.7.0/30", &none, true).unwrap();
        let mut used = BTreeSet::new();
        let mut last = None;
        // All four addresses of the range are host addresses of the /16.
        for expect in ["10.5.7.0", "10.5.7.1", "10.5.7.2", "10.5.7.3"] {
            let ip = p.allocate(&used, last).unwrap();
            assert_eq!(ip, self::ip(expect));
            used.insert(ip);
            last = Some(ip);
        }
        assert!(p.allocate(&used, last).is_err());
    }

    #[test]
    fn static_addresses() {
        let none = BTreeMap::new();
        let p = Pool::new(cidr("10.5.0.0/24"), "", "", &none, true).unwrap();
        let used = BTreeSet::from([ip("10.5.0.9")]);
        p.check_static(ip("10.5.0.10"), &used).unwrap();
        assert_eq!(
            p.check_static(ip("10.5.0.9"), &used).unwrap_err().kind(),
            berth_core::ErrorKind::AlreadyExists
        );
        assert!(p.check_static(ip("10.5.0.1"), &used).is_err(), "gateway");
        assert!(
            p.check_static(ip("10.5.0.0"), &used).is_err(),
            "network address"
        );
        assert!(
            p.check_static(ip("10.5.0.255"), &used).is_err(),
            "broadcast"
        );
        assert!(p.check_static(ip("10.6.0.5"), &used).is_err(), "outside");
    }

    #[test]
    fn ipv6_allocation() {
        let none = BTreeMap::new();
        let p = Pool::new(cidr("fd00:dead::/64"), "", "", &none, true).unwrap();
        assert_eq!(p.gateway, ip("fd00:dead::1"));
        let a = p.allocate(&BTreeSet::new(), None).unwrap();
        assert_eq!(a, ip("fd00:dead::2"));
        let ula = random_ula64();
        assert_eq!(ula.prefix(), 64);
        assert!(cidr("fd00::/8").contains_net(&ula));
    }

    #[test]
    fn subnets_from_default_pools() {
        let pools = [
            DefaultPool::new("10.213.0.0/23", 25).unwrap(),
            DefaultPool::new("10.214.0.0/24", 24).unwrap(),
        ];
        let mut taken = vec![cidr("10.213.0.0/26")];
        let a = allocate_subnet(&pools, &taken, true).unwrap();
        assert_eq!(a, cidr("10.213.0.128/25"));
        taken.push(a);
        taken.push(cidr("10.213.1.0/24"));
        assert_eq!(
            allocate_subnet(&pools, &taken, true).unwrap(),
            cidr("10.214.0.0/24")
        );
        taken.push(cidr("10.214.0.0/24"));
        let err = allocate_subnet(&pools, &taken, true).unwrap_err();
        assert_eq!(err.kind(), berth_core::ErrorKind::ResourceExhausted);
        assert!(allocate_subnet(&pools, &[], false).is_err(), "no IPv6 pool");
        assert!(DefaultPool::new("10.0.0.0/16", 8).is_err());
    }

    #[test]
    fn macs() {
        let mac = mac_from_ipv4("172.18.0.2".parse().unwrap());
        assert_eq!(format_mac(&mac), "02:42:ac:12:00:02");
        assert_eq!(parse_mac("02:42:AC:12:00:02").unwrap(), mac);
        assert!(parse_mac("01:00:5e:00:00:01").is_err(), "multicast");
        assert!(parse_mac("02:42:ac:12:00").is_err());
        let r = random_mac();
        assert_eq!(r[0] & 3, 2);
    }
}
