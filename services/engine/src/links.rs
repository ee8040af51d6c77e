//! Legacy container links (`--link name:alias` on the default bridge): the link syntax, the
//! environment variables Docker injects into the linking container, and its `/etc/hosts` entry.
//!
//! A link is recorded on the linking container in Docker's own form, `/child:/parent/alias`, so
//! inspect shows it as Docker does and the alias path is the `ALIAS_NAME` value.

use berth_core::{Error, Result};
use berth_proto::berth::types::v1 as types;

/// Splits a link as Docker accepts it: `name`, `name:alias`, or the recorded form
/// `/name:/parent/alias`. Returns the linked container's name and the alias.
pub fn parse(link: &str) -> Result<(String, String)> {
    if link.is_empty() {
        return Err(Error::invalid_argument("empty string specified for links"));
    }
    let parts: Vec<&str> = link.split(':').collect();
    match parts.as_slice() {
        [name] => Ok((name.trim_start_matches('/').to_string(), name.to_string())),
        [name, alias] if name.starts_with('/') => {
            let alias = alias.rsplit('/').next().unwrap_or(alias);
            Ok((name[1..].to_string(), alias.to_string()))
        }
        [name, alias] => Ok((name.to_string(), alias.to_string())),
        _ => Err(Error::invalid_argument(format!(
            "bad format for links: {link}"
        ))),
    }
}

/// The recorded form of a link: `/child:/parent/alias`.
pub fn record(child: &str, parent: &str, alias: &str) -> String {
    format!(
        "/{}:/{}/{}",
        child.trim_start_matches('/'),
        parent.trim_start_matches('/'),
        alias.trim_start_matches('/')
    )
}

/// The alias of a recorded link (`/child:/parent/alias` → `alias`).
pub fn alias_of(link: &str) -> Option<String> {
    parse(link).ok().map(|(_, alias)| alias)
}

/// What the linking container learns about one linked container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Child {
    /// The linked container's name (without `/`).
    pub name: String,
    /// Its hostname.
    pub hostname: String,
    /// Its address on the default bridge.
    pub ip: String,
    /// Its environment (`KEY=value`).
    pub env: Vec<String>,
    /// Its exposed ports.
    pub ports: Vec<types::ExposedPort>,
}

fn proto_word(p: i32) -> &'static str {
    match types::Protocol::try_from(p).unwrap_or(types::Protocol::Tcp) {
        types::Protocol::Udp => "udp",
        types::Protocol::Sctp => "sctp",
        _ => "tcp",
    }
}

/// The variables Docker sets for a link named `link_name` (`/parent/alias`): `ALIAS_PORT`,
/// one group per exposed port (`ALIAS_PORT_80_TCP`, `_ADDR`, `_PORT`, `_PROTO`), `_START`/`_END`
/// for runs of consecutive ports, `ALIAS_NAME`, and the child's env as `ALIAS_ENV_<VAR>`
/// (except `HOME` and `PATH`, which Docker skips).
pub fn env(link_name: &str, child: &Child) -> Vec<String> {
    let alias = link_name
        .rsplit('/')
        .next()
        .unwrap_or(link_name)
        .to_ascii_uppercase()
        .replace('-', "_");
    let ip = &child.ip;
    let mut ports: Vec<(u32, &'static str)> = child
        .ports
        .iter()
        .map(|p| (p.port, proto_word(p.protocol)))
        .collect();
    // TCP first, then by protocol, then by number: the order Docker groups ranges in.
    ports.sort_by(|a, b| {
        let rank = |p: &str| (p != "tcp", p.to_string());
        rank(a.1).cmp(&rank(b.1)).then(a.0.cmp(&b.0))
    });
    ports.dedup();
    let mut out = Vec::new();
    // Docker's walk: a run of consecutive ports is reported when the first port after it (or
    // the end) is reached, so its `_START`/`_END` come after that port's variables.
    let (mut start, mut end) = (ports.first().copied(), ports.first().copied());
    for (i, &(num, proto)) in ports.iter().enumerate() {
        if i == 0 {
            out.push(format!("{alias}_PORT={proto}://{ip}:{num}"));
        }
        let prefix = format!("{alias}_PORT_{num}_{}", proto.to_ascii_uppercase());
        out.push(format!("{prefix}={proto}://{ip}:{num}"));
        out.push(format!("{prefix}_ADDR={ip}"));
        out.push(format!("{prefix}_PORT={num}"));
        out.push(format!("{prefix}_PROTO={proto}"));
        if let Some((e, ep)) = end
            && num == e + 1
            && proto == ep
        {
            end = Some((num, proto));
            if i < ports.len() - 1 {
                continue;
            }
        }
        if let (Some((s, sp)), Some((e, ep))) = (start, end)
            && (s, sp) != (e, ep)
        {
            let prefix = format!("{alias}_PORT_{s}_{}", sp.to_ascii_uppercase());
            out.push(format!("{prefix}_START={sp}://{ip}:{s}"));
            out.push(format!("{prefix}_PORT_START={s}"));
            out.push(format!("{prefix}_END={ep}://{ip}:{e}"));
            out.push(format!("{prefix}_PORT_END={e}"));
        }
        start = Some((num, proto));
        end = start;
    }
    out.push(format!("{alias}_NAME={link_name}"));
    for var in &child.env {
        let Some((name, value)) = var.split_once('=') else {
            continue;
        };
        if name == "HOME" || name == "PATH" {
            continue;
        }
        out.push(format!("{alias}_ENV_{name}={value}"));
    }
    out
}

/// The `/etc/hosts` entry of a link: the alias, the child's hostname, and its name when that
/// differs from the alias.
pub fn host_entry(alias: &str, child: &Child) -> types::HostEntry {
    let mut hostnames = vec![alias.to_string()];
    if !child.hostname.is_empty() && child.hostname != alias {
        hostnames.push(child.hostname.clone());
    }
    if child.name != alias {
        hostnames.push(child.name.clone());
    }
    types::HostEntry {
        ip: child.ip.clone(),
        hostnames,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(port: u32, p: types::Protocol) -> types::ExposedPort {
        types::ExposedPort {
            port,
            protocol: p as i32,
        }
    }

    #[test]
    fn link_syntax() {
        assert_eq!(parse("a:al").unwrap(), ("a".into(), "al".into()));
        assert_eq!(parse("a").unwrap(), ("a".into(), "a".into()));
        assert_eq!(parse("/a:/b/al").unwrap(), ("a".into(), "al".into()));
        assert!(parse("").is_err());
        assert_eq!(
            parse("a:b:c").unwrap_err().message(),
            "bad format for links: a:b:c"
        );
        assert_eq!(record("a", "b", "al"), "/a:/b/al");
        assert_eq!(alias_of("/a:/b/al").as_deref(), Some("al"));
    }

    #[test]
    fn env_as_docker_writes_it() {
        let child = Child {
            name: "db".into(),
            hostname: "0123456789ab".into(),
            ip: "172.17.0.2".into(),
            env: vec![
                "PATH=/bin".into(),
                "HOME=/root".into(),
                "PASSWORD=x=y".into(),
                "NOVALUE".into(),
            ],
            ports: vec![
                port(6380, types::Protocol::Tcp),
                port(53, types::Protocol::Udp),
                port(6379, types::Protocol::Tcp),
            ],
        };
        let vars = env("/web/my-db", &child);
        assert_eq!(
            vars,
            [
                "MY_DB_PORT=tcp://172.17.0.2:6379",
                "MY_DB_PORT_6379_TCP=tcp://172.17.0.2:6379",
                "MY_DB_PORT_6379_TCP_ADDR=172.17.0.2",
                "MY_DB_PORT_6379_TCP_PORT=6379",
                "MY_DB_PORT_6379_TCP_PROTO=tcp",
                "MY_DB_PORT_6380_TCP=tcp://172.17.0.2:6380",
                "MY_DB_PORT_6380_TCP_ADDR=172.17.0.2",
                "MY_DB_PORT_6380_TCP_PORT=6380",
                "MY_DB_PORT_6380_TCP_PROTO=tcp",
                "MY_DB_PORT_53_UDP=udp://172.17.0.2:53",
                "MY_DB_PORT_53_UDP_ADDR=172.17.0.2",
                "MY_DB_PORT_53_UDP_PORT=53",
                "MY_DB_PORT_53_UDP_PROTO=udp",
                "MY_DB_PORT_6379_TCP_START=tcp://172.17.0.2:6379",
                "MY_DB_PORT_6379_TCP_PORT_START=6379",
                "MY_DB_PORT_6379_TCP_END=tcp://172.17.0.2:6380",
                "MY_DB_PORT_6379_TCP_PORT_END=6380",
                "MY_DB_NAME=/web/my-db",
                "MY_DB_ENV_PASSWORD=x=y",
            ]
        );
        let bare = Child {
            name: "db".into(),
            ip: "10.0.0.2".into(),
            ..Default::default()
        };
        assert_eq!(env("/w/db", &bare), ["DB_NAME=/w/db"]);
    }

    #[test]
    fn hosts_entry_names() {
        let child = Child {
            name: "db".into(),
            hostname: "abc".into(),
            ip: "10.0.0.2".into(),
            ..Default::default()
        };
        assert_eq!(host_entry("al", &child).hostnames, ["al", "abc", "db"]);
        assert_eq!(host_entry("db", &child).hostnames, ["db", "abc"]);
    }
}
