//! The real [`Host`]: probing host ports by binding them, the ephemeral port range and the
//! host's resolv.conf.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;

use crate::kernel::Host;
use crate::ports::{PortProbe, Proto};

/// The machine berth-network runs on.
#[derive(Debug, Clone)]
pub struct RealHost {
    resolv_conf: PathBuf,
}

impl Default for RealHost {
    fn default() -> Self {
        Self {
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
        }
    }
}

impl PortProbe for RealHost {
    fn is_free(&self, ip: Option<IpAddr>, port: u16, proto: Proto) -> bool {
        let addr = SocketAddr::new(ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), port);
        // Published ports hold no socket (they are DNAT rules), so binding tells whether some
        // other process listens there. std sets SO_REUSEADDR on TCP listeners, so connections
        // lingering in TIME_WAIT do not count as taken.
        match proto {
            Proto::Tcp => TcpListener::bind(addr).is_ok(),
            Proto::Udp => UdpSocket::bind(addr).is_ok(),
            // No SCTP sockets in std; berth's own records are the only check.
            Proto::Sctp => true,
        }
    }

    fn ephemeral_range(&self) -> (u16, u16) {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| {
                let mut it = s.split_whitespace().map(|x| x.parse::<u16>().ok());
                Some((it.next()??, it.next()??))
            })
            .filter(|(lo, hi)| *lo > 0 && hi >= lo)
            .unwrap_or((32768, 60999))
    }
}

impl Host for RealHost {
    fn resolv_conf(&self) -> String {
        std::fs::read_to_string(&self.resolv_conf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_port_is_taken() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let host = RealHost::default();
        assert!(!host.is_free(Some("127.0.0.1".parse().unwrap()), port, Proto::Tcp));
        assert!(
            !host.is_free(None, port, Proto::Tcp),
            "all addresses include 127.0.0.1"
        );
        drop(l);
        assert!(host.is_free(Some("127.0.0.1".parse().unwrap()), port, Proto::Tcp));
        let (lo, hi) = host.ephemeral_range();
        assert!(lo <= hi);
    }
}
