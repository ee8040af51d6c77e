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
    let (tx, rx) = mpsc::channel::<(SocketAddr, Proto, mpsc::Sender<io::Result<OwnedFd>>)>();
    std::thread::Builder::new()
        .name("host-net".into())
        .spawn(move || {
            for (addr, proto, reply) in rx {
                let _ = reply.send(host_socket(addr, proto));
            }
        })
        .map_err(|e| Error::internal("start the host network thread").with_source(e))?;
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
    Ok(HostNet { tx })
}

impl HostNet {
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
