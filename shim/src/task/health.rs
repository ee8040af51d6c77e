//! The container's healthcheck: its monitor follows the init (started with it, stopped at its
//! exit), and each probe is an exec process started like any other (natively where possible)
//! but known only here: it has no exec id the engine could list, publishes no exec events and
//! is killed when the probe is abandoned.

#[allow(unused_imports)]
use super::*;
use crate::health::{
    self, HealthConfig, HealthSink, HealthState, LimitedOutput, Probe, ProbeFuture, Prober,
};
use crate::stdio::StdioMode;

/// The healthcheck of the container, kept until the shim exits so that its last results can
/// still be read after the container stopped.
pub(super) struct HealthSlot {
    pub(super) config: HealthConfig,
    pub(super) state: Arc<Mutex<HealthState>>,
    pub(super) stop: CancellationToken,
    /// The init has exited: a start racing with its exit must not start the monitor again.
    pub(super) ended: bool,
    /// When the init started (the start period counts from here); `None` before.
    pub(super) started: Option<tokio::time::Instant>,
}

/// Runs probes through the shim.
struct ShimProber(Shim);

impl Prober for ShimProber {
    fn probe<'a>(&'a self, command: &'a [String], timeout: Duration) -> ProbeFuture<'a> {
        Box::pin(self.0.run_probe(command, timeout))
    }
}

/// Keeps the state in the bundle and publishes status changes and the final state.
struct ShimSink(Shim);

impl HealthSink for ShimSink {
    fn update(&self, state: &HealthState, changed: bool, stopped: bool) {
        if let Err(err) = state.save(self.0.bundle()) {
            tracing::warn!(error = %err.chain(), "record health");
        }
        if changed || stopped {
            self.0.publish(
                TaskEvent::Health {
                    state: state.clone(),
                    changed,
                },
                SystemTime::now(),
            );
        }
    }
}

/// Kills a probe that is abandoned (its future dropped) before it exited.
struct KillOnDrop {
    pid: u32,
    exited: bool,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !self.exited {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Shim {
    /// Keeps the healthcheck of a Create request (before the init may start).
    pub(super) fn set_health(&self, config: Option<HealthConfig>) {
        let slot = config.map(|config| HealthSlot {
            config,
            state: Arc::new(Mutex::new(HealthState::starting(0))),
            stop: CancellationToken::new(),
            ended: false,
            started: None,
        });
        self.inner.state.lock().unwrap().health = slot;
    }

    /// Starts the healthcheck for the init `pid`, which has just started.
    pub(super) fn start_health(&self, pid: u32) {
        self.run_health(Some(pid));
    }

    /// Runs the monitor: from `starting` for a new init (`pid`), or on from the current state
    /// (a resumed container).
    fn run_health(&self, pid: Option<u32>) {
        let (config, state, stop, started) = {
            let mut st = self.inner.state.lock().unwrap();
            let Some(h) = st.health.as_mut().filter(|h| !h.ended) else {
                return;
            };
            h.stop.cancel();
            h.stop = CancellationToken::new();
            match pid {
                Some(pid) => {
                    *h.state.lock().unwrap() = HealthState::starting(pid);
                    h.started = Some(tokio::time::Instant::now());
                }
                None if h.started.is_none() => return,
                None => {}
            }
            let started = h.started.unwrap_or_else(tokio::time::Instant::now);
            (h.config.clone(), h.state.clone(), h.stop.clone(), started)
        };
        let sink = Arc::new(ShimSink(self.clone()));
        if pid.is_some() {
            sink.update(&state.lock().unwrap().clone(), false, false);
        }
        tracing::info!(command = ?config.command, "healthcheck running");
        tokio::spawn(health::monitor(
            config,
            state,
            started,
            Arc::new(ShimProber(self.clone())),
            sink,
            stop,
        ));
    }

    /// Pausing stops the probes; moby then reports the container unhealthy until a probe after
    /// the resume says otherwise.
    pub(super) fn pause_health(&self) {
        if let Some(h) = self.inner.state.lock().unwrap().health.as_ref() {
            h.stop.cancel();
        }
    }

    /// Resuming runs the probes again, on the same start period.
    pub(super) fn resume_health(&self) {
        self.run_health(None);
    }

    /// Stops the healthcheck (the init exited or the container is deleted).
    pub(super) fn stop_health(&self) {
        if let Some(h) = self.inner.state.lock().unwrap().health.as_mut() {
            h.ended = true;
            h.stop.cancel();
        }
    }

    /// The container's health; NOT_FOUND when it has no healthcheck.
    pub fn health(&self) -> Result<HealthState> {
        let st = self.inner.state.lock().unwrap();
        match st.health.as_ref() {
            Some(h) => Ok(h.state.lock().unwrap().clone()),
            None => Err(Error::not_found("the container has no healthcheck")),
        }
    }

    /// Runs one probe: `command` as an exec process of the container with the init's user,
    /// cwd, env and security settings, its stdout and stderr collected, killed after `timeout`.
    async fn run_probe(&self, command: &[String], timeout: Duration) -> Probe {
        let init = match self.process("") {
            Ok(p) => p.snapshot(),
            Err(err) => return Probe::Failed(err.chain()),
        };
        match init.status {
            Status::Running => {}
            // A probe racing with a pause: its monitor is being stopped anyway.
            Status::Paused => return Probe::Skipped,
            _ => return Probe::Failed("container is not running".into()),
        }
        let runtime = match self.runtime() {
            Ok(r) => r,
            Err(err) => return Probe::Failed(err.chain()),
        };
        let stdio = StdioSpec {
            mode: StdioMode::Pipes,
            stdin: false,
            size: None,
        };
        let json = match probe_process_json(self.bundle(), command, stdio) {
            Ok(j) => j,
            Err(err) => return Probe::Failed(err.chain()),
        };
        let output = Output::new(None);
        let Some(mut rx) = output.subscribe(true, true) else {
            return Probe::Failed("probe output closed".into());
        };
        let process = Process::new(format!("health-{}", self.next()), stdio, None, output);
        let launched = match self.native_exec(init.pid, &json) {
            Some(native) => self.start_native(&native, &process, init.pid, &json).await,
            None => self.start_runtime_exec(&runtime, &process, &json).await,
        };
        let (io, pid, exit) = match launched {
            Ok(v) => v,
            Err(err) => {
                process.output.close();
                return Probe::Failed(err.chain());
            }
        };
        let mut guard = KillOnDrop { pid, exited: false };
        let exit = exit.unwrap_or_else(|| self.inner.spawner.watch(pid));
        let mut exit = std::pin::pin!(exit);
        let mut out = LimitedOutput::default();
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut open = true;
        let ended = loop {
            tokio::select! {
                chunk = rx.recv(), if open => match chunk {
                    Some(c) => out.push(&c.data),
                    None => open = false,
                },
                e = &mut exit => break Some(e),
                _ = &mut deadline => break None,
            }
        };
        let probe = match ended {
            Some(exit) => {
                guard.exited = true;
                // What it wrote just before it exited is still in the pipes.
                let drain = async {
                    while open && let Some(c) = rx.recv().await {
                        out.push(&c.data);
                    }
                };
                let _ = tokio::time::timeout(self.inner.options.exit_drain, drain).await;
                match exit {
                    Ok(e) => Probe::Exited {
                        code: e.status as i32,
                        output: out.text(),
                    },
                    Err(err) => Probe::Failed(err.chain()),
                }
            }
            None => {
                drop(guard);
                // Wait for it, so that dying probes do not pile up.
                let _ = tokio::time::timeout(Duration::from_secs(10), &mut exit).await;
                Probe::TimedOut { output: out.text() }
            }
        };
        drop(io);
        process.output.close();
        probe
    }
}

/// The probe's `process`: the init's (user, cwd, env, capabilities, rlimits, ...) with the
/// probe's args and no terminal.
fn probe_process_json(bundle: &Path, command: &[String], stdio: StdioSpec) -> Result<Vec<u8>> {
    let path = bundle.join("config.json");
    let data = std::fs::read(&path)
        .map_err(|e| Error::internal(format!("read {}", path.display())).with_source(e))?;
    let config: serde_json::Value = serde_json::from_slice(&data).map_err(|e| {
        Error::internal(format!("{} is not valid JSON", path.display())).with_source(e)
    })?;
    let mut process = config
        .get("process")
        .cloned()
        .filter(serde_json::Value::is_object)
        .ok_or_else(|| Error::internal("config.json has no process"))?;
    process["args"] = serde_json::json!(command);
    exec::exec_process_json(&serde_json::to_vec(&process).unwrap_or_default(), stdio)
}
