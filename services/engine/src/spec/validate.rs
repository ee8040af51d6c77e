//! Create-time checks of options the engine could otherwise only accept and ignore, or fail on
//! late: log driver options, namespace modes, devices, and bind propagation that the host mount
//! under the source cannot give. Docker's messages where Docker has them.

use std::path::{Component, Path, PathBuf};

use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as pb;

/// Options every driver takes (Docker's built-ins), then each driver's own: what Docker knows
/// and what berth's shim honours.
fn driver_opts(driver: &str) -> Option<(&'static [&'static str], &'static [&'static str])> {
    Some(match driver {
        "json-file" => (
            &[
                "max-file",
                "max-size",
                "compress",
                "labels",
                "labels-regex",
                "env",
                "env-regex",
                "tag",
            ],
            &["max-file", "max-size", "labels", "env"],
        ),
        "local" => (
            &["max-file", "max-size", "compress"],
            &["max-file", "max-size"],
        ),
        "cri" => (&["path"], &["path"]),
        _ => return None,
    })
}

/// A container's log config, with `default_driver` for an empty type. `none` takes anything,
/// as in Docker; an option Docker knows but berth's shim does not honour is refused.
pub fn log_config(lc: &pb::LogConfig, default_driver: &str) -> Result<()> {
    let driver = if lc.r#type.is_empty() {
        default_driver
    } else {
        lc.r#type.as_str()
    };
    if driver == "none" {
        return Ok(());
    }
    let opts = &lc.options;
    match opts.get("mode").map(String::as_str) {
        None | Some("") | Some("blocking") => {}
        Some("non-blocking") => {
            return Err(Error::invalid_argument(
                "logger: mode 'non-blocking' is not supported by berth: the shim writes the log itself, blocking",
            ));
        }
        Some(other) => {
            return Err(Error::invalid_argument(format!(
                "logger: logging mode not supported: {other}"
            )));
        }
    }
    if opts.contains_key("max-buffer-size") {
        return Err(Error::invalid_argument(
            "logger: max-buffer-size option is only supported with 'mode=non-blocking'",
        ));
    }
    let Some((known, honoured)) = driver_opts(driver) else {
        return Err(Error::invalid_argument(format!(
            "logger: no log driver named '{driver}' is registered"
        )));
    };
    let mut keys: Vec<&String> = opts.keys().filter(|k| k.as_str() != "mode").collect();
    keys.sort();
    for key in keys {
        let value = &opts[key];
        if !known.contains(&key.as_str()) {
            return Err(Error::invalid_argument(if driver == "json-file" {
                format!("unknown log opt '{key}' for json-file log driver")
            } else {
                format!("unknown log opt '{key}' for log driver {driver}")
            }));
        }
        let harmless = key == "compress" && value == "false";
        if !honoured.contains(&key.as_str()) && !harmless {
            return Err(Error::invalid_argument(format!(
                "log opt '{key}' of the {driver} log driver is not supported by berth"
            )));
        }
    }
    if driver == "cri" {
        // The kubelet reads the file at exactly this path; a relative or dot-dot path would
        // land where it never looks.
        let path = opts.get("path").map(String::as_str).unwrap_or("");
        let p = Path::new(path);
        if !p.is_absolute()
            || p.components().any(|c| c == Component::ParentDir)
            || path.ends_with('/')
        {
            return Err(Error::invalid_argument(format!(
                "logger: the cri log driver needs an absolute file path, not {path:?}"
            )));
        }
    }
    if let Some(size) = opts.get("max-size") {
        match crate::engine::parse_size(size) {
            None => {
                return Err(Error::invalid_argument(format!("invalid size: '{size}'")));
            }
            Some(n) if n <= 0 => {
                return Err(Error::invalid_argument(
                    "max-size must be a positive number",
                ));
            }
            Some(_) => {}
        }
    }
    if let Some(files) = opts.get("max-file") {
        let n: i64 = files.parse().map_err(|_| {
            Error::invalid_argument(format!("strconv.Atoi: parsing \"{files}\": invalid syntax"))
        })?;
        if n < 1 {
            return Err(Error::invalid_argument("max-file cannot be less than 1"));
        }
    }
    Ok(())
}

/// Docker's namespace mode words (`container:<name>` checked by the caller).
pub fn namespace_modes(hc: &pb::HostConfig) -> Result<()> {
    let joins = |m: &str| m.strip_prefix("container:").is_some_and(|c| !c.is_empty());
    let ipc = hc.ipc_mode.as_str();
    if !(matches!(ipc, "" | "private" | "shareable" | "host" | "none") || joins(ipc)) {
        return Err(Error::invalid_argument(format!("invalid IPC mode: {ipc}")));
    }
    if !(matches!(hc.pid_mode.as_str(), "" | "host") || joins(&hc.pid_mode)) {
        return Err(Error::invalid_argument(format!(
            "invalid PID mode: {}",
            hc.pid_mode
        )));
    }
    if !matches!(hc.uts_mode.as_str(), "" | "host") {
        return Err(Error::invalid_argument(format!(
            "invalid UTS mode: {}",
            hc.uts_mode
        )));
    }
    if !matches!(hc.cgroupns_mode.as_str(), "" | "private" | "host") {
        return Err(Error::invalid_argument(format!(
            "invalid cgroup namespace mode: {}",
            hc.cgroupns_mode
        )));
    }
    if !matches!(hc.userns_mode.as_str(), "" | "host") {
        return Err(Error::invalid_argument(format!(
            "invalid user namespace mode {:?}: only \"host\" (or none, the daemon's default) is supported",
            hc.userns_mode
        )));
    }
    Ok(())
}

/// With a container id map (userns-remap, rootless), what a user namespace of the container's
/// own cannot have, refused as moby refuses it (unless `--userns=host`).
pub fn remapped(hc: &pb::HostConfig) -> Result<()> {
    if hc.userns_mode == "host" {
        return Ok(());
    }
    let privileged = hc.security.as_ref().is_some_and(|s| s.privileged);
    if privileged {
        return Err(Error::invalid_argument(
            "privileged mode is incompatible with user namespaces.  You must run the container in the host namespace when running privileged mode",
        ));
    }
    if hc.network_mode == "host" {
        return Err(Error::invalid_argument(
            "cannot share the host's network namespace when user namespaces are enabled",
        ));
    }
    if hc.pid_mode == "host" {
        return Err(Error::invalid_argument(
            "cannot share the host PID namespace when user namespaces are enabled",
        ));
    }
    // Another container's IPC and PID namespaces belong to its own user namespace: this one
    // could not mount its mqueue or /proc there (and the runtime joins a user namespace before
    // the network namespace the engine made, which the host owns).
    for (mode, what) in [(&hc.ipc_mode, "IPC"), (&hc.pid_mode, "PID")] {
        if mode.starts_with("container:") {
            return Err(Error::invalid_argument(format!(
                "cannot share the {what} namespace of another container when user namespaces are enabled (use --userns=host)"
            )));
        }
    }
    Ok(())
}

/// `--device`: the host path must be a device node (or a directory of them).
pub fn devices(mappings: &[pb::DeviceMapping]) -> Result<()> {
    for d in mappings {
        if let Err(e) = std::fs::metadata(&d.path_on_host) {
            let why = if e.kind() == std::io::ErrorKind::NotFound {
                "no such file or directory".to_string()
            } else {
                e.to_string().to_lowercase()
            };
            return Err(Error::invalid_argument(format!(
                "error gathering device information while adding custom device \"{}\": {why}",
                d.path_on_host
            )));
        }
    }
    Ok(())
}

/// The mount that holds `path` in a mountinfo text: its mount point and whether it is shared
/// and/or a slave (`shared:N`, `master:N` optional fields).
pub fn holding_mount(mountinfo: &str, path: &Path) -> Option<(PathBuf, bool, bool)> {
    let mut best: Option<(PathBuf, bool, bool)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let Some(point) = fields.get(4) else {
            continue;
        };
        let point = PathBuf::from(point.replace("\\040", " "));
        if !path.starts_with(&point) {
            continue;
        }
        let optional = &fields[6.min(sep)..sep];
        let shared = optional.iter().any(|f| f.starts_with("shared:"));
        let slave = optional.iter().any(|f| f.starts_with("master:"));
        // Later lines are mounted over earlier ones at the same point.
        if best
            .as_ref()
            .is_none_or(|(b, _, _)| point.as_os_str().len() >= b.as_os_str().len())
        {
            best = Some((point, shared, slave));
        }
    }
    best
}

/// Where a bind source is on the host: itself, or for a source created at start, its nearest
/// existing ancestor; symlinks resolved.
pub fn host_path(source: &str) -> PathBuf {
    let mut path = PathBuf::from(source);
    while !path.exists() && path.pop() {}
    path.canonicalize().unwrap_or(path)
}

/// `rshared`/`shared` binds need the host mount under the source to be shared, `rslave`/`slave`
/// shared or a slave, or the propagation asked for cannot happen (Docker's words).
pub fn bind_propagation(
    mounts: &[pb::MountSpec],
    mountinfo: &str,
    resolve: impl Fn(&str) -> PathBuf,
) -> Result<()> {
    for m in mounts {
        if m.r#type() != pb::MountType::Bind {
            continue;
        }
        let prop = m.bind.as_ref().map(|b| b.propagation()).unwrap_or_default();
        let need_shared = matches!(prop, pb::Propagation::Shared | pb::Propagation::Rshared);
        let need_slave = matches!(prop, pb::Propagation::Slave | pb::Propagation::Rslave);
        if !need_shared && !need_slave {
            continue;
        }
        let path = resolve(&m.source);
        let Some((point, shared, slave)) = holding_mount(mountinfo, &path) else {
            continue;
        };
        if need_shared && !shared {
            return Err(Error::invalid_argument(format!(
                "path {} is mounted on {} but it is not a shared mount",
                m.source,
                point.display()
            )));
        }
        if need_slave && !shared && !slave {
            return Err(Error::invalid_argument(format!(
                "path {} is mounted on {} but it is not a shared or slave mount",
                m.source,
                point.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lc(t: &str, opts: &[(&str, &str)]) -> pb::LogConfig {
        pb::LogConfig {
            r#type: t.into(),
            options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn msg(r: Result<()>) -> String {
        r.unwrap_err().message().to_string()
    }

    #[test]
    fn log_drivers_and_options() {
        log_config(
            &lc("", &[("max-size", "10m"), ("max-file", "3")]),
            "json-file",
        )
        .unwrap();
        log_config(&lc("none", &[("whatever", "1")]), "json-file").unwrap();
        log_config(&lc("json-file", &[("compress", "false")]), "json-file").unwrap();
        assert_eq!(
            msg(log_config(&lc("syslog", &[]), "json-file")),
            "logger: no log driver named 'syslog' is registered"
        );
        assert_eq!(
            msg(log_config(&lc("json-file", &[("x", "1")]), "json-file")),
            "unknown log opt 'x' for json-file log driver"
        );
        assert_eq!(
            msg(log_config(&lc("local", &[("x", "1")]), "json-file")),
            "unknown log opt 'x' for log driver local"
        );
        assert!(msg(log_config(&lc("json-file", &[("tag", "t")]), "")).contains("not supported"));
        assert_eq!(
            msg(log_config(&lc("json-file", &[("max-file", "0")]), "")),
            "max-file cannot be less than 1"
        );
        assert_eq!(
            msg(log_config(&lc("json-file", &[("mode", "fast")]), "")),
            "logger: logging mode not supported: fast"
        );
        log_config(&lc("cri", &[("path", "/var/log/pods/p/c/0.log")]), "").unwrap();
        for bad in ["", "c/0.log", "/var/log/pods/../x.log", "/var/log/pods/"] {
            assert!(
                msg(log_config(&lc("cri", &[("path", bad)]), "")).contains("absolute file path"),
                "{bad}"
            );
        }
    }

    #[test]
    fn modes() {
        let hc = |f: fn(&mut pb::HostConfig)| {
            let mut h = pb::HostConfig::default();
            f(&mut h);
            namespace_modes(&h)
        };
        hc(|h| h.ipc_mode = "shareable".into()).unwrap();
        hc(|h| h.pid_mode = "container:web".into()).unwrap();
        assert_eq!(
            msg(hc(|h| h.pid_mode = "bogus".into())),
            "invalid PID mode: bogus"
        );
        assert_eq!(msg(hc(|h| h.uts_mode = "x".into())), "invalid UTS mode: x");
        assert!(msg(hc(|h| h.userns_mode = "private".into())).contains("user namespace"));
        let remap = |f: fn(&mut pb::HostConfig)| {
            let mut h = pb::HostConfig::default();
            f(&mut h);
            remapped(&h).err().map(|e| e.message().to_string())
        };
        assert!(
            remap(|h| h.network_mode = "host".into())
                .unwrap()
                .contains("host's network")
        );
        assert!(
            remap(|h| h.pid_mode = "host".into())
                .unwrap()
                .contains("host PID")
        );
        assert!(
            remap(|h| h.security = Some(pb::SecurityOptions {
                privileged: true,
                ..Default::default()
            }))
            .unwrap()
            .starts_with("privileged mode is incompatible")
        );
        assert_eq!(
            remap(|h| {
                h.userns_mode = "host".into();
                h.network_mode = "host".into();
            }),
            None
        );
        assert_eq!(remap(|h| h.ipc_mode = "host".into()), None);
        assert!(
            remap(|h| h.ipc_mode = "container:x".into())
                .unwrap()
                .contains("IPC namespace")
        );
        assert!(
            remap(|h| h.pid_mode = "container:x".into())
                .unwrap()
                .contains("PID namespace")
        );
        assert_eq!(remap(|h| h.network_mode = "container:x".into()), None);
    }

    #[test]
    fn missing_devices() {
        devices(&[pb::DeviceMapping {
            path_on_host: "/dev/null".into(),
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(
            msg(devices(&[pb::DeviceMapping {
                path_on_host: "/dev/berth-nope".into(),
                ..Default::default()
            }])),
            "error gathering device information while adding custom device \"/dev/berth-nope\": no such file or directory"
        );
    }

    #[test]
    fn propagation_needs_a_shared_host_mount() {
        let info = "22 1 8:1 / / rw,relatime - ext4 /dev/vda rw\n\
                    30 22 0:5 / /srv rw shared:7 - tmpfs tmpfs rw\n\
                    31 22 0:6 / /slave rw master:7 - tmpfs tmpfs rw\n";
        assert_eq!(
            holding_mount(info, Path::new("/srv/a")),
            Some((PathBuf::from("/srv"), true, false))
        );
        let bind = |src: &str, p: pb::Propagation| pb::MountSpec {
            r#type: pb::MountType::Bind as i32,
            source: src.into(),
            target: "/in".into(),
            bind: Some(pb::BindOptions {
                propagation: p as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        bind_propagation(
            &[bind("/srv/x", pb::Propagation::Rshared)],
            info,
            |s: &str| PathBuf::from(s),
        )
        .unwrap();
        bind_propagation(
            &[bind("/slave/x", pb::Propagation::Rslave)],
            info,
            |s: &str| PathBuf::from(s),
        )
        .unwrap();
        bind_propagation(
            &[bind("/data", pb::Propagation::Rprivate)],
            info,
            |s: &str| PathBuf::from(s),
        )
        .unwrap();
        assert_eq!(
            msg(bind_propagation(
                &[bind("/data", pb::Propagation::Rshared)],
                info,
                |s: &str| PathBuf::from(s)
            )),
            "path /data is mounted on / but it is not a shared mount"
        );
        assert_eq!(
            msg(bind_propagation(
                &[bind("/data", pb::Propagation::Rslave)],
                info,
                |s: &str| PathBuf::from(s)
            )),
            "path /data is mounted on / but it is not a shared or slave mount"
        );
        assert!(
            bind_propagation(
                &[bind("/slave/x", pb::Propagation::Shared)],
                info,
                |s: &str| PathBuf::from(s)
            )
            .is_err()
        );
    }
}
