//! Exits: the monitor, OOM notes, restart policies, releasing a finished task.

#[allow(unused_imports)]
use super::*;

impl Engine {
    /// Waits for the init's exit through the shim, and handles it. A shim that goes away is
    /// cleaned up and its recorded exit is used.
    pub(in crate::engine) fn monitor(
        self: &Arc<Self>,
        ctr: Arc<Ctr>,
        shim: Arc<dyn Shim>,
        pid: u32,
    ) {
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
    pub(in crate::engine) async fn on_task_event(self: &Arc<Self>, payload: Payload) {
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
            Payload::TaskHealth(h) => self.on_health(h).await,
            _ => {}
        }
    }

    /// Records an OOM kill of the current run and publishes "oom", once per run.
    pub(in crate::engine) fn note_oom(&self, ctr: &Ctr) {
        if !ctr.oom.swap(true, std::sync::atomic::Ordering::Relaxed) {
            ctr.update(|r| {
                r.state_mut().oom_killed = true;
                self.container_event(r, "oom", []);
            });
        }
    }

    /// Whether the kernel OOM-killed a process in the container's cgroup (it still exists
    /// when the init's exit is reported: the runtime removes it at delete).
    pub(in crate::engine) fn cgroup_oom_killed(&self, rec: &crate::record::Record) -> bool {
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
            // The start is stamped when the runtime call returns, which a quick process can
            // outlive; an exit is never before the start.
            let started = st.started_at.as_ref().map(|t| (t.seconds, t.nanos));
            st.finished_at = Some(match started {
                Some(s) if s > (at.seconds, at.nanos) => st.started_at.unwrap_or(at),
                _ => at,
            });
            st.oom_killed |= oom;
            // Docker goes from running straight to restarting when the policy restarts: the
            // decision is taken here (phase two takes it again, with the same inputs unless
            // a stop, kill or delete came in between) so nothing sees "exited" meanwhile.
            let mut rs = r.p.restart;
            let restarts = restart::should_restart(
                r.restart_policy(),
                &mut rs,
                status as i32,
                r.state().manually_stopped,
                r.ran_for(),
            )
            .is_some();
            if restarts {
                r.state_mut().status = pb::ContainerStatus::Restarting.into();
            }
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
    pub(in crate::engine) async fn after_exit(self: Arc<Self>, ctr: Arc<Ctr>) {
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
        if ctr.with(|r| r.status()) == pb::ContainerStatus::Restarting {
            // Phase one expected a restart that a kill has called off since.
            ctr.update(|r| r.state_mut().status = pb::ContainerStatus::Exited.into());
            let _ = self.persist(&ctr).await;
        }
        if auto_remove && let Err(e) = self.delete_locked(&ctr, true).await {
            tracing::warn!(id = %ctr.id, error = %e.chain(), "auto-remove");
        }
    }

    /// Marks the container restarting and starts it again after `delay`, unless cancelled
    /// (stop, start, delete). The caller holds the operation lock.
    pub(in crate::engine) async fn schedule_restart(
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
        crate::metrics::policy_restart();
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

    pub(in crate::engine) fn cancel_restart(&self, ctr: &Ctr) {
        ctr.restart_cancel.lock().unwrap().cancel();
    }

    /// Releases a finished task's resources: the shim (delete + shutdown), the bundle, network
    /// attachments and the network namespace. The caller holds the operation lock.
    pub(in crate::engine) async fn cleanup_task(&self, ctr: &Ctr) {
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
    pub(in crate::engine) async fn release_task(
        &self,
        ctr: &Ctr,
        snapshot: Option<&str>,
        persist: bool,
    ) -> Result<()> {
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
    pub(in crate::engine) async fn release_shim(
        &self,
        ctr: &Ctr,
        snapshot: Option<&str>,
    ) -> Result<()> {
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
}
