//! Attach and exec: bidirectional stdio between a client and a process in the container,
//! through the container's shim, with Docker's detach keys.

use std::sync::{Arc, Mutex};

use berth_core::{Error, ErrorKind, Id, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::shim::v1 as shimpb;
use berth_proto::berth::types::v1 as types;
use berth_proto::prost_types::Timestamp;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::{Ctr, Engine, now};
use crate::deps::{BoxStream, Shim};

/// What a client sends after its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachInput {
    /// Stdin bytes.
    Data(Vec<u8>),
    /// A new TTY size.
    Resize(types::TerminalSize),
    /// EOF on stdin.
    CloseStdin,
}

/// Docker's default detach sequence.
pub const DEFAULT_DETACH_KEYS: &str = "ctrl-p,ctrl-q";

/// Parses a detach sequence: comma-separated `ctrl-<x>` or single characters.
pub fn parse_detach_keys(spec: &str) -> Result<Vec<u8>> {
    let spec = if spec.is_empty() {
        DEFAULT_DETACH_KEYS
    } else {
        spec
    };
    let invalid = |k: &str| Error::invalid_argument(format!("Invalid detach keys ({k}) provided"));
    let mut out = Vec::new();
    for key in spec.split(',') {
        let k = key.trim();
        if let Some(c) = k.strip_prefix("ctrl-") {
            let b = match c.as_bytes() {
                [b @ b'a'..=b'z'] => b - b'a' + 1,
                [b'@'] => 0,
                [b'['] => 27,
                [b'\\'] => 28,
                [b']'] => 29,
                [b'^'] => 30,
                [b'_'] => 31,
                _ => return Err(invalid(k)),
            };
            out.push(b);
        } else if k.len() == 1 {
            out.push(k.as_bytes()[0]);
        } else {
            return Err(invalid(k));
        }
    }
    Ok(out)
}

/// Scans stdin for the detach sequence, holding back bytes that may be its beginning.
#[derive(Debug)]
pub struct DetachMatcher {
    keys: Vec<u8>,
    held: usize,
}

impl DetachMatcher {
    /// A matcher for `keys`.
    pub fn new(keys: Vec<u8>) -> Self {
        Self { keys, held: 0 }
    }

    /// Feeds `input`; returns the bytes to forward and whether the sequence was typed.
    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.keys.is_empty() {
                out.push(b);
                continue;
            }
            if b == self.keys[self.held] {
                self.held += 1;
                if self.held == self.keys.len() {
                    self.held = 0;
                    return (out, true);
                }
            } else {
                out.extend_from_slice(&self.keys[..self.held]);
                self.held = 0;
                if b == self.keys[0] {
                    self.held = 1;
                } else {
                    out.push(b);
                }
            }
        }
        (out, false)
    }
}

fn attach_request(event: shimpb::attach_request::Event) -> shimpb::AttachRequest {
    shimpb::AttachRequest { event: Some(event) }
}

/// Opens an attach on the shim and waits for its `ready`.
async fn open_shim_attach(
    shim: &Arc<dyn Shim>,
    options: shimpb::AttachOptions,
) -> Result<(
    mpsc::Sender<Result<shimpb::AttachRequest>>,
    BoxStream<shimpb::AttachResponse>,
)> {
    let (tx, rx) = mpsc::channel(32);
    tx.send(Ok(attach_request(shimpb::attach_request::Event::Options(
        options,
    ))))
    .await
    .map_err(|_| Error::internal("attach input closed"))?;
    let mut stream = shim
        .attach(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await?;
    match stream.next().await {
        Some(Ok(shimpb::AttachResponse {
            event: Some(shimpb::attach_response::Event::Ready(_)),
        })) => Ok((tx, stream)),
        Some(Err(e)) => Err(e),
        _ => Err(Error::internal("the shim did not confirm the attach")),
    }
}

/// How a pump ended.
enum PumpEnd {
    /// The process' output ended; with its exit status when the shim said.
    Exited(Option<u32>),
    /// The detach keys were typed.
    Detached,
    /// The client went away.
    ClientGone,
}

/// Moves stdin from the client to the shim and output from the shim to `emit`, until the
/// output ends, the detach keys are typed, or the client goes away.
async fn pump(
    mut input: mpsc::Receiver<AttachInput>,
    shim_in: mpsc::Sender<Result<shimpb::AttachRequest>>,
    mut shim_out: BoxStream<shimpb::AttachResponse>,
    mut detach: Option<DetachMatcher>,
    close_stdin_on_eof: bool,
    emit: impl Fn(types::OutputChunk) -> futures::future::BoxFuture<'static, bool>,
) -> Result<PumpEnd> {
    let mut input_open = true;
    loop {
        tokio::select! {
            msg = input.recv(), if input_open => match msg {
                Some(AttachInput::Data(data)) => {
                    let (data, detached) = match detach.as_mut() {
                        Some(m) => m.feed(&data),
                        None => (data, false),
                    };
                    if !data.is_empty() {
                        let _ = shim_in
                            .send(Ok(attach_request(shimpb::attach_request::Event::Data(data))))
                            .await;
                    }
                    if detached {
                        return Ok(PumpEnd::Detached);
                    }
                }
                Some(AttachInput::Resize(size)) => {
                    let _ = shim_in
                        .send(Ok(attach_request(shimpb::attach_request::Event::Resize(size))))
                        .await;
                }
                Some(AttachInput::CloseStdin) => {
                    let _ = shim_in
                        .send(Ok(attach_request(shimpb::attach_request::Event::CloseStdin(
                            shimpb::CloseStdin {},
                        ))))
                        .await;
                }
                None => {
                    input_open = false;
                    if close_stdin_on_eof {
                        let _ = shim_in
                            .send(Ok(attach_request(shimpb::attach_request::Event::CloseStdin(
                                shimpb::CloseStdin {},
                            ))))
                            .await;
                    }
                }
            },
            out = shim_out.next() => match out {
                Some(Ok(shimpb::AttachResponse { event: Some(ev) })) => match ev {
                    shimpb::attach_response::Event::Output(chunk) => {
                        if !emit(chunk).await {
                            return Ok(PumpEnd::ClientGone);
                        }
                    }
                    shimpb::attach_response::Event::End(end) => {
                        return Ok(PumpEnd::Exited(end.exit_status));
                    }
                    shimpb::attach_response::Event::Ready(_) => {}
                },
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(PumpEnd::Exited(None)),
            },
        }
    }
}

/// An exec instance.
pub struct ExecInstance {
    /// 64 hex.
    pub id: String,
    /// The container.
    pub container_id: String,
    /// What was asked.
    pub req: pb::ExecCreateRequest,
    created_at: Timestamp,
    state: Mutex<ExecState>,
    done: watch::Sender<bool>,
}

impl std::fmt::Debug for ExecInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecInstance")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default)]
struct ExecState {
    started: bool,
    running: bool,
    pid: u32,
    exit_code: Option<i32>,
    started_at: Option<Timestamp>,
    exited_at: Option<Timestamp>,
}

/// The message and exit code of an exec that could not start, as Docker reports them: the
/// runtime's error as containerd wraps it (`OCI runtime exec failed: ...: unknown`), 127 for a
/// command that is not there, 126 otherwise (not executable, a directory, anything else).
pub fn exec_failure(chain: &str) -> (String, i32) {
    // The shim names the runtime first ("runc exec: exec failed: ..."); Docker shows runc's own
    // words after containerd's prefix.
    let runtime_words = chain.find("exec failed: ").map_or(chain, |i| &chain[i..]);
    let message = format!("OCI runtime exec failed: {runtime_words}: unknown");
    let m = chain.to_ascii_lowercase();
    let code = if m.contains("permission denied") || m.contains("is a directory") {
        126
    } else if m.contains("executable file not found")
        || m.contains("no such file or directory")
        || m.contains("not a directory")
    {
        127
    } else {
        126
    };
    (message, code)
}

fn cmd_string(cmd: &[String]) -> String {
    cmd.join(" ")
}

type Out<T> = mpsc::Sender<std::result::Result<T, tonic::Status>>;

impl Engine {
    /// Checks an attach request; returns the container.
    pub fn prepare_attach(&self, opts: &pb::AttachOptions) -> Result<Arc<Ctr>> {
        parse_detach_keys(&opts.detach_keys)?;
        self.get(&opts.id)
    }

    /// Runs an attach until the output ends, the client detaches or goes away.
    pub async fn run_attach(
        self: Arc<Self>,
        ctr: Arc<Ctr>,
        opts: pb::AttachOptions,
        input: mpsc::Receiver<AttachInput>,
        out: Out<pb::AttachTaskResponse>,
    ) {
        use pb::attach_task_response::Event;
        let send = |out: &Out<pb::AttachTaskResponse>, ev: Event| {
            let out = out.clone();
            async move {
                out.send(Ok(pb::AttachTaskResponse { event: Some(ev) }))
                    .await
                    .is_ok()
            }
        };
        let rec = ctr.record();
        let tty = rec.config().tty;
        let ready = Event::Ready(pb::AttachReady {
            container_id: ctr.id.clone(),
            tty,
        });
        let detach = if opts.stdin {
            parse_detach_keys(&opts.detach_keys)
                .ok()
                .map(DetachMatcher::new)
        } else {
            None
        };
        let shim_opts = |logs: bool| shimpb::AttachOptions {
            exec_id: String::new(),
            stdin: opts.stdin,
            stdout: opts.stdout,
            stderr: opts.stderr,
            logs,
            stream: opts.stream,
        };

        self.container_event(&rec, "attach", []);
        let (shim_in, shim_out) = if rec.is_running() && rec.p.has_task {
            let shim = match self.task_shim(&ctr).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = out.send(Err(e.into())).await;
                    return;
                }
            };
            match open_shim_attach(&shim, shim_opts(opts.logs)).await {
                Ok(x) => {
                    if !send(&out, ready).await {
                        return;
                    }
                    x
                }
                Err(e) => {
                    let _ = out.send(Err(e.into())).await;
                    return;
                }
            }
        } else {
            // Not running: replay the log, then wait for the next start.
            if opts.logs {
                let req = pb::LogsRequest {
                    id: ctr.id.clone(),
                    stdout: opts.stdout,
                    stderr: opts.stderr,
                    ..Default::default()
                };
                let path = std::path::PathBuf::from(&rec.c.log_path);
                let entries =
                    tokio::task::spawn_blocking(move || crate::logs::read_json_logs(&path, &req))
                        .await
                        .ok()
                        .and_then(|r| r.ok())
                        .unwrap_or_default();
                if !send(&out, ready.clone()).await {
                    return;
                }
                for e in entries {
                    let chunk = types::OutputChunk {
                        stream: e.stream,
                        data: e.data,
                    };
                    if !send(&out, Event::Output(chunk)).await {
                        return;
                    }
                }
            } else if !send(&out, ready.clone()).await {
                return;
            }
            if !opts.stream {
                let _ = send(
                    &out,
                    Event::End(pb::AttachEnd {
                        reason: pb::AttachEndReason::ReplayDone.into(),
                    }),
                )
                .await;
                return;
            }
            let (tx, rx) = oneshot::channel();
            ctr.pending_attach.lock().unwrap().push(tx);
            let mut exits = ctr.exits();
            let handoff = tokio::select! {
                h = rx => h.ok(),
                _ = out.closed() => None,
                _ = exits.wait_for(|e| e.removed) => None,
            };
            let Some((shim, ack)) = handoff else { return };
            let opened = open_shim_attach(&shim, shim_opts(false)).await;
            let _ = ack.send(());
            match opened {
                Ok(x) => x,
                Err(e) => {
                    let _ = out.send(Err(e.into())).await;
                    return;
                }
            }
        };

        let out2 = out.clone();
        let emit = move |chunk: types::OutputChunk| -> futures::future::BoxFuture<'static, bool> {
            let out = out2.clone();
            Box::pin(async move {
                out.send(Ok(pb::AttachTaskResponse {
                    event: Some(Event::Output(chunk)),
                }))
                .await
                .is_ok()
            })
        };
        let stdin_once = rec.config().stdin_once && opts.stdin;
        let end = pump(input, shim_in, shim_out, detach, stdin_once, emit).await;
        let reason = match end {
            Ok(PumpEnd::Exited(_)) => pb::AttachEndReason::Exited,
            Ok(PumpEnd::Detached) => {
                let rec = ctr.record();
                self.container_event(&rec, "detach", []);
                pb::AttachEndReason::Detached
            }
            Ok(PumpEnd::ClientGone) => return,
            Err(e) => {
                let _ = out.send(Err(e.into())).await;
                return;
            }
        };
        let _ = send(
            &out,
            Event::End(pb::AttachEnd {
                reason: reason.into(),
            }),
        )
        .await;
    }

    /// Registers an exec instance; publishes `exec_create: <cmd>`.
    pub fn exec_create(&self, req: pb::ExecCreateRequest) -> Result<String> {
        let ctr = self.get(&req.id)?;
        let rec = ctr.record();
        match rec.status() {
            pb::ContainerStatus::Running => {}
            pb::ContainerStatus::Paused => {
                return Err(Error::failed_precondition(format!(
                    "Container {} is paused, unpause the container before exec",
                    ctr.id
                )));
            }
            pb::ContainerStatus::Restarting => {
                return Err(Error::failed_precondition(format!(
                    "Container {} is restarting, wait until the container is running",
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
        if req.cmd.is_empty() {
            return Err(Error::invalid_argument("No exec command specified"));
        }
        if !req.detach_keys.is_empty() && parse_detach_keys(&req.detach_keys).is_err() {
            // Docker's wording for an exec (attach says "detach keys").
            return Err(Error::invalid_argument(format!(
                "Invalid escape keys ({}) provided",
                req.detach_keys
            )));
        }
        let id = Id::random().to_string();
        let inst = Arc::new(ExecInstance {
            id: id.clone(),
            container_id: ctr.id.clone(),
            req: pb::ExecCreateRequest {
                id: ctr.id.clone(),
                ..req
            },
            created_at: now(),
            state: Mutex::new(ExecState::default()),
            done: watch::Sender::new(false),
        });
        let action = format!("exec_create: {}", cmd_string(&inst.req.cmd));
        self.execs.lock().unwrap().insert(id.clone(), inst);
        self.container_event(&rec, &action, [("execID".to_string(), id.clone())]);
        Ok(id)
    }

    fn exec(&self, id: &str) -> Result<Arc<ExecInstance>> {
        self.execs
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("No such exec instance: {id}")))
    }

    pub(super) fn exec_ids(&self, container_id: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .execs
            .lock()
            .unwrap()
            .values()
            .filter(|e| e.container_id == container_id)
            .map(|e| e.id.clone())
            .collect();
        v.sort();
        v
    }

    pub(super) fn forget_execs(&self, container_id: &str) {
        self.execs
            .lock()
            .unwrap()
            .retain(|_, e| e.container_id != container_id);
    }

    /// Records an exec's exit once and publishes "exec_die".
    pub(super) fn on_exec_exit(
        &self,
        container_id: &str,
        exec_id: &str,
        status: u32,
        at: Option<Timestamp>,
    ) {
        let Ok(inst) = self.exec(exec_id) else { return };
        if inst.container_id != container_id {
            return;
        }
        self.finish_exec(&inst, status as i32, at);
    }

    fn finish_exec(&self, inst: &ExecInstance, code: i32, at: Option<Timestamp>) {
        {
            let mut st = inst.state.lock().unwrap();
            if st.exit_code.is_some() {
                return;
            }
            st.exit_code = Some(code);
            st.running = false;
            st.exited_at = Some(at.unwrap_or_else(now));
            st.pid = 0;
        }
        inst.done.send_replace(true);
        if let Ok(ctr) = self.get(&inst.container_id) {
            let rec = ctr.record();
            self.container_event(
                &rec,
                "exec_die",
                [
                    ("execID".to_string(), inst.id.clone()),
                    ("exitCode".to_string(), code.to_string()),
                ],
            );
        }
    }

    /// What `docker exec inspect` shows.
    pub fn exec_inspect(&self, id: &str) -> Result<pb::ExecInspectResponse> {
        let inst = self.exec(id)?;
        let st = inst.state.lock().unwrap().clone();
        let r = &inst.req;
        let (entrypoint, arguments) = match r.cmd.split_first() {
            Some((e, a)) => (e.clone(), a.to_vec()),
            None => (String::new(), Vec::new()),
        };
        Ok(pb::ExecInspectResponse {
            exec_id: inst.id.clone(),
            container_id: inst.container_id.clone(),
            running: st.running,
            exit_code: st.exit_code,
            pid: st.pid as i32,
            process_config: Some(pb::ExecProcessConfig {
                entrypoint,
                arguments,
                tty: r.tty,
                privileged: r.privileged,
                user: r.user.clone(),
                working_dir: r.working_dir.clone(),
                env: r.env.clone(),
            }),
            open_stdin: r.attach_stdin,
            open_stdout: r.attach_stdout,
            open_stderr: r.attach_stderr,
            can_remove: st.exit_code.is_some(),
            detach_keys: r.detach_keys.clone(),
            created_at: Some(inst.created_at),
            started_at: st.started_at,
            exited_at: st.exited_at,
        })
    }

    /// Resizes an exec's TTY.
    pub async fn exec_resize(&self, id: &str, size: types::TerminalSize) -> Result<()> {
        let inst = self.exec(id)?;
        let ctr = self.get(&inst.container_id)?;
        self.task_shim(&ctr).await?.resize(id, size).await
    }

    /// Resizes the init's TTY; publishes "resize".
    pub async fn resize(&self, input: &str, size: types::TerminalSize) -> Result<()> {
        let ctr = self.get(input)?;
        if !ctr.with(|r| r.is_running()) {
            return Err(Error::failed_precondition(format!(
                "Container {} is not running",
                ctr.id
            )));
        }
        self.task_shim(&ctr).await?.resize("", size).await?;
        let rec = ctr.record();
        self.container_event(
            &rec,
            "resize",
            [
                ("height".to_string(), size.height.to_string()),
                ("width".to_string(), size.width.to_string()),
            ],
        );
        Ok(())
    }

    /// Checks an exec start and claims the instance.
    pub fn prepare_exec_start(
        &self,
        opts: &pb::ExecStartOptions,
    ) -> Result<(Arc<ExecInstance>, Arc<Ctr>)> {
        let inst = self.exec(&opts.exec_id)?;
        let ctr = self.get(&inst.container_id)?;
        if !ctr.with(|r| r.is_running()) {
            return Err(Error::failed_precondition(format!(
                "Container {} is not running",
                ctr.id
            )));
        }
        let mut st = inst.state.lock().unwrap();
        if st.started {
            return Err(Error::failed_precondition(format!(
                "Error: Exec command {} has already run",
                inst.id
            )));
        }
        st.started = true;
        drop(st);
        Ok((inst, ctr))
    }

    /// Runs a claimed exec instance, streaming `started`, output and `end` to `out`.
    pub async fn run_exec(
        self: Arc<Self>,
        inst: Arc<ExecInstance>,
        ctr: Arc<Ctr>,
        opts: pb::ExecStartOptions,
        input: mpsc::Receiver<AttachInput>,
        out: Out<pb::ExecStartResponse>,
    ) {
        if let Err(e) = self
            .clone()
            .run_exec_inner(inst.clone(), ctr.clone(), opts, input, out.clone())
            .await
        {
            tracing::debug!(exec = %inst.id, error = %e.chain(), "exec failed");
            let started = inst.state.lock().unwrap().pid != 0;
            if started {
                let _ = out.send(Err(e.into())).await;
                return;
            }
            // An exec that never ran is finished with Docker's "cannot run" code, and the
            // client is told in the stream, as Docker does, rather than by a failed call.
            let (message, code) = exec_failure(&e.chain());
            self.finish_exec(&inst, code, None);
            if let Ok(shim) = self.task_shim(&ctr).await {
                let _ = shim.delete(&inst.id, true).await;
            }
            let failed = pb::exec_start_response::Event::Failed(pb::ExecFailed {
                message,
                exit_code: code,
            });
            let _ = out
                .send(Ok(pb::ExecStartResponse {
                    event: Some(failed),
                }))
                .await;
        }
    }

    async fn run_exec_inner(
        self: Arc<Self>,
        inst: Arc<ExecInstance>,
        ctr: Arc<Ctr>,
        opts: pb::ExecStartOptions,
        input: mpsc::Receiver<AttachInput>,
        out: Out<pb::ExecStartResponse>,
    ) -> Result<()> {
        use pb::exec_start_response::Event;
        let r = &inst.req;
        // The pty is the create's decision; a start's Tty only picks the framing (Docker).
        let tty = r.tty;
        let shim = self.task_shim(&ctr).await?;
        let bundle = self.paths.bundle(&ctr.id);
        let spec_bytes = std::fs::read(bundle.join("config.json"))
            .map_err(|e| Error::internal("read the container's config.json").with_source(e))?;
        let spec: oci_spec::runtime::Spec = serde_json::from_slice(&spec_bytes)
            .map_err(|e| Error::internal("parse the container's config.json").with_source(e))?;
        let user = if r.user.is_empty() {
            None
        } else {
            let key = ctr.with(|r| r.c.snapshot_key.clone());
            let rootfs = self.deps.snapshots.mounts(&key).await?;
            let scratch = self.paths.scratch.clone();
            let spec_user = r.user.clone();
            Some(
                tokio::task::spawn_blocking(move || -> Result<crate::user::ResolvedUser> {
                    let text = |p: &str| -> Result<Option<String>> {
                        Ok(crate::rootfs::read_file(&rootfs, p, &scratch)?
                            .map(|d| String::from_utf8_lossy(&d).into_owned()))
                    };
                    crate::user::resolve(
                        &spec_user,
                        text("/etc/passwd")?.as_deref(),
                        text("/etc/group")?.as_deref(),
                        &[],
                    )
                })
                .await
                .map_err(|e| Error::internal("user lookup").with_source(e))??,
            )
        };
        let process = crate::spec::exec_process(
            &spec,
            r.cmd.clone(),
            &r.env,
            user.as_ref(),
            &r.working_dir,
            tty,
            r.privileged,
        )?;
        let process_json = serde_json::to_vec(&process)
            .map_err(|e| Error::internal("serialize the exec process").with_source(e))?;
        let size = opts.console_size.or(r.console_size);
        shim.exec(shimpb::ExecRequest {
            exec_id: inst.id.clone(),
            spec: process_json,
            terminal: tty,
            stdin: r.attach_stdin && !opts.detach,
            terminal_size: size,
        })
        .await?;
        let attached = if opts.detach {
            None
        } else {
            Some(
                open_shim_attach(
                    &shim,
                    shimpb::AttachOptions {
                        exec_id: inst.id.clone(),
                        stdin: r.attach_stdin,
                        stdout: r.attach_stdout,
                        stderr: r.attach_stderr,
                        logs: false,
                        stream: true,
                    },
                )
                .await?,
            )
        };
        let pid = shim.start(&inst.id).await?;
        {
            let mut st = inst.state.lock().unwrap();
            st.running = true;
            st.pid = pid;
            st.started_at = Some(now());
        }
        let rec = ctr.record();
        self.container_event(
            &rec,
            &format!("exec_start: {}", cmd_string(&r.cmd)),
            [("execID".to_string(), inst.id.clone())],
        );
        let _ = out
            .send(Ok(pb::ExecStartResponse {
                event: Some(Event::Started(pb::ExecStarted {
                    pid: pid as i32,
                    tty,
                })),
            }))
            .await;

        let Some((shim_in, shim_out)) = attached else {
            // Detached: wait in the background, then forget the process in the shim.
            let engine = self.clone();
            tokio::spawn(async move {
                let w = shim.wait(&inst.id).await;
                let (code, at) = match w {
                    Ok(w) => (w.exit_status as i32, w.exited_at),
                    Err(_) => (255, None),
                };
                engine.finish_exec(&inst, code, at);
                let _ = shim.delete(&inst.id, true).await;
            });
            return Ok(());
        };
        let detach = if r.attach_stdin {
            Some(DetachMatcher::new(parse_detach_keys(&r.detach_keys)?))
        } else {
            None
        };
        let out2 = out.clone();
        let emit = move |chunk: types::OutputChunk| -> futures::future::BoxFuture<'static, bool> {
            let out = out2.clone();
            Box::pin(async move {
                out.send(Ok(pb::ExecStartResponse {
                    event: Some(Event::Output(chunk)),
                }))
                .await
                .is_ok()
            })
        };
        let end = pump(input, shim_in, shim_out, detach, r.attach_stdin, emit).await?;
        let (code, detached) = match end {
            PumpEnd::Exited(status) => {
                let (code, at) = match status {
                    Some(s) => (s as i32, None),
                    None => match shim.wait(&inst.id).await {
                        Ok(w) => (w.exit_status as i32, w.exited_at),
                        Err(e) if e.is(ErrorKind::NotFound) => {
                            (inst.state.lock().unwrap().exit_code.unwrap_or(255), None)
                        }
                        Err(e) => return Err(e),
                    },
                };
                self.finish_exec(&inst, code, at);
                let _ = shim.delete(&inst.id, true).await;
                (code, false)
            }
            PumpEnd::Detached => {
                self.container_event(
                    &ctr.record(),
                    "exec_detach",
                    [("execID".to_string(), inst.id.clone())],
                );
                let engine = self.clone();
                let inst2 = inst.clone();
                let shim2 = shim.clone();
                tokio::spawn(async move {
                    if let Ok(w) = shim2.wait(&inst2.id).await {
                        engine.finish_exec(&inst2, w.exit_status as i32, w.exited_at);
                    }
                    let _ = shim2.delete(&inst2.id, true).await;
                });
                (0, true)
            }
            PumpEnd::ClientGone => return Ok(()),
        };
        let _ = out
            .send(Ok(pb::ExecStartResponse {
                event: Some(Event::End(pb::ExecEnd {
                    exit_code: code,
                    detached,
                })),
            }))
            .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_keys_parse_like_docker() {
        assert_eq!(parse_detach_keys("").unwrap(), [16, 17]);
        assert_eq!(parse_detach_keys("ctrl-a,x").unwrap(), [1, b'x']);
        assert_eq!(parse_detach_keys("ctrl-@,ctrl-[").unwrap(), [0, 27]);
        assert!(parse_detach_keys("ctrl-1").is_err());
        assert!(parse_detach_keys("abc").is_err());
    }

    #[test]
    fn exec_failures_read_like_dockers() {
        let (msg, code) = exec_failure(
            "runc exec: exec failed: unable to start container process: exec: \"nope\": executable file not found in $PATH",
        );
        assert_eq!(
            msg,
            "OCI runtime exec failed: exec failed: unable to start container process: exec: \"nope\": executable file not found in $PATH: unknown"
        );
        assert_eq!(code, 127);
        let (_, code) = exec_failure(
            "runc exec: exec failed: unable to start container process: exec: \"/etc/passwd\": permission denied",
        );
        assert_eq!(code, 126);
        assert_eq!(exec_failure("exec: \"/\": is a directory").1, 126);
        assert_eq!(exec_failure("read the container's config.json").1, 126);
    }

    #[test]
    fn matcher_holds_back_prefixes_and_flushes_mismatches() {
        let mut m = DetachMatcher::new(vec![16, 17]);
        assert_eq!(m.feed(b"ab"), (b"ab".to_vec(), false));
        assert_eq!(m.feed(&[16]), (vec![], false));
        assert_eq!(m.feed(b"c"), (vec![16, b'c'], false));
        assert_eq!(m.feed(&[16, 16, 17, b'z']), (vec![16], true));
        let mut m = DetachMatcher::new(vec![]);
        assert_eq!(m.feed(&[16, 17]), (vec![16, 17], false));
    }
}
