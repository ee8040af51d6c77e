//! `POST /build`'s query parameters and headers as a typed request.

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use berth_core::{Error, Reference, Result};
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::types::v1 as types;
use serde::Deserialize;

use crate::query::Query;

/// What a build was asked to do, besides its context and Dockerfile.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildOptions {
    /// The Dockerfile's path in the context (`Dockerfile` by default).
    pub dockerfile: String,
    /// Fully qualified references to tag the result with.
    pub tags: Vec<String>,
    /// A URL to fetch the context (or the Dockerfile) from instead of the body.
    pub remote: Option<String>,
    /// Only the image id on success.
    pub quiet: bool,
    pub no_cache: bool,
    /// Images whose steps may be reused (`--cache-from`); empty = the local cache.
    pub cache_from: Vec<String>,
    /// Pull the base images even when present.
    pub pull: bool,
    /// Remove intermediate containers after a successful step (default true).
    pub rm: bool,
    /// Remove them after failed steps too.
    pub force_rm: bool,
    /// `--build-arg`s; `None` = take the value from the environment, which the API has none of.
    pub build_args: BTreeMap<String, Option<String>>,
    /// Labels set on the final image.
    pub labels: BTreeMap<String, String>,
    /// The stage to stop at.
    pub target: Option<String>,
    /// The network mode of RUN containers.
    pub network_mode: String,
    pub platform: Option<types::Platform>,
    pub extra_hosts: Vec<types::HostEntry>,
    pub shm_size: Option<i64>,
    /// Resources of RUN containers.
    pub resources: engine::Resources,
    /// Auth per registry host (`X-Registry-Config`), for pulls of base images.
    pub registry_auth: BTreeMap<String, types::RegistryAuth>,
}

#[derive(Deserialize)]
struct UlimitJson {
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Soft", default)]
    soft: i64,
    #[serde(rename = "Hard", default)]
    hard: i64,
}

fn json_param<T: for<'de> Deserialize<'de> + Default>(q: &Query, key: &str) -> Result<T> {
    match q.non_empty(key) {
        None => Ok(T::default()),
        Some(v) => serde_json::from_str(v).map_err(|e| {
            Error::invalid_argument(format!("invalid value for {key}: {e}")).with_source(e)
        }),
    }
}

impl BuildOptions {
    /// Parses the query and headers of a `POST /build`.
    pub fn parse(q: &Query, headers: &HeaderMap) -> Result<Self> {
        // Options only BuildKit (or an experimental daemon) has: refused, never ignored.
        if q.get("version") == Some("2") {
            return Err(Error::invalid_argument(
                "berth has no BuildKit builder: build with the classic builder (version 1)",
            ));
        }
        if q.bool("squash") {
            return Err(Error::invalid_argument(
                "squash is only supported with experimental mode",
            ));
        }
        if let Some(iso) = q.non_empty("isolation")
            && iso != "default"
        {
            return Err(Error::invalid_argument(format!(
                "Unsupported isolation: \"{iso}\""
            )));
        }
        if q.non_empty("outputs").is_some_and(|o| o != "[]") {
            return Err(Error::invalid_argument(
                "outputs are only supported with BuildKit, which berth does not have",
            ));
        }
        let mut tags = Vec::new();
        for t in q.all("t") {
            if t.is_empty() {
                continue;
            }
            let r = Reference::parse(t).map_err(|e| {
                Error::invalid_argument(format!("invalid reference format: {t}")).with_source(e)
            })?;
            if r.digest().is_some() {
                return Err(Error::invalid_argument(format!(
                    "invalid reference format: {t} (a tag cannot be a digest)"
                )));
            }
            tags.push(r.to_string());
        }
        let ulimits: Vec<UlimitJson> = json_param(q, "ulimits")?;
        let non_negative = |key: &str| -> Result<Option<i64>> {
            match q.int(key)? {
                Some(v) if v < 0 && key != "memswap" => Err(Error::invalid_argument(format!(
                    "invalid value for {key}: {v} is negative"
                ))),
                Some(0) if key != "memswap" => Ok(None),
                v => Ok(v),
            }
        };
        let resources = engine::Resources {
            memory: non_negative("memory")?,
            memory_swap: non_negative("memswap")?.filter(|v| *v != 0),
            cpu_shares: non_negative("cpushares")?,
            cpu_period: non_negative("cpuperiod")?,
            cpu_quota: non_negative("cpuquota")?,
            cpuset_cpus: q.non_empty("cpusetcpus").map(str::to_string),
            cpuset_mems: q.non_empty("cpusetmems").map(str::to_string),
            ulimits: ulimits
                .into_iter()
                .map(|u| engine::Ulimit {
                    name: u.name,
                    soft: u.soft,
                    hard: u.hard,
                })
                .collect(),
            ..Default::default()
        };
        let mut extra_hosts = Vec::new();
        for v in q.all("extrahosts") {
            for h in v.split(',').filter(|h| !h.is_empty()) {
                extra_hosts.push(crate::containers::create::parse_extra_host(h)?);
            }
        }
        let platform = crate::containers::create::parse_platform(q.get("platform").unwrap_or(""))?;
        if let Some(p) = &platform {
            let host_arch = crate::go_arch();
            if p.os != "linux" || (!p.architecture.is_empty() && p.architecture != host_arch) {
                return Err(Error::invalid_argument(format!(
                    "berth builds for linux/{host_arch} only, not {}/{}",
                    p.os, p.architecture
                )));
            }
        }
        let network_mode = q.non_empty("networkmode").unwrap_or("default").to_string();
        Ok(Self {
            dockerfile: q
                .non_empty("dockerfile")
                .unwrap_or("Dockerfile")
                .to_string(),
            tags,
            remote: q.non_empty("remote").map(str::to_string),
            quiet: q.bool("q"),
            no_cache: q.bool("nocache"),
            cache_from: json_param(q, "cachefrom")?,
            pull: q.bool("pull"),
            rm: q.bool_or("rm", true),
            force_rm: q.bool("forcerm"),
            build_args: json_param(q, "buildargs")?,
            labels: json_param(q, "labels")?,
            target: q.non_empty("target").map(str::to_string),
            network_mode,
            platform,
            extra_hosts,
            shm_size: non_negative("shmsize")?,
            resources,
            registry_auth: registry_config(headers)?,
        })
    }

    /// The auth to pull `reference` with: the `X-Registry-Config` entry of its registry.
    pub fn auth_for(&self, reference: &str) -> Option<types::RegistryAuth> {
        let host = Reference::parse(reference).ok()?.domain().to_string();
        let docker_hub = host == "docker.io";
        self.registry_auth.iter().find_map(|(k, v)| {
            let k = k
                .trim_start_matches("https://")
                .trim_start_matches("http://");
            let k = k.split('/').next().unwrap_or(k);
            let hit = k == host
                || (docker_hub && matches!(k, "index.docker.io" | "registry-1.docker.io"));
            hit.then(|| v.clone())
        })
    }
}

/// `X-Registry-Config`: base64url JSON of registry host → auth config.
fn registry_config(headers: &HeaderMap) -> Result<BTreeMap<String, types::RegistryAuth>> {
    let Some(v) = headers.get("x-registry-config") else {
        return Ok(BTreeMap::new());
    };
    if v.is_empty() {
        return Ok(BTreeMap::new());
    }
    let bad = || Error::invalid_argument("invalid X-Registry-Config header");
    let json = crate::images::decode_b64(v.as_bytes()).ok_or_else(bad)?;
    let map: BTreeMap<String, crate::images::AuthConfig> =
        serde_json::from_slice(&json).map_err(|_| bad())?;
    Ok(map.into_iter().map(|(k, v)| (k, v.into_proto())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(q: &str) -> Result<BuildOptions> {
        BuildOptions::parse(&Query::parse(q), &HeaderMap::new())
    }

    #[test]
    fn defaults_and_every_parameter() {
        let o = parse("").unwrap();
        assert_eq!(o.dockerfile, "Dockerfile");
        assert!(o.rm && !o.force_rm && !o.quiet && !o.no_cache);
        assert_eq!(o.network_mode, "default");
        let o = parse(
            "dockerfile=sub%2FDf&t=a&t=b:2&q=1&nocache=1&pull=1&rm=0&forcerm=1\
             &buildargs=%7B%22x%22%3A%221%22%2C%22y%22%3Anull%7D&labels=%7B%22l%22%3A%22v%22%7D\
             &target=t1&networkmode=host&extrahosts=h%3A1.2.3.4&shmsize=1000&memory=8000000\
             &memswap=-1&cpushares=512&cpusetcpus=0&cpuperiod=100000&cpuquota=50000\
             &ulimits=%5B%7B%22Name%22%3A%22nofile%22%2C%22Soft%22%3A10%2C%22Hard%22%3A20%7D%5D\
             &cachefrom=%5B%22c%3A1%22%5D",
        )
        .unwrap();
        assert_eq!(o.dockerfile, "sub/Df");
        assert_eq!(
            o.tags,
            ["docker.io/library/a:latest", "docker.io/library/b:2"]
        );
        assert!(o.quiet && o.no_cache && o.pull && !o.rm && o.force_rm);
        assert_eq!(o.build_args["x"].as_deref(), Some("1"));
        assert_eq!(o.build_args["y"], None);
        assert_eq!(o.labels["l"], "v");
        assert_eq!(o.target.as_deref(), Some("t1"));
        assert_eq!(o.network_mode, "host");
        assert_eq!(o.extra_hosts[0].ip, "1.2.3.4");
        assert_eq!(o.shm_size, Some(1000));
        assert_eq!(o.resources.memory, Some(8_000_000));
        assert_eq!(o.resources.memory_swap, Some(-1));
        assert_eq!(o.resources.cpu_shares, Some(512));
        assert_eq!(o.resources.cpuset_cpus.as_deref(), Some("0"));
        assert_eq!(o.resources.cpu_quota, Some(50000));
        assert_eq!(o.resources.ulimits[0].hard, 20);
        assert_eq!(o.cache_from, ["c:1"]);
    }

    #[test]
    fn refusals() {
        for (q, want) in [
            ("t=UPPER", "invalid reference format"),
            ("version=2", "BuildKit"),
            ("squash=1", "experimental"),
            ("buildargs=nope", "invalid value for buildargs"),
            ("memory=-3", "negative"),
            ("platform=linux/s390x", "berth builds for linux/"),
            ("isolation=hyperv", "Unsupported isolation"),
        ] {
            let err = parse(q).unwrap_err();
            assert!(err.chain().contains(want), "{q}: {}", err.chain());
        }
    }

    #[test]
    fn registry_config_picks_the_registry_of_the_reference() {
        use base64::Engine;
        let json = r#"{"localhost:5000":{"username":"u","password":"p"},"https://index.docker.io/v1/":{"username":"hub"}}"#;
        let mut h = HeaderMap::new();
        h.insert(
            "x-registry-config",
            base64::engine::general_purpose::URL_SAFE
                .encode(json)
                .parse()
                .unwrap(),
        );
        let o = BuildOptions::parse(&Query::default(), &h).unwrap();
        assert_eq!(o.auth_for("localhost:5000/a:1").unwrap().username, "u");
        assert_eq!(o.auth_for("busybox").unwrap().username, "hub");
        assert!(o.auth_for("example.com/x").is_none());
    }
}
