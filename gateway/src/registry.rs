//! `POST /auth`: credentials checked against the registry itself.
//!
//! berth-images has no login call, so the gateway performs the check Docker's daemon performs:
//! `GET /v2/` on the registry, then Basic credentials or the Bearer token flow its challenge
//! asks for. Nothing is stored: the CLI keeps the credentials and sends them with each pull and
//! push (`X-Registry-Auth`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use berth_core::config::ImagesConfig;
use berth_core::{Error, Result};
use berth_proto::berth::types::v1::RegistryAuth;

use crate::backend::LoginResult;

/// Docker Hub's login address, which stands for `registry-1.docker.io`.
pub const DOCKER_HUB_INDEX: &str = "https://index.docker.io/v1/";

/// Checks logins against registries, honouring insecure registries and per-registry CAs.
#[derive(Debug, Clone)]
pub struct RegistryChecker {
    insecure: Vec<String>,
    certs_dir: PathBuf,
}

/// The registry host a login address names: `https://host:5000/v2/` → `host:5000`.
pub fn registry_host(server: &str) -> String {
    let s = server.trim();
    if s.is_empty()
        || s == DOCKER_HUB_INDEX
        || s.trim_end_matches('/') == "https://index.docker.io/v1"
    {
        return "registry-1.docker.io".into();
    }
    let s = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .unwrap_or(s);
    let host = s.split('/').next().unwrap_or(s);
    match host {
        "docker.io" | "index.docker.io" => "registry-1.docker.io".into(),
        h => h.to_string(),
    }
}

fn is_loopback(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Parses a `WWW-Authenticate` challenge: the scheme and its parameters.
pub fn parse_challenge(header: &str) -> (String, BTreeMap<String, String>) {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = BTreeMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => (&quoted[..end], &quoted[end + 1..]),
                None => (quoted, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        params.insert(key, value.to_string());
        rest = tail.trim_start_matches([',', ' ']);
    }
    (scheme.to_ascii_lowercase(), params)
}

impl RegistryChecker {
    /// A checker using the images service's registry settings.
    pub fn new(config: &ImagesConfig) -> Self {
        Self {
            insecure: config.insecure_registries.clone(),
            certs_dir: config.certs_dir.clone(),
        }
    }

    fn insecure(&self, host: &str) -> bool {
        is_loopback(host) || self.insecure.iter().any(|r| r == host)
    }

    fn client(&self, host: &str, insecure: bool) -> Result<reqwest::Client> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .danger_accept_invalid_certs(insecure);
        if let Ok(dir) = std::fs::read_dir(self.certs_dir.join(host)) {
            for entry in dir.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "crt")
                    && let Ok(pem) = std::fs::read(&path)
                    && let Ok(cert) = reqwest::Certificate::from_pem(&pem)
                {
                    builder = builder.add_root_certificate(cert);
                }
            }
        }
        builder
            .build()
            .map_err(|e| Error::internal("build registry client").with_source(e))
    }

    /// Logs in: succeeds when the registry accepts `auth`.
    pub async fn login(&self, auth: &RegistryAuth) -> Result<LoginResult> {
        let host = registry_host(&auth.server_address);
        let insecure = self.insecure(&host);
        let client = self.client(&host, insecure)?;
        let https = format!("https://{host}/v2/");
        match self.check(&client, &https, auth).await {
            Ok(r) => Ok(r),
            // An insecure registry may speak plain HTTP; Docker falls back to it.
            Err(err) if insecure && err.is(berth_core::ErrorKind::Unavailable) => {
                self.check(&client, &format!("http://{host}/v2/"), auth)
                    .await
            }
            Err(err) => Err(err),
        }
    }

    async fn check(
        &self,
        client: &reqwest::Client,
        url: &str,
        auth: &RegistryAuth,
    ) -> Result<LoginResult> {
        let unreachable = |e: reqwest::Error| {
            Error::unavailable(format!("login attempt to {url} failed")).with_source(e)
        };
        let resp = client.get(url).send().await.map_err(unreachable)?;
        if resp.status().is_success() {
            // The registry asks for no credentials at all.
            return Ok(LoginResult::default());
        }
        if resp.status() != reqwest::StatusCode::UNAUTHORIZED {
            return Err(failed(url, resp.status()));
        }
        let challenge = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let (scheme, params) = parse_challenge(&challenge);
        if !auth.registry_token.is_empty() {
            let resp = client
                .get(url)
                .bearer_auth(&auth.registry_token)
                .send()
                .await
                .map_err(unreachable)?;
            return if resp.status().is_success() {
                Ok(LoginResult::default())
            } else {
                Err(failed(url, resp.status()))
            };
        }
        match scheme.as_str() {
            "bearer" => {
                let realm = params.get("realm").ok_or_else(|| {
                    Error::unavailable(format!("{url}: bearer challenge without realm"))
                })?;
                let mut query = vec![
                    ("client_id", "docker".to_string()),
                    ("offline_token", "true".to_string()),
                ];
                if let Some(service) = params.get("service") {
                    query.push(("service", service.clone()));
                }
                if !auth.identity_token.is_empty() {
                    query.push(("grant_type", "refresh_token".into()));
                    query.push(("refresh_token", auth.identity_token.clone()));
                } else {
                    query.push(("account", auth.username.clone()));
                }
                let encoded = {
                    let mut ser = form_urlencoded::Serializer::new(String::new());
                    for (k, v) in &query {
                        ser.append_pair(k, v);
                    }
                    ser.finish()
                };
                let sep = if realm.contains('?') { '&' } else { '?' };
                let mut req = client.get(format!("{realm}{sep}{encoded}"));
                if auth.identity_token.is_empty() {
                    req = req.basic_auth(&auth.username, Some(&auth.password));
                }
                let resp = req.send().await.map_err(unreachable)?;
                if !resp.status().is_success() {
                    return Err(failed(url, resp.status()));
                }
                let bytes = resp.bytes().await.unwrap_or_default();
                let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                Ok(LoginResult {
                    identity_token: body["refresh_token"].as_str().unwrap_or("").to_string(),
                })
            }
            _ => {
                let resp = client
                    .get(url)
                    .basic_auth(&auth.username, Some(&auth.password))
                    .send()
                    .await
                    .map_err(unreachable)?;
                if resp.status().is_success() {
                    Ok(LoginResult::default())
                } else {
                    Err(failed(url, resp.status()))
                }
            }
        }
    }
}

/// Docker Hub's (v1) search endpoint.
pub const DOCKER_HUB_SEARCH: &str = "https://index.docker.io/v1/";

/// Splits a search term into the registry it names and what to search there, as Docker does:
/// `busybox`, `library/busybox` and `someone/app` go to Docker Hub; `host:5000/app`,
/// `registry.example/app` and `localhost/app` to that registry.
pub fn split_search_term(term: &str) -> (&str, &str) {
    match term.split_once('/') {
        Some((host, rest)) if host.contains('.') || host.contains(':') || host == "localhost" => {
            (host, rest)
        }
        _ => ("docker.io", term),
    }
}

impl RegistryChecker {
    /// `docker search`: the registry's v1 search API (`GET /v1/search?q=&n=`), Docker Hub's
    /// unless the term names a registry. Insecure registries are tried over plain HTTP after
    /// HTTPS, as for logins.
    pub async fn search(
        &self,
        term: &str,
        limit: u32,
        auth: Option<&RegistryAuth>,
    ) -> Result<Vec<crate::backend::SearchResult>> {
        if term.contains("://") {
            return Err(Error::invalid_argument(format!(
                "invalid repository name: repository name ({term}) should not have a scheme"
            )));
        }
        let (index, remote) = split_search_term(term);
        let official = matches!(index, "docker.io" | "index.docker.io");
        let (bases, client) = if official {
            let remote_host = "index.docker.io";
            (
                vec![DOCKER_HUB_SEARCH.to_string()],
                self.client(remote_host, false)?,
            )
        } else {
            let insecure = self.insecure(index);
            let mut bases = vec![format!("https://{index}/v1/")];
            if insecure {
                bases.push(format!("http://{index}/v1/"));
            }
            (bases, self.client(index, insecure)?)
        };
        let remote = if official {
            remote.strip_prefix("library/").unwrap_or(remote)
        } else {
            remote
        };
        let mut last_err = None;
        for base in &bases {
            let mut url = format!(
                "{base}search?q={}",
                form_urlencoded::byte_serialize(remote.as_bytes()).collect::<String>()
            );
            if limit > 0 {
                url.push_str(&format!("&n={limit}"));
            }
            let mut req = client.get(&url);
            if let Some(a) = auth.filter(|a| !a.username.is_empty()) {
                req = req.basic_auth(&a.username, Some(&a.password));
            }
            let resp = match req.send().await {
                Ok(resp) => resp,
                Err(e) => {
                    // dockerd's answer for a registry it cannot reach is a 500 with the cause.
                    last_err = Some(Error::internal(format!("search {url}")).with_source(e));
                    continue;
                }
            };
            if !resp.status().is_success() {
                return Err(Error::internal(format!(
                    "Unexpected status code {}",
                    resp.status().as_u16()
                )));
            }
            #[derive(serde::Deserialize)]
            struct Results {
                #[serde(default)]
                results: Vec<crate::backend::SearchResult>,
            }
            let body = resp
                .bytes()
                .await
                .map_err(|e| Error::internal(format!("search {url}")).with_source(e))?;
            let found: Results = serde_json::from_slice(&body).map_err(|e| {
                Error::internal(format!("search {url}: not a search answer")).with_source(e)
            })?;
            return Ok(found.results);
        }
        Err(last_err.unwrap_or_else(|| Error::internal("no search endpoint")))
    }
}

fn failed(url: &str, status: reqwest::StatusCode) -> Error {
    let text = format!("login attempt to {url} failed with status: {status}");
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        Error::unauthenticated(text)
    } else {
        Error::unavailable(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_from_login_addresses() {
        assert_eq!(registry_host(""), "registry-1.docker.io");
        assert_eq!(registry_host(DOCKER_HUB_INDEX), "registry-1.docker.io");
        assert_eq!(registry_host("127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(registry_host("http://127.0.0.1:5000/v2/"), "127.0.0.1:5000");
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("example.com:5000"));
    }

    #[test]
    fn search_terms_name_their_registry() {
        assert_eq!(split_search_term("busybox"), ("docker.io", "busybox"));
        assert_eq!(
            split_search_term("someone/app"),
            ("docker.io", "someone/app")
        );
        assert_eq!(
            split_search_term("127.0.0.1:5000/team/app"),
            ("127.0.0.1:5000", "team/app")
        );
        assert_eq!(
            split_search_term("registry.example/app"),
            ("registry.example", "app")
        );
        assert_eq!(split_search_term("localhost/app"), ("localhost", "app"));
    }

    #[tokio::test]
    async fn search_asks_the_registrys_v1_search_api() {
        use axum::extract::RawQuery;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let app = axum::Router::new().route(
            "/v1/search",
            axum::routing::get(|RawQuery(q): RawQuery| async move {
                axum::Json(serde_json::json!({
                    "num_results": 1,
                    "query": q,
                    "results": [{"name": "team/app", "description": q, "star_count": 4,
                                 "is_official": false, "is_automated": false}],
                }))
            }),
        );
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let checker = RegistryChecker::new(&ImagesConfig::default());
        let found = checker
            .search(&format!("{host}/team/app"), 3, None)
            .await
            .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "team/app");
        assert_eq!(found[0].star_count, 4);
        assert_eq!(found[0].description, "q=team%2Fapp&n=3");
        let err = checker
            .search(&format!("http://{host}/x"), 0, None)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), berth_core::ErrorKind::InvalidArgument);
        server.abort();
        // A registry nobody answers for: a 500 naming what was asked.
        let err = checker.search(&format!("{host}/team/app"), 0, None).await;
        let err = err.unwrap_err();
        assert_eq!(err.kind(), berth_core::ErrorKind::Internal);
        assert!(err.chain().contains(&host), "{}", err.chain());
    }

    #[test]
    fn challenges_parse() {
        let (scheme, params) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a:pull""#,
        );
        assert_eq!(scheme, "bearer");
        assert_eq!(params["realm"], "https://auth.example/token");
        assert_eq!(params["service"], "registry.example");
        assert_eq!(params["scope"], "repository:a:pull");
        let (scheme, params) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(scheme, "basic");
        assert_eq!(params["realm"], "Registry Realm");
    }
}
