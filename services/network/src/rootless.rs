//! Rootless mode: this process works in the stack's own network namespace (bridges, netfilter
//! and DNS live there, as rootful), and serves published ports on the host itself.
//!
//! No netfilter rule of ours can see the host's traffic, and a process in the stack's user
//! namespace cannot enter the host's network namespace. So [`enter`] starts one thread *before*
//! the process moves into the stack's namespace; sockets that thread makes belong to the host's
//! namespace for their whole life. It only binds listening sockets; [`HostProxy`] serves them
//! on the runtime, connecting to the container from the stack's namespace, byte for byte (TCP)
//! or datagram for datagram (UDP, one upstream socket per client address). Clients' source
//! addresses are not kept: the container sees the connection coming from its bridge's gateway.
//!
//! A published port lives in this process, so while berth-network restarts it does not answer;
//! at start the records are replayed ([`crate::service`]) and the listeners come back.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use berth_core::{Error, Result};
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::host::RealHost;
use crate::kernel::{Host, PortProxy};
use crate::model::AttachmentRecord;
use crate::ports::{PortProbe, Proto};

/// A UDP client with no traffic for this long loses its upstream socket.
const UDP_IDLE: Duration = Duration::from_secs(120);

/// Makes sockets in the host's network namespace.
#[derive(Debug, Clone)]
pub struct HostNet {
    tx: mpsc::Sender<(SocketAddr, Proto, mpsc::Sender<io::Result<OwnedFd>>)>,
}

/// Starts the host-namespace thread, then moves the calling thread (and every thread it starts
/// later, the runtime's among them) into the network namespace at `netns`.
pub fn enter(netns: &Path) -> Result<HostNet> {
    let host = HostNet::start()?;
    let file = std::fs::File::open(netns).map_err(|e| {
        Error::unavailable(format!(
            "open the stack's network namespace {}",
            netns.display()
        ))
        .with_source(e)
    })?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| {
        Error::unavailable(format!("enter the network namespace {}", netns.display()))
            .with_source(io::Error::from(e))
    })?;
    Ok(host)
}

impl HostNet {
    /// Starts the thread, in the calling thread's network namespace.
    fn start() -> Result<Self> {
        let (tx, rx) = mpsc::channel::<(SocketAddr, Proto, mpsc::Sender<io::Result<OwnedFd>>)>();
        std::thread::Builder::new()
            .name("host-net".into())
            .spawn(move || {
                for (addr, proto, reply) in rx {
                    let _ = reply.send(host_socket(addr, proto));
                }
            })
            .map_err(|e| Error::internal("start the host network thread").with_source(e))?;
        Ok(Self { tx })
    }

    /// A bound socket on the host (listening, for TCP).
    fn bind(&self, addr: SocketAddr, proto: Proto) -> io::Result<OwnedFd> {
        let (reply, rx) = mpsc::channel();
        self.tx
            .send((addr, proto, reply))
            .map_err(|_| io::Error::other("the host network thread is gone"))?;
        rx.recv()
            .map_err(|_| io::Error::other("the host network thread is gone"))?
    }
}

fn host_socket(addr: SocketAddr, proto: Proto) -> io::Result<OwnedFd> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let ty = match proto {
        Proto::Tcp => SockType::Stream,
        Proto::Udp => SockType::Datagram,
        Proto::Sctp => return Err(io::Error::from(io::ErrorKind::Unsupported)),
    };
    let fd = socket(
        family,
        ty,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    if proto == Proto::Tcp {
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    }
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    if proto == Proto::Tcp {
        listen(&fd, Backlog::new(1024).unwrap_or(Backlog::MAXCONN))?;
    }
    Ok(fd)
}

/// The host as rootless mode sees it: ports are probed in the host's network namespace (where
/// they will be bound), everything else read as [`RealHost`] does.
#[derive(Debug)]
pub struct RootlessHost {
    /// Reads resolvers and the port range.
    pub inner: RealHost,
    /// Probes ports.
    pub net: HostNet,
}

impl PortProbe for RootlessHost {
    /// Free when the host lets us bind it right now (the socket is closed again at once).
    fn is_free(&self, ip: Option<IpAddr>, port: u16, proto: Proto) -> bool {
        let ip = ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        self.net.bind(SocketAddr::new(ip, port), proto).is_ok()
    }

    fn ephemeral_range(&self) -> (u16, u16) {
        self.inner.ephemeral_range()
    }
}

impl Host for RootlessHost {
    fn resolv_conf(&self) -> String {
        self.inner.resolv_conf()
    }
}

/// Serves published ports on the host (rootless mode).
#[derive(Debug)]
pub struct HostProxy {
    host: HostNet,
    runtime: tokio::runtime::Handle,
    /// Per endpoint, the token that stops its listeners.
    active: Mutex<HashMap<String, CancellationToken>>,
}

impl HostProxy {
    /// A proxy whose listeners run on `runtime`.
    pub fn new(host: HostNet, runtime: tokio::runtime::Handle) -> Self {
        Self {
            host,
            runtime,
            active: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PortProxy for HostProxy {
    fn publish(&self, att: &AttachmentRecord) -> Result<()> {
        self.unpublish(&att.endpoint_id);
        let Some(target) = att.ipv4 else {
            return Ok(());
        };
        let mut sockets = Vec::new();
        for p in &att.ports {
            if p.proto == Proto::Sctp {
                return Err(Error::invalid_argument(format!(
                    "{p}: SCTP ports cannot be published in rootless mode"
                )));
            }
            let ip = p.host_ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            let addr = SocketAddr::new(ip, p.host_port);
            let fd = self.host.bind(addr, p.proto).map_err(|e| {
                let hint = if e.kind() == io::ErrorKind::PermissionDenied {
                    " (ports below net.ipv4.ip_unprivileged_port_start need that sysctl lowered \
                     for rootless mode)"
                } else {
                    ""
                };
                Error::from(e)
                    .with_source(io::Error::other(format!("publish {p} on the host{hint}")))
            })?;
            sockets.push((fd, p.proto, SocketAddr::new(target, p.container_port)));
        }
        let stop = CancellationToken::new();
        for (fd, proto, upstream) in sockets {
            let stop = stop.clone();
            let _guard = self.runtime.enter();
            match proto {
                Proto::Tcp => {
                    let listener = TcpListener::from_std(std::net::TcpListener::from(fd))?;
                    self.runtime.spawn(serve_tcp(listener, upstream, stop));
                }
                _ => {
                    let socket = UdpSocket::from_std(std::net::UdpSocket::from(fd))?;
                    self.runtime
                        .spawn(serve_udp(Arc::new(socket), upstream, stop));
                }
            }
        }
        self.lock().insert(att.endpoint_id.clone(), stop);
        Ok(())
    }

    fn unpublish(&self, endpoint_id: &str) {
        if let Some(stop) = self.lock().remove(endpoint_id) {
            stop.cancel();
        }
    }
}

async fn serve_tcp(listener: TcpListener, upstream: SocketAddr, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return,
        };
        let Ok((mut client, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(upstream).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

async fn serve_udp(socket: Arc<UdpSocket>, upstream: SocketAddr, stop: CancellationToken) {
    let clients: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    let mut buf = vec![0u8; 65536];
    loop {
        let received = tokio::select! {
            r = socket.recv_from(&mut buf) => r,
            _ = stop.cancelled() => return,
        };
        let Ok((n, client)) = received else { continue };
        let existing = clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&client)
            .cloned();
        let up = match existing {
            Some(up) => up,
            None => {
                let Ok(up) =
                    UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)).await
                else {
                    continue;
                };
                if up.connect(upstream).await.is_err() {
                    continue;
                }
                let up = Arc::new(up);
                clients
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(client, up.clone());
                tokio::spawn(udp_replies(
                    socket.clone(),
                    up.clone(),
                    client,
                    clients.clone(),
                    stop.clone(),
                ));
                up
            }
        };
        let _ = up.send(&buf[..n]).await;
    }
}

/// Carries the container's replies to one UDP client until it goes quiet.
async fn udp_replies(
    host: Arc<UdpSocket>,
    up: Arc<UdpSocket>,
    client: SocketAddr,
    clients: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        let got = tokio::select! {
            r = tokio::time::timeout(UDP_IDLE, up.recv(&mut buf)) => r,
            _ = stop.cancelled() => break,
        };
        match got {
            Ok(Ok(n)) => {
                let _ = host.send_to(&buf[..n], client).await;
            }
            _ => break,
        }
    }
    clients
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&client);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::PortBinding;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn record(container_ip: &str, ports: Vec<PortBinding>) -> AttachmentRecord {
        AttachmentRecord {
            container_id: "c".repeat(64),
            container_name: "web".into(),
            hostname: String::new(),
            network_id: "n".repeat(64),
            endpoint_id: "e".repeat(64),
            netns_path: String::new(),
            ifname: "eth0".into(),
            host_ifname: String::new(),
            mac: String::new(),
            ipv4: Some(container_ip.parse().unwrap()),
            ipv4_prefix: 8,
            ipv4_gateway: None,
            ipv6: None,
            ipv6_prefix: 0,
            ipv6_gateway: None,
            ports,
            aliases: vec![],
            dns_names: vec![],
            dns_servers: vec![],
            dns_search: vec![],
            dns_options: vec![],
            links: vec![],
            gw_priority: 0,
            default_route: false,
            created_ns: 0,
        }
    }

    fn free(proto: Proto) -> u16 {
        match proto {
            Proto::Udp => std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
            _ => std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
        }
    }

    // The "container" is a server on 127.0.0.2 (same namespace here: the seam under test is
    // the proxying, not the namespaces).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_and_udp_ports_are_served_until_unpublished() {
        let upstream = TcpListener::bind("127.0.0.2:0").await.unwrap();
        let tcp_port = upstream.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = upstream.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let _ = s.write_all(&[b"tcp:", &buf[..n]].concat()).await;
                });
            }
        });
        let udp_up = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        let udp_port = udp_up.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = udp_up.recv_from(&mut buf).await {
                let _ = udp_up.send_to(&[b"udp:", &buf[..n]].concat(), from).await;
            }
        });
        let (host_tcp, host_udp) = (free(Proto::Tcp), free(Proto::Udp));
        let att = record(
            "127.0.0.2",
            vec![
                PortBinding {
                    host_ip: Some("127.0.0.1".parse().unwrap()),
                    host_port: host_tcp,
                    container_port: tcp_port,
                    proto: Proto::Tcp,
                },
                PortBinding {
                    host_ip: Some("127.0.0.1".parse().unwrap()),
                    host_port: host_udp,
                    container_port: udp_port,
                    proto: Proto::Udp,
                },
            ],
        );
        let proxy = HostProxy::new(HostNet::start().unwrap(), tokio::runtime::Handle::current());
        tokio::task::block_in_place(|| proxy.publish(&att)).unwrap();

        let mut c = TcpStream::connect(("127.0.0.1", host_tcp)).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"tcp:hello");

        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client
            .send_to(b"ping", ("127.0.0.1", host_udp))
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"udp:ping");

        // A port taken on the host is refused with the binding named.
        let mut clash = att.clone();
        clash.endpoint_id = "f".repeat(64);
        let err = tokio::task::block_in_place(|| proxy.publish(&clash)).unwrap_err();
        assert!(err.chain().contains("on the host"), "{}", err.chain());

        proxy.unpublish(&att.endpoint_id);
        let refused = wait_refused(host_tcp).await;
        assert!(refused, "the listener outlived unpublish");
        // Unpublishing again (or an unknown endpoint) is a no-op.
        proxy.unpublish(&att.endpoint_id);
    }

    async fn wait_refused(port: u16) -> bool {
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[test]
    fn sctp_is_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let proxy = HostProxy::new(HostNet::start().unwrap(), rt.handle().clone());
        let att = record(
            "127.0.0.2",
            vec![PortBinding {
                host_ip: None,
                host_port: free(Proto::Tcp),
                container_port: 80,
                proto: Proto::Sctp,
            }],
        );
        let err = proxy.publish(&att).unwrap_err();
        assert!(err.chain().contains("SCTP"), "{}", err.chain());
    }
}
