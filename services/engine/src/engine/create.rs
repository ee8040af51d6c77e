//! Creating a container: resolve the image, merge its config, prepare the rootfs snapshot,
//! create volumes (with copy-up), persist the record, publish "create".

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use berth_core::snapshots::Labels;
use berth_core::{Error, ErrorKind, Id, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::prost::Message;

use super::{Ctr, Engine, now};
use crate::imageconfig::{self, ImageConfig};
use crate::record::{Private, Record};
use crate::restart::Policy;
use crate::spec::{resources, validate};

/// Label that keeps the images service's garbage collector away from a container snapshot.
pub const GC_ROOT_LABEL: &str = "containerd.io/gc.root";
/// Label naming the container a snapshot belongs to.
pub const CONTAINER_LABEL: &str = "berth.container.id";

/// Docker's network mode words.
pub fn network_mode(hc: &pb::HostConfig) -> &str {
    match hc.network_mode.as_str() {
        "" | "default" => "bridge",
        other => other,
    }
}

/// A mode naming a user-defined network (not the default bridge, host, none or another
/// container's namespace).
pub fn is_user_defined(mode: &str) -> bool {
    !matches!(mode, "" | "default" | "bridge" | "host" | "none" | "cni")
        && !mode.starts_with("container:")
}

/// The committed snapshot a container's rootfs is prepared on: the layers unpacked for its
/// user namespace (or unshifted), as the images service answered.
fn image_parent(image: &berth_proto::berth::images::v1::ResolveImageResponse) -> &str {
    if image.snapshot_key.is_empty() {
        &image.chain_id
    } else {
        &image.snapshot_key
    }
}

/// Checks a host config before anything is created.
fn validate_host_config(engine: &Engine, hc: &pb::HostConfig) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    let policy = Policy::from_proto(hc.restart_policy.as_ref())?;
    if hc.auto_remove && !policy.is_none() {
        return Err(Error::invalid_argument(
            "Conflicting options: cannot specify both --restart and --rm",
        ));
    }
    if let Some(r) = &hc.resources {
        resources::validate(r, engine.host_info())?;
        let no_dev = |p: &str| -> Result<(i64, i64)> {
            Err(Error::invalid_argument(format!("{p}: not a device")))
        };
        let _ = resources::to_oci(r, engine.host_info(), true, &no_dev, &mut warnings);
    }
    if !hc.runtime.is_empty() && !engine.config.engine.runtimes.contains_key(&hc.runtime) {
        return Err(Error::invalid_argument(format!(
            "unknown or invalid runtime name: {}",
            hc.runtime
        )));
    }
    if let Some(lc) = &hc.log_config {
        validate::log_config(lc, &engine.config.engine.log_driver)?;
    }
    validate::namespace_modes(hc)?;
    if engine.container_map(hc).is_some() {
        validate::remapped(hc)?;
    }
    validate::devices(&hc.devices)?;
    if hc.mounts.iter().any(|m| {
        m.bind.as_ref().is_some_and(|b| {
            !matches!(
                b.propagation(),
                pb::Propagation::Unspecified | pb::Propagation::Private | pb::Propagation::Rprivate
            )
        })
    }) {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        validate::bind_propagation(&hc.mounts, &mountinfo, validate::host_path)?;
    }
    for mode in [&hc.pid_mode, &hc.ipc_mode] {
        if let Some(other) = mode.strip_prefix("container:") {
            engine.get(other)?;
        }
    }
    let net = network_mode(hc);
    if let Some(other) = net.strip_prefix("container:") {
        engine.get(other)?;
    }
    if !hc.links.is_empty() {
        if net == "host" {
            return Err(Error::invalid_argument(
                "conflicting options: host type networking can't be used with links. This would result in undefined behavior",
            ));
        }
        if net.starts_with("container:") {
            return Err(Error::invalid_argument(
                "conflicting options: container type network can't be used with links. This would result in undefined behavior",
            ));
        }
    }
    if hc.init == Some(true) {
        warnings.push(
            "init is not supported by berth: the shim reaps orphaned processes instead".into(),
        );
    }
    Ok(warnings)
}

/// A MAC address as `net.ParseMAC` reads the 48-bit form: six hex pairs split by `:` or `-`.
pub(super) fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split([':', '-']).collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// `Config.MacAddress` (the field clients below API 1.44 send, and `--mac-address`) is the
/// MAC of the container's interface on its network mode's network, as in Docker; every
/// endpoint MAC must parse.
fn endpoint_macs(
    config_mac: &str,
    hc: &pb::HostConfig,
    networks: &mut HashMap<String, pb::EndpointConfig>,
) -> Result<()> {
    let mode = network_mode(hc).to_string();
    if !config_mac.is_empty() {
        if matches!(mode.as_str(), "host" | "none") || mode.starts_with("container:") {
            return Err(Error::invalid_argument(
                "conflicting options: mac-address and the network mode",
            ));
        }
        let ep = networks.entry(mode).or_default();
        if ep.mac_address.is_empty() {
            ep.mac_address = config_mac.to_string();
        } else if !ep.mac_address.eq_ignore_ascii_case(config_mac) {
            return Err(Error::invalid_argument(
                "the container-wide MAC address must match the endpoint-specific MAC address for the main network, or be left empty",
            ));
        }
    }
    for ep in networks.values() {
        if !ep.mac_address.is_empty() && !valid_mac(&ep.mac_address) {
            return Err(Error::invalid_argument(format!(
                "invalid MAC address {}",
                ep.mac_address
            )));
        }
    }
    Ok(())
}

fn check_target(target: &str) -> Result<()> {
    if !target.starts_with('/') {
        return Err(Error::invalid_argument(format!(
            "invalid mount config: mount path must be absolute: {target}"
        )));
    }
    if target == "/" {
        return Err(Error::invalid_argument(
            "invalid specification: destination can't be '/'",
        ));
    }
    Ok(())
}

fn clean(target: &str) -> String {
    let t = target.trim_end_matches('/');
    if t.is_empty() { "/".into() } else { t.into() }
}

impl Engine {
    /// Creates a container (state CREATED). Returns it and warnings.
    pub async fn create(
        &self,
        req: pb::CreateContainerRequest,
        namespace: &str,
    ) -> Result<(pb::Container, Vec<String>)> {
        let user_config = req
            .config
            .clone()
            .ok_or_else(|| Error::invalid_argument("config is required"))?;
        if user_config.image.is_empty() {
            return Err(Error::invalid_argument("config.image is required"));
        }
        let mut hc = req.host_config.clone().unwrap_or_default();
        let sandbox_hostname = self.join_sandbox_at_create(&mut hc)?;
        if !hc.sandbox_id.is_empty() && !req.networks.is_empty() {
            return Err(Error::invalid_argument(
                "a container of a pod sandbox uses the pod's network; it cannot name networks",
            ));
        }
        let warnings = validate_host_config(self, &hc)?;

        let name = if req.name.is_empty() {
            // Reserve a generated name atomically: retry when another create took it.
            loop {
                let candidate = crate::names::unique_name(|n| self.name_taken(n));
                if self.reserve_name(&candidate).is_ok() {
                    break candidate;
                }
            }
        } else {
            let n = berth_core::id::validate_name(&req.name)?.to_string();
            self.reserve_name(&n)?;
            n
        };
        let mut user_config = user_config;
        if let Some(h) = sandbox_hostname
            && user_config.hostname.is_empty()
        {
            user_config.hostname = h;
        }
        let result = self
            .create_named(&name, req, user_config, &mut hc, namespace)
            .await;
        match result {
            Ok(c) => Ok((c, warnings)),
            Err(e) => {
                self.release_name(&name);
                Err(e)
            }
        }
    }

    async fn create_named(
        &self,
        name: &str,
        req: pb::CreateContainerRequest,
        user_config: pb::ContainerConfig,
        hc: &mut pb::HostConfig,
        namespace: &str,
    ) -> Result<pb::Container> {
        let snapshotter = if req.snapshotter.is_empty() {
            self.config.snapshotter.driver.clone()
        } else {
            req.snapshotter.clone()
        };
        let image = self
            .deps
            .images
            .resolve(
                &user_config.image,
                req.platform.clone(),
                &snapshotter,
                self.container_map(hc).is_none(),
            )
            .await
            .map_err(|e| {
                if e.is(ErrorKind::NotFound) {
                    Error::not_found(format!("No such image: {}", user_config.image))
                } else {
                    e
                }
            })?;
        let mut networks = req.networks.clone();
        self.resolve_links(name, hc, &mut networks)?;
        endpoint_macs(&user_config.mac_address, hc, &mut networks)?;
        if user_config.network_disabled {
            // Docker gives such a container no network at all: a namespace with loopback only.
            hc.network_mode = "none".into();
            networks.clear();
        }
        self.volumes_from(hc)?;
        if hc.runtime.is_empty() {
            hc.runtime = self.config.engine.default_runtime();
        }
        // The `local` driver rotates by default (20 MiB, 5 files) where json-file does not.
        if let Some(lc) = hc.log_config.as_mut()
            && lc.r#type == "local"
        {
            lc.options
                .entry("max-size".into())
                .or_insert_with(|| "20m".into());
            lc.options
                .entry("max-file".into())
                .or_insert_with(|| "5".into());
        }
        let image_config = ImageConfig::parse(&image.config)?;
        let mut config = imageconfig::merge(&user_config, &image_config)?;
        let id = Id::random().to_string();
        let mode = network_mode(hc).to_string();
        if config.hostname.is_empty() {
            config.hostname = if mode == "host" {
                nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| id[..12].to_string())
            } else {
                id[..12].to_string()
            };
        }

        // Mount targets: user mounts first, then the image's and config's VOLUMEs not covered.
        let mut seen = HashSet::new();
        for m in &hc.mounts {
            check_target(&m.target)?;
            if !seen.insert(clean(&m.target)) {
                return Err(Error::invalid_argument(format!(
                    "Duplicate mount point: {}",
                    m.target
                )));
            }
            match m.r#type() {
                pb::MountType::Bind => {
                    if !m.source.starts_with('/') {
                        return Err(Error::invalid_argument(format!(
                            "invalid mount config for type \"bind\": invalid mount path: '{}' mount path must be absolute",
                            m.source
                        )));
                    }
                    let b = m.bind.unwrap_or_default();
                    if b.read_only_force_recursive && (!m.read_only || b.non_recursive) {
                        return Err(Error::invalid_argument(format!(
                            "invalid mount config for {}: recursive read-only needs a read-only, recursive bind",
                            m.target
                        )));
                    }
                    let create = b.create_host_path;
                    if !create && !Path::new(&m.source).exists() {
                        return Err(Error::invalid_argument(format!(
                            "invalid mount config for type \"bind\": bind source path does not exist: {}",
                            m.source
                        )));
                    }
                }
                pb::MountType::Volume | pb::MountType::Tmpfs => {}
                pb::MountType::Image => {
                    return Err(Error::invalid_argument(
                        "invalid mount config: mounts of type \"image\" are not supported",
                    ));
                }
                pb::MountType::Unspecified => {
                    return Err(Error::invalid_argument(format!(
                        "invalid mount config: mount type unknown for {}",
                        m.target
                    )));
                }
            }
        }
        for v in &config.volumes {
            check_target(v)?;
            if seen.insert(clean(v)) {
                hc.mounts.push(pb::MountSpec {
                    r#type: pb::MountType::Volume.into(),
                    target: v.clone(),
                    ..Default::default()
                });
            }
        }

        // The rootfs.
        let mut labels = Labels::new();
        labels.insert(GC_ROOT_LABEL.into(), now().seconds.to_string());
        labels.insert(CONTAINER_LABEL.into(), id.clone());
        let rootfs = self
            .deps
            .snapshots
            .prepare(&id, image_parent(&image), labels)
            .await
            .map_err(|e| Error::new(e.kind(), "prepare rootfs snapshot").with_source(e))?;

        let mut created_volumes = Vec::new();
        let result = self
            .create_rest(
                &id,
                name,
                &req,
                user_config,
                config,
                hc,
                &image,
                &snapshotter,
                &rootfs,
                namespace,
                networks,
                &mut created_volumes,
            )
            .await;
        match result {
            Ok(c) => Ok(c),
            Err(e) => {
                if let Err(err) = self.deps.snapshots.remove(&id).await {
                    tracing::warn!(id, error = %err.chain(), "rolling back the rootfs snapshot");
                }
                for v in created_volumes {
                    let _ = self.volumes.remove(&v, &[]).await;
                }
                let _ = std::fs::remove_dir_all(self.paths.container_dir(&id));
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_rest(
        &self,
        id: &str,
        name: &str,
        req: &pb::CreateContainerRequest,
        user_config: pb::ContainerConfig,
        config: pb::ContainerConfig,
        hc: &mut pb::HostConfig,
        image: &berth_proto::berth::images::v1::ResolveImageResponse,
        snapshotter: &str,
        rootfs: &[berth_core::mount::Mount],
        namespace: &str,
        networks: HashMap<String, pb::EndpointConfig>,
        created_volumes: &mut Vec<String>,
    ) -> Result<pb::Container> {
        // Volumes, and which of them get the image's content.
        let mut mounts = Vec::new();
        let mut anonymous = Vec::new();
        let mut copy_pairs: Vec<(String, PathBuf)> = Vec::new();
        for m in hc.mounts.iter_mut() {
            let rw = !m.read_only;
            let propagation = m
                .bind
                .as_ref()
                .map(|b| b.propagation())
                .unwrap_or(pb::Propagation::Unspecified);
            match m.r#type() {
                pb::MountType::Volume => {
                    let opts = m.volume.clone().unwrap_or_default();
                    let named = !m.source.is_empty();
                    let (vol, created) = self
                        .volumes
                        .create(
                            named.then_some(m.source.as_str()),
                            &opts.driver,
                            opts.driver_opts
                                .clone()
                                .into_iter()
                                .collect::<BTreeMap<_, _>>(),
                            opts.labels.clone().into_iter().collect::<BTreeMap<_, _>>(),
                        )
                        .await?;
                    if created {
                        created_volumes.push(vol.name.clone());
                    }
                    if !named {
                        anonymous.push(vol.name.clone());
                        // Remember the generated name on the spec, so starts find it.
                        m.source = vol.name.clone();
                    }
                    let mut source = self.volumes.data_dir(&vol.name);
                    if !opts.subpath.is_empty() {
                        source = source.join(opts.subpath.trim_start_matches('/'));
                    }
                    if !opts.no_copy && opts.subpath.is_empty() && !vol.options.contains_key("type")
                    {
                        copy_pairs.push((m.target.clone(), source.clone()));
                    }
                    mounts.push(pb::MountPoint {
                        r#type: pb::MountType::Volume.into(),
                        name: vol.name.clone(),
                        source: source.display().to_string(),
                        destination: m.target.clone(),
                        driver: vol.driver.clone(),
                        mode: if m.mode.is_empty() {
                            "z".into()
                        } else {
                            m.mode.clone()
                        },
                        rw,
                        propagation: pb::Propagation::Unspecified.into(),
                    });
                }
                pb::MountType::Bind => mounts.push(pb::MountPoint {
                    r#type: pb::MountType::Bind.into(),
                    name: String::new(),
                    source: m.source.clone(),
                    destination: m.target.clone(),
                    driver: String::new(),
                    mode: m.mode.clone(),
                    rw,
                    propagation: if propagation == pb::Propagation::Unspecified {
                        pb::Propagation::Rprivate.into()
                    } else {
                        propagation.into()
                    },
                }),
                pb::MountType::Tmpfs => mounts.push(pb::MountPoint {
                    r#type: pb::MountType::Tmpfs.into(),
                    name: String::new(),
                    source: String::new(),
                    destination: m.target.clone(),
                    driver: String::new(),
                    mode: m.mode.clone(),
                    rw,
                    propagation: pb::Propagation::Unspecified.into(),
                }),
                _ => {}
            }
        }
        if !copy_pairs.is_empty() {
            let rootfs = rootfs.to_vec();
            let scratch = self.paths.scratch.clone();
            let copied = tokio::task::spawn_blocking(move || {
                crate::rootfs::copy_up(&rootfs, &copy_pairs, &scratch)
            })
            .await
            .map_err(|e| Error::internal("copy-up task").with_source(e))??;
            if !copied.is_empty() {
                tracing::debug!(id, paths = ?copied, "copied image content into new volumes");
            }
        }

        // Networks requested.
        let mut networks = networks;
        let mode = network_mode(hc).to_string();
        if networks.is_empty()
            && hc.sandbox_id.is_empty()
            && !matches!(mode.as_str(), "host" | "none" | "cni")
            && !mode.starts_with("container:")
        {
            networks.insert(mode.clone(), pb::EndpointConfig::default());
        }
        if matches!(mode.as_str(), "host" | "none") && networks.keys().any(|k| k != &mode) {
            return Err(Error::invalid_argument(format!(
                "container cannot be connected to network endpoints other than {mode}"
            )));
        }

        let dir = self.paths.container_dir(id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::internal(format!("create {}", dir.display())).with_source(e))?;
        let log_type = hc
            .log_config
            .as_ref()
            .map(|l| l.r#type.clone())
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| self.config.engine.log_driver.clone());
        let log_path = if log_type == "none" {
            String::new()
        } else if log_type == "cri" {
            hc.log_config
                .as_ref()
                .and_then(|l| l.options.get("path").cloned())
                .unwrap_or_default()
        } else {
            dir.join(format!("{id}-json.log")).display().to_string()
        };
        let container = pb::Container {
            id: id.into(),
            name: name.into(),
            created: Some(now()),
            image: user_config.image.clone(),
            image_id: image.image_id.clone(),
            config: Some(config),
            host_config: Some(hc.clone()),
            networks,
            state: Some(pb::ContainerState {
                status: pb::ContainerStatus::Created.into(),
                ..Default::default()
            }),
            network_settings: Some(pb::NetworkSettings::default()),
            mounts,
            log_path,
            snapshotter: if image.snapshotter.is_empty() {
                snapshotter.into()
            } else {
                image.snapshotter.clone()
            },
            snapshot_key: id.into(),
            resolv_conf_path: dir.join("resolv.conf").display().to_string(),
            hostname_path: dir.join("hostname").display().to_string(),
            hosts_path: dir.join("hosts").display().to_string(),
            platform: image
                .platform
                .as_ref()
                .map(|p| p.os.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "linux".into()),
            apparmor_profile: String::new(),
            exec_ids: Vec::new(),
            size_rw: -1,
            size_root_fs: -1,
            extensions: req.extensions.clone(),
            bundle_path: self.paths.bundle(id).display().to_string(),
            process_user: None,
        };
        let rec = Record {
            c: container,
            p: Private {
                namespace: if namespace.is_empty() {
                    super::DEFAULT_NAMESPACE.into()
                } else {
                    namespace.into()
                },
                anonymous_volumes: anonymous,
                user_config: user_config.encode_to_vec(),
                id_map: self
                    .container_map(hc)
                    .map(|m| m.fingerprint())
                    .unwrap_or_default(),
                ..Default::default()
            },
        };
        // The image user is recorded while the record is written (one round trip less); a
        // record that could not be written takes it back.
        let (stored, user) = tokio::join!(
            self.store.put_container(&rec),
            self.deps.images.add_user(&image.image_id, id)
        );
        if let Err(e) = stored {
            if user.is_ok() {
                let _ = self.deps.images.remove_user(&image.image_id, id).await;
            }
            return Err(e);
        }
        let ctr = Ctr::new(rec.clone());
        self.insert(ctr, name);
        if let Err(e) = user {
            // The engine reconciles image users at start-up; a missed one is repaired there.
            tracing::warn!(id, error = %e.chain(), "recording the image user");
        }
        tracing::info!(id, name, image = %rec.c.image, "container created");
        self.container_event(&rec, "create", []);
        Ok(rec.c)
    }

    /// Checks the legacy links of a new container and records them as Docker does: on the
    /// default bridge as `/child:/parent/alias` in the host config; on a user-defined network
    /// as the endpoint's links (what the docker CLI sends there), which the network's DNS
    /// answers for. A link to a container that does not exist is refused.
    fn resolve_links(
        &self,
        name: &str,
        hc: &mut pb::HostConfig,
        networks: &mut HashMap<String, pb::EndpointConfig>,
    ) -> Result<()> {
        let mode = network_mode(hc).to_string();
        let mut recorded = Vec::new();
        for link in &hc.links {
            let (child, alias) = crate::links::parse(link)?;
            let target = self.linked(&child)?;
            if target.with(|r| network_mode(r.host_config()) == "host") {
                return Err(Error::invalid_argument(
                    "conflicting options: host type networking can't be used with links. This would result in undefined behavior",
                ));
            }
            let child_name = target.with(|r| r.c.name.clone());
            if is_user_defined(&mode) {
                recorded.push(format!("{child}:{alias}"));
            } else {
                recorded.push(crate::links::record(&child_name, name, &alias));
            }
        }
        if is_user_defined(&mode) {
            let ep = networks.entry(mode.clone()).or_default();
            for l in recorded.drain(..) {
                if !ep.links.contains(&l) {
                    ep.links.push(l);
                }
            }
        }
        hc.links = recorded;
        for ep in networks.values() {
            for link in &ep.links {
                let (child, _) = crate::links::parse(link)?;
                self.linked(&child)?;
            }
        }
        Ok(())
    }

    /// `--volumes-from name[:ro|rw]`: the other container's binds and volumes, at the same
    /// places, read-only when asked (or when they were), unless this container mounts
    /// something there itself.
    fn volumes_from(&self, hc: &mut pb::HostConfig) -> Result<()> {
        for spec in hc.volumes_from.clone() {
            let (name, mode) = match spec.split_once(':') {
                Some((n, m)) => (n, m),
                None => (spec.as_str(), ""),
            };
            if !matches!(mode, "" | "ro" | "rw") {
                return Err(Error::invalid_argument(format!(
                    "invalid mode for volumes-from: {mode}"
                )));
            }
            let source = self.get(name)?;
            let mounts = source.with(|r| r.host_config().mounts.clone());
            for mut m in mounts {
                if !matches!(m.r#type(), pb::MountType::Bind | pb::MountType::Volume)
                    || hc.mounts.iter().any(|own| own.target == m.target)
                {
                    continue;
                }
                match mode {
                    "ro" => m.read_only = true,
                    "rw" => m.read_only = false,
                    _ => {}
                }
                if let Some(v) = m.volume.as_mut() {
                    // The volume is there already: no copy-up of this image's content.
                    v.no_copy = true;
                }
                hc.mounts.push(m);
            }
        }
        Ok(())
    }

    /// The container a link names; one that does not exist is an invalid parameter, as in
    /// Docker (not a "no such container" that clients would read as a missing image).
    pub(super) fn linked(&self, child: &str) -> Result<std::sync::Arc<Ctr>> {
        self.get(child).map_err(|e| {
            Error::invalid_argument(format!(
                "could not get container for {child}: {}",
                e.message()
            ))
        })
    }
}
