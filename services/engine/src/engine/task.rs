//! Tasks: starting a container through its shim, stopping, killing, pausing, updating,
//! waiting, exits and restart policies, deletion.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use berth_core::{Error, ErrorKind, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::events::v1::envelope::Payload;
use berth_proto::berth::network::v1 as net;
use berth_proto::berth::shim::v1 as shimpb;
use berth_proto::berth::types::v1 as types;
use berth_proto::prost_types::Timestamp;
use tokio_util::sync::CancellationToken;

use super::create::network_mode;
use super::{Ctr, Engine, ExitState, now, write_atomic};
use crate::deps::Shim;
use crate::hostfiles::{self, Resolv};
use crate::restart::{self, Policy};
use crate::spec::{self, Device, Namespace, SpecInput, SpecMount};

/// Docker's exit code for a start that failed for an unknown reason.
pub const EXIT_START_FAILED: i32 = 128;
/// How long a force-delete or a stop waits for the exit after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(30);

/// A wait's result: the status code, the start error if any, and the exit time.
pub type WaitResult = (i64, String, Option<Timestamp>);

/// What a started task needs cleaned up if the start fails half-way.
#[derive(Default)]
struct Partial {
    netns: Option<PathBuf>,
    attached: bool,
    shim: Option<Arc<dyn Shim>>,
}

/// Docker's exit code for a failed start, from the runtime's message.
pub fn start_failure_code(message: &str) -> i32 {
    let m = message.to_ascii_lowercase();
    if m.contains("executable file not found")
        || m.contains("no such file or directory")
        || m.contains("not found in $path")
    {
        127
    } else if m.contains("permission denied") {
        126
    } else {
        EXIT_START_FAILED
    }
}

/// `10m` → 10485760 (Docker's log-opt sizes: b, k, m, g, binary units).
pub fn parse_size(s: &str) -> Option<i64> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1024),
        'm' => (&s[..s.len() - 1], 1024 * 1024),
        'g' => (&s[..s.len() - 1], 1024 * 1024 * 1024),
        'b' => (&s[..s.len() - 1], 1),
        _ => (s.as_str(), 1),
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .map(|n| (n * mult as f64) as i64)
}

fn ts_to_time(ts: &Timestamp) -> SystemTime {
    SystemTime::try_from(*ts).unwrap_or(SystemTime::UNIX_EPOCH)
}

impl Engine {
    /// Starts a container. Returns the init's pid, and `true` when it was already running.
    pub async fn start(self: &Arc<Self>, input: &str) -> Result<(u32, bool)> {
        let ctr = self.get(input)?;
        let _op = ctr.op.lock().await;
        match ctr.with(|r| r.status()) {
            pb::ContainerStatus::Running => {
                return Ok((ctr.with(|r| r.state().pid as u32), true));
            }
            pb::ContainerStatus::Paused => {
                return Err(Error::failed_precondition(
                    "cannot start a paused container, try unpause instead",
                ));
            }
            pb::ContainerStatus::Removing => {
                return Err(Error::failed_precondition(format!(
                    "container {} is marked for removal and cannot be started",
                    ctr.id
                )));
            }
            pb::ContainerStatus::Dead => {
                return Err(Error::failed_precondition(format!(
                    "container {} is marked for removal and cannot be started",
                    ctr.id
                )));
            }
            _ => {}
        }
        self.cancel_restart(&ctr);
        ctr.update(|r| {
            r.p.restart.reset();
            let st = r.state_mut();
            st.manually_stopped = false;
            st.restart_count = 0;
        });
        self.start_locked(&ctr).await.map(|pid| (pid, false))
    }

    /// Starts the task; the caller holds the operation lock. On failure the record shows the
    /// error and an exit code, and waiters are woken.
    async fn start_locked(self: &Arc<Self>, ctr: &Arc<Ctr>) -> Result<u32> {
        if ctr.with(|r| r.p.has_task) {
            self.cleanup_task(ctr).await;
        }
        let mut partial = Partial::default();
        match self.start_task(ctr, &mut partial).await {
            Ok(pid) => Ok(pid),
            Err(err) => {
                let msg = err.chain();
                tracing::warn!(id = %ctr.id, error = %msg, "start failed");
                self.undo_partial(ctr, partial).await;
                let code = start_failure_code(&msg);
                ctr.update(|r| {
                    let st = r.state_mut();
                    st.status = pb::ContainerStatus::Exited.into();
                    st.exit_code = code;
                    st.error = msg.clone();
                    st.pid = 0;
                    st.finished_at = Some(now());
                    r.p.task_pid = 0;
                });
                ctr.exits.send_modify(|e| {
                    e.generation += 1;
                    e.running = false;
                    e.code = i64::from(code);
                    e.error = msg.clone();
                    e.at = Some(now());
                });
                let _ = self.persist(ctr).await;
                if ctr.with(|r| r.host_config().auto_remove) {
                    let engine = self.clone();
                    let ctr = ctr.clone();
                    tokio::spawn(async move {
                        let _op = ctr.op.lock().await;
                        if let Err(e) = engine.delete_locked(&ctr, true).await {
                            tracing::warn!(id = %ctr.id, error = %e.chain(), "auto-remove after a failed start");
                        }
                    });
                }
                // Docker reports a command that cannot be run as the caller's mistake.
                if code != EXIT_START_FAILED {
                    return Err(Error::invalid_argument(msg));
                }
                Err(err)
            }
        }
    }

    /// Releases what a failed start made, the shim and the network side at once (as
    /// [`Engine::release_task`] does).
    async fn undo_partial(&self, ctr: &Ctr, partial: Partial) {
        let shim_side = async {
            if let Some(shim) = partial.shim {
                let _ = shim.delete("", true).await;
                let _ = shim.shutdown(true).await;
            } else {
                let bundle = self.paths.bundle(&ctr.id);
                if bundle.join("shim.address").exists() {
                    let _ = self.deps.shims.cleanup(&ctr.id, &bundle).await;
                }
            }
        };
        let network_side = async {
            if let Some(ns) = partial.netns
                && let Err(e) = self.deps.netns.remove(&ns)
            {
                tracing::warn!(id = %ctr.id, error = %e.chain(), "remove netns after a failed start");
            }
            if partial.attached
                && let Err(e) = self.deps.networks.detach(&ctr.id, "", true).await
            {
                tracing::warn!(id = %ctr.id, error = %e.chain(), "detach after a failed start");
            }
        };
        tokio::join!(shim_side, network_side);
        let _ = std::fs::remove_dir_all(self.paths.bundle(&ctr.id));
        ctr.set_shim(None);
        ctr.update(|r| {
            r.p.has_task = false;
            r.p.attached = false;
            r.p.netns = None;
        });
    }

    async fn start_task(self: &Arc<Self>, ctr: &Arc<Ctr>, partial: &mut Partial) -> Result<u32> {
        let rec = ctr.record();
        let id = rec.id().to_string();
        let hc = rec.host_config().clone();
        let cfg = rec.config().clone();
        let bundle = self.paths.bundle(&id);
        let _ = std::fs::remove_dir_all(&bundle);
        std::fs::create_dir_all(bundle.join("rootfs")).map_err(|e| {
            Error::internal(format!("create bundle {}", bundle.display())).with_source(e)
        })?;

        // Who the process runs as, from the container's own passwd and group.
        let rootfs = self
            .deps
            .snapshots
            .mounts(&rec.c.snapshot_key)
            .await
            .map_err(|e| Error::new(e.kind(), "rootfs snapshot").with_source(e))?;
        let user = {
            let rootfs = rootfs.clone();
            let scratch = self.paths.scratch.clone();
            let spec_user = cfg.user.clone();
            let group_add = hc.group_add.clone();
            tokio::task::spawn_blocking(move || -> Result<crate::user::ResolvedUser> {
                let passwd = crate::rootfs::read_file(&rootfs, "/etc/passwd", &scratch)?;
                let group = crate::rootfs::read_file(&rootfs, "/etc/group", &scratch)?;
                let text = |d: Option<Vec<u8>>| d.map(|d| String::from_utf8_lossy(&d).into_owned());
                crate::user::resolve(
                    &spec_user,
                    text(passwd).as_deref(),
                    text(group).as_deref(),
                    &group_add,
                )
            })
            .await
            .map_err(|e| Error::internal("user lookup task").with_source(e))??
        };

        // Network namespace, attachments and the files that depend on them.
        let mode = network_mode(&hc).to_string();
        let dir = self.paths.container_dir(&id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::internal(format!("create {}", dir.display())).with_source(e))?;
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let own_dns = Resolv {
            servers: hc.dns.clone(),
            search: hc.dns_search.clone(),
            options: hc.dns_options.clone(),
        };
        let mut settings = pb::NetworkSettings::default();
        let mut network_files = true;
        let net_ns = match mode.as_str() {
            "host" => {
                let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
                write_atomic(&dir.join("hosts"), hosts.as_bytes())?;
                let resolv = Resolv::build(&own_dns, &Resolv::default(), &host_resolv, true);
                write_atomic(&dir.join("resolv.conf"), resolv.render().as_bytes())?;
                Namespace::Host
            }
            "none" => {
                let hosts = hostfiles::hosts(&self.extra_hosts(&hc, ""), &[]);
                write_atomic(&dir.join("hosts"), hosts.as_bytes())?;
                let resolv = Resolv::build(&own_dns, &Resolv::default(), &host_resolv, false);
                write_atomic(&dir.join("resolv.conf"), resolv.render().as_bytes())?;
                Namespace::Private
            }
            other if other.starts_with("container:") => {
                let target = self.get(&other["container:".len()..])?;
                let (running, pid, ns, tdir) = target.with(|r| {
                    (
                        r.is_running(),
                        r.state().pid,
                        r.p.netns.clone(),
                        self.paths.container_dir(r.id()),
                    )
                });
                if !running {
                    return Err(Error::failed_precondition(format!(
                        "cannot join network of a non running container: {}",
                        target.id
                    )));
                }
                for f in ["hosts", "resolv.conf"] {
                    let _ = std::fs::copy(tdir.join(f), dir.join(f));
                }
                Namespace::Join(ns.unwrap_or_else(|| PathBuf::from(format!("/proc/{pid}/ns/net"))))
            }
            "cni" => {
                return Err(Error::unimplemented(
                    "network mode \"cni\" is not supported by the engine yet",
                ));
            }
            _ => {
                let ns = self.deps.netns.create(&id).await?;
                partial.netns = Some(ns.clone());
                settings.sandbox_key = ns.display().to_string();
                let attachments = self.attach_networks(&rec, &ns, partial).await?;
                let mut host_entries = Vec::new();
                let mut net_dns = Resolv::default();
                for (name, att) in &attachments {
                    host_entries.extend(att.hosts.iter().cloned());
                    if att.default_route || net_dns.servers.is_empty() {
                        net_dns = Resolv {
                            servers: att.dns_servers.clone(),
                            search: att.dns_search.clone(),
                            options: att.dns_options.clone(),
                        };
                    }
                    settings.networks.insert(
                        name.clone(),
                        pb::EndpointSettings {
                            network_id: att.network_id.clone(),
                            endpoint_id: att.endpoint_id.clone(),
                            ip_address: att.ipv4_address.clone(),
                            ip_prefix_len: att.ipv4_prefix_len,
                            gateway: att.ipv4_gateway.clone(),
                            mac_address: att.mac_address.clone(),
                            ipv6_address: att.ipv6_address.clone(),
                            ipv6_prefix_len: att.ipv6_prefix_len,
                            ipv6_gateway: att.ipv6_gateway.clone(),
                            aliases: att.aliases.clone(),
                            dns_names: att.dns_names.clone(),
                            interface_name: att.interface_name.clone(),
                            config: rec.c.networks.get(name).cloned(),
                        },
                    );
                }
                settings.ports = ports_status(&cfg, &attachments);
                let gateway = attachments
                    .iter()
                    .find(|(_, a)| a.default_route)
                    .or(attachments.first())
                    .map(|(_, a)| a.ipv4_gateway.clone())
                    .unwrap_or_default();
                let hosts = hostfiles::hosts(&self.extra_hosts(&hc, &gateway), &host_entries);
                write_atomic(&dir.join("hosts"), hosts.as_bytes())?;
                let resolv = Resolv::build(&own_dns, &net_dns, &host_resolv, false);
                write_atomic(&dir.join("resolv.conf"), resolv.render().as_bytes())?;
                Namespace::Join(ns)
            }
        };
        if mode.starts_with("container:") {
            network_files = dir.join("hosts").exists();
        }
        write_atomic(
            &dir.join("hostname"),
            format!("{}\n", cfg.hostname).as_bytes(),
        )?;

        // The spec.
        let mut mounts = self.spec_mounts(&rec, &hc)?;
        if network_files {
            let ro = hc.security.as_ref().is_some_and(|s| s.read_only_rootfs);
            for (file, dest) in [
                ("resolv.conf", "/etc/resolv.conf"),
                ("hostname", "/etc/hostname"),
                ("hosts", "/etc/hosts"),
            ] {
                if mounts.iter().any(|m| m.destination == dest) || !dir.join(file).exists() {
                    continue;
                }
                mounts.push(SpecMount {
                    destination: dest.into(),
                    typ: "bind".into(),
                    source: dir.join(file).display().to_string(),
                    options: vec![
                        "rbind".into(),
                        "rprivate".into(),
                        if ro { "ro" } else { "rw" }.into(),
                    ],
                });
            }
        }
        let devices = host_devices(&hc.devices)?;
        let pid_ns = self.join_mode(&hc.pid_mode, "pid")?;
        let ipc_ns = match hc.ipc_mode.as_str() {
            "host" => Namespace::Host,
            m if m.starts_with("container:") => self.join_mode(m, "ipc")?,
            _ => Namespace::Private,
        };
        let input = SpecInput {
            id: &id,
            config: &cfg,
            host_config: &hc,
            user: &user,
            hostname: &cfg.hostname,
            network: net_ns,
            pid: pid_ns,
            ipc: ipc_ns,
            uts: if hc.uts_mode == "host" {
                Namespace::Host
            } else {
                Namespace::Private
            },
            cgroup: match hc.cgroupns_mode.as_str() {
                "private" => Namespace::Private,
                "host" => Namespace::Host,
                _ if self.host_info().cgroup_v2 => Namespace::Private,
                _ => Namespace::Host,
            },
            mounts: &mounts,
            devices: &devices,
            cgroup_parent: &self.config.engine.cgroup_parent,
            host: self.host_info(),
        };
        let (spec, _warnings) = spec::generate(&input)?;
        let json = serde_json::to_vec_pretty(&spec)
            .map_err(|e| Error::internal("serialize config.json").with_source(e))?;
        write_atomic(&bundle.join("config.json"), &json)?;

        // The shim and the task.
        let shim = self
            .deps
            .shims
            .spawn(&id, &bundle, &rec.p.namespace)
            .await
            .map_err(|e| Error::new(e.kind(), "start shim").with_source(e))?;
        partial.shim = Some(shim.clone());
        let mut create = self.shim_create_request(&rec, &bundle, &rootfs);
        // The shim creates and starts in one runtime call (`runc run --detach`). Attaches
        // waiting for the start are handed the task right after; the shim holds the output
        // back until they have subscribed, so they see it from its first byte.
        create.start = true;
        create.hold_output_for = ctr.pending_attach.lock().unwrap().len() as u32;
        // A new run: an OOM kill from here on belongs to it.
        ctr.oom.store(false, std::sync::atomic::Ordering::Relaxed);
        let pid = shim.create(create).await?;
        ctr.set_shim(Some(shim.clone()));
        ctr.update(|r| {
            r.p.has_task = true;
            r.p.task_pid = pid;
        });

        // Attaches registered before the start get the task now; the shim holds the output
        // until they have subscribed (one registered while create-and-start ran gets it as
        // soon as it runs).
        let pending: Vec<_> = std::mem::take(&mut *ctr.pending_attach.lock().unwrap());
        let mut acks = Vec::new();
        for p in pending {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if p.send((shim.clone(), tx)).is_ok() {
                acks.push(rx);
            }
        }
        for rx in acks {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }

        // "start" is published in the same critical section that makes the record running, so
        // that an exit racing in (the process may already be gone) is always published after it.
        ctr.update(|r| {
            r.p.task_pid = pid;
            r.p.netns = partial.netns.clone();
            r.p.attached = partial.attached;
            r.c.network_settings = Some(settings);
            let st = r.state_mut();
            st.status = pb::ContainerStatus::Running.into();
            st.pid = pid as i32;
            st.started_at = Some(now());
            st.error.clear();
            st.oom_killed = false;
            self.container_event(r, "start", []);
        });
        ctr.exits.send_modify(|e| {
            e.running = true;
            e.error.clear();
        });
        // From here on the task's resources are the record's, not the partial start's.
        *partial = Partial::default();
        // The task runs whatever happens now; a record that could not be written is written
        // again at the next change, and recovery reconciles it with the shim in any case.
        if let Err(e) = self.persist(ctr).await {
            tracing::error!(id, error = %e.chain(), "persisting a started container");
        }
        tracing::info!(id, pid, "container started");
        self.monitor(ctr.clone(), shim, pid);
        Ok(pid)
    }

    fn extra_hosts(&self, hc: &pb::HostConfig, gateway: &str) -> Vec<types::HostEntry> {
        hc.extra_hosts
            .iter()
            .map(|h| {
                let mut h = h.clone();
                if h.ip == "host-gateway" {
                    h.ip = gateway.to_string();
                }
                h
            })
            .collect()
    }

    fn join_mode(&self, mode: &str, ns: &str) -> Result<Namespace> {
        if mode == "host" {
            return Ok(Namespace::Host);
        }
        let Some(other) = mode.strip_prefix("container:") else {
            return Ok(Namespace::Private);
        };
        let target = self.get(other)?;
        let (running, pid) = target.with(|r| (r.is_running(), r.state().pid));
        if !running {
            return Err(Error::failed_precondition(format!(
                "cannot join {ns} namespace of a non running container: {}",
                target.id
            )));
        }
        Ok(Namespace::Join(PathBuf::from(format!(
            "/proc/{pid}/ns/{ns}"
        ))))
    }

    /// Attaches the container's netns to each of its networks; the one with the highest
    /// priority (then the first by name) gets the published ports.
    async fn attach_networks(
        &self,
        rec: &crate::record::Record,
        ns: &Path,
        partial: &mut Partial,
    ) -> Result<Vec<(String, net::Attachment)>> {
        let hc = rec.host_config();
        let cfg = rec.config();
        let mut nets: Vec<(&String, &pb::EndpointConfig)> = rec.c.networks.iter().collect();
        nets.sort_by(|a, b| b.1.gw_priority.cmp(&a.1.gw_priority).then(a.0.cmp(b.0)));
        let mut out = Vec::new();
        for (i, (name, ep)) in nets.into_iter().enumerate() {
            let first = i == 0;
            let req = net::AttachRequest {
                container_id: rec.id().into(),
                container_name: rec.c.name.clone(),
                hostname: cfg.hostname.clone(),
                netns_path: ns.display().to_string(),
                network: name.clone(),
                interface_name: String::new(),
                aliases: ep.aliases.clone(),
                ipv4_address: ep.ipv4_address.clone(),
                ipv6_address: ep.ipv6_address.clone(),
                mac_address: ep.mac_address.clone(),
                port_mappings: if first {
                    hc.port_bindings.clone()
                } else {
                    Vec::new()
                },
                publish_all: first && hc.publish_all_ports,
                exposed_ports: if first {
                    cfg.exposed_ports.clone()
                } else {
                    Vec::new()
                },
                dns_servers: hc.dns.clone(),
                dns_search: hc.dns_search.clone(),
                dns_options: hc.dns_options.clone(),
                driver_opts: ep.driver_opts.clone(),
                gw_priority: ep.gw_priority,
                links: if ep.links.is_empty() {
                    hc.links.clone()
                } else {
                    ep.links.clone()
                },
            };
            partial.attached = true;
            let att = self.deps.networks.attach(req).await.map_err(|e| {
                Error::new(e.kind(), format!("attach to network {name}")).with_source(e)
            })?;
            let key = if att.network_name.is_empty() {
                name.clone()
            } else {
                att.network_name.clone()
            };
            out.push((key, att));
        }
        Ok(out)
    }

    /// The user mounts of the spec, from the host config and the resolved mount points.
    fn spec_mounts(
        &self,
        rec: &crate::record::Record,
        hc: &pb::HostConfig,
    ) -> Result<Vec<SpecMount>> {
        let mut out = Vec::new();
        for m in &hc.mounts {
            let point = rec.c.mounts.iter().find(|p| p.destination == m.target);
            let ro = if m.read_only { "ro" } else { "rw" };
            match m.r#type() {
                pb::MountType::Bind => {
                    let b = m.bind.unwrap_or_default();
                    if b.create_host_path && !Path::new(&m.source).exists() {
                        std::fs::create_dir_all(&m.source).map_err(|e| {
                            Error::invalid_argument(format!("create bind source {}", m.source))
                                .with_source(e)
                        })?;
                    }
                    let prop = match b.propagation() {
                        pb::Propagation::Unspecified | pb::Propagation::Rprivate => "rprivate",
                        pb::Propagation::Private => "private",
                        pb::Propagation::Shared => "shared",
                        pb::Propagation::Rshared => "rshared",
                        pb::Propagation::Slave => "slave",
                        pb::Propagation::Rslave => "rslave",
                    };
                    out.push(SpecMount {
                        destination: m.target.clone(),
                        typ: "bind".into(),
                        source: m.source.clone(),
                        options: vec![
                            if b.non_recursive { "bind" } else { "rbind" }.into(),
                            ro.into(),
                            prop.into(),
                        ],
                    });
                }
                pb::MountType::Volume => {
                    let point = point.ok_or_else(|| {
                        Error::internal(format!("no mount point recorded for {}", m.target))
                    })?;
                    self.volumes.ensure_mounted(&point.name)?;
                    if !Path::new(&point.source).exists() {
                        std::fs::create_dir_all(&point.source).map_err(|e| {
                            Error::internal(format!("create {}", point.source)).with_source(e)
                        })?;
                    }
                    out.push(SpecMount {
                        destination: m.target.clone(),
                        typ: "bind".into(),
                        source: point.source.clone(),
                        options: vec!["rbind".into(), ro.into(), "rprivate".into()],
                    });
                }
                pb::MountType::Tmpfs => {
                    let t = m.tmpfs.clone().unwrap_or_default();
                    let mut options = vec!["nosuid".to_string(), "nodev".to_string()];
                    if t.size_bytes > 0 {
                        options.push(format!("size={}", t.size_bytes));
                    }
                    if t.mode != 0 {
                        options.push(format!("mode={:o}", t.mode));
                    }
                    options.extend(t.options.iter().cloned());
                    options.push(ro.into());
                    out.push(SpecMount {
                        destination: m.target.clone(),
                        typ: "tmpfs".into(),
                        source: "tmpfs".into(),
                        options,
                    });
                }
                _ => {}
            }
        }
        Ok(out)
    }

    fn shim_create_request(
        &self,
        rec: &crate::record::Record,
        bundle: &Path,
        rootfs: &[berth_core::mount::Mount],
    ) -> shimpb::CreateRequest {
        let cfg = rec.config();
        let hc = rec.host_config();
        let log = hc.log_config.clone().unwrap_or_default();
        let log_type = if log.r#type.is_empty() {
            self.config.engine.log_driver.clone()
        } else {
            log.r#type.clone()
        };
        let mut opts: HashMap<String, String> = self
            .config
            .engine
            .log_opts
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        opts.extend(log.options.clone());
        let format = match log_type.as_str() {
            "none" => shimpb::LogFormat::None,
            "cri" => shimpb::LogFormat::Cri,
            _ => shimpb::LogFormat::JsonFile,
        };
        let mut attrs = HashMap::new();
        if let Some(keys) = opts.get("labels") {
            for k in keys.split(',') {
                if let Some(v) = cfg.labels.get(k) {
                    attrs.insert(k.to_string(), v.clone());
                }
            }
        }
        if let Some(keys) = opts.get("env") {
            for k in keys.split(',') {
                if let Some(e) = cfg.env.iter().find(|e| e.split('=').next() == Some(k)) {
                    attrs.insert(k.to_string(), e[k.len() + 1..].to_string());
                }
            }
        }
        let runtime_name = if hc.runtime.is_empty() {
            self.config.engine.default_runtime.clone()
        } else {
            hc.runtime.clone()
        };
        let runtime = self.config.engine.runtimes.get(&runtime_name);
        shimpb::CreateRequest {
            id: rec.id().into(),
            bundle: bundle.display().to_string(),
            rootfs: rootfs.iter().cloned().map(Into::into).collect(),
            stdio: Some(shimpb::Stdio {
                mode: if cfg.tty {
                    shimpb::StdioMode::Tty
                } else {
                    shimpb::StdioMode::Pipes
                }
                .into(),
                stdin: cfg.open_stdin,
                terminal_size: hc.console_size,
            }),
            log: Some(shimpb::LogConfig {
                format: format.into(),
                path: rec.c.log_path.clone(),
                max_size: opts
                    .get("max-size")
                    .and_then(|s| parse_size(s))
                    .unwrap_or(0),
                max_file: opts
                    .get("max-file")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(1),
                attrs,
            }),
            runtime: Some(shimpb::RuntimeConfig {
                binary: runtime
                    .map(|r| r.path.clone())
                    .unwrap_or(runtime_name.clone()),
                root: self.runtime_root(&runtime_name).display().to_string(),
                systemd_cgroup: false,
                args: runtime.map(|r| r.args.clone()).unwrap_or_default(),
            }),
            events_address: format!(
                "unix://{}",
                self.config.socket(berth_core::Service::Engine).display()
            ),
            namespace: rec.p.namespace.clone(),
            start: false,
            hold_output_for: 0,
        }
    }

    /// The `--root` state directory of an OCI runtime.
    pub fn runtime_root(&self, runtime: &str) -> PathBuf {
        self.config.state_dir.join("runtime").join(runtime)
    }

    /// Waits for the init's exit through the shim, and handles it. A shim that goes away is
    /// cleaned up and its recorded exit is used.
    pub(super) fn monitor(self: &Arc<Self>, ctr: Arc<Ctr>, shim: Arc<dyn Shim>, pid: u32) {
        let engine = self.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let result = tokio::select! {
                    r = shim.wait("") => r,
                    _ = engine.shutdown.cancelled() => return,
                };
                match result {
                    Ok(w) => {
                        engine
                            .on_exit(&ctr.id, pid, w.exit_status, w.exited_at)
                            .await;
                        return;
                    }
                    Err(e) => {
                        // Stop when the task changed under us.
                        if !ctr.with(|r| r.is_running() && r.p.task_pid == pid) {
                            return;
                        }
                        failures += 1;
                        let bundle = engine.paths.bundle(&ctr.id);
                        let gone = e.is(ErrorKind::Unavailable)
                            && engine
                                .deps
                                .shims
                                .connect(&ctr.id, &bundle)
                                .await
                                .ok()
                                .flatten()
                                .is_none();
                        if gone || failures > 50 {
                            tracing::warn!(id = %ctr.id, error = %e.chain(), "shim is gone; cleaning up after it");
                            let dead = engine.deps.shims.cleanup(&ctr.id, &bundle).await.unwrap_or(
                                crate::deps::DeadExit {
                                    status: 255,
                                    exited_at: None,
                                },
                            );
                            engine
                                .on_exit(&ctr.id, pid, dead.status, dead.exited_at.map(Into::into))
                                .await;
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(
                            100 * u64::from(failures.min(10)),
                        ))
                        .await;
                    }
                }
            }
        });
    }

    /// Reacts to a task payload published by a shim.
    pub(super) async fn on_task_event(self: &Arc<Self>, payload: Payload) {
        match payload {
            Payload::TaskExit(e) if e.exec_id.is_empty() => {
                self.on_exit(&e.container_id, e.pid, e.exit_status, e.exited_at)
                    .await;
            }
            Payload::TaskExit(e) => {
                self.on_exec_exit(&e.container_id, &e.exec_id, e.exit_status, e.exited_at);
            }
            Payload::TaskOom(o) => {
                if let Ok(ctr) = self.get(&o.container_id) {
                    self.note_oom(&ctr);
                }
            }
            _ => {}
        }
    }

    /// Records an OOM kill of the current run and publishes "oom", once per run.
    fn note_oom(&self, ctr: &Ctr) {
        if !ctr.oom.swap(true, std::sync::atomic::Ordering::Relaxed) {
            ctr.update(|r| {
                r.state_mut().oom_killed = true;
                self.container_event(r, "oom", []);
            });
        }
    }

    /// Whether the kernel OOM-killed a process in the container's cgroup (it still exists
    /// when the init's exit is reported: the runtime removes it at delete).
    fn cgroup_oom_killed(&self, rec: &crate::record::Record) -> bool {
        let path = spec::cgroup_path(
            &rec.host_config().cgroup_parent,
            &self.config.engine.cgroup_parent,
            rec.id(),
        );
        let rel = path.trim_start_matches('/');
        let count = |file: PathBuf| -> Option<u64> {
            let text = std::fs::read_to_string(file).ok()?;
            text.lines()
                .find_map(|l| l.strip_prefix("oom_kill "))
                .and_then(|v| v.trim().parse().ok())
        };
        let cg = Path::new("/sys/fs/cgroup");
        count(cg.join("memory").join(rel).join("memory.oom_control"))
            .or_else(|| count(cg.join(rel).join("memory.events")))
            .is_some_and(|n| n > 0)
    }

    /// Phase one of an exit: records it (once, for the current task's pid), publishes "die",
    /// wakes waiters; then spawns phase two.
    pub async fn on_exit(self: &Arc<Self>, id: &str, pid: u32, status: u32, at: Option<Timestamp>) {
        let Ok(ctr) = self.get(id) else { return };
        let at = at.unwrap_or_else(now);
        // The shim's OOM event may still be on its way: the cgroup tells for sure, and "oom"
        // must come before "die".
        let current = ctr.with(|r| r.is_running() && (pid == 0 || r.p.task_pid == pid));
        if current && status == 137 && ctr.with(|r| self.cgroup_oom_killed(r)) {
            self.note_oom(&ctr);
        }
        let oom = ctr.oom.load(std::sync::atomic::Ordering::Relaxed);
        let rec = ctr.update(|r| {
            if !r.is_running() || (pid != 0 && r.p.task_pid != pid) {
                return None;
            }
            let st = r.state_mut();
            st.status = pb::ContainerStatus::Exited.into();
            st.exit_code = status as i32;
            st.pid = 0;
            st.finished_at = Some(at);
            st.oom_killed |= oom;
            Some(r.clone())
        });
        let Some(rec) = rec else { return };
        let duration = rec.ran_for().as_secs();
        self.container_event(
            &rec,
            "die",
            [
                ("exitCode".to_string(), status.to_string()),
                ("execDuration".to_string(), duration.to_string()),
            ],
        );
        tracing::info!(id, pid, status, "container exited");
        ctr.exits.send_modify(|e| {
            e.generation += 1;
            e.running = false;
            e.code = i64::from(status);
            e.at = Some(at);
            e.error.clear();
        });
        if let Err(e) = self.persist(&ctr).await {
            tracing::error!(id, error = %e.chain(), "persisting an exit");
        }
        let engine = self.clone();
        tokio::spawn(async move { engine.after_exit(ctr).await });
    }

    /// Phase two: release the task's resources, then restart or auto-remove.
    async fn after_exit(self: Arc<Self>, ctr: Arc<Ctr>) {
        let _op = ctr.op.lock().await;
        if ctr.exits.borrow().removed || ctr.with(|r| r.is_running()) {
            return;
        }
        if ctr.with(|r| r.p.has_task) {
            self.cleanup_task(&ctr).await;
        }
        let (policy, manual, code, ran_for, auto_remove) = ctr.with(|r| {
            (
                r.restart_policy(),
                r.state().manually_stopped,
                r.state().exit_code,
                r.ran_for(),
                r.host_config().auto_remove,
            )
        });
        let mut rs = ctr.with(|r| r.p.restart);
        if let Some(delay) = restart::should_restart(policy, &mut rs, code, manual, ran_for) {
            self.schedule_restart(&ctr, rs, delay).await;
            return;
        }
        if auto_remove && let Err(e) = self.delete_locked(&ctr, true).await {
            tracing::warn!(id = %ctr.id, error = %e.chain(), "auto-remove");
        }
    }

    /// Marks the container restarting and starts it again after `delay`, unless cancelled
    /// (stop, start, delete). The caller holds the operation lock.
    pub(super) async fn schedule_restart(
        self: &Arc<Self>,
        ctr: &Arc<Ctr>,
        rs: restart::RestartState,
        delay: Duration,
    ) {
        ctr.update(|r| {
            r.p.restart = rs;
            let st = r.state_mut();
            st.status = pb::ContainerStatus::Restarting.into();
            st.restart_count = rs.count as i32;
        });
        ctr.exits.send_modify(|e| e.running = true);
        let _ = self.persist(ctr).await;
        let token = CancellationToken::new();
        *ctr.restart_cancel.lock().unwrap() = token.clone();
        tracing::info!(id = %ctr.id, count = rs.count, ?delay, "restarting after backoff");
        let engine = self.clone();
        let ctr = ctr.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = token.cancelled() => return,
                _ = engine.shutdown.cancelled() => return,
            }
            let _op = ctr.op.lock().await;
            if token.is_cancelled() || ctr.with(|r| r.status()) != pb::ContainerStatus::Restarting {
                return;
            }
            // Docker publishes no "restart" for policy restarts, only the new "start".
            if let Err(e) = engine.start_locked(&ctr).await {
                tracing::warn!(id = %ctr.id, error = %e.chain(), "restart failed");
            }
        });
    }

    fn cancel_restart(&self, ctr: &Ctr) {
        ctr.restart_cancel.lock().unwrap().cancel();
    }

    /// Releases a finished task's resources: the shim (delete + shutdown), the bundle, network
    /// attachments and the network namespace. The caller holds the operation lock.
    pub(super) async fn cleanup_task(&self, ctr: &Ctr) {
        let _ = self.release_task(ctr, None, true).await;
    }

    /// [`Engine::cleanup_task`], optionally removing snapshot `snapshot` as soon as the shim
    /// has unmounted the rootfs (its result is returned; `Ok` when none was asked for), and
    /// persisting the released record only with `persist` (a delete drops it anyway).
    ///
    /// The init has exited, so nothing in the container uses its network any more: the
    /// network side runs while the shim side (runtime delete, rootfs unmount, then snapshot
    /// removal, shim shutdown and bundle removal) does. The netns goes first: the kernel then
    /// deletes the veths with it, and berth-network's Detach need not delete them itself (a
    /// slow, serialised netlink call) before it answers.
    async fn release_task(&self, ctr: &Ctr, snapshot: Option<&str>, persist: bool) -> Result<()> {
        let id = ctr.id.as_str();
        let (attached, netns) = ctr.with(|r| (r.p.attached, r.p.netns.clone()));
        let network = async {
            if let Some(ns) = netns
                && let Err(e) = self.deps.netns.remove(&ns)
            {
                tracing::warn!(id, error = %e.chain(), "netns remove");
            }
            if attached && let Err(e) = self.deps.networks.detach(id, "", true).await {
                tracing::warn!(id, error = %e.chain(), "network detach");
            }
        };
        let (snapshot_removed, ()) = tokio::join!(self.release_shim(ctr, snapshot), network);
        ctr.update(|r| {
            r.p.has_task = false;
            r.p.attached = false;
            r.p.netns = None;
            if let Some(s) = r.c.network_settings.as_mut() {
                s.sandbox_key.clear();
                s.ports.clear();
                for ep in s.networks.values_mut() {
                    ep.ip_address.clear();
                    ep.ipv6_address.clear();
                    ep.gateway.clear();
                    ep.endpoint_id.clear();
                    ep.mac_address.clear();
                }
            }
        });
        if persist && let Err(e) = self.persist(ctr).await {
            tracing::error!(id, error = %e.chain(), "persisting cleanup");
        }
        snapshot_removed
    }

    /// The shim side of [`Engine::release_task`]: delete (unmounts the rootfs), then the
    /// snapshot removal alongside the shim's shutdown and the bundle's removal.
    async fn release_shim(&self, ctr: &Ctr, snapshot: Option<&str>) -> Result<()> {
        let id = ctr.id.as_str();
        let bundle = self.paths.bundle(id);
        let shim = match ctr.shim() {
            Some(s) => Some(s),
            None => self.deps.shims.connect(id, &bundle).await.ok().flatten(),
        };
        let deleted = async {
            match shim {
                Some(shim) => {
                    if let Err(e) = shim.delete("", true).await
                        && !e.is(ErrorKind::NotFound)
                    {
                        tracing::warn!(id, error = %e.chain(), "shim delete");
                    }
                    Some(shim)
                }
                None => {
                    if bundle.exists() {
                        let _ = self.deps.shims.cleanup(id, &bundle).await;
                    }
                    None
                }
            }
        };
        let shim = deleted.await;
        let remove_snapshot = async {
            match snapshot {
                Some(key) => self.deps.snapshots.remove(key).await,
                None => Ok(()),
            }
        };
        let stop_shim = async {
            if let Some(shim) = shim
                && let Err(e) = shim.shutdown(true).await
            {
                tracing::warn!(id, error = %e.chain(), "shim shutdown");
            }
            ctr.set_shim(None);
            let _ = std::fs::remove_dir_all(&bundle);
        };
        let (removed, ()) = tokio::join!(remove_snapshot, stop_shim);
        removed
    }

    /// Sends `signal` to the init (or every process) and publishes "kill".
    async fn signal(&self, ctr: &Ctr, shim: &Arc<dyn Shim>, signal: i32, all: bool) -> Result<()> {
        let rec = ctr.record();
        self.container_event(&rec, "kill", [("signal".to_string(), signal.to_string())]);
        shim.kill("", signal as u32, all).await
    }

    fn stop_signal(&self, rec: &crate::record::Record) -> i32 {
        crate::signal::parse(&rec.config().stop_signal).unwrap_or(libc::SIGTERM)
    }

    async fn wait_generation(ctr: &Ctr, generation: u64, timeout: Option<Duration>) -> bool {
        let mut rx = ctr.exits();
        let fut = rx.wait_for(|e| e.generation > generation || e.removed);
        match timeout {
            None => fut.await.is_ok(),
            Some(t) => matches!(tokio::time::timeout(t, fut).await, Ok(Ok(_))),
        }
    }

    /// Stops a container: its stop signal, then SIGKILL after the timeout. Returns `true` when
    /// it was not running.
    pub async fn stop(
        self: &Arc<Self>,
        input: &str,
        signal: &str,
        timeout: Option<i64>,
    ) -> Result<bool> {
        let ctr = self.get(input)?;
        let _op = ctr.op.lock().await;
        self.stop_locked(&ctr, signal, timeout).await
    }

    async fn stop_locked(
        self: &Arc<Self>,
        ctr: &Arc<Ctr>,
        signal: &str,
        timeout: Option<i64>,
    ) -> Result<bool> {
        if ctr.with(|r| r.status()) == pb::ContainerStatus::Restarting {
            self.cancel_restart(ctr);
            ctr.update(|r| {
                let st = r.state_mut();
                st.status = pb::ContainerStatus::Exited.into();
                st.manually_stopped = true;
            });
            ctr.exits.send_modify(|e| e.running = false);
            self.persist(ctr).await?;
            let rec = ctr.record();
            self.container_event(&rec, "stop", []);
            return Ok(false);
        }
        if !ctr.with(|r| r.is_running()) {
            // Exited, but phase two (release, restart policy) has not run yet: the stop came
            // before the restart decision, so no restart follows.
            if ctr.with(|r| r.p.has_task && !r.state().manually_stopped) {
                ctr.update(|r| r.state_mut().manually_stopped = true);
                self.persist(ctr).await?;
            }
            return Ok(true);
        }
        self.cancel_restart(ctr);
        ctr.update(|r| r.state_mut().manually_stopped = true);
        self.persist(ctr).await?;
        let rec = ctr.record();
        let sig = if signal.is_empty() {
            self.stop_signal(&rec)
        } else {
            crate::signal::parse(signal)?
        };
        let timeout = timeout.unwrap_or_else(|| {
            rec.config()
                .stop_timeout
                .map(i64::from)
                .unwrap_or(i64::from(self.config.engine.stop_timeout))
        });
        let shim = self.task_shim(ctr).await?;
        let generation = ctr.exits.borrow().generation;
        let paused = rec.status() == pb::ContainerStatus::Paused;
        if let Err(e) = self.signal(ctr, &shim, sig, false).await
            && !e.is(ErrorKind::NotFound)
        {
            tracing::warn!(id = %ctr.id, error = %e.chain(), "stop signal");
        }
        if paused {
            let _ = shim.resume().await;
        }
        let wait = (timeout >= 0).then(|| Duration::from_secs(timeout as u64));
        if !Self::wait_generation(ctr, generation, wait).await {
            tracing::info!(id = %ctr.id, "container did not stop in time; killing it");
            let all = needs_kill_all(&ctr.record());
            let _ = self.signal(ctr, &shim, libc::SIGKILL, all).await;
            if !Self::wait_generation(ctr, generation, Some(KILL_WAIT)).await {
                return Err(Error::new(
                    ErrorKind::DeadlineExceeded,
                    format!("container {} did not exit after SIGKILL", ctr.id),
                ));
            }
        }
        let rec = ctr.record();
        self.container_event(&rec, "stop", []);
        Ok(false)
    }

    /// The shim of a running task, connecting when needed.
    pub(super) async fn task_shim(&self, ctr: &Ctr) -> Result<Arc<dyn Shim>> {
        if let Some(s) = ctr.shim() {
            return Ok(s);
        }
        let bundle = self.paths.bundle(&ctr.id);
        match self.deps.shims.connect(&ctr.id, &bundle).await? {
            Some(s) => {
                ctr.set_shim(Some(s.clone()));
                Ok(s)
            }
            None => Err(Error::unavailable(format!(
                "the shim of container {} is not reachable",
                ctr.id
            ))),
        }
    }

    /// Sends a signal (default SIGKILL).
    pub async fn kill(self: &Arc<Self>, input: &str, signal: &str) -> Result<()> {
        let ctr = self.get(input)?;
        let rec = ctr.record();
        if !rec.is_running() {
            return Err(Error::failed_precondition(format!(
                "Cannot kill container: {input}: Container {} is not running",
                ctr.id
            )));
        }
        let sig = if signal.is_empty() {
            libc::SIGKILL
        } else {
            crate::signal::parse(signal)?
        };
        // Killing with SIGKILL or the stop signal is a stop: no restart follows (Docker).
        if sig == libc::SIGKILL || sig == self.stop_signal(&rec) {
            self.cancel_restart(&ctr);
            ctr.update(|r| r.state_mut().manually_stopped = true);
            self.persist(&ctr).await?;
        }
        let shim = self.task_shim(&ctr).await?;
        self.signal(&ctr, &shim, sig, false).await?;
        if rec.status() == pb::ContainerStatus::Paused && sig == libc::SIGKILL {
            let _ = shim.resume().await;
        }
        Ok(())
    }

    /// Stops (when running) and starts again; publishes "restart".
    pub async fn restart(
        self: &Arc<Self>,
        input: &str,
        signal: &str,
        timeout: Option<i64>,
    ) -> Result<()> {
        let ctr = self.get(input)?;
        let _op = ctr.op.lock().await;
        self.stop_locked(&ctr, signal, timeout).await?;
        // Let phase two of the exit release the task before starting a new one.
        if ctr.with(|r| r.p.has_task) {
            self.cleanup_task(&ctr).await;
        }
        self.cancel_restart(&ctr);
        ctr.update(|r| {
            r.p.restart.reset();
            let st = r.state_mut();
            st.manually_stopped = false;
            st.restart_count = 0;
        });
        self.start_locked(&ctr).await?;
        let rec = ctr.record();
        self.container_event(&rec, "restart", []);
        Ok(())
    }

    /// Freezes a running container.
    pub async fn pause(&self, input: &str) -> Result<()> {
        let ctr = self.get(input)?;
        let _op = ctr.op.lock().await;
        match ctr.with(|r| r.status()) {
            pb::ContainerStatus::Running => {}
            pb::ContainerStatus::Paused => {
                return Err(Error::failed_precondition(format!(
                    "Container {} is already paused",
                    ctr.id
                )));
            }
            _ => {
                return Err(Error::failed_precondition(format!(
                    "Container {} is not running",
                    ctr.id
                )));
            }
        }
        self.task_shim(&ctr).await?.pause().await?;
        ctr.update(|r| r.state_mut().status = pb::ContainerStatus::Paused.into());
        self.persist(&ctr).await?;
        let rec = ctr.record();
        self.container_event(&rec, "pause", []);
        Ok(())
    }

    /// Thaws a paused container.
    pub async fn resume(&self, input: &str) -> Result<()> {
        let ctr = self.get(input)?;
        let _op = ctr.op.lock().await;
        if ctr.with(|r| r.status()) != pb::ContainerStatus::Paused {
            return Err(Error::failed_precondition(format!(
                "Container {} is not paused",
                ctr.id
            )));
        }
        self.task_shim(&ctr).await?.resume().await?;
        ctr.update(|r| r.state_mut().status = pb::ContainerStatus::Running.into());
        self.persist(&ctr).await?;
        let rec = ctr.record();
        self.container_event(&rec, "unpause", []);
        Ok(())
    }

    /// Changes resources (live when running), the restart policy and extensions.
    pub async fn update(
        &self,
        req: pb::UpdateContainerRequest,
    ) -> Result<(pb::Container, Vec<String>)> {
        let ctr = self.get(&req.id)?;
        let _op = ctr.op.lock().await;
        let mut warnings = Vec::new();
        let mut hc = ctr.with(|r| r.host_config().clone());
        if let Some(p) = &req.restart_policy {
            let policy = Policy::from_proto(Some(p))?;
            if hc.auto_remove && !policy.is_none() {
                return Err(Error::invalid_argument(
                    "Restart policy cannot be updated because AutoRemove is enabled for the container",
                ));
            }
            hc.restart_policy = Some(*p);
        }
        if let Some(update) = &req.resources {
            let mut current = hc.resources.clone().unwrap_or_default();
            resources_merge_and_validate(&mut current, update, self)?;
            let running = ctr.with(|r| r.is_running());
            if running {
                let devnum = |p: &str| -> Result<(i64, i64)> {
                    let st = nix::sys::stat::stat(p)
                        .map_err(|e| Error::invalid_argument(format!("stat {p}")).with_source(e))?;
                    Ok((
                        nix::sys::stat::major(st.st_rdev) as i64,
                        nix::sys::stat::minor(st.st_rdev) as i64,
                    ))
                };
                let oci = spec::resources::to_oci(
                    update,
                    self.host_info(),
                    false,
                    &devnum,
                    &mut warnings,
                )?;
                let json = serde_json::to_vec(&oci)
                    .map_err(|e| Error::internal("serialize resources").with_source(e))?;
                self.task_shim(&ctr).await?.update(json).await?;
            }
            hc.resources = Some(current);
        }
        ctr.update(|r| {
            r.c.host_config = Some(hc);
            for (k, v) in &req.set_extensions {
                r.c.extensions.insert(k.clone(), v.clone());
            }
            for k in &req.remove_extensions {
                r.c.extensions.remove(k);
            }
        });
        self.persist(&ctr).await?;
        let rec = ctr.record();
        self.container_event(&rec, "update", []);
        Ok((rec.c, warnings))
    }

    /// Registers a wait and returns the container id and a future of its result
    /// `(status code, error, time)`.
    pub fn wait(
        &self,
        input: &str,
        condition: pb::WaitCondition,
    ) -> Result<(String, impl Future<Output = WaitResult> + use<>)> {
        let ctr = self.get(input)?;
        let mut rx = ctr.exits();
        let start: ExitState = rx.borrow().clone();
        let id = ctr.id.clone();
        let fut = async move {
            let done = |e: &ExitState| match condition {
                pb::WaitCondition::Removed => e.removed,
                pb::WaitCondition::NextExit => e.generation > start.generation || e.removed,
                _ => !e.running || e.generation > start.generation || e.removed,
            };
            let result = match rx.wait_for(done).await {
                Ok(e) => e.clone(),
                // The container is gone with its sender: report what was last seen.
                Err(_) => start.clone(),
            };
            drop(ctr);
            (result.code, result.error, result.at)
        };
        Ok((id, fut))
    }

    /// Removes a container. Running or paused ones need `force` (they are killed).
    pub async fn delete(
        self: &Arc<Self>,
        input: &str,
        force: bool,
        remove_volumes: bool,
    ) -> Result<()> {
        let ctr = self.get(input)?;
        let _op = ctr.op.lock().await;
        if ctr.exits.borrow().removed {
            return Err(Error::not_found(format!("No such container: {input}")));
        }
        let status = ctr.with(|r| r.status());
        if matches!(
            status,
            pb::ContainerStatus::Running | pb::ContainerStatus::Paused
        ) {
            if !force {
                let what = if status == pb::ContainerStatus::Paused {
                    "paused"
                } else {
                    "running"
                };
                return Err(Error::failed_precondition(format!(
                    "You cannot remove a {what} container {}. Stop the container before attempting removal or force remove",
                    ctr.id
                )));
            }
            self.cancel_restart(&ctr);
            ctr.update(|r| r.state_mut().manually_stopped = true);
            let generation = ctr.exits.borrow().generation;
            if let Ok(shim) = self.task_shim(&ctr).await {
                let all = needs_kill_all(&ctr.record());
                let _ = self.signal(&ctr, &shim, libc::SIGKILL, all).await;
                if status == pb::ContainerStatus::Paused {
                    let _ = shim.resume().await;
                }
                if !Self::wait_generation(&ctr, generation, Some(Duration::from_secs(10))).await {
                    tracing::warn!(id = %ctr.id, "no exit after SIGKILL; removing anyway");
                }
            }
            // Record an exit if none was reported, so that the cleanup below proceeds.
            let pid = ctr.with(|r| r.p.task_pid);
            if ctr.with(|r| r.is_running()) {
                self.on_exit(&ctr.id, pid, 137, None).await;
            }
        }
        self.delete_locked(&ctr, remove_volumes).await
    }

    /// Removes a container that is not running. The caller holds the operation lock.
    pub(super) async fn delete_locked(&self, ctr: &Arc<Ctr>, remove_volumes: bool) -> Result<()> {
        self.cancel_restart(ctr);
        ctr.update(|r| r.state_mut().status = pb::ContainerStatus::Removing.into());
        let rec = ctr.record();
        let removed = if rec.p.has_task {
            // The snapshot goes as soon as the shim has unmounted it, while the rest of the
            // task is released.
            self.release_task(ctr, Some(&rec.c.snapshot_key), false)
                .await
        } else {
            self.deps.snapshots.remove(&rec.c.snapshot_key).await
        };
        let rec = ctr.record();
        if let Err(e) = removed {
            ctr.update(|r| {
                let st = r.state_mut();
                st.status = pb::ContainerStatus::Dead.into();
                st.error = e.chain();
            });
            let _ = self.persist(ctr).await;
            return Err(Error::new(
                e.kind(),
                format!("unable to remove filesystem for {}", ctr.id),
            )
            .with_source(e));
        }
        let dir = self.paths.container_dir(&ctr.id);
        let remove_dir = async {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        };
        let drop_user = async {
            if let Err(e) = self.deps.images.remove_user(&rec.c.image_id, &ctr.id).await {
                tracing::warn!(id = %ctr.id, error = %e.chain(), "dropping the image user");
            }
        };
        let (deleted, (), ()) =
            tokio::join!(self.store.delete_container(&ctr.id), remove_dir, drop_user);
        deleted?;
        self.remove_from_registry(&ctr.id);
        self.forget_execs(&ctr.id);
        if remove_volumes {
            for v in &rec.p.anonymous_volumes {
                let users = self.volume_users(v);
                if users.is_empty()
                    && let Err(e) = self.volumes.remove(v, &users).await
                {
                    tracing::warn!(volume = %v, error = %e.chain(), "removing an anonymous volume");
                }
            }
        }
        tracing::info!(id = %ctr.id, "container removed");
        self.container_event(&rec, "destroy", []);
        ctr.exits.send_modify(|e| e.removed = true);
        Ok(())
    }

    /// Removes every stopped container that matches (`until`, `label`, `label!`).
    pub async fn prune(self: &Arc<Self>, filters: &[types::Filter]) -> Result<(Vec<String>, u64)> {
        let args = crate::filters::Args::parse(filters, &["until", "label", "label!"])?;
        let until = match args.values("until").next() {
            Some(v) => Some(super::query::parse_time(v)?),
            None => None,
        };
        let mut deleted = Vec::new();
        let mut reclaimed = 0u64;
        for ctr in self.all() {
            let rec = ctr.record();
            if rec.is_running() || rec.status() == pb::ContainerStatus::Restarting {
                continue;
            }
            let get = |k: &str| rec.labels().get(k).cloned();
            if !args.match_labels("label", get) || !args.match_labels_negated("label!", get) {
                continue;
            }
            if let (Some(until), Some(created)) = (until, rec.c.created.as_ref())
                && ts_to_time(created) >= until
            {
                continue;
            }
            let size = self
                .deps
                .snapshots
                .usage(&rec.c.snapshot_key)
                .await
                .unwrap_or(0);
            let _op = ctr.op.lock().await;
            if ctr.with(|r| r.is_running()) || ctr.exits.borrow().removed {
                continue;
            }
            match self.delete_locked(&ctr, false).await {
                Ok(()) => {
                    deleted.push(ctr.id.clone());
                    reclaimed += size.max(0) as u64;
                }
                Err(e) => tracing::warn!(id = %ctr.id, error = %e.chain(), "prune"),
            }
        }
        Ok((deleted, reclaimed))
    }
}

fn resources_merge_and_validate(
    current: &mut pb::Resources,
    update: &pb::Resources,
    engine: &Engine,
) -> Result<()> {
    spec::resources::merge(current, update);
    spec::resources::validate(current, engine.host_info())
}

/// Whether a SIGKILL must go to every process of the container (`runtime kill --all`, which
/// walks and freezes the cgroup) rather than to its init: only when the container shares
/// another pid namespace. In its own, the kernel kills every process once the init dies
/// (Docker does the same).
fn needs_kill_all(rec: &crate::record::Record) -> bool {
    let mode = rec.host_config().pid_mode.as_str();
    mode == "host" || mode.starts_with("container:")
}

/// Docker's `NetworkSettings.Ports`: every exposed port, with the bindings the network made.
fn ports_status(
    cfg: &pb::ContainerConfig,
    attachments: &[(String, net::Attachment)],
) -> Vec<pb::PortStatus> {
    let mut map: std::collections::BTreeMap<(u32, i32), Vec<pb::HostPortBinding>> =
        std::collections::BTreeMap::new();
    for p in &cfg.exposed_ports {
        map.entry((p.port, normalize_proto(p.protocol)))
            .or_default();
    }
    for (_, a) in attachments {
        for p in &a.ports {
            map.entry((p.container_port, normalize_proto(p.protocol)))
                .or_default()
                .push(pb::HostPortBinding {
                    host_ip: p.host_ip.clone(),
                    host_port: p.host_port,
                });
        }
    }
    map.into_iter()
        .map(|((port, proto), host_bindings)| pb::PortStatus {
            container_port: port,
            protocol: proto,
            host_bindings,
        })
        .collect()
}

fn normalize_proto(p: i32) -> i32 {
    if p == types::Protocol::Unspecified as i32 {
        types::Protocol::Tcp as i32
    } else {
        p
    }
}

/// Devices mapped with `--device`, read from the host.
fn host_devices(mappings: &[pb::DeviceMapping]) -> Result<Vec<Device>> {
    let mut out = Vec::new();
    for d in mappings {
        let st = nix::sys::stat::stat(d.path_on_host.as_str()).map_err(|e| {
            Error::invalid_argument(format!(
                "error gathering device information while adding custom device \"{}\"",
                d.path_on_host
            ))
            .with_source(e)
        })?;
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFCHR => 'c',
            libc::S_IFBLK => 'b',
            _ => {
                return Err(Error::invalid_argument(format!(
                    "error gathering device information while adding custom device \"{}\": not a device node",
                    d.path_on_host
                )));
            }
        };
        out.push(Device {
            path: if d.path_in_container.is_empty() {
                d.path_on_host.clone()
            } else {
                d.path_in_container.clone()
            },
            kind,
            major: nix::sys::stat::major(st.st_rdev) as i64,
            minor: nix::sys::stat::minor(st.st_rdev) as i64,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            permissions: if d.cgroup_permissions.is_empty() {
                "rwm".into()
            } else {
                d.cgroup_permissions.clone()
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_failure_codes() {
        assert_eq!(parse_size("10m"), Some(10 << 20));
        assert_eq!(parse_size("1k"), Some(1024));
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("x"), None);
        assert_eq!(
            start_failure_code("exec: \"nope\": executable file not found in $PATH"),
            127
        );
        assert_eq!(start_failure_code("exec /x: permission denied"), 126);
        assert_eq!(start_failure_code("boom"), 128);
    }
}
