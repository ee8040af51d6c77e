//! The guest's network, the way Kata's "tc mirror" does it.
//!
//! berth's network service gives every container a network namespace with a veth `eth0`
//! carrying its IP, MAC and routes. For a `berth-vm` container that namespace stays as it is:
//! a tap device `tap0` is created next to `eth0`, and two tc ingress filters
//! (`u32 match all → mirred egress redirect`) move every frame that arrives on `eth0` out of
//! `tap0` and the other way round. QEMU opens `tap0` (`script=no`), the guest NIC gets `eth0`'s
//! MAC and is configured with `eth0`'s addresses and routes ([`GuestNetwork::request`]), so
//! the guest *is* the container on the wire: published ports, DNAT and the bridge keep working
//! because the host still routes to `eth0`'s IP.
//!
//! Everything goes through rtnetlink (links, addresses, routes, qdiscs, filters) and the tun
//! driver's ioctls, from a short-lived thread that `setns`es into the container's namespace
//! (a netlink socket talks to the namespace it was created in), as `services/network` does.

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use berth_core::{Context, Error, ErrorKind, Result};
use berth_proto::berth::agent::v1::{Interface, Route, SetupNetworkRequest};
use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol};
use netlink_packet_route::tc::TcHandle;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// The container's interface the network service made.
pub const CONTAINER_IFNAME: &str = "eth0";
/// The tap QEMU opens.
pub const TAP_IFNAME: &str = berth_core::vm::VM_TAP_IFNAME;

/// The mirror set up in one container namespace.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestNetwork {
    /// The container's network namespace.
    pub netns: PathBuf,
    /// The tap QEMU opens inside `netns`.
    pub tap: String,
    /// The guest NIC's MAC: `eth0`'s, "aa:bb:cc:dd:ee:ff".
    pub mac: String,
    /// What the agent is asked to configure (hostname left empty).
    pub request: SetupNetworkRequest,
}

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

/// Runs `f` on a thread of its own inside the namespace at `netns`, with a netlink handle
/// opened there. The thread ends with the call: no thread is left in a foreign namespace.
fn in_netns<T, F, Fut>(netns: &Path, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let path = netns.to_path_buf();
    std::thread::Builder::new()
        .name("berth-vm-net".into())
        .spawn(move || {
            let file = File::open(&path).context(
                ErrorKind::FailedPrecondition,
                format!("open network namespace {}", path.display()),
            )?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context(
                ErrorKind::FailedPrecondition,
                format!("enter network namespace {}", path.display()),
            )?;
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
        })
        .internal(|| "spawn netlink thread".into())?
        .join()
        .map_err(|_| Error::internal("netlink thread panicked"))?
}

struct Link {
    index: u32,
    mac: Vec<u8>,
    mtu: u32,
}

async fn link(handle: &Handle, name: &str) -> Result<Option<Link>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    let msg = match links.try_next().await {
        Ok(Some(msg)) => msg,
        Ok(None) => return Ok(None),
        Err(e) if matches!(errno(&e), Some(libc::ENODEV)) => return Ok(None),
        Err(e) => return Err(nl_err(format!("look up link {name}"))(e)),
    };
    let mut link = Link {
        index: msg.header.index,
        mac: Vec::new(),
        mtu: 1500,
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::Address(mac) => link.mac = mac,
            LinkAttribute::Mtu(mtu) => link.mtu = mtu,
            _ => {}
        }
    }
    Ok(Some(link))
}

fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Addresses the guest should carry: all of `eth0`'s except IPv6 link-local ones (the guest
/// kernel makes its own from the same MAC).
async fn addresses(handle: &Handle, index: u32) -> Result<Vec<String>> {
    let mut stream = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let mut out = Vec::new();
    while let Some(msg) = stream.try_next().await.map_err(nl_err("list addresses"))? {
        let local = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let ip = local.or_else(|| {
            msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        match ip {
            Some(IpAddr::V6(v6)) if (v6.segments()[0] & 0xffc0) == 0xfe80 => {}
            Some(ip) => out.push(format!("{ip}/{}", msg.header.prefix_len)),
            None => {}
        }
    }
    Ok(out)
}

/// Routes through `eth0` in the main table, except the ones the kernel derives from addresses
/// (the guest's kernel derives the same) and IPv6 link-local and multicast ones.
async fn routes(handle: &Handle, index: u32, device: &str) -> Result<Vec<Route>> {
    let mut out = Vec::new();
    let requests = [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ];
    for req in requests {
        let mut stream = handle.route().get(req).execute();
        while let Some(msg) = stream.try_next().await.map_err(nl_err("list routes"))? {
            if msg.header.protocol == RouteProtocol::Kernel {
                continue;
            }
            let mut oif = None;
            let mut table = u32::from(msg.header.table);
            let mut dst = None;
            let mut gateway = None;
            for attr in &msg.attributes {
                match attr {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                        dst = Some(IpAddr::V4(*ip))
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
                        dst = Some(IpAddr::V6(*ip))
                    }
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => {
                        gateway = Some(IpAddr::V4(*ip))
                    }
                    RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => {
                        gateway = Some(IpAddr::V6(*ip))
                    }
                    _ => {}
                }
            }
            if oif != Some(index) || table != u32::from(libc::RT_TABLE_MAIN) {
                continue;
            }
            let prefix = msg.header.destination_prefix_length;
            let destination = match dst {
                Some(IpAddr::V6(v6))
                    if (v6.segments()[0] & 0xffc0) == 0xfe80 || v6.segments()[0] >> 8 == 0xff =>
                {
                    continue;
                }
                Some(ip) => format!("{ip}/{prefix}"),
                None if prefix == 0 => String::new(),
                None => continue,
            };
            out.push(Route {
                destination,
                gateway: gateway.map(|g| g.to_string()).unwrap_or_default(),
                device: device.to_string(),
            });
        }
    }
    Ok(out)
}

// The tun driver's ioctls (linux/if_tun.h).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` as TUNSETIFF reads it: a name and flags, padded to the union's size.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens `/dev/net/tun` attached to the tap `name` (creating it when missing) in the calling
/// thread's network namespace.
pub fn open_tap(name: &str, flags: libc::c_short) -> Result<File> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(Error::invalid_argument(format!(
            "interface name {name:?} is too long"
        )));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context(ErrorKind::FailedPrecondition, "open /dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads (and writes back) one ifreq through the pointer, which points to
    // a live, correctly sized struct for the duration of the call.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) };
    if rc != 0 {
        return Err(Error::internal(format!("attach tap {name}"))
            .with_source(std::io::Error::last_os_error()));
    }
    Ok(tun)
}

/// Creates a persistent tap `name` owned by root (multi-queue off): QEMU attaches to it later.
fn create_tap(name: &str) -> Result<()> {
    let tun = open_tap(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)?;
    for (op, arg, what) in [(TUNSETOWNER, 0, "owner"), (TUNSETPERSIST, 1, "persist")] {
        // SAFETY: both ioctls take an integer argument by value.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), op, arg as libc::c_ulong) };
        if rc != 0 {
            return Err(Error::internal(format!("set tap {name} {what}"))
                .with_source(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Adds an ingress qdisc on `from` and a filter redirecting every frame to `to`'s egress.
async fn redirect(handle: &Handle, from: u32, to: u32) -> Result<()> {
    match handle.qdisc().add(from as i32).ingress().execute().await {
        Err(e) if errno(&e) == Some(libc::EEXIST) => {}
        r => r.map_err(nl_err(format!("add ingress qdisc on link {from}")))?,
    }
    handle
        .traffic_filter(from as i32)
        .add()
        .parent(u32::from(TcHandle::INGRESS) & 0xffff_0000)
        // ETH_P_ALL, in network byte order as tc wants it.
        .protocol((libc::ETH_P_ALL as u16).to_be())
        .redirect(to)
        .map_err(nl_err("build the redirect filter"))?
        .execute()
        .await
        .map_err(nl_err(format!("redirect link {from} to link {to}")))
}

/// Reads `eth0` in the namespace at `netns`, creates `tap0` beside it and mirrors the two with
/// tc. `None` when the namespace has no `eth0` (`--network none`): the guest gets no NIC.
/// Undone by [`teardown`] (also when this fails half-way).
pub fn setup(netns: &Path) -> Result<Option<GuestNetwork>> {
    let result = in_netns(netns, |handle| async move {
        let Some(eth) = link(&handle, CONTAINER_IFNAME).await? else {
            return Ok(None);
        };
        let request = SetupNetworkRequest {
            interfaces: vec![Interface {
                mac: format_mac(&eth.mac),
                name: CONTAINER_IFNAME.into(),
                addresses: addresses(&handle, eth.index).await?,
                mtu: eth.mtu,
            }],
            routes: routes(&handle, eth.index, CONTAINER_IFNAME).await?,
            hostname: String::new(),
        };
        if link(&handle, TAP_IFNAME).await?.is_none() {
            create_tap(TAP_IFNAME)?;
        }
        let tap = link(&handle, TAP_IFNAME)
            .await?
            .ok_or_else(|| Error::internal("the tap vanished"))?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(tap.index)
                    .mtu(eth.mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl_err(format!("bring {TAP_IFNAME} up")))?;
        redirect(&handle, eth.index, tap.index).await?;
        redirect(&handle, tap.index, eth.index).await?;
        Ok(Some(GuestNetwork {
            netns: PathBuf::new(),
            tap: TAP_IFNAME.into(),
            mac: format_mac(&eth.mac),
            request,
        }))
    });
    match result {
        Ok(Some(mut net)) => {
            net.netns = netns.to_path_buf();
            tracing::info!(netns = %netns.display(), mac = %net.mac, "guest network mirrored");
            Ok(Some(net))
        }
        Ok(None) => Ok(None),
        Err(err) => {
            let _ = teardown(netns);
            Err(err)
        }
    }
}

/// Removes the tap (its qdisc and filter go with it) and `eth0`'s ingress qdisc with its
/// filter. Missing pieces are fine; a namespace that is gone already is fine.
pub fn teardown(netns: &Path) -> Result<()> {
    if !netns.exists() {
        return Ok(());
    }
    in_netns(netns, |handle| async move {
        if let Some(tap) = link(&handle, TAP_IFNAME).await? {
            match handle.link().del(tap.index).execute().await {
                Err(e) if errno(&e) == Some(libc::ENODEV) => {}
                r => r.map_err(nl_err(format!("delete {TAP_IFNAME}")))?,
            }
        }
        if let Some(eth) = link(&handle, CONTAINER_IFNAME).await? {
            let mut del = handle.qdisc().del(eth.index as i32);
            del.message_mut().header.parent = TcHandle::INGRESS;
            del.message_mut().header.handle = TcHandle {
                major: 0xffff,
                minor: 0,
            };
            match del.execute().await {
                Err(e) if matches!(errno(&e), Some(libc::ENOENT) | Some(libc::EINVAL)) => {}
                r => r.map_err(nl_err(format!(
                    "delete the ingress qdisc of {CONTAINER_IFNAME}"
                )))?,
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    use super::*;

    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    }

    /// Named network namespaces, deleted (with their links) when dropped.
    struct Netns(Vec<String>);

    impl Drop for Netns {
        fn drop(&mut self) {
            for name in &self.0 {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }

    fn unique() -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        format!(
            "bvm{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Runs `f` on a thread inside the named namespace (sockets it opens stay bound to it).
    fn within<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            let file = File::open(path).unwrap();
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    fn wait_readable(fd: &impl AsRawFd, until: Instant) -> bool {
        let left = until.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) > 0 }
    }

    /// Reads frames from `read` until one carries `payload`, or the deadline passes.
    fn expect_frame(mut read: impl FnMut(&mut [u8]) -> usize, fd: &impl AsRawFd, payload: &[u8]) {
        let until = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 2048];
        while wait_readable(fd, until) {
            let n = read(&mut buf);
            if buf[..n].windows(payload.len()).any(|w| w == payload) {
                return;
            }
        }
        panic!(
            "no frame carrying {:?} arrived",
            String::from_utf8_lossy(payload)
        );
    }

    fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend(dst);
        f.extend(src);
        f.extend([0x88, 0xb5]); // local experimental ethertype
        f.extend(payload);
        f.resize(f.len().max(60), 0);
        f
    }

    /// An AF_PACKET socket bound to `ifname` in the calling thread's namespace.
    fn packet_socket(ifname: &str) -> OwnedFd {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket/bind calls with a correctly sized sockaddr_ll.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32);
            assert!(fd >= 0);
            let fd = OwnedFd::from_raw_fd(fd);
            let name = std::ffi::CString::new(ifname).unwrap();
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            assert!(sll.sll_ifindex > 0);
            let rc = libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(rc, 0);
            fd
        }
    }

    fn mac_bytes(s: &str) -> [u8; 6] {
        let v: Vec<u8> = s
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect();
        v.try_into().unwrap()
    }

    fn tc_qdiscs(ns: &str, dev: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "tc", "qdisc", "show", "dev", dev])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn frames_cross_the_mirror_both_ways_and_teardown_removes_it() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let (c, h) = (unique(), unique());
        let _guard = Netns(vec![c.clone(), h.clone()]);
        ip(&["netns", "add", &c]);
        ip(&["netns", "add", &h]);
        ip(&[
            "link", "add", "eth0", "netns", &c, "type", "veth", "peer", "name", "peer", "netns", &h,
        ]);
        ip(&["-n", &c, "addr", "add", "10.231.7.2/24", "dev", "eth0"]);
        ip(&["-n", &c, "link", "set", "eth0", "mtu", "1400", "up"]);
        ip(&["-n", &c, "route", "add", "default", "via", "10.231.7.1"]);
        ip(&[
            "-n",
            &c,
            "route",
            "add",
            "10.99.0.0/16",
            "via",
            "10.231.7.254",
        ]);
        ip(&["-n", &h, "addr", "add", "10.231.7.1/24", "dev", "peer"]);
        ip(&["-n", &h, "link", "set", "peer", "up"]);
        let netns = PathBuf::from(format!("/run/netns/{c}"));

        let net = setup(&netns).unwrap().unwrap();
        let iface = &net.request.interfaces[0];
        assert_eq!(iface.name, "eth0");
        assert_eq!(iface.mac, net.mac);
        assert_eq!(iface.mtu, 1400);
        assert_eq!(iface.addresses, vec!["10.231.7.2/24".to_string()]);
        let routes: Vec<_> = net
            .request
            .routes
            .iter()
            .map(|r| {
                (
                    r.destination.as_str(),
                    r.gateway.as_str(),
                    r.device.as_str(),
                )
            })
            .collect();
        assert!(routes.contains(&("", "10.231.7.1", "eth0")), "{routes:?}");
        assert!(
            routes.contains(&("10.99.0.0/16", "10.231.7.254", "eth0")),
            "{routes:?}"
        );
        assert!(!routes.iter().any(|r| r.0 == "10.231.7.0/24"), "{routes:?}");
        // Set up twice (a retried create) is fine.
        setup(&netns).unwrap();

        // The guest: the tap's other end, as QEMU would open it.
        let tap = within(&c, || open_tap(TAP_IFNAME, IFF_TAP | IFF_NO_PI).unwrap());
        let host = within(&h, || packet_socket("peer"));
        let eth_mac = mac_bytes(&net.mac);
        let tag = unique();

        // Host → eth0 → (mirror) → tap0 → guest.
        let to_guest = format!("to-guest-{tag}");
        let f = frame(eth_mac, [0x02, 0, 0, 0, 0, 1], to_guest.as_bytes());
        // SAFETY: sends one buffer on a bound packet socket.
        let sent = unsafe { libc::send(host.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        assert_eq!(sent, f.len() as isize);
        let mut tap_r = tap.try_clone().unwrap();
        expect_frame(|b| tap_r.read(b).unwrap(), &tap, to_guest.as_bytes());

        // Guest → tap0 → (mirror) → eth0 → host.
        let from_guest = format!("from-guest-{tag}");
        let f = frame([0xff; 6], eth_mac, from_guest.as_bytes());
        (&tap).write_all(&f).unwrap();
        expect_frame(
            |b| {
                // SAFETY: receives into a buffer valid for its length.
                unsafe { libc::recv(host.as_raw_fd(), b.as_mut_ptr().cast(), b.len(), 0) }.max(0)
                    as usize
            },
            &host,
            from_guest.as_bytes(),
        );
        drop(tap);

        teardown(&netns).unwrap();
        let out = Command::new("ip")
            .args(["-n", &c, "link", "show", TAP_IFNAME])
            .output()
            .unwrap();
        assert!(!out.status.success(), "the tap is still there");
        assert!(!tc_qdiscs(&c, "eth0").contains("ingress"));
        // Twice is fine.
        teardown(&netns).unwrap();
    }

    #[test]
    fn a_namespace_without_eth0_gets_no_mirror() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let c = unique();
        let _guard = Netns(vec![c.clone()]);
        ip(&["netns", "add", &c]);
        let netns = PathBuf::from(format!("/run/netns/{c}"));
        assert_eq!(setup(&netns).unwrap(), None);
        let out = Command::new("ip")
            .args(["-n", &c, "link", "show", TAP_IFNAME])
            .output()
            .unwrap();
        assert!(!out.status.success());
    }
}
