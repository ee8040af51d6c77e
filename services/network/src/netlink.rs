//! The real [`Dataplane`]: rtnetlink for links, addresses and routes, `/proc/sys` for sysctls.
//!
//! Work inside a container's namespace runs on a short-lived thread that `setns`es into it
//! and opens its own netlink socket there (a netlink socket talks to the namespace it was
//! created in); the thread ends with the call, so no thread of the process is left in a
//! foreign namespace. Calls are synchronous: the service runs them on blocking threads.

use std::collections::BTreeSet;
use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use berth_core::{Context, Error, ErrorKind, Result};
use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute};
use rtnetlink::{
    Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth,
    RouteMessageBuilder,
};

use crate::ipam::Cidr;
use crate::kernel::{BridgeSpec, Dataplane, EndpointSpec};

/// rtnetlink on the host and inside namespaces.
#[derive(Debug, Default, Clone)]
pub struct Netlink;

fn nl_err(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let what = what.into();
    move |e| {
        let kind = match errno(&e) {
            Some(libc::EEXIST) => ErrorKind::AlreadyExists,
            Some(libc::ENODEV) | Some(libc::ENOENT) => ErrorKind::NotFound,
            Some(libc::EPERM) | Some(libc::EACCES) => ErrorKind::PermissionDenied,
            _ => ErrorKind::Internal,
        };
        Error::new(kind, format!("netlink: {what}")).with_source(e)
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// Runs `f` with a netlink handle, in the namespace at `netns` when given, on a thread of its
/// own with a single-threaded runtime.
fn with_netlink<T, F, Fut>(netns: Option<PathBuf>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let thread = std::thread::Builder::new()
        .name("berth-netlink".into())
        .spawn(move || {
            if let Some(path) = &netns {
                let file = File::open(path).context(
                    ErrorKind::FailedPrecondition,
                    format!("open network namespace {}", path.display()),
                )?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context(
                    ErrorKind::FailedPrecondition,
                    format!("enter network namespace {}", path.display()),
                )?;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .internal(|| "netlink runtime".into())?;
            rt.block_on(async move {
                let (conn, handle, _) =
                    rtnetlink::new_connection().internal(|| "open netlink socket".into())?;
                tokio::spawn(conn);
                f(handle).await
            })
        });
    thread
        .internal(|| "spawn netlink thread".into())?
        .join()
        .map_err(|_| Error::internal("netlink thread panicked"))?
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(msg.header.index)),
        Ok(None) => Ok(None),
        Err(e) if matches!(errno(&e), Some(libc::ENODEV)) => Ok(None),
        Err(e) => Err(nl_err(format!("look up link {name}"))(e)),
    }
}

async fn addresses(handle: &Handle, index: Option<u32>) -> Result<Vec<(u32, IpAddr, u8)>> {
    let mut req = handle.address().get();
    if let Some(i) = index {
        req = req.set_link_index_filter(i);
    }
    let mut stream = req.execute();
    let mut out = Vec::new();
    while let Some(msg) = stream.try_next().await.map_err(nl_err("list addresses"))? {
        let ip = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let ip = ip.or_else(|| {
            msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        if let Some(ip) = ip {
            out.push((msg.header.index, ip, msg.header.prefix_len));
        }
    }
    Ok(out)
}

async fn add_address(handle: &Handle, index: u32, ip: IpAddr, prefix: u8) -> Result<()> {
    let mut req = handle.address().add(index, ip, prefix);
    if ip.is_ipv6() {
        // Duplicate address detection would leave the address tentative for a second or two;
        // the allocator already guarantees uniqueness on the bridge.
        req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
    }
    match req.execute().await {
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
        r => r.map_err(nl_err(format!("add address {ip}/{prefix}"))),
    }
}

fn write_sysctl(path: &str, value: &str) -> Result<()> {
    if std::fs::read_to_string(path)
        .map(|v| v.trim() == value)
        .unwrap_or(false)
    {
        return Ok(());
    }
    std::fs::write(path, value).context(ErrorKind::Internal, format!("write {path}"))
}

async fn replace_default_route(
    handle: &Handle,
    index: u32,
    gateway_v4: Option<Ipv4Addr>,
    gateway_v6: Option<Ipv6Addr>,
) -> Result<()> {
    match gateway_v4 {
        Some(gw) => {
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gw)
                .output_interface(index)
                .build();
            handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(nl_err(format!("add default route via {gw}")))?;
        }
        None => {
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .output_interface(index)
                .build();
            match handle.route().del(route).execute().await {
                Err(e) if matches!(errno(&e), Some(libc::ESRCH) | Some(libc::ENOENT)) => {}
                r => r.map_err(nl_err("delete default route"))?,
            }
        }
    }
    if let Some(gw) = gateway_v6 {
        let route = RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(gw)
            .output_interface(index)
            .build();
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(nl_err(format!("add default route via {gw}")))?;
    }
    Ok(())
}

impl Dataplane for Netlink {
    fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<()> {
        let spec = spec.clone();
        let name = spec.name.clone();
        with_netlink(None, move |handle| async move {
            let index = match link_index(&handle, &spec.name).await? {
                Some(i) => i,
                None => {
                    let msg = LinkBridge::new(&spec.name).mtu(spec.mtu).build();
                    match handle.link().add(msg).execute().await {
                        Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                        r => r.map_err(nl_err(format!("create bridge {}", spec.name)))?,
                    }
                    link_index(&handle, &spec.name)
                        .await?
                        .ok_or_else(|| Error::internal(format!("bridge {} vanished", spec.name)))?
                }
            };
            let up = LinkUnspec::new_with_index(index).mtu(spec.mtu).up().build();
            handle
                .link()
                .change(up)
                .execute()
                .await
                .map_err(nl_err(format!("bring up {}", spec.name)))?;
            let have = addresses(&handle, Some(index)).await?;
            for (ip, prefix) in &spec.addresses {
                if !have.iter().any(|(_, a, p)| a == ip && p == prefix) {
                    add_address(&handle, index, *ip, *prefix).await?;
                }
            }
            Ok(())
        })?;
        write_sysctl(
            &format!("/proc/sys/net/ipv4/conf/{name}/route_localnet"),
            "1",
        )
    }

    fn delete_bridge(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        with_netlink(None, move |handle| async move {
            let Some(index) = link_index(&handle, &name).await? else {
                return Ok(());
            };
            match handle.link().del(index).execute().await {
                Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
                r => r.map_err(nl_err(format!("delete bridge {name}"))),
            }
        })
    }

    fn host_networks(&self) -> Result<Vec<Cidr>> {
        let addrs = with_netlink(None, |handle| async move { addresses(&handle, None).await })?;
        Ok(addrs
            .into_iter()
            .filter(|(_, ip, _)| {
                !ip.is_loopback()
                    && !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
            })
            .filter_map(|(_, ip, prefix)| Cidr::new(ip, prefix).ok())
            .collect())
    }

    fn enable_forwarding(&self) -> Result<()> {
        write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
    }

    fn create_endpoint(&self, spec: &EndpointSpec) -> Result<()> {
        let host_spec = spec.clone();
        let created = with_netlink(None, move |handle| async move {
            let spec = host_spec;
            if link_index(&handle, &spec.host_ifname).await?.is_some() {
                return Ok(false);
            }
            let bridge = link_index(&handle, &spec.bridge).await?.ok_or_else(|| {
                Error::not_found(format!("bridge {} does not exist", spec.bridge))
            })?;
            let netns = File::open(&spec.netns_path).context(
                ErrorKind::FailedPrecondition,
                format!("open network namespace {}", spec.netns_path.display()),
            )?;
            // The peer is created directly inside the namespace under its final name, so it
            // never clashes with host interface names and needs no rename.
            let peer = LinkMessageBuilder::<LinkUnspec>::new()
                .name(spec.ifname.clone())
                .address(spec.mac.to_vec())
                .mtu(spec.mtu)
                .setns_by_fd(netns.as_raw_fd())
                .build();
            let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
                .name(spec.host_ifname.clone())
                .mtu(spec.mtu)
                .controller(bridge)
                .up()
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .build();
            handle
                .link()
                .add(veth)
                .execute()
                .await
                .map_err(nl_err(format!(
                    "create veth {} with {} in {}",
                    spec.host_ifname,
                    spec.ifname,
                    spec.netns_path.display()
                )))?;
            drop(netns);
            let index = link_index(&handle, &spec.host_ifname)
                .await?
                .ok_or_else(|| Error::internal(format!("veth {} vanished", spec.host_ifname)))?;
            // Hairpin lets a container reach its own published port through a host address.
            let port = LinkBridgePort::new(index).hairpin(true).build();
            handle
                .link()
                .set_port(port)
                .execute()
                .await
                .map_err(nl_err("set hairpin mode"))?;
            Ok(true)
        })?;
        if !created {
            return Ok(());
        }
        let ns_spec = spec.clone();
        let inside = with_netlink(Some(spec.netns_path.clone()), move |handle| async move {
            let spec = ns_spec;
            let index = link_index(&handle, &spec.ifname).await?.ok_or_else(|| {
                Error::internal(format!("{} did not arrive in the namespace", spec.ifname))
            })?;
            for (ip, prefix) in &spec.addresses {
                add_address(&handle, index, *ip, *prefix).await?;
            }
            let up = LinkUnspec::new_with_index(index).up().build();
            handle
                .link()
                .change(up)
                .execute()
                .await
                .map_err(nl_err(format!("bring up {}", spec.ifname)))?;
            if let Some(lo) = link_index(&handle, "lo").await? {
                let up = LinkUnspec::new_with_index(lo).up().build();
                handle
                    .link()
                    .change(up)
                    .execute()
                    .await
                    .map_err(nl_err("bring up lo"))?;
            }
            if spec.gateway_v4.is_some() || spec.gateway_v6.is_some() {
                replace_default_route(&handle, index, spec.gateway_v4, spec.gateway_v6).await?;
            }
            Ok(())
        });
        if let Err(e) = inside {
            let _ = self.delete_endpoint(&spec.host_ifname);
            return Err(e);
        }
        Ok(())
    }

    fn delete_endpoint(&self, host_ifname: &str) -> Result<()> {
        let name = host_ifname.to_string();
        with_netlink(None, move |handle| async move {
            let Some(index) = link_index(&handle, &name).await? else {
                return Ok(());
            };
            match handle.link().del(index).execute().await {
                Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
                r => r.map_err(nl_err(format!("delete veth {name}"))),
            }
        })
    }

    fn link_exists(&self, name: &str) -> Result<bool> {
        let name = name.to_string();
        with_netlink(None, move |handle| async move {
            Ok(link_index(&handle, &name).await?.is_some())
        })
    }

    fn link_names(&self) -> Result<BTreeSet<String>> {
        with_netlink(None, |handle| async move {
            let mut links = handle.link().get().execute();
            let mut out = BTreeSet::new();
            while let Some(msg) = links.try_next().await.map_err(nl_err("list links"))? {
                out.extend(msg.attributes.iter().find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                }));
            }
            Ok(out)
        })
    }

    fn set_default_route(
        &self,
        netns_path: &Path,
        ifname: &str,
        gateway_v4: Option<Ipv4Addr>,
        gateway_v6: Option<Ipv6Addr>,
    ) -> Result<()> {
        let ifname = ifname.to_string();
        with_netlink(Some(netns_path.to_path_buf()), move |handle| async move {
            let index = link_index(&handle, &ifname).await?.ok_or_else(|| {
                Error::not_found(format!("no interface {ifname} in the namespace"))
            })?;
            replace_default_route(&handle, index, gateway_v4, gateway_v6).await
        })
    }

    fn netns_alive(&self, path: &Path) -> bool {
        nix::sys::statfs::statfs(path)
            .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_not_a_namespace() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(!Netlink.netns_alive(f.path()));
        assert!(!Netlink.netns_alive(Path::new("/nonexistent/netns")));
        assert!(Netlink.netns_alive(Path::new("/proc/self/ns/net")));
    }

    #[test]
    fn link_names_include_loopback() {
        let names = Netlink.link_names().unwrap();
        assert!(names.contains("lo"), "{names:?}");
    }
}
