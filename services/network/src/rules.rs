//! Which packet filter rules a berth stack, a network and a published port need.
//!
//! Chains (prefix `BERTH` for the default bridge `berth0`, `BERTH-<BRIDGE>` otherwise, so
//! two stacks on one host never share a chain):
//!
//! | table  | chain          | jumped from                                  | holds |
//! |--------|----------------|----------------------------------------------|-------|
//! | nat    | `<P>-DNAT`     | PREROUTING and OUTPUT, for local destinations | one DNAT per published port |
//! | nat    | `<P>-POST`     | POSTROUTING                                  | masquerade out of networks, from 127/8 into them, hairpin |
//! | filter | `<P>-FWD`      | FORWARD                                      | accepts for bridge traffic, after `<P>-ISO` |
//! | filter | `<P>-ISO`      | `<P>-FWD`                                    | stage 1 isolation, internal networks |
//! | filter | `<P>-ISO2`     | `<P>-ISO`                                    | stage 2 isolation (drop into another bridge) |
//!
//! Every rule carries a comment `<p>:<scope>:<id>:<what>` (`p` the lowercase prefix), so a
//! network's or an endpoint's rules are found and removed exactly, and ensuring a rule is a
//! lookup of its comment.

use crate::kernel::{Rule, Table};
use crate::model::{AttachmentRecord, NetworkRecord};

/// The chain names and comment tags of one berth stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chains {
    prefix: String,
}

impl Chains {
    /// The chains of the stack whose default bridge is `default_bridge`.
    pub fn for_default_bridge(default_bridge: &str) -> Self {
        let prefix = if default_bridge == "berth0" {
            "BERTH".to_string()
        } else {
            format!("BERTH-{}", default_bridge.to_ascii_uppercase())
        };
        Self { prefix }
    }

    /// The prefix of every chain of the stack.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// nat: published ports.
    pub fn dnat(&self) -> String {
        format!("{}-DNAT", self.prefix)
    }

    /// nat: masquerade.
    pub fn post(&self) -> String {
        format!("{}-POST", self.prefix)
    }

    /// filter: forwarding accepts.
    pub fn fwd(&self) -> String {
        format!("{}-FWD", self.prefix)
    }

    /// filter: isolation stage 1.
    pub fn iso(&self) -> String {
        format!("{}-ISO", self.prefix)
    }

    /// filter: isolation stage 2.
    pub fn iso2(&self) -> String {
        format!("{}-ISO2", self.prefix)
    }

    /// Prefix of every comment of the stack.
    pub fn tag(&self) -> String {
        format!("{}:", self.prefix.to_ascii_lowercase())
    }

    /// Comment prefix of a network's rules.
    pub fn network_tag(&self, network_id: &str) -> String {
        format!(
            "{}net:{}:",
            self.tag(),
            &network_id[..network_id.len().min(12)]
        )
    }

    /// Comment prefix of an endpoint's rules (its published ports).
    pub fn endpoint_tag(&self, endpoint_id: &str) -> String {
        format!(
            "{}ep:{}:",
            self.tag(),
            &endpoint_id[..endpoint_id.len().min(12)]
        )
    }
}

fn rule(table: Table, chain: String, args: &[&str], comment: String) -> Rule {
    Rule {
        table,
        chain,
        args: args.iter().map(|s| s.to_string()).collect(),
        comment,
        first: false,
    }
}

fn first(mut r: Rule) -> Rule {
    r.first = true;
    r
}

/// The jumps from the built-in chains and the rules at the top of berth's own chains.
pub fn base_rules(c: &Chains) -> Vec<Rule> {
    let t = |what: &str| format!("{}base:{what}", c.tag());
    let (dnat, post, fwd, iso, iso2) = (c.dnat(), c.post(), c.fwd(), c.iso(), c.iso2());
    vec![
        first(rule(
            Table::Nat,
            "PREROUTING".into(),
            &["-m", "addrtype", "--dst-type", "LOCAL", "-j", &dnat],
            t("prerouting"),
        )),
        first(rule(
            Table::Nat,
            "OUTPUT".into(),
            &["-m", "addrtype", "--dst-type", "LOCAL", "-j", &dnat],
            t("output"),
        )),
        first(rule(
            Table::Nat,
            "POSTROUTING".into(),
            &["-j", &post],
            t("postrouting"),
        )),
        first(rule(
            Table::Filter,
            "FORWARD".into(),
            &["-j", &fwd],
            t("forward"),
        )),
        first(rule(
            Table::Filter,
            fwd.clone(),
            &["-j", &iso],
            t("isolation"),
        )),
        // Published ports are reachable from every network: connections that were DNATed
        // pass isolation in both directions.
        first(rule(
            Table::Filter,
            iso.clone(),
            &["-m", "conntrack", "--ctstate", "DNAT", "-j", "RETURN"],
            t("iso-dnat"),
        )),
        // ISO2 exists even before the first network so the jumps to it always resolve.
        rule(Table::Filter, iso2, &["-j", "RETURN"], t("iso2-return")),
    ]
}

/// The rules of a bridge network.
pub fn network_rules(c: &Chains, net: &NetworkRecord) -> Vec<Rule> {
    if !net.is_bridge() {
        return Vec::new();
    }
    let t = |what: &str| format!("{}{what}", c.network_tag(&net.id));
    let br = net.bridge.as_str();
    let mut out = vec![
        // Isolation: traffic leaving this bridge for another berth bridge is dropped there.
        rule(
            Table::Filter,
            c.iso(),
            &["-i", br, "!", "-o", br, "-j", &c.iso2()],
            t("iso"),
        ),
        first(rule(
            Table::Filter,
            c.iso2(),
            &["-o", br, "-j", "DROP"],
            t("iso2"),
        )),
        rule(
            Table::Filter,
            c.fwd(),
            &[
                "-o",
                br,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ],
            t("established"),
        ),
        rule(
            Table::Filter,
            c.fwd(),
            &[
                "-o",
                br,
                "-m",
                "conntrack",
                "--ctstate",
                "DNAT",
                "-j",
                "ACCEPT",
            ],
            t("published"),
        ),
        rule(
            Table::Filter,
            c.fwd(),
            &[
                "-i",
                br,
                "-o",
                br,
                "-j",
                if net.icc { "ACCEPT" } else { "DROP" },
            ],
            t("icc"),
        ),
    ];
    if net.internal {
        out.push(rule(
            Table::Filter,
            c.iso(),
            &["-i", br, "!", "-o", br, "-j", "DROP"],
            t("internal-out"),
        ));
        out.push(rule(
            Table::Filter,
            c.iso(),
            &["-o", br, "!", "-i", br, "-j", "DROP"],
            t("internal-in"),
        ));
        return out;
    }
    out.push(rule(
        Table::Filter,
        c.fwd(),
        &["-i", br, "!", "-o", br, "-j", "ACCEPT"],
        t("out"),
    ));
    if let Some(pool) = &net.ipv4 {
        let subnet = pool.subnet.to_string();
        if net.masquerade {
            out.push(rule(
                Table::Nat,
                c.post(),
                &["-s", &subnet, "!", "-o", br, "-j", "MASQUERADE"],
                t("masquerade"),
            ));
        }
        // Hairpin: a container reaching a published port of its own network through a host
        // address; without SNAT the reply would bypass the host's connection tracking.
        out.push(rule(
            Table::Nat,
            c.post(),
            &[
                "-s",
                &subnet,
                "-o",
                br,
                "-m",
                "conntrack",
                "--ctstate",
                "DNAT",
                "-j",
                "MASQUERADE",
            ],
            t("hairpin"),
        ));
    }
    // Published ports on 127.0.0.1: DNATed packets keep their loopback source, which the
    // container could not answer.
    out.push(rule(
        Table::Nat,
        c.post(),
        &["-s", "127.0.0.0/8", "-o", br, "-j", "MASQUERADE"],
        t("localhost"),
    ));
    out
}

/// The DNAT rules of an endpoint's published ports.
pub fn port_rules(c: &Chains, att: &AttachmentRecord) -> Vec<Rule> {
    let Some(ip) = att.ipv4 else {
        return Vec::new();
    };
    att.ports
        .iter()
        .filter(|p| p.host_ip.is_none_or(|h| h.is_ipv4()))
        .map(|p| {
            let proto = p.proto.as_str();
            let dport = p.host_port.to_string();
            let to = format!("{ip}:{}", p.container_port);
            let host = p.host_ip.map(|h| format!("{h}/32"));
            let mut args: Vec<&str> = vec!["-p", proto];
            if let Some(h) = &host {
                args.extend(["-d", h.as_str()]);
            }
            args.extend(["--dport", &dport, "-j", "DNAT", "--to-destination", &to]);
            let comment = format!(
                "{}{proto}:{}:{}",
                c.endpoint_tag(&att.endpoint_id),
                host.as_deref().map_or("all", |h| h.trim_end_matches("/32")),
                p.host_port
            );
            rule(Table::Nat, c.dnat(), &args, comment)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ipam::Pool;
    use crate::model::Driver;
    use crate::ports::{PortBinding, Proto};

    fn net(internal: bool) -> NetworkRecord {
        NetworkRecord {
            id: "0123456789abcdef".repeat(4),
            name: "n".into(),
            driver: Driver::Bridge,
            created_ns: 0,
            internal,
            attachable: false,
            enable_ipv6: false,
            ipam_driver: "default".into(),
            ipam_options: BTreeMap::new(),
            ipv4: Some(
                Pool::new(
                    "10.9.0.0/24".parse().unwrap(),
                    "",
                    "",
                    &BTreeMap::new(),
                    true,
                )
                .unwrap(),
            ),
            ipv6: None,
            options: BTreeMap::new(),
            labels: BTreeMap::new(),
            bridge: "br-0123456789ab".into(),
            builtin: false,
            dns_enabled: true,
            mtu: 1500,
            icc: true,
            masquerade: true,
            host_binding_ipv4: None,
            last_ipv4: None,
            last_ipv6: None,
        }
    }

    #[test]
    fn chain_names_fit_iptables_limits() {
        let c = Chains::for_default_bridge("berth0");
        assert_eq!(c.dnat(), "BERTH-DNAT");
        assert_eq!(c.tag(), "berth:");
        let c = Chains::for_default_bridge("abcdefghijklmno");
        // iptables chain names are at most 28 characters.
        for chain in [c.dnat(), c.post(), c.fwd(), c.iso(), c.iso2()] {
            assert!(chain.len() <= 28, "{chain}");
        }
        assert_eq!(
            c.network_tag(&"f".repeat(64)),
            "berth-abcdefghijklmno:net:ffffffffffff:"
        );
    }

    #[test]
    fn comments_are_unique_and_tagged() {
        let c = Chains::for_default_bridge("bt1");
        for internal in [false, true] {
            let n = net(internal);
            let rules = network_rules(&c, &n);
            let mut comments: Vec<_> = rules.iter().map(|r| r.comment.clone()).collect();
            assert!(
                comments
                    .iter()
                    .all(|x| x.starts_with(&c.network_tag(&n.id)))
            );
            comments.sort();
            comments.dedup();
            assert_eq!(comments.len(), rules.len());
            let masq = rules.iter().any(|r| {
                r.args.contains(&"MASQUERADE".to_string()) && r.args.contains(&"!".to_string())
            });
            assert_eq!(masq, !internal, "internal networks have no masquerade");
            let drops_out = rules.iter().any(|r| r.comment.ends_with("internal-out"));
            assert_eq!(drops_out, internal);
        }
        let base = base_rules(&c);
        assert!(
            base.iter()
                .all(|r| r.comment.starts_with("berth-bt1:base:"))
        );
    }

    #[test]
    fn port_rules_render_dnat() {
        let c = Chains::for_default_bridge("berth0");
        let att = AttachmentRecord {
            container_id: "c".repeat(64),
            container_name: "web".into(),
            hostname: String::new(),
            network_id: "n".repeat(64),
            endpoint_id: "e".repeat(64),
            netns_path: "/run/netns/x".into(),
            ifname: "eth0".into(),
            host_ifname: "vethx".into(),
            mac: String::new(),
            ipv4: Some("10.9.0.2".parse().unwrap()),
            ipv4_prefix: 24,
            ipv4_gateway: None,
            ipv6: None,
            ipv6_prefix: 0,
            ipv6_gateway: None,
            ports: vec![
                PortBinding {
                    host_ip: Some("127.0.0.1".parse().unwrap()),
                    host_port: 8080,
                    container_port: 80,
                    proto: Proto::Tcp,
                },
                PortBinding {
                    host_ip: None,
                    host_port: 5353,
                    container_port: 53,
                    proto: Proto::Udp,
                },
            ],
            aliases: vec![],
            dns_names: vec![],
            dns_servers: vec![],
            dns_search: vec![],
            dns_options: vec![],
            links: vec![],
            gw_priority: 0,
            default_route: true,
            created_ns: 0,
        };
        let rules = port_rules(&c, &att);
        assert_eq!(rules.len(), 2);
        assert_eq!(
            rules[0].args.join(" "),
            "-p tcp -d 127.0.0.1/32 --dport 8080 -j DNAT --to-destination 10.9.0.2:80"
        );
        assert_eq!(rules[0].comment, "berth:ep:eeeeeeeeeeee:tcp:127.0.0.1:8080");
        assert_eq!(
            rules[1].args.join(" "),
            "-p udp --dport 5353 -j DNAT --to-destination 10.9.0.2:53"
        );
        assert_eq!(rules[1].chain, "BERTH-DNAT");
    }
}
