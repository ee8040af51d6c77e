//! System endpoints: `/_ping`, `/version`, `/info`, `/events`, `/system/df`, `/auth`.

use std::collections::{BTreeMap, HashMap};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use berth_core::{Config, Error, Result};
use berth_proto::berth::engine::v1 as engine;
use berth_proto::berth::events::v1 as events;
use berth_proto::berth::images::v1 as images;
use bollard_stubs::models::{
    Commit, IndexInfo, PluginsInfo, RegistryServiceConfig, Runtime, SwarmInfo, SystemInfo,
    SystemInfoCgroupDriverEnum, SystemInfoCgroupVersionEnum,
};
use bytes::Bytes;
use futures::TryStreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::query::Query;
use crate::{
    API_VERSION, ApiError, ApiVersion, AppState, MIN_API_VERSION, go_arch, json_response, time,
};

/// The system routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_ping", get(ping).head(ping))
        .route("/version", get(version))
        .route("/info", get(info))
        .route("/events", get(events_stream))
        .route("/system/df", get(df))
        .route("/auth", post(auth))
}

/// What `/info` reports about the daemon's configuration: read once from the config.
#[derive(Debug, Clone, Default)]
pub struct DaemonInfo {
    /// Data root.
    pub root: String,
    /// Snapshotter in use.
    pub driver: String,
    /// OCI runtimes by name: path and arguments.
    pub runtimes: BTreeMap<String, (String, Vec<String>)>,
    /// Runtime used when a container names none.
    pub default_runtime: String,
    /// Default log driver.
    pub log_driver: String,
    /// Insecure registries from the config.
    pub insecure_registries: Vec<String>,
    /// Registry mirrors.
    pub registry_mirrors: Vec<String>,
    /// Debug logging.
    pub debug: bool,
    /// Stable id of this installation.
    pub id: String,
    /// The stack runs rootless (docs/rootless.md).
    pub rootless: bool,
    /// Containers are remapped (`userns-remap`): `SecurityOptions` says `name=userns`.
    pub userns_remap: bool,
}

impl DaemonInfo {
    /// From the stack's config.
    pub fn from_config(config: &Config) -> Self {
        let root = config.root.display().to_string();
        let machine = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
        Self {
            id: engine_id(&format!("{}:{root}", machine.trim())),
            root,
            driver: config.snapshotter.driver.clone(),
            runtimes: config
                .engine
                .runtimes
                .iter()
                .map(|(k, v)| (k.clone(), (v.path.clone(), v.args.clone())))
                .collect(),
            default_runtime: config.engine.default_runtime(),
            log_driver: config.engine.log_driver.clone(),
            insecure_registries: config.images.insecure_registries.clone(),
            registry_mirrors: config.images.registry_mirrors.clone(),
            debug: matches!(config.telemetry.log_level.as_str(), "debug" | "trace"),
            rootless: config.rootless,
            userns_remap: !config.engine.userns_remap.is_empty(),
        }
    }
}

/// A UUID-shaped id derived from `seed` (Docker's engine ID is a persisted UUID; the gateway
/// keeps no state, so it derives one from the machine and the data root).
pub fn engine_id(seed: &str) -> String {
    // FNV-1a, twice with different offsets: stable, not cryptographic, which an id needs not be.
    let fnv = |offset: u64| {
        seed.bytes().fold(offset, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let (a, b) = (fnv(0xcbf2_9ce4_8422_2325), fnv(0x6c62_272e_07bb_0142));
    let hex = format!("{a:016x}{b:016x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// `GET|HEAD /_ping`: OK when the engine answers its health check.
async fn ping(State(st): State<AppState>, method: Method) -> Response {
    let healthy = st.backends.system.ping().await.unwrap_or(false);
    let (status, body) = if healthy {
        (StatusCode::OK, "OK")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "engine unavailable")
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        "cache-control",
        HeaderValue::from_static("no-cache, no-store, must-revalidate"),
    );
    headers.insert("pragma", HeaderValue::from_static("no-cache"));
    headers.insert("swarm", HeaderValue::from_static("inactive"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if method == Method::HEAD {
        (status, headers).into_response()
    } else {
        (status, headers, body).into_response()
    }
}

fn kernel_version() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `GET /version`.
async fn version() -> Response {
    axum::Json(json!({
        "Platform": { "Name": "berth" },
        "Components": [{
            "Name": "Engine",
            "Version": env!("CARGO_PKG_VERSION"),
            "Details": { "ApiVersion": API_VERSION, "MinAPIVersion": MIN_API_VERSION, "Os": "linux", "Arch": go_arch() }
        }],
        "Version": env!("CARGO_PKG_VERSION"),
        "ApiVersion": API_VERSION,
        "MinAPIVersion": MIN_API_VERSION,
        "GitCommit": "",
        "GoVersion": "",
        "Os": "linux",
        "Arch": go_arch(),
        "KernelVersion": kernel_version(),
        "BuildTime": "",
        "Experimental": false,
    }))
    .into_response()
}

fn os_release() -> (String, String) {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default()
    };
    let pretty = field("PRETTY_NAME");
    (
        if pretty.is_empty() {
            "Linux".into()
        } else {
            pretty
        },
        field("VERSION_ID"),
    )
}

fn mem_total() -> i64 {
    i64::try_from(berth_core::procfs::host_memory()).unwrap_or(i64::MAX)
}

/// "2" on a unified (cgroup2-only) host, "1" on legacy and hybrid ones.
pub fn cgroup_version() -> &'static str {
    if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "2"
    } else {
        "1"
    }
}

fn self_stat(key: &str) -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Counts of containers in each state, from a full list.
pub fn container_counts(list: &[engine::Container]) -> (i64, i64, i64, i64) {
    use engine::ContainerStatus as S;
    let (mut running, mut paused, mut stopped) = (0, 0, 0);
    for c in list {
        match c.state.as_ref().map_or(S::Created, |s| s.status()) {
            S::Running | S::Restarting => running += 1,
            S::Paused => paused += 1,
            _ => stopped += 1,
        }
    }
    (list.len() as i64, running, paused, stopped)
}

/// `GET /info`.
async fn info(State(st): State<AppState>, version: ApiVersion) -> Result<Response, ApiError> {
    let d = &st.info;
    let mut warnings = Vec::new();
    let containers = st
        .backends
        .containers
        .list(engine::ListContainersRequest {
            all: true,
            summary: true,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| {
            warnings.push(format!("WARNING: containers unavailable: {}", e.chain()));
            Vec::new()
        });
    let image_count = match st
        .backends
        .images
        .list(images::ListImagesRequest::default())
        .await
    {
        Ok(list) => list.len() as i64,
        Err(e) => {
            warnings.push(format!("WARNING: images unavailable: {}", e.chain()));
            0
        }
    };
    let (total, running, paused, stopped) = container_counts(&containers);
    let (os, os_version) = os_release();
    let uname = nix::sys::utsname::uname().ok();
    let arch = uname
        .as_ref()
        .map(|u| u.machine().to_string_lossy().into_owned())
        .unwrap_or_default();
    let hostname = uname
        .as_ref()
        .map(|u| u.nodename().to_string_lossy().into_owned())
        .unwrap_or_default();
    let v2 = cgroup_version() == "2";
    let mut security = vec!["name=seccomp,profile=builtin".to_string()];
    if std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|s| s.trim() == "Y")
    {
        security.insert(0, "name=apparmor".into());
    }
    if d.rootless {
        security.push("name=rootless".into());
    }
    if d.userns_remap {
        security.push("name=userns".into());
    }
    if v2 {
        security.push("name=cgroupns".into());
    }
    let mut index_configs = HashMap::from([(
        "docker.io".to_string(),
        IndexInfo {
            name: Some("docker.io".into()),
            mirrors: Some(d.registry_mirrors.clone()),
            secure: Some(true),
            official: Some(true),
        },
    )]);
    let mut cidrs = vec!["::1/128".to_string(), "127.0.0.0/8".to_string()];
    for r in &d.insecure_registries {
        if r.contains('/') {
            cidrs.push(r.clone());
        } else {
            index_configs.insert(
                r.clone(),
                IndexInfo {
                    name: Some(r.clone()),
                    mirrors: Some(Vec::new()),
                    secure: Some(false),
                    official: Some(false),
                },
            );
        }
    }
    let info = SystemInfo {
        id: Some(d.id.clone()),
        containers: Some(total),
        containers_running: Some(running),
        containers_paused: Some(paused),
        containers_stopped: Some(stopped),
        images: Some(image_count),
        driver: Some(d.driver.clone()),
        driver_status: Some(Vec::new()),
        docker_root_dir: Some(d.root.clone()),
        plugins: Some(PluginsInfo {
            volume: Some(vec!["local".into()]),
            network: Some(vec!["bridge".into(), "host".into(), "null".into()]),
            authorization: None,
            log: Some(vec!["json-file".into(), "local".into(), "none".into()]),
        }),
        memory_limit: Some(true),
        swap_limit: Some(true),
        cpu_cfs_period: Some(true),
        cpu_cfs_quota: Some(true),
        cpu_shares: Some(true),
        cpu_set: Some(true),
        pids_limit: Some(true),
        oom_kill_disable: Some(!v2),
        ipv4_forwarding: Some(
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|s| s.trim() == "1"),
        ),
        debug: Some(d.debug),
        nfd: Some(
            std::fs::read_dir("/proc/self/fd")
                .map(|r| r.count() as i64)
                .unwrap_or(0),
        ),
        n_goroutines: Some(self_stat("Threads:")),
        system_time: Some(time::rfc3339(Some(&time::now()))),
        logging_driver: Some(d.log_driver.clone()),
        cgroup_driver: Some(SystemInfoCgroupDriverEnum::CGROUPFS),
        cgroup_version: Some(if v2 {
            SystemInfoCgroupVersionEnum::_2
        } else {
            SystemInfoCgroupVersionEnum::_1
        }),
        n_events_listener: Some(0),
        kernel_version: Some(kernel_version()),
        operating_system: Some(os),
        os_version: Some(os_version),
        os_type: Some("linux".into()),
        architecture: Some(arch),
        ncpu: Some(
            std::thread::available_parallelism()
                .map(|n| n.get() as i64)
                .unwrap_or(1),
        ),
        mem_total: Some(mem_total()),
        index_server_address: Some(crate::registry::DOCKER_HUB_INDEX.into()),
        registry_config: Some(RegistryServiceConfig {
            insecure_registry_cidrs: Some(cidrs),
            index_configs: Some(index_configs),
            mirrors: Some(d.registry_mirrors.clone()),
        }),
        generic_resources: None,
        http_proxy: Some(String::new()),
        https_proxy: Some(String::new()),
        no_proxy: Some(String::new()),
        name: Some(hostname),
        labels: Some(Vec::new()),
        experimental_build: Some(false),
        server_version: Some(env!("CARGO_PKG_VERSION").into()),
        runtimes: Some(
            d.runtimes
                .iter()
                .map(|(name, (path, args))| {
                    (
                        name.clone(),
                        Runtime {
                            path: Some(path.clone()),
                            runtime_args: (!args.is_empty()).then(|| args.clone()),
                            status: vm_runtime_status(path, args),
                        },
                    )
                })
                .collect(),
        ),
        default_runtime: Some(d.default_runtime.clone()),
        swarm: Some(SwarmInfo {
            node_id: Some(String::new()),
            node_addr: Some(String::new()),
            local_node_state: Some(bollard_stubs::models::LocalNodeState::INACTIVE),
            control_available: Some(false),
            error: Some(String::new()),
            remote_managers: None,
            ..Default::default()
        }),
        // Shims outlive every daemon, so containers keep running across restarts.
        live_restore_enabled: Some(true),
        isolation: None,
        init_binary: Some(String::new()),
        containerd_commit: Some(Commit {
            id: Some(String::new()),
        }),
        runc_commit: Some(Commit {
            id: Some(String::new()),
        }),
        init_commit: Some(Commit {
            id: Some(String::new()),
        }),
        security_options: Some(security),
        warnings: Some(warnings),
        ..Default::default()
    };
    let mut info = serde_json::to_value(info).unwrap_or_default();
    crate::versions::system_info(version, &mut info);
    Ok(json_response(StatusCode::OK, &info))
}

/// An event envelope → Docker's event JSON (with the legacy `status`/`id`/`from` fields for
/// containers and images). Internal task events have no Docker form.
pub fn event_json(e: &events::Envelope) -> Option<Value> {
    use events::EventType as T;
    let typ = match e.r#type() {
        T::Container => "container",
        T::Image => "image",
        T::Volume => "volume",
        T::Network => "network",
        T::Daemon => "daemon",
        T::Plugin => "plugin",
        T::Task | T::Sandbox | T::Unspecified => return None,
    };
    let actor = e.actor.clone().unwrap_or_default();
    let ts = e.timestamp.unwrap_or_default();
    let nanos = time::unix_nanos(&ts);
    let mut v = json!({
        "Type": typ,
        "Action": e.action,
        "Actor": {"ID": actor.id, "Attributes": actor.attributes},
        "scope": if e.scope.is_empty() { "local" } else { e.scope.as_str() },
        "time": ts.seconds,
        "timeNano": nanos as i64,
    });
    if typ == "container" || typ == "image" {
        v["status"] = json!(e.action);
        v["id"] = json!(actor.id);
        if typ == "container"
            && let Some(image) = actor.attributes.get("image")
        {
            v["from"] = json!(image);
        }
    }
    Some(v)
}

/// Builds the hub subscription for `GET /events`.
pub fn subscribe_request(q: &Query) -> Result<events::SubscribeRequest> {
    let now = time::now();
    let parse = |key: &str| -> Result<Option<prost_types::Timestamp>> {
        match q.non_empty(key) {
            None => Ok(None),
            Some(v) => time::parse_docker_time(v, &now).map(Some),
        }
    };
    Ok(events::SubscribeRequest {
        filters: q.filters()?,
        since: parse("since")?,
        until: parse("until")?,
    })
}

/// `GET /events`: a stream of JSON lines until `until` or until the client goes away.
async fn events_stream(State(st): State<AppState>, q: Query) -> Result<Response, ApiError> {
    let req = subscribe_request(&q)?;
    let s = st.backends.events.subscribe(req).await?;
    let body = s
        .try_filter_map(|e| async move {
            Ok(event_json(&e).map(|v| {
                let mut line = serde_json::to_vec(&v).unwrap_or_default();
                line.push(b'\n');
                Bytes::from(line)
            }))
        })
        .map_err(|e| std::io::Error::other(e.chain()));
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        Body::from_stream(body),
    )
        .into_response())
}

/// `GET /system/df`.
async fn df(State(st): State<AppState>, version: ApiVersion) -> Result<Response, ApiError> {
    let b = &st.backends;
    let (usage, image_list, containers, volumes, cache) = tokio::join!(
        b.images.disk_usage(),
        b.images.list(images::ListImagesRequest::default()),
        b.containers.list(engine::ListContainersRequest {
            all: true,
            size: true,
            summary: true,
            ..Default::default()
        }),
        b.volumes.list(engine::ListVolumesRequest {
            usage: true,
            ..Default::default()
        }),
        b.images.cache_list(),
    );
    let usage = usage?;
    // An images service without a build cache has nothing to count.
    let build_cache: Vec<Value> = match cache {
        Ok(entries) => entries.iter().map(crate::build::cache_entry_json).collect(),
        Err(e) if e.is(berth_core::ErrorKind::Unimplemented) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let per_image: HashMap<&str, &images::ImageDiskUsage> = usage
        .images
        .iter()
        .map(|u| (u.image_id.as_str(), u))
        .collect();
    let images: Vec<Value> = image_list?
        .iter()
        .map(|i| {
            let u = per_image.get(i.id.as_str());
            let mut s = crate::images::summary(i, u.map_or(0, |u| u.containers));
            s.shared_size = u.map_or(0, |u| u.shared_size);
            if let Some(u) = u {
                s.size = u.size;
            }
            let mut v = serde_json::to_value(s).unwrap_or_default();
            crate::versions::image_summary(version, &mut v, false);
            v
        })
        .collect();
    let containers: Vec<Value> = containers?
        .iter()
        .map(|c| {
            serde_json::to_value(crate::containers::render::summary(c, true)).unwrap_or_default()
        })
        .collect();
    let volumes: Vec<Value> = volumes?
        .volumes
        .iter()
        .map(|v| crate::volumes::volume_json(v, true))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "LayersSize": usage.layers_size,
            "Images": images,
            "Containers": containers,
            "Volumes": volumes,
            "BuildCache": build_cache,
        }),
    ))
}

#[derive(Debug, Default, Deserialize)]
struct AuthBody {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    email: String,
    #[serde(default, rename = "serveraddress")]
    server_address: String,
    #[serde(default, rename = "identitytoken")]
    identity_token: String,
    #[serde(default, rename = "registrytoken")]
    registry_token: String,
}

/// `POST /auth`: checked against the registry (see [`crate::registry`]).
async fn auth(State(st): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let a: AuthBody = crate::errors::parse_json(&body)?;
    if a.username.is_empty() && a.identity_token.is_empty() && a.registry_token.is_empty() {
        return Err(Error::invalid_argument("username is required").into());
    }
    let auth = berth_proto::berth::types::v1::RegistryAuth {
        username: a.username,
        password: a.password,
        identity_token: a.identity_token,
        registry_token: a.registry_token,
        server_address: a.server_address,
        email: a.email,
    };
    let result = st.backends.system.login(auth).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"Status": "Login Succeeded", "IdentityToken": result.identity_token}),
    ))
}

/// For the `berth-vm` runtime, the accelerator its guests get on this host (`kvm` or `tcg`).
fn vm_runtime_status(path: &str, args: &[String]) -> Option<HashMap<String, String>> {
    if path != berth_core::vm::VM_RUNTIME {
        return None;
    }
    let accel = berth_core::vm::VmRuntimeOptions::from_args(args)
        .map(|o| o.accel.resolve().as_str())
        .unwrap_or("invalid options");
    Some(HashMap::from([(
        "accelerator".to_string(),
        accel.to_string(),
    )]))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::fake::Fake;

    #[tokio::test]
    async fn ping_and_version() {
        let f = Fake::default();
        let r = f.request("GET", "/_ping", "").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.text(), "OK");
        assert_eq!(r.headers["api-version"], "1.45");
        assert_eq!(r.headers["swarm"], "inactive");
        let r = f.request("HEAD", "/_ping", "").await;
        assert!(r.body.is_empty());
        let r = f.request("GET", "/v1.44/version", "").await;
        assert_eq!(r.json()["ApiVersion"], "1.45");
    }

    #[tokio::test]
    async fn info_counts_and_describes_the_daemon() {
        let f = Fake::default();
        f.add_container("a1", engine::ContainerStatus::Running);
        f.add_container("a2", engine::ContainerStatus::Paused);
        f.add_container("a3", engine::ContainerStatus::Exited);
        f.add_image("docker.io/library/busybox:latest");
        let v = f.request("GET", "/info", "").await.json();
        assert_eq!(v["Containers"], 3);
        assert_eq!(v["ContainersRunning"], 1);
        assert_eq!(v["ContainersPaused"], 1);
        assert_eq!(v["ContainersStopped"], 1);
        assert_eq!(v["Images"], 1);
        assert_eq!(v["Driver"], "overlayfs");
        assert_eq!(v["DockerRootDir"], "/var/lib/berth");
        assert_eq!(v["CgroupDriver"], "cgroupfs");
        assert_eq!(v["CgroupVersion"], cgroup_version());
        assert_eq!(v["DefaultRuntime"], "runc");
        assert_eq!(v["OSType"], "linux");
        assert!(v["NCPU"].as_i64().unwrap() >= 1);
        assert!(v["MemTotal"].as_i64().unwrap() > 0);
        assert!(!v["KernelVersion"].as_str().unwrap().is_empty());
        assert_eq!(v["ServerVersion"], env!("CARGO_PKG_VERSION"));
        assert_eq!(v["Swarm"]["LocalNodeState"], "inactive");
        assert_eq!(v["ID"], "id");
        assert_eq!(v["Warnings"], json!([]));
    }

    #[test]
    fn engine_ids_are_stable_uuids() {
        let a = engine_id("m:/var/lib/berth");
        assert_eq!(a, engine_id("m:/var/lib/berth"));
        assert_ne!(a, engine_id("m:/other"));
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
    }

    fn envelope(
        t: events::EventType,
        action: &str,
        id: &str,
        attrs: &[(&str, &str)],
    ) -> events::Envelope {
        events::Envelope {
            timestamp: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 42,
            }),
            r#type: t as i32,
            action: action.into(),
            actor: Some(events::Actor {
                id: id.into(),
                attributes: attrs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<HashMap<_, _>>(),
            }),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn events_stream_docker_json() {
        let f = Fake::default();
        f.state().events = vec![
            envelope(
                events::EventType::Container,
                "create",
                "c1",
                &[("image", "busybox"), ("name", "web")],
            ),
            envelope(events::EventType::Task, "exit", "c1", &[]),
            envelope(
                events::EventType::Network,
                "connect",
                "n1",
                &[("container", "c1")],
            ),
            envelope(events::EventType::Image, "pull", "busybox:latest", &[]),
        ];
        let r = f
            .request(
                "GET",
                "/events?since=1699999999.000000000&until=1700000001&filters=%7B%22type%22%3A%5B%22container%22%5D%7D",
                "",
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let lines = r.lines();
        assert_eq!(lines.len(), 3, "task events are internal");
        assert_eq!(
            lines[0],
            json!({
                "Type": "container", "Action": "create",
                "Actor": {"ID": "c1", "Attributes": {"image": "busybox", "name": "web"}},
                "scope": "local", "time": 1_700_000_000i64, "timeNano": 1_700_000_000_000_000_042i64,
                "status": "create", "id": "c1", "from": "busybox",
            })
        );
        assert!(lines[1].get("status").is_none());
        assert_eq!(lines[2]["status"], "pull");
        let req = f.state().last_subscribe.clone().unwrap();
        assert_eq!(req.since.unwrap().seconds, 1_699_999_999);
        assert_eq!(req.until.unwrap().seconds, 1_700_000_001);
        assert_eq!(req.filters[0].key, "type");
        let r = f.request("GET", "/events?since=never", "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn system_df_reports_every_kind() {
        let f = Fake::default();
        f.add_image("docker.io/library/busybox:latest");
        f.add_container("c1", engine::ContainerStatus::Running);
        f.state().volumes.push(engine::Volume {
            name: "v".into(),
            usage: Some(engine::VolumeUsage {
                size: 10,
                ref_count: 1,
            }),
            ..Default::default()
        });
        let v = f.request("GET", "/system/df", "").await.json();
        assert_eq!(v["LayersSize"], 1000);
        assert_eq!(v["Images"][0]["Containers"], 1);
        assert_eq!(v["Images"][0]["RepoTags"], json!(["busybox:latest"]));
        assert_eq!(v["Containers"][0]["Names"], json!(["/c1"]));
        assert!(v["Containers"][0].get("SizeRw").is_some());
        assert_eq!(
            v["Volumes"][0]["UsageData"],
            json!({"Size": 10, "RefCount": 1})
        );
        assert_eq!(v["BuildCache"], json!([]));
    }

    #[tokio::test]
    async fn auth_checks_with_the_registry() {
        let f = Fake::default();
        let ok = json!({"username": "u", "password": "secret", "serveraddress": "127.0.0.1:5000"});
        let r = f.request("POST", "/auth", ok.to_string()).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["Status"], "Login Succeeded");
        let bad = json!({"username": "u", "password": "nope", "serveraddress": "127.0.0.1:5000"});
        let r = f.request("POST", "/auth", bad.to_string()).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            r.message(),
            "login attempt to http://127.0.0.1:5000/v2/ failed with status: 401 Unauthorized"
        );
        let r = f.request("POST", "/auth", "{}").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
    }
}
