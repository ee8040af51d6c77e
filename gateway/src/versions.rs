//! What a request made at an older API version sees, as moby shapes it: one function per
//! resource, applied to the current (1.45) answer just before it is sent.
//!
//! Only changes to *answers* live here (the version history's "no longer includes", "now
//! omits", "deprecated and will no longer be included"); moby keeps the rest of its older
//! answers identical, and so does berth. Fields moby added without versioning them (`DNSNames`,
//! `CgroupVersion`, …) are sent to every version, as moby sends them.

use serde_json::{Value, json};

use crate::ApiVersion;

/// `GET /images/{name}/json`. `config` is the image's config blob.
///
/// - below 1.45: `Container` and `ContainerConfig` from the config's `container` and
///   `container_config` (what the classic builder recorded; an image built otherwise gets the
///   empty container config moby sends). docker-compose 1.29 reads `ContainerConfig`.
/// - below 1.44: `VirtualSize` (= `Size`), and `Created` as Go's zero time when the config has
///   none.
pub fn image_inspect(version: ApiVersion, v: &mut Value, config: &Value) {
    if version.before(1, 45) {
        v["Container"] = config.get("container").cloned().unwrap_or(json!(""));
        v["ContainerConfig"] = config
            .get("container_config")
            .filter(|c| c.is_object())
            .cloned()
            .unwrap_or_else(empty_container_config);
    }
    if version.before(1, 44) {
        v["VirtualSize"] = v["Size"].clone();
        if v.get("Created").is_none_or(Value::is_null) {
            v["Created"] = json!("0001-01-01T00:00:00Z");
        }
    }
}

/// moby's `container.Config{}` as JSON: the fields without `omitempty`, zero.
fn empty_container_config() -> Value {
    json!({
        "Hostname": "",
        "Domainname": "",
        "User": "",
        "AttachStdin": false,
        "AttachStdout": false,
        "AttachStderr": false,
        "Tty": false,
        "OpenStdin": false,
        "StdinOnce": false,
        "Env": null,
        "Cmd": null,
        "Image": "",
        "Volumes": null,
        "WorkingDir": "",
        "Entrypoint": null,
        "OnBuild": null,
        "Labels": null,
    })
}

/// One entry of `GET /images/json` (and of `/system/df`'s `Images`).
///
/// - below 1.44: `VirtualSize` (= `Size`).
/// - below 1.43 (`/images/json` only): an untagged image shows `<none>:<none>` and
///   `<none>@<none>` instead of empty lists.
pub fn image_summary(version: ApiVersion, v: &mut Value, listing: bool) {
    if version.before(1, 44) {
        v["VirtualSize"] = v["Size"].clone();
    }
    let empty = |key: &str| v[key].as_array().is_none_or(Vec::is_empty);
    if listing && version.before(1, 43) && empty("RepoTags") && empty("RepoDigests") {
        v["RepoTags"] = json!(["<none>:<none>"]);
        v["RepoDigests"] = json!(["<none>@<none>"]);
    }
}

/// `GET /info`.
///
/// - below 1.44: runtimes without `status`.
/// - below 1.39: `<unknown>` for a kernel version or operating system berth could not read.
/// - below 1.25: security options by name only, and the `ExecutionDriver` field.
pub fn system_info(version: ApiVersion, v: &mut Value) {
    if version.before(1, 44)
        && let Some(runtimes) = v["Runtimes"].as_object_mut()
    {
        for rt in runtimes.values_mut() {
            if let Some(rt) = rt.as_object_mut() {
                rt.remove("status");
            }
        }
    }
    if version.before(1, 39) {
        for key in ["KernelVersion", "OperatingSystem"] {
            if v[key].as_str().is_none_or(str::is_empty) {
                v[key] = json!("<unknown>");
            }
        }
    }
    if version.before(1, 25) {
        let names: Vec<Value> = v["SecurityOptions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter_map(|o| {
                o.split(',')
                    .find_map(|kv| kv.strip_prefix("name="))
                    .map(|n| json!(n))
            })
            .collect();
        v["SecurityOptions"] = Value::Array(names);
        v["ExecutionDriver"] = json!("<not supported>");
    }
}

/// `GET /containers/{id}/json`.
///
/// - below 1.48 (every version berth serves): no endpoint `GwPriority`, which the models berth
///   renders with already carry.
/// - below 1.45: on user-defined networks, `Aliases` also hold the short container id and the
///   hostname (1.45 moved those to `DNSNames` and left `Aliases` as the client sent them).
pub fn container_inspect(version: ApiVersion, v: &mut Value) {
    let short_id: String = v["Id"].as_str().unwrap_or("").chars().take(12).collect();
    let hostname = v["Config"]["Hostname"].as_str().unwrap_or("").to_string();
    let Some(networks) = v["NetworkSettings"]["Networks"].as_object_mut() else {
        return;
    };
    for (name, ep) in networks.iter_mut() {
        if version.before(1, 48)
            && let Some(ep) = ep.as_object_mut()
        {
            ep.remove("GwPriority");
        }
        if !version.before(1, 45) || !user_defined(name) {
            continue;
        }
        let mut aliases: Vec<Value> = ep["Aliases"].as_array().cloned().unwrap_or_default();
        for extra in [&short_id, &hostname] {
            if !extra.is_empty() && !aliases.iter().any(|a| a == extra.as_str()) {
                aliases.push(json!(extra));
            }
        }
        ep["Aliases"] = Value::Array(aliases);
    }
}

/// Whether a network mode names a user-defined network (not `bridge`, `host`, `none`,
/// `default` or `container:…`), as moby's `NetworkMode.IsUserDefined`.
fn user_defined(name: &str) -> bool {
    !matches!(name, "bridge" | "host" | "none" | "default") && !name.starts_with("container:")
}

#[cfg(test)]
mod tests {
    use super::*;

    const V141: ApiVersion = ApiVersion(1, 41);
    const V143: ApiVersion = ApiVersion(1, 43);
    const V144: ApiVersion = ApiVersion(1, 44);

    #[test]
    fn image_inspect_keeps_container_config_below_1_45() {
        let config = json!({"container": "abc", "container_config": {"Cmd": ["sh"]}});
        let mut v = json!({"Id": "sha256:1", "Size": 5, "Created": null});
        image_inspect(ApiVersion::CURRENT, &mut v, &config);
        assert!(v.get("ContainerConfig").is_none() && v.get("VirtualSize").is_none());
        image_inspect(V144, &mut v, &config);
        assert_eq!(v["Container"], "abc");
        assert_eq!(v["ContainerConfig"], json!({"Cmd": ["sh"]}));
        assert!(v.get("VirtualSize").is_none());
        let mut v = json!({"Id": "sha256:1", "Size": 5});
        image_inspect(V141, &mut v, &json!({"config": {}}));
        assert_eq!(v["Container"], "");
        assert_eq!(v["ContainerConfig"]["Hostname"], "");
        assert_eq!(v["ContainerConfig"]["Env"], Value::Null);
        assert_eq!(v["VirtualSize"], 5);
        assert_eq!(v["Created"], "0001-01-01T00:00:00Z");
    }

    #[test]
    fn image_summaries_by_version() {
        let mut v = json!({"Size": 7, "RepoTags": [], "RepoDigests": []});
        image_summary(V143, &mut v, true);
        assert_eq!(v["VirtualSize"], 7);
        assert_eq!(v["RepoTags"], json!([]));
        image_summary(ApiVersion(1, 42), &mut v, true);
        assert_eq!(v["RepoTags"], json!(["<none>:<none>"]));
        assert_eq!(v["RepoDigests"], json!(["<none>@<none>"]));
        let mut v = json!({"Size": 7, "RepoTags": []});
        image_summary(ApiVersion::CURRENT, &mut v, true);
        assert!(v.get("VirtualSize").is_none());
    }

    #[test]
    fn info_by_version() {
        let mut v = json!({
            "Runtimes": {"runc": {"path": "runc", "status": {"a": "b"}}},
            "KernelVersion": "",
            "OperatingSystem": "Debian",
            "SecurityOptions": ["name=seccomp,profile=builtin", "name=cgroupns"],
        });
        system_info(ApiVersion::CURRENT, &mut v);
        assert!(v["Runtimes"]["runc"].get("status").is_some());
        system_info(ApiVersion(1, 24), &mut v);
        assert!(v["Runtimes"]["runc"].get("status").is_none());
        assert_eq!(v["KernelVersion"], "<unknown>");
        assert_eq!(v["OperatingSystem"], "Debian");
        assert_eq!(v["SecurityOptions"], json!(["seccomp", "cgroupns"]));
    }

    #[test]
    fn container_aliases_below_1_45() {
        let c = json!({
            "Id": "0123456789abcdef",
            "Config": {"Hostname": "web"},
            "NetworkSettings": {"Networks": {
                "bridge": {"Aliases": null, "GwPriority": 0},
                "front": {"Aliases": ["db"]},
                "back": {"Aliases": null},
            }},
        });
        let mut v = c.clone();
        container_inspect(ApiVersion::CURRENT, &mut v);
        assert!(
            v["NetworkSettings"]["Networks"]["bridge"]
                .get("GwPriority")
                .is_none()
        );
        assert_eq!(
            v["NetworkSettings"]["Networks"]["front"],
            c["NetworkSettings"]["Networks"]["front"]
        );
        assert_eq!(
            v["NetworkSettings"]["Networks"]["back"],
            c["NetworkSettings"]["Networks"]["back"]
        );
        container_inspect(V144, &mut v);
        let nets = &v["NetworkSettings"]["Networks"];
        assert_eq!(nets["bridge"]["Aliases"], Value::Null);
        assert_eq!(
            nets["front"]["Aliases"],
            json!(["db", "0123456789ab", "web"])
        );
        assert_eq!(nets["back"]["Aliases"], json!(["0123456789ab", "web"]));
    }
}
