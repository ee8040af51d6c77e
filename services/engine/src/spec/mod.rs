//! OCI runtime spec generation: what Docker puts in a container's `config.json`.
//!
//! [`generate`] is a pure function of the container's merged config, its host config, and
//! facts resolved beforehand (user, mounts, namespaces, host features), so every rule here is
//! unit-tested without root. The defaults follow Docker: default capabilities, the default
//! seccomp profile, masked and read-only /proc and /sys paths, a private /dev with the standard
//! devices, /dev/shm, /dev/pts, /dev/mqueue, a read-only /sys and cgroup mount, the cgroup under
//! the engine's parent, and RLIMIT_NOFILE 1048576.

pub mod caps;
pub mod resources;
pub mod seccomp;
pub mod validate;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::str::FromStr;

use berth_core::userns::{IdMap, IdRange};
use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as pb;
use oci_spec::runtime::{
    LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDevice, LinuxDeviceBuilder, LinuxDeviceCgroup,
    LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxIdMapping, LinuxIdMappingBuilder,
    LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType, Mount, MountBuilder, PosixRlimit,
    PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder,
    UserBuilder,
};

use crate::imageconfig::{self, DEFAULT_PATH};
use crate::user::ResolvedUser;

/// Facts about the host that change what goes into a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    /// Online CPUs.
    pub ncpu: u32,
    /// `memory.memsw.*` exists (swap accounting).
    pub swap_limit: bool,
    /// `blkio.weight` (or its BFQ variant) exists.
    pub blkio_weight: bool,
    /// The host runs cgroup v2 only.
    pub cgroup_v2: bool,
    /// Every device node under /dev, for privileged containers.
    pub devices: Vec<Device>,
    /// The open-files limit containers get by default: [`DEFAULT_NOFILE`], or less when the
    /// engine itself may not go that high (no CAP_SYS_RESOURCE and a lower hard limit).
    pub nofile: u64,
    /// The kernel runs x32 binaries (`CONFIG_X86_X32_ABI`), so the seccomp profile must cover
    /// that ABI too. Without it, listing x32 only makes every runc create and exec compile the
    /// filter once more for nothing.
    pub seccomp_x32: bool,
    /// Real-time group scheduling (`cpu.rt_runtime_us` in the cgroup v1 cpu hierarchy).
    pub cpu_realtime: bool,
    /// The lowest `oom_score_adj` a container can get: -1000 with CAP_SYS_RESOURCE, else the
    /// engine's own (lowering it needs that capability, so runc's write would fail). Lower
    /// requests are clamped to it, as containerd's `restrict_oom_score_adj` does.
    pub min_oom_score_adj: i32,
    /// The hugetlb cgroup controller is where runc sets limits (the v1 hierarchy, or v2 only).
    pub hugetlb: bool,
    /// The engine may make cgroups for containers. Not so in rootless mode unless the host
    /// delegates a cgroup v2 tree: containers then get no cgroup of their own (runc leaves
    /// them in the engine's) and resource limits are refused.
    pub cgroups: bool,
    /// The id map of containers' user namespaces (userns-remap, rootless); `None`: containers
    /// share the engine's ids.
    pub id_map: Option<IdMap>,
}

impl Default for HostInfo {
    fn default() -> Self {
        Self {
            ncpu: 1,
            swap_limit: false,
            blkio_weight: false,
            cgroup_v2: false,
            devices: Vec::new(),
            nofile: DEFAULT_NOFILE,
            seccomp_x32: true,
            cpu_realtime: false,
            min_oom_score_adj: -1000,
            hugetlb: false,
            cgroups: true,
            id_map: None,
        }
    }
}

/// A device node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Path in the container.
    pub path: String,
    /// `c` or `b`.
    pub kind: char,
    /// Major number.
    pub major: i64,
    /// Minor number.
    pub minor: i64,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Cgroup permissions (`rwm` subset).
    pub permissions: String,
}

/// How a namespace is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespace {
    /// A new one.
    Private,
    /// The host's (no entry in the spec).
    Host,
    /// Join the namespace at this path.
    Join(PathBuf),
}

/// A mount in spec terms (already resolved to host paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecMount {
    /// Path in the container.
    pub destination: String,
    /// `bind`, `tmpfs`, ...
    pub typ: String,
    /// Host path or filesystem source.
    pub source: String,
    /// mount(8) options.
    pub options: Vec<String>,
}

impl SpecMount {
    fn to_oci(&self) -> Mount {
        MountBuilder::default()
            .destination(&self.destination)
            .typ(&self.typ)
            .source(&self.source)
            .options(self.options.clone())
            .build()
            .expect("mount builds")
    }
}

/// Everything [`generate`] needs.
#[derive(Debug, Clone)]
pub struct SpecInput<'a> {
    /// Container id.
    pub id: &'a str,
    /// The merged config.
    pub config: &'a pb::ContainerConfig,
    /// The host config.
    pub host_config: &'a pb::HostConfig,
    /// Who the process runs as.
    pub user: &'a ResolvedUser,
    /// The hostname.
    pub hostname: &'a str,
    /// Network namespace.
    pub network: Namespace,
    /// PID namespace.
    pub pid: Namespace,
    /// IPC namespace.
    pub ipc: Namespace,
    /// UTS namespace.
    pub uts: Namespace,
    /// cgroup namespace.
    pub cgroup: Namespace,
    /// User mounts (binds, volumes, tmpfs) and the network files, resolved.
    pub mounts: &'a [SpecMount],
    /// The variables of legacy links, set before the container's own env.
    pub link_env: &'a [String],
    /// Devices mapped into the container (`--device`), resolved from the host.
    pub devices: &'a [Device],
    /// The engine's cgroup parent (`[engine] cgroup_parent`).
    pub cgroup_parent: &'a str,
    /// Host facts.
    pub host: &'a HostInfo,
    /// The map of the container's own user namespace; `None`: the engine's (`--userns=host`,
    /// or no remapping).
    pub userns: Option<&'a IdMap>,
    /// With `userns`, the user namespace to join rather than make: the one that owns the
    /// network namespace joined (sysfs, raw sockets and net sysctls need its owner).
    pub userns_path: Option<PathBuf>,
}

/// Docker's masked paths.
pub const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Docker's read-only paths.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The /dev/shm size when none is given.
pub const DEFAULT_SHM_SIZE: i64 = 64 * 1024 * 1024;

/// The open-files limit containers get unless they set one.
pub const DEFAULT_NOFILE: u64 = 1_048_576;

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> SpecMount {
    SpecMount {
        destination: dest.into(),
        typ: typ.into(),
        source: source.into(),
        options: options.iter().map(|s| s.to_string()).collect(),
    }
}

/// The mounts every container gets.
fn default_mounts(shm_size: i64, privileged: bool, read_only_sys: bool) -> Vec<SpecMount> {
    let shm = format!("size={shm_size}");
    let sys_ro = if privileged && !read_only_sys {
        "rw"
    } else {
        "ro"
    };
    vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", sys_ro],
        ),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", sys_ro],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", &shm],
        ),
    ]
}

/// Docker's default device cgroup rules: deny everything, then allow mknod of anything and the
/// standard character devices.
fn default_device_rules() -> Vec<LinuxDeviceCgroup> {
    let rule = |allow, typ, major: Option<i64>, minor: Option<i64>, access: &str| {
        let mut b = LinuxDeviceCgroupBuilder::default()
            .allow(allow)
            .typ(typ)
            .access(access);
        if let Some(m) = major {
            b = b.major(m);
        }
        if let Some(m) = minor {
            b = b.minor(m);
        }
        b.build().expect("device rule builds")
    };
    use LinuxDeviceType::{A, B, C};
    vec![
        rule(false, A, None, None, "rwm"),
        rule(true, C, None, None, "m"),
        rule(true, B, None, None, "m"),
        rule(true, C, Some(1), Some(3), "rwm"),    // null
        rule(true, C, Some(1), Some(8), "rwm"),    // random
        rule(true, C, Some(1), Some(7), "rwm"),    // full
        rule(true, C, Some(5), Some(0), "rwm"),    // tty
        rule(true, C, Some(1), Some(5), "rwm"),    // zero
        rule(true, C, Some(1), Some(9), "rwm"),    // urandom
        rule(true, C, Some(136), None, "rwm"),     // pts
        rule(true, C, Some(5), Some(2), "rwm"),    // ptmx
        rule(true, C, Some(10), Some(200), "rwm"), // tun
    ]
}

/// Parses a device cgroup rule: `c 1:3 rwm`, `a *:* rwm`, `b 8:* r`.
pub fn parse_device_rule(rule: &str) -> Result<LinuxDeviceCgroup> {
    let invalid =
        || Error::invalid_argument(format!("invalid device cgroup rule format: '{rule}'"));
    let parts: Vec<&str> = rule.split_whitespace().collect();
    if parts.len() != 3 {
        return Err(invalid());
    }
    let typ = match parts[0] {
        "a" => LinuxDeviceType::A,
        "b" => LinuxDeviceType::B,
        "c" => LinuxDeviceType::C,
        _ => return Err(invalid()),
    };
    let (maj, min) = parts[1].split_once(':').ok_or_else(invalid)?;
    let num = |s: &str| -> Result<Option<i64>> {
        if s == "*" {
            Ok(None)
        } else {
            s.parse().map(Some).map_err(|_| invalid())
        }
    };
    if parts[2].is_empty() || !parts[2].chars().all(|c| matches!(c, 'r' | 'w' | 'm')) {
        return Err(invalid());
    }
    let mut b = LinuxDeviceCgroupBuilder::default()
        .allow(true)
        .typ(typ)
        .access(parts[2]);
    if let Some(m) = num(maj)? {
        b = b.major(m);
    }
    if let Some(m) = num(min)? {
        b = b.minor(m);
    }
    b.build().map_err(|e| invalid().with_source(e))
}

fn device_type(kind: char) -> LinuxDeviceType {
    match kind {
        'b' => LinuxDeviceType::B,
        'p' => LinuxDeviceType::P,
        'u' => LinuxDeviceType::U,
        _ => LinuxDeviceType::C,
    }
}

fn oci_device(d: &Device) -> LinuxDevice {
    LinuxDeviceBuilder::default()
        .path(&d.path)
        .typ(device_type(d.kind))
        .major(d.major)
        .minor(d.minor)
        .file_mode(d.mode & 0o7777)
        .uid(d.uid)
        .gid(d.gid)
        .build()
        .expect("device builds")
}

fn device_rule(d: &Device) -> LinuxDeviceCgroup {
    LinuxDeviceCgroupBuilder::default()
        .allow(true)
        .typ(device_type(d.kind))
        .major(d.major)
        .minor(d.minor)
        .access(if d.permissions.is_empty() {
            "rwm".to_string()
        } else {
            d.permissions.clone()
        })
        .build()
        .expect("device rule builds")
}

fn rlimit_type(name: &str) -> Result<PosixRlimitType> {
    let upper = format!("RLIMIT_{}", name.to_ascii_uppercase());
    PosixRlimitType::from_str(&upper)
        .map_err(|_| Error::invalid_argument(format!("invalid ulimit type: {name}")))
}

fn namespace(typ: LinuxNamespaceType, ns: &Namespace) -> Option<LinuxNamespace> {
    match ns {
        Namespace::Host => None,
        Namespace::Private => Some(
            LinuxNamespaceBuilder::default()
                .typ(typ)
                .build()
                .expect("namespace builds"),
        ),
        Namespace::Join(path) => Some(
            LinuxNamespaceBuilder::default()
                .typ(typ)
                .path(path.clone())
                .build()
                .expect("namespace builds"),
        ),
    }
}

/// Bounding, effective and permitted sets; no inheritable or ambient capabilities (Docker
/// stopped granting inheritable ones after CVE-2022-24769). The builder's defaults are not
/// Docker's, so every set is given explicitly.
fn capability_sets(
    caps: oci_spec::runtime::Capabilities,
) -> Result<oci_spec::runtime::LinuxCapabilities> {
    let mut out = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .build()
        .map_err(|e| Error::internal("capabilities").with_source(e))?;
    out.set_inheritable(None);
    out.set_ambient(None);
    Ok(out)
}

/// The container's cgroup path: `/<parent>/<id>` (the host config's parent wins).
pub fn cgroup_path(host_config_parent: &str, engine_parent: &str, id: &str) -> String {
    let parent = if host_config_parent.is_empty() {
        engine_parent
    } else {
        host_config_parent
    };
    let parent = parent.trim_matches('/');
    if parent.is_empty() {
        format!("/{id}")
    } else {
        format!("/{parent}/{id}")
    }
}

/// The process environment: Docker's PATH default, HOSTNAME, TERM for a TTY, HOME, then the
/// container's env over them.
pub fn process_env(
    config: &pb::ContainerConfig,
    hostname: &str,
    home: &str,
    link_env: &[String],
) -> Vec<String> {
    let mut base = vec![DEFAULT_PATH.to_string(), format!("HOSTNAME={hostname}")];
    if config.tty {
        base.push("TERM=xterm".into());
    }
    base = imageconfig::merge_env(&base, link_env);
    let mut env = imageconfig::merge_env(&base, &config.env);
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={home}"));
    }
    env
}

/// Generates the spec. Returns it with warnings for settings the host cannot honour.
pub fn generate(input: &SpecInput<'_>) -> Result<(Spec, Vec<String>)> {
    let mut warnings = Vec::new();
    let hc = input.host_config;
    let cfg = input.config;
    let default_sec = pb::SecurityOptions::default();
    let sec = hc.security.as_ref().unwrap_or(&default_sec);
    let default_res = pb::Resources::default();
    let res = hc.resources.as_ref().unwrap_or(&default_res);
    let privileged = sec.privileged;

    // Process.
    let args = imageconfig::args(cfg);
    if args.is_empty() {
        return Err(Error::invalid_argument("No command specified"));
    }
    let caps = caps::effective(privileged, &sec.cap_add, &sec.cap_drop)?;
    let oci_caps = caps::to_oci(&caps);
    let capabilities = capability_sets(oci_caps)?;
    let mut rlimits: Vec<PosixRlimit> = Vec::new();
    let mut has_nofile = false;
    for u in &res.ulimits {
        let typ = rlimit_type(&u.name)?;
        has_nofile |= typ == PosixRlimitType::RlimitNofile;
        if u.soft > u.hard {
            return Err(Error::invalid_argument(format!(
                "ulimit soft limit must be less than or equal to hard limit: {} > {}",
                u.soft, u.hard
            )));
        }
        rlimits.push(
            PosixRlimitBuilder::default()
                .typ(typ)
                .soft(u.soft.max(0) as u64)
                .hard(u.hard.max(0) as u64)
                .build()
                .map_err(|e| Error::internal("rlimit").with_source(e))?,
        );
    }
    if !has_nofile {
        rlimits.push(
            PosixRlimitBuilder::default()
                .typ(PosixRlimitType::RlimitNofile)
                .soft(input.host.nofile)
                .hard(input.host.nofile)
                .build()
                .map_err(|e| Error::internal("rlimit").with_source(e))?,
        );
    }
    let user = UserBuilder::default()
        .uid(input.user.uid)
        .gid(input.user.gid)
        .additional_gids(input.user.additional_gids.clone())
        .build()
        .map_err(|e| Error::internal("user").with_source(e))?;
    let mut process = ProcessBuilder::default()
        .terminal(cfg.tty)
        .user(user)
        .args(args)
        .env(process_env(
            cfg,
            input.hostname,
            &input.user.home,
            input.link_env,
        ))
        .cwd(if cfg.working_dir.is_empty() {
            "/"
        } else {
            cfg.working_dir.as_str()
        })
        .capabilities(capabilities)
        .rlimits(rlimits)
        .no_new_privileges(sec.no_new_privileges)
        .build()
        .map_err(|e| Error::internal("process").with_source(e))?;
    if hc.oom_score_adj != 0 {
        if !(-1000..=1000).contains(&hc.oom_score_adj) {
            return Err(Error::invalid_argument(format!(
                "Invalid value {}, range for oom score adj is [-1000, 1000]",
                hc.oom_score_adj
            )));
        }
        let adj = hc.oom_score_adj.max(input.host.min_oom_score_adj);
        if adj != hc.oom_score_adj {
            warnings.push(format!(
                "oom score adj {} clamped to {adj}: lowering it needs CAP_SYS_RESOURCE",
                hc.oom_score_adj
            ));
        }
        process.set_oom_score_adj(Some(adj));
    }
    if let Some(size) = &hc.console_size
        && cfg.tty
        && size.width > 0
        && size.height > 0
    {
        process.set_console_size(Some(
            oci_spec::runtime::BoxBuilder::default()
                .width(size.width as u64)
                .height(size.height as u64)
                .build()
                .map_err(|e| Error::internal("console size").with_source(e))?,
        ));
    }
    if !sec.apparmor_profile.is_empty() && sec.apparmor_profile != "unconfined" && !privileged {
        process.set_apparmor_profile(Some(sec.apparmor_profile.clone()));
    }

    // Mounts: defaults, minus those a user mount replaces, then the user mounts, parents first.
    let shm_size = hc.shm_size.filter(|s| *s > 0).unwrap_or(DEFAULT_SHM_SIZE);
    let mut user_mounts: Vec<&SpecMount> = input.mounts.iter().collect();
    user_mounts.sort_by_key(|m| {
        m.destination
            .trim_end_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .count()
    });
    let mut mounts: Vec<Mount> = Vec::new();
    for m in default_mounts(shm_size, privileged, false) {
        // mqueue can only be mounted by the owner of the IPC namespace: a user-namespaced
        // container sharing the host's has none (as with `--ipc none`).
        if input.userns.is_some() && input.ipc == Namespace::Host && m.destination == "/dev/mqueue"
        {
            continue;
        }
        // `--ipc host` binds the host's; `--ipc none` has none at all (Docker's meaning).
        if (input.ipc == Namespace::Host || hc.ipc_mode == "none") && m.destination == "/dev/shm" {
            continue;
        }
        let replaced = user_mounts.iter().any(|u| {
            u.destination.trim_end_matches('/') == m.destination
                // A user mount over /dev replaces the whole default /dev tree.
                || (m.destination.starts_with("/dev/") && u.destination == "/dev")
        });
        if !replaced {
            mounts.push(m.to_oci());
        }
    }
    if input.ipc == Namespace::Host {
        mounts.push(mount("/dev/shm", "bind", "/dev/shm", &["rbind", "rprivate"]).to_oci());
    }
    for m in &user_mounts {
        mounts.push(m.to_oci());
    }

    // Linux.
    let mut namespaces: Vec<LinuxNamespace> = [
        namespace(LinuxNamespaceType::Mount, &Namespace::Private),
        namespace(LinuxNamespaceType::Network, &input.network),
        namespace(LinuxNamespaceType::Pid, &input.pid),
        namespace(LinuxNamespaceType::Ipc, &input.ipc),
        namespace(LinuxNamespaceType::Uts, &input.uts),
        namespace(LinuxNamespaceType::Cgroup, &input.cgroup),
    ]
    .into_iter()
    .flatten()
    .collect();
    if input.userns.is_some() {
        let user = match &input.userns_path {
            Some(path) => Namespace::Join(path.clone()),
            None => Namespace::Private,
        };
        namespaces.extend(namespace(LinuxNamespaceType::User, &user));
    }
    namespaces.sort_by_key(|n| format!("{:?}", n.typ()));

    let devnum = |path: &str| -> Result<(i64, i64)> {
        input
            .host
            .devices
            .iter()
            .chain(input.devices.iter())
            .find(|d| d.path == path)
            .map(|d| (d.major, d.minor))
            .ok_or_else(|| {
                Error::invalid_argument(format!("{path}: no such block device on the host"))
            })
    };
    let mut linux_resources = resources::to_oci(res, input.host, true, &devnum, &mut warnings)?;
    let mut rules = if privileged {
        vec![
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(LinuxDeviceType::A)
                .access("rwm")
                .build()
                .expect("device rule builds"),
        ]
    } else {
        default_device_rules()
    };
    let mut devices: Vec<LinuxDevice> = Vec::new();
    if privileged {
        devices.extend(input.host.devices.iter().map(oci_device));
    }
    for d in input.devices {
        devices.retain(|x| x.path().to_string_lossy() != d.path);
        devices.push(oci_device(d));
        if !privileged {
            rules.push(device_rule(d));
        }
    }
    for r in &hc.device_cgroup_rules {
        rules.push(parse_device_rule(r)?);
    }
    linux_resources.set_devices(Some(rules));

    let sysctl: HashMap<String, String> = hc
        .sysctls
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    validate_sysctls(&hc.sysctls, input)?;

    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .devices(devices)
        .sysctl(sysctl)
        .build()
        .map_err(|e| Error::internal("linux section").with_source(e))?;
    if input.host.cgroups {
        linux.set_resources(Some(linux_resources));
        linux.set_cgroups_path(Some(PathBuf::from(cgroup_path(
            &hc.cgroup_parent,
            input.cgroup_parent,
            input.id,
        ))));
    } else {
        resources::refuse_without_cgroups(res, &hc.cgroup_parent)?;
    }
    if !privileged {
        let masked = match &sec.masked_paths {
            Some(l) => l.values.clone(),
            None => MASKED_PATHS.iter().map(|s| s.to_string()).collect(),
        };
        let readonly = match &sec.readonly_paths {
            Some(l) => l.values.clone(),
            None => READONLY_PATHS.iter().map(|s| s.to_string()).collect(),
        };
        linux.set_masked_paths(Some(masked));
        linux.set_readonly_paths(Some(readonly));
        match sec.seccomp_profile.as_str() {
            "" => {
                linux.set_seccomp(Some(seccomp::default_profile(
                    &caps,
                    input.host.seccomp_x32,
                )));
            }
            "unconfined" => {}
            json => {
                linux.set_seccomp(Some(seccomp::parse_profile(json)?));
            }
        }
    } else {
        linux.set_masked_paths(sec.masked_paths.as_ref().map(|l| l.values.clone()));
        linux.set_readonly_paths(sec.readonly_paths.as_ref().map(|l| l.values.clone()));
    }

    linux.set_rootfs_propagation(rootfs_propagation(input.mounts));
    if let Some(map) = input.userns {
        let mappings = |ranges: &[IdRange]| -> Result<Vec<LinuxIdMapping>> {
            ranges
                .iter()
                .map(|r| {
                    LinuxIdMappingBuilder::default()
                        .container_id(r.container)
                        .host_id(r.host)
                        .size(r.size)
                        .build()
                        .map_err(|e| Error::internal("id mapping").with_source(e))
                })
                .collect()
        };
        linux.set_uid_mappings(Some(mappings(&map.uids)?));
        linux.set_gid_mappings(Some(mappings(&map.gids)?));
    }

    let root = RootBuilder::default()
        .path("rootfs")
        .readonly(sec.read_only_rootfs)
        .build()
        .map_err(|e| Error::internal("root").with_source(e))?;
    let mut builder = SpecBuilder::default()
        .version("1.0.2")
        .root(root)
        .process(process)
        .mounts(mounts)
        .linux(linux);
    if input.uts != Namespace::Host {
        builder = builder.hostname(input.hostname);
        if !cfg.domainname.is_empty() {
            builder = builder.domainname(cfg.domainname.clone());
        }
    }
    let mut annotations: BTreeMap<String, String> = hc
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    annotations.insert("org.berth.container.id".into(), input.id.into());
    builder = builder.annotations(annotations.into_iter().collect::<HashMap<_, _>>());
    let mut spec = builder
        .build()
        .map_err(|e| Error::internal("spec").with_source(e))?;
    // The builder fills unset fields with its own defaults; what Docker leaves out stays out.
    if input.uts == Namespace::Host {
        spec.set_hostname(None);
    }
    spec.set_hooks(None);
    Ok((spec, warnings))
}

/// The propagation of the container's root mount that its binds need (moby's and containerd's
/// rule): a shared bind only propagates back to the host when the container's mount namespace
/// stays a peer of the host's (`rshared`), a slave bind only receives when it stays at least a
/// slave (`rslave`, runc's default anyway). None leaves runc's default.
fn rootfs_propagation(mounts: &[SpecMount]) -> Option<String> {
    let has = |want: &[&str]| {
        mounts
            .iter()
            .any(|m| m.options.iter().any(|o| want.contains(&o.as_str())))
    };
    if has(&["shared", "rshared"]) {
        Some("rshared".into())
    } else if has(&["slave", "rslave"]) {
        Some("rslave".into())
    } else {
        None
    }
}

/// Docker's rule: namespaced sysctls only, and not the ones of a namespace shared with the
/// host.
fn validate_sysctls(sysctls: &HashMap<String, String>, input: &SpecInput<'_>) -> Result<()> {
    for key in sysctls.keys() {
        let ipc = key.starts_with("kernel.msg")
            || key.starts_with("kernel.sem")
            || key.starts_with("kernel.shm")
            || key.starts_with("fs.mqueue.");
        let net = key.starts_with("net.");
        let uts = key == "kernel.domainname" || key == "kernel.hostname";
        let ok = (ipc && input.ipc != Namespace::Host)
            || (net && input.network != Namespace::Host)
            || (uts && input.uts != Namespace::Host);
        if !ok {
            return Err(Error::invalid_argument(format!(
                "sysctl '{key}' is not allowed in the container's namespaces"
            )));
        }
    }
    Ok(())
}

/// An exec process in the container: the container's spec process adjusted for the exec
/// (args, env over the container's, user, cwd, tty, capabilities when privileged).
pub fn exec_process(
    container_spec: &Spec,
    args: Vec<String>,
    env: &[String],
    user: Option<&ResolvedUser>,
    cwd: &str,
    tty: bool,
    privileged: bool,
) -> Result<oci_spec::runtime::Process> {
    let mut p = container_spec
        .process()
        .clone()
        .ok_or_else(|| Error::internal("container spec has no process"))?;
    if args.is_empty() {
        return Err(Error::invalid_argument("No exec command specified"));
    }
    p.set_args(Some(args));
    let base = p.env().clone().unwrap_or_default();
    let mut merged = imageconfig::merge_env(&base, env);
    if tty && !merged.iter().any(|e| e.starts_with("TERM=")) {
        merged.push("TERM=xterm".into());
    }
    p.set_env(Some(merged));
    p.set_terminal(Some(tty));
    p.set_console_size(None);
    if !cwd.is_empty() {
        p.set_cwd(PathBuf::from(cwd));
    }
    if let Some(u) = user {
        let mut spec_user = p.user().clone();
        spec_user.set_uid(u.uid);
        spec_user.set_gid(u.gid);
        spec_user.set_additional_gids(Some(u.additional_gids.clone()));
        p.set_user(spec_user);
    }
    if privileged {
        let all = caps::to_oci(&caps::effective(true, &[], &[])?);
        p.set_capabilities(Some(capability_sets(all)?));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::berth::types::v1 as types;

    fn config() -> pb::ContainerConfig {
        pb::ContainerConfig {
            cmd: Some(types::StringList {
                values: vec!["echo".into(), "hi".into()],
            }),
            env: vec!["A=1".into()],
            working_dir: "/work".into(),
            ..Default::default()
        }
    }

    fn root() -> ResolvedUser {
        ResolvedUser {
            uid: 0,
            gid: 0,
            additional_gids: vec![10],
            home: "/root".into(),
        }
    }

    fn host() -> HostInfo {
        HostInfo {
            ncpu: 2,
            swap_limit: true,
            blkio_weight: true,
            cgroup_v2: false,
            nofile: DEFAULT_NOFILE,
            seccomp_x32: true,
            cpu_realtime: false,
            // As without CAP_SYS_RESOURCE, with the engine at 0.
            min_oom_score_adj: 0,
            hugetlb: true,
            cgroups: true,
            id_map: None,
            devices: vec![Device {
                path: "/dev/fuse".into(),
                kind: 'c',
                major: 10,
                minor: 229,
                mode: 0o666,
                uid: 0,
                gid: 0,
                permissions: String::new(),
            }],
        }
    }

    fn gen_with(hc: &pb::HostConfig, mounts: &[SpecMount]) -> (Spec, Vec<String>) {
        let cfg = config();
        let user = root();
        let h = host();
        let input = SpecInput {
            id: "abc",
            config: &cfg,
            host_config: hc,
            user: &user,
            hostname: "abc",
            network: Namespace::Join("/run/berth/netns/abc".into()),
            pid: Namespace::Private,
            ipc: Namespace::Private,
            uts: Namespace::Private,
            cgroup: Namespace::Host,
            mounts,
            link_env: &["AL_NAME=/abc/al".to_string()],
            devices: &[],
            cgroup_parent: "berth",
            host: &h,
            userns: None,
            userns_path: None,
        };
        generate(&input).unwrap()
    }

    fn json(spec: &Spec) -> serde_json::Value {
        serde_json::to_value(spec).unwrap()
    }

    #[test]
    fn defaults_match_docker() {
        let (spec, warnings) = gen_with(&pb::HostConfig::default(), &[]);
        assert!(warnings.is_empty());
        let j = json(&spec);
        assert_eq!(j["process"]["args"], serde_json::json!(["echo", "hi"]));
        assert_eq!(j["process"]["cwd"], "/work");
        let env: Vec<String> = serde_json::from_value(j["process"]["env"].clone()).unwrap();
        assert_eq!(env[0], DEFAULT_PATH);
        assert!(env.contains(&"HOSTNAME=abc".to_string()));
        assert!(env.contains(&"A=1".to_string()));
        assert!(env.contains(&"HOME=/root".to_string()));
        let caps = j["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert_eq!(caps.len(), caps::DEFAULT.len());
        assert!(caps.contains(&"CAP_NET_RAW".into()));
        assert!(j["process"]["capabilities"].get("inheritable").is_none());
        assert_eq!(
            j["process"]["user"]["additionalGids"],
            serde_json::json!([10])
        );
        assert_eq!(j["process"]["rlimits"][0]["type"], "RLIMIT_NOFILE");
        assert_eq!(j["linux"]["cgroupsPath"], "/berth/abc");
        assert_eq!(
            j["linux"]["maskedPaths"].as_array().unwrap().len(),
            MASKED_PATHS.len()
        );
        assert_eq!(
            j["linux"]["readonlyPaths"].as_array().unwrap().len(),
            READONLY_PATHS.len()
        );
        assert_eq!(j["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(j["hostname"], "abc");
        assert_eq!(j["root"]["path"], "rootfs");
        let dests: Vec<&str> = j["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(
            dests,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/sys",
                "/sys/fs/cgroup",
                "/dev/mqueue",
                "/dev/shm"
            ]
        );
        let shm = &j["mounts"][6]["options"];
        assert!(shm.as_array().unwrap().contains(&"size=67108864".into()));
        let ns: Vec<(&str, Option<&str>)> = j["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| (n["type"].as_str().unwrap(), n["path"].as_str()))
            .collect();
        assert!(ns.contains(&("network", Some("/run/berth/netns/abc"))));
        assert!(ns.contains(&("pid", None)));
        assert!(!ns.iter().any(|(t, _)| *t == "cgroup"));
        let rules = j["linux"]["resources"]["devices"].as_array().unwrap();
        assert_eq!(rules[0]["allow"], false);
    }

    #[test]
    fn negative_oom_score_adj_is_clamped_not_refused() {
        let hc = pb::HostConfig {
            oom_score_adj: -998,
            ..Default::default()
        };
        let (spec, warnings) = gen_with(&hc, &[]);
        assert_eq!(json(&spec)["process"]["oomScoreAdj"], 0);
        assert!(
            warnings.iter().any(|w| w.contains("clamped")),
            "{warnings:?}"
        );
    }

    #[test]
    fn resources_and_security_options() {
        let hc = pb::HostConfig {
            resources: Some(pb::Resources {
                memory: Some(32 << 20),
                memory_swap: Some(-1),
                nano_cpus: Some(1_500_000_000),
                cpuset_cpus: Some("1".into()),
                pids_limit: Some(10),
                blkio_weight: Some(200),
                ulimits: vec![pb::Ulimit {
                    name: "nofile".into(),
                    soft: 100,
                    hard: 200,
                }],
                ..Default::default()
            }),
            security: Some(pb::SecurityOptions {
                cap_add: vec!["SYS_ADMIN".into()],
                cap_drop: vec!["MKNOD".into()],
                no_new_privileges: true,
                read_only_rootfs: true,
                ..Default::default()
            }),
            shm_size: Some(1 << 20),
            sysctls: [("net.ipv4.ip_forward".to_string(), "1".to_string())].into(),
            cgroup_parent: "custom/parent".into(),
            oom_score_adj: 100,
            ..Default::default()
        };
        let (spec, _) = gen_with(&hc, &[]);
        let j = json(&spec);
        let r = &j["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], 32 << 20);
        assert_eq!(r["memory"]["swap"], -1);
        assert_eq!(r["cpu"]["quota"], 150_000);
        assert_eq!(r["cpu"]["period"], 100_000);
        assert_eq!(r["cpu"]["cpus"], "1");
        assert_eq!(r["pids"]["limit"], 10);
        assert_eq!(r["blockIO"]["weight"], 200);
        assert_eq!(j["linux"]["cgroupsPath"], "/custom/parent/abc");
        assert_eq!(j["process"]["noNewPrivileges"], true);
        assert_eq!(j["process"]["oomScoreAdj"], 100);
        assert_eq!(j["root"]["readonly"], true);
        assert_eq!(j["process"]["rlimits"].as_array().unwrap().len(), 1);
        assert_eq!(j["process"]["rlimits"][0]["soft"], 100);
        let caps = j["process"]["capabilities"]["bounding"].as_array().unwrap();
        assert!(caps.contains(&"CAP_SYS_ADMIN".into()));
        assert!(!caps.contains(&"CAP_MKNOD".into()));
        let names: Vec<String> =
            serde_json::from_value(j["linux"]["seccomp"]["syscalls"][0]["names"].clone()).unwrap();
        assert!(
            names.contains(&"mount".to_string()),
            "SYS_ADMIN allows mount"
        );
        assert_eq!(j["linux"]["sysctl"]["net.ipv4.ip_forward"], "1");
        let shm = j["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/dev/shm")
            .unwrap();
        assert!(
            shm["options"]
                .as_array()
                .unwrap()
                .contains(&"size=1048576".into())
        );
    }

    #[test]
    fn privileged_and_unconfined() {
        let hc = pb::HostConfig {
            security: Some(pb::SecurityOptions {
                privileged: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let j = json(&gen_with(&hc, &[]).0);
        assert!(j["linux"].get("seccomp").is_none());
        assert!(j["linux"].get("maskedPaths").is_none());
        assert_eq!(j["linux"]["devices"][0]["path"], "/dev/fuse");
        assert_eq!(j["linux"]["resources"]["devices"][0]["allow"], true);
        assert_eq!(
            j["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len(),
            caps::available().len()
        );
        let hc = pb::HostConfig {
            security: Some(pb::SecurityOptions {
                seccomp_profile: "unconfined".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let j = json(&gen_with(&hc, &[]).0);
        assert!(j["linux"].get("seccomp").is_none());
        assert!(j["linux"].get("maskedPaths").is_some());
    }

    #[test]
    fn user_mounts_replace_defaults_and_come_parents_first() {
        let mounts = [
            SpecMount {
                destination: "/data/sub".into(),
                typ: "bind".into(),
                source: "/host/b".into(),
                options: vec!["rbind".into(), "ro".into()],
            },
            SpecMount {
                destination: "/data".into(),
                typ: "bind".into(),
                source: "/host/a".into(),
                options: vec!["rbind".into()],
            },
            SpecMount {
                destination: "/dev/shm".into(),
                typ: "tmpfs".into(),
                source: "tmpfs".into(),
                options: vec![],
            },
        ];
        let j = json(&gen_with(&pb::HostConfig::default(), &mounts).0);
        let dests: Vec<&str> = j["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(dests.iter().filter(|d| **d == "/dev/shm").count(), 1);
        let a = dests.iter().position(|d| *d == "/data").unwrap();
        let b = dests.iter().position(|d| *d == "/data/sub").unwrap();
        assert!(a < b);
        assert!(
            j["linux"].get("rootfsPropagation").is_none(),
            "runc's default"
        );
    }

    #[test]
    fn a_remapped_container_gets_a_user_namespace_and_its_maps() {
        let map = IdMap {
            uids: berth_core::userns::concatenate(&[(100000, 65536), (300000, 10)]).unwrap(),
            gids: berth_core::userns::concatenate(&[(200000, 65536)]).unwrap(),
        };
        let cfg = config();
        let user = root();
        let h = host();
        let hc = pb::HostConfig::default();
        let input = SpecInput {
            id: "abc",
            config: &cfg,
            host_config: &hc,
            user: &user,
            hostname: "abc",
            network: Namespace::Join("/run/berth/netns/abc".into()),
            pid: Namespace::Private,
            ipc: Namespace::Private,
            uts: Namespace::Private,
            cgroup: Namespace::Host,
            mounts: &[],
            link_env: &[],
            devices: &[],
            cgroup_parent: "berth",
            host: &h,
            userns: Some(&map),
            userns_path: None,
        };
        let j = json(&generate(&input).unwrap().0);
        let types: Vec<&str> = j["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(types.contains(&"user"), "{types:?}");
        assert_eq!(
            j["linux"]["uidMappings"],
            serde_json::json!([
                {"containerID": 0, "hostID": 100000, "size": 65536},
                {"containerID": 65536, "hostID": 300000, "size": 10},
            ])
        );
        assert_eq!(
            j["linux"]["gidMappings"],
            serde_json::json!([{"containerID": 0, "hostID": 200000, "size": 65536}])
        );
        // Joining the user namespace that owns the engine's network namespace.
        let joined = SpecInput {
            userns_path: Some(PathBuf::from("/run/berth/netns/abc.user")),
            ..input.clone()
        };
        let j = json(&generate(&joined).unwrap().0);
        assert!(
            j["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["type"] == "user" && n["path"] == "/run/berth/netns/abc.user"),
            "{}",
            j["linux"]["namespaces"]
        );
        assert_eq!(j["linux"]["uidMappings"][0]["hostID"], 100000);
        // Without a map (or with --userns=host): no user namespace, no mappings.
        let j = json(&gen_with(&hc, &[]).0);
        assert!(j["linux"]["uidMappings"].is_null());
        assert!(
            !j["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["type"] == "user")
        );
    }

    #[test]
    fn shared_and_slave_binds_set_the_root_propagation() {
        let bind = |prop: &str| SpecMount {
            destination: "/data".into(),
            typ: "bind".into(),
            source: "/host/a".into(),
            options: vec!["rbind".into(), "rw".into(), prop.into()],
        };
        let root = |mounts: &[SpecMount]| {
            json(&gen_with(&pb::HostConfig::default(), mounts).0)["linux"]["rootfsPropagation"]
                .clone()
        };
        assert_eq!(root(&[bind("rshared")]), "rshared");
        assert_eq!(root(&[bind("shared")]), "rshared");
        assert_eq!(root(&[bind("rslave")]), "rslave");
        assert_eq!(root(&[bind("rslave"), bind("rshared")]), "rshared");
        assert!(root(&[bind("rprivate")]).is_null());
    }

    #[test]
    fn bad_input_is_refused() {
        let bad = |hc: pb::HostConfig| {
            let cfg = config();
            let user = root();
            let h = host();
            let input = SpecInput {
                id: "abc",
                config: &cfg,
                host_config: &hc,
                user: &user,
                hostname: "abc",
                network: Namespace::Host,
                pid: Namespace::Private,
                ipc: Namespace::Private,
                uts: Namespace::Private,
                cgroup: Namespace::Host,
                mounts: &[],
                link_env: &[],
                devices: &[],
                cgroup_parent: "berth",
                host: &h,
                userns: None,
                userns_path: None,
            };
            generate(&input).unwrap_err().message().to_string()
        };
        assert!(
            bad(pb::HostConfig {
                sysctls: [("net.core.somaxconn".to_string(), "1".to_string())].into(),
                ..Default::default()
            })
            .contains("not allowed")
        );
        assert!(
            bad(pb::HostConfig {
                sysctls: [("vm.swappiness".to_string(), "1".to_string())].into(),
                ..Default::default()
            })
            .contains("not allowed")
        );
        assert!(
            bad(pb::HostConfig {
                device_cgroup_rules: vec!["x 1:2 rwm".into()],
                ..Default::default()
            })
            .contains("device cgroup rule")
        );
        assert!(
            bad(pb::HostConfig {
                resources: Some(pb::Resources {
                    ulimits: vec![pb::Ulimit {
                        name: "bogus".into(),
                        soft: 1,
                        hard: 1
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            })
            .contains("ulimit")
        );
    }

    #[test]
    fn device_rules_parse() {
        let r = parse_device_rule("c 1:3 rwm").unwrap();
        assert_eq!((r.major(), r.minor()), (Some(1), Some(3)));
        let r = parse_device_rule("a *:* rwm").unwrap();
        assert_eq!(r.major(), None);
        assert!(parse_device_rule("c 1:3").is_err());
        assert!(parse_device_rule("c 1:3 xyz").is_err());
    }

    #[test]
    fn ipc_none_has_no_dev_shm() {
        let shm = |hc: &pb::HostConfig| {
            let (spec, _) = gen_with(hc, &[]);
            spec.mounts()
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.destination() == std::path::Path::new("/dev/shm"))
        };
        let none = pb::HostConfig {
            ipc_mode: "none".into(),
            ..Default::default()
        };
        assert!(!shm(&none));
        assert!(shm(&pb::HostConfig::default()));
    }

    #[test]
    fn exec_processes_inherit_and_override() {
        let (spec, _) = gen_with(&pb::HostConfig::default(), &[]);
        let p = exec_process(
            &spec,
            vec!["sh".into()],
            &["A=2".into()],
            None,
            "/tmp",
            true,
            false,
        )
        .unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &["sh"]);
        let env = p.env().as_ref().unwrap();
        assert!(env.contains(&"A=2".to_string()) && !env.contains(&"A=1".to_string()));
        // Link variables are part of the container's environment, so execs see them.
        assert!(env.contains(&"AL_NAME=/abc/al".to_string()));
        assert!(env.contains(&"TERM=xterm".to_string()));
        assert_eq!(p.cwd().to_str(), Some("/tmp"));
        assert_eq!(p.terminal(), Some(true));
        assert!(exec_process(&spec, vec![], &[], None, "", false, false).is_err());
    }
}
