//! The orchestrator path: raw CNI network configs from a directory, executed with the CNI
//! plugins per the CNI spec (ADD in order with `prevResult` chaining, DEL in reverse order with
//! the result of ADD).
//!
//! Plugin execution is behind [`PluginExec`] so the chaining logic is testable without the
//! plugins; [`ExecPlugins`] runs the binaries.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use berth_core::{Context, Error, ErrorKind, Result};
use serde_json::{Map, Value, json};

/// A network config found in the config directory.
#[derive(Debug, Clone, PartialEq)]
pub struct CniConfigFile {
    /// The config's `name`.
    pub name: String,
    /// Where it was read from.
    pub path: PathBuf,
    /// `cniVersion`.
    pub cni_version: String,
    /// `type` of each plugin, in order.
    pub plugin_types: Vec<String>,
    /// As a conflist (a single-plugin `.conf` is wrapped into one).
    pub conflist: Value,
}

/// Parses a `.conflist` or a single-plugin `.conf`.
pub fn parse_config(path: &Path, text: &str) -> Result<CniConfigFile> {
    let bad = |why: &str| Error::invalid_argument(format!("cni config {}: {why}", path.display()));
    let value: Value = serde_json::from_str(text).context(
        ErrorKind::InvalidArgument,
        format!("cni config {}", path.display()),
    )?;
    let obj = value.as_object().ok_or_else(|| bad("not a JSON object"))?;
    let conflist = if obj.contains_key("plugins") {
        value.clone()
    } else if obj.contains_key("type") {
        let mut plugin = obj.clone();
        let name = plugin.remove("name").unwrap_or(Value::Null);
        let version = plugin.remove("cniVersion").unwrap_or(Value::Null);
        json!({ "cniVersion": version, "name": name, "plugins": [Value::Object(plugin)] })
    } else {
        return Err(bad("neither a plugin list nor a plugin config"));
    };
    let name = conflist["name"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("no name"))?;
    let plugins = conflist["plugins"]
        .as_array()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| bad("no plugins"))?;
    let plugin_types = plugins
        .iter()
        .map(|p| {
            p["type"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| bad("a plugin has no type"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(CniConfigFile {
        name: name.to_string(),
        path: path.to_path_buf(),
        cni_version: conflist["cniVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        plugin_types,
        conflist,
    })
}

/// Every valid config in `dir` (`*.conflist`, `*.conf`, `*.json`), in file-name order; a
/// missing directory has none. Invalid files are skipped with a warning, as libcni does.
pub fn load_dir(dir: &Path) -> Result<Vec<CniConfigFile>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(
                Error::from(e).with_source(Error::internal(format!("read {}", dir.display())))
            );
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conflist" | "conf" | "json")
            )
        })
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping unreadable cni config");
                continue;
            }
        };
        match parse_config(&path, &text) {
            Ok(c) if !out.iter().any(|o: &CniConfigFile| o.name == c.name) => out.push(c),
            Ok(c) => {
                tracing::warn!(path = %path.display(), name = c.name, "skipping duplicate cni config name")
            }
            Err(e) => tracing::warn!(error = %e.chain(), "skipping invalid cni config"),
        }
    }
    Ok(out)
}

/// Runs one CNI plugin.
pub trait PluginExec: Send + Sync {
    /// Executes plugin `plugin_type` with `env` and `stdin`; returns stdout on success.
    /// A failing plugin's error (its JSON error on stdout) becomes the error's message.
    fn exec(&self, plugin_type: &str, env: &[(String, String)], stdin: &[u8]) -> Result<Vec<u8>>;
}

/// Executes plugin binaries from directories (the first that has the plugin).
#[derive(Debug, Clone)]
pub struct ExecPlugins {
    /// Where the plugin binaries are (`cni_bin_dirs`), in search order.
    pub bin_dirs: Vec<PathBuf>,
}

/// The error a plugin printed, as a berth error.
pub fn plugin_error(plugin_type: &str, command: &str, stdout: &[u8], stderr: &[u8]) -> Error {
    let parsed: Option<Value> = serde_json::from_slice(stdout).ok();
    let (code, msg) = match &parsed {
        Some(v) => {
            let mut msg = v["msg"].as_str().unwrap_or_default().to_string();
            if let Some(d) = v["details"].as_str().filter(|d| !d.is_empty()) {
                msg = format!("{msg}: {d}");
            }
            (v["code"].as_u64().unwrap_or(0), msg)
        }
        None => (0, String::from_utf8_lossy(stderr).trim().to_string()),
    };
    // Codes from the CNI spec: 4 invalid environment, 6 decoding failure, 7 invalid config,
    // 11 try again later.
    let kind = match code {
        4 | 6 | 7 => ErrorKind::InvalidArgument,
        11 => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    };
    let msg = if msg.is_empty() {
        "no error message".to_string()
    } else {
        msg
    };
    Error::new(
        kind,
        format!("cni plugin {plugin_type} ({command}) failed: {msg}"),
    )
}

impl PluginExec for ExecPlugins {
    fn exec(&self, plugin_type: &str, env: &[(String, String)], stdin: &[u8]) -> Result<Vec<u8>> {
        if plugin_type.contains('/') || plugin_type.is_empty() {
            return Err(Error::invalid_argument(format!(
                "invalid cni plugin type {plugin_type:?}"
            )));
        }
        let Some(binary) = self
            .bin_dirs
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|b| b.is_file())
        else {
            let dirs: Vec<String> = self
                .bin_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect();
            return Err(Error::not_found(format!(
                "cni plugin {plugin_type} not found in {}",
                dirs.join(", ")
            )));
        };
        let command = env
            .iter()
            .find(|(k, _)| k == "CNI_COMMAND")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let mut child = Command::new(&binary)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context(
                ErrorKind::Internal,
                format!("run cni plugin {}", binary.display()),
            )?;
        if let Some(mut input) = child.stdin.take() {
            input
                .write_all(stdin)
                .internal(|| "write cni plugin input".into())?;
        }
        let out = child
            .wait_with_output()
            .internal(|| "wait for cni plugin".into())?;
        if !out.status.success() {
            return Err(plugin_error(
                plugin_type,
                &command,
                &out.stdout,
                &out.stderr,
            ));
        }
        Ok(out.stdout)
    }
}

/// The arguments of one ADD or DEL.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    /// CNI_CONTAINERID.
    pub container_id: &'a str,
    /// CNI_NETNS.
    pub netns: &'a str,
    /// CNI_IFNAME.
    pub ifname: &'a str,
    /// CNI_ARGS.
    pub args: &'a BTreeMap<String, String>,
    /// Capabilities, by capability name (`portMappings`, `ips`, `mac`, `bandwidth`, `dns`,
    /// `cgroupPath`).
    pub runtime_config: &'a Map<String, Value>,
    /// Where plugins are (CNI_PATH).
    pub cni_path: &'a str,
}

impl Invocation<'_> {
    fn env(&self, command: &str) -> Vec<(String, String)> {
        let mut args: Vec<String> = self.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        // Plugins refuse arguments they do not know unless told to ignore them (kubelet
        // passes the same flag with the pod's name and namespace).
        if !args.is_empty() && !self.args.contains_key("IgnoreUnknown") {
            args.insert(0, "IgnoreUnknown=1".into());
        }
        vec![
            ("CNI_COMMAND".into(), command.into()),
            ("CNI_CONTAINERID".into(), self.container_id.into()),
            ("CNI_NETNS".into(), self.netns.into()),
            ("CNI_IFNAME".into(), self.ifname.into()),
            ("CNI_ARGS".into(), args.join(";")),
            ("CNI_PATH".into(), self.cni_path.into()),
        ]
    }
}

/// The config one plugin of the list gets: its own object plus the list's name and version,
/// the previous result, and the runtime config for the capabilities it declares.
pub fn plugin_config(
    conflist: &Value,
    plugin: &Value,
    prev_result: Option<&Value>,
    runtime_config: &Map<String, Value>,
) -> Value {
    let mut cfg = plugin.as_object().cloned().unwrap_or_default();
    cfg.insert("name".into(), conflist["name"].clone());
    cfg.insert("cniVersion".into(), conflist["cniVersion"].clone());
    if let Some(prev) = prev_result {
        cfg.insert("prevResult".into(), prev.clone());
    }
    let wanted: Map<String, Value> = plugin["capabilities"]
        .as_object()
        .map(|caps| {
            caps.iter()
                .filter(|(_, on)| on.as_bool() == Some(true))
                .filter_map(|(k, _)| runtime_config.get(k).map(|v| (k.clone(), v.clone())))
                .collect()
        })
        .unwrap_or_default();
    if !wanted.is_empty() {
        cfg.insert("runtimeConfig".into(), Value::Object(wanted));
    }
    Value::Object(cfg)
}

/// CNI ADD of the whole list. On a failure the plugins that ran are deleted again (best
/// effort), so a failed ADD leaks no address.
pub fn add(exec: &dyn PluginExec, conflist: &Value, inv: &Invocation<'_>) -> Result<Value> {
    let plugins = conflist["plugins"].as_array().cloned().unwrap_or_default();
    let mut prev: Option<Value> = None;
    for (i, plugin) in plugins.iter().enumerate() {
        let ty = plugin["type"].as_str().unwrap_or_default();
        let cfg = plugin_config(conflist, plugin, prev.as_ref(), inv.runtime_config);
        let stdin = serde_json::to_vec(&cfg).internal(|| "encode cni config".into())?;
        match exec.exec(ty, &inv.env("ADD"), &stdin) {
            Ok(out) => {
                let result: Value = serde_json::from_slice(&out).context(
                    ErrorKind::Internal,
                    format!("cni plugin {ty} printed an invalid result"),
                )?;
                prev = Some(result);
            }
            Err(e) => {
                let ran = Value::Array(plugins[..=i].to_vec());
                let mut partial = conflist.clone();
                partial["plugins"] = ran;
                if let Err(del) = delete(exec, &partial, inv, prev.as_ref()) {
                    tracing::warn!(error = %del.chain(), "cleanup after failed cni add");
                }
                return Err(e);
            }
        }
    }
    Ok(prev.unwrap_or_else(|| json!({ "cniVersion": conflist["cniVersion"] })))
}

/// CNI DEL of the whole list, last plugin first. Every plugin runs even when one fails; the
/// first error is returned.
pub fn delete(
    exec: &dyn PluginExec,
    conflist: &Value,
    inv: &Invocation<'_>,
    prev_result: Option<&Value>,
) -> Result<()> {
    let plugins = conflist["plugins"].as_array().cloned().unwrap_or_default();
    let mut first_err = None;
    for plugin in plugins.iter().rev() {
        let ty = plugin["type"].as_str().unwrap_or_default();
        let cfg = plugin_config(conflist, plugin, prev_result, inv.runtime_config);
        let stdin = serde_json::to_vec(&cfg).internal(|| "encode cni config".into())?;
        if let Err(e) = exec.exec(ty, &inv.env("DEL"), &stdin) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// The parts of a result berth reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CniResult {
    /// (name, mac, sandbox).
    pub interfaces: Vec<(String, String, String)>,
    /// (address CIDR, gateway, interface index or -1).
    pub ips: Vec<(String, String, i32)>,
    /// Nameservers.
    pub dns_servers: Vec<String>,
    /// Search domains.
    pub dns_search: Vec<String>,
    /// Options.
    pub dns_options: Vec<String>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Reads a result of any spec version (0.2's `ip4`/`ip6`, 0.3+'s `interfaces`/`ips`).
pub fn parse_result(v: &Value) -> CniResult {
    let mut out = CniResult::default();
    for i in v["interfaces"].as_array().into_iter().flatten() {
        out.interfaces.push((
            i["name"].as_str().unwrap_or_default().into(),
            i["mac"].as_str().unwrap_or_default().into(),
            i["sandbox"].as_str().unwrap_or_default().into(),
        ));
    }
    for ip in v["ips"].as_array().into_iter().flatten() {
        out.ips.push((
            ip["address"].as_str().unwrap_or_default().into(),
            ip["gateway"].as_str().unwrap_or_default().into(),
            ip["interface"].as_i64().map_or(-1, |i| i as i32),
        ));
    }
    for key in ["ip4", "ip6"] {
        if let Some(ip) = v[key]["ip"].as_str() {
            out.ips.push((
                ip.into(),
                v[key]["gateway"].as_str().unwrap_or_default().into(),
                -1,
            ));
        }
    }
    out.dns_servers = strings(&v["dns"]["nameservers"]);
    out.dns_search = strings(&v["dns"]["search"]);
    out.dns_options = strings(&v["dns"]["options"]);
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<(String, String, Value)>>,
        fail: Option<&'static str>,
    }

    impl PluginExec for Recorder {
        fn exec(&self, ty: &str, env: &[(String, String)], stdin: &[u8]) -> Result<Vec<u8>> {
            let cmd = env
                .iter()
                .find(|(k, _)| k == "CNI_COMMAND")
                .unwrap()
                .1
                .clone();
            let cfg: Value = serde_json::from_slice(stdin).unwrap();
            self.calls
                .lock()
                .unwrap()
                .push((ty.to_string(), cmd.clone(), cfg));
            if self.fail == Some(ty) && cmd == "ADD" {
                return Err(plugin_error(
                    ty,
                    &cmd,
                    br#"{"code":7,"msg":"bad config","details":"x"}"#,
                    b"",
                ));
            }
            let result = json!({
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/run/netns/a"}],
                "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0}],
                "dns": {"nameservers": ["10.1.0.1"]},
                "by": ty,
            });
            Ok(serde_json::to_vec(&result).unwrap())
        }
    }

    fn conflist() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "k8s",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
                {"type": "portmap", "capabilities": {"portMappings": true}},
            ]
        })
    }

    fn inv<'a>(args: &'a BTreeMap<String, String>, rc: &'a Map<String, Value>) -> Invocation<'a> {
        Invocation {
            container_id: "c1",
            netns: "/run/netns/a",
            ifname: "eth0",
            args,
            runtime_config: rc,
            cni_path: "/usr/lib/cni",
        }
    }

    #[test]
    fn add_chains_results_and_passes_capabilities() {
        let rec = Recorder::default();
        let args = BTreeMap::from([
            ("K8S_POD_NAME".to_string(), "p".to_string()),
            ("A".into(), "b".into()),
        ]);
        let mut rc = Map::new();
        rc.insert(
            "portMappings".into(),
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
        );
        rc.insert("bandwidth".into(), json!({"ingressRate": 1}));
        let result = add(&rec, &conflist(), &inv(&args, &rc)).unwrap();
        assert_eq!(result["by"], "portmap");
        let calls = rec.calls.lock().unwrap();
        assert_eq!(calls.len(), 2);
        let (ty, cmd, bridge_cfg) = &calls[0];
        assert_eq!((ty.as_str(), cmd.as_str()), ("bridge", "ADD"));
        assert_eq!(bridge_cfg["name"], "k8s");
        assert_eq!(bridge_cfg["cniVersion"], "1.0.0");
        assert!(bridge_cfg.get("prevResult").is_none());
        assert!(
            bridge_cfg.get("runtimeConfig").is_none(),
            "bridge declares no capabilities"
        );
        let portmap_cfg = &calls[1].2;
        assert_eq!(portmap_cfg["prevResult"]["by"], "bridge");
        assert_eq!(
            portmap_cfg["runtimeConfig"]["portMappings"][0]["hostPort"],
            8080
        );
        assert!(portmap_cfg["runtimeConfig"].get("bandwidth").is_none());
        let parsed = parse_result(&result);
        assert_eq!(
            parsed.ips,
            [("10.1.0.5/24".to_string(), "10.1.0.1".to_string(), 0)]
        );
        assert_eq!(parsed.dns_servers, ["10.1.0.1"]);
        assert_eq!(
            inv(&args, &rc).env("ADD")[4].1,
            "IgnoreUnknown=1;A=b;K8S_POD_NAME=p"
        );
    }

    #[test]
    fn a_failed_add_deletes_what_ran_in_reverse() {
        let rec = Recorder {
            fail: Some("portmap"),
            ..Default::default()
        };
        let args = BTreeMap::new();
        let rc = Map::new();
        let err = add(&rec, &conflist(), &inv(&args, &rc)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            err.message(),
            "cni plugin portmap (ADD) failed: bad config: x"
        );
        let calls: Vec<(String, String)> = rec
            .calls
            .lock()
            .unwrap()
            .iter()
            .map(|(t, c, _)| (t.clone(), c.clone()))
            .collect();
        let want: Vec<(String, String)> = [
            ("bridge", "ADD"),
            ("portmap", "ADD"),
            ("portmap", "DEL"),
            ("bridge", "DEL"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(calls, want);
    }

    #[test]
    fn configs_from_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("20-b.conflist"), conflist().to_string()).unwrap();
        std::fs::write(
            dir.path().join("10-a.conf"),
            r#"{"cniVersion":"0.4.0","name":"single","type":"bridge","bridge":"x"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("30-bad.conf"), "{").unwrap();
        std::fs::write(dir.path().join("README"), "not a config").unwrap();
        let configs = load_dir(dir.path()).unwrap();
        let names: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["single", "k8s"]);
        assert_eq!(configs[0].plugin_types, ["bridge"]);
        assert_eq!(configs[0].conflist["plugins"][0]["bridge"], "x");
        assert_eq!(configs[1].plugin_types, ["bridge", "portmap"]);
        assert!(load_dir(&dir.path().join("missing")).unwrap().is_empty());
    }

    #[test]
    fn old_results() {
        let r = parse_result(
            &json!({"cniVersion": "0.2.0", "ip4": {"ip": "10.0.0.2/24", "gateway": "10.0.0.1"}}),
        );
        assert_eq!(
            r.ips,
            [("10.0.0.2/24".to_string(), "10.0.0.1".to_string(), -1)]
        );
    }
}
