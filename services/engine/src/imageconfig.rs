//! The parts of an image config (OCI or Docker) the engine uses, and merging a container's
//! config over them the way Docker does.

use std::collections::{BTreeMap, HashMap};

use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::types::v1 as types;
use serde::Deserialize;

/// The image config blob: only `config` matters here.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageConfigFile {
    /// The runtime defaults.
    #[serde(default)]
    pub config: Option<ImageConfig>,
}

/// Runtime defaults an image carries (the `config` object of the image config).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    /// `user[:group]`.
    #[serde(default)]
    pub user: Option<String>,
    /// `"80/tcp": {}`.
    #[serde(default)]
    pub exposed_ports: Option<HashMap<String, serde_json::Value>>,
    /// `KEY=VALUE`.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// Entrypoint.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Command.
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// `"/data": {}`.
    #[serde(default)]
    pub volumes: Option<HashMap<String, serde_json::Value>>,
    /// Working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: Option<HashMap<String, String>>,
    /// Stop signal.
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// Docker's health check, kept as JSON.
    #[serde(default)]
    pub healthcheck: Option<serde_json::Value>,
    /// ONBUILD triggers.
    #[serde(default)]
    pub on_build: Option<Vec<String>>,
}

impl ImageConfig {
    /// Parses an image config blob. An empty blob is an image without defaults.
    pub fn parse(blob: &[u8]) -> Result<Self> {
        if blob.is_empty() {
            return Ok(Self::default());
        }
        let file: ImageConfigFile = serde_json::from_slice(blob)
            .map_err(|e| Error::invalid_argument("invalid image config").with_source(e))?;
        Ok(file.config.unwrap_or_default())
    }
}

/// The default PATH Docker gives containers whose image sets none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn env_key(entry: &str) -> &str {
    entry.split_once('=').map(|(k, _)| k).unwrap_or(entry)
}

/// Merges env lists: `over` wins over `base` by key; order is base's, then new keys.
pub fn merge_env(base: &[String], over: &[String]) -> Vec<String> {
    let mut out: Vec<String> = base.to_vec();
    for e in over {
        let key = env_key(e);
        match out.iter_mut().find(|b| env_key(b) == key) {
            Some(slot) => *slot = e.clone(),
            None => out.push(e.clone()),
        }
    }
    out
}

fn parse_port(s: &str) -> Option<types::ExposedPort> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let protocol = match proto.to_ascii_lowercase().as_str() {
        "tcp" | "" => types::Protocol::Tcp,
        "udp" => types::Protocol::Udp,
        "sctp" => types::Protocol::Sctp,
        _ => return None,
    };
    Some(types::ExposedPort {
        port: port.parse().ok()?,
        protocol: protocol.into(),
    })
}

fn is_empty_list(l: &types::StringList) -> bool {
    l.values.is_empty() || (l.values.len() == 1 && l.values[0].is_empty())
}

/// The config that actually runs: `user` (what the request gave) merged over `image`, as
/// Docker's `merge` does. Errors when there is no command at all.
pub fn merge(user: &pb::ContainerConfig, image: &ImageConfig) -> Result<pb::ContainerConfig> {
    let mut out = user.clone();
    if out.user.is_empty() {
        out.user = image.user.clone().unwrap_or_default();
    }
    // Exposed ports: union, in a stable order.
    let mut ports: BTreeMap<(u32, i32), types::ExposedPort> = BTreeMap::new();
    for p in image
        .exposed_ports
        .iter()
        .flat_map(|m| m.keys())
        .filter_map(|k| parse_port(k))
        .chain(user.exposed_ports.iter().cloned())
    {
        ports.insert((p.port, p.protocol), p);
    }
    out.exposed_ports = ports.into_values().collect();

    let image_env = image.env.clone().unwrap_or_default();
    out.env = merge_env(&image_env, &user.env);

    let mut labels: BTreeMap<String, String> = image
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    labels.extend(user.labels.clone());
    out.labels = labels.into_iter().collect();

    // Entrypoint and Cmd: an entrypoint given by the user resets the image's cmd, unless it is
    // empty (Docker's rule: `len(Entrypoint) == 0` takes the image's cmd when none is given).
    let user_ep_empty = user.entrypoint.as_ref().is_none_or(is_empty_list);
    let user_cmd_empty = user.cmd.as_ref().is_none_or(|c| c.values.is_empty());
    if user_ep_empty {
        if user_cmd_empty {
            out.cmd = image.cmd.clone().map(|values| types::StringList { values });
        }
        if user.entrypoint.is_none() {
            out.entrypoint = image
                .entrypoint
                .clone()
                .map(|values| types::StringList { values });
        } else {
            out.entrypoint = Some(types::StringList { values: vec![] });
        }
    }
    if out.working_dir.is_empty() {
        out.working_dir = image.working_dir.clone().unwrap_or_default();
    }
    if out.working_dir.is_empty() {
        out.working_dir = "/".into();
    }
    if !out.working_dir.starts_with('/') {
        return Err(Error::invalid_argument(format!(
            "the working directory '{}' is invalid, it needs to be an absolute path",
            out.working_dir
        )));
    }
    let mut volumes: Vec<String> = image
        .volumes
        .iter()
        .flat_map(|m| m.keys().cloned())
        .collect();
    volumes.sort();
    for v in &user.volumes {
        if !volumes.contains(v) {
            volumes.push(v.clone());
        }
    }
    out.volumes = volumes;
    if out.stop_signal.is_empty() {
        out.stop_signal = image.stop_signal.clone().unwrap_or_default();
    }
    if let Some(h) = &image.healthcheck {
        out.healthcheck = merge_healthcheck(&out.healthcheck, h);
    }
    if out.on_build.is_empty() {
        out.on_build = image.on_build.clone().unwrap_or_default();
    }
    if args(&out).is_empty() {
        return Err(Error::invalid_argument("No command specified"));
    }
    Ok(out)
}

/// Docker's merge of a container's Healthcheck over the image's: without one the image's is
/// used; otherwise each field left unset (empty Test, zero durations and retries) is taken
/// from the image's.
fn merge_healthcheck(user: &[u8], image: &serde_json::Value) -> Vec<u8> {
    let Some(image) = image.as_object() else {
        return user.to_vec();
    };
    let mut out = match serde_json::from_slice::<serde_json::Value>(user) {
        Ok(serde_json::Value::Object(o)) => o,
        _ => return serde_json::to_vec(image).unwrap_or_default(),
    };
    let unset = |v: Option<&serde_json::Value>| match v {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::Array(a)) => a.is_empty(),
        Some(serde_json::Value::Number(n)) => n.as_f64() == Some(0.0),
        Some(_) => false,
    };
    for key in [
        "Test",
        "Interval",
        "Timeout",
        "StartPeriod",
        "StartInterval",
        "Retries",
    ] {
        if unset(out.get(key))
            && let Some(v) = image.get(key)
        {
            out.insert(key.to_string(), v.clone());
        }
    }
    serde_json::to_vec(&out).unwrap_or_default()
}

/// The healthcheck a container runs, resolved from its merged config as moby does: none
/// without a Test, for `["NONE"]` or an unknown kind; `["CMD", argv...]` runs argv;
/// `["CMD-SHELL", command]` runs `/bin/sh -c command`.
pub fn healthcheck(
    config: &pb::ContainerConfig,
) -> Option<berth_proto::berth::shim::v1::HealthConfig> {
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "PascalCase", default)]
    struct Docker {
        test: Option<Vec<String>>,
        interval: i64,
        timeout: i64,
        start_period: i64,
        start_interval: i64,
        retries: i64,
    }
    if config.healthcheck.is_empty() {
        return None;
    }
    let h: Docker = serde_json::from_slice(&config.healthcheck).ok()?;
    let test = h.test.unwrap_or_default();
    let command: Vec<String> = match test.first().map(String::as_str) {
        Some("CMD") => test[1..].to_vec(),
        Some("CMD-SHELL") => ["/bin/sh", "-c"]
            .into_iter()
            .map(String::from)
            .chain(test[1..].iter().cloned())
            .collect(),
        _ => return None,
    };
    if command.first().is_none_or(|c| c.is_empty()) {
        return None;
    }
    let ns = |v: i64| u64::try_from(v).unwrap_or(0);
    Some(berth_proto::berth::shim::v1::HealthConfig {
        command,
        interval_ns: ns(h.interval),
        timeout_ns: ns(h.timeout),
        start_period_ns: ns(h.start_period),
        start_interval_ns: ns(h.start_interval),
        retries: u32::try_from(h.retries).unwrap_or(0),
    })
}

/// The process arguments of a merged config: entrypoint followed by cmd.
pub fn args(config: &pb::ContainerConfig) -> Vec<String> {
    let mut out: Vec<String> = match &config.entrypoint {
        Some(l) if !is_empty_list(l) => l.values.clone(),
        _ => Vec::new(),
    };
    out.extend(
        config
            .cmd
            .as_ref()
            .map(|l| l.values.clone())
            .unwrap_or_default(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(v: &[&str]) -> Option<types::StringList> {
        Some(types::StringList {
            values: v.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn image() -> ImageConfig {
        ImageConfig::parse(
            br#"{"architecture":"amd64","config":{"User":"daemon","Env":["PATH=/bin","A=1"],
            "Entrypoint":["/entry"],"Cmd":["sh"],"WorkingDir":"/srv","Volumes":{"/data":{}},
            "ExposedPorts":{"80/tcp":{}},"Labels":{"l":"image","m":"image"},"StopSignal":"SIGQUIT"}}"#,
        )
        .unwrap()
    }

    fn with_health(hc: &str) -> ImageConfig {
        let blob = format!(r#"{{"config":{{"Cmd":["sh"],"Healthcheck":{hc}}}}}"#);
        ImageConfig::parse(blob.as_bytes()).unwrap()
    }

    #[test]
    fn healthchecks_merge_field_by_field_as_moby_does() {
        let image = with_health(
            r#"{"Test":["CMD-SHELL","true"],"Interval":5000000000,"Retries":7,"StartPeriod":1}"#,
        );
        // No user healthcheck: the image's.
        let out = merge(&pb::ContainerConfig::default(), &image).unwrap();
        let h = healthcheck(&out).unwrap();
        assert_eq!(h.command, ["/bin/sh", "-c", "true"]);
        assert_eq!(
            (h.interval_ns, h.retries, h.start_period_ns),
            (5_000_000_000, 7, 1)
        );
        // The user's fields win one by one; unset ones come from the image.
        let user = pb::ContainerConfig {
            healthcheck: br#"{"Test":["CMD","test","-f","/ok"],"Timeout":2000000000}"#.to_vec(),
            ..Default::default()
        };
        let h = healthcheck(&merge(&user, &image).unwrap()).unwrap();
        assert_eq!(h.command, ["test", "-f", "/ok"]);
        assert_eq!(
            (h.interval_ns, h.timeout_ns, h.retries),
            (5_000_000_000, 2_000_000_000, 7)
        );
        let user = pb::ContainerConfig {
            healthcheck: br#"{"Interval":1000000000}"#.to_vec(),
            ..Default::default()
        };
        let h = healthcheck(&merge(&user, &image).unwrap()).unwrap();
        assert_eq!(h.command, ["/bin/sh", "-c", "true"]);
        assert_eq!(h.interval_ns, 1_000_000_000);
        // --no-healthcheck.
        let user = pb::ContainerConfig {
            healthcheck: br#"{"Test":["NONE"]}"#.to_vec(),
            ..Default::default()
        };
        assert_eq!(healthcheck(&merge(&user, &image).unwrap()), None);
        // No healthcheck anywhere.
        assert_eq!(
            healthcheck(&merge(&pb::ContainerConfig::default(), &image_plain()).unwrap()),
            None
        );
    }

    fn image_plain() -> ImageConfig {
        ImageConfig::parse(br#"{"config":{"Cmd":["sh"]}}"#).unwrap()
    }

    #[test]
    fn image_defaults_apply_when_the_user_gives_none() {
        let out = merge(&pb::ContainerConfig::default(), &image()).unwrap();
        assert_eq!(args(&out), ["/entry", "sh"]);
        assert_eq!(out.user, "daemon");
        assert_eq!(out.working_dir, "/srv");
        assert_eq!(out.env, ["PATH=/bin", "A=1"]);
        assert_eq!(out.volumes, ["/data"]);
        assert_eq!(out.stop_signal, "SIGQUIT");
        assert_eq!(out.exposed_ports.len(), 1);
        assert_eq!(out.labels["l"], "image");
    }

    #[test]
    fn user_values_win() {
        let user = pb::ContainerConfig {
            cmd: list(&["echo", "hi"]),
            env: vec!["A=2".into(), "B=3".into()],
            user: "1000:1000".into(),
            working_dir: "/tmp".into(),
            labels: [("l".to_string(), "user".to_string())].into(),
            volumes: vec!["/cache".into()],
            exposed_ports: vec![types::ExposedPort {
                port: 53,
                protocol: types::Protocol::Udp.into(),
            }],
            ..Default::default()
        };
        let out = merge(&user, &image()).unwrap();
        assert_eq!(args(&out), ["/entry", "echo", "hi"]);
        assert_eq!(out.env, ["PATH=/bin", "A=2", "B=3"]);
        assert_eq!(out.user, "1000:1000");
        assert_eq!(out.working_dir, "/tmp");
        assert_eq!(out.labels["l"], "user");
        assert_eq!(out.labels["m"], "image");
        assert_eq!(out.volumes, ["/data", "/cache"]);
        assert_eq!(out.exposed_ports.len(), 2);
    }

    #[test]
    fn an_entrypoint_resets_the_image_cmd() {
        let user = pb::ContainerConfig {
            entrypoint: list(&["/bin/echo"]),
            ..Default::default()
        };
        let out = merge(&user, &image()).unwrap();
        assert_eq!(args(&out), ["/bin/echo"]);
        // An empty entrypoint removes the image's and keeps its cmd.
        let user = pb::ContainerConfig {
            entrypoint: list(&[""]),
            ..Default::default()
        };
        let out = merge(&user, &image()).unwrap();
        assert_eq!(args(&out), ["sh"]);
    }

    #[test]
    fn no_command_is_an_error() {
        let err = merge(&pb::ContainerConfig::default(), &ImageConfig::default()).unwrap_err();
        assert_eq!(err.message(), "No command specified");
        let bad = pb::ContainerConfig {
            cmd: list(&["x"]),
            working_dir: "rel".into(),
            ..Default::default()
        };
        assert!(merge(&bad, &ImageConfig::default()).is_err());
    }

    #[test]
    fn empty_and_null_configs_parse() {
        assert_eq!(ImageConfig::parse(b"").unwrap(), ImageConfig::default());
        assert_eq!(
            ImageConfig::parse(br#"{"config":null}"#).unwrap(),
            ImageConfig::default()
        );
        assert!(ImageConfig::parse(b"{").is_err());
    }
}
