//! A focused OCI distribution client on reqwest.
//!
//! What it adds over a generic HTTP client is what berth needs and oci-client does not give
//! control over: endpoints chosen per registry from berth's config (docker.io mirrors, insecure
//! registries with Docker's https-then-http fallback, loopback insecure by default, a per-registry
//! CA directory), credentials passed per call (anonymous, basic, bearer tokens fetched from the
//! realm the registry names, identity tokens, ready-made registry tokens), resumable blob reads
//! with `Range`, cross-repository blob mounts, and errors that keep their kind (auth →
//! `Unauthenticated`, certificates → a TLS error, missing → `NotFound`, 5xx → `Unavailable`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_core::{Digest, Error, ErrorKind, Result};
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};

use crate::hosts::{self, Capabilities, HostEntry};
use crate::oci;

mod errors;

pub use errors::{NotThere, base64, http_error, is_tls_error, not_found, retry};
use errors::{not_there, registry_error_text};

/// The host docker.io references are actually pulled from.
pub const DOCKER_HUB_HOST: &str = "registry-1.docker.io";
/// The biggest manifest berth accepts (containerd's limit).
pub const MAX_MANIFEST: usize = 4 << 20;

/// Credentials for one call, as Docker's X-Registry-Auth carries them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    pub identity_token: String,
    pub registry_token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// How berth reaches registries (from `[images]` in the config).
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    pub insecure_registries: Vec<String>,
    pub registry_mirrors: Vec<String>,
    pub certs_dir: PathBuf,
    /// containerd-style `<dir>/<host>/hosts.toml` files; empty = none.
    pub registry_config_path: PathBuf,
}

/// One place a repository can be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]` as it goes into URLs.
    pub host: String,
    /// Try https first; `false` only for http-only mirrors.
    pub https: bool,
    /// Skip certificate verification and fall back to plain http.
    pub insecure: bool,
    /// A docker.io mirror or a hosts.toml host (failures fall through to the next endpoint).
    pub mirror: bool,
    /// The API root: `/v2` unless a hosts.toml says otherwise.
    pub path: String,
    /// What the endpoint may be asked to do (a hosts.toml's `capabilities`).
    pub capabilities: Capabilities,
    /// CA files, client certificates, headers and dial timeout from a hosts.toml.
    pub extras: Extras,
    /// containerd's `ns` query parameter: the namespace a hosts.toml host stands in for, sent
    /// with every repository request to a host other than the namespace itself.
    pub ns: Option<String>,
}

/// What a hosts.toml adds to how an endpoint is reached.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Extras {
    pub ca: Vec<PathBuf>,
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    pub headers: Vec<(String, String)>,
    pub dial_timeout: Option<Duration>,
}

impl Endpoint {
    /// An endpoint as Docker reaches a registry (no hosts.toml).
    fn docker(host: String, https: bool, insecure: bool, mirror: bool) -> Self {
        Self {
            host,
            https,
            insecure,
            mirror,
            path: "/v2".into(),
            capabilities: Capabilities::ALL,
            extras: Extras::default(),
            ns: None,
        }
    }

    /// An endpoint from a hosts.toml entry: `http://` hosts are plain http, `skip_verify`
    /// skips certificate checks.
    fn from_hosts(h: &HostEntry, mirror: bool, namespace: &str) -> Self {
        let same = h.host == namespace
            || (namespace == berth_core::reference::DEFAULT_DOMAIN && h.host == DOCKER_HUB_HOST);
        Self {
            host: h.host.clone(),
            https: h.https,
            insecure: h.skip_verify == Some(true),
            mirror,
            path: h.path.clone(),
            capabilities: h.capabilities,
            extras: extras(h),
            ns: (!same).then(|| namespace.to_string()),
        }
    }
}

fn extras(h: &HostEntry) -> Extras {
    Extras {
        ca: h.ca.clone(),
        client: h.client.clone(),
        headers: h.headers.clone(),
        dial_timeout: h.dial_timeout,
    }
}

/// An HTTP client and the certificate files (with their mtimes) it was built from.
type CachedClient = (Vec<(PathBuf, std::time::SystemTime)>, reqwest::Client);
/// What a client is built for: host, skip verification, hosts.toml extras.
type ClientKey = (String, bool, Extras);

/// Registry access shared by all operations: endpoint selection and HTTP clients.
#[derive(Debug)]
pub struct Registries {
    cfg: RegistryConfig,
    clients: Mutex<HashMap<ClientKey, CachedClient>>,
}

impl Registries {
    pub fn new(cfg: RegistryConfig) -> Self {
        // reqwest is built without a default crypto provider (ring is the one berth uses).
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            cfg,
            clients: Mutex::default(),
        }
    }

    /// Where to reach `domain` (a reference's registry), in the order to try: the hosts of its
    /// hosts.toml (for a push only those with the push capability), Docker's registry mirrors
    /// (docker.io pulls), then the hosts.toml's `server` or the registry itself.
    pub async fn endpoints(&self, domain: &str, push: bool) -> Result<Vec<Endpoint>> {
        let configured = if self.cfg.registry_config_path.as_os_str().is_empty() {
            None
        } else {
            hosts::load(&self.cfg.registry_config_path, domain)?
        };
        let mut out = Vec::new();
        if let Some(h) = &configured {
            for m in &h.mirrors {
                let able = if push {
                    m.capabilities.push
                } else {
                    m.capabilities.pull
                };
                if able {
                    out.push(Endpoint::from_hosts(m, true, domain));
                }
            }
        }
        if domain == berth_core::reference::DEFAULT_DOMAIN && !push {
            for m in &self.cfg.registry_mirrors {
                let (https, rest) = if let Some(r) = m.strip_prefix("https://") {
                    (true, r)
                } else if let Some(r) = m.strip_prefix("http://") {
                    (false, r)
                } else {
                    (true, m.as_str())
                };
                let host = rest.trim_end_matches('/').to_string();
                if host.is_empty() || host.contains('/') {
                    tracing::warn!(mirror = %m, "registry mirror with a path is not supported; skipped");
                    continue;
                }
                let insecure = self.is_insecure(&host).await;
                out.push(Endpoint::docker(host, https, insecure, true));
            }
        }
        match configured.map(|h| h.server) {
            Some(server) if !server.host.is_empty() => {
                out.push(Endpoint::from_hosts(&server, false, domain));
            }
            settings => {
                let mut upstream = if domain == berth_core::reference::DEFAULT_DOMAIN {
                    Endpoint::docker(DOCKER_HUB_HOST.into(), true, false, false)
                } else {
                    let insecure = self.is_insecure(domain).await;
                    Endpoint::docker(domain.into(), true, insecure, false)
                };
                // Top-level settings of a hosts.toml without `server` apply to the registry.
                if let Some(settings) = settings {
                    upstream.insecure |= settings.skip_verify == Some(true);
                    upstream.capabilities = settings.capabilities;
                    upstream.extras = extras(&settings);
                }
                out.push(upstream);
            }
        }
        Ok(out)
    }

    /// Whether `host` (`host[:port]`) is an insecure registry: listed in the config (by
    /// `host:port`, host, or a CIDR containing one of its addresses), or in 127.0.0.0/8 as
    /// Docker assumes.
    pub async fn is_insecure(&self, host: &str) -> bool {
        let (name, _port) = split_host_port(host);
        if self.cfg.insecure_registries.iter().any(|r| {
            let r = r
                .trim_start_matches("http://")
                .trim_start_matches("https://")
                .trim_end_matches('/');
            r == host || r == name
        }) {
            return true;
        }
        let addrs: Vec<IpAddr> = match name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => vec![ip],
            Err(_) => match tokio::net::lookup_host((name, 0)).await {
                Ok(it) => it.map(|a| a.ip()).collect(),
                Err(_) => Vec::new(),
            },
        };
        let mut cidrs: Vec<(IpAddr, u8)> = vec![(IpAddr::from([127, 0, 0, 0]), 8)];
        cidrs.extend(
            self.cfg
                .insecure_registries
                .iter()
                .filter_map(|c| parse_cidr(c)),
        );
        addrs.iter().any(|a| {
            cidrs
                .iter()
                .any(|(net, bits)| cidr_contains(*net, *bits, *a))
        })
    }

    fn client(&self, host: &str, insecure: bool, extras: &Extras) -> Result<reqwest::Client> {
        // `[::1]:5000` may also be spelled without brackets in a certs.d directory name.
        let dirs = [
            self.cfg.certs_dir.join(host),
            self.cfg.certs_dir.join(host.replace(['[', ']'], "")),
        ];
        let mut files: Vec<(PathBuf, std::time::SystemTime)> = Vec::new();
        for d in dirs.iter() {
            if let Ok(rd) = std::fs::read_dir(d) {
                for e in rd.flatten() {
                    let p = e.path();
                    let mtime = e
                        .metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or(std::time::UNIX_EPOCH);
                    if !files.iter().any(|(f, _)| *f == p) {
                        files.push((p, mtime));
                    }
                }
            }
        }
        files.sort();
        for p in extras.ca.iter().chain(
            extras
                .client
                .iter()
                .flat_map(|(c, k)| std::iter::once(c).chain(k)),
        ) {
            let mtime = std::fs::metadata(p)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            files.push((p.clone(), mtime));
        }
        let key = (host.to_string(), insecure, extras.clone());
        if let Some((f, c)) = self.clients.lock().unwrap().get(&key)
            && *f == files
        {
            return Ok(c.clone());
        }
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::limited(10))
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")));
        let mut roots = Vec::new();
        for (path, _) in &files {
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext == "crt" {
                let pem = std::fs::read(path).map_err(|e| {
                    Error::internal(format!("read {}", path.display())).with_source(e)
                })?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    Error::invalid_argument(format!("CA certificate {}", path.display()))
                        .with_source(e)
                })?;
                roots.extend(certs);
            } else if ext == "cert" {
                // Docker's client certificate pair: NAME.cert + NAME.key.
                let key = path.with_extension("key");
                if let (Ok(mut cert), Ok(k)) = (std::fs::read(path), std::fs::read(&key)) {
                    cert.extend_from_slice(b"\n");
                    cert.extend_from_slice(&k);
                    let id = reqwest::Identity::from_pem(&cert).map_err(|e| {
                        Error::invalid_argument(format!("client certificate {}", path.display()))
                            .with_source(e)
                    })?;
                    b = b.identity(id);
                }
            }
        }
        for path in &extras.ca {
            let pem = std::fs::read(path)
                .map_err(|e| Error::internal(format!("read {}", path.display())).with_source(e))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                Error::invalid_argument(format!("CA certificate {}", path.display())).with_source(e)
            })?;
            roots.extend(certs);
        }
        for (cert, key) in &extras.client {
            let mut pem = std::fs::read(cert)
                .map_err(|e| Error::internal(format!("read {}", cert.display())).with_source(e))?;
            if let Some(key) = key {
                let k = std::fs::read(key).map_err(|e| {
                    Error::internal(format!("read {}", key.display())).with_source(e)
                })?;
                pem.extend_from_slice(b"\n");
                pem.extend_from_slice(&k);
            }
            let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
                Error::invalid_argument(format!("client certificate {}", cert.display()))
                    .with_source(e)
            })?;
            b = b.identity(id);
        }
        if !extras.headers.is_empty() {
            let mut headers = HeaderMap::new();
            for (name, value) in &extras.headers {
                let name =
                    reqwest::header::HeaderName::from_bytes(name.as_bytes()).map_err(|e| {
                        Error::invalid_argument(format!("header name {name:?}")).with_source(e)
                    })?;
                let value = HeaderValue::from_str(value).map_err(|e| {
                    Error::invalid_argument(format!("header value for {name}")).with_source(e)
                })?;
                headers.append(name, value);
            }
            b = b.default_headers(headers);
        }
        if let Some(t) = extras.dial_timeout {
            b = b.connect_timeout(t);
        }
        if !roots.is_empty() {
            b = b.tls_certs_merge(roots);
        }
        if insecure {
            b = b.tls_danger_accept_invalid_certs(true);
        }
        let client = b
            .build()
            .map_err(|e| Error::internal("build http client").with_source(e))?;
        self.clients
            .lock()
            .unwrap()
            .insert(key, (files, client.clone()));
        Ok(client)
    }

    /// Connects to repository `path` of registry `domain`: picks the first endpoint that
    /// answers `/v2/`. `push` asks for push access (and skips mirrors).
    pub async fn repository(
        &self,
        domain: &str,
        path: &str,
        creds: &Credentials,
        push: bool,
    ) -> Result<Repository> {
        let endpoints = self.endpoints(domain, push).await?;
        let mut last_err = None;
        for ep in endpoints {
            match self.connect(&ep, domain, path, creds, push).await {
                Ok(repo) => return Ok(repo),
                Err(err) if ep.mirror => {
                    tracing::warn!(mirror = %ep.host, error = %err.chain(), "registry mirror failed; trying the next endpoint");
                    last_err = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::internal("no registry endpoint")))
    }

    /// Connects to repository `path` of `domain` and fetches manifest `reference` (a tag or
    /// digest), trying the endpoints in order: a mirror that fails in any way (down, or without
    /// the manifest) falls through to the next endpoint and finally to the registry itself, as
    /// Docker's pull does. Returns the repository the manifest came from, for the blobs.
    pub async fn resolve(
        &self,
        domain: &str,
        path: &str,
        creds: &Credentials,
        reference: &str,
    ) -> Result<(Repository, FetchedManifest)> {
        let endpoints = self.endpoints(domain, false).await?;
        // Only hosts trusted to resolve turn a tag into a manifest; any puller serves digests.
        let by_digest = reference.contains(':');
        let mut last_err = None;
        for ep in endpoints
            .into_iter()
            .filter(|ep| by_digest || ep.capabilities.resolve)
        {
            let fetched = match self.connect(&ep, domain, path, creds, false).await {
                Ok(repo) => match repo.get_manifest(reference).await {
                    Ok(manifest) => Ok((repo, manifest)),
                    // Registries answer MANIFEST_UNKNOWN for a repository they do not have as
                    // well as for a tag it does not have; the repository's tag list tells the
                    // two apart, as users (and clients matching Docker's wording) need.
                    Err(err) if NotThere::of(&err) == Some(NotThere::ManifestUnknown) => {
                        match repo.check_exists().await {
                            Err(gone) if NotThere::of(&gone) == Some(NotThere::NameUnknown) => {
                                Err(gone)
                            }
                            _ => Err(err),
                        }
                    }
                    Err(err) => Err(err),
                },
                Err(err) => Err(err),
            };
            match fetched {
                Ok(found) => return Ok(found),
                Err(err) if ep.mirror => {
                    tracing::warn!(mirror = %ep.host, error = %err.chain(), "registry mirror failed; trying the next endpoint");
                    last_err = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::internal("no registry endpoint")))
    }

    async fn connect(
        &self,
        ep: &Endpoint,
        domain: &str,
        path: &str,
        creds: &Credentials,
        push: bool,
    ) -> Result<Repository> {
        let mut schemes: Vec<&str> = Vec::new();
        if ep.https {
            schemes.push("https");
        }
        if !ep.https || ep.insecure {
            schemes.push("http");
        }
        let client = self.client(&ep.host, ep.insecure, &ep.extras)?;
        let mut first_err = None;
        for scheme in schemes {
            let base = format!("{scheme}://{}", ep.host);
            let root = format!("{base}{}", ep.path);
            match client.get(format!("{root}/")).send().await {
                Ok(resp) => {
                    let challenge = if resp.status() == StatusCode::UNAUTHORIZED {
                        resp.headers()
                            .get(reqwest::header::WWW_AUTHENTICATE)
                            .and_then(|v| v.to_str().ok())
                            .and_then(Challenge::parse)
                    } else {
                        None
                    };
                    let mut scopes = vec![format!("repository:{path}:pull")];
                    if push {
                        scopes[0] = format!("repository:{path}:pull,push");
                    }
                    let repo = Repository {
                        client: client.clone(),
                        base,
                        root,
                        domain: domain.to_string(),
                        name: path.to_string(),
                        creds: creds.clone(),
                        auth: Arc::new(tokio::sync::Mutex::new(AuthState {
                            challenge,
                            header: None,
                        })),
                        scopes,
                        ns: ep.ns.clone(),
                    };
                    return Ok(repo);
                }
                Err(e) => {
                    let err = http_error(e, &format!("{scheme}://{}{}/", ep.host, ep.path));
                    tracing::debug!(endpoint = %ep.host, scheme, error = %err.chain(), "registry ping failed");
                    if first_err.is_none() {
                        first_err = Some(err);
                    }
                }
            }
        }
        Err(first_err.unwrap_or_else(|| Error::internal("no scheme to try")))
    }
}

/// `host:port` → (`host`, `port`), with `[v6]` brackets kept on the host.
fn split_host_port(host: &str) -> (&str, Option<&str>) {
    if host.starts_with('[') {
        match host.find(']') {
            Some(i) => (&host[..=i], host[i + 1..].strip_prefix(':')),
            None => (host, None),
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            _ => (host, None),
        }
    }
}

fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, bits) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let bits: u8 = bits.parse().ok()?;
    Some((ip, bits))
}

fn cidr_contains(net: IpAddr, bits: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let bits = bits.min(32) as u32;
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            (u32::from(n) & mask) == (u32::from(a) & mask)
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let bits = bits.min(128) as u32;
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            (u128::from(n) & mask) == (u128::from(a) & mask)
        }
        _ => false,
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: String,
        scope: String,
    },
}

impl Challenge {
    /// Parses the first challenge berth can answer.
    pub fn parse(header: &str) -> Option<Self> {
        let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
        let params = parse_params(rest);
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => Some(Self::Basic),
            "bearer" => Some(Self::Bearer {
                realm: params.get("realm")?.clone(),
                service: params.get("service").cloned().unwrap_or_default(),
                scope: params.get("scope").cloned().unwrap_or_default(),
            }),
            _ => None,
        }
    }
}

fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b',' || b[i] == b' ') {
            i += 1;
        }
        let ks = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' {
            i += 1;
        }
        let key = s[ks..i].trim().to_ascii_lowercase();
        if i >= b.len() || b[i] != b'=' {
            continue;
        }
        i += 1;
        let mut val = String::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                val.push(b[i] as char);
                i += 1;
            }
            i += 1;
        } else {
            let vs = i;
            while i < b.len() && b[i] != b',' {
                i += 1;
            }
            val = s[vs..i].trim().to_string();
        }
        out.insert(key, val);
    }
    out
}

#[derive(Debug)]
struct AuthState {
    challenge: Option<Challenge>,
    header: Option<String>,
}

/// One repository on one endpoint, with its credentials and auth state.
#[derive(Debug, Clone)]
pub struct Repository {
    client: reqwest::Client,
    base: String,
    /// `base` and the API root (`/v2`).
    root: String,
    domain: String,
    name: String,
    creds: Credentials,
    auth: Arc<tokio::sync::Mutex<AuthState>>,
    scopes: Vec<String>,
    /// Added to every request as `ns=` (see [`Endpoint::ns`]).
    ns: Option<String>,
}

/// A fetched manifest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub data: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
}

/// What a cross-repository mount did.
#[derive(Debug)]
pub enum MountResult {
    Mounted,
    /// Not mounted; upload to this location instead.
    Upload(String),
}

impl Repository {
    /// `scheme://host` of the endpoint in use.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The repository path.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Also asks for pull access to `repo` in token requests (for cross-repository mounts).
    pub fn add_scope(&mut self, scope: String) {
        if !self.scopes.contains(&scope) {
            self.scopes.push(scope);
            self.auth = Arc::new(tokio::sync::Mutex::new(AuthState {
                challenge: None,
                header: None,
            }));
        }
    }

    fn url(&self, rest: &str) -> String {
        let url = format!("{}/{}/{rest}", self.root, self.name);
        match &self.ns {
            None => url,
            Some(ns) => {
                let sep = if rest.contains('?') { '&' } else { '?' };
                let ns: String = form_urlencoded::byte_serialize(ns.as_bytes()).collect();
                format!("{url}{sep}ns={ns}")
            }
        }
    }

    /// Sends a request built by `build`, answering an auth challenge once.
    async fn send(
        &self,
        build: &(dyn Fn() -> reqwest::RequestBuilder + Sync),
    ) -> Result<reqwest::Response> {
        let header = self.authorization(false).await?;
        let resp = self.do_send(build, header.as_deref()).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(Challenge::parse);
        {
            let mut st = self.auth.lock().await;
            if challenge.is_some() {
                st.challenge = challenge;
            }
            st.header = None;
        }
        let header = self.authorization(true).await?;
        let resp = self.do_send(build, header.as_deref()).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(self.status_error(resp, "").await);
        }
        Ok(resp)
    }

    async fn do_send(
        &self,
        build: &(dyn Fn() -> reqwest::RequestBuilder + Sync),
        header: Option<&str>,
    ) -> Result<reqwest::Response> {
        let mut rb = build();
        if let Some(h) = header {
            rb = rb.header(reqwest::header::AUTHORIZATION, h);
        }
        rb.send().await.map_err(|e| http_error(e, &self.base))
    }

    /// The Authorization header for the current challenge (fetching a token if needed).
    async fn authorization(&self, after_401: bool) -> Result<Option<String>> {
        let mut st = self.auth.lock().await;
        if let Some(h) = &st.header {
            return Ok(Some(h.clone()));
        }
        let Some(challenge) = st.challenge.clone() else {
            if after_401 {
                return Err(Error::unauthenticated(format!(
                    "{}: authentication required and no supported challenge was offered",
                    self.domain
                )));
            }
            return Ok(None);
        };
        let c = &self.creds;
        let header = match challenge {
            Challenge::Basic => {
                if c.username.is_empty() {
                    return Err(Error::unauthenticated(format!(
                        "{}: authentication required (no credentials given)",
                        self.domain
                    )));
                }
                format!(
                    "Basic {}",
                    base64(format!("{}:{}", c.username, c.password).as_bytes())
                )
            }
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                if !c.registry_token.is_empty() {
                    format!("Bearer {}", c.registry_token)
                } else {
                    let token = self.fetch_token(&realm, &service, &scope).await?;
                    format!("Bearer {token}")
                }
            }
        };
        st.header = Some(header.clone());
        Ok(Some(header))
    }

    async fn fetch_token(&self, realm: &str, service: &str, extra_scope: &str) -> Result<String> {
        let mut url = reqwest::Url::parse(realm).map_err(|e| {
            Error::internal(format!("{}: bad token realm {realm:?}", self.domain)).with_source(e)
        })?;
        let mut scopes = self.scopes.clone();
        for s in extra_scope.split(' ').filter(|s| !s.is_empty()) {
            if !scopes.iter().any(|x| x == s) {
                scopes.push(s.to_string());
            }
        }
        let c = &self.creds;
        let resp = if !c.identity_token.is_empty() {
            // OAuth2 refresh token grant, as Docker does for identity tokens.
            let mut form = reqwest::Url::parse("http://form/").expect("static url");
            {
                let mut q = form.query_pairs_mut();
                q.append_pair("grant_type", "refresh_token");
                q.append_pair("refresh_token", &c.identity_token);
                q.append_pair("service", service);
                q.append_pair("client_id", "berth");
                q.append_pair("scope", &scopes.join(" "));
            }
            let body = form.query().unwrap_or_default().to_string();
            self.client
                .post(url.clone())
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(body)
                .send()
                .await
        } else {
            {
                let mut q = url.query_pairs_mut();
                if !service.is_empty() {
                    q.append_pair("service", service);
                }
                for s in &scopes {
                    q.append_pair("scope", s);
                }
            }
            let mut rb = self.client.get(url.clone());
            if !c.username.is_empty() {
                rb = rb.basic_auth(&c.username, Some(&c.password));
            }
            rb.send().await
        }
        .map_err(|e| http_error(e, realm))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(Error::unauthenticated(format!(
                "{}: the token server refused the credentials ({status})",
                self.domain
            )));
        }
        if !status.is_success() {
            return Err(Error::unavailable(format!(
                "{}: token server answered {status}",
                self.domain
            )));
        }
        #[derive(serde::Deserialize)]
        struct Token {
            #[serde(default)]
            token: String,
            #[serde(default)]
            access_token: String,
        }
        let body = resp.bytes().await.map_err(|e| http_error(e, realm))?;
        let t: Token = serde_json::from_slice(&body).map_err(|e| {
            Error::unavailable(format!("{}: bad token response", self.domain)).with_source(e)
        })?;
        let token = if t.token.is_empty() {
            t.access_token
        } else {
            t.token
        };
        if token.is_empty() {
            return Err(Error::unauthenticated(format!(
                "{}: the token server returned no token",
                self.domain
            )));
        }
        Ok(token)
    }

    /// An error for a non-success response, with the registry's own error text. The codes that
    /// mean "nothing there for you" (`DENIED`, `NAME_UNKNOWN`, `MANIFEST_UNKNOWN`) become just
    /// the registry's text (`manifest unknown: manifest unknown`), which callers wrap in their
    /// own context as Docker does (see [`not_found`]).
    async fn status_error(&self, resp: reqwest::Response, what: &str) -> Error {
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        if let Some(err) = not_there(status, &body) {
            return err;
        }
        let detail = registry_error_text(&body);
        let what = if what.is_empty() {
            String::new()
        } else {
            format!("{what}: ")
        };
        let msg = format!(
            "{}{what}{status}{}",
            format_args!("{}/{}: ", self.domain, self.name),
            detail
        );
        let kind = match status {
            StatusCode::UNAUTHORIZED => ErrorKind::Unauthenticated,
            StatusCode::FORBIDDEN => ErrorKind::PermissionDenied,
            StatusCode::NOT_FOUND => ErrorKind::NotFound,
            StatusCode::TOO_MANY_REQUESTS => ErrorKind::Unavailable,
            s if s.is_server_error() => ErrorKind::Unavailable,
            StatusCode::BAD_REQUEST | StatusCode::METHOD_NOT_ALLOWED => ErrorKind::InvalidArgument,
            _ => ErrorKind::Internal,
        };
        Error::new(kind, msg)
    }

    /// `Ok` when the registry knows the repository (its tag list answers), else its error.
    pub async fn check_exists(&self) -> Result<()> {
        let url = self.url("tags/list?n=1");
        let resp = self.send(&|| self.client.get(&url)).await?;
        if resp.status().is_success() {
            return Ok(());
        }
        Err(self.status_error(resp, "tags").await)
    }

    /// GETs a manifest by tag or digest. A digest reference is checked against the bytes.
    pub async fn get_manifest(&self, reference: &str) -> Result<FetchedManifest> {
        let url = self.url(&format!("manifests/{reference}"));
        let resp = retry(3, || async {
            let resp = self
                .send(&|| {
                    self.client
                        .get(&url)
                        .header(reqwest::header::ACCEPT, oci::MANIFEST_ACCEPT)
                })
                .await?;
            if !resp.status().is_success() {
                return Err(self
                    .status_error(resp, &format!("manifest {reference}"))
                    .await);
            }
            Ok(resp)
        })
        .await?;
        let header_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        if let Some(len) = resp.content_length()
            && len as usize > MAX_MANIFEST
        {
            return Err(Error::invalid_argument(format!(
                "manifest {reference} is too large ({len} bytes)"
            )));
        }
        let data = resp
            .bytes()
            .await
            .map_err(|e| http_error(e, &url))?
            .to_vec();
        if data.len() > MAX_MANIFEST {
            return Err(Error::invalid_argument(format!(
                "manifest {reference} is too large"
            )));
        }
        let digest = Digest::sha256_of(&data);
        if let Ok(want) = reference.parse::<Digest>()
            && want != digest
        {
            return Err(
                crate::content::mismatch(&want, &digest).with_source(Error::internal(format!(
                    "manifest {reference} from {}",
                    self.domain
                ))),
            );
        }
        let media_type = match header_type.as_str() {
            "" | "application/json" | "text/plain" | "application/octet-stream" => {
                oci::sniff_media_type(&data).unwrap_or(header_type)
            }
            _ => header_type,
        };
        Ok(FetchedManifest {
            data,
            media_type,
            digest,
        })
    }

    /// GETs a blob from byte `offset`. Returns the response and whether it starts at `offset`
    /// (`false`: the registry ignored the range and sends everything).
    pub async fn get_blob(
        &self,
        digest: &Digest,
        offset: u64,
    ) -> Result<(reqwest::Response, bool)> {
        let url = self.url(&format!("blobs/{digest}"));
        let resp = self
            .send(&|| {
                let rb = self.client.get(&url);
                if offset > 0 {
                    rb.header(reqwest::header::RANGE, format!("bytes={offset}-"))
                } else {
                    rb
                }
            })
            .await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => Ok((resp, true)),
            s if s.is_success() => Ok((resp, offset == 0)),
            StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
                // What we have is already all (or more than) there is: start over.
                Box::pin(self.get_blob(digest, 0)).await
            }
            _ => Err(self.status_error(resp, &format!("blob {digest}")).await),
        }
    }

    /// Reads a small blob (a config) whole, verified.
    pub async fn get_small_blob(&self, digest: &Digest, limit: usize) -> Result<Vec<u8>> {
        let data = retry(3, || async {
            let (resp, _) = self.get_blob(digest, 0).await?;
            let data = resp.bytes().await.map_err(|e| http_error(e, &self.base))?;
            Ok(data)
        })
        .await?;
        if data.len() > limit {
            return Err(Error::invalid_argument(format!(
                "blob {digest} is larger than {limit} bytes"
            )));
        }
        let got = Digest::sha256_of(&data);
        if got != *digest {
            return Err(crate::content::mismatch(digest, &got));
        }
        Ok(data.to_vec())
    }

    /// Whether the registry has the blob.
    pub async fn has_blob(&self, digest: &Digest) -> Result<bool> {
        let url = self.url(&format!("blobs/{digest}"));
        let resp = self.send(&|| self.client.head(&url)).await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.status_error(resp, &format!("blob {digest}")).await),
        }
    }

    /// Starts an upload, mounting `digest` from repository `from` when given.
    pub async fn start_upload(&self, mount: Option<(&Digest, &str)>) -> Result<MountResult> {
        let url = match mount {
            Some((d, from)) => {
                let mut u = reqwest::Url::parse(&self.url("blobs/uploads/"))
                    .map_err(|e| Error::internal("upload url").with_source(e))?;
                u.query_pairs_mut()
                    .append_pair("mount", d.as_str())
                    .append_pair("from", from);
                u.to_string()
            }
            None => self.url("blobs/uploads/"),
        };
        let resp = self
            .send(&|| {
                self.client
                    .post(&url)
                    .header(reqwest::header::CONTENT_LENGTH, "0")
            })
            .await?;
        match resp.status() {
            StatusCode::CREATED if mount.is_some() => Ok(MountResult::Mounted),
            StatusCode::ACCEPTED | StatusCode::CREATED => {
                let loc = self.location(resp.headers())?;
                Ok(MountResult::Upload(loc))
            }
            _ => Err(self.status_error(resp, "start upload").await),
        }
    }

    fn location(&self, headers: &HeaderMap<HeaderValue>) -> Result<String> {
        let loc = headers
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Error::internal(format!("{}: upload without a Location", self.domain))
            })?;
        let base = reqwest::Url::parse(&format!("{}/", self.base))
            .map_err(|e| Error::internal("base url").with_source(e))?;
        let url = base
            .join(loc)
            .map_err(|e| Error::internal("upload location").with_source(e))?;
        Ok(url.to_string())
    }

    /// Finishes an upload with the whole blob as one PUT.
    pub async fn put_blob(
        &self,
        location: &str,
        digest: &Digest,
        size: u64,
        body: impl Fn() -> reqwest::Body + Sync,
    ) -> Result<()> {
        let mut u = reqwest::Url::parse(location)
            .map_err(|e| Error::internal("upload url").with_source(e))?;
        u.query_pairs_mut().append_pair("digest", digest.as_str());
        let u = u.to_string();
        let resp = self
            .send(&|| {
                self.client
                    .put(&u)
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .header(reqwest::header::CONTENT_LENGTH, size.to_string())
                    .body(body())
            })
            .await?;
        if !resp.status().is_success() {
            return Err(self
                .status_error(resp, &format!("upload blob {digest}"))
                .await);
        }
        Ok(())
    }

    /// PUTs a manifest under `reference` (a tag or its digest); returns the digest the registry
    /// reports (or the bytes' own).
    pub async fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        data: &[u8],
    ) -> Result<Digest> {
        let url = self.url(&format!("manifests/{reference}"));
        let data = bytes::Bytes::copy_from_slice(data);
        let resp = self
            .send(&|| {
                self.client
                    .request(Method::PUT, &url)
                    .header(reqwest::header::CONTENT_TYPE, media_type)
                    .body(data.clone())
            })
            .await?;
        if !resp.status().is_success() {
            return Err(self
                .status_error(resp, &format!("put manifest {reference}"))
                .await);
        }
        Ok(Digest::sha256_of(&data))
    }
}

/// The certs.d directory for a registry host.
pub fn certs_dir_for(root: &Path, host: &str) -> PathBuf {
    root.join(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            Challenge::parse(r#"Basic realm="berth-test""#),
            Some(Challenge::Basic)
        );
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: "registry.docker.io".into(),
                scope: "repository:library/busybox:pull".into()
            }
        );
        assert_eq!(Challenge::parse("Negotiate abc"), None);
        assert_eq!(Challenge::parse("Bearer service=x"), None);
    }

    #[tokio::test]
    async fn insecure_registries_as_docker() {
        let r = Registries::new(RegistryConfig {
            insecure_registries: vec!["myreg:5000".into(), "10.1.0.0/16".into()],
            ..Default::default()
        });
        assert!(r.is_insecure("127.0.0.1:5000").await);
        assert!(r.is_insecure("127.3.2.1").await);
        assert!(r.is_insecure("localhost:5000").await);
        assert!(r.is_insecure("myreg:5000").await);
        assert!(r.is_insecure("10.1.2.3:443").await);
        assert!(!r.is_insecure("10.2.0.1:443").await);
        assert!(
            !r.is_insecure("[::1]:5000").await,
            "Docker's default is 127.0.0.0/8 only"
        );
        let eps = r.endpoints("docker.io", false).await.unwrap();
        assert_eq!(eps.last().unwrap().host, DOCKER_HUB_HOST);
    }

    #[tokio::test]
    async fn mirrors_come_first_for_docker_hub_pulls_only() {
        let r = Registries::new(RegistryConfig {
            registry_mirrors: vec![
                "http://127.0.0.1:5001/".into(),
                "https://mirror.example".into(),
            ],
            ..Default::default()
        });
        let eps = r.endpoints("docker.io", false).await.unwrap();
        assert_eq!(eps.len(), 3);
        assert_eq!(
            eps[0],
            Endpoint::docker("127.0.0.1:5001".into(), false, true, true)
        );
        assert!(eps[1].https && eps[1].mirror);
        assert_eq!(r.endpoints("docker.io", true).await.unwrap().len(), 1);
        assert_eq!(r.endpoints("quay.io", false).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn hosts_toml_hosts_come_first_then_the_server() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("registry.k8s.io");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("hosts.toml"),
            r#"
server = "https://upstream.example"
[host."http://127.0.0.1:5000"]
  capabilities = ["pull", "resolve"]
[host."https://pull-only.example/mirror"]
  capabilities = ["pull"]
  skip_verify = true
"#,
        )
        .unwrap();
        let hub = root.path().join("docker.io");
        std::fs::create_dir(&hub).unwrap();
        std::fs::write(hub.join("hosts.toml"), "[host.\"http://127.0.0.1:5002\"]\n").unwrap();
        let r = Registries::new(RegistryConfig {
            registry_mirrors: vec!["http://127.0.0.1:5001".into()],
            registry_config_path: root.path().to_path_buf(),
            ..Default::default()
        });
        let eps = r.endpoints("registry.k8s.io", false).await.unwrap();
        let hosts: Vec<(&str, bool, bool, &str)> = eps
            .iter()
            .map(|e| (e.host.as_str(), e.https, e.mirror, e.path.as_str()))
            .collect();
        assert_eq!(
            hosts,
            [
                ("127.0.0.1:5000", false, true, "/v2"),
                ("pull-only.example", true, true, "/mirror/v2"),
                ("upstream.example", true, false, "/v2"),
            ]
        );
        assert!(eps[1].insecure && !eps[1].capabilities.resolve);
        // Hosts other than the namespace hear which namespace they stand in for.
        assert_eq!(eps[0].ns.as_deref(), Some("registry.k8s.io"));
        assert_eq!(eps[2].ns.as_deref(), Some("registry.k8s.io"));
        // A push goes only to hosts that may take one: here the server.
        let eps = r.endpoints("registry.k8s.io", true).await.unwrap();
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].host, "upstream.example");
        // docker.io: hosts.toml hosts, then Docker's registry-mirrors, then Docker Hub.
        let eps = r.endpoints("docker.io", false).await.unwrap();
        let hosts: Vec<&str> = eps.iter().map(|e| e.host.as_str()).collect();
        assert_eq!(hosts, ["127.0.0.1:5002", "127.0.0.1:5001", DOCKER_HUB_HOST]);
        // Top-level settings without a server apply to the registry itself.
        let own = root.path().join("own.example");
        std::fs::create_dir(&own).unwrap();
        std::fs::write(
            own.join("hosts.toml"),
            "skip_verify = true\nca = \"ca.crt\"\n",
        )
        .unwrap();
        let eps = r.endpoints("own.example", false).await.unwrap();
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].host, "own.example");
        assert!(eps[0].insecure && eps[0].https && !eps[0].mirror);
        assert_eq!(eps[0].extras.ca, [own.join("ca.crt")]);
        // Without a hosts.toml, nothing changes.
        let eps = r.endpoints("quay.io", false).await.unwrap();
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].host, "quay.io");
        std::fs::write(dir.join("hosts.toml"), "server = [").unwrap();
        let err = r.endpoints("registry.k8s.io", false).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn host_ports_and_cidrs() {
        assert_eq!(split_host_port("a:5000"), ("a", Some("5000")));
        assert_eq!(split_host_port("[::1]:5000"), ("[::1]", Some("5000")));
        assert_eq!(split_host_port("a"), ("a", None));
        let (n, b) = parse_cidr("10.0.0.0/8").unwrap();
        assert!(cidr_contains(n, b, "10.9.9.9".parse().unwrap()));
        assert!(!cidr_contains(n, b, "11.0.0.1".parse().unwrap()));
    }
}
