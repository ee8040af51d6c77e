//! Per-registry host configuration in containerd's format and layout (containerd's
//! docs/hosts.md), so a containerd user's `certs.d` works unchanged:
//! `<registry_config_path>/<namespace>/hosts.toml`, where the namespace directory is
//! `host_port_`, `host:port` or `_default`, the first that exists. A file lists
//! `[host."scheme://host[/path]"]` entries, tried in the order written, then `server` (the
//! namespace itself when not given).
//!
//! ```toml
//! server = "https://registry.k8s.io"
//! [host."http://127.0.0.1:5000"]
//!   capabilities = ["pull", "resolve"]
//!   skip_verify = true
//!   ca = "ca.crt"                # relative to the hosts.toml's directory
//!   client = [["c.cert", "c.key"]]
//!   [host."http://127.0.0.1:5000".header]
//!     x-custom = "value"
//! ```
//!
//! Supported: `server`, `capabilities` (pull, resolve, push; referrers is accepted), `ca`,
//! `client`, `skip_verify`, `header`, `override_path`, `dial_timeout`. Unknown keys are ignored,
//! as containerd ignores them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_core::{Error, Result};
use serde::Deserialize;

/// What a host may be asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetch blobs and manifests by digest.
    pub pull: bool,
    /// Turn a tag into a digest (fetch a manifest by tag).
    pub resolve: bool,
    /// Accept pushes.
    pub push: bool,
}

impl Capabilities {
    /// Everything: a registry itself, or a host that does not say.
    pub const ALL: Self = Self {
        pull: true,
        resolve: true,
        push: true,
    };
}

/// One `[host."…"]` entry, or the `server`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    /// `https` or `http`.
    pub https: bool,
    /// `host[:port]`.
    pub host: String,
    /// The API root, `/v2` unless the URL names another (with `override_path`, as given).
    pub path: String,
    pub capabilities: Capabilities,
    /// Skip certificate verification (`None`: not said).
    pub skip_verify: Option<bool>,
    /// CA files, absolute.
    pub ca: Vec<PathBuf>,
    /// Client certificates: a PEM holding both, or a certificate and its key.
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Headers sent with every request.
    pub headers: Vec<(String, String)>,
    pub dial_timeout: Option<Duration>,
}

/// A namespace's hosts: the mirrors in order, then the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hosts {
    pub mirrors: Vec<HostEntry>,
    /// The file's `server` with its top-level settings. Its `host` is empty when the file names
    /// no server: then the namespace itself is reached as berth reaches it without a
    /// hosts.toml, with these settings (CA, skip_verify, headers...).
    pub server: HostEntry,
}

/// The directory whose hosts.toml configures `namespace` (`host[:port]`), if any exists.
pub fn host_dir(root: &Path, namespace: &str) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(i) = namespace.rfind(':')
        && i > 0
        && !namespace[i..].contains(']')
    {
        candidates.push(root.join(format!("{}_{}_", &namespace[..i], &namespace[i + 1..])));
    }
    candidates.push(root.join(namespace));
    candidates.push(root.join("_default"));
    candidates.into_iter().find(|d| d.is_dir())
}

/// The hosts configured for `namespace` under `root`; `None` when no hosts.toml applies.
pub fn load(root: &Path, namespace: &str) -> Result<Option<Hosts>> {
    let Some(dir) = host_dir(root, namespace) else {
        return Ok(None);
    };
    let file = dir.join("hosts.toml");
    let text = match std::fs::read_to_string(&file) {
        Ok(t) if !t.trim().is_empty() => t,
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::internal(format!("read {}", file.display())).with_source(e));
        }
    };
    parse(&dir, &text)
        .map(Some)
        .map_err(|e| Error::invalid_argument(format!("{}", file.display())).with_source(e))
}

#[derive(Debug, Default, Deserialize)]
struct FileHost {
    capabilities: Option<Vec<String>>,
    ca: Option<OneOrMany>,
    client: Option<ClientCerts>,
    skip_verify: Option<bool>,
    header: Option<toml::Table>,
    #[serde(default)]
    override_path: bool,
    dial_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ClientCerts {
    One(String),
    Many(Vec<ClientCert>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ClientCert {
    Combined(String),
    Pair(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct File {
    server: Option<String>,
    #[serde(default)]
    host: toml::Table,
    #[serde(flatten)]
    root: FileHost,
}

/// Parses a hosts.toml whose directory is `dir` (relative paths are relative to it).
pub fn parse(dir: &Path, text: &str) -> Result<Hosts> {
    let file: File = toml::from_str(text)
        .map_err(|e| Error::invalid_argument("not a valid hosts.toml").with_source(e))?;
    let mut mirrors = Vec::new();
    // The `host` table keeps the file's order (toml's preserve_order), which is the order the
    // hosts are tried in.
    for (url, value) in file.host {
        let settings: FileHost = value
            .try_into()
            .map_err(|e| Error::invalid_argument(format!("host {url:?}")).with_source(e))?;
        mirrors.push(entry(dir, Some(&url), settings)?);
    }
    let server = file
        .server
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty());
    let server = entry(dir, server, file.root)?;
    Ok(Hosts { mirrors, server })
}

/// One host from its URL (`None`: the server of a file that names none) and settings.
fn entry(dir: &Path, url: Option<&str>, h: FileHost) -> Result<HostEntry> {
    let bad = |why: &str| Error::invalid_argument(format!("host {url:?}: {why}"));
    let (https, host, path) = match url {
        None => (true, String::new(), String::new()),
        Some(url) => {
            let full = if url.starts_with("http://") || url.starts_with("https://") {
                url.to_string()
            } else {
                format!("https://{url}")
            };
            let (https, rest) = match full.strip_prefix("https://") {
                Some(r) => (true, r),
                None => (false, full.strip_prefix("http://").unwrap_or_default()),
            };
            let (host, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, ""),
            };
            if host.is_empty() {
                return Err(bad("no host"));
            }
            (https, host.to_string(), path.to_string())
        }
    };
    let path = clean_path(&path);
    let path = if h.override_path || path.ends_with("/v2") {
        path
    } else {
        format!("{path}/v2")
    };
    let capabilities = match &h.capabilities {
        None => Capabilities::ALL,
        Some(list) if list.is_empty() => Capabilities::ALL,
        Some(list) => {
            let mut c = Capabilities {
                pull: false,
                resolve: false,
                push: false,
            };
            for cap in list {
                match cap.to_ascii_lowercase().as_str() {
                    "pull" => c.pull = true,
                    "resolve" => c.resolve = true,
                    "push" => c.push = true,
                    // berth does not use the referrers API; a host offering it is still fine.
                    "referrers" => {}
                    other => return Err(bad(&format!("unknown capability {other:?}"))),
                }
            }
            c
        }
    };
    let abs = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        }
    };
    let ca = match h.ca {
        None => Vec::new(),
        Some(OneOrMany::One(p)) => vec![abs(&p)],
        Some(OneOrMany::Many(ps)) => ps.iter().map(|p| abs(p)).collect(),
    };
    let mut client = Vec::new();
    match h.client {
        None => {}
        Some(ClientCerts::One(p)) => client.push((abs(&p), None)),
        Some(ClientCerts::Many(list)) => {
            for c in list {
                match c {
                    ClientCert::Combined(p) => client.push((abs(&p), None)),
                    ClientCert::Pair(pair) => match pair.as_slice() {
                        [cert, key] if key.is_empty() => client.push((abs(cert), None)),
                        [cert, key] => client.push((abs(cert), Some(abs(key)))),
                        _ => return Err(bad("a client pair is [certificate, key]")),
                    },
                }
            }
        }
    }
    let mut headers = Vec::new();
    for (name, value) in h.header.unwrap_or_default() {
        match value {
            toml::Value::String(v) => headers.push((name, v)),
            toml::Value::Array(vs) => {
                for v in vs {
                    let v = v
                        .as_str()
                        .ok_or_else(|| bad(&format!("header {name:?}: values are strings")))?;
                    headers.push((name.clone(), v.to_string()));
                }
            }
            _ => return Err(bad(&format!("header {name:?}: a string or strings"))),
        }
    }
    let dial_timeout = h
        .dial_timeout
        .as_deref()
        .map(|d| {
            berth_core::duration::parse_go(d).ok_or_else(|| bad(&format!("dial_timeout {d:?}")))
        })
        .transpose()?;
    Ok(HostEntry {
        https,
        host,
        path,
        capabilities,
        skip_verify: h.skip_verify,
        ca,
        client,
        headers,
        dial_timeout,
    })
}

/// `path.Clean` for URL paths: no trailing or doubled slashes, "" for the root.
fn clean_path(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("/{}", parts.join("/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_in_file_order_then_the_server() {
        let dir = Path::new("/etc/berth/certs.d/docker.io");
        let hosts = parse(
            dir,
            r#"
server = "https://registry-1.docker.io"    # upstream

[host."https://public-mirror.example.com"]
  capabilities = ["pull"]
[host."https://docker-mirror.internal"]
  capabilities = ["pull", "resolve"]
  ca = "docker-mirror.crt"
[host."http://192.168.31.250:5000"]
  capabilities = ["pull", "resolve", "push"]
  skip_verify = true
"#,
        )
        .unwrap();
        let names: Vec<&str> = hosts.mirrors.iter().map(|h| h.host.as_str()).collect();
        assert_eq!(
            names,
            [
                "public-mirror.example.com",
                "docker-mirror.internal",
                "192.168.31.250:5000"
            ]
        );
        let m = &hosts.mirrors;
        assert!(m[0].https && m[0].capabilities.pull && !m[0].capabilities.resolve);
        assert!(!m[0].capabilities.push);
        assert_eq!(m[1].ca, [dir.join("docker-mirror.crt")]);
        assert!(!m[2].https);
        assert_eq!(m[2].skip_verify, Some(true));
        assert_eq!(m[2].capabilities, Capabilities::ALL);
        assert_eq!(m[2].path, "/v2");
        let server = hosts.server;
        assert_eq!(
            (server.host.as_str(), server.https, server.path.as_str()),
            ("registry-1.docker.io", true, "/v2")
        );
        assert_eq!(server.capabilities, Capabilities::ALL);
    }

    #[test]
    fn the_order_is_the_files_not_the_alphabets() {
        let hosts = parse(
            Path::new("/x"),
            "[host.\"https://z.example\"]\n[host.\"https://a.example\"]\n[host.\"https://m.example\"]\n",
        )
        .unwrap();
        let names: Vec<&str> = hosts.mirrors.iter().map(|h| h.host.as_str()).collect();
        assert_eq!(names, ["z.example", "a.example", "m.example"]);
        assert!(
            hosts.server.host.is_empty(),
            "no server: the namespace itself"
        );
    }

    #[test]
    fn paths_ca_lists_clients_headers_and_timeouts() {
        let hosts = parse(
            Path::new("/etc/berth/certs.d/gcr.io"),
            r#"
server = "registry.example"
ca = ["/etc/certs/a.pem", "b.pem"]
client = [["/etc/certs/client.cert", "/etc/certs/client.key"], ["/etc/certs/client.pem", ""]]
dial_timeout = "1m30s"

[host."https://mirror-bak.registry/us"]
  capabilities = ["pull"]
[host."https://non-compliant.registry/v2/upstream"]
  override_path = true
  client = "/etc/certs/one.pem"
  [host."https://non-compliant.registry/v2/upstream".header]
    x-custom-1 = "one"
    x-custom-2 = ["a", "b"]
"#,
        )
        .unwrap();
        assert_eq!(hosts.mirrors[0].path, "/us/v2");
        assert_eq!(hosts.mirrors[1].path, "/v2/upstream");
        assert_eq!(
            hosts.mirrors[1].client,
            [(PathBuf::from("/etc/certs/one.pem"), None)]
        );
        assert_eq!(
            hosts.mirrors[1].headers,
            [
                ("x-custom-1".to_string(), "one".to_string()),
                ("x-custom-2".to_string(), "a".to_string()),
                ("x-custom-2".to_string(), "b".to_string())
            ]
        );
        let server = hosts.server;
        assert!(server.https, "a server without a scheme is https");
        assert_eq!(server.host, "registry.example");
        assert_eq!(
            server.ca,
            [
                PathBuf::from("/etc/certs/a.pem"),
                PathBuf::from("/etc/berth/certs.d/gcr.io/b.pem")
            ]
        );
        assert_eq!(
            server.client,
            [
                (
                    PathBuf::from("/etc/certs/client.cert"),
                    Some(PathBuf::from("/etc/certs/client.key"))
                ),
                (PathBuf::from("/etc/certs/client.pem"), None)
            ]
        );
        assert_eq!(server.dial_timeout, Some(Duration::from_secs(90)));
    }

    #[test]
    fn bad_files_are_errors_that_say_why() {
        let dir = Path::new("/x");
        let err = parse(dir, "[host.\"https://m\"]\ncapabilities = [\"fly\"]\n").unwrap_err();
        assert!(
            err.chain().contains("unknown capability \"fly\""),
            "{}",
            err.chain()
        );
        assert!(parse(dir, "server = [").is_err());
        assert!(parse(dir, "[host.\"https://m\"]\ndial_timeout = \"soon\"\n").is_err());
        assert!(
            parse(
                dir,
                "[host.\"https://m\"]\nclient = [[\"a\", \"b\", \"c\"]]\n"
            )
            .is_err()
        );
        assert!(parse(dir, "[host.\"https://\"]\n").is_err());
    }

    #[test]
    fn namespace_directories_as_containerd_looks_them_up() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(host_dir(root.path(), "registry.k8s.io"), None);
        std::fs::create_dir(root.path().join("_default")).unwrap();
        assert_eq!(
            host_dir(root.path(), "registry.k8s.io"),
            Some(root.path().join("_default"))
        );
        std::fs::create_dir(root.path().join("myreg:5000")).unwrap();
        assert_eq!(
            host_dir(root.path(), "myreg:5000"),
            Some(root.path().join("myreg:5000"))
        );
        std::fs::create_dir(root.path().join("myreg_5000_")).unwrap();
        assert_eq!(
            host_dir(root.path(), "myreg:5000"),
            Some(root.path().join("myreg_5000_"))
        );
        // A directory without a hosts.toml configures no hosts (its certificates still count).
        assert_eq!(load(root.path(), "myreg:5000").unwrap(), None);
        std::fs::write(
            root.path().join("_default/hosts.toml"),
            "server = \"http://127.0.0.1:5000\"\n",
        )
        .unwrap();
        let hosts = load(root.path(), "gcr.io").unwrap().unwrap();
        assert_eq!(hosts.server.host, "127.0.0.1:5000");
        std::fs::write(root.path().join("_default/hosts.toml"), "server = [").unwrap();
        let err = load(root.path(), "gcr.io").unwrap_err();
        assert!(
            err.chain().contains("_default/hosts.toml"),
            "{}",
            err.chain()
        );
    }

    #[test]
    fn durations() {
        assert_eq!(
            berth_core::duration::parse_go("1s"),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            berth_core::duration::parse_go("500ms"),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            berth_core::duration::parse_go("1m30s"),
            Some(Duration::from_secs(90))
        );
        assert_eq!(berth_core::duration::parse_go("x"), None);
        assert_eq!(berth_core::duration::parse_go(""), None);
    }
}
