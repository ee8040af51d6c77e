//! `POST /containers/create`: Docker's create body → the engine's `CreateContainerRequest`.
//!
//! Everything the engine models is translated into its typed fields; the body as the client sent
//! it is also kept as the versioned `extensions["docker"]` blob, so inspect can return Docker-only
//! fields (`Binds` as written, `Tmpfs`, `ContainerIDFile`, ...) verbatim.

use std::collections::HashMap;

use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::types::v1 as types;
use bollard_stubs::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, Mount, MountBindOptionsPropagationEnum,
    MountType, RestartPolicyNameEnum,
};

/// Key of the Docker blob in a container's extensions.
pub const DOCKER_EXTENSION: &str = "docker";
/// Version of the blob's schema: 1 = the create body as the client sent it (JSON).
pub const DOCKER_EXTENSION_VERSION: u32 = 1;

/// Field names of the create body (ContainerConfig + HostConfig + NetworkingConfig), as the
/// v1.45 spec spells them. dockerd decodes JSON with Go's case-insensitive field matching, and
/// some clients rely on it (docker-py sends `CPURealtimePeriod`); berth matches the same way
/// instead of dropping such a field.
const CONFIG_KEYS: &[&str] = &[
    "Hostname",
    "Domainname",
    "User",
    "AttachStdin",
    "AttachStdout",
    "AttachStderr",
    "ExposedPorts",
    "Tty",
    "OpenStdin",
    "StdinOnce",
    "Env",
    "Cmd",
    "Healthcheck",
    "ArgsEscaped",
    "Image",
    "Volumes",
    "WorkingDir",
    "Entrypoint",
    "NetworkDisabled",
    "MacAddress",
    "OnBuild",
    "Labels",
    "StopSignal",
    "StopTimeout",
    "Shell",
    "HostConfig",
    "NetworkingConfig",
];

/// Resources' fields: in HostConfig and in an update body.
const RESOURCES_KEYS: &[&str] = &[
    "CpuShares",
    "Memory",
    "CgroupParent",
    "BlkioWeight",
    "BlkioWeightDevice",
    "BlkioDeviceReadBps",
    "BlkioDeviceWriteBps",
    "BlkioDeviceReadIOps",
    "BlkioDeviceWriteIOps",
    "CpuPeriod",
    "CpuQuota",
    "CpuRealtimePeriod",
    "CpuRealtimeRuntime",
    "CpusetCpus",
    "CpusetMems",
    "Devices",
    "DeviceCgroupRules",
    "DeviceRequests",
    "KernelMemoryTCP",
    "MemoryReservation",
    "MemorySwap",
    "MemorySwappiness",
    "NanoCpus",
    "OomKillDisable",
    "Init",
    "PidsLimit",
    "Ulimits",
    "CpuCount",
    "CpuPercent",
    "IOMaximumIOps",
    "IOMaximumBandwidth",
];

/// HostConfig's own fields (besides Resources).
const HOST_CONFIG_KEYS: &[&str] = &[
    "Binds",
    "ContainerIDFile",
    "LogConfig",
    "NetworkMode",
    "PortBindings",
    "RestartPolicy",
    "AutoRemove",
    "VolumeDriver",
    "VolumesFrom",
    "Mounts",
    "ConsoleSize",
    "Annotations",
    "CapAdd",
    "CapDrop",
    "CgroupnsMode",
    "Dns",
    "DnsOptions",
    "DnsSearch",
    "ExtraHosts",
    "GroupAdd",
    "IpcMode",
    "Cgroup",
    "Links",
    "OomScoreAdj",
    "PidMode",
    "Privileged",
    "PublishAllPorts",
    "ReadonlyRootfs",
    "SecurityOpt",
    "StorageOpt",
    "Tmpfs",
    "UTSMode",
    "UsernsMode",
    "ShmSize",
    "Sysctls",
    "Runtime",
    "Isolation",
    "MaskedPaths",
    "ReadonlyPaths",
];

/// The update body's fields: Resources and RestartPolicy.
pub const UPDATE_KEYS: &[&[&str]] = &[RESOURCES_KEYS, &["RestartPolicy"]];

/// Renames the keys of `v` (an object) that match one of the `known` lists ignoring case to its
/// spelling, as Go's JSON decoding matches them.
pub fn canonical_keys(v: &mut serde_json::Value, known: &[&[&str]]) {
    let known = || known.iter().flat_map(|list| list.iter());
    let Some(obj) = v.as_object_mut() else {
        return;
    };
    let renames: Vec<(String, &str)> = obj
        .keys()
        .filter(|k| !known().any(|c| c == k))
        .filter_map(|k| {
            known()
                .find(|c| c.eq_ignore_ascii_case(k))
                .map(|c| (k.clone(), *c))
        })
        .collect();
    for (from, to) in renames {
        if let Some(value) = obj.remove(&from)
            && !obj.contains_key(to)
        {
            obj.insert(to.to_string(), value);
        }
    }
}

/// Parses a create body (kept verbatim as the Docker extension) into the engine's request.
pub fn create_request(
    name: &str,
    platform: &str,
    body: &[u8],
) -> Result<engine::CreateContainerRequest> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::invalid_argument(
            "config cannot be empty in order to create a container",
        ));
    }
    let mut raw: serde_json::Value = crate::errors::parse_json(body)?;
    canonical_keys(&mut raw, &[CONFIG_KEYS]);
    if let Some(h) = raw.get_mut("HostConfig") {
        canonical_keys(h, &[RESOURCES_KEYS, HOST_CONFIG_KEYS]);
    }
    let body = &serde_json::to_vec(&raw)
        .map_err(|e| Error::internal("re-encode the create body").with_source(e))?;
    let create: ContainerCreateBody = crate::errors::parse_json(body)?;
    let name = if name.is_empty() {
        String::new()
    } else {
        berth_core::id::validate_name(name)?.to_string()
    };
    let mut extensions = HashMap::new();
    extensions.insert(
        DOCKER_EXTENSION.to_string(),
        types::Extension {
            version: DOCKER_EXTENSION_VERSION,
            data: body.to_vec(),
        },
    );
    let host = create.host_config.clone().unwrap_or_default();
    refuse_unsupported(
        &host,
        create
            .networking_config
            .as_ref()
            .and_then(|n| n.endpoints_config.as_ref())
            .unwrap_or(&HashMap::new()),
    )?;
    for field in ["KernelMemory", "KernelMemoryTCP"] {
        if raw
            .pointer(&format!("/HostConfig/{field}"))
            .and_then(serde_json::Value::as_i64)
            .is_some_and(|v| v != 0)
        {
            return Err(Error::invalid_argument(format!(
                "{field} is not supported by berth: kernel memory limits are deprecated in the kernel"
            )));
        }
    }
    if host.shm_size.is_some_and(|s| s < 0) {
        return Err(Error::invalid_argument("SHM size can not be less than 0"));
    }
    let mut config = container_config(&create)?;
    if let Some(mac) = raw.get("MacAddress").and_then(|m| m.as_str()) {
        config.mac_address = mac.to_string();
    }
    let networks = create
        .networking_config
        .as_ref()
        .and_then(|n| n.endpoints_config.as_ref())
        .map(|eps| {
            eps.iter()
                .map(|(name, ep)| {
                    let name = if name == "default" { "bridge" } else { name };
                    (name.to_string(), endpoint_config(ep))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(engine::CreateContainerRequest {
        name,
        config: Some(config),
        host_config: Some(host_config(&host)?),
        networks,
        platform: parse_platform(platform)?,
        extensions,
        snapshotter: String::new(),
    })
}

/// `os[/arch[/variant]]` → a platform; empty → unset.
pub fn parse_platform(s: &str) -> Result<Option<types::Platform>> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    let parts: Vec<&str> = s.trim().split('/').collect();
    if parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
        return Err(Error::invalid_argument(format!(
            "\"{s}\": unknown operating system or architecture: invalid argument"
        )));
    }
    Ok(Some(types::Platform {
        os: parts[0].to_ascii_lowercase(),
        architecture: parts
            .get(1)
            .map(|a| a.to_ascii_lowercase())
            .unwrap_or_default(),
        variant: parts
            .get(2)
            .map(|v| v.to_ascii_lowercase())
            .unwrap_or_default(),
        ..Default::default()
    }))
}

fn string_list(v: &Option<Vec<String>>) -> Option<types::StringList> {
    v.as_ref().map(|values| types::StringList {
        values: values.clone(),
    })
}

/// `80`, `80/tcp`, `53/udp` → an exposed port.
pub fn parse_port(spec: &str) -> Result<types::ExposedPort> {
    let (port, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
    let port: u32 = port
        .parse()
        .ok()
        .filter(|p| (1..=65535).contains(p))
        .ok_or_else(|| {
            Error::invalid_argument(format!("invalid port specification: \"{spec}\""))
        })?;
    Ok(types::ExposedPort {
        port,
        protocol: parse_protocol(proto)? as i32,
    })
}

fn parse_protocol(p: &str) -> Result<types::Protocol> {
    match p.to_ascii_lowercase().as_str() {
        "" | "tcp" => Ok(types::Protocol::Tcp),
        "udp" => Ok(types::Protocol::Udp),
        "sctp" => Ok(types::Protocol::Sctp),
        other => Err(Error::invalid_argument(format!("invalid proto: {other}"))),
    }
}

/// moby's `validateHealthCheck`: durations are 0 (the default) or at least 1ms, retries are not
/// negative.
fn check_healthcheck(h: &bollard_stubs::models::HealthConfig) -> Result<()> {
    const MIN_NS: i64 = 1_000_000;
    for (name, v) in [
        ("Interval", h.interval),
        ("Timeout", h.timeout),
        ("StartPeriod", h.start_period),
        ("StartInterval", h.start_interval),
    ] {
        if let Some(ns) = v
            && ns != 0
            && ns < MIN_NS
        {
            return Err(Error::invalid_argument(format!(
                "{name} in Healthcheck cannot be less than 1ms"
            )));
        }
    }
    if h.retries.is_some_and(|r| r < 0) {
        return Err(Error::invalid_argument(
            "Retries in Healthcheck cannot be negative",
        ));
    }
    Ok(())
}

fn container_config(c: &ContainerCreateBody) -> Result<engine::ContainerConfig> {
    let exposed_ports = c
        .exposed_ports
        .iter()
        .flatten()
        .map(|p| parse_port(p))
        .collect::<Result<Vec<_>>>()?;
    let healthcheck = match &c.healthcheck {
        Some(h) => {
            check_healthcheck(h)?;
            serde_json::to_vec(h).unwrap_or_default()
        }
        None => Vec::new(),
    };
    let stop_timeout = c
        .stop_timeout
        .map(|t| i32::try_from(t).map_err(|_| Error::invalid_argument("invalid StopTimeout")))
        .transpose()?;
    let mut volumes: Vec<String> = c.volumes.clone().unwrap_or_default();
    volumes.sort();
    Ok(engine::ContainerConfig {
        image: c.image.clone().unwrap_or_default(),
        entrypoint: string_list(&c.entrypoint),
        cmd: string_list(&c.cmd),
        env: c.env.clone().unwrap_or_default(),
        working_dir: c.working_dir.clone().unwrap_or_default(),
        user: c.user.clone().unwrap_or_default(),
        labels: c.labels.clone().unwrap_or_default(),
        tty: c.tty.unwrap_or(false),
        open_stdin: c.open_stdin.unwrap_or(false),
        stdin_once: c.stdin_once.unwrap_or(false),
        attach_stdin: c.attach_stdin.unwrap_or(false),
        attach_stdout: c.attach_stdout.unwrap_or(false),
        attach_stderr: c.attach_stderr.unwrap_or(false),
        exposed_ports,
        hostname: c.hostname.clone().unwrap_or_default(),
        domainname: c.domainname.clone().unwrap_or_default(),
        stop_signal: c.stop_signal.clone().unwrap_or_default(),
        stop_timeout,
        healthcheck,
        volumes,
        on_build: c.on_build.clone().unwrap_or_default(),
        network_disabled: c.network_disabled.unwrap_or(false),
        mac_address: String::new(),
    })
}

fn endpoint_config(ep: &EndpointSettings) -> engine::EndpointConfig {
    let ipam = ep.ipam_config.clone().unwrap_or_default();
    engine::EndpointConfig {
        aliases: ep.aliases.clone().unwrap_or_default(),
        ipv4_address: ipam.ipv4_address.unwrap_or_default(),
        ipv6_address: ipam.ipv6_address.unwrap_or_default(),
        link_local_ips: ipam.link_local_ips.unwrap_or_default(),
        mac_address: ep.mac_address.clone().unwrap_or_default(),
        driver_opts: ep.driver_opts.clone().unwrap_or_default(),
        links: ep.links.clone().unwrap_or_default(),
        gw_priority: ep.gw_priority.unwrap_or(0) as i32,
    }
}

/// Docker's `NetworkConnectRequest.EndpointConfig` → the engine's endpoint config.
pub fn endpoint_request(ep: &EndpointSettings) -> engine::EndpointConfig {
    endpoint_config(ep)
}

fn positive(v: Option<i64>) -> Option<i64> {
    v.filter(|v| *v > 0)
}

fn non_empty(v: &Option<String>) -> Option<String> {
    v.clone().filter(|s| !s.is_empty())
}

fn throttle(
    devs: &Option<Vec<bollard_stubs::models::ThrottleDevice>>,
) -> Vec<engine::ThrottleDevice> {
    devs.iter()
        .flatten()
        .map(|d| engine::ThrottleDevice {
            path: d.path.clone().unwrap_or_default(),
            rate: d.rate.unwrap_or(0).max(0) as u64,
        })
        .collect()
}

/// The resource fields shared by create (`HostConfig`) and update. Docker's 0 means "not set".
#[derive(Debug)]
#[allow(missing_docs)]
pub struct ResourceFields<'a> {
    pub memory: Option<i64>,
    pub memory_swap: Option<i64>,
    pub memory_reservation: Option<i64>,
    pub memory_swappiness: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub cpu_shares: Option<i64>,
    pub cpu_period: Option<i64>,
    pub cpu_quota: Option<i64>,
    pub cpu_realtime_period: Option<i64>,
    pub cpu_realtime_runtime: Option<i64>,
    pub cpuset_cpus: &'a Option<String>,
    pub cpuset_mems: &'a Option<String>,
    pub pids_limit: Option<i64>,
    pub blkio_weight: Option<u16>,
    pub blkio_weight_device: &'a Option<Vec<bollard_stubs::models::ResourcesBlkioWeightDevice>>,
    pub blkio_device_read_bps: &'a Option<Vec<bollard_stubs::models::ThrottleDevice>>,
    pub blkio_device_write_bps: &'a Option<Vec<bollard_stubs::models::ThrottleDevice>>,
    pub blkio_device_read_iops: &'a Option<Vec<bollard_stubs::models::ThrottleDevice>>,
    pub blkio_device_write_iops: &'a Option<Vec<bollard_stubs::models::ThrottleDevice>>,
    pub oom_kill_disable: Option<bool>,
    pub ulimits: &'a Option<Vec<bollard_stubs::models::ResourcesUlimits>>,
}

impl ResourceFields<'_> {
    /// The engine's resources: only what is set (non-zero) is sent.
    pub fn to_engine(&self) -> engine::Resources {
        engine::Resources {
            memory: positive(self.memory),
            // -1 = unlimited swap is meaningful; 0 = not set.
            memory_swap: self.memory_swap.filter(|v| *v != 0),
            memory_reservation: positive(self.memory_reservation),
            memory_swappiness: self.memory_swappiness.filter(|v| *v >= 0),
            nano_cpus: positive(self.nano_cpus),
            cpu_shares: positive(self.cpu_shares),
            cpu_period: positive(self.cpu_period),
            cpu_quota: self.cpu_quota.filter(|v| *v != 0),
            cpu_realtime_period: positive(self.cpu_realtime_period),
            cpu_realtime_runtime: positive(self.cpu_realtime_runtime),
            cpuset_cpus: non_empty(self.cpuset_cpus),
            cpuset_mems: non_empty(self.cpuset_mems),
            pids_limit: self.pids_limit.filter(|v| *v != 0),
            blkio_weight: self.blkio_weight.filter(|w| *w > 0).map(u32::from),
            blkio_weight_device: self
                .blkio_weight_device
                .iter()
                .flatten()
                .map(|d| engine::WeightDevice {
                    path: d.path.clone().unwrap_or_default(),
                    weight: d.weight.unwrap_or(0) as u32,
                })
                .collect(),
            blkio_device_read_bps: throttle(self.blkio_device_read_bps),
            blkio_device_write_bps: throttle(self.blkio_device_write_bps),
            blkio_device_read_iops: throttle(self.blkio_device_read_iops),
            blkio_device_write_iops: throttle(self.blkio_device_write_iops),
            oom_kill_disable: self.oom_kill_disable.filter(|v| *v),
            ulimits: self
                .ulimits
                .iter()
                .flatten()
                .map(|u| engine::Ulimit {
                    name: u.name.clone().unwrap_or_default(),
                    soft: u.soft.unwrap_or(0),
                    hard: u.hard.unwrap_or(0),
                })
                .collect(),
            unified: HashMap::new(),
            hugepage_limits: Vec::new(),
        }
    }
}

fn resources(h: &HostConfig) -> engine::Resources {
    ResourceFields {
        memory: h.memory,
        memory_swap: h.memory_swap,
        memory_reservation: h.memory_reservation,
        memory_swappiness: h.memory_swappiness,
        nano_cpus: h.nano_cpus,
        cpu_shares: h.cpu_shares,
        cpu_period: h.cpu_period,
        cpu_quota: h.cpu_quota,
        cpu_realtime_period: h.cpu_realtime_period,
        cpu_realtime_runtime: h.cpu_realtime_runtime,
        cpuset_cpus: &h.cpuset_cpus,
        cpuset_mems: &h.cpuset_mems,
        pids_limit: h.pids_limit,
        blkio_weight: h.blkio_weight,
        blkio_weight_device: &h.blkio_weight_device,
        blkio_device_read_bps: &h.blkio_device_read_bps,
        blkio_device_write_bps: &h.blkio_device_write_bps,
        blkio_device_read_iops: &h.blkio_device_read_iops,
        blkio_device_write_iops: &h.blkio_device_write_iops,
        oom_kill_disable: h.oom_kill_disable,
        ulimits: &h.ulimits,
    }
    .to_engine()
}

/// Docker's restart policy → the engine's.
pub fn restart_policy(p: &bollard_stubs::models::RestartPolicy) -> Result<engine::RestartPolicy> {
    use engine::RestartPolicyName as N;
    let name = match p.name {
        None | Some(RestartPolicyNameEnum::EMPTY) | Some(RestartPolicyNameEnum::NO) => N::No,
        Some(RestartPolicyNameEnum::ALWAYS) => N::Always,
        Some(RestartPolicyNameEnum::UNLESS_STOPPED) => N::UnlessStopped,
        Some(RestartPolicyNameEnum::ON_FAILURE) => N::OnFailure,
    };
    let retries = p.maximum_retry_count.unwrap_or(0);
    if retries < 0 {
        return Err(Error::invalid_argument(
            "invalid restart policy: maximum retry count cannot be negative",
        ));
    }
    if retries > 0 && name != N::OnFailure {
        return Err(Error::invalid_argument(
            "invalid restart policy: maximum retry count can only be used with 'on-failure'"
                .to_string(),
        ));
    }
    Ok(engine::RestartPolicy {
        name: name as i32,
        max_retries: retries as i32,
    })
}

/// Refuses the create options berth has no way to honour, with Docker's words where Docker
/// has them, instead of accepting and ignoring them. What the engine decides (log drivers,
/// devices, mount propagation, links, ...) is checked there.
fn refuse_unsupported(h: &HostConfig, eps: &HashMap<String, EndpointSettings>) -> Result<()> {
    if h.storage_opt.as_ref().is_some_and(|o| !o.is_empty()) {
        // Docker's overlay2 answers this (a 500) wherever it has no project quotas; berth's
        // snapshotters have none at all.
        return Err(Error::internal(
            "--storage-opt is supported only for overlay over xfs with 'pquota' mount option",
        ));
    }
    if let Some(req) = h.device_requests.iter().flatten().next() {
        let caps: Vec<String> = req
            .capabilities
            .iter()
            .flatten()
            .map(|c| format!("[{}]", c.join(" ")))
            .collect();
        return Err(Error::invalid_argument(format!(
            "could not select device driver \"{}\" with capabilities: [{}]",
            req.driver.clone().unwrap_or_default(),
            caps.join(" ")
        )));
    }
    if h.io_maximum_bandwidth.is_some_and(|v| v != 0) || h.io_maximum_iops.is_some_and(|v| v != 0) {
        return Err(Error::invalid_argument(
            "Invalid QoS settings: linux does not support Maximum IO Bandwidth or Maximum IO IOps",
        ));
    }
    if h.cpu_count.is_some_and(|v| v != 0) {
        return Err(Error::invalid_argument(
            "invalid CpuCount: linux does not support CPU count (it is a Windows setting)",
        ));
    }
    if h.cpu_percent.is_some_and(|v| v != 0) {
        return Err(Error::invalid_argument(
            "invalid CpuPercent: linux does not support CPU percent (it is a Windows setting)",
        ));
    }
    if let Some(iso) = h.isolation.as_ref().map(|i| i.to_string())
        && !matches!(iso.as_str(), "" | "default")
    {
        return Err(Error::invalid_argument(format!(
            "invalid isolation: \"{iso}\" - linux only supports 'default'"
        )));
    }
    if let Some(driver) = h
        .volume_driver
        .as_deref()
        .filter(|d| !d.is_empty() && *d != "local")
    {
        return Err(Error::invalid_argument(format!(
            "volume driver \"{driver}\" is not supported: berth has only the local driver"
        )));
    }
    if h.cgroup.as_deref().is_some_and(|c| !c.is_empty()) {
        return Err(Error::invalid_argument(
            "HostConfig.Cgroup (sharing another container's cgroup) is not supported by berth",
        ));
    }
    for m in h.mounts.iter().flatten() {
        if m.bind_options
            .as_ref()
            .and_then(|b| b.read_only_force_recursive)
            .unwrap_or(false)
        {
            return Err(Error::invalid_argument(
                "BindOptions.ReadOnlyForceRecursive is not supported by berth",
            ));
        }
    }
    for (net, ep) in eps {
        if ep
            .ipam_config
            .as_ref()
            .and_then(|i| i.link_local_ips.as_ref())
            .is_some_and(|l| !l.is_empty())
        {
            return Err(Error::invalid_argument(format!(
                "link-local IPs (IPAMConfig.LinkLocalIPs on {net}) are not supported by berth"
            )));
        }
    }
    Ok(())
}

fn host_config(h: &HostConfig) -> Result<engine::HostConfig> {
    let mut mounts = Vec::new();
    for bind in h.binds.iter().flatten() {
        mounts.push(parse_bind(bind)?);
    }
    for m in h.mounts.iter().flatten() {
        mounts.push(parse_mount(m)?);
    }
    let mut tmpfs: Vec<_> = h.tmpfs.iter().flatten().collect();
    tmpfs.sort();
    for (target, opts) in tmpfs {
        mounts.push(parse_tmpfs(target, opts)?);
    }
    let port_bindings = match &h.port_bindings {
        Some(map) => parse_port_bindings(map)?,
        None => Vec::new(),
    };
    let console_size = h.console_size.as_ref().and_then(|s| {
        (s.len() == 2 && (s[0] > 0 || s[1] > 0)).then(|| types::TerminalSize {
            height: s[0] as u32,
            width: s[1] as u32,
        })
    });
    Ok(engine::HostConfig {
        mounts,
        resources: Some(resources(h)),
        security: Some(security(h)?),
        shm_size: positive(h.shm_size),
        sysctls: h.sysctls.clone().unwrap_or_default(),
        devices: h
            .devices
            .iter()
            .flatten()
            .map(|d| engine::DeviceMapping {
                path_on_host: d.path_on_host.clone().unwrap_or_default(),
                path_in_container: d.path_in_container.clone().unwrap_or_default(),
                cgroup_permissions: d.cgroup_permissions.clone().unwrap_or_default(),
            })
            .collect(),
        device_cgroup_rules: h.device_cgroup_rules.clone().unwrap_or_default(),
        group_add: h.group_add.clone().unwrap_or_default(),
        dns: h.dns.clone().unwrap_or_default(),
        dns_search: h.dns_search.clone().unwrap_or_default(),
        dns_options: h.dns_options.clone().unwrap_or_default(),
        extra_hosts: h
            .extra_hosts
            .iter()
            .flatten()
            .map(|e| parse_extra_host(e))
            .collect::<Result<_>>()?,
        // The CLI sends "default", which Docker's daemon turns into the default bridge.
        network_mode: match h.network_mode.as_deref() {
            None | Some("") | Some("default") => "bridge".to_string(),
            Some(mode) => mode.to_string(),
        },
        port_bindings,
        publish_all_ports: h.publish_all_ports.unwrap_or(false),
        restart_policy: h.restart_policy.as_ref().map(restart_policy).transpose()?,
        auto_remove: h.auto_remove.unwrap_or(false),
        log_config: h.log_config.as_ref().map(|l| engine::LogConfig {
            r#type: l.typ.clone().unwrap_or_default(),
            options: l.config.clone().unwrap_or_default(),
        }),
        init: h.init,
        ipc_mode: h.ipc_mode.clone().unwrap_or_default(),
        pid_mode: h.pid_mode.clone().unwrap_or_default(),
        uts_mode: h.uts_mode.clone().unwrap_or_default(),
        userns_mode: h.userns_mode.clone().unwrap_or_default(),
        cgroupns_mode: h.cgroupns_mode.map(|m| m.to_string()).unwrap_or_default(),
        cgroup_parent: h.cgroup_parent.clone().unwrap_or_default(),
        runtime: h.runtime.clone().unwrap_or_default(),
        console_size,
        oom_score_adj: h.oom_score_adj.unwrap_or(0) as i32,
        links: h.links.clone().unwrap_or_default(),
        volumes_from: h.volumes_from.clone().unwrap_or_default(),
        annotations: h.annotations.clone().unwrap_or_default(),
        cni: None,
        // Docker containers belong to no pod sandbox.
        sandbox_id: String::new(),
        strict_supplemental_groups: false,
    })
}

fn security(h: &HostConfig) -> Result<engine::SecurityOptions> {
    let mut sec = engine::SecurityOptions {
        privileged: h.privileged.unwrap_or(false),
        cap_add: h.cap_add.clone().unwrap_or_default(),
        cap_drop: h.cap_drop.clone().unwrap_or_default(),
        read_only_rootfs: h.readonly_rootfs.unwrap_or(false),
        masked_paths: string_list(&h.masked_paths),
        readonly_paths: string_list(&h.readonly_paths),
        ..Default::default()
    };
    for opt in h.security_opt.iter().flatten() {
        let (key, value) = match opt.split_once(['=', ':']) {
            Some((k, v)) => (k, Some(v)),
            None => (opt.as_str(), None),
        };
        match (key, value) {
            ("no-new-privileges", None) => sec.no_new_privileges = true,
            ("no-new-privileges", Some(v)) => {
                sec.no_new_privileges = v.parse().map_err(|_| {
                    Error::invalid_argument(format!("invalid --security-opt 2: \"{opt}\""))
                })?;
            }
            ("seccomp", Some(v)) => sec.seccomp_profile = v.to_string(),
            ("apparmor", Some(v)) => sec.apparmor_profile = v.to_string(),
            ("label", Some(v)) => sec.label_options.push(v.to_string()),
            ("systempaths", Some("unconfined")) => {
                sec.masked_paths = Some(types::StringList::default());
                sec.readonly_paths = Some(types::StringList::default());
            }
            _ => {
                return Err(Error::invalid_argument(format!(
                    "invalid --security-opt 1: \"{opt}\""
                )));
            }
        }
    }
    Ok(sec)
}

fn propagation(p: &str) -> Option<engine::Propagation> {
    use engine::Propagation as P;
    Some(match p {
        "private" => P::Private,
        "rprivate" => P::Rprivate,
        "shared" => P::Shared,
        "rshared" => P::Rshared,
        "slave" => P::Slave,
        "rslave" => P::Rslave,
        _ => return None,
    })
}

/// `-v src:dst[:opts]`: a named volume when `src` has no `/`, a bind otherwise.
pub fn parse_bind(spec: &str) -> Result<engine::MountSpec> {
    let invalid = || Error::invalid_argument(format!("invalid volume specification: '{spec}'"));
    let parts: Vec<&str> = spec.split(':').collect();
    let (src, dst, mode) = match parts.as_slice() {
        // Only a destination: an anonymous volume, as dockerd reads `Binds: ["/data"]`.
        [dst] if dst.starts_with('/') && *dst != "/" => {
            return Ok(engine::MountSpec {
                r#type: engine::MountType::Volume as i32,
                target: dst.to_string(),
                volume: Some(engine::VolumeOptions::default()),
                ..Default::default()
            });
        }
        [src, dst] => (*src, *dst, ""),
        [src, dst, mode] => (*src, *dst, *mode),
        _ => return Err(invalid()),
    };
    if src.is_empty() || !dst.starts_with('/') {
        return Err(invalid());
    }
    if dst == "/" {
        return Err(Error::invalid_argument(format!(
            "invalid volume specification: '{spec}': invalid mount config for type \"bind\": invalid specification: destination can't be '/'"
        )));
    }
    let is_bind = src.contains('/');
    let mut read_only = false;
    let mut prop = None;
    let mut no_copy = false;
    let mut seen_rw = false;
    for opt in mode.split(',').filter(|o| !o.is_empty()) {
        match opt {
            "ro" | "rw" if !seen_rw => {
                seen_rw = true;
                read_only = opt == "ro";
            }
            "z" | "Z" => {}
            "nocopy" if !is_bind => no_copy = true,
            p if propagation(p).is_some() && is_bind && prop.is_none() => prop = propagation(p),
            _ => return Err(Error::invalid_argument(format!("invalid mode: {mode}"))),
        }
    }
    let mut m = engine::MountSpec {
        source: src.to_string(),
        target: dst.to_string(),
        read_only,
        mode: mode.to_string(),
        ..Default::default()
    };
    if is_bind {
        m.r#type = engine::MountType::Bind as i32;
        m.bind = Some(engine::BindOptions {
            propagation: prop.unwrap_or(engine::Propagation::Rprivate) as i32,
            create_host_path: true,
            ..Default::default()
        });
    } else {
        m.r#type = engine::MountType::Volume as i32;
        m.volume = Some(engine::VolumeOptions {
            no_copy,
            ..Default::default()
        });
    }
    Ok(m)
}

/// `--mount` (HostConfig.Mounts).
pub fn parse_mount(m: &Mount) -> Result<engine::MountSpec> {
    let kind = m.typ.unwrap_or(MountType::VOLUME);
    let target = m.target.clone().unwrap_or_default();
    if target.is_empty() {
        return Err(Error::invalid_argument(format!(
            "invalid mount config for type \"{kind}\": field Target must not be empty"
        )));
    }
    let source = m.source.clone().unwrap_or_default();
    let mut spec = engine::MountSpec {
        source: source.clone(),
        target,
        read_only: m.read_only.unwrap_or(false),
        ..Default::default()
    };
    match kind {
        MountType::BIND => {
            if source.is_empty() {
                return Err(Error::invalid_argument(
                    "invalid mount config for type \"bind\": field Source must not be empty",
                ));
            }
            let o = m.bind_options.clone().unwrap_or_default();
            let prop = match o.propagation {
                None | Some(MountBindOptionsPropagationEnum::EMPTY) => {
                    engine::Propagation::Rprivate
                }
                Some(p) => propagation(p.as_ref()).unwrap_or(engine::Propagation::Rprivate),
            };
            spec.r#type = engine::MountType::Bind as i32;
            spec.bind = Some(engine::BindOptions {
                propagation: prop as i32,
                non_recursive: o.non_recursive.unwrap_or(false),
                create_host_path: o.create_mountpoint.unwrap_or(false),
                read_only_non_recursive: o.read_only_non_recursive.unwrap_or(false),
                read_only_force_recursive: o.read_only_force_recursive.unwrap_or(false),
            });
        }
        MountType::VOLUME => {
            let o = m.volume_options.clone().unwrap_or_default();
            let driver = o.driver_config.clone().unwrap_or_default();
            spec.r#type = engine::MountType::Volume as i32;
            spec.volume = Some(engine::VolumeOptions {
                no_copy: o.no_copy.unwrap_or(false),
                labels: o.labels.unwrap_or_default(),
                driver: driver.name.unwrap_or_default(),
                driver_opts: driver.options.unwrap_or_default(),
                subpath: o.subpath.unwrap_or_default(),
            });
        }
        MountType::TMPFS => {
            if !source.is_empty() {
                return Err(Error::invalid_argument(
                    "invalid mount config for type \"tmpfs\": field Source must not be specified",
                ));
            }
            let o = m.tmpfs_options.clone().unwrap_or_default();
            let options = o
                .options
                .unwrap_or_default()
                .into_iter()
                .map(|kv| kv.join("="))
                .collect();
            spec.r#type = engine::MountType::Tmpfs as i32;
            spec.tmpfs = Some(engine::TmpfsOptions {
                size_bytes: o.size_bytes.unwrap_or(0),
                mode: o.mode.unwrap_or(0) as u32,
                options,
            });
        }
        MountType::IMAGE => {
            spec.r#type = engine::MountType::Image as i32;
            spec.image = Some(engine::ImageMountOptions {
                subpath: m
                    .image_options
                    .as_ref()
                    .and_then(|o| o.subpath.clone())
                    .unwrap_or_default(),
            });
        }
        other => {
            return Err(Error::invalid_argument(format!(
                "mount type \"{other}\" is not supported"
            )));
        }
    }
    Ok(spec)
}

/// Parses a size with an optional k/m/g suffix (binary, as the tmpfs `size=` option).
pub fn parse_size(s: &str) -> Option<i64> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_suffix('b').unwrap_or(&s);
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1i64 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let value: f64 = num.parse().ok()?;
    Some((value * mult as f64) as i64)
}

/// `--tmpfs /run:rw,noexec,size=64m`.
pub fn parse_tmpfs(target: &str, opts: &str) -> Result<engine::MountSpec> {
    if !target.starts_with('/') {
        return Err(Error::invalid_argument(format!(
            "invalid tmpfs mount: {target} must be an absolute path"
        )));
    }
    let mut t = engine::TmpfsOptions::default();
    let mut read_only = false;
    for opt in opts.split(',').filter(|o| !o.is_empty()) {
        match opt.split_once('=') {
            Some(("size", v)) => {
                t.size_bytes = parse_size(v)
                    .ok_or_else(|| Error::invalid_argument(format!("invalid tmpfs size: {v}")))?;
            }
            Some(("mode", v)) => {
                t.mode = u32::from_str_radix(v, 8)
                    .map_err(|_| Error::invalid_argument(format!("invalid tmpfs mode: {v}")))?;
            }
            None if opt == "ro" => read_only = true,
            None if opt == "rw" => read_only = false,
            _ => t.options.push(opt.to_string()),
        }
    }
    Ok(engine::MountSpec {
        r#type: engine::MountType::Tmpfs as i32,
        target: target.to_string(),
        read_only,
        tmpfs: Some(t),
        mode: opts.to_string(),
        ..Default::default()
    })
}

/// `--add-host name:ip` (or `name=ip`).
pub fn parse_extra_host(spec: &str) -> Result<types::HostEntry> {
    let (name, ip) = spec
        .split_once('=')
        .or_else(|| spec.split_once(':'))
        .ok_or_else(|| Error::invalid_argument(format!("invalid extra host: \"{spec}\"")))?;
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    if name.is_empty() || ip.is_empty() {
        return Err(Error::invalid_argument(format!(
            "invalid extra host: \"{spec}\""
        )));
    }
    Ok(types::HostEntry {
        ip: ip.to_string(),
        hostnames: vec![name.to_string()],
    })
}

fn port_range(s: &str) -> Result<(u32, u32)> {
    let bad = || Error::invalid_argument(format!("invalid port: \"{s}\""));
    let parse = |p: &str| {
        p.parse::<u32>()
            .ok()
            .filter(|p| *p <= 65535)
            .ok_or_else(bad)
    };
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (parse(a)?, parse(b)?);
            if b < a {
                return Err(bad());
            }
            Ok((a, b))
        }
        None => {
            let p = parse(s)?;
            Ok((p, p))
        }
    }
}

/// `PortBindings` (`{"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}`) → port mappings.
pub fn parse_port_bindings(
    map: &HashMap<String, Option<Vec<bollard_stubs::models::PortBinding>>>,
) -> Result<Vec<types::PortMapping>> {
    let mut keys: Vec<_> = map.keys().collect();
    keys.sort();
    let mut out = Vec::new();
    for key in keys {
        let (ports, proto) = key.split_once('/').unwrap_or((key, "tcp"));
        let protocol = parse_protocol(proto)? as i32;
        let (cstart, cend) = port_range(ports)?;
        if cstart == 0 {
            return Err(Error::invalid_argument(format!("invalid port: \"{key}\"")));
        }
        let bindings = map[key].clone().unwrap_or_default();
        let bindings = if bindings.is_empty() {
            vec![Default::default()]
        } else {
            bindings
        };
        for b in bindings {
            let host_ip = b.host_ip.unwrap_or_default();
            let host_port = b.host_port.unwrap_or_default();
            let (hstart, hend) = if host_port.is_empty() {
                (0, 0)
            } else {
                port_range(&host_port)?
            };
            for (i, cport) in (cstart..=cend).enumerate() {
                let i = i as u32;
                let (hp, hpe) = if hstart == 0 {
                    (0, 0)
                } else if hend - hstart == cend - cstart {
                    // Ranges of the same length map one to one.
                    (hstart + i, 0)
                } else if hstart == hend {
                    (hstart, 0)
                } else {
                    (hstart, hend)
                };
                out.push(types::PortMapping {
                    host_ip: host_ip.clone(),
                    host_port: hp,
                    container_port: cport,
                    protocol,
                    host_port_end: hpe,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&json).unwrap()
    }

    #[test]
    fn binds_become_volumes_or_binds() {
        let m = parse_bind("data:/data").unwrap();
        assert_eq!(m.r#type, engine::MountType::Volume as i32);
        assert_eq!(m.source, "data");
        assert!(!m.read_only);
        let m = parse_bind("/host/dir:/in:ro,rshared").unwrap();
        assert_eq!(m.r#type, engine::MountType::Bind as i32);
        assert!(m.read_only);
        assert_eq!(m.mode, "ro,rshared");
        let b = m.bind.unwrap();
        assert_eq!(b.propagation, engine::Propagation::Rshared as i32);
        assert!(b.create_host_path);
        let m = parse_bind("vol:/v:nocopy").unwrap();
        assert!(m.volume.unwrap().no_copy);
        assert!(
            parse_bind("/a:/b:bogus")
                .unwrap_err()
                .message()
                .contains("invalid mode")
        );
        assert!(parse_bind("/a:relative").is_err());
        let anon = parse_bind("/only").unwrap();
        assert_eq!(
            (anon.r#type, anon.source.as_str(), anon.target.as_str()),
            (engine::MountType::Volume as i32, "", "/only")
        );
        assert!(parse_bind("only").is_err());
        assert!(parse_bind("vol:/v:rshared").is_err());
    }

    #[test]
    fn port_bindings_with_ranges() {
        let map: HashMap<String, Option<Vec<bollard_stubs::models::PortBinding>>> =
            serde_json::from_value(serde_json::json!({
                "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}],
                "53/udp": [{"HostIp": "", "HostPort": ""}],
                "90-91/tcp": [{"HostPort": "9000-9001"}],
                "100/tcp": [{"HostPort": "7000-7010"}],
            }))
            .unwrap();
        let pm = parse_port_bindings(&map).unwrap();
        fn t(p: &types::PortMapping) -> (&str, u32, u32, u32, i32) {
            (
                p.host_ip.as_str(),
                p.host_port,
                p.host_port_end,
                p.container_port,
                p.protocol,
            )
        }
        let tcp = types::Protocol::Tcp as i32;
        let udp = types::Protocol::Udp as i32;
        assert_eq!(
            pm.iter().map(t).collect::<Vec<_>>(),
            [
                ("", 7000, 7010, 100, tcp),
                ("", 0, 0, 53, udp),
                ("127.0.0.1", 8080, 0, 80, tcp),
                ("", 9000, 0, 90, tcp),
                ("", 9001, 0, 91, tcp),
            ]
        );
    }

    #[test]
    fn a_docker_cli_body_translates() {
        let b = body(serde_json::json!({
            "Hostname": "", "User": "nobody", "AttachStdout": true, "Tty": false,
            "Env": ["A=1"], "Cmd": ["echo", "hi"], "Image": "busybox", "Entrypoint": null,
            "Labels": {"l": "v"}, "ExposedPorts": {"80/tcp": {}}, "Volumes": {"/anon": {}},
            "StopTimeout": 3, "MacAddress": "02:42:ac:11:00:02",
            "HostConfig": {
                "Binds": ["vol:/data", "/tmp:/host:ro"],
                "Tmpfs": {"/run": "rw,noexec,size=64m"},
                "Mounts": [{"Type": "tmpfs", "Target": "/t", "TmpfsOptions": {"SizeBytes": 1024}}],
                "PortBindings": {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]},
                "RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 2},
                "Memory": 1048576, "MemorySwap": -1, "NanoCpus": 1500000000, "CpuShares": 0,
                "PidsLimit": 0, "Ulimits": [{"Name": "nofile", "Soft": 10, "Hard": 20}],
                "Privileged": false, "CapAdd": ["NET_ADMIN"], "CapDrop": ["MKNOD"],
                "SecurityOpt": ["no-new-privileges", "seccomp=unconfined"],
                "ReadonlyRootfs": true, "ShmSize": 0, "Sysctls": {"net.ipv4.ip_forward": "1"},
                "NetworkMode": "mynet", "AutoRemove": true, "Init": true,
                "LogConfig": {"Type": "json-file", "Config": {"max-size": "1m"}},
                "Dns": ["1.1.1.1"], "ExtraHosts": ["h:10.0.0.1"], "GroupAdd": ["audio"],
                "ConsoleSize": [24, 80], "Isolation": "", "CgroupnsMode": ""
            },
            "NetworkingConfig": {"EndpointsConfig": {"mynet": {
                "Aliases": ["web"], "IPAMConfig": {"IPv4Address": "10.1.0.5"}}}}
        }));
        let req = create_request("web", "linux/amd64", &b).unwrap();
        assert_eq!(req.name, "web");
        assert_eq!(req.platform.as_ref().unwrap().architecture, "amd64");
        let c = req.config.unwrap();
        assert_eq!(c.image, "busybox");
        assert!(c.entrypoint.is_none());
        assert_eq!(c.cmd.unwrap().values, ["echo", "hi"]);
        assert_eq!(c.user, "nobody");
        assert_eq!(c.exposed_ports.len(), 1);
        assert_eq!(c.volumes, ["/anon"]);
        assert_eq!(c.stop_timeout, Some(3));
        assert_eq!(c.mac_address, "02:42:ac:11:00:02");
        let h = req.host_config.unwrap();
        assert_eq!(h.mounts.len(), 4);
        assert_eq!(h.mounts[0].r#type, engine::MountType::Volume as i32);
        assert_eq!(h.mounts[1].r#type, engine::MountType::Bind as i32);
        assert_eq!(h.mounts[2].target, "/t");
        assert_eq!(h.mounts[3].tmpfs.as_ref().unwrap().size_bytes, 64 << 20);
        let r = h.resources.unwrap();
        assert_eq!(r.memory, Some(1_048_576));
        assert_eq!(r.memory_swap, Some(-1));
        assert_eq!(r.nano_cpus, Some(1_500_000_000));
        assert_eq!(r.cpu_shares, None);
        assert_eq!(r.pids_limit, None);
        assert_eq!(r.ulimits[0].name, "nofile");
        let s = h.security.unwrap();
        assert!(s.no_new_privileges);
        assert_eq!(s.seccomp_profile, "unconfined");
        assert!(s.read_only_rootfs);
        assert_eq!(s.cap_add, ["NET_ADMIN"]);
        assert_eq!(h.port_bindings[0].host_port, 8080);
        assert_eq!(
            h.restart_policy.unwrap(),
            engine::RestartPolicy {
                name: engine::RestartPolicyName::OnFailure as i32,
                max_retries: 2
            }
        );
        assert!(h.auto_remove);
        assert_eq!(h.init, Some(true));
        assert_eq!(h.network_mode, "mynet");
        let defaults = create_request(
            "",
            "",
            &body(
                serde_json::json!({"Image": "b", "HostConfig": {"NetworkMode": "default"},
                "NetworkingConfig": {"EndpointsConfig": {"default": {}}}}),
            ),
        )
        .unwrap();
        assert_eq!(defaults.host_config.unwrap().network_mode, "bridge");
        assert!(defaults.networks.contains_key("bridge"));
        assert_eq!(h.extra_hosts[0].ip, "10.0.0.1");
        assert_eq!(h.console_size.unwrap().width, 80);
        let ep = &req.networks["mynet"];
        assert_eq!(ep.aliases, ["web"]);
        assert_eq!(ep.ipv4_address, "10.1.0.5");
        let ext = &req.extensions[DOCKER_EXTENSION];
        assert_eq!(ext.version, 1);
        let kept: serde_json::Value = serde_json::from_slice(&ext.data).unwrap();
        assert_eq!(
            kept,
            serde_json::from_slice::<serde_json::Value>(&b).unwrap()
        );
    }

    #[test]
    fn bad_create_input_is_rejected() {
        assert!(
            create_request("", "", b"")
                .unwrap_err()
                .message()
                .contains("config cannot be empty")
        );
        assert!(
            create_request("", "", b"{not json")
                .unwrap_err()
                .message()
                .starts_with("invalid JSON")
        );
        let err = create_request("bad name!", "", b"{\"Image\":\"busybox\"}").unwrap_err();
        assert!(
            err.message().starts_with("Invalid container name"),
            "{}",
            err.message()
        );
        let err = create_request(
            "",
            "",
            &body(serde_json::json!({"Image": "b", "HostConfig": {"SecurityOpt": ["bogus"]}})),
        )
        .unwrap_err();
        assert!(err.message().contains("invalid --security-opt"));
        let err = create_request(
            "",
            "",
            &body(serde_json::json!({"Image": "b", "HostConfig": {"RestartPolicy": {"Name": "always", "MaximumRetryCount": 3}}})),
        )
        .unwrap_err();
        assert!(err.message().contains("maximum retry count"));
        assert!(create_request("", "windows/amd64/x/y", b"{}").is_err());
        for (hc, want) in [
            (
                serde_json::json!({"Test": ["CMD", "true"], "Interval": 999}),
                "Interval in Healthcheck cannot be less than 1ms",
            ),
            (
                serde_json::json!({"StartInterval": 5}),
                "StartInterval in Healthcheck cannot be less than 1ms",
            ),
            (
                serde_json::json!({"Retries": -1}),
                "Retries in Healthcheck cannot be negative",
            ),
        ] {
            let err = create_request(
                "",
                "",
                &body(serde_json::json!({"Image": "b", "Healthcheck": hc})),
            )
            .unwrap_err();
            assert_eq!(err.message(), want);
        }
        let ok =
            serde_json::json!({"Image": "b", "Healthcheck": {"Test": ["NONE"], "Interval": 0}});
        assert!(create_request("", "", &body(ok)).is_ok());
    }

    #[test]
    fn field_names_match_ignoring_case_as_in_go() {
        let req = create_request(
            "",
            "",
            &body(serde_json::json!({"image": "b", "HostConfig": {
                "CPURealtimePeriod": 10000, "cpurealtimeruntime": 5000, "MEMORY": 8388608}})),
        )
        .unwrap();
        assert_eq!(req.config.unwrap().image, "b");
        let r = req.host_config.unwrap().resources.unwrap();
        assert_eq!(r.cpu_realtime_period, Some(10000));
        assert_eq!(r.cpu_realtime_runtime, Some(5000));
        assert_eq!(r.memory, Some(8 << 20));
    }

    #[test]
    fn options_berth_cannot_honour_are_refused() {
        let refused = |hc: serde_json::Value| {
            create_request(
                "",
                "",
                &body(serde_json::json!({"Image": "b", "HostConfig": hc})),
            )
            .unwrap_err()
        };
        let e = refused(serde_json::json!({"StorageOpt": {"size": "1G"}}));
        assert_eq!(e.kind(), berth_core::ErrorKind::Internal);
        assert!(e.message().contains("'pquota'"));
        for hc in [
            serde_json::json!({"DeviceRequests": [{"Count": -1, "Capabilities": [["gpu"]]}]}),
            serde_json::json!({"IOMaximumIOps": 5}),
            serde_json::json!({"CpuPercent": 5}),
            serde_json::json!({"KernelMemoryTCP": 1}),
            serde_json::json!({"Isolation": "hyperv"}),
            serde_json::json!({"VolumeDriver": "nfs"}),
            serde_json::json!({"ShmSize": -1}),
        ] {
            assert_eq!(
                refused(hc.clone()).kind(),
                berth_core::ErrorKind::InvalidArgument,
                "{hc}"
            );
        }
    }

    #[test]
    fn sizes_and_hosts() {
        assert_eq!(parse_size("64m"), Some(64 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_extra_host("h:::1").unwrap().ip, "::1");
        assert_eq!(parse_extra_host("h=10.0.0.1").unwrap().hostnames, ["h"]);
        assert!(parse_extra_host("nohost").is_err());
    }
}
