//! The files Docker generates for each container and bind-mounts in: `/etc/hosts`,
//! `/etc/resolv.conf` and `/etc/hostname`.

use berth_proto::berth::types::v1 as types;

/// The entries every `/etc/hosts` starts with.
const HOSTS_HEADER: &str = "127.0.0.1\tlocalhost\n\
::1\tlocalhost ip6-localhost ip6-loopback\n\
fe00::0\tip6-localnet\n\
ff00::0\tip6-mcastprefix\n\
ff02::1\tip6-allnodes\n\
ff02::2\tip6-allrouters\n";

/// Public resolvers used when the host has only loopback ones (Docker's fallback).
pub const FALLBACK_DNS: &[&str] = &["8.8.8.8", "8.8.4.4"];

/// `/etc/hosts` of a container: the standard entries, the extra hosts (`--add-host`), then the
/// entries the network gave (its own address with hostname and aliases, links).
pub fn hosts(extra: &[types::HostEntry], network: &[types::HostEntry]) -> String {
    let mut out = String::from(HOSTS_HEADER);
    for e in extra.iter().chain(network) {
        if e.ip.is_empty() || e.hostnames.is_empty() {
            continue;
        }
        out.push_str(&e.ip);
        out.push('\t');
        out.push_str(&e.hostnames.join(" "));
        out.push('\n');
    }
    out
}

/// The nameservers of a resolv.conf text.
pub fn nameservers(text: &str) -> Vec<String> {
    field_values(text, "nameserver")
}

fn field_values(text: &str, field: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(field)).then(|| w.map(str::to_string).collect::<Vec<_>>())
        })
        .flatten()
        .collect()
}

fn is_loopback(ns: &str) -> bool {
    ns.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// What goes into a container's resolv.conf.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolv {
    /// Nameservers.
    pub servers: Vec<String>,
    /// Search domains.
    pub search: Vec<String>,
    /// Options.
    pub options: Vec<String>,
}

impl Resolv {
    /// Renders the file.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for s in &self.servers {
            out.push_str(&format!("nameserver {s}\n"));
        }
        if !self.search.is_empty() {
            out.push_str(&format!("search {}\n", self.search.join(" ")));
        }
        if !self.options.is_empty() {
            out.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        out
    }

    /// Docker's rules: the container's own `--dns*` settings win; then what the network said;
    /// then the host's file, without loopback nameservers (unreachable from a container
    /// namespace), falling back to public resolvers when none is left. With the host's network
    /// (`host_network`), the host's servers are kept as they are.
    pub fn build(
        own: &Resolv,
        network: &Resolv,
        host_resolv_conf: &str,
        host_network: bool,
    ) -> Self {
        let host_servers: Vec<String> = nameservers(host_resolv_conf)
            .into_iter()
            .filter(|s| host_network || !is_loopback(s))
            .collect();
        let pick = |a: &Vec<String>, b: &Vec<String>, c: Vec<String>| {
            if !a.is_empty() {
                a.clone()
            } else if !b.is_empty() {
                b.clone()
            } else {
                c
            }
        };
        let mut servers = pick(&own.servers, &network.servers, host_servers);
        if servers.is_empty() {
            servers = FALLBACK_DNS.iter().map(|s| s.to_string()).collect();
        }
        Self {
            servers,
            search: pick(
                &own.search,
                &network.search,
                field_values(host_resolv_conf, "search"),
            ),
            options: pick(
                &own.options,
                &network.options,
                field_values(host_resolv_conf, "options"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file() {
        let text = hosts(
            &[types::HostEntry {
                ip: "10.0.0.9".into(),
                hostnames: vec!["db".into(), "db.local".into()],
            }],
            &[types::HostEntry {
                ip: "172.29.0.2".into(),
                hostnames: vec!["abc123".into()],
            }],
        );
        assert!(text.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(text.contains("10.0.0.9\tdb db.local\n"));
        assert!(text.ends_with("172.29.0.2\tabc123\n"));
    }

    #[test]
    fn resolv_conf_rules() {
        let host =
            "# comment\nnameserver 127.0.0.53\nnameserver 10.1.1.1\nsearch corp\noptions edns0\n";
        let r = Resolv::build(&Resolv::default(), &Resolv::default(), host, false);
        assert_eq!(r.servers, ["10.1.1.1"]);
        assert_eq!(r.search, ["corp"]);
        assert_eq!(
            r.render(),
            "nameserver 10.1.1.1\nsearch corp\noptions edns0\n"
        );
        let r = Resolv::build(
            &Resolv::default(),
            &Resolv::default(),
            "nameserver 127.0.0.1\n",
            false,
        );
        assert_eq!(r.servers, FALLBACK_DNS);
        let r = Resolv::build(
            &Resolv::default(),
            &Resolv::default(),
            "nameserver 127.0.0.1\n",
            true,
        );
        assert_eq!(r.servers, ["127.0.0.1"]);
        let net = Resolv {
            servers: vec!["172.30.0.1".into()],
            ..Default::default()
        };
        let own = Resolv {
            servers: vec!["1.1.1.1".into()],
            search: vec!["x".into()],
            ..Default::default()
        };
        assert_eq!(
            Resolv::build(&Resolv::default(), &net, host, false).servers,
            ["172.30.0.1"]
        );
        let r = Resolv::build(&own, &net, host, false);
        assert_eq!(
            (r.servers, r.search),
            (vec!["1.1.1.1".to_string()], vec!["x".to_string()])
        );
    }
}
