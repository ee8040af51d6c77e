//! Wire types of `berth.network.v1` to and from the service's domain types.

use std::collections::BTreeMap;
use std::net::IpAddr;

use berth_core::{Error, Result};
use berth_proto::berth::network::v1 as pb;
use berth_proto::berth::types::v1::{HostEntry, PortMapping, Protocol};
use serde_json::{Map, Value, json};

use crate::cni::{CniConfigFile, CniResult};
use crate::ipam::{self, Pool};
use crate::model::NetworkRecord;
use crate::ports::{PortBinding, PortRequest, Proto};
use crate::service::{
    AttachRequest, AttachmentInfo, CniAttachRequest, CreateNetwork, NetworkInfo, PoolRequest,
};

/// A timestamp from nanoseconds since the epoch.
pub fn timestamp(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

fn protocol(value: i32) -> Result<Proto> {
    match Protocol::try_from(value) {
        Ok(Protocol::Unspecified | Protocol::Tcp) => Ok(Proto::Tcp),
        Ok(Protocol::Udp) => Ok(Proto::Udp),
        Ok(Protocol::Sctp) => Ok(Proto::Sctp),
        Err(_) => Err(Error::invalid_argument(format!("invalid protocol {value}"))),
    }
}

fn protocol_out(p: Proto) -> i32 {
    match p {
        Proto::Tcp => Protocol::Tcp as i32,
        Proto::Udp => Protocol::Udp as i32,
        Proto::Sctp => Protocol::Sctp as i32,
    }
}

fn optional_ip(what: &str, s: &str) -> Result<Option<IpAddr>> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| Error::invalid_argument(format!("invalid {what} {s:?}")))
}

/// A port mapping from the wire.
pub fn port_request(m: &PortMapping) -> Result<PortRequest> {
    PortRequest::new(
        &m.host_ip,
        m.host_port,
        m.host_port_end,
        m.container_port,
        protocol(m.protocol)?,
    )
}

/// A bound port for the wire.
pub fn port_mapping(b: &PortBinding) -> PortMapping {
    PortMapping {
        host_ip: b.host_ip.map_or("0.0.0.0".to_string(), |ip| ip.to_string()),
        host_port: b.host_port as u32,
        container_port: b.container_port as u32,
        protocol: protocol_out(b.proto),
        host_port_end: 0,
    }
}

impl TryFrom<pb::CreateNetworkRequest> for CreateNetwork {
    type Error = Error;

    fn try_from(r: pb::CreateNetworkRequest) -> Result<Self> {
        let ipam = r.ipam.unwrap_or_default();
        Ok(CreateNetwork {
            name: r.name,
            driver: r.driver,
            ipam_driver: ipam.driver,
            pools: ipam
                .pools
                .into_iter()
                .map(|p| PoolRequest {
                    subnet: p.subnet,
                    gateway: p.gateway,
                    ip_range: p.ip_range,
                    aux_addresses: p.aux_addresses.into_iter().collect(),
                })
                .collect(),
            ipam_options: ipam.options.into_iter().collect(),
            enable_ipv6: r.enable_ipv6,
            internal: r.internal,
            attachable: r.attachable,
            labels: r.labels.into_iter().collect(),
            options: r.options.into_iter().collect(),
        })
    }
}

fn pool_out(p: &Pool) -> pb::IpamPool {
    pb::IpamPool {
        subnet: p.subnet.to_string(),
        gateway: p.gateway.to_string(),
        ip_range: p.ip_range.map(|r| r.to_string()).unwrap_or_default(),
        aux_addresses: p
            .aux_addresses
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
    }
}

fn network_out(n: &NetworkRecord, endpoints: &[crate::model::AttachmentRecord]) -> pb::Network {
    let containers = endpoints
        .iter()
        .map(|a| {
            let ep = pb::NetworkEndpoint {
                container_id: a.container_id.clone(),
                name: a.container_name.clone(),
                endpoint_id: a.endpoint_id.clone(),
                mac_address: a.mac.clone(),
                ipv4_address: a
                    .ipv4
                    .map(|ip| format!("{ip}/{}", a.ipv4_prefix))
                    .unwrap_or_default(),
                ipv6_address: a
                    .ipv6
                    .map(|ip| format!("{ip}/{}", a.ipv6_prefix))
                    .unwrap_or_default(),
            };
            (a.container_id.clone(), ep)
        })
        .collect();
    pb::Network {
        id: n.id.clone(),
        name: n.name.clone(),
        driver: n.driver.as_str().to_string(),
        scope: "local".into(),
        created: Some(timestamp(n.created_ns)),
        internal: n.internal,
        attachable: n.attachable,
        enable_ipv6: n.enable_ipv6,
        ipam: Some(pb::Ipam {
            driver: n.ipam_driver.clone(),
            pools: n.ipv4.iter().chain(n.ipv6.iter()).map(pool_out).collect(),
            options: n.ipam_options.clone().into_iter().collect(),
        }),
        options: n.options.clone().into_iter().collect(),
        labels: n.labels.clone().into_iter().collect(),
        bridge_name: n.bridge.clone(),
        containers,
        builtin: n.builtin,
        dns_enabled: n.dns_enabled,
    }
}

impl From<&NetworkInfo> for pb::Network {
    fn from(info: &NetworkInfo) -> Self {
        network_out(&info.record, &info.endpoints)
    }
}

impl TryFrom<pb::AttachRequest> for AttachRequest {
    type Error = Error;

    fn try_from(r: pb::AttachRequest) -> Result<Self> {
        if r.network.is_empty() {
            return Err(Error::invalid_argument("network is required"));
        }
        let exposed = r
            .exposed_ports
            .iter()
            .map(|e| {
                let port = u16::try_from(e.port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| {
                        Error::invalid_argument(format!("invalid exposed port {}", e.port))
                    })?;
                Ok((port, protocol(e.protocol)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AttachRequest {
            container_id: r.container_id,
            container_name: r.container_name,
            hostname: r.hostname,
            netns_path: r.netns_path,
            network: r.network,
            ifname: r.interface_name,
            aliases: r.aliases,
            ipv4: optional_ip("IPv4 address", &r.ipv4_address)?,
            ipv6: optional_ip("IPv6 address", &r.ipv6_address)?,
            mac: if r.mac_address.is_empty() {
                None
            } else {
                Some(ipam::parse_mac(&r.mac_address)?)
            },
            ports: r
                .port_mappings
                .iter()
                .map(port_request)
                .collect::<Result<_>>()?,
            publish_all: r.publish_all,
            exposed,
            dns_servers: r.dns_servers,
            dns_search: r.dns_search,
            dns_options: r.dns_options,
            gw_priority: r.gw_priority,
            links: r.links,
        })
    }
}

impl From<&AttachmentInfo> for pb::Attachment {
    fn from(info: &AttachmentInfo) -> Self {
        let a = &info.record;
        pb::Attachment {
            container_id: a.container_id.clone(),
            container_name: a.container_name.clone(),
            network_id: a.network_id.clone(),
            network_name: info.network_name.clone(),
            endpoint_id: a.endpoint_id.clone(),
            netns_path: a.netns_path.clone(),
            interface_name: a.ifname.clone(),
            mac_address: a.mac.clone(),
            ipv4_address: a.ipv4.map(|ip| ip.to_string()).unwrap_or_default(),
            ipv4_prefix_len: a.ipv4_prefix as i32,
            ipv4_gateway: a.ipv4_gateway.map(|ip| ip.to_string()).unwrap_or_default(),
            ipv6_address: a.ipv6.map(|ip| ip.to_string()).unwrap_or_default(),
            ipv6_prefix_len: a.ipv6_prefix as i32,
            ipv6_gateway: a.ipv6_gateway.map(|ip| ip.to_string()).unwrap_or_default(),
            ports: a.ports.iter().map(port_mapping).collect(),
            aliases: a.aliases.clone(),
            dns_names: a.dns_names.clone(),
            dns_servers: info.dns_servers.clone(),
            dns_search: info.dns_search.clone(),
            dns_options: info.dns_options.clone(),
            hosts: info
                .hosts
                .iter()
                .map(|(ip, names)| HostEntry {
                    ip: ip.to_string(),
                    hostnames: names.clone(),
                })
                .collect(),
            default_route: a.default_route,
            created: Some(timestamp(a.created_ns)),
            host_interface_name: a.host_ifname.clone(),
        }
    }
}

/// runtimeConfig entries for the capabilities of a CNI request.
pub fn runtime_config(c: &pb::CniCapabilities) -> Result<Map<String, Value>> {
    let mut rc = Map::new();
    if !c.port_mappings.is_empty() {
        let maps = c
            .port_mappings
            .iter()
            .map(|m| {
                let p = port_request(m)?;
                if p.host_port == 0 || p.host_port_end != 0 {
                    return Err(Error::invalid_argument(
                        "CNI port mappings need a single explicit host port",
                    ));
                }
                Ok(json!({
                    "hostPort": p.host_port,
                    "containerPort": p.container_port,
                    "protocol": p.proto.as_str(),
                    "hostIP": p.host_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        rc.insert("portMappings".into(), Value::Array(maps));
    }
    if !c.ips.is_empty() {
        rc.insert("ips".into(), json!(c.ips));
    }
    if !c.mac.is_empty() {
        ipam::parse_mac(&c.mac)?;
        rc.insert("mac".into(), json!(c.mac));
    }
    if c.ingress_rate != 0 || c.egress_rate != 0 {
        // The bandwidth plugin wants a burst with every rate; kubelet passes the largest one.
        let burst = i32::MAX as u64;
        let mut bw = Map::new();
        if c.ingress_rate != 0 {
            bw.insert("ingressRate".into(), json!(c.ingress_rate));
            bw.insert("ingressBurst".into(), json!(burst));
        }
        if c.egress_rate != 0 {
            bw.insert("egressRate".into(), json!(c.egress_rate));
            bw.insert("egressBurst".into(), json!(burst));
        }
        rc.insert("bandwidth".into(), Value::Object(bw));
    }
    if !c.dns_servers.is_empty() || !c.dns_search.is_empty() || !c.dns_options.is_empty() {
        rc.insert(
            "dns".into(),
            json!({ "servers": c.dns_servers, "searches": c.dns_search, "options": c.dns_options }),
        );
    }
    if !c.cgroup_path.is_empty() {
        rc.insert("cgroupPath".into(), json!(c.cgroup_path));
    }
    if !c.ip_ranges.is_empty() {
        // One range set per subnet (`[[{"subnet": cidr}], ...]`), as the kubelet's CNI driver
        // passed its pod CIDR: host-local wants the addresses of one set in one family, so a
        // dual-stack node's two pod CIDRs are two sets (an address from each).
        let sets = c
            .ip_ranges
            .iter()
            .map(|r| {
                let (ip, len) = r.split_once('/').ok_or_else(|| {
                    Error::invalid_argument(format!("ip range {r:?} is not a CIDR"))
                })?;
                let ok = ip.parse::<IpAddr>().is_ok() && len.parse::<u8>().is_ok();
                if !ok {
                    return Err(Error::invalid_argument(format!(
                        "ip range {r:?} is not a CIDR"
                    )));
                }
                Ok(json!([{ "subnet": r }]))
            })
            .collect::<Result<Vec<_>>>()?;
        rc.insert("ipRanges".into(), Value::Array(sets));
    }
    Ok(rc)
}

impl TryFrom<pb::CniAttachRequest> for CniAttachRequest {
    type Error = Error;

    fn try_from(r: pb::CniAttachRequest) -> Result<Self> {
        let runtime_config = match &r.capabilities {
            Some(c) => runtime_config(c)?,
            None => Map::new(),
        };
        Ok(CniAttachRequest {
            container_id: r.container_id,
            netns_path: r.netns_path,
            config_name: r.config_name,
            ifname: r.interface_name,
            args: r.args.into_iter().collect::<BTreeMap<_, _>>(),
            runtime_config,
        })
    }
}

/// A CNI result for the wire.
pub fn cni_response(result: &CniResult, raw: &Value) -> pb::CniAttachResponse {
    pb::CniAttachResponse {
        interfaces: result
            .interfaces
            .iter()
            .map(|(name, mac, sandbox)| pb::CniInterface {
                name: name.clone(),
                mac: mac.clone(),
                sandbox: sandbox.clone(),
            })
            .collect(),
        ips: result
            .ips
            .iter()
            .map(|(address, gateway, interface)| pb::CniIpConfig {
                address: address.clone(),
                gateway: gateway.clone(),
                interface: *interface,
            })
            .collect(),
        dns_servers: result.dns_servers.clone(),
        dns_search: result.dns_search.clone(),
        dns_options: result.dns_options.clone(),
        result: serde_json::to_vec(raw).unwrap_or_default(),
    }
}

impl From<&CniConfigFile> for pb::CniConfig {
    fn from(c: &CniConfigFile) -> Self {
        pb::CniConfig {
            name: c.name.clone(),
            path: c.path.display().to_string(),
            cni_version: c.cni_version.clone(),
            plugin_types: c.plugin_types.clone(),
            config: serde_json::to_vec(&c.conflist).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::berth::types::v1::ExposedPort;

    #[test]
    fn attach_requests_are_validated() {
        let ok = pb::AttachRequest {
            container_id: "a".repeat(64),
            network: "n".into(),
            ipv4_address: "10.0.0.5".into(),
            mac_address: "02:42:0a:00:00:05".into(),
            port_mappings: vec![PortMapping {
                host_ip: "127.0.0.1".into(),
                host_port: 8080,
                container_port: 80,
                protocol: Protocol::Udp as i32,
                host_port_end: 0,
            }],
            exposed_ports: vec![ExposedPort {
                port: 443,
                protocol: 0,
            }],
            ..Default::default()
        };
        let r = AttachRequest::try_from(ok.clone()).unwrap();
        assert_eq!(r.ipv4, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(r.ports[0].proto, Proto::Udp);
        assert_eq!(r.exposed, [(443, Proto::Tcp)]);

        for (bad, what) in [
            (
                pb::AttachRequest {
                    ipv4_address: "10.0.0.500".into(),
                    ..ok.clone()
                },
                "IPv4",
            ),
            (
                pb::AttachRequest {
                    mac_address: "zz".into(),
                    ..ok.clone()
                },
                "MAC",
            ),
            (
                pb::AttachRequest {
                    network: String::new(),
                    ..ok.clone()
                },
                "network",
            ),
            (
                pb::AttachRequest {
                    port_mappings: vec![PortMapping {
                        container_port: 0,
                        ..Default::default()
                    }],
                    ..ok.clone()
                },
                "container port",
            ),
            (
                pb::AttachRequest {
                    port_mappings: vec![PortMapping {
                        container_port: 80,
                        protocol: 9,
                        ..Default::default()
                    }],
                    ..ok.clone()
                },
                "protocol",
            ),
        ] {
            let err = AttachRequest::try_from(bad).unwrap_err();
            assert_eq!(err.kind(), berth_core::ErrorKind::InvalidArgument);
            assert!(err.message().contains(what), "{what}: {}", err.message());
        }
    }

    #[test]
    fn cni_capabilities_become_runtime_config() {
        let caps = pb::CniCapabilities {
            port_mappings: vec![PortMapping {
                host_port: 8080,
                container_port: 80,
                ..Default::default()
            }],
            ingress_rate: 1000,
            dns_servers: vec!["10.0.0.1".into()],
            ..Default::default()
        };
        let rc = runtime_config(&caps).unwrap();
        assert_eq!(rc["portMappings"][0]["hostPort"], 8080);
        assert_eq!(rc["portMappings"][0]["protocol"], "tcp");
        assert_eq!(rc["bandwidth"]["ingressRate"], 1000);
        assert!(rc["bandwidth"].get("egressRate").is_none());
        assert_eq!(rc["dns"]["servers"][0], "10.0.0.1");
        assert!(!rc.contains_key("mac"));
        let random = pb::CniCapabilities {
            port_mappings: vec![PortMapping {
                container_port: 80,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(runtime_config(&random).is_err());
        let ranges = pb::CniCapabilities {
            ip_ranges: vec!["10.88.0.0/16".into(), "fd00:88::/64".into()],
            ..Default::default()
        };
        let rc = runtime_config(&ranges).unwrap();
        assert_eq!(
            rc["ipRanges"],
            json!([[{ "subnet": "10.88.0.0/16" }], [{ "subnet": "fd00:88::/64" }]])
        );
        let bad = pb::CniCapabilities {
            ip_ranges: vec!["10.88.0.0".into()],
            ..Default::default()
        };
        assert!(runtime_config(&bad).is_err());
    }

    #[test]
    fn timestamps() {
        let t = timestamp(1_500_000_000_123);
        assert_eq!((t.seconds, t.nanos), (1500, 123));
    }
}
