//! SetupNetwork: the guest's NICs (found by MAC), addresses, routes and hostname, over netlink.

use std::net::IpAddr;

use berth_core::{Error, Result};
use berth_proto::berth::agent::v1::SetupNetworkRequest;
use futures::TryStreamExt;
use netlink_packet_route::link::LinkAttribute;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let what = what.into();
    move |e| Error::internal(what).with_source(std::io::Error::other(e.to_string()))
}

async fn handle() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection()
        .map_err(|e| Error::internal("open netlink socket").with_source(e))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Brings the loopback interface up.
pub async fn loopback_up() -> Result<()> {
    let h = handle().await?;
    let index = index_by_name(&h, "lo")
        .await?
        .ok_or_else(|| Error::not_found("no lo"))?;
    h.link()
        .change(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl("bring up lo"))
}

async fn index_by_name(h: &Handle, name: &str) -> Result<Option<u32>> {
    let mut links = h.link().get().execute();
    while let Some(msg) = links.try_next().await.map_err(nl("list links"))? {
        if msg
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name))
        {
            return Ok(Some(msg.header.index));
        }
    }
    Ok(None)
}

async fn index_by_mac(h: &Handle, mac: &[u8]) -> Result<Option<u32>> {
    let mut links = h.link().get().execute();
    while let Some(msg) = links.try_next().await.map_err(nl("list links"))? {
        if msg
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Address(m) if m == mac))
        {
            return Ok(Some(msg.header.index));
        }
    }
    Ok(None)
}

/// "aa:bb:cc:dd:ee:ff" → bytes.
pub fn parse_mac(s: &str) -> Result<Vec<u8>> {
    let bytes: std::result::Result<Vec<u8>, _> =
        s.split(':').map(|b| u8::from_str_radix(b, 16)).collect();
    match bytes {
        Ok(b) if b.len() == 6 => Ok(b),
        _ => Err(Error::invalid_argument(format!("bad MAC address {s:?}"))),
    }
}

/// "10.0.0.5/16" → (address, prefix).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8)> {
    let bad = || Error::invalid_argument(format!("bad CIDR {s:?}"));
    let (ip, prefix) = s.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad());
    }
    Ok((ip, prefix))
}

/// Applies `req`: interfaces first (renamed, addressed, MTU, up), then routes, then the hostname.
pub async fn setup(req: &SetupNetworkRequest) -> Result<()> {
    let h = handle().await?;
    for nic in &req.interfaces {
        let mac = parse_mac(&nic.mac)?;
        let index = index_by_mac(&h, &mac)
            .await?
            .ok_or_else(|| Error::not_found(format!("no guest NIC with MAC {}", nic.mac)))?;
        // A link is renamed only while down.
        h.link()
            .change(LinkUnspec::new_with_index(index).down().build())
            .execute()
            .await
            .map_err(nl(format!("bring down {}", nic.mac)))?;
        let mut change = LinkUnspec::new_with_index(index);
        if !nic.name.is_empty() {
            change = change.name(nic.name.clone());
        }
        if nic.mtu != 0 {
            change = change.mtu(nic.mtu);
        }
        h.link()
            .change(change.build())
            .execute()
            .await
            .map_err(nl(format!("configure {}", nic.name)))?;
        for addr in &nic.addresses {
            let (ip, prefix) = parse_cidr(addr)?;
            h.address()
                .add(index, ip, prefix)
                .execute()
                .await
                .map_err(nl(format!("add {addr} to {}", nic.name)))?;
        }
        h.link()
            .change(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format!("bring up {}", nic.name)))?;
    }
    for route in &req.routes {
        let mut b = RouteMessageBuilder::<IpAddr>::new();
        let dest = match route.destination.as_str() {
            "" | "default" => None,
            d => Some(parse_cidr(d)?),
        };
        let gateway: Option<IpAddr> = match route.gateway.as_str() {
            "" => None,
            g => Some(
                g.parse()
                    .map_err(|_| Error::invalid_argument(format!("bad gateway {g:?}")))?,
            ),
        };
        let bad = |e: String| Error::invalid_argument(format!("route {}: {e}", route.destination));
        match dest {
            Some((ip, prefix)) => {
                b = b
                    .destination_prefix(ip, prefix)
                    .map_err(|e| bad(format!("{e:?}")))?
            }
            None => {
                let any: IpAddr = match gateway {
                    Some(IpAddr::V6(_)) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                    _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                };
                b = b
                    .destination_prefix(any, 0)
                    .map_err(|e| bad(format!("{e:?}")))?;
            }
        }
        if let Some(gw) = gateway {
            b = b.gateway(gw).map_err(|e| bad(format!("{e:?}")))?;
        }
        if !route.device.is_empty() {
            let index = index_by_name(&h, &route.device)
                .await?
                .ok_or_else(|| Error::not_found(format!("no guest interface {}", route.device)))?;
            b = b.output_interface(index);
        }
        h.route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(nl(format!("add route {}", route.destination)))?;
    }
    if !req.hostname.is_empty() {
        nix::unistd::sethostname(&req.hostname)
            .map_err(|e| Error::internal("set hostname").with_source(e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_cidrs_parse() {
        assert_eq!(
            parse_mac("02:42:ac:11:00:02").unwrap(),
            [2, 0x42, 0xac, 0x11, 0, 2]
        );
        assert!(parse_mac("02:42").is_err());
        assert_eq!(
            parse_cidr("10.88.0.5/16").unwrap(),
            ("10.88.0.5".parse().unwrap(), 16)
        );
        assert!(parse_cidr("10.88.0.5/33").is_err());
        assert!(parse_cidr("fd00::5/64").is_ok());
    }
}
