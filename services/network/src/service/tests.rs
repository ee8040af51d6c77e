//! Record logic against recording fakes of the kernel, the firewall and the host.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use berth_core::{ErrorKind, Result};

use super::*;
use crate::cni::PluginExec;
use crate::events::EventSink;
use crate::kernel::{BridgeSpec, Dataplane, EndpointSpec, Firewall, Host, Rule};
use crate::ports::{PortProbe, Proto};

#[derive(Default)]
struct FakeKernel {
    bridges: Mutex<BTreeMap<String, BridgeSpec>>,
    endpoints: Mutex<BTreeMap<String, EndpointSpec>>,
    netns: Mutex<BTreeSet<PathBuf>>,
    routes: Mutex<Vec<(PathBuf, String, Option<Ipv4Addr>)>>,
    host_nets: Vec<Cidr>,
    fail_endpoint: Mutex<bool>,
    forwarding: Mutex<bool>,
}

impl Dataplane for FakeKernel {
    fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<()> {
        self.bridges
            .lock()
            .unwrap()
            .insert(spec.name.clone(), spec.clone());
        Ok(())
    }
    fn delete_bridge(&self, name: &str) -> Result<()> {
        self.bridges.lock().unwrap().remove(name);
        Ok(())
    }
    fn host_networks(&self) -> Result<Vec<Cidr>> {
        Ok(self.host_nets.clone())
    }
    fn enable_forwarding(&self) -> Result<()> {
        *self.forwarding.lock().unwrap() = true;
        Ok(())
    }
    fn create_endpoint(&self, spec: &EndpointSpec) -> Result<()> {
        if *self.fail_endpoint.lock().unwrap() {
            return Err(Error::internal("netlink: boom"));
        }
        assert!(
            self.bridges.lock().unwrap().contains_key(&spec.bridge),
            "bridge first"
        );
        self.endpoints
            .lock()
            .unwrap()
            .insert(spec.host_ifname.clone(), spec.clone());
        Ok(())
    }
    fn delete_endpoint(&self, host_ifname: &str) -> Result<()> {
        self.endpoints.lock().unwrap().remove(host_ifname);
        Ok(())
    }
    fn link_exists(&self, name: &str) -> Result<bool> {
        Ok(self.endpoints.lock().unwrap().contains_key(name)
            || self.bridges.lock().unwrap().contains_key(name))
    }
    fn link_names(&self) -> Result<BTreeSet<String>> {
        let mut names: BTreeSet<String> = self.endpoints.lock().unwrap().keys().cloned().collect();
        names.extend(self.bridges.lock().unwrap().keys().cloned());
        Ok(names)
    }
    fn set_default_route(
        &self,
        p: &Path,
        ifname: &str,
        gw: Option<Ipv4Addr>,
        _: Option<Ipv6Addr>,
    ) -> Result<()> {
        self.routes
            .lock()
            .unwrap()
            .push((p.to_path_buf(), ifname.to_string(), gw));
        Ok(())
    }
    fn netns_alive(&self, path: &Path) -> bool {
        self.netns.lock().unwrap().contains(path)
    }
}

#[derive(Default)]
struct FakeFirewall {
    rules: Mutex<Vec<Rule>>,
}

impl FakeFirewall {
    fn comments(&self) -> Vec<String> {
        self.rules
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.comment.clone())
            .collect()
    }
    fn with_prefix(&self, p: &str) -> Vec<Rule> {
        self.rules
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.comment.starts_with(p))
            .cloned()
            .collect()
    }
}

impl Firewall for FakeFirewall {
    fn ensure(&self, rules: &[Rule]) -> Result<()> {
        let mut have = self.rules.lock().unwrap();
        for r in rules {
            if !have
                .iter()
                .any(|h| h.chain == r.chain && h.comment == r.comment)
            {
                have.push(r.clone());
            }
        }
        Ok(())
    }
    fn comments(&self, prefix: &str) -> Result<Vec<String>> {
        Ok(self
            .comments()
            .into_iter()
            .filter(|c| c.starts_with(prefix))
            .collect())
    }
    fn remove(&self, prefixes: &[String]) -> Result<()> {
        self.rules
            .lock()
            .unwrap()
            .retain(|r| !prefixes.iter().any(|p| r.comment.starts_with(p.as_str())));
        Ok(())
    }
}

struct FakeHost {
    busy: Mutex<BTreeSet<u16>>,
    resolv: String,
}

impl PortProbe for FakeHost {
    fn is_free(&self, _: Option<IpAddr>, port: u16, _: Proto) -> bool {
        !self.busy.lock().unwrap().contains(&port)
    }
    fn ephemeral_range(&self) -> (u16, u16) {
        (50000, 50099)
    }
}

impl Host for FakeHost {
    fn resolv_conf(&self) -> String {
        self.resolv.clone()
    }
}

#[derive(Default)]
struct FakeCni {
    calls: Mutex<Vec<(String, String)>>,
    /// CNI_NETNS of each call.
    netns: Mutex<Vec<String>>,
    /// When set, the next ADD says it has started and waits for the go-ahead.
    hold_add: Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
}

impl PluginExec for FakeCni {
    fn exec(&self, ty: &str, env: &[(String, String)], _stdin: &[u8]) -> Result<Vec<u8>> {
        let cmd = env
            .iter()
            .find(|(k, _)| k == "CNI_COMMAND")
            .unwrap()
            .1
            .clone();
        self.calls
            .lock()
            .unwrap()
            .push((ty.to_string(), cmd.clone()));
        let netns = env.iter().find(|(k, _)| k == "CNI_NETNS").unwrap();
        self.netns.lock().unwrap().push(netns.1.clone());
        if cmd == "ADD"
            && let Some((started, go)) = self.hold_add.lock().unwrap().take()
        {
            started.send(()).unwrap();
            go.recv().unwrap();
        }
        Ok(br#"{"cniVersion":"1.0.0","ips":[{"address":"10.88.0.5/16","gateway":"10.88.0.1","interface":0}],"interfaces":[{"name":"eth0","sandbox":"/x"}]}"#.to_vec())
    }
}

#[derive(Default)]
struct Events(Mutex<Vec<(String, String)>>);

impl EventSink for Events {
    fn publish(&self, action: &str, network_id: &str, _: BTreeMap<String, String>) {
        self.0
            .lock()
            .unwrap()
            .push((action.to_string(), network_id.to_string()));
    }
}

struct Harness {
    dir: tempfile::TempDir,
    kernel: Arc<FakeKernel>,
    fw: Arc<FakeFirewall>,
    host: Arc<FakeHost>,
    cni: Arc<FakeCni>,
    events: Arc<Events>,
    svc: NetworkService,
}

fn settings(dir: &Path) -> Settings {
    Settings {
        db_path: dir.join("network.redb"),
        default_bridge: "bt0".into(),
        bip_gateway: "10.200.0.1".parse().unwrap(),
        bip_subnet: "10.200.0.0/24".parse().unwrap(),
        pools: vec![DefaultPool::new("10.201.0.0/22", 24).unwrap()],
        mtu: 1500,
        dns: vec![],
        dns_search: vec![],
        dns_options: vec![],
        cni_conf_dir: dir.join("cni"),
        cni_bin_dirs: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
        dns_port: 0,
    }
}

impl Harness {
    fn new() -> Self {
        let kernel = Arc::new(FakeKernel {
            host_nets: vec!["10.201.0.0/24".parse().unwrap()],
            ..Default::default()
        });
        Self::with(
            tempfile::tempdir().unwrap(),
            kernel,
            Arc::new(FakeFirewall::default()),
        )
    }

    fn with(dir: tempfile::TempDir, kernel: Arc<FakeKernel>, fw: Arc<FakeFirewall>) -> Self {
        let host = Arc::new(FakeHost {
            busy: Mutex::new(BTreeSet::new()),
            resolv: "nameserver 127.0.0.53\nnameserver 10.255.255.53\nsearch example.test\n".into(),
        });
        let cni = Arc::new(FakeCni::default());
        let events = Arc::new(Events::default());
        let deps = Deps {
            dataplane: kernel.clone(),
            firewall: fw.clone(),
            host: host.clone(),
            proxy: Arc::new(crate::kernel::NoProxy),
            cni: cni.clone(),
            events: events.clone(),
        };
        let svc = NetworkService::open(settings(dir.path()), deps, None).unwrap();
        Self {
            dir,
            kernel,
            fw,
            host,
            cni,
            events,
            svc,
        }
    }

    /// The same store and kernel, a new service: what a restart after `kill -9` sees.
    fn restart(self) -> Self {
        let Harness {
            dir,
            kernel,
            fw,
            svc,
            ..
        } = self;
        drop(svc);
        Self::with(dir, kernel, fw)
    }

    /// Writes the one CNI config (`cni/10-pods.conflist`) of the harness.
    fn cni_conflist(&self, json: &str) {
        let dir = self.dir.path().join("cni");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("10-pods.conflist"), json).unwrap();
    }

    fn netns(&self, name: &str) -> String {
        let p = PathBuf::from(format!("/run/netns/{name}"));
        self.kernel.netns.lock().unwrap().insert(p.clone());
        p.display().to_string()
    }

    fn create(&self, name: &str) -> NetworkInfo {
        self.svc
            .create_network(CreateNetwork {
                name: name.into(),
                ..Default::default()
            })
            .unwrap()
            .0
    }

    fn attach(&self, cid: &str, name: &str, network: &str, ports: &str) -> Result<AttachmentInfo> {
        let netns = self.netns(name);
        let ports = ports
            .split_whitespace()
            .flat_map(|p| ports::parse(p).unwrap())
            .collect();
        self.svc.attach(AttachRequest {
            container_id: cid.into(),
            container_name: name.into(),
            hostname: name.into(),
            netns_path: netns,
            network: network.into(),
            ports,
            ..Default::default()
        })
    }
}

fn cid(n: u8) -> String {
    format!("{:x}", n % 16).repeat(64)
}

#[test]
fn start_creates_predefined_networks_and_base_rules() {
    let h = Harness::new();
    let nets = h.svc.list_networks(&[]).unwrap();
    let names: Vec<&str> = nets.iter().map(|n| n.record.name.as_str()).collect();
    assert_eq!(names, ["bridge", "host", "none"]);
    let bridge = h.svc.get_network("bridge").unwrap().record;
    assert!(bridge.builtin && !bridge.dns_enabled);
    assert_eq!(bridge.bridge, "bt0");
    let spec = h.kernel.bridges.lock().unwrap()["bt0"].clone();
    assert_eq!(spec.addresses, [("10.200.0.1".parse().unwrap(), 24)]);
    assert!(
        h.fw.comments()
            .contains(&"berth-bt0:base:prerouting".to_string())
    );
    assert!(
        !h.fw
            .with_prefix(&h.svc.chains().network_tag(&bridge.id))
            .is_empty()
    );
    assert!(*h.kernel.forwarding.lock().unwrap());
    // Predefined networks cannot be removed or recreated.
    assert_eq!(
        h.svc.delete_network("bridge").unwrap_err().kind(),
        ErrorKind::FailedPrecondition
    );
    let err = h
        .svc
        .create_network(CreateNetwork {
            name: "x1".into(),
            driver: "host".into(),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
}

#[test]
fn create_allocates_subnets_and_refuses_bad_input() {
    let h = Harness::new();
    let a = h.create("front");
    // 10.201.0.0/24 is on a host interface: the next one is taken.
    let pool = a.record.ipv4.clone().unwrap();
    assert_eq!(pool.subnet.to_string(), "10.201.1.0/24");
    assert_eq!(pool.gateway.to_string(), "10.201.1.1");
    assert_eq!(a.record.bridge, format!("br-{}", &a.record.id[..12]));
    assert!(a.record.dns_enabled);
    assert_eq!(
        h.create("back").record.ipv4.unwrap().subnet.to_string(),
        "10.201.2.0/24"
    );
    assert!(
        h.kernel
            .bridges
            .lock()
            .unwrap()
            .contains_key(&a.record.bridge)
    );
    assert_eq!(
        h.events.0.lock().unwrap()[0],
        ("create".to_string(), a.record.id.clone())
    );

    let err = h
        .svc
        .create_network(CreateNetwork {
            name: "front".into(),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    let overlapping = CreateNetwork {
        name: "ov".into(),
        pools: vec![PoolRequest {
            subnet: "10.201.1.128/25".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = h.svc.create_network(overlapping).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.message().contains("overlaps"), "{}", err.message());
    for bad in [
        CreateNetwork {
            name: "  ".into(),
            ..Default::default()
        },
        CreateNetwork {
            name: "o1".into(),
            driver: "overlay".into(),
            ..Default::default()
        },
        CreateNetwork {
            name: "o2".into(),
            pools: vec![PoolRequest {
                subnet: "10.9.0.0/24".into(),
                gateway: "10.8.0.1".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
        CreateNetwork {
            name: "o3".into(),
            options: BTreeMap::from([(
                OPT_BRIDGE_NAME.to_string(),
                "a-very-long-bridge-name".to_string(),
            )]),
            ..Default::default()
        },
        CreateNetwork {
            name: "o4".into(),
            pools: vec![PoolRequest {
                subnet: "fd00::/64".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
    ] {
        assert_eq!(
            h.svc.create_network(bad).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }
    // Static subnet with ip-range and options.
    let (n, _) = h
        .svc
        .create_network(CreateNetwork {
            name: "static".into(),
            internal: true,
            enable_ipv6: true,
            pools: vec![PoolRequest {
                subnet: "10.210.0.0/16".into(),
                gateway: "10.210.0.254".into(),
                ip_range: "10.210.5.0/24".into(),
                ..Default::default()
            }],
            options: BTreeMap::from([(OPT_BRIDGE_NAME.to_string(), "brstatic".to_string())]),
            labels: BTreeMap::from([("team".to_string(), "a".to_string())]),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(n.record.bridge, "brstatic");
    assert!(
        n.record.ipv6.is_some(),
        "an IPv6 subnet is allocated when IPv6 is on"
    );
    let filtered = h
        .svc
        .list_networks(&[("label".into(), "team=a".into())])
        .unwrap();
    assert_eq!(filtered.len(), 1);
    let custom = h
        .svc
        .list_networks(&[("type".into(), "custom".into())])
        .unwrap();
    assert_eq!(custom.len(), 3);
    assert!(
        h.svc
            .list_networks(&[("bogus".into(), "x".into())])
            .is_err()
    );
    assert_eq!(
        h.svc
            .list_networks(&[("name".into(), "ron".into())])
            .unwrap()[0]
            .record
            .name,
        "front"
    );
}

#[test]
fn attach_allocates_addresses_ports_and_names() {
    let h = Harness::new();
    let net = h.create("app").record;
    let a = h
        .attach(&cid(1), "web", "app", "127.0.0.1:8080:80 80")
        .unwrap();
    let r = &a.record;
    assert_eq!(r.ipv4, Some("10.201.1.2".parse().unwrap()));
    assert_eq!(r.ipv4_prefix, 24);
    assert_eq!(r.mac, "02:42:0a:c9:01:02");
    assert_eq!(r.ifname, "eth0");
    assert!(r.host_ifname.starts_with("veth") && r.host_ifname.len() == 11);
    assert!(r.default_route);
    assert_eq!(r.dns_names, ["web", &cid(1)[..12]]);
    assert_eq!(r.ports.len(), 2);
    assert_eq!(r.ports[0].host_port, 8080);
    assert!(
        (50000..=50099).contains(&r.ports[1].host_port),
        "random port from the ephemeral range"
    );
    // resolv.conf points at the network's resolver; hosts has the container's own name.
    assert_eq!(a.dns_servers, ["10.201.1.1"]);
    assert_eq!(a.dns_search, ["example.test"]);
    assert_eq!(
        a.hosts,
        [("10.201.1.2".parse().unwrap(), vec!["web".to_string()])]
    );
    // Kernel side.
    let ep = h.kernel.endpoints.lock().unwrap()[&r.host_ifname].clone();
    assert_eq!(ep.bridge, net.bridge);
    assert_eq!(ep.gateway_v4, Some("10.201.1.1".parse().unwrap()));
    assert_eq!(ep.addresses, [("10.201.1.2".parse().unwrap(), 24)]);
    let dnat =
        h.fw.with_prefix(&h.svc.chains().endpoint_tag(&r.endpoint_id));
    assert_eq!(dnat.len(), 2);
    assert!(
        dnat[0]
            .args
            .join(" ")
            .contains("--to-destination 10.201.1.2:80")
    );

    // Sequential addresses; idempotent attach.
    let b = h.attach(&cid(2), "db", "app", "").unwrap();
    assert_eq!(b.record.ipv4, Some("10.201.1.3".parse().unwrap()));
    let again = h.attach(&cid(2), "db", "app", "").unwrap();
    assert_eq!(again.record, b.record);

    // A taken host port: a clear conflict, nothing left behind.
    let before = h.fw.comments().len();
    let err = h
        .attach(&cid(3), "other", "app", "127.0.0.1:8080:80")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert!(
        err.message().contains("127.0.0.1:8080"),
        "{}",
        err.message()
    );
    assert_eq!(h.fw.comments().len(), before);
    assert_eq!(h.svc.list_attachments(&cid(3), "").unwrap().len(), 0);
    // A port another process holds.
    h.host.busy.lock().unwrap().insert(9999);
    let err = h.attach(&cid(3), "other", "app", "9999:80").unwrap_err();
    assert!(
        err.message().contains("another process"),
        "{}",
        err.message()
    );

    // Names resolve on the network.
    let found = h.svc.lookup("WEB", "app", "").unwrap();
    assert_eq!(found.ipv4, ["10.201.1.2".parse::<Ipv4Addr>().unwrap()]);
    assert_eq!(h.svc.lookup("db", "", &cid(1)).unwrap().ipv4.len(), 1);
    assert_eq!(
        h.svc.lookup("nope", "app", "").unwrap_err().kind(),
        ErrorKind::NotFound
    );

    // The network cannot go while in use.
    let err = h.svc.delete_network("app").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(
        err.message().contains("active endpoints"),
        "{}",
        err.message()
    );

    // Detach removes the veth, the rules and the record, and frees the address.
    assert_eq!(
        h.svc.detach(&cid(1), "app", false).unwrap(),
        std::slice::from_ref(&net.id)
    );
    assert!(
        !h.kernel
            .endpoints
            .lock()
            .unwrap()
            .contains_key(&r.host_ifname)
    );
    assert!(
        h.fw.with_prefix(&h.svc.chains().endpoint_tag(&r.endpoint_id))
            .is_empty()
    );
    assert_eq!(
        h.svc.detach(&cid(1), "app", false).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert!(
        h.svc.detach(&cid(1), "", false).unwrap().is_empty(),
        "detach from all is idempotent"
    );
    // Port 8080 is free again.
    h.attach(&cid(4), "web2", "app", "127.0.0.1:8080:80")
        .unwrap();
    h.svc.detach(&cid(4), "", false).unwrap();
    h.svc.detach(&cid(2), "", false).unwrap();
    h.svc.delete_network("app").unwrap();
    assert!(!h.kernel.bridges.lock().unwrap().contains_key(&net.bridge));
    assert!(
        h.fw.with_prefix(&h.svc.chains().network_tag(&net.id))
            .is_empty()
    );
    let actions: Vec<String> = h
        .events
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(a, _)| a.clone())
        .collect();
    assert!(actions.contains(&"connect".to_string()) && actions.contains(&"destroy".to_string()));
}

#[test]
fn attach_validates_requests() {
    let h = Harness::new();
    h.create("app");
    let netns = h.netns("x");
    let base = AttachRequest {
        container_id: cid(1),
        netns_path: netns,
        network: "app".into(),
        ..Default::default()
    };
    let cases = [
        (
            AttachRequest {
                container_id: "abc".into(),
                ..base.clone()
            },
            ErrorKind::InvalidArgument,
        ),
        (
            AttachRequest {
                network: "missing".into(),
                ..base.clone()
            },
            ErrorKind::NotFound,
        ),
        (
            AttachRequest {
                netns_path: String::new(),
                ..base.clone()
            },
            ErrorKind::InvalidArgument,
        ),
        (
            AttachRequest {
                netns_path: "/run/netns/gone".into(),
                ..base.clone()
            },
            ErrorKind::FailedPrecondition,
        ),
        (
            AttachRequest {
                ipv4: Some("10.9.9.9".parse().unwrap()),
                ..base.clone()
            },
            ErrorKind::InvalidArgument,
        ),
        (
            AttachRequest {
                ipv4: Some("10.201.1.1".parse().unwrap()),
                ..base.clone()
            },
            ErrorKind::AlreadyExists,
        ),
        (
            AttachRequest {
                ifname: "a/b".into(),
                ..base.clone()
            },
            ErrorKind::InvalidArgument,
        ),
        (
            AttachRequest {
                network: "bridge".into(),
                ipv4: Some("10.200.0.9".parse().unwrap()),
                ..base.clone()
            },
            ErrorKind::InvalidArgument,
        ),
    ];
    for (req, kind) in cases {
        assert_eq!(
            h.svc.attach(req.clone()).unwrap_err().kind(),
            kind,
            "{req:?}"
        );
    }
    // A static address and MAC.
    let a = h
        .svc
        .attach(AttachRequest {
            ipv4: Some("10.201.1.77".parse().unwrap()),
            mac: Some([2, 0, 0, 0, 0, 7]),
            ..base.clone()
        })
        .unwrap();
    assert_eq!(a.record.ipv4, Some("10.201.1.77".parse().unwrap()));
    assert_eq!(a.record.mac, "02:00:00:00:00:07");
    // host/none cannot be combined with a bridge network.
    let err = h
        .svc
        .attach(AttachRequest {
            network: "host".into(),
            ..base
        })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
}

#[test]
fn failed_kernel_setup_leaves_nothing_behind() {
    let h = Harness::new();
    h.create("app");
    *h.kernel.fail_endpoint.lock().unwrap() = true;
    let err = h.attach(&cid(1), "web", "app", "8080:80").unwrap_err();
    assert!(err.message().contains("boom"));
    assert!(h.svc.list_attachments("", "app").unwrap().is_empty());
    assert!(h.fw.comments().iter().all(|c| !c.contains(":ep:")));
    *h.kernel.fail_endpoint.lock().unwrap() = false;
    // The address and the port were not kept.
    let a = h.attach(&cid(1), "web", "app", "8080:80").unwrap();
    assert_eq!(a.record.ipv4, Some("10.201.1.2".parse().unwrap()));
}

#[test]
fn default_route_goes_to_the_highest_priority_and_moves_on_detach() {
    let h = Harness::new();
    h.create("a");
    h.create("b");
    let internal = CreateNetwork {
        name: "i".into(),
        internal: true,
        ..Default::default()
    };
    h.svc.create_network(internal).unwrap();
    let netns = h.netns("c");
    let req = |network: &str, prio: i32, ports: &str| AttachRequest {
        container_id: cid(1),
        netns_path: netns.clone(),
        network: network.into(),
        gw_priority: prio,
        ports: ports
            .split_whitespace()
            .flat_map(|p| ports::parse(p).unwrap())
            .collect(),
        ..Default::default()
    };
    let a = h.svc.attach(req("a", 0, "")).unwrap();
    assert!(a.record.default_route);
    let i = h.svc.attach(req("i", 10, "8081:80")).unwrap();
    assert!(
        !i.record.default_route,
        "internal networks have no default route"
    );
    assert!(
        i.record.ports.is_empty(),
        "no published ports on internal networks"
    );
    assert_eq!(i.record.ifname, "eth1");
    let b = h.svc.attach(req("b", 5, "")).unwrap();
    assert!(b.record.default_route);
    assert_eq!(b.record.ifname, "eth2");
    let list = h.svc.list_attachments(&cid(1), "a").unwrap();
    assert!(!list[0].record.default_route, "a lost the route to b");
    h.svc.detach(&cid(1), "b", false).unwrap();
    let routes = h.kernel.routes.lock().unwrap().clone();
    assert_eq!(
        routes.last().unwrap().1,
        "eth0",
        "the route moved back to a"
    );
    assert!(
        h.svc.list_attachments(&cid(1), "a").unwrap()[0]
            .record
            .default_route
    );
    assert_eq!(h.svc.detach(&cid(1), "", false).unwrap().len(), 2);
}

#[test]
fn restart_keeps_attachments_and_cleans_up_dead_namespaces() {
    let h = Harness::new();
    let net = h.create("app").record;
    let live = h
        .attach(&cid(1), "live", "app", "127.0.0.1:8080:80")
        .unwrap()
        .record;
    let dead = h
        .attach(&cid(2), "dead", "app", "127.0.0.1:8081:80")
        .unwrap()
        .record;
    // While berth-network is down: one namespace goes away, the bridge and the live veth are
    // lost too (e.g. someone ran `ip link del`).
    h.kernel
        .netns
        .lock()
        .unwrap()
        .remove(Path::new(&dead.netns_path));
    h.kernel.bridges.lock().unwrap().remove(&net.bridge);
    h.kernel.endpoints.lock().unwrap().remove(&live.host_ifname);
    let chains = h.svc.chains().clone();
    // Rules of a network and an endpoint this store never heard of.
    let orphan = |comment: String| Rule {
        table: crate::kernel::Table::Nat,
        chain: chains.dnat(),
        args: vec![],
        comment,
        first: false,
    };
    h.fw.ensure(&[
        orphan(format!("{}masquerade", chains.network_tag(&"9".repeat(64)))),
        orphan(format!("{}tcp:all:1", chains.endpoint_tag(&"8".repeat(64)))),
    ])
    .unwrap();
    let h = h.restart();
    assert!(
        h.fw.comments()
            .iter()
            .all(|c| !c.contains("999999999999") && !c.contains("888888888888"))
    );
    let atts = h.svc.list_attachments("", "app").unwrap();
    assert_eq!(atts.len(), 1);
    assert_eq!(atts[0].record, live);
    assert!(
        h.kernel.bridges.lock().unwrap().contains_key(&net.bridge),
        "bridge recreated"
    );
    assert!(
        h.kernel
            .endpoints
            .lock()
            .unwrap()
            .contains_key(&live.host_ifname),
        "veth recreated"
    );
    assert!(
        h.fw.with_prefix(&chains.endpoint_tag(&dead.endpoint_id))
            .is_empty()
    );
    assert_eq!(
        h.fw.with_prefix(&chains.endpoint_tag(&live.endpoint_id))
            .len(),
        1
    );
    // The dead one's address and port are free again.
    let again = h
        .attach(&cid(3), "new", "app", "127.0.0.1:8081:80")
        .unwrap();
    assert_eq!(
        again.record.ipv4,
        dead.ipv4.map(|_| "10.201.1.4".parse().unwrap()),
        "sequential after restart too"
    );
    assert_eq!(
        h.svc.lookup("live", "app", "").unwrap().ipv4,
        [live
            .ipv4
            .map(|ip| match ip {
                IpAddr::V4(v) => v,
                IpAddr::V6(_) => unreachable!(),
            })
            .unwrap()]
    );
}

#[test]
fn default_bridge_dns_and_links() {
    let h = Harness::new();
    let a = h.attach(&cid(1), "db", "bridge", "").unwrap();
    assert_eq!(a.record.ipv4, Some("10.200.0.2".parse().unwrap()));
    assert!(
        a.record.dns_names.is_empty(),
        "no name resolution on the default bridge"
    );
    // The loopback resolver of the host is dropped.
    assert_eq!(a.dns_servers, ["10.255.255.53"]);
    let netns = h.netns("web");
    let b = h
        .svc
        .attach(AttachRequest {
            container_id: cid(2),
            container_name: "web".into(),
            netns_path: netns,
            network: "bridge".into(),
            links: vec!["db:database".into()],
            dns_servers: vec!["9.9.9.9".into()],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(b.dns_servers, ["9.9.9.9"]);
    assert_eq!(
        b.hosts,
        [(
            "10.200.0.2".parse().unwrap(),
            vec!["database".to_string(), "db".to_string()]
        )]
    );
    assert!(h.svc.lookup("db", "bridge", "").is_err());
    // host network: an endpoint record only.
    let c = h
        .svc
        .attach(AttachRequest {
            container_id: cid(3),
            network: "host".into(),
            ..Default::default()
        })
        .unwrap();
    assert!(c.record.host_ifname.is_empty() && c.record.ipv4.is_none());
    assert_eq!(c.dns_servers, ["127.0.0.53", "10.255.255.53"]);
}

#[test]
fn prune_and_until() {
    let h = Harness::new();
    let (_, _) = h
        .svc
        .create_network(CreateNetwork {
            name: "keep".into(),
            labels: BTreeMap::from([("keep".to_string(), "1".to_string())]),
            ..Default::default()
        })
        .unwrap();
    h.create("used");
    h.create("old");
    h.attach(&cid(1), "c", "used", "").unwrap();
    let pruned = h
        .svc
        .prune_networks(&[("label!".into(), "keep".into())])
        .unwrap();
    assert_eq!(pruned, ["old"]);
    let pruned = h
        .svc
        .prune_networks(&[("until".into(), "2001-01-01T00:00:00Z".into())])
        .unwrap();
    assert!(pruned.is_empty());
    assert!(
        h.svc
            .prune_networks(&[("until".into(), "yesterday".into())])
            .is_err()
    );
    let names: Vec<String> = h
        .svc
        .list_networks(&[])
        .unwrap()
        .into_iter()
        .map(|n| n.record.name)
        .collect();
    assert_eq!(names, ["bridge", "host", "keep", "none", "used"]);
    let dangling = h
        .svc
        .list_networks(&[("dangling".into(), "true".into())])
        .unwrap();
    assert_eq!(dangling.len(), 1);
}

#[test]
fn until_formats() {
    let now = 1_700_000_000_000_000_000;
    assert_eq!(
        parse_until("1600000000", now).unwrap(),
        1_600_000_000_000_000_000
    );
    assert_eq!(
        parse_until("1h30m", now).unwrap(),
        now - 5400 * 1_000_000_000
    );
    assert_eq!(
        parse_until("1970-01-02", now).unwrap(),
        86400 * 1_000_000_000
    );
    assert_eq!(
        parse_until("2000-03-01T00:00:00Z", now).unwrap(),
        951_868_800 * 1_000_000_000
    );
    assert_eq!(
        parse_until("2000-03-01T01:00:00.5+01:00", now).unwrap(),
        951_868_800 * 1_000_000_000 + 500_000_000
    );
    assert!(parse_until("2000-13-01", now).is_err());
}

#[test]
fn cni_attach_and_detach_use_the_recorded_arguments() {
    let h = Harness::new();
    h.cni_conflist(r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#);
    assert_eq!(h.svc.cni_configs().unwrap()[0].name, "pods");
    let netns = h.netns("pod");
    let req = CniAttachRequest {
        container_id: "sandbox1".into(),
        netns_path: netns.clone(),
        ..Default::default()
    };
    let (result, _) = h.svc.cni_attach(req.clone()).unwrap();
    assert_eq!(result.ips[0].0, "10.88.0.5/16");
    // Idempotent: no second ADD.
    h.svc.cni_attach(req).unwrap();
    assert_eq!(h.cni.calls.lock().unwrap().len(), 2);
    let err = h
        .svc
        .cni_attach(CniAttachRequest {
            container_id: "s".into(),
            netns_path: netns,
            config_name: "nope".into(),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    // The config file changes; DEL still uses what ADD used.
    std::fs::remove_file(h.dir.path().join("cni/10-pods.conflist")).unwrap();
    h.svc.cni_detach("sandbox1", "", "").unwrap();
    let calls = h.cni.calls.lock().unwrap().clone();
    assert_eq!(
        &calls[2..],
        [
            ("portmap".to_string(), "DEL".to_string()),
            ("bridge".to_string(), "DEL".to_string())
        ]
    );
    h.svc.cni_detach("sandbox1", "", "").unwrap();
}

#[test]
fn a_del_after_the_namespace_is_gone_passes_no_namespace() {
    let h = Harness::new();
    h.cni_conflist(r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"}]}"#);
    let netns = h.netns("lost");
    h.svc
        .cni_attach(CniAttachRequest {
            container_id: "sb".into(),
            netns_path: netns.clone(),
            ..Default::default()
        })
        .unwrap();
    // A reboot: the namespace file holds no namespace any more.
    h.kernel.netns.lock().unwrap().remove(Path::new(&netns));
    h.svc.cni_detach("sb", "", "").unwrap();
    assert_eq!(*h.cni.netns.lock().unwrap(), [netns, String::new()]);
}

#[test]
fn a_detach_during_the_add_undoes_the_add() {
    let h = Harness::new();
    h.cni_conflist(r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"}]}"#);
    let netns = h.netns("pod");
    let (started_tx, started) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    *h.cni.hold_add.lock().unwrap() = Some((started_tx, go_rx));
    std::thread::scope(|s| {
        let attach = s.spawn(|| {
            h.svc.cni_attach(CniAttachRequest {
                container_id: "sb".into(),
                netns_path: netns.clone(),
                ..Default::default()
            })
        });
        started.recv().unwrap();
        // The caller gave up (an engine tearing down a half-made pod): DEL while ADD runs.
        h.svc.cni_detach("sb", "", "").unwrap();
        go.send(()).unwrap();
        let err = attach.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::FailedPrecondition, "{}", err.chain());
    });
    let calls = h.cni.calls.lock().unwrap().clone();
    let cmds: Vec<&str> = calls.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(
        cmds,
        ["ADD", "DEL", "DEL"],
        "the ADD undone after it finished"
    );
    // Nothing recorded: a later detach has nothing to do.
    h.svc.cni_detach("sb", "", "").unwrap();
    assert_eq!(h.cni.calls.lock().unwrap().len(), 3);
}

#[test]
fn dns_view_follows_attachments() {
    let h = Harness::new();
    let net = h.create("app").record;
    h.svc
        .attach(AttachRequest {
            container_id: cid(1),
            container_name: "web".into(),
            netns_path: h.netns("w"),
            network: "app".into(),
            aliases: vec!["Frontend".into()],
            ..Default::default()
        })
        .unwrap();
    let view = h.svc.view.get();
    let found = view.lookup_in(&[net.id.as_str()], "frontend").unwrap();
    assert_eq!(found.ipv4.len(), 1);
    // The host's loopback resolver stays an upstream: the resolver runs on the host.
    assert_eq!(view.default_upstreams.len(), 2);
    h.svc.detach(&cid(1), "", false).unwrap();
    assert!(
        h.svc
            .view
            .get()
            .lookup_in(&[net.id.as_str()], "web")
            .is_none()
    );
}

#[test]
fn an_unfinished_cni_add_is_deleted_at_start() {
    let h = Harness::new();
    let netns = h.netns("pod");
    let Harness {
        dir,
        kernel,
        fw,
        svc,
        ..
    } = h;
    drop(svc);
    // What a crash between "record the intent" and "ADD finished" leaves behind.
    let store = Store::open(&dir.path().join("network.redb")).unwrap();
    let pending = CniRecord {
        container_id: "sandbox9".into(),
        config_name: "pods".into(),
        ifname: "eth0".into(),
        netns_path: netns,
        args: BTreeMap::new(),
        config: serde_json::json!({"cniVersion": "1.0.0", "name": "pods", "plugins": [{"type": "bridge"}]}),
        runtime_config: Map::new(),
        result: Value::Null,
        created_ns: 0,
    };
    store.apply(&[Op::PutCni(&pending)]).unwrap();
    drop(store);
    let h = Harness::with(dir, kernel, fw);
    assert_eq!(
        *h.cni.calls.lock().unwrap(),
        [("bridge".to_string(), "DEL".to_string())]
    );
    // Nothing left to delete.
    h.svc.cni_detach("sandbox9", "", "").unwrap();
    assert_eq!(h.cni.calls.lock().unwrap().len(), 1);
}

#[test]
fn settings_are_validated() {
    let mut cfg = Config::default();
    let s = Settings::from_config(&cfg).unwrap();
    assert_eq!(s.bip_gateway.to_string(), "172.29.0.1");
    assert_eq!(s.bip_subnet.to_string(), "172.29.0.0/16");
    assert_eq!(
        s.db_path,
        PathBuf::from("/var/lib/berth/network/network.redb")
    );
    for (field, bad) in [
        ("bip", "172.29.0.0/16"),
        ("bip", "nonsense"),
        ("bridge", "much-too-long-name"),
    ] {
        let mut c = Config::default();
        match field {
            "bip" => c.network.bip = bad.into(),
            _ => c.network.bridge = bad.into(),
        }
        let err = Settings::from_config(&c).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.message().contains(field), "{}", err.message());
    }
    cfg.network.dns = vec!["not-an-ip".into()];
    assert!(Settings::from_config(&cfg).is_err());
}

#[test]
fn attaching_from_a_new_namespace_replaces_the_endpoint() {
    let h = Harness::new();
    h.create("app");
    let first = h
        .attach(&cid(1), "web", "app", "127.0.0.1:8080:80")
        .unwrap()
        .record;
    // The container restarts with a new namespace; the old one is gone.
    h.kernel
        .netns
        .lock()
        .unwrap()
        .remove(Path::new(&first.netns_path));
    let second = h
        .attach(&cid(1), "web-restarted", "app", "127.0.0.1:8080:80")
        .unwrap()
        .record;
    assert_ne!(second.endpoint_id, first.endpoint_id);
    assert_eq!(second.ipv4, first.ipv4, "the address is kept");
    assert_eq!(second.ports[0].host_port, 8080);
    assert!(
        !h.kernel
            .endpoints
            .lock()
            .unwrap()
            .contains_key(&first.host_ifname)
    );
    assert!(
        h.fw.with_prefix(&h.svc.chains().endpoint_tag(&first.endpoint_id))
            .is_empty()
    );
    assert_eq!(h.svc.list_attachments(&cid(1), "").unwrap().len(), 1);
}

impl Harness {
    /// The namespace of `att` goes away; with `kernel_done` the kernel already removed its
    /// veth with it (else the veth is still being torn down).
    fn kill_netns(&self, att: &AttachmentRecord, kernel_done: bool) {
        self.kernel
            .netns
            .lock()
            .unwrap()
            .remove(Path::new(&att.netns_path));
        if kernel_done {
            self.kernel
                .endpoints
                .lock()
                .unwrap()
                .remove(&att.host_ifname);
        }
    }

    fn releasing(&self) -> Vec<String> {
        self.svc.lock().releasing.keys().cloned().collect()
    }
}

#[test]
fn detach_of_a_removed_namespace_keeps_the_address_until_the_veth_is_gone() {
    let h = Harness::new();
    h.create("app");
    let old = h.attach(&cid(1), "old", "app", "").unwrap().record;
    h.kill_netns(&old, false);
    let before = h.events.0.lock().unwrap().len();
    assert_eq!(h.svc.detach(&cid(1), "", true).unwrap().len(), 1);
    // Gone from the API and DNS at once, with its event ...
    assert!(h.svc.list_attachments(&cid(1), "").unwrap().is_empty());
    assert!(h.svc.lookup("old", "app", "").is_err());
    assert_eq!(h.events.0.lock().unwrap()[before].0, "disconnect");
    // ... but the veth is the kernel's to remove, and its address stays taken meanwhile.
    assert!(
        h.kernel
            .endpoints
            .lock()
            .unwrap()
            .contains_key(&old.host_ifname)
    );
    assert_eq!(h.releasing(), std::slice::from_ref(&old.endpoint_id));
    assert!(h.svc.reap_now(), "still waiting for the veth");
    let other = h.attach(&cid(2), "other", "app", "").unwrap().record;
    assert_ne!(other.ipv4, old.ipv4);

    // The kernel finished: the next reaper pass frees the address and drops the record.
    h.kernel.endpoints.lock().unwrap().remove(&old.host_ifname);
    assert!(!h.svc.reap_now());
    assert!(h.releasing().is_empty());
    let h = h.restart();
    let left: Vec<String> = h
        .svc
        .list_attachments("", "app")
        .unwrap()
        .into_iter()
        .map(|a| a.record.container_id)
        .collect();
    assert_eq!(left, [cid(2)]);
}

#[test]
fn an_address_asked_for_again_is_released_at_once() {
    let h = Harness::new();
    h.create("app");
    let old = h.attach(&cid(1), "old", "app", "").unwrap().record;
    h.kill_netns(&old, false);
    h.svc.detach(&cid(1), "", true).unwrap();
    let netns = h.netns("new");
    let new = h
        .svc
        .attach(AttachRequest {
            container_id: cid(2),
            container_name: "new".into(),
            netns_path: netns,
            network: "app".into(),
            ipv4: old.ipv4,
            ..Default::default()
        })
        .unwrap()
        .record;
    assert_eq!(new.ipv4, old.ipv4);
    assert!(
        !h.kernel
            .endpoints
            .lock()
            .unwrap()
            .contains_key(&old.host_ifname),
        "the old veth is deleted before its address is given again"
    );
    assert!(h.releasing().is_empty());
    // And the network can be removed right after a detach.
    h.svc.detach(&cid(2), "", true).unwrap();
    h.svc.delete_network("app").unwrap();
}

#[test]
fn a_crash_while_releasing_is_cleaned_up_at_start() {
    let h = Harness::new();
    h.create("app");
    let old = h
        .attach(&cid(1), "old", "app", "127.0.0.1:8080:80")
        .unwrap()
        .record;
    h.kill_netns(&old, false);
    h.svc.detach(&cid(1), "", true).unwrap();
    let chains = h.svc.chains().clone();
    assert!(
        h.fw.with_prefix(&chains.endpoint_tag(&old.endpoint_id))
            .is_empty(),
        "port rules go at detach"
    );
    // kill -9 before the veth went: the start finds the record of a dead namespace.
    let h = h.restart();
    assert!(h.svc.list_attachments("", "").unwrap().is_empty());
    assert!(
        !h.kernel
            .endpoints
            .lock()
            .unwrap()
            .contains_key(&old.host_ifname)
    );
    // The port is free again.
    h.attach(&cid(2), "new", "app", "127.0.0.1:8080:80")
        .unwrap();
}

#[test]
fn concurrent_attaches_and_detaches_leave_nothing_behind() {
    let h = Harness::new();
    h.create("app");
    let atts: Vec<AttachmentRecord> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20u8)
            .map(|i| {
                let h = &h;
                s.spawn(move || {
                    let id = format!("{i:02x}").repeat(32);
                    let port = format!("127.0.0.1:{}:80", 9000 + i as u32);
                    h.attach(&id, &format!("c{i}"), "app", &port)
                        .unwrap()
                        .record
                })
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let ips: BTreeSet<_> = atts.iter().map(|a| a.ipv4).collect();
    assert_eq!(ips.len(), 20, "distinct addresses");
    assert_eq!(h.kernel.endpoints.lock().unwrap().len(), 20);
    // Half of them as a torn-down container (namespace gone first), half as a disconnect.
    for a in atts.iter().step_by(2) {
        h.kill_netns(a, true);
    }
    std::thread::scope(|s| {
        for a in &atts {
            let h = &h;
            s.spawn(move || h.svc.detach(&a.container_id, "", false).unwrap());
        }
    });
    while h.svc.reap_now() {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(h.releasing().is_empty());
    assert!(h.kernel.endpoints.lock().unwrap().is_empty());
    assert!(h.svc.list_attachments("", "").unwrap().is_empty());
    let chains = h.svc.chains().clone();
    assert!(h.fw.with_prefix(&format!("{}ep:", chains.tag())).is_empty());
    let h = h.restart();
    assert!(h.svc.list_attachments("", "").unwrap().is_empty());
}
