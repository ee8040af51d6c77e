//! Signals, stop, kill, restart, pause/resume, update, wait, delete and prune.

#[allow(unused_imports)]
use super::*;

impl Engine {
    /// Sends `signal` to the init (or every process) and publishes "kill".
    pub(in crate::engine) async fn signal(
        &self,
        ctr: &Ctr,
        shim: &Arc<dyn Shim>,
        signal: i32,
        all: bool,
    ) -> Result<()> {
        let rec = ctr.record();
        self.container_event(&rec, "kill", [("signal".to_string(), signal.to_string())]);
        shim.kill("", signal as u32, all).await
    }

    pub(in crate::engine) fn stop_signal(&self, rec: &crate::record::Record) -> i32 {
        crate::signal::parse(&rec.config().stop_signal).unwrap_or(libc::SIGTERM)
    }

    pub(in crate::engine) async fn wait_generation(
        ctr: &Ctr,
        generation: u64,
        timeout: Option<Duration>,
    ) -> bool {
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

    pub(in crate::engine) async fn stop_locked(
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
        // Taken before the running check: an exit recorded from here on (the record first, then
        // the generation) ends the waits below, one recorded before shows in the check.
        let generation = ctr.exits.borrow().generation;
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
    pub(in crate::engine) async fn task_shim(&self, ctr: &Ctr) -> Result<Arc<dyn Shim>> {
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

    /// Sends a signal (default SIGKILL). With SIGKILL it returns once the exit is recorded, as
    /// Docker's does, so an inspect right after shows it; other signals return at once. A
    /// restarting container is only kept from restarting (Docker sends no signal then).
    pub async fn kill(self: &Arc<Self>, input: &str, signal: &str) -> Result<()> {
        let ctr = self.get(input)?;
        let sig = if signal.is_empty() {
            libc::SIGKILL
        } else {
            crate::signal::parse(signal)?
        };
        let rec = ctr.record();
        if rec.status() == pb::ContainerStatus::Restarting {
            // There is no process to signal: SIGKILL and the stop signal call the restart
            // off, any other signal is accepted and changes nothing (Docker).
            if sig != libc::SIGKILL && sig != self.stop_signal(&rec) {
                return Ok(());
            }
            let _op = ctr.op.lock().await;
            if ctr.with(|r| r.status()) == pb::ContainerStatus::Restarting {
                self.stop_locked(&ctr, "", Some(0)).await?;
                return Ok(());
            }
        }
        let rec = ctr.record();
        if !rec.is_running() {
            return Err(Error::failed_precondition(format!(
                "Cannot kill container: {input}: Container {} is not running",
                ctr.id
            )));
        }
        // Killing with SIGKILL or the stop signal is a stop: no restart follows (Docker).
        if sig == libc::SIGKILL || sig == self.stop_signal(&rec) {
            self.cancel_restart(&ctr);
            ctr.update(|r| r.state_mut().manually_stopped = true);
            self.persist(&ctr).await?;
        }
        let shim = self.task_shim(&ctr).await?;
        let generation = ctr.exits.borrow().generation;
        self.signal(&ctr, &shim, sig, false).await?;
        if rec.status() == pb::ContainerStatus::Paused && sig == libc::SIGKILL {
            let _ = shim.resume().await;
        }
        if sig == libc::SIGKILL && !Self::wait_generation(&ctr, generation, Some(KILL_WAIT)).await {
            return Err(Error::new(
                ErrorKind::DeadlineExceeded,
                format!(
                    "tried to kill container {}, but did not receive an exit event",
                    ctr.id
                ),
            ));
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

    /// Reopens a running container's log file (after the kubelet renamed it).
    pub async fn reopen_log(&self, input: &str) -> Result<()> {
        let ctr = self.get(input)?;
        if !ctr.with(|r| r.is_running()) {
            return Err(Error::failed_precondition(format!(
                "container {} is not running",
                ctr.id
            )));
        }
        let shim = self.task_shim(&ctr).await?;
        shim.reopen_log().await
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
        // Before the status, as in `stop_locked`: an exit recorded after it ends the wait.
        let generation = ctr.exits.borrow().generation;
        let status = ctr.with(|r| r.status());
        if status == pb::ContainerStatus::Restarting {
            if !force {
                return Err(Error::failed_precondition(format!(
                    "cannot remove container \"{input}\": container is restarting: stop the container before removing or force remove"
                )));
            }
            // No restart follows; phase two of the exit (if still to come) finds the record
            // gone.
            self.cancel_restart(&ctr);
            ctr.update(|r| r.state_mut().manually_stopped = true);
        }
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
    pub(in crate::engine) async fn delete_locked(
        &self,
        ctr: &Arc<Ctr>,
        remove_volumes: bool,
    ) -> Result<()> {
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
            Some(v) => Some(crate::engine::query::parse_time(v)?),
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
