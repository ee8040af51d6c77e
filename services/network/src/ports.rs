//! Published ports: Docker's `-p` syntax, validation, and host port allocation (explicit ports,
//! ranges and random ports from the ephemeral range) against berth's own records and against
//! sockets other processes hold.

use std::fmt;
use std::net::IpAddr;

use berth_core::{Error, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Proto {
    /// `tcp`, `udp`, `sctp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }

    /// Parses `tcp`, `udp` or `sctp` (any case).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "" | "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            "sctp" => Ok(Self::Sctp),
            _ => Err(Error::invalid_argument(format!(
                "invalid protocol {s:?} (tcp, udp, sctp)"
            ))),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A port to publish, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRequest {
    /// `None`: every host address.
    pub host_ip: Option<IpAddr>,
    /// 0: a random port from the ephemeral range.
    pub host_port: u16,
    /// When non-zero, any free port in `host_port..=host_port_end`.
    pub host_port_end: u16,
    /// The port inside the container.
    pub container_port: u16,
    /// The protocol.
    pub proto: Proto,
}

impl PortRequest {
    /// Validates the parts of a request as they arrive on the wire.
    pub fn new(
        host_ip: &str,
        host_port: u32,
        host_port_end: u32,
        container_port: u32,
        proto: Proto,
    ) -> Result<Self> {
        let port = |what: &str, v: u32, zero_ok: bool| -> Result<u16> {
            match u16::try_from(v) {
                Ok(p) if p != 0 || zero_ok => Ok(p),
                _ => Err(Error::invalid_argument(format!("invalid {what} {v}"))),
            }
        };
        let host_ip = match host_ip.trim_matches(['[', ']']) {
            "" | "0.0.0.0" | "::" => None,
            s => {
                let ip: IpAddr = s.parse().map_err(|_| {
                    Error::invalid_argument(format!(
                        "invalid host IP {host_ip:?} for a published port"
                    ))
                })?;
                if ip.is_ipv6() {
                    return Err(Error::invalid_argument(format!(
                        "publishing on the IPv6 address {ip} is not supported; use an IPv4 address or all addresses"
                    )));
                }
                Some(ip)
            }
        };
        let container_port = port("container port", container_port, false)?;
        let host_port = port("host port", host_port, true)?;
        let host_port_end = port("host port range end", host_port_end, true)?;
        if host_port_end != 0 && (host_port == 0 || host_port_end < host_port) {
            return Err(Error::invalid_argument(format!(
                "invalid host port range {host_port}-{host_port_end}"
            )));
        }
        Ok(Self {
            host_ip,
            host_port,
            host_port_end,
            container_port,
            proto,
        })
    }
}

/// A published port as bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortBinding {
    /// `None`: every host address.
    pub host_ip: Option<IpAddr>,
    /// The host port actually used.
    pub host_port: u16,
    /// The port inside the container.
    pub container_port: u16,
    /// The protocol.
    pub proto: Proto,
}

impl PortBinding {
    fn clashes(&self, proto: Proto, ip: Option<IpAddr>, port: u16) -> bool {
        self.proto == proto
            && self.host_port == port
            && (self.host_ip.is_none() || ip.is_none() || self.host_ip == ip)
    }
}

impl fmt::Display for PortBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ip = self
            .host_ip
            .map_or("0.0.0.0".to_string(), |i| i.to_string());
        write!(
            f,
            "{ip}:{}->{}/{}",
            self.host_port, self.container_port, self.proto
        )
    }
}

/// Parses Docker's `-p` syntax: `[ip:][hostPort[-end]:]containerPort[-end][/proto]`.
///
/// A container port range maps onto a host range of the same length (or random ports); a
/// single container port with a host range takes any free port of the range.
pub fn parse(spec: &str) -> Result<Vec<PortRequest>> {
    let invalid =
        |why: &str| Error::invalid_argument(format!("invalid port specification {spec:?}: {why}"));
    let (rest, proto) = match spec.rsplit_once('/') {
        Some((r, p)) => (r, Proto::parse(p)?),
        None => (spec, Proto::Tcp),
    };
    // An IPv6 host address is written in brackets.
    let (ip, rest) = if let Some(stripped) = rest.strip_prefix('[') {
        let (ip, after) = stripped
            .split_once("]:")
            .ok_or_else(|| invalid("unclosed ["))?;
        (ip.to_string(), after)
    } else {
        let parts: Vec<&str> = rest.split(':').collect();
        match parts.len() {
            1 | 2 => (String::new(), rest),
            3 => (parts[0].to_string(), &rest[parts[0].len() + 1..]),
            _ => return Err(invalid("too many colons")),
        }
    };
    let (host, container) = match rest.split_once(':') {
        Some((h, c)) => (h, c),
        None => ("", rest),
    };
    let range = |s: &str, what: &str| -> Result<(u32, u32)> {
        let num = |x: &str| {
            x.parse::<u32>()
                .map_err(|_| invalid(&format!("bad {what} {x:?}")))
        };
        match s.split_once('-') {
            Some((a, b)) => Ok((num(a)?, num(b)?)),
            None if s.is_empty() => Ok((0, 0)),
            None => {
                let n = num(s)?;
                Ok((n, n))
            }
        }
    };
    let (c_lo, c_hi) = range(container, "container port")?;
    let (h_lo, h_hi) = range(host, "host port")?;
    if c_lo == 0 || c_hi < c_lo {
        return Err(invalid("container port is required"));
    }
    if h_hi < h_lo {
        return Err(invalid("host port range is reversed"));
    }
    let count = c_hi - c_lo + 1;
    let mut out = Vec::new();
    for i in 0..count {
        let (hp, hend) = if h_lo == 0 {
            (0, 0)
        } else if count == 1 {
            (h_lo, if h_hi > h_lo { h_hi } else { 0 })
        } else if h_hi - h_lo + 1 == count {
            (h_lo + i, 0)
        } else {
            return Err(invalid("host and container port ranges differ in length"));
        };
        out.push(PortRequest::new(&ip, hp, hend, c_lo + i, proto)?);
    }
    Ok(out)
}

/// Host-side knowledge the allocator needs: which ports other processes hold.
pub trait PortProbe: Send + Sync {
    /// Whether no socket on the host holds `port`/`proto` on `ip` (`None`: any address).
    fn is_free(&self, ip: Option<IpAddr>, port: u16, proto: Proto) -> bool;
    /// Inclusive range random host ports are taken from.
    fn ephemeral_range(&self) -> (u16, u16);
}

/// A binding some attachment already holds, with the attachment's container id.
#[derive(Debug, Clone, Copy)]
pub struct Held<'a> {
    /// Container id of the holder.
    pub owner: &'a str,
    /// The binding.
    pub binding: &'a PortBinding,
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Chooses the host port of every request. Refuses ports berth already published (`held`),
/// ports other processes hold (`probe`) and duplicates within `requests`.
pub fn allocate(
    requests: &[PortRequest],
    held: &[Held<'_>],
    probe: &dyn PortProbe,
) -> Result<Vec<PortBinding>> {
    let mut out: Vec<PortBinding> = Vec::with_capacity(requests.len());
    for req in requests {
        let ip_text = req.host_ip.map_or("0.0.0.0".to_string(), |i| i.to_string());
        let held_by = |port: u16, out: &[PortBinding]| -> Option<String> {
            if let Some(h) = held
                .iter()
                .find(|h| h.binding.clashes(req.proto, req.host_ip, port))
            {
                return Some(format!("container {}", short(h.owner)));
            }
            out.iter()
                .any(|b| b.clashes(req.proto, req.host_ip, port))
                .then(|| "this request".to_string())
        };
        let usable = |port: u16, out: &[PortBinding]| {
            held_by(port, out).is_none() && probe.is_free(req.host_ip, port, req.proto)
        };
        let port = if req.host_port != 0 && req.host_port_end == 0 {
            let port = req.host_port;
            if let Some(who) = held_by(port, &out) {
                return Err(Error::already_exists(format!(
                    "Bind for {ip_text}:{port}/{} failed: port is already allocated (by {who})",
                    req.proto
                )));
            }
            if !probe.is_free(req.host_ip, port, req.proto) {
                return Err(Error::already_exists(format!(
                    "Bind for {ip_text}:{port}/{} failed: address already in use by another process",
                    req.proto
                )));
            }
            port
        } else {
            let (lo, hi) = if req.host_port == 0 {
                probe.ephemeral_range()
            } else {
                (req.host_port, req.host_port_end)
            };
            if lo == 0 || hi < lo {
                return Err(Error::internal(format!(
                    "invalid ephemeral port range {lo}-{hi}"
                )));
            }
            let span = (hi - lo) as u32 + 1;
            // Random ports start at a random point so that concurrent stacks rarely collide;
            // explicit ranges are searched in order, as Docker does.
            let start = if req.host_port == 0 {
                rand::rng().random_range(0..span)
            } else {
                0
            };
            (0..span)
                .map(|i| lo + ((start + i) % span) as u16)
                .find(|p| usable(*p, &out))
                .ok_or_else(|| {
                    Error::already_exists(format!(
                        "Bind for {ip_text}:{lo}-{hi}/{} failed: no free host port in the range",
                        req.proto
                    ))
                })?
        };
        out.push(PortBinding {
            host_ip: req.host_ip,
            host_port: port,
            container_port: req.container_port,
            proto: req.proto,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    struct FakeProbe {
        busy: BTreeSet<(u16, Proto)>,
        range: (u16, u16),
    }

    impl PortProbe for FakeProbe {
        fn is_free(&self, _ip: Option<IpAddr>, port: u16, proto: Proto) -> bool {
            !self.busy.contains(&(port, proto))
        }
        fn ephemeral_range(&self) -> (u16, u16) {
            self.range
        }
    }

    fn probe() -> FakeProbe {
        FakeProbe {
            busy: BTreeSet::new(),
            range: (40000, 40009),
        }
    }

    #[test]
    fn parses_docker_syntax() {
        let r = parse("80").unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].host_ip, r[0].host_port, r[0].container_port),
            (None, 0, 80)
        );
        assert_eq!(r[0].proto, Proto::Tcp);
        let r = parse("127.0.0.1:8080:80/udp").unwrap();
        assert_eq!(r[0].host_ip, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(
            (r[0].host_port, r[0].container_port, r[0].proto),
            (8080, 80, Proto::Udp)
        );
        let r = parse("127.0.0.1::80").unwrap();
        assert_eq!((r[0].host_port, r[0].container_port), (0, 80));
        let r = parse("8000-8010:80").unwrap();
        assert_eq!((r[0].host_port, r[0].host_port_end), (8000, 8010));
        let r = parse("9000-9001:90-91/tcp").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[1].host_port, r[1].container_port), (9001, 91));
        let r = parse("[::]:8080:80").unwrap();
        assert_eq!(r[0].host_ip, None);
        for bad in [
            "",
            "x",
            "0",
            "70000",
            "8080:",
            "1:2:3:4",
            "90-80",
            "8000-8001:80-82",
            "80/icmp",
            "[::1]:80:80",
            "10.0.0.300:80:80",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
        let err = parse("80/icmp").unwrap_err();
        assert_eq!(err.kind(), berth_core::ErrorKind::InvalidArgument);
    }

    #[test]
    fn explicit_ports_conflict_with_records_and_processes() {
        let owner = "a".repeat(64);
        let existing = PortBinding {
            host_ip: Some("127.0.0.1".parse().unwrap()),
            host_port: 8080,
            container_port: 80,
            proto: Proto::Tcp,
        };
        let held = [Held {
            owner: &owner,
            binding: &existing,
        }];
        // Same address and port: refused, naming the port and the holder.
        let err = allocate(&parse("127.0.0.1:8080:80").unwrap(), &held, &probe()).unwrap_err();
        assert_eq!(err.kind(), berth_core::ErrorKind::AlreadyExists);
        assert!(
            err.message().contains("127.0.0.1:8080/tcp"),
            "{}",
            err.message()
        );
        assert!(err.message().contains("aaaaaaaaaaaa"), "{}", err.message());
        // All addresses overlap every address.
        assert!(allocate(&parse("8080:80").unwrap(), &held, &probe()).is_err());
        // Another address, or another protocol, is fine.
        allocate(&parse("127.0.0.2:8080:80").unwrap(), &held, &probe()).unwrap();
        allocate(&parse("127.0.0.1:8080:80/udp").unwrap(), &held, &probe()).unwrap();
        // A port another process holds.
        let mut p = probe();
        p.busy.insert((9090, Proto::Tcp));
        let err = allocate(&parse("9090:80").unwrap(), &[], &p).unwrap_err();
        assert!(
            err.message().contains("another process"),
            "{}",
            err.message()
        );
        // Duplicates within one request.
        let mut reqs = parse("7000:80").unwrap();
        reqs.extend(parse("7000:81").unwrap());
        assert!(allocate(&reqs, &[], &probe()).is_err());
    }

    #[test]
    fn random_ports_and_ranges() {
        let mut p = probe();
        for port in 40000..40009 {
            p.busy.insert((port, Proto::Tcp));
        }
        let got = allocate(&parse("80").unwrap(), &[], &p).unwrap();
        assert_eq!(got[0].host_port, 40009, "the only free port of the range");
        p.busy.insert((40009, Proto::Tcp));
        let err = allocate(&parse("80").unwrap(), &[], &p).unwrap_err();
        assert_eq!(err.kind(), berth_core::ErrorKind::AlreadyExists);

        // Two random ports in one request differ.
        let got = allocate(&parse("80-81").unwrap(), &[], &probe()).unwrap();
        assert_ne!(got[0].host_port, got[1].host_port);

        // A host range takes the first free port, in order.
        let mut p = probe();
        p.busy.insert((8000, Proto::Tcp));
        let got = allocate(&parse("8000-8002:80").unwrap(), &[], &p).unwrap();
        assert_eq!(got[0].host_port, 8001);
    }
}
