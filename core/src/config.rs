//! Typed configuration: `berth.toml`, one section per service, strict about unknown keys.
//!
//! Layers, later ones winning: built-in defaults, the TOML file, a Docker `daemon.json`
//! ([`crate::daemon_json`]), environment variables `BERTH_SECTION__KEY` (and `BERTH_ROOT`,
//! `BERTH_STATE_DIR` for the two top-level keys), then command-line flags. Libraries never read
//! the environment or files themselves: `main` loads a [`Config`] once and passes it down.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where berth looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/berth/berth.toml";

/// The whole configuration of a berth installation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Persistent data: images, content, snapshots, volumes, records.
    pub root: PathBuf,
    /// Runtime state: sockets, shims, bundles, network namespaces. Lost at reboot.
    pub state_dir: PathBuf,
    /// The stack runs rootless: inside the user, mount and network namespaces `berth up
    /// --rootless` made for an ordinary user (docs/rootless.md). Set by `berth up` for its
    /// services, and implied for an ordinary user's `berth` commands.
    pub rootless: bool,
    /// The group that owns every berth socket (mode from `socket_mode`); none keeps root's.
    pub socket_group: Option<String>,
    /// Mode of the internal gRPC sockets.
    pub socket_mode: u32,
    /// Logging and tracing.
    pub telemetry: TelemetryConfig,
    /// berth-images.
    pub images: ImagesConfig,
    /// berth-snapshotter.
    pub snapshotter: SnapshotterConfig,
    /// berth-network.
    pub network: NetworkConfig,
    /// berth-engine.
    pub engine: EngineConfig,
    /// berth-shim (passed on by the engine when it spawns shims).
    pub shim: ShimConfig,
    /// berth-gateway.
    pub gateway: GatewayConfig,
    /// The Kubernetes CRI, served by berth-gateway.
    pub cri: CriConfig,
    /// External containerd-compatible plugins, by name (`[proxy_plugins.NAME]`).
    pub proxy_plugins: BTreeMap<String, ProxyPlugin>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/berth"),
            state_dir: PathBuf::from("/run/berth"),
            rootless: false,
            socket_group: None,
            socket_mode: 0o660,
            telemetry: TelemetryConfig::default(),
            images: ImagesConfig::default(),
            snapshotter: SnapshotterConfig::default(),
            network: NetworkConfig::default(),
            engine: EngineConfig::default(),
            shim: ShimConfig::default(),
            gateway: GatewayConfig::default(),
            cri: CriConfig::default(),
            proxy_plugins: BTreeMap::new(),
        }
    }
}

/// Logging and tracing settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`, or a full `tracing` filter directive.
    pub log_level: String,
    /// `text` or `json`.
    pub log_format: String,
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`; traces are exported only when set.
    pub otlp_endpoint: Option<String>,
    /// `host:port` where the gateway serves every daemon's Prometheus metrics (`GET
    /// /metrics`); off when unset. A loopback address unless `metrics_allow_remote`.
    pub metrics_addr: Option<String>,
    /// Allows a `metrics_addr` other hosts can reach (the metrics name every container).
    pub metrics_allow_remote: bool,
}

impl TelemetryConfig {
    /// The metrics address, checked: `None` when off.
    pub fn metrics_socket_addr(&self) -> Result<Option<std::net::SocketAddr>> {
        let Some(addr) = &self.metrics_addr else {
            return Ok(None);
        };
        let parsed: std::net::SocketAddr = addr.parse().map_err(|_| {
            Error::invalid_argument(format!(
                "telemetry.metrics_addr: {addr:?} is not an address:port such as 127.0.0.1:9323"
            ))
        })?;
        if !parsed.ip().is_loopback() && !self.metrics_allow_remote {
            return Err(Error::invalid_argument(format!(
                "telemetry.metrics_addr: {addr} is not a loopback address; set \
                 telemetry.metrics_allow_remote = true to serve metrics to other hosts"
            )));
        }
        Ok(Some(parsed))
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_level: "info".into(),
            log_format: "text".into(),
            otlp_endpoint: None,
            metrics_addr: None,
            metrics_allow_remote: false,
        }
    }
}

/// berth-images settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// Socket path; default `<state_dir>/images.sock`.
    pub socket: Option<PathBuf>,
    /// Layers downloaded at once per pull.
    pub max_concurrent_downloads: u32,
    /// Layers uploaded at once per push.
    pub max_concurrent_uploads: u32,
    /// Registries spoken to over plain HTTP or with unverified TLS (`host:port` or a CIDR).
    /// Loopback registries are always insecure, as in Docker.
    pub insecure_registries: Vec<String>,
    /// Mirrors tried before docker.io, as URLs.
    pub registry_mirrors: Vec<String>,
    /// Per-registry CA certificates: `<certs_dir>/<host:port>/*.crt`.
    pub certs_dir: PathBuf,
    /// Per-registry hosts in containerd's layout: `<dir>/<host>/hosts.toml` (mirrors, TLS,
    /// plain http), for pulls from both the Docker API and the CRI.
    pub registry_config_path: PathBuf,
    /// The platform picked from multi-platform images, `os/arch[/variant]`.
    pub platform: String,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            socket: None,
            max_concurrent_downloads: 3,
            max_concurrent_uploads: 5,
            insecure_registries: Vec::new(),
            registry_mirrors: Vec::new(),
            certs_dir: PathBuf::from("/etc/berth/certs.d"),
            registry_config_path: PathBuf::from("/etc/berth/certs.d"),
            platform: "linux/amd64".into(),
        }
    }
}

/// berth-snapshotter settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotterConfig {
    /// Socket path; default `<state_dir>/snapshotter.sock`.
    pub socket: Option<PathBuf>,
    /// The snapshotter the rest of berth uses: `overlayfs` or `native` (served by
    /// berth-snapshotter), or the name of a `[proxy_plugins.NAME]` entry.
    pub driver: String,
}

impl Default for SnapshotterConfig {
    fn default() -> Self {
        Self {
            socket: None,
            driver: "overlayfs".into(),
        }
    }
}

/// A containerd-style proxy plugin reached over gRPC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyPlugin {
    /// Plugin type; only `snapshot` is used.
    #[serde(rename = "type", default = "default_plugin_type")]
    pub kind: String,
    /// Unix socket path of the plugin's gRPC server.
    pub address: PathBuf,
}

fn default_plugin_type() -> String {
    "snapshot".into()
}

/// A pool subnets for new networks are carved from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressPool {
    /// The pool, e.g. `172.30.0.0/16`.
    pub base: String,
    /// Prefix length of each network taken from it.
    pub size: u8,
}

/// berth-network settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Socket path; default `<state_dir>/network.sock`.
    pub socket: Option<PathBuf>,
    /// Interface name of the default `bridge` network.
    pub bridge: String,
    /// Gateway address and prefix of the default bridge (Docker's `bip`).
    pub bip: String,
    /// Pools user-defined networks get subnets from.
    pub default_address_pools: Vec<AddressPool>,
    /// MTU of bridges and veths.
    pub mtu: u32,
    /// DNS servers containers use; empty means the host's resolvers.
    pub dns: Vec<String>,
    /// DNS search domains for containers.
    pub dns_search: Vec<String>,
    /// resolv.conf options for containers.
    pub dns_options: Vec<String>,
    /// Directory of CNI network configs for the orchestrator path.
    pub cni_conf_dir: PathBuf,
    /// Directories of CNI plugin binaries, searched in order (and passed as `CNI_PATH`).
    pub cni_bin_dirs: Vec<PathBuf>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            socket: None,
            bridge: "berth0".into(),
            bip: "172.29.0.1/16".into(),
            default_address_pools: vec![AddressPool {
                base: "172.30.0.0/15".into(),
                size: 24,
            }],
            mtu: 1500,
            dns: Vec::new(),
            dns_search: Vec::new(),
            dns_options: Vec::new(),
            cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
            cni_bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
        }
    }
}

/// An OCI runtime the engine can use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Binary path or name on PATH.
    pub path: String,
    /// Extra global arguments (before the subcommand).
    #[serde(default)]
    pub args: Vec<String>,
}

/// The name (and reserved path) of the shim's in-process runtime, youki's libcontainer.
pub const IN_PROCESS_RUNTIME: &str = "libcontainer";
pub use crate::vm::VM_RUNTIME;

/// The default `berth-vm` entry: the accelerator picked per host.
fn vm_runtime_default() -> RuntimeConfig {
    RuntimeConfig {
        path: VM_RUNTIME.into(),
        args: vec!["--accel=auto".into()],
    }
}

/// `default_runtime` value that lets berth pick.
pub const AUTO_RUNTIME: &str = "auto";

impl EngineConfig {
    /// The runtime a container that names none runs with. `auto` resolves, once per process,
    /// to the fastest runtime that works on this host: crun when its binary is there and the
    /// cgroup layout is one crun accepts (it refuses a hybrid layout whose cgroup2 mount holds
    /// controllers), else the in-process runtime, else runc.
    pub fn default_runtime(&self) -> String {
        if self.default_runtime != AUTO_RUNTIME {
            return self.default_runtime.clone();
        }
        // Rootless: runc, which knows it runs in a user namespace and leaves the cgroups it
        // may not touch alone.
        if crate::rootless::in_user_namespace() {
            return "runc".into();
        }
        static DETECTED: std::sync::OnceLock<(bool, bool)> = std::sync::OnceLock::new();
        let (crun_binary, crun_cgroups) = *DETECTED.get_or_init(|| {
            let binary = self
                .runtimes
                .get("crun")
                .is_some_and(|r| on_path(Path::new(&r.path)));
            (binary, crun_accepts_cgroups(Path::new("/sys/fs/cgroup")))
        });
        if crun_binary && crun_cgroups && self.runtimes.contains_key("crun") {
            "crun".into()
        } else if self.runtimes.contains_key(IN_PROCESS_RUNTIME) {
            IN_PROCESS_RUNTIME.into()
        } else {
            "runc".into()
        }
    }
}

/// Whether `binary` (a path, or a name looked up on `PATH`) is an existing file.
fn on_path(binary: &Path) -> bool {
    if binary.components().count() > 1 {
        return binary.is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(binary).is_file()))
}

/// crun runs on cgroup v2, on v1, and on a hybrid layout only while the cgroup2 mount
/// (`unified/`) holds no controllers.
pub fn crun_accepts_cgroups(root: &Path) -> bool {
    if root.join("cgroup.controllers").exists() {
        return true;
    }
    std::fs::read_to_string(root.join("unified/cgroup.controllers"))
        .map_or(true, |c| c.trim().is_empty())
}

/// berth-engine settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Socket path; default `<state_dir>/engine.sock`.
    pub socket: Option<PathBuf>,
    /// Runtime used when a container names none; `auto` (the default) picks the fastest one
    /// this host can run: see [`EngineConfig::default_runtime`].
    pub default_runtime: String,
    /// Runtimes by name; `runc`, `crun` and `libcontainer` (the shim's in-process runtime,
    /// selected by that reserved path) exist by default.
    pub runtimes: BTreeMap<String, RuntimeConfig>,
    /// Default log driver (`json-file` or `none`).
    pub log_driver: String,
    /// Default log options (`max-size`, `max-file`, ...).
    pub log_opts: BTreeMap<String, String>,
    /// Shims reconnected at once after an engine restart.
    pub reconnect_concurrency: u32,
    /// Parent of the containers' cgroups.
    pub cgroup_parent: String,
    /// Seconds a stop waits before KILL when the container names no timeout.
    pub stop_timeout: u32,
    /// Events kept for `docker events --since` (on disk, so they survive restarts).
    pub events_max_count: u32,
    /// Seconds an event is kept for `--since`; 0 keeps events regardless of age.
    pub events_max_age: u64,
    /// Docker's `userns-remap`: `""` (off), `default` (user and group `dockremap`, made when
    /// missing), `user` or `user:group` (names or ids): containers get a user namespace mapped
    /// onto that user's `/etc/subuid` and the group's `/etc/subgid` ranges.
    pub userns_remap: String,
}

impl Default for EngineConfig {
    fn default() -> Self {
        let mut runtimes: BTreeMap<String, RuntimeConfig> = ["runc", "crun", IN_PROCESS_RUNTIME]
            .into_iter()
            .map(|r| {
                (
                    r.to_string(),
                    RuntimeConfig {
                        path: r.to_string(),
                        args: Vec::new(),
                    },
                )
            })
            .collect();
        runtimes.insert(VM_RUNTIME.into(), vm_runtime_default());
        Self {
            socket: None,
            default_runtime: AUTO_RUNTIME.into(),
            runtimes,
            log_driver: "json-file".into(),
            log_opts: BTreeMap::new(),
            reconnect_concurrency: 64,
            cgroup_parent: "berth".into(),
            stop_timeout: 10,
            events_max_count: 4096,
            events_max_age: 7 * 24 * 3600,
            userns_remap: String::new(),
        }
    }
}

/// berth-shim settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShimConfig {
    /// The shim binary; default: `berth-shim` next to the engine's own binary.
    pub binary: Option<PathBuf>,
    /// Bytes of container output a shim buffers while the log disk is slow before it drops
    /// output (and counts what it dropped) rather than stall the container.
    pub log_buffer_bytes: u64,
    /// How shims start exec processes: `native` (the shim joins the container itself, falling
    /// back to the runtime for what it does not cover) or `runc` (always `runtime exec`).
    /// Passed to shims as `--exec`.
    pub exec: String,
}

impl Default for ShimConfig {
    fn default() -> Self {
        Self {
            binary: None,
            log_buffer_bytes: 1 << 20,
            exec: "native".into(),
        }
    }
}

/// berth-gateway settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Where the Docker API is served: `unix:///path` or `tcp://host:port`; default
    /// `unix://<state_dir>/docker.sock`.
    pub hosts: Vec<String>,
    /// Serve TCP hosts with TLS.
    pub tls: bool,
    /// Require and verify client certificates against `tlscacert`.
    pub tlsverify: bool,
    /// CA that client certificates must chain to.
    pub tlscacert: Option<PathBuf>,
    /// Server certificate.
    pub tlscert: Option<PathBuf>,
    /// Server key.
    pub tlskey: Option<PathBuf>,
}

/// The Kubernetes CRI (`runtime.v1`), served by berth-gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriConfig {
    /// Serve the CRI at all.
    pub enabled: bool,
    /// Socket path (mode 0660, group `socket_group`); default `<state_dir>/cri.sock`.
    pub socket: Option<PathBuf>,
    /// Seconds a CRI pull may go without progress before it is cancelled (containerd's
    /// `image_pull_progress_timeout`); 0 = never.
    pub image_pull_progress_timeout: u64,
    /// Where the streaming server (Exec, Attach, PortForward URLs) listens: `host:port`; port 0
    /// picks a free one at every start.
    pub stream_address: String,
}

impl Default for CriConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: None,
            image_pull_progress_timeout: 300,
            stream_address: "127.0.0.1:0".into(),
        }
    }
}

/// The long-running processes of a berth stack, in start order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    /// berth-snapshotter
    Snapshotter,
    /// berth-images
    Images,
    /// berth-network
    Network,
    /// berth-engine
    Engine,
    /// berth-gateway
    Gateway,
}

impl Service {
    /// Every service, in dependency (start) order.
    pub const ALL: [Service; 5] = [
        Service::Snapshotter,
        Service::Images,
        Service::Network,
        Service::Engine,
        Service::Gateway,
    ];

    /// Short name: `images`, `engine`, ...
    pub fn name(self) -> &'static str {
        match self {
            Self::Snapshotter => "snapshotter",
            Self::Images => "images",
            Self::Network => "network",
            Self::Engine => "engine",
            Self::Gateway => "gateway",
        }
    }

    /// The binary: `berth-images`, ...
    pub fn binary(self) -> &'static str {
        match self {
            Self::Snapshotter => "berth-snapshotter",
            Self::Images => "berth-images",
            Self::Network => "berth-network",
            Self::Engine => "berth-engine",
            Self::Gateway => "berth-gateway",
        }
    }

    /// Parses a short name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl Config {
    /// Loads `file` (which must exist when given explicitly) over the defaults, then applies the
    /// `BERTH_*` variables from `env`. Pass `std::env::vars()` from `main`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                return Err(Error::not_found(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let env = env_overrides(env);
        builder = builder.add_source(
            config::Environment::default()
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("images.insecure_registries")
                .with_list_parse_key("images.registry_mirrors")
                .with_list_parse_key("network.dns")
                .with_list_parse_key("network.dns_search")
                .with_list_parse_key("network.dns_options")
                .with_list_parse_key("gateway.hosts")
                .source(Some(env)),
        );
        let loaded = builder.build().map_err(config_error)?;
        let mut cfg: Config = loaded.try_deserialize().map_err(config_error)?;
        // A file that lists runtimes replaces the default table; runc and the in-process
        // runtime are always there, as Docker always has runc.
        for name in ["runc", IN_PROCESS_RUNTIME] {
            cfg.engine
                .runtimes
                .entry(name.to_string())
                .or_insert_with(|| RuntimeConfig {
                    path: name.to_string(),
                    args: Vec::new(),
                });
        }
        // So is `berth-vm`: `docker run --runtime berth-vm` works whatever the file lists.
        cfg.engine
            .runtimes
            .entry(VM_RUNTIME.to_string())
            .or_insert_with(vm_runtime_default);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what serde cannot: enumerations given as strings, paths that must be absolute.
    pub fn validate(&self) -> Result<()> {
        if !self.root.is_absolute() || !self.state_dir.is_absolute() {
            return Err(Error::invalid_argument(
                "root and state_dir must be absolute paths",
            ));
        }
        if !matches!(self.telemetry.log_format.as_str(), "text" | "json") {
            return Err(Error::invalid_argument(format!(
                "telemetry.log_format: {:?} is not text or json",
                self.telemetry.log_format
            )));
        }
        if !matches!(self.shim.exec.as_str(), "native" | "runc") {
            return Err(Error::invalid_argument(format!(
                "shim.exec: {:?} is not native or runc",
                self.shim.exec
            )));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.telemetry.log_level).is_err() {
            return Err(Error::invalid_argument(format!(
                "telemetry.log_level: invalid level or filter {:?}",
                self.telemetry.log_level
            )));
        }
        let driver = self.snapshotter.driver.as_str();
        if !matches!(driver, "overlayfs" | "native") && !self.proxy_plugins.contains_key(driver) {
            return Err(Error::invalid_argument(format!(
                "snapshotter.driver: {driver:?} is neither overlayfs, native nor a [proxy_plugins] entry"
            )));
        }
        if let Some((name, _)) = self
            .engine
            .runtimes
            .iter()
            .find(|(_, r)| r.path == IN_PROCESS_RUNTIME && !r.args.is_empty())
        {
            return Err(Error::invalid_argument(format!(
                "engine.runtimes.{name}: the in-process runtime ({IN_PROCESS_RUNTIME}) takes no args"
            )));
        }
        for (name, r) in &self.engine.runtimes {
            if r.path == VM_RUNTIME {
                crate::vm::VmRuntimeOptions::from_args(&r.args).map_err(|e| {
                    Error::invalid_argument(format!("engine.runtimes.{name}")).with_source(e)
                })?;
            }
        }
        if self.engine.default_runtime != AUTO_RUNTIME
            && !self
                .engine
                .runtimes
                .contains_key(&self.engine.default_runtime)
        {
            return Err(Error::invalid_argument(format!(
                "engine.default_runtime: no runtime named {:?}",
                self.engine.default_runtime
            )));
        }
        self.telemetry.metrics_socket_addr()?;
        if self.engine.events_max_count == 0 {
            return Err(Error::invalid_argument(
                "engine.events_max_count: must be at least 1",
            ));
        }
        if !matches!(self.engine.log_driver.as_str(), "json-file" | "none") {
            return Err(Error::invalid_argument(format!(
                "engine.log_driver: {:?} is not supported (json-file, none)",
                self.engine.log_driver
            )));
        }
        for host in &self.gateway.hosts {
            crate::uds::ListenAddr::parse(host)?;
        }
        if self.rootless && !self.engine.userns_remap.is_empty() {
            return Err(Error::invalid_argument(
                "engine.userns_remap cannot be used in rootless mode (containers are already \
                 mapped onto the user's subordinate ids)",
            ));
        }
        if self.gateway.tlsverify && self.gateway.tlscacert.is_none() {
            return Err(Error::invalid_argument(
                "gateway.tlsverify needs gateway.tlscacert",
            ));
        }
        if (self.gateway.tls || self.gateway.tlsverify)
            && (self.gateway.tlscert.is_none() || self.gateway.tlskey.is_none())
        {
            return Err(Error::invalid_argument(
                "gateway.tls needs gateway.tlscert and gateway.tlskey",
            ));
        }
        Ok(())
    }

    /// The socket `service` serves its gRPC API on.
    pub fn socket(&self, service: Service) -> PathBuf {
        let configured = match service {
            Service::Images => &self.images.socket,
            Service::Snapshotter => &self.snapshotter.socket,
            Service::Network => &self.network.socket,
            Service::Engine => &self.engine.socket,
            Service::Gateway => &None,
        };
        configured
            .clone()
            .unwrap_or_else(|| self.state_dir.join(format!("{}.sock", service.name())))
    }

    /// The socket the rest of berth reaches the snapshotter on: berth-snapshotter's own, or the
    /// proxy plugin `snapshotter.driver` names.
    pub fn snapshotter_address(&self) -> PathBuf {
        match self.proxy_plugins.get(&self.snapshotter.driver) {
            Some(plugin) => plugin.address.clone(),
            None => self.socket(Service::Snapshotter),
        }
    }

    /// Where the Docker API is served.
    pub fn gateway_hosts(&self) -> Vec<String> {
        if self.gateway.hosts.is_empty() {
            vec![format!(
                "unix://{}",
                self.state_dir.join("docker.sock").display()
            )]
        } else {
            self.gateway.hosts.clone()
        }
    }

    /// Where the CRI is served.
    pub fn cri_socket(&self) -> PathBuf {
        self.cri
            .socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("cri.sock"))
    }

    /// Rootless mode: the network namespace the bridges live in (a bind mount of the one the
    /// namespace holder made, inside the stack's mount namespace).
    pub fn rootless_netns(&self) -> PathBuf {
        self.state_dir.join("rootless/netns")
    }

    /// The PID file of `service`.
    pub fn pid_file(&self, service: Service) -> PathBuf {
        self.state_dir.join(format!("{}.pid", service.name()))
    }

    /// The id map containers get a user namespace with: `None` when containers share the
    /// daemon's ids. Rootless: from the daemon's own `/proc/self/{uid,gid}_map`; with
    /// `[engine] userns_remap`: from `/etc/subuid` and `/etc/subgid` (see [`crate::userns`]).
    /// Reads those files (and for `default` may create the `dockremap` user): call it once at
    /// start.
    pub fn container_id_map(&self) -> Result<Option<crate::userns::IdMap>> {
        use crate::userns::{HostIdFiles, IdKind, IdMap, rootless_ranges};
        if self.rootless {
            let read = |p: &str| {
                std::fs::read_to_string(p)
                    .map_err(|e| Error::failed_precondition(format!("read {p}")).with_source(e))
            };
            return Ok(Some(IdMap {
                uids: rootless_ranges(&read("/proc/self/uid_map")?, IdKind::Uid)?,
                gids: rootless_ranges(&read("/proc/self/gid_map")?, IdKind::Gid)?,
            }));
        }
        match self.engine.userns_remap.as_str() {
            "" => Ok(None),
            setting => HostIdFiles::default().remap(setting).map(Some),
        }
    }

    /// The data directory that belongs to `service`.
    pub fn data_dir(&self, service: Service) -> PathBuf {
        self.root.join(service.name())
    }
}

fn config_error(err: config::ConfigError) -> Error {
    Error::invalid_argument("invalid configuration").with_source(err)
}

/// Picks the variables that configure berth: `BERTH_ROOT`, `BERTH_STATE_DIR`,
/// `BERTH_SOCKET_GROUP`, `BERTH_SOCKET_MODE`, `BERTH_ROOTLESS` and `BERTH_<SECTION>__<KEY>`. Other `BERTH_*`
/// variables (test knobs and the like) are not configuration and are left alone.
fn env_overrides(env: impl IntoIterator<Item = (String, String)>) -> config::Map<String, String> {
    const TOP: [&str; 5] = [
        "ROOT",
        "STATE_DIR",
        "ROOTLESS",
        "SOCKET_GROUP",
        "SOCKET_MODE",
    ];
    env.into_iter()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix("BERTH_")?;
            if TOP.contains(&rest) || rest.contains("__") {
                Some((rest.to_lowercase(), v))
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let cfg = Config::load(None, []).unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(
            cfg.socket(Service::Engine),
            PathBuf::from("/run/berth/engine.sock")
        );
        assert_eq!(cfg.gateway_hosts(), ["unix:///run/berth/docker.sock"]);
    }

    #[test]
    fn crun_is_refused_only_a_hybrid_layout_with_unified_controllers() {
        let dir = tempfile::tempdir().unwrap();
        // Pure v1 (no unified mount) and pure v2: crun runs.
        assert!(crun_accepts_cgroups(dir.path()));
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
        assert!(crun_accepts_cgroups(dir.path()));
        std::fs::remove_file(dir.path().join("cgroup.controllers")).unwrap();
        // Hybrid: fine while unified/ holds no controller, refused once it holds one.
        std::fs::create_dir(dir.path().join("unified")).unwrap();
        std::fs::write(dir.path().join("unified/cgroup.controllers"), "\n").unwrap();
        assert!(crun_accepts_cgroups(dir.path()));
        std::fs::write(dir.path().join("unified/cgroup.controllers"), "hugetlb\n").unwrap();
        assert!(!crun_accepts_cgroups(dir.path()));
    }

    #[test]
    fn auto_resolves_to_a_configured_runtime_and_names_are_kept() {
        let mut cfg = Config::default();
        assert_eq!(cfg.engine.default_runtime, AUTO_RUNTIME);
        let chosen = cfg.engine.default_runtime();
        assert!(
            ["crun", IN_PROCESS_RUNTIME].contains(&chosen.as_str()),
            "{chosen}"
        );
        cfg.engine.default_runtime = "runc".into();
        assert_eq!(cfg.engine.default_runtime(), "runc");
        assert!(cfg.validate().is_ok());
        cfg.engine.default_runtime = "nope".into();
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn berth_vm_is_in_the_table_and_its_args_are_checked() {
        let mut cfg = Config::default();
        let vm = &cfg.engine.runtimes[VM_RUNTIME];
        assert_eq!(vm.path, VM_RUNTIME);
        assert_eq!(vm.args, vec!["--accel=auto".to_string()]);
        assert!(cfg.validate().is_ok());
        cfg.engine
            .runtimes
            .get_mut(VM_RUNTIME)
            .unwrap()
            .args
            .push("--accel=hvf".into());
        let err = cfg.validate().unwrap_err();
        assert!(err.chain().contains("bad option"), "{}", err.chain());
    }

    #[test]
    fn the_in_process_runtime_refuses_args() {
        let mut cfg = Config::default();
        cfg.engine
            .runtimes
            .get_mut(IN_PROCESS_RUNTIME)
            .unwrap()
            .args
            .push("--debug".into());
        let err = cfg.validate().unwrap_err();
        assert!(err.chain().contains("takes no args"), "{}", err.chain());
    }

    #[test]
    fn metrics_addr_is_loopback_unless_allowed() {
        let mut cfg = Config::default();
        assert_eq!(cfg.telemetry.metrics_socket_addr().unwrap(), None);
        cfg.telemetry.metrics_addr = Some("127.0.0.1:9323".into());
        assert!(cfg.validate().is_ok());
        cfg.telemetry.metrics_addr = Some("[::1]:9323".into());
        assert!(cfg.validate().is_ok());
        cfg.telemetry.metrics_addr = Some("0.0.0.0:9323".into());
        let err = cfg.validate().unwrap_err();
        assert!(
            err.chain().contains("metrics_allow_remote"),
            "{}",
            err.chain()
        );
        cfg.telemetry.metrics_allow_remote = true;
        assert!(cfg.validate().is_ok());
        cfg.telemetry.metrics_addr = Some("localhost".into());
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn file_then_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.toml");
        std::fs::write(
            &path,
            "root = \"/data\"\n[images]\nmax_concurrent_downloads = 5\n[engine]\nstop_timeout = 3\n",
        )
        .unwrap();
        let cfg = Config::load(
            Some(&path),
            env(&[
                ("BERTH_ENGINE__STOP_TIMEOUT", "7"),
                ("BERTH_STATE_DIR", "/tmp/st"),
                ("BERTH_IMAGES__INSECURE_REGISTRIES", "a:5000,b:5000"),
                ("BERTH_BIN_DIR", "/ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.root, PathBuf::from("/data"));
        assert_eq!(cfg.state_dir, PathBuf::from("/tmp/st"));
        assert_eq!(cfg.images.max_concurrent_downloads, 5);
        assert_eq!(cfg.engine.stop_timeout, 7);
        assert_eq!(cfg.images.insecure_registries, ["a:5000", "b:5000"]);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.toml");
        std::fs::write(&path, "[engine]\nstop_timout = 3\n").unwrap();
        let err = Config::load(Some(&path), []).unwrap_err();
        assert!(err.chain().contains("stop_timout"), "{}", err.chain());

        let err = Config::load(None, env(&[("BERTH_BOGUS__X", "1")])).unwrap_err();
        assert!(err.chain().contains("bogus"), "{}", err.chain());
    }

    #[test]
    fn rootless_comes_from_the_environment_and_excludes_remap() {
        let cfg = Config::load(None, env(&[("BERTH_ROOTLESS", "true")])).unwrap();
        assert!(cfg.rootless);
        let err = Config::load(
            None,
            env(&[
                ("BERTH_ROOTLESS", "true"),
                ("BERTH_ENGINE__USERNS_REMAP", "default"),
            ]),
        )
        .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        assert!(err.chain().contains("rootless"), "{}", err.chain());
        let cfg = Config::load(None, env(&[("BERTH_ENGINE__USERNS_REMAP", "")])).unwrap();
        assert_eq!(cfg.container_id_map().unwrap(), None);
    }

    #[test]
    fn shim_exec_is_native_or_runc() {
        let cfg = Config::load(None, env(&[("BERTH_SHIM__EXEC", "runc")])).unwrap();
        assert_eq!(cfg.shim.exec, "runc");
        let err = Config::load(None, env(&[("BERTH_SHIM__EXEC", "nativ")])).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        assert!(
            err.chain()
                .contains("shim.exec: \"nativ\" is not native or runc"),
            "{}",
            err.chain()
        );
    }

    #[test]
    fn proxy_plugins_select_the_snapshotter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.toml");
        std::fs::write(
            &path,
            "[snapshotter]\ndriver = \"stargz\"\n[proxy_plugins.stargz]\ntype = \"snapshot\"\naddress = \"/run/s.sock\"\n",
        )
        .unwrap();
        let cfg = Config::load(Some(&path), []).unwrap();
        assert_eq!(cfg.snapshotter_address(), PathBuf::from("/run/s.sock"));

        std::fs::write(&path, "[snapshotter]\ndriver = \"zfs\"\n").unwrap();
        assert!(Config::load(Some(&path), []).is_err());
    }

    #[test]
    fn a_missing_explicit_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/berth.toml")), []).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::NotFound);
    }
}

#[cfg(test)]
mod shipped_config {
    use super::*;

    /// deploy/berth.toml documents every key with its default: loading it must give exactly
    /// the built-in defaults, so the file and the code cannot drift apart.
    #[test]
    fn deploy_berth_toml_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/berth.toml");
        let cfg = Config::load(Some(&path), []).unwrap();
        assert_eq!(cfg, Config::default());
    }
}
