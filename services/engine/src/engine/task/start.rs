//! Starting a task: netns, networks, the OCI spec, the shim.

#[allow(unused_imports)]
use super::*;

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
    pub(in crate::engine) async fn start_locked(self: &Arc<Self>, ctr: &Arc<Ctr>) -> Result<u32> {
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
    pub(in crate::engine) async fn undo_partial(&self, ctr: &Ctr, partial: Partial) {
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

    pub(in crate::engine) async fn start_task(
        self: &Arc<Self>,
        ctr: &Arc<Ctr>,
        partial: &mut Partial,
    ) -> Result<u32> {
        let rec = ctr.record();
        let id = rec.id().to_string();
        let hc = rec.host_config().clone();
        let cfg = rec.config().clone();
        let map_now = self
            .container_map(&hc)
            .map(|m| m.fingerprint())
            .unwrap_or_default();
        if rec.p.id_map != map_now {
            let name = |f: &str| {
                if f.is_empty() {
                    "no user namespace map".to_string()
                } else {
                    format!("user namespace map {f}")
                }
            };
            return Err(Error::failed_precondition(format!(
                "the container's filesystem was made for {}, the daemon now has {} (userns-remap changed): remove and recreate the container",
                name(&rec.p.id_map),
                name(&map_now)
            )));
        }
        let bundle = self.paths.bundle(&id);
        let _ = std::fs::remove_dir_all(&bundle);
        std::fs::create_dir_all(bundle.join("rootfs")).map_err(|e| {
            Error::internal(format!("create bundle {}", bundle.display())).with_source(e)
        })?;
        // The shim needs only its bundle directory: it starts while the rootfs, the user, the
        // network and the spec are prepared, and gets the container once they are.
        let early_shim = EarlyShim::spawn(
            self.deps.shims.clone(),
            id.clone(),
            bundle.clone(),
            rec.p.namespace.clone(),
        );

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
            let strict = hc.strict_supplemental_groups;
            tokio::task::spawn_blocking(move || -> Result<crate::user::ResolvedUser> {
                let passwd = crate::rootfs::read_file(&rootfs, "/etc/passwd", &scratch)?;
                let group = crate::rootfs::read_file(&rootfs, "/etc/group", &scratch)?;
                let text = |d: Option<Vec<u8>>| d.map(|d| String::from_utf8_lossy(&d).into_owned());
                let group = text(group);
                let mut user = crate::user::resolve(
                    &spec_user,
                    text(passwd).as_deref(),
                    group.as_deref(),
                    &group_add,
                )?;
                if strict {
                    // Only what was asked for: no memberships from the image's /etc/group.
                    user.additional_gids = crate::user::group_ids(group.as_deref(), &group_add)?;
                }
                Ok(user)
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
        // Legacy links: refused before anything is set up when a linked container is not
        // running; their variables go into the process env, their entries into /etc/hosts.
        let (link_env, link_hosts) = self.link_children(&rec)?;
        let mut settings = pb::NetworkSettings::default();
        let mut network_files = true;
        let sandbox = if hc.sandbox_id.is_empty() {
            None
        } else {
            Some(self.sandbox_join(&hc.sandbox_id, &hc.pid_mode)?)
        };
        let net_ns = if let Some(sj) = &sandbox {
            // The pod's files, as they are now (the kubelet may bind its own over them).
            for f in ["hosts", "resolv.conf"] {
                std::fs::copy(sj.files_dir.join(f), dir.join(f))
                    .map_err(|e| Error::internal(format!("copy the pod's {f}")).with_source(e))?;
            }
            settings.sandbox_key = sj.netns_path.clone();
            sj.network.clone()
        } else {
            match mode.as_str() {
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
                    if self.container_map(&hc).is_some()
                        && target.with(|r| self.container_map(r.host_config()).is_none())
                    {
                        return Err(Error::invalid_argument(format!(
                            "cannot join the network of container {}: it runs in the host's user namespace (--userns=host) and this one does not",
                            target.id
                        )));
                    }
                    for f in ["hosts", "resolv.conf"] {
                        let _ = std::fs::copy(tdir.join(f), dir.join(f));
                    }
                    Namespace::Join(
                        ns.unwrap_or_else(|| PathBuf::from(format!("/proc/{pid}/ns/net"))),
                    )
                }
                "cni" => {
                    return Err(Error::unimplemented(
                        "network mode \"cni\" is not supported by the engine yet",
                    ));
                }
                _ => {
                    let userns = match (self.container_map(&hc), self.shared_userns(&hc)?) {
                        (None, _) => None,
                        (Some(_), Some(other)) => Some(crate::deps::UserNs::Join(other)),
                        (Some(map), None) => Some(crate::deps::UserNs::New(map.clone())),
                    };
                    let ns = self.deps.netns.create(&id, userns).await?;
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
                            crate::engine::network::endpoint_settings(
                                att,
                                rec.c.networks.get(name).cloned(),
                            ),
                        );
                    }
                    settings.ports = ports_status(&cfg, &attachments);
                    let gateway = attachments
                        .iter()
                        .find(|(_, a)| a.default_route)
                        .or(attachments.first())
                        .map(|(_, a)| a.ipv4_gateway.clone())
                        .unwrap_or_default();
                    let mut extra = self.extra_hosts(&hc, &gateway);
                    extra.extend(link_hosts.iter().cloned());
                    let hosts = hostfiles::hosts(&extra, &host_entries);
                    write_atomic(&dir.join("hosts"), hosts.as_bytes())?;
                    let resolv = Resolv::build(&own_dns, &net_dns, &host_resolv, false);
                    write_atomic(&dir.join("resolv.conf"), resolv.render().as_bytes())?;
                    Namespace::Join(ns)
                }
            }
        };
        if sandbox.is_none() && mode.starts_with("container:") {
            network_files = dir.join("hosts").exists();
        }
        write_atomic(
            &dir.join("hostname"),
            format!("{}\n", cfg.hostname).as_bytes(),
        )?;
        if let Some(map) = self.container_map(&hc) {
            // The container's root owns its network files, as root does without a map.
            let (uid, gid) = map.root();
            for f in ["hostname", "hosts", "resolv.conf"] {
                let path = dir.join(f);
                if path.exists() {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(|e| {
                        Error::internal(format!("chown {}", path.display())).with_source(e)
                    })?;
                }
            }
        }

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
        if let Some(shm) = sandbox.as_ref().and_then(|sj| sj.shm.as_ref())
            && !mounts.iter().any(|m| m.destination == "/dev/shm")
        {
            mounts.push(SpecMount {
                destination: "/dev/shm".into(),
                typ: "bind".into(),
                source: shm.display().to_string(),
                options: vec!["rbind".into(), "rprivate".into(), "rw".into()],
            });
        }
        let devices = host_devices(&hc.devices)?;
        let pid_ns = match &sandbox {
            Some(sj) => sj.pid.clone(),
            None => self.join_mode(&hc.pid_mode, "pid")?,
        };
        let ipc_ns = match (&sandbox, hc.ipc_mode.as_str()) {
            (Some(sj), _) => sj.ipc.clone(),
            (None, "host") => Namespace::Host,
            (None, m) if m.starts_with("container:") => self.join_mode(m, "ipc")?,
            _ => Namespace::Private,
        };
        let net_ns_for_user = net_ns.clone();
        // A VM's privileged container is privileged over its guest: the host's device nodes
        // are not the guest's, and berth-vm refuses device nodes (as containerd's
        // `privileged_without_host_devices`, which Kata asks for).
        let vm_host;
        let host = if self.runs_in_vm(&hc) && !self.host_info().devices.is_empty() {
            vm_host = spec::HostInfo {
                devices: Vec::new(),
                ..self.host_info().clone()
            };
            &vm_host
        } else {
            self.host_info()
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
            uts: match &sandbox {
                Some(sj) => sj.uts.clone(),
                None if hc.uts_mode == "host" => Namespace::Host,
                None => Namespace::Private,
            },
            cgroup: match hc.cgroupns_mode.as_str() {
                "private" => Namespace::Private,
                "host" => Namespace::Host,
                _ if self.host_info().cgroup_v2 => Namespace::Private,
                _ => Namespace::Host,
            },
            mounts: &mounts,
            link_env: &link_env,
            devices: &devices,
            cgroup_parent: &self.config.engine.cgroup_parent,
            host,
            userns: self.container_map(&hc),
            userns_path: self.userns_path(&hc, &net_ns_for_user)?,
        };
        let (spec, _warnings) = spec::generate(&input)?;
        if let Some(rt) = hc
            .resources
            .as_ref()
            .and_then(|r| r.cpu_realtime_runtime)
            .filter(|rt| *rt > 0)
            && let Some(path) = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone())
            && self.host_info().cpu_realtime
        {
            spec::resources::ensure_rt_budget(
                Path::new("/sys/fs/cgroup/cpu"),
                &path.display().to_string(),
                rt,
            )?;
        }
        let json = serde_json::to_vec_pretty(&spec)
            .map_err(|e| Error::internal("serialize config.json").with_source(e))?;
        write_atomic(&bundle.join("config.json"), &json)?;

        // The shim and the task.
        let shim = early_shim
            .get()
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
            r.state_mut().health = crate::engine::query::health_at_start(r, pid);
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
            r.c.process_user = Some(pb::ProcessUser {
                uid: user.uid,
                gid: user.gid,
                additional_gids: user.additional_gids.clone(),
            });
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

    pub(in crate::engine) fn extra_hosts(
        &self,
        hc: &pb::HostConfig,
        gateway: &str,
    ) -> Vec<types::HostEntry> {
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

    /// The user namespace a user-namespaced container joins: the one that owns the network
    /// namespace it joins (the engine's, made with it, or that of the container whose network
    /// it shares, as moby does), else that of the container whose IPC or PID namespace it
    /// shares; `None` lets the runtime make one (`--net none`).
    pub(in crate::engine) fn userns_path(
        &self,
        hc: &pb::HostConfig,
        net: &Namespace,
    ) -> Result<Option<PathBuf>> {
        if self.container_map(hc).is_none() {
            return Ok(None);
        }
        let shared = self.shared_userns(hc)?;
        let Namespace::Join(path) = net else {
            return Ok(shared);
        };
        let own = crate::deps::userns_file(path);
        let joined = if own.exists() {
            own
        } else {
            // Another container's network namespace, named by its init: its user namespace.
            let pid = path
                .strip_prefix("/proc")
                .ok()
                .and_then(|p| p.components().next())
                .ok_or_else(|| {
                    Error::internal(format!("no user namespace goes with {}", path.display()))
                })?;
            Path::new("/proc").join(pid).join("ns/user")
        };
        if let Some(other) = shared {
            let ino = |p: &Path| {
                std::fs::metadata(p)
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
                    .ok()
            };
            if ino(&other) != ino(&joined) {
                return Err(Error::invalid_argument(
                    "the containers whose network and IPC or PID namespaces this one shares are in different user namespaces",
                ));
            }
        }
        Ok(Some(joined))
    }

    /// The user namespace of the container whose IPC or PID namespace a user-namespaced
    /// container shares (those belong to it, so this one must be in it too, as in moby).
    pub(in crate::engine) fn shared_userns(&self, hc: &pb::HostConfig) -> Result<Option<PathBuf>> {
        for mode in [hc.ipc_mode.as_str(), hc.pid_mode.as_str()] {
            let Some(other) = mode.strip_prefix("container:") else {
                continue;
            };
            let target = self.get(other)?;
            let (running, pid, remapped) = target.with(|r| {
                (
                    r.is_running(),
                    r.state().pid,
                    self.container_map(r.host_config()).is_some(),
                )
            });
            if !remapped {
                return Err(Error::invalid_argument(format!(
                    "cannot share the namespaces of container {}: it runs in the host's user namespace (--userns=host) and this one does not",
                    target.id
                )));
            }
            if !running {
                return Err(Error::failed_precondition(format!(
                    "cannot join the namespaces of a non running container: {}",
                    target.id
                )));
            }
            return Ok(Some(PathBuf::from(format!("/proc/{pid}/ns/user"))));
        }
        Ok(None)
    }

    pub(in crate::engine) fn join_mode(&self, mode: &str, ns: &str) -> Result<Namespace> {
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
    pub(in crate::engine) async fn attach_networks(
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
                // Default-bridge links are the engine's (env and /etc/hosts); a user network's
                // are answered by its DNS.
                links: ep.links.clone(),
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
    pub(in crate::engine) fn spec_mounts(
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
                        // Made for the container: its root owns it (moby does the same).
                        if let Some(map) = self.container_map(hc) {
                            let (uid, gid) = map.root();
                            std::os::unix::fs::chown(&m.source, Some(uid), Some(gid)).map_err(
                                |e| {
                                    Error::internal(format!("chown bind source {}", m.source))
                                        .with_source(e)
                                },
                            )?;
                        }
                    }
                    let prop = match b.propagation() {
                        pb::Propagation::Unspecified | pb::Propagation::Rprivate => "rprivate",
                        pb::Propagation::Private => "private",
                        pb::Propagation::Shared => "shared",
                        pb::Propagation::Rshared => "rshared",
                        pb::Propagation::Slave => "slave",
                        pb::Propagation::Rslave => "rslave",
                    };
                    let mut options = vec![
                        if b.non_recursive { "bind" } else { "rbind" }.to_string(),
                        ro.into(),
                        prop.into(),
                    ];
                    if m.read_only && b.read_only_force_recursive {
                        // runc makes every submount read-only too (mount_setattr with
                        // AT_RECURSIVE); plain "ro" only covers the top mount.
                        options.push("rro".into());
                    }
                    out.push(SpecMount {
                        destination: m.target.clone(),
                        typ: "bind".into(),
                        source: m.source.clone(),
                        options,
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

    pub(in crate::engine) fn shim_create_request(
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
        let (runtime_name, runtime) = self.runtime_of(hc);
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
            health: crate::imageconfig::healthcheck(cfg),
        }
    }

    /// The runtime a container runs with: its name and its entry in the table (`None` for a
    /// name the table does not have, used as the binary).
    fn runtime_of(
        &self,
        hc: &pb::HostConfig,
    ) -> (String, Option<&berth_core::config::RuntimeConfig>) {
        let name = if hc.runtime.is_empty() {
            self.config.engine.default_runtime()
        } else {
            hc.runtime.clone()
        };
        let entry = self.config.engine.runtimes.get(&name);
        (name, entry)
    }

    /// Whether the container runs in its own VM (the `berth-vm` runtime).
    pub(crate) fn runs_in_vm(&self, hc: &pb::HostConfig) -> bool {
        let (name, entry) = self.runtime_of(hc);
        entry.map_or(name.as_str(), |r| r.path.as_str()) == berth_core::vm::VM_RUNTIME
    }

    /// The `--root` state directory of an OCI runtime.
    pub fn runtime_root(&self, runtime: &str) -> PathBuf {
        self.config.state_dir.join("runtime").join(runtime)
    }
}

/// A shim spawned ahead of the container it will run; one never claimed with
/// [`EarlyShim::get`] (the start failed before it was needed) is shut down.
struct EarlyShim(Option<tokio::task::JoinHandle<Result<Arc<dyn Shim>>>>);

impl EarlyShim {
    fn spawn(
        launcher: Arc<dyn crate::deps::ShimLauncher>,
        id: String,
        bundle: PathBuf,
        namespace: String,
    ) -> Self {
        Self(Some(tokio::spawn(async move {
            launcher.spawn(&id, &bundle, &namespace).await
        })))
    }

    async fn get(mut self) -> Result<Arc<dyn Shim>> {
        let handle = self.0.take().expect("claimed once");
        handle
            .await
            .map_err(|e| Error::internal("shim spawn task").with_source(e))?
    }
}

impl Drop for EarlyShim {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            tokio::spawn(async move {
                if let Ok(Ok(shim)) = handle.await {
                    let _ = shim.shutdown(true).await;
                }
            });
        }
    }
}
