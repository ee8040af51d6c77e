//! Exec processes: starting them natively or through the runtime, and deleting them.

#[allow(unused_imports)]
use super::*;

impl Shim {
    pub(super) async fn start_exec(&self, exec_id: &str) -> Result<u32> {
        let exec = self.process(exec_id)?;
        let runtime = self.runtime()?;
        if exec.snapshot().status != Status::Created || exec.io().is_some() {
            return Err(Error::failed_precondition(format!(
                "exec {exec_id:?} was already started"
            )));
        }
        let init = self.process("")?.snapshot();
        if init.status != Status::Running {
            return Err(Error::failed_precondition("the container is not running"));
        }
        let process_json = exec_process_json(exec.spec.as_deref().unwrap_or_default(), exec.stdio)?;
        let t0 = std::time::Instant::now();
        let native = self.native_exec(init.pid, &process_json);
        let launched = match &native {
            Some(native) => {
                self.start_native(native, &exec, init.pid, &process_json)
                    .await
            }
            None => {
                self.start_runtime_exec(&runtime, &exec, &process_json)
                    .await
            }
        };
        let (io, pid, exit) = match launched {
            Ok(v) => v,
            Err(err) => {
                // It never ran: release waiters and attachers.
                exec.output.close();
                exec.state.send_modify(|s| {
                    s.status = Status::Stopped;
                    s.exit = Some(Exit {
                        pid: 0,
                        status: 255,
                        at: SystemTime::now(),
                    });
                });
                return Err(err);
            }
        };
        let exit = exit.unwrap_or_else(|| self.inner.spawner.watch(pid));
        exec.io.send_replace(Some(io));
        exec.state.send_modify(|s| {
            s.pid = pid;
            s.status = Status::Running;
        });
        tokio::spawn(self.clone().monitor(exec.clone(), exit));
        self.publish(
            TaskEvent::ExecStarted {
                exec_id: exec_id.to_string(),
                pid,
            },
            SystemTime::now(),
        );
        let micros = t0.elapsed().as_micros() as u64;
        tracing::info!(
            exec_id,
            pid,
            native = native.is_some(),
            micros,
            "exec started"
        );
        Ok(pid)
    }

    /// Native exec for this process, unless it is configured off or does not apply (then the
    /// reason is logged and the runtime runs the exec).
    pub(super) fn native_exec(
        &self,
        init_pid: u32,
        process_json: &[u8],
    ) -> Option<Arc<NativeExec>> {
        if !self.inner.options.native_exec {
            return None;
        }
        let native = self
            .inner
            .native
            .get_or_init(|| {
                let runtime: RuntimeSettings =
                    std::fs::read(self.bundle().join("shim-runtime.json"))
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_else(|| self.inner.options.runtime.clone());
                let name = runtime
                    .binary
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "runc".into());
                // A VM's processes are in the guest: nothing to enter on the host.
                if crate::vm::runtime::selected_by(&runtime.binary) {
                    tracing::info!("berth-vm: exec through the agent");
                    return None;
                }
                match crate::nsexec::Container::load(self.bundle()) {
                    Ok(c) => Some(Arc::new(NativeExec::new(c, self.id(), &name))),
                    Err(err) => {
                        tracing::info!(reason = %err.chain(), "exec through the runtime");
                        None
                    }
                }
            })
            .clone()?;
        match native.check(init_pid, process_json) {
            Ok(()) => Some(native),
            Err(err) => {
                tracing::info!(reason = %err.chain(), "exec through the runtime");
                None
            }
        }
    }

    pub(super) async fn start_native(
        &self,
        native: &NativeExec,
        exec: &Process,
        init_pid: u32,
        process_json: &[u8],
    ) -> Result<(Arc<ProcessIo>, u32, Option<ExitFuture>)> {
        let (pending, child) = stdio::prepare_direct(exec.stdio)?;
        let started = native
            .start(
                self.inner.spawner.as_ref(),
                init_pid,
                process_json,
                child,
                self.inner.options.exec_timeout,
            )
            .await?;
        let io = pending.launch_direct(started.master, exec.output.clone())?;
        Ok((io, started.pid, Some(started.exit)))
    }

    pub(super) async fn start_runtime_exec(
        &self,
        runtime: &Arc<dyn OciRuntime>,
        exec: &Process,
        process_json: &[u8],
    ) -> Result<(Arc<ProcessIo>, u32, Option<ExitFuture>)> {
        let n = self.next();
        let spec_file = self.bundle().join(format!(".exec-{n}.json"));
        let pid_file = self.bundle().join(format!(".exec-{n}.pid"));
        let launched = async {
            std::fs::write(&spec_file, process_json).map_err(|e| {
                Error::internal(format!("write {}", spec_file.display())).with_source(e)
            })?;
            let (pending, child) = stdio::prepare(exec.stdio, &self.console_path())?;
            let run = runtime.exec(
                self.id(),
                ExecOptions {
                    process: spec_file.clone(),
                    pid_file: pid_file.clone(),
                    console_socket: pending.console_socket().map(Path::to_path_buf),
                    stdio: child,
                },
            );
            let io = pending.launch(run, exec.output.clone()).await?;
            Ok::<_, Error>((io, read_pid(&pid_file)?, None))
        }
        .await;
        let _ = std::fs::remove_file(&spec_file);
        let _ = std::fs::remove_file(&pid_file);
        launched
    }

    pub(super) async fn delete_exec(&self, exec_id: &str, force: bool) -> Result<Deleted> {
        let exec = self.process(exec_id)?;
        let s = exec.snapshot();
        if s.status == Status::Running {
            if !force {
                return Err(Error::failed_precondition(format!(
                    "exec {exec_id:?} is running: stop it first or delete with force"
                )));
            }
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(s.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            if tokio::time::timeout(Duration::from_secs(10), exec.wait())
                .await
                .is_err()
            {
                return Err(Error::new(
                    ErrorKind::DeadlineExceeded,
                    "the exec did not exit after SIGKILL",
                ));
            }
        }
        exec.output.close();
        let mut st = self.inner.state.lock().unwrap();
        if let Some(c) = st.container.as_mut() {
            c.execs.remove(exec_id);
        }
        let s = exec.snapshot();
        Ok(Deleted {
            pid: s.pid,
            exit: s.exit,
        })
    }

    /// Registers an exec process (started with [`Shim::start`]).
    pub async fn exec(&self, req: ExecTask) -> Result<()> {
        validate_exec_id(&req.exec_id)?;
        // Fail early on a spec the runtime would reject.
        exec_process_json(&req.spec, req.stdio)?;
        let init = self.process("")?;
        if init.snapshot().status == Status::Stopped {
            return Err(Error::failed_precondition("the container is not running"));
        }
        {
            let mut st = self.inner.state.lock().unwrap();
            let c = st.container.as_mut().ok_or_else(not_created)?;
            if c.execs.contains_key(&req.exec_id) {
                return Err(Error::already_exists(format!(
                    "exec {:?} exists",
                    req.exec_id
                )));
            }
            let output = Output::new(None);
            let p = Process::new(req.exec_id.clone(), req.stdio, Some(req.spec), output);
            c.execs.insert(req.exec_id.clone(), p);
        }
        self.publish(
            TaskEvent::ExecAdded {
                exec_id: req.exec_id,
            },
            SystemTime::now(),
        );
        Ok(())
    }
}

pub(super) fn validate_exec_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_argument(format!(
            "exec id {id:?}: want 1-128 characters of [A-Za-z0-9_.-]"
        )))
    }
}

/// The exec's `process` JSON with its terminal settings made to match its stdio.
pub(super) fn exec_process_json(spec: &[u8], stdio: StdioSpec) -> Result<Vec<u8>> {
    let bad = |why: &str| Error::invalid_argument(format!("exec spec: {why}"));
    let mut v: serde_json::Value =
        serde_json::from_slice(spec).map_err(|e| bad("not valid JSON").with_source(e))?;
    let obj = v.as_object_mut().ok_or_else(|| bad("not a JSON object"))?;
    let has_args = obj
        .get("args")
        .and_then(|a| a.as_array())
        .is_some_and(|a| !a.is_empty());
    if !has_args {
        return Err(bad("no args"));
    }
    obj.insert("terminal".into(), stdio.terminal().into());
    match (stdio.terminal(), stdio.size) {
        (true, Some((w, h))) => {
            obj.insert(
                "consoleSize".into(),
                serde_json::json!({"width": w, "height": h}),
            );
        }
        _ => {
            obj.remove("consoleSize");
        }
    }
    obj.entry("cwd").or_insert_with(|| "/".into());
    obj.entry("user")
        .or_insert_with(|| serde_json::json!({"uid": 0, "gid": 0}));
    serde_json::to_vec(&v).map_err(|e| Error::internal("encode exec spec").with_source(e))
}
