//! Start-up reconciliation: every record that had a task is matched with its shim, in parallel
//! (at most `[engine] reconnect_concurrency` at once). Live tasks are monitored again; exits
//! that happened while the engine was down are taken from the shim, or from the exit file the
//! shim left in the bundle when the shim is gone too, and handled like any exit (die event,
//! restart policy). Shims without a record are shut down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_core::Result;
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::shim::v1 as shimpb;
use futures::StreamExt;

use super::{Ctr, Engine};
use crate::restart;

/// What recovery did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Shims found alive with a running task.
    pub reconnected: usize,
    /// Tasks that had exited while the engine was down.
    pub exited: usize,
    /// Containers started again by their restart policy.
    pub restarted: usize,
    /// Shims without a record that were shut down.
    pub orphans: usize,
    /// How long reconnecting took.
    pub took: Duration,
}

/// How long one shim may take to report its task's state during recovery.
const STATE_TIMEOUT: Duration = Duration::from_secs(3);

enum Outcome {
    Alive,
    Exited,
    Nothing,
}

impl Engine {
    /// Reconciles records with shims. Call once, before serving.
    pub async fn recover(self: &Arc<Self>) -> Result<Recovery> {
        let t0 = Instant::now();
        let mut out = Recovery::default();
        self.recover_sandboxes().await;
        let ctrs = self.all();
        // Restarting as recorded before this start: those restarts were pending when the engine
        // went away. An exit found by the reconcile below is marked restarting by its own phase
        // one, which also schedules the restart (counting it); scheduling it here too would
        // start it twice and lose the count.
        let was_restarting: std::collections::HashSet<String> = ctrs
            .iter()
            .filter(|c| c.with(|r| r.status()) == pb::ContainerStatus::Restarting)
            .map(|c| c.id.clone())
            .collect();
        let limit = self.config.engine.reconnect_concurrency.max(1) as usize;
        let results: Vec<(Arc<Ctr>, Outcome)> = futures::stream::iter(ctrs.clone())
            .map(|ctr| {
                let engine = self.clone();
                async move {
                    let outcome = engine.reconcile_one(&ctr).await;
                    (ctr, outcome)
                }
            })
            .buffer_unordered(limit)
            .collect()
            .await;
        for (_, o) in &results {
            match o {
                Outcome::Alive => out.reconnected += 1,
                Outcome::Exited => out.exited += 1,
                Outcome::Nothing => {}
            }
        }
        out.took = t0.elapsed();

        // Shims nobody owns any more.
        let known: std::collections::HashSet<String> = ctrs.iter().map(|c| c.id.clone()).collect();
        for id in self.deps.shims.list() {
            if known.contains(&id) {
                continue;
            }
            let bundle = self.paths.bundle(&id);
            if let Ok(Some(shim)) = self.deps.shims.connect(&id, &bundle).await {
                let _ = shim.delete("", true).await;
                let _ = shim.shutdown(true).await;
            }
            let _ = self.deps.shims.cleanup(&id, &bundle).await;
            let _ = std::fs::remove_dir_all(&bundle);
            out.orphans += 1;
        }

        // Containers left restarting, or that their policy brings back after the engine (or
        // the host) restarted.
        for ctr in ctrs {
            let rec = ctr.record();
            let status = rec.status();
            let restart_now = status == pb::ContainerStatus::Restarting
                && was_restarting.contains(&ctr.id)
                && !results
                    .iter()
                    .any(|(c, o)| Arc::ptr_eq(c, &ctr) && matches!(o, Outcome::Exited));
            if restart_now {
                let _op = ctr.op.lock().await;
                let rs = rec.p.restart;
                self.schedule_restart(&ctr, rs, restart::INITIAL_DELAY)
                    .await;
                out.restarted += 1;
            }
        }

        // The images service learns every image still in use (repairs missed add/remove).
        let users: Vec<(String, String)> = self
            .all()
            .iter()
            .map(|c| c.with(|r| (r.c.image_id.clone(), r.id().to_string())))
            .filter(|(i, _)| !i.is_empty())
            .collect();
        if let Err(e) = self.deps.images.set_users(users).await {
            tracing::warn!(error = %e.chain(), "reconciling image users");
        }
        tracing::info!(
            reconnected = out.reconnected,
            exited = out.exited,
            restarted = out.restarted,
            orphans = out.orphans,
            took_ms = out.took.as_millis() as u64,
            "reconciled containers with their shims"
        );
        Ok(out)
    }

    async fn reconcile_one(self: &Arc<Self>, ctr: &Arc<Ctr>) -> Outcome {
        let rec = ctr.record();
        if !rec.p.has_task && !rec.is_running() {
            return Outcome::Nothing;
        }
        let bundle = self.paths.bundle(&ctr.id);
        let pid = rec.p.task_pid;
        let shim = self
            .deps
            .shims
            .connect(&ctr.id, &bundle)
            .await
            .ok()
            .flatten();
        if let Some(shim) = shim {
            // A shim that answers its socket but not State must not hold up every other
            // container: keep the task as recorded and let the monitor wait on it.
            let state = match tokio::time::timeout(STATE_TIMEOUT, shim.state("")).await {
                Ok(r) => r,
                Err(_) if rec.is_running() => {
                    tracing::warn!(id = %ctr.id, "shim did not answer State in time; monitoring it");
                    ctr.set_shim(Some(shim.clone()));
                    self.monitor(ctr.clone(), shim, pid);
                    return Outcome::Alive;
                }
                Err(_) => Err(berth_core::Error::unavailable("shim did not answer State")),
            };
            match state {
                Ok(st)
                    if matches!(
                        st.status(),
                        shimpb::TaskStatus::Running
                            | shimpb::TaskStatus::Paused
                            | shimpb::TaskStatus::Pausing
                    ) && rec.is_running() =>
                {
                    ctr.set_shim(Some(shim.clone()));
                    let paused = st.status() != shimpb::TaskStatus::Running;
                    ctr.update(|r| {
                        r.state_mut().status = if paused {
                            pb::ContainerStatus::Paused
                        } else {
                            pb::ContainerStatus::Running
                        }
                        .into();
                    });
                    self.monitor(ctr.clone(), shim, if st.pid != 0 { st.pid } else { pid });
                    return Outcome::Alive;
                }
                Ok(st) if st.status() == shimpb::TaskStatus::Stopped && rec.is_running() => {
                    ctr.set_shim(Some(shim));
                    self.on_exit(&ctr.id, 0, st.exit_status, st.exited_at).await;
                    return Outcome::Exited;
                }
                Ok(_) => {
                    // A task that never ran (created only) or a record that is not running:
                    // release what is left.
                    ctr.set_shim(Some(shim));
                    let _op = ctr.op.lock().await;
                    self.cleanup_task(ctr).await;
                    return Outcome::Nothing;
                }
                Err(e) if e.is(berth_core::ErrorKind::NotFound) => {
                    // The shim answers but its task was deleted: the engine went away between
                    // the shim's Delete and its Shutdown. End it, then clean up as for a shim
                    // that is gone.
                    tracing::info!(id = %ctr.id, "shim without a task; shutting it down");
                    if let Err(e) = shim.shutdown(true).await {
                        tracing::warn!(id = %ctr.id, error = %e.chain(), "shim shutdown");
                    }
                }
                Err(e) => {
                    tracing::warn!(id = %ctr.id, error = %e.chain(), "shim state; treating the shim as gone");
                }
            }
        }
        // The shim is gone: its exit file says how the init ended.
        let dead =
            self.deps
                .shims
                .cleanup(&ctr.id, &bundle)
                .await
                .unwrap_or(crate::deps::DeadExit {
                    status: 255,
                    exited_at: None,
                });
        if rec.is_running() {
            self.on_exit(&ctr.id, 0, dead.status, dead.exited_at.map(Into::into))
                .await;
            return Outcome::Exited;
        }
        let _op = ctr.op.lock().await;
        self.cleanup_task(ctr).await;
        Outcome::Nothing
    }
}
