//! The engine's container records → Docker's inspect and list JSON.

use std::collections::HashMap;

use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::types::v1 as types;
use bollard_stubs::models::{
    ContainerConfig, ContainerInspectResponse, ContainerState, ContainerStateStatusEnum,
    ContainerSummary, ContainerSummaryHostConfig, ContainerSummaryNetworkSettings,
    ContainerSummaryStateEnum, DriverData, EndpointIpamConfig, EndpointSettings, Health,
    HealthConfig, HealthStatusEnum, HealthcheckResult, MountPoint, PortBinding, PortMap,
    PortSummary, PortSummaryTypeEnum,
};
use serde_json::{Value, json};

use super::create::DOCKER_EXTENSION;
use crate::time;

/// Docker's status word for a container.
pub fn status_word(c: &engine::Container) -> &'static str {
    use engine::ContainerStatus as S;
    match status(c) {
        S::Unspecified | S::Created => "created",
        S::Running => "running",
        S::Paused => "paused",
        S::Restarting => "restarting",
        S::Removing => "removing",
        S::Exited => "exited",
        S::Dead => "dead",
    }
}

fn status(c: &engine::Container) -> engine::ContainerStatus {
    c.state
        .as_ref()
        .map(|s| s.status())
        .unwrap_or(engine::ContainerStatus::Created)
}

/// True while the container has a live task (running, paused or restarting), as Docker's
/// `State.Running`.
pub fn is_running(c: &engine::Container) -> bool {
    use engine::ContainerStatus as S;
    matches!(status(c), S::Running | S::Paused | S::Restarting)
}

/// The Docker create body stored with the container, if it was created through this API.
pub fn docker_blob(c: &engine::Container) -> Option<Value> {
    let ext = c.extensions.get(DOCKER_EXTENSION)?;
    if ext.version != super::create::DOCKER_EXTENSION_VERSION {
        return None;
    }
    serde_json::from_slice(&ext.data).ok()
}

fn proto_name(p: i32) -> &'static str {
    match types::Protocol::try_from(p).unwrap_or(types::Protocol::Tcp) {
        types::Protocol::Udp => "udp",
        types::Protocol::Sctp => "sctp",
        types::Protocol::Tcp | types::Protocol::Unspecified => "tcp",
    }
}

/// `80/tcp`.
pub fn port_key(port: u32, protocol: i32) -> String {
    format!("{port}/{}", proto_name(protocol))
}

fn state(c: &engine::Container) -> ContainerState {
    use engine::ContainerStatus as S;
    let st = c.state.clone().unwrap_or_default();
    let word = status_word(c);
    ContainerState {
        status: word.parse::<ContainerStateStatusEnum>().ok(),
        running: Some(is_running(c)),
        paused: Some(status(c) == S::Paused),
        restarting: Some(status(c) == S::Restarting),
        oom_killed: Some(st.oom_killed),
        dead: Some(status(c) == S::Dead),
        pid: Some(i64::from(st.pid)),
        exit_code: Some(i64::from(st.exit_code)),
        error: Some(st.error.clone()),
        started_at: Some(time::rfc3339(st.started_at.as_ref())),
        finished_at: Some(time::rfc3339(st.finished_at.as_ref())),
        health: st.health.as_ref().map(health),
    }
}

/// `State.Health`; Docker leaves it out for a container without a healthcheck.
fn health(h: &types::Health) -> Health {
    Health {
        status: Some(match h.status() {
            types::HealthStatus::Unspecified => HealthStatusEnum::NONE,
            types::HealthStatus::Starting => HealthStatusEnum::STARTING,
            types::HealthStatus::Healthy => HealthStatusEnum::HEALTHY,
            types::HealthStatus::Unhealthy => HealthStatusEnum::UNHEALTHY,
        }),
        failing_streak: Some(i64::from(h.failing_streak)),
        log: Some(
            h.log
                .iter()
                .map(|r| HealthcheckResult {
                    start: Some(time::rfc3339(r.start.as_ref())),
                    end: Some(time::rfc3339(r.end.as_ref())),
                    exit_code: Some(i64::from(r.exit_code)),
                    output: Some(r.output.clone()),
                })
                .collect(),
        ),
    }
}

/// The health part of `docker ps`'s STATUS of a running container, as moby's
/// `Health.String` words it.
fn health_suffix(h: Option<&types::Health>) -> &'static str {
    match h.map(|h| h.status()) {
        Some(types::HealthStatus::Starting) => " (health: starting)",
        Some(types::HealthStatus::Healthy) => " (healthy)",
        Some(types::HealthStatus::Unhealthy) => " (unhealthy)",
        _ => "",
    }
}

fn path_and_args(cfg: &engine::ContainerConfig) -> (String, Vec<String>) {
    let mut argv: Vec<String> = cfg
        .entrypoint
        .as_ref()
        .map(|e| e.values.clone())
        .unwrap_or_default();
    // [""] resets the entrypoint.
    if argv.len() == 1 && argv[0].is_empty() {
        argv.clear();
    }
    argv.extend(
        cfg.cmd
            .as_ref()
            .map(|c| c.values.clone())
            .unwrap_or_default(),
    );
    let mut it = argv.into_iter();
    let path = it.next().unwrap_or_default();
    (path, it.collect())
}

fn container_config(c: &engine::Container) -> ContainerConfig {
    let cfg = c.config.clone().unwrap_or_default();
    let list = |l: &Option<types::StringList>| {
        l.as_ref()
            .map(|l| l.values.clone())
            .filter(|v| !(v.is_empty() || v.len() == 1 && v[0].is_empty()))
    };
    let healthcheck: Option<HealthConfig> = serde_json::from_slice(&cfg.healthcheck).ok();
    let mut exposed: Vec<String> = cfg
        .exposed_ports
        .iter()
        .map(|p| port_key(p.port, p.protocol))
        .collect();
    exposed.sort();
    exposed.dedup();
    ContainerConfig {
        hostname: Some(cfg.hostname.clone()),
        domainname: Some(cfg.domainname.clone()),
        user: Some(cfg.user.clone()),
        attach_stdin: Some(cfg.attach_stdin),
        attach_stdout: Some(cfg.attach_stdout),
        attach_stderr: Some(cfg.attach_stderr),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        tty: Some(cfg.tty),
        open_stdin: Some(cfg.open_stdin),
        stdin_once: Some(cfg.stdin_once),
        env: Some(cfg.env.clone()),
        cmd: list(&cfg.cmd),
        healthcheck,
        args_escaped: None,
        image: Some(c.image.clone()),
        volumes: (!cfg.volumes.is_empty()).then(|| cfg.volumes.clone()),
        working_dir: Some(cfg.working_dir.clone()),
        entrypoint: list(&cfg.entrypoint),
        network_disabled: cfg.network_disabled.then_some(true),
        on_build: (!cfg.on_build.is_empty()).then(|| cfg.on_build.clone()),
        labels: Some(cfg.labels.clone()),
        stop_signal: (!cfg.stop_signal.is_empty()).then(|| cfg.stop_signal.clone()),
        stop_timeout: cfg.stop_timeout.map(i64::from),
        shell: None,
    }
}

fn mount_type_name(t: i32) -> &'static str {
    match engine::MountType::try_from(t).unwrap_or(engine::MountType::Unspecified) {
        engine::MountType::Bind => "bind",
        engine::MountType::Tmpfs => "tmpfs",
        engine::MountType::Image => "image",
        engine::MountType::Volume | engine::MountType::Unspecified => "volume",
    }
}

fn propagation_name(p: i32) -> &'static str {
    use engine::Propagation as P;
    match P::try_from(p).unwrap_or(P::Unspecified) {
        P::Private => "private",
        P::Unspecified | P::Rprivate => "rprivate",
        P::Shared => "shared",
        P::Rshared => "rshared",
        P::Slave => "slave",
        P::Rslave => "rslave",
    }
}

/// A resolved mount as Docker's `MountPoint`.
pub fn mount_point(m: &engine::MountPoint) -> MountPoint {
    let kind = mount_type_name(m.r#type);
    MountPoint {
        typ: Some(kind.to_string()),
        name: (kind == "volume").then(|| m.name.clone()),
        source: Some(m.source.clone()),
        destination: Some(m.destination.clone()),
        driver: (kind == "volume").then(|| {
            if m.driver.is_empty() {
                "local".to_string()
            } else {
                m.driver.clone()
            }
        }),
        mode: Some(m.mode.clone()),
        rw: Some(m.rw),
        propagation: Some(if kind == "bind" {
            propagation_name(m.propagation).to_string()
        } else {
            String::new()
        }),
    }
}

fn endpoint(
    requested: Option<&engine::EndpointConfig>,
    attached: Option<&engine::EndpointSettings>,
) -> EndpointSettings {
    // Borrowed, not cloned: a listing renders one endpoint per container.
    let (no_req, no_att) = (
        engine::EndpointConfig::default(),
        engine::EndpointSettings::default(),
    );
    let req = requested
        .or_else(|| attached.and_then(|a| a.config.as_ref()))
        .unwrap_or(&no_req);
    let att = attached.unwrap_or(&no_att);
    let ipam = (!req.ipv4_address.is_empty()
        || !req.ipv6_address.is_empty()
        || !req.link_local_ips.is_empty())
    .then(|| EndpointIpamConfig {
        ipv4_address: Some(req.ipv4_address.clone()).filter(|s| !s.is_empty()),
        ipv6_address: Some(req.ipv6_address.clone()).filter(|s| !s.is_empty()),
        link_local_ips: (!req.link_local_ips.is_empty()).then(|| req.link_local_ips.clone()),
    });
    let aliases = if att.aliases.is_empty() {
        req.aliases.clone()
    } else {
        att.aliases.clone()
    };
    EndpointSettings {
        ipam_config: ipam,
        links: (!req.links.is_empty()).then(|| req.links.clone()),
        mac_address: Some(if att.mac_address.is_empty() {
            req.mac_address.clone()
        } else {
            att.mac_address.clone()
        }),
        aliases: (!aliases.is_empty()).then_some(aliases),
        driver_opts: (!req.driver_opts.is_empty()).then(|| req.driver_opts.clone()),
        gw_priority: Some(i64::from(req.gw_priority)),
        network_id: Some(att.network_id.clone()),
        endpoint_id: Some(att.endpoint_id.clone()),
        gateway: Some(att.gateway.clone()),
        ip_address: Some(att.ip_address.clone()),
        ip_prefix_len: Some(i64::from(att.ip_prefix_len)),
        ipv6_gateway: Some(att.ipv6_gateway.clone()),
        global_ipv6_address: Some(att.ipv6_address.clone()),
        global_ipv6_prefix_len: Some(i64::from(att.ipv6_prefix_len)),
        dns_names: (!att.dns_names.is_empty()).then(|| att.dns_names.clone()),
    }
}

/// The network mode as Docker shows it ("" and "default" are the default bridge).
pub fn network_mode(c: &engine::Container) -> String {
    let mode = c
        .host_config
        .as_ref()
        .map(|h| h.network_mode.clone())
        .unwrap_or_default();
    match mode.as_str() {
        "" | "default" => "bridge".into(),
        _ => mode,
    }
}

/// The container's networks: those requested, with what is attached filled in.
pub fn networks(c: &engine::Container) -> HashMap<String, EndpointSettings> {
    let attached = c.network_settings.as_ref().map(|n| &n.networks);
    let mut names: Vec<String> = c.networks.keys().cloned().collect();
    for name in attached.into_iter().flat_map(|a| a.keys()) {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    if names.is_empty() {
        let mode = network_mode(c);
        if !mode.starts_with("container:") && mode != "cni" {
            names.push(mode);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let ep = endpoint(c.networks.get(&name), attached.and_then(|a| a.get(&name)));
            (name, ep)
        })
        .collect()
}

/// Published ports: `{"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}`, `null` for
/// exposed-only ports.
pub fn port_map(c: &engine::Container) -> PortMap {
    let mut map = PortMap::new();
    let Some(ns) = &c.network_settings else {
        return map;
    };
    for p in &ns.ports {
        let key = port_key(p.container_port, p.protocol);
        let bindings: Vec<PortBinding> = p
            .host_bindings
            .iter()
            .map(|b| PortBinding {
                host_ip: Some(if b.host_ip.is_empty() {
                    "0.0.0.0".into()
                } else {
                    b.host_ip.clone()
                }),
                host_port: Some(b.host_port.to_string()),
            })
            .collect();
        let entry = map.entry(key).or_insert(None);
        if !bindings.is_empty() {
            entry.get_or_insert_with(Vec::new).extend(bindings);
        }
    }
    map
}

fn host_config(c: &engine::Container, blob: Option<&Value>) -> Value {
    let h = c.host_config.clone().unwrap_or_default();
    let r = h.resources.clone().unwrap_or_default();
    let s = h.security.clone().unwrap_or_default();
    let mut out = blob
        .and_then(|b| b.get("HostConfig"))
        .filter(|v| v.is_object())
        .cloned()
        .unwrap_or_else(|| {
            // Built from the record alone (a container created through another front end).
            let binds: Vec<String> = h
                .mounts
                .iter()
                .filter(|m| {
                    m.r#type == engine::MountType::Bind as i32
                        || m.r#type == engine::MountType::Volume as i32 && !m.source.is_empty()
                })
                .map(|m| {
                    let mut b = format!("{}:{}", m.source, m.target);
                    if !m.mode.is_empty() {
                        b.push(':');
                        b.push_str(&m.mode);
                    } else if m.read_only {
                        b.push_str(":ro");
                    }
                    b
                })
                .collect();
            let port_bindings: serde_json::Map<String, Value> = {
                let mut m = serde_json::Map::new();
                for p in &h.port_bindings {
                    let key = port_key(p.container_port, p.protocol);
                    let host_port = match (p.host_port, p.host_port_end) {
                        (0, _) => String::new(),
                        (a, 0) => a.to_string(),
                        (a, b) => format!("{a}-{b}"),
                    };
                    let list = m.entry(key).or_insert_with(|| json!([]));
                    if let Some(list) = list.as_array_mut() {
                        list.push(json!({"HostIp": p.host_ip, "HostPort": host_port}));
                    }
                }
                m
            };
            let log = h.log_config.clone().unwrap_or_default();
            let rp = h.restart_policy.unwrap_or_default();
            json!({
                "Binds": if binds.is_empty() { Value::Null } else { json!(binds) },
                "ContainerIDFile": "",
                "LogConfig": {"Type": log.r#type, "Config": log.options},
                "NetworkMode": h.network_mode,
                "PortBindings": port_bindings,
                "RestartPolicy": {"Name": restart_name(rp.name), "MaximumRetryCount": rp.max_retries},
                "AutoRemove": h.auto_remove,
                "VolumeDriver": "",
                "VolumesFrom": h.volumes_from,
                "ConsoleSize": h.console_size.map(|s| [s.height, s.width]).unwrap_or([0, 0]),
                "CapAdd": s.cap_add,
                "CapDrop": s.cap_drop,
                "CgroupnsMode": h.cgroupns_mode,
                "Dns": h.dns,
                "DnsOptions": h.dns_options,
                "DnsSearch": h.dns_search,
                "ExtraHosts": h.extra_hosts.iter().flat_map(|e| e.hostnames.iter().map(move |n| format!("{n}:{}", e.ip))).collect::<Vec<_>>(),
                "GroupAdd": h.group_add,
                "IpcMode": h.ipc_mode,
                "Cgroup": "",
                "Links": h.links,
                "OomScoreAdj": h.oom_score_adj,
                "PidMode": h.pid_mode,
                "Privileged": s.privileged,
                "PublishAllPorts": h.publish_all_ports,
                "ReadonlyRootfs": s.read_only_rootfs,
                "SecurityOpt": Value::Null,
                "UTSMode": h.uts_mode,
                "UsernsMode": h.userns_mode,
                "ShmSize": h.shm_size.unwrap_or(0),
                "Sysctls": h.sysctls,
                "Runtime": h.runtime,
                "Isolation": "",
                "CgroupParent": h.cgroup_parent,
                "Devices": h.devices.iter().map(|d| json!({"PathOnHost": d.path_on_host, "PathInContainer": d.path_in_container, "CgroupPermissions": d.cgroup_permissions})).collect::<Vec<_>>(),
                "DeviceCgroupRules": h.device_cgroup_rules,
                "Init": h.init,
                "Annotations": h.annotations,
            })
        });
    let Some(obj) = out.as_object_mut() else {
        return out;
    };
    // Fields that change after create (docker update) come from the record.
    let rp = h.restart_policy.unwrap_or_default();
    obj.insert(
        "RestartPolicy".into(),
        json!({"Name": restart_name(rp.name), "MaximumRetryCount": rp.max_retries}),
    );
    let resources = json!({
        "Memory": r.memory.unwrap_or(0),
        "MemorySwap": r.memory_swap.unwrap_or(0),
        "MemoryReservation": r.memory_reservation.unwrap_or(0),
        "MemorySwappiness": r.memory_swappiness,
        "NanoCpus": r.nano_cpus.unwrap_or(0),
        "CpuShares": r.cpu_shares.unwrap_or(0),
        "CpuPeriod": r.cpu_period.unwrap_or(0),
        "CpuQuota": r.cpu_quota.unwrap_or(0),
        "CpuRealtimePeriod": r.cpu_realtime_period.unwrap_or(0),
        "CpuRealtimeRuntime": r.cpu_realtime_runtime.unwrap_or(0),
        "CpusetCpus": r.cpuset_cpus.clone().unwrap_or_default(),
        "CpusetMems": r.cpuset_mems.clone().unwrap_or_default(),
        "PidsLimit": r.pids_limit,
        "BlkioWeight": r.blkio_weight.unwrap_or(0),
        "OomKillDisable": r.oom_kill_disable,
        "Ulimits": r.ulimits.iter().map(|u| json!({"Name": u.name, "Soft": u.soft, "Hard": u.hard})).collect::<Vec<_>>(),
    });
    if let Some(res) = resources.as_object() {
        for (k, v) in res {
            obj.insert(k.clone(), v.clone());
        }
    }
    // Links as the engine recorded them (`/child:/parent/alias`, removable later), and the
    // runtime it chose.
    obj.insert(
        "Links".into(),
        if h.links.is_empty() {
            Value::Null
        } else {
            json!(h.links)
        },
    );
    if !h.runtime.is_empty() {
        obj.insert("Runtime".into(), json!(h.runtime));
    }
    // Docker's defaults, as its inspect shows them.
    let mode = obj.get("NetworkMode").and_then(Value::as_str).unwrap_or("");
    if mode.is_empty() || mode == "default" {
        obj.insert("NetworkMode".into(), json!("bridge"));
    }
    let log_type = obj
        .get("LogConfig")
        .and_then(|l| l.get("Type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if log_type.is_empty() {
        obj.insert(
            "LogConfig".into(),
            json!({"Type": "json-file", "Config": obj.get("LogConfig").and_then(|l| l.get("Config")).cloned().unwrap_or(json!({}))}),
        );
    }
    if obj.get("ShmSize").and_then(Value::as_i64).unwrap_or(0) == 0 {
        obj.insert("ShmSize".into(), json!(h.shm_size.unwrap_or(64 << 20)));
    }
    out
}

fn restart_name(n: i32) -> &'static str {
    use engine::RestartPolicyName as N;
    match N::try_from(n).unwrap_or(N::No) {
        N::Unspecified | N::No => "no",
        N::Always => "always",
        N::OnFailure => "on-failure",
        N::UnlessStopped => "unless-stopped",
    }
}

fn bridge_endpoint(c: &engine::Container) -> engine::EndpointSettings {
    c.network_settings
        .as_ref()
        .and_then(|n| n.networks.get("bridge").cloned())
        .unwrap_or_default()
}

/// `GET /containers/{id}/json`.
pub fn inspect(c: &engine::Container, size: bool) -> Value {
    let cfg = c.config.clone().unwrap_or_default();
    let (path, args) = path_and_args(&cfg);
    let blob = docker_blob(c);
    let st = c.state.clone().unwrap_or_default();
    let mut mounts: Vec<MountPoint> = c.mounts.iter().map(mount_point).collect();
    mounts.sort_by(|a, b| a.destination.cmp(&b.destination));
    let resp = ContainerInspectResponse {
        id: Some(c.id.clone()),
        created: Some(time::rfc3339(c.created.as_ref())),
        path: Some(path),
        args: Some(args),
        state: Some(state(c)),
        image: Some(c.image_id.clone()),
        resolv_conf_path: Some(c.resolv_conf_path.clone()),
        hostname_path: Some(c.hostname_path.clone()),
        hosts_path: Some(c.hosts_path.clone()),
        log_path: Some(c.log_path.clone()),
        name: Some(format!("/{}", c.name)),
        restart_count: Some(i64::from(st.restart_count)),
        driver: Some(c.snapshotter.clone()),
        platform: Some(if c.platform.is_empty() {
            "linux".into()
        } else {
            c.platform.clone()
        }),
        image_manifest_descriptor: None,
        mount_label: Some(String::new()),
        process_label: Some(String::new()),
        app_armor_profile: Some(c.apparmor_profile.clone()),
        exec_ids: (!c.exec_ids.is_empty()).then(|| c.exec_ids.clone()),
        host_config: None,
        graph_driver: Some(DriverData {
            name: c.snapshotter.clone(),
            data: HashMap::from([("SnapshotKey".to_string(), c.snapshot_key.clone())]),
        }),
        storage: None,
        size_rw: size.then_some(c.size_rw),
        size_root_fs: size.then_some(c.size_root_fs),
        mounts: Some(mounts),
        config: Some(container_config(c)),
        network_settings: None,
    };
    let mut v = serde_json::to_value(resp).unwrap_or_default();
    v["HostConfig"] = host_config(c, blob.as_ref());
    // Docker's HostConfig.Mounts only lists --mount entries; keep the blob's if any.
    let ns = c.network_settings.clone().unwrap_or_default();
    let bridge = bridge_endpoint(c);
    let nets = networks(c);
    v["NetworkSettings"] = json!({
        "Bridge": "",
        "SandboxID": ns.sandbox_key.rsplit('/').next().unwrap_or(""),
        "SandboxKey": ns.sandbox_key,
        "HairpinMode": false,
        "LinkLocalIPv6Address": "",
        "LinkLocalIPv6PrefixLen": 0,
        "Ports": port_map(c),
        "SecondaryIPAddresses": null,
        "SecondaryIPv6Addresses": null,
        "EndpointID": bridge.endpoint_id,
        "Gateway": bridge.gateway,
        "GlobalIPv6Address": bridge.ipv6_address,
        "GlobalIPv6PrefixLen": bridge.ipv6_prefix_len,
        "IPAddress": bridge.ip_address,
        "IPPrefixLen": bridge.ip_prefix_len,
        "IPv6Gateway": bridge.ipv6_gateway,
        "MacAddress": bridge.mac_address,
        "Networks": endpoints_json(&nets),
    });
    v
}

/// Docker sends an endpoint's empty lists and maps as `null` rather than leaving them out.
fn endpoints_json(nets: &HashMap<String, EndpointSettings>) -> Value {
    let mut v = json!(nets);
    for ep in v.as_object_mut().into_iter().flat_map(|m| m.values_mut()) {
        if let Some(ep) = ep.as_object_mut() {
            for key in ["IPAMConfig", "Links", "Aliases", "DriverOpts", "DNSNames"] {
                ep.entry(key).or_insert(Value::Null);
            }
        }
    }
    v
}

/// `docker ps`'s STATUS column.
pub fn status_text(c: &engine::Container) -> String {
    use engine::ContainerStatus as S;
    let st = c.state.clone().unwrap_or_default();
    match status(c) {
        S::Unspecified | S::Created => "Created".into(),
        S::Running | S::Paused => {
            let mut s = format!(
                "Up {}",
                time::human_duration(time::since(st.started_at.as_ref()))
            );
            if status(c) == S::Paused {
                s.push_str(" (Paused)");
            } else {
                s.push_str(health_suffix(st.health.as_ref()));
            }
            s
        }
        S::Restarting => format!(
            "Restarting ({}) {} ago",
            st.exit_code,
            time::human_duration(time::since(st.finished_at.as_ref()))
        ),
        S::Removing => "Removal In Progress".into(),
        S::Dead => "Dead".into(),
        S::Exited => {
            if time::is_zero(st.finished_at.as_ref()) {
                format!("Exited ({})", st.exit_code)
            } else {
                format!(
                    "Exited ({}) {} ago",
                    st.exit_code,
                    time::human_duration(time::since(st.finished_at.as_ref()))
                )
            }
        }
    }
}

fn port_summaries(c: &engine::Container) -> Vec<PortSummary> {
    let mut out = Vec::new();
    let Some(ns) = &c.network_settings else {
        return out;
    };
    for p in &ns.ports {
        let typ = match proto_name(p.protocol) {
            "udp" => PortSummaryTypeEnum::UDP,
            "sctp" => PortSummaryTypeEnum::SCTP,
            _ => PortSummaryTypeEnum::TCP,
        };
        if p.host_bindings.is_empty() {
            out.push(PortSummary {
                ip: None,
                private_port: p.container_port as u16,
                public_port: None,
                typ: Some(typ),
            });
        }
        for b in &p.host_bindings {
            out.push(PortSummary {
                ip: Some(if b.host_ip.is_empty() {
                    "0.0.0.0".into()
                } else {
                    b.host_ip.clone()
                }),
                private_port: p.container_port as u16,
                public_port: Some(b.host_port as u16),
                typ: Some(typ),
            });
        }
    }
    out
}

/// Bytes reserved per entry of a listing: a created container renders to about 560, one with
/// addresses and ports to a few hundred more; untouched reserve costs nothing (a buffer that
/// large is a fresh mapping whose pages are faulted in only when written).
const SUMMARY_JSON_BYTES: usize = 1024;

/// The body of `GET /containers/json`: each entry rendered and written straight into one buffer
/// sized for the whole listing, so a listing of thousands neither holds every rendered entry at
/// once nor copies its buffer each time it would have grown.
pub fn summaries_json(containers: &[engine::Container], size: bool) -> serde_json::Result<Vec<u8>> {
    /// The entries as a JSON array, rendered one at a time while serialising.
    struct Listing<'a>(&'a [engine::Container], bool);
    impl serde::Serialize for Listing<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter().map(|c| summary(c, self.1)))
        }
    }
    let mut out = Vec::with_capacity(2 + containers.len() * SUMMARY_JSON_BYTES);
    serde_json::to_writer(&mut out, &Listing(containers, size))?;
    Ok(out)
}

/// One entry of `GET /containers/json`.
pub fn summary(c: &engine::Container, size: bool) -> ContainerSummary {
    let cfg = c.config.as_ref();
    let (path, args) = cfg.map(path_and_args).unwrap_or_default();
    let command = std::iter::once(path)
        .chain(args)
        .collect::<Vec<_>>()
        .join(" ");
    let mut mounts: Vec<MountPoint> = c.mounts.iter().map(mount_point).collect();
    mounts.sort_by(|a, b| a.destination.cmp(&b.destination));
    ContainerSummary {
        id: Some(c.id.clone()),
        names: Some(vec![format!("/{}", c.name)]),
        image: Some(if c.image.is_empty() {
            c.image_id.clone()
        } else {
            c.image.clone()
        }),
        image_id: Some(c.image_id.clone()),
        image_manifest_descriptor: None,
        command: Some(command),
        created: c.created.as_ref().map(|t| t.seconds),
        ports: Some(port_summaries(c)),
        size_rw: size.then_some(c.size_rw),
        size_root_fs: size.then_some(c.size_root_fs),
        labels: Some(cfg.map(|cfg| cfg.labels.clone()).unwrap_or_default()),
        state: status_word(c).parse::<ContainerSummaryStateEnum>().ok(),
        status: Some(status_text(c)),
        host_config: Some(ContainerSummaryHostConfig {
            network_mode: Some(network_mode(c)),
            annotations: None,
        }),
        network_settings: Some(ContainerSummaryNetworkSettings {
            networks: Some(networks(c)),
        }),
        mounts: Some(mounts),
        health: None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A running container on the default bridge with one published port and a bind.
    pub fn sample() -> engine::Container {
        let now = time::now();
        let blob = serde_json::to_vec(&json!({
            "Image": "busybox",
            "HostConfig": {"Binds": ["/srv:/srv:ro"], "NetworkMode": "default", "Memory": 0}
        }))
        .unwrap();
        engine::Container {
            id: "a".repeat(64),
            name: "web".into(),
            created: Some(now),
            image: "busybox".into(),
            image_id: format!("sha256:{}", "b".repeat(64)),
            config: Some(engine::ContainerConfig {
                image: "busybox".into(),
                cmd: Some(types::StringList {
                    values: vec!["httpd".into(), "-f".into()],
                }),
                env: vec!["PATH=/bin".into()],
                exposed_ports: vec![types::ExposedPort {
                    port: 80,
                    protocol: types::Protocol::Tcp as i32,
                }],
                labels: HashMap::from([("app".to_string(), "web".to_string())]),
                ..Default::default()
            }),
            host_config: Some(engine::HostConfig {
                resources: Some(engine::Resources {
                    memory: Some(1 << 20),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            state: Some(engine::ContainerState {
                status: engine::ContainerStatus::Running as i32,
                pid: 42,
                started_at: Some(now),
                ..Default::default()
            }),
            network_settings: Some(engine::NetworkSettings {
                networks: HashMap::from([(
                    "bridge".to_string(),
                    engine::EndpointSettings {
                        network_id: "n".repeat(64),
                        ip_address: "172.29.0.2".into(),
                        ip_prefix_len: 16,
                        gateway: "172.29.0.1".into(),
                        mac_address: "02:42:ac:1d:00:02".into(),
                        ..Default::default()
                    },
                )]),
                ports: vec![engine::PortStatus {
                    container_port: 80,
                    protocol: types::Protocol::Tcp as i32,
                    host_bindings: vec![engine::HostPortBinding {
                        host_ip: "127.0.0.1".into(),
                        host_port: 8080,
                    }],
                }],
                sandbox_key: "/run/berth/netns/abc".into(),
            }),
            mounts: vec![engine::MountPoint {
                r#type: engine::MountType::Bind as i32,
                source: "/srv".into(),
                destination: "/srv".into(),
                mode: "ro".into(),
                rw: false,
                ..Default::default()
            }],
            extensions: HashMap::from([(
                DOCKER_EXTENSION.to_string(),
                types::Extension {
                    version: 1,
                    data: blob,
                },
            )]),
            snapshotter: "overlayfs".into(),
            ..Default::default()
        }
    }

    #[test]
    fn inspect_has_docker_shape() {
        let v = inspect(&sample(), false);
        assert_eq!(v["Id"], "a".repeat(64));
        assert_eq!(v["Name"], "/web");
        assert_eq!(v["Path"], "httpd");
        assert_eq!(v["Args"], json!(["-f"]));
        assert_eq!(v["State"]["Status"], "running");
        assert_eq!(v["State"]["Running"], true);
        assert_eq!(v["State"]["Pid"], 42);
        assert_eq!(v["State"]["FinishedAt"], time::ZERO_TIME);
        assert_eq!(v["Config"]["Image"], "busybox");
        assert_eq!(v["Config"]["ExposedPorts"], json!({"80/tcp": {}}));
        assert_eq!(v["Config"]["Labels"]["app"], "web");
        assert!(v["Config"]["Entrypoint"].is_null());
        assert_eq!(v["HostConfig"]["Binds"], json!(["/srv:/srv:ro"]));
        assert_eq!(v["HostConfig"]["NetworkMode"], "bridge");
        assert_eq!(v["HostConfig"]["Memory"], 1 << 20);
        assert_eq!(v["HostConfig"]["LogConfig"]["Type"], "json-file");
        assert_eq!(v["HostConfig"]["RestartPolicy"]["Name"], "no");
        assert_eq!(v["NetworkSettings"]["IPAddress"], "172.29.0.2");
        assert_eq!(v["NetworkSettings"]["Gateway"], "172.29.0.1");
        assert_eq!(v["NetworkSettings"]["MacAddress"], "02:42:ac:1d:00:02");
        assert_eq!(
            v["NetworkSettings"]["Ports"]["80/tcp"],
            json!([{"HostIp": "127.0.0.1", "HostPort": "8080"}])
        );
        assert_eq!(
            v["NetworkSettings"]["Networks"]["bridge"]["IPAddress"],
            "172.29.0.2"
        );
        let bridge = v["NetworkSettings"]["Networks"]["bridge"]
            .as_object()
            .unwrap();
        for key in ["IPAMConfig", "Links", "Aliases", "DriverOpts"] {
            assert_eq!(bridge.get(key), Some(&Value::Null), "{key}");
        }
        assert_eq!(v["Mounts"][0]["Type"], "bind");
        assert_eq!(v["Mounts"][0]["RW"], false);
        assert_eq!(v["Mounts"][0]["Propagation"], "rprivate");
        assert!(v.get("SizeRw").is_none());
    }

    #[test]
    fn listing_body_is_the_entries_rendered_one_by_one() {
        let mut created = sample();
        created.id = "c".repeat(64);
        created.name = "idle".into();
        created.state = Some(engine::ContainerState {
            status: engine::ContainerStatus::Created as i32,
            ..Default::default()
        });
        created.network_settings = None;
        let list = [sample(), created, engine::Container::default()];
        for size in [false, true] {
            let body = summaries_json(&list, size).unwrap();
            let want: Vec<_> = list.iter().map(|c| summary(c, size)).collect();
            let got: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(got, serde_json::to_value(&want).unwrap());
            assert_eq!(
                got[1]["NetworkSettings"]["Networks"]["bridge"]["IPAddress"],
                ""
            );
        }
        assert_eq!(summaries_json(&[], false).unwrap(), b"[]");
    }

    #[test]
    fn health_in_status_texts_and_inspect() {
        let mut c = sample();
        assert!(!status_text(&c).contains('('));
        assert!(state(&c).health.is_none());
        let st = c.state.as_mut().unwrap();
        st.health = Some(types::Health {
            status: types::HealthStatus::Starting.into(),
            failing_streak: 2,
            log: vec![types::HealthcheckResult {
                start: st.started_at,
                end: st.started_at,
                exit_code: 1,
                output: "no\n".into(),
            }],
            pid: 42,
        });
        assert!(status_text(&c).ends_with(" (health: starting)"));
        let h = serde_json::to_value(state(&c).health).unwrap();
        assert_eq!(h["Status"], "starting");
        assert_eq!(h["FailingStreak"], 2);
        assert_eq!(h["Log"][0]["ExitCode"], 1);
        assert_eq!(h["Log"][0]["Output"], "no\n");
        let set = |c: &mut engine::Container, s: types::HealthStatus| {
            c.state.as_mut().unwrap().health.as_mut().unwrap().status = s.into();
        };
        set(&mut c, types::HealthStatus::Healthy);
        assert!(status_text(&c).ends_with(" (healthy)"));
        set(&mut c, types::HealthStatus::Unhealthy);
        assert!(status_text(&c).ends_with(" (unhealthy)"));
        // Docker shows (Paused) only for a paused container.
        c.state.as_mut().unwrap().status = engine::ContainerStatus::Paused as i32;
        assert!(status_text(&c).ends_with(" (Paused)"));
    }

    #[test]
    fn summaries_and_status_texts() {
        let mut c = sample();
        let s = serde_json::to_value(summary(&c, false)).unwrap();
        assert_eq!(s["Names"], json!(["/web"]));
        assert_eq!(s["Command"], "httpd -f");
        assert_eq!(s["State"], "running");
        assert!(s["Status"].as_str().unwrap().starts_with("Up "));
        assert_eq!(
            s["Ports"],
            json!([{"IP": "127.0.0.1", "PrivatePort": 80, "PublicPort": 8080, "Type": "tcp"}])
        );
        assert_eq!(s["HostConfig"]["NetworkMode"], "bridge");
        let state = c.state.as_mut().unwrap();
        state.status = engine::ContainerStatus::Exited as i32;
        state.exit_code = 3;
        state.finished_at = Some(prost_types::Timestamp {
            seconds: time::now().seconds - 120,
            nanos: 0,
        });
        assert_eq!(status_text(&c), "Exited (3) 2 minutes ago");
        c.state.as_mut().unwrap().status = engine::ContainerStatus::Paused as i32;
        assert!(status_text(&c).ends_with("(Paused)"));
        c.state = None;
        assert_eq!(status_text(&c), "Created");
        let v = inspect(&c, true);
        assert_eq!(v["State"]["Status"], "created");
        assert_eq!(v["SizeRw"], 0);
    }

    #[test]
    fn inspect_without_a_docker_blob_is_built_from_the_record() {
        let mut c = sample();
        c.extensions.clear();
        c.host_config.as_mut().unwrap().mounts = vec![engine::MountSpec {
            r#type: engine::MountType::Volume as i32,
            source: "data".into(),
            target: "/data".into(),
            ..Default::default()
        }];
        let v = inspect(&c, false);
        assert_eq!(v["HostConfig"]["Binds"], json!(["data:/data"]));
        assert_eq!(v["HostConfig"]["NetworkMode"], "bridge");
        assert_eq!(v["HostConfig"]["ShmSize"], 64 << 20);
    }
}
