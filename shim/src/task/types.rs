//! The task service's public types: runtime settings, options, requests, states, exit files.

#[allow(unused_imports)]
use super::*;

/// Which OCI runtime to run, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeSettings {
    /// Binary name or path (`runc`, `crun`, `/usr/sbin/runc`).
    pub binary: PathBuf,
    /// Its `--root`; `None` = its default.
    pub root: Option<PathBuf>,
    /// Use the systemd cgroup driver.
    pub systemd_cgroup: bool,
    /// Extra global arguments.
    pub args: Vec<String>,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            binary: "runc".into(),
            root: None,
            systemd_cgroup: false,
            args: Vec::new(),
        }
    }
}

/// Makes the runtime driver for a container.
pub trait RuntimeFactory: Send + Sync + fmt::Debug {
    /// A runtime for `settings` that keeps its per-call files in `bundle`.
    fn runtime(&self, settings: &RuntimeSettings, bundle: &Path) -> Arc<dyn OciRuntime>;
}

/// The runtime drivers: [`crate::vm::runtime::VmRuntime`] or [`crate::inproc::Libcontainer`]
/// when the settings name them, else [`Runc`]
/// (runc, crun, any runc-compatible command line).
#[derive(Debug)]
pub struct RuncFactory {
    /// Spawns the runtime binary.
    pub spawner: Arc<dyn Spawner>,
    /// Longest time any runtime call may take.
    pub timeout: Duration,
}

impl RuntimeFactory for RuncFactory {
    fn runtime(&self, settings: &RuntimeSettings, bundle: &Path) -> Arc<dyn OciRuntime> {
        if crate::vm::runtime::selected_by(&settings.binary) {
            let options = berth_core::vm::VmRuntimeOptions::from_args(&settings.args)
                .unwrap_or_else(|err| {
                    tracing::warn!(reason = %err.chain(), "berth-vm options ignored");
                    Default::default()
                });
            let shim_exe = std::env::current_exe().unwrap_or_else(|_| "berth-shim".into());
            return Arc::new(
                crate::vm::runtime::VmRuntime::new(
                    options,
                    crate::vm::launcher(self.spawner.clone(), shim_exe.clone()),
                    shim_exe,
                    PathBuf::from(crate::vm::runtime::STATE_ROOT),
                    self.timeout,
                )
                .with_bundle(bundle.to_path_buf()),
            );
        }
        if crate::inproc::selected_by(&settings.binary) {
            return Arc::new(crate::inproc::Libcontainer::new(
                settings.root.clone(),
                self.spawner.clone(),
                self.timeout,
            ));
        }
        let config = RuncConfig {
            binary: settings.binary.clone(),
            root: settings.root.clone(),
            systemd_cgroup: settings.systemd_cgroup,
            args: settings.args.clone(),
            log_dir: bundle.to_path_buf(),
            timeout: self.timeout,
        };
        Arc::new(Runc::new(config, self.spawner.clone()))
    }
}

/// Mounts and unmounts a container's rootfs.
pub trait Rootfs: Send + Sync + fmt::Debug {
    /// Performs `mounts` onto `target`.
    fn mount(&self, mounts: &[Mount], target: &Path) -> Result<()>;
    /// Undoes every mount at or below `target`.
    fn unmount(&self, target: &Path) -> Result<()>;
}

/// The host's mounts, through [`berth_core::mount`].
#[derive(Debug, Default, Clone, Copy)]
pub struct HostRootfs;

impl Rootfs for HostRootfs {
    fn mount(&self, mounts: &[Mount], target: &Path) -> Result<()> {
        berth_core::mount::mount_all(mounts, target)
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        berth_core::mount::unmount_all(target)
    }
}

/// What the shim was started with.
#[derive(Debug, Clone)]
pub struct ShimOptions {
    /// Container id.
    pub id: String,
    /// Absolute bundle directory.
    pub bundle: PathBuf,
    /// A directory with short paths, for console sockets (Unix socket paths are limited).
    pub socket_dir: PathBuf,
    /// The runtime used when Create names none.
    pub runtime: RuntimeSettings,
    /// Events endpoint used when Create names none (`unix:///path` or a path).
    pub events_address: Option<String>,
    /// berth namespace used when Create names none.
    pub namespace: String,
    /// Bytes of output buffered for a slow log disk before output is dropped from the log.
    pub log_buffer_bytes: usize,
    /// How long an exit waits for the process' output to drain before it is reported.
    pub exit_drain: Duration,
    /// Start exec processes natively ([`crate::nsexec`]) where possible, else `runtime exec`.
    pub native_exec: bool,
    /// How long a native exec may take.
    pub exec_timeout: Duration,
}

impl ShimOptions {
    /// Defaults for container `id` in `bundle`.
    pub fn new(id: impl Into<String>, bundle: impl Into<PathBuf>) -> Self {
        let bundle = bundle.into();
        Self {
            id: id.into(),
            socket_dir: bundle.clone(),
            bundle,
            runtime: RuntimeSettings::default(),
            events_address: None,
            namespace: "default".into(),
            log_buffer_bytes: 1 << 20,
            exit_drain: Duration::from_secs(2),
            native_exec: true,
            exec_timeout: Duration::from_secs(60),
        }
    }
}

/// How the container's log is written; `format: None` disables it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogSpec {
    /// `None` = no log.
    pub format: Option<LogFormat>,
    /// `None` = `<bundle>/container.log`.
    pub path: Option<PathBuf>,
    /// Rotate before exceeding this size; 0 = never.
    pub max_size: u64,
    /// Files kept, current included.
    pub max_file: u32,
    /// Attributes recorded with every entry.
    pub attrs: std::collections::BTreeMap<String, String>,
}

/// A Create request.
#[derive(Debug, Clone, Default)]
pub struct CreateTask {
    /// Container id ("" = the shim's).
    pub id: String,
    /// Bundle ("" = the shim's).
    pub bundle: PathBuf,
    /// Mounts forming the rootfs; empty = `<bundle>/rootfs` as it is.
    pub rootfs: Vec<Mount>,
    /// Init's stdio.
    pub stdio: StdioSpec,
    /// The log.
    pub log: LogSpec,
    /// The runtime; `None` = the shim's default.
    pub runtime: Option<RuntimeSettings>,
    /// Events endpoint; `None` = the shim's default.
    pub events_address: Option<String>,
    /// Namespace; `None` = the shim's default.
    pub namespace: Option<String>,
    /// Start the init in the same runtime call (`runtime run --detach`).
    pub start: bool,
    /// With `start`: hold the init's output back until this many attaches have subscribed.
    pub hold_output_for: u32,
    /// The healthcheck to run while the init runs.
    pub health: Option<crate::health::HealthConfig>,
}

/// An Exec request.
#[derive(Debug, Clone)]
pub struct ExecTask {
    /// Its id, unique within the container.
    pub exec_id: String,
    /// OCI `process` object as JSON.
    pub spec: Vec<u8>,
    /// Its stdio.
    pub stdio: StdioSpec,
}

/// A process' lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Frozen.
    Paused,
    /// Exited.
    Stopped,
}

/// What State reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessState {
    /// Container id.
    pub id: String,
    /// "" for init.
    pub exec_id: String,
    /// Bundle.
    pub bundle: PathBuf,
    /// Host pid (0 before it exists).
    pub pid: u32,
    /// Lifecycle state.
    pub status: Status,
    /// Has a terminal.
    pub terminal: bool,
    /// Has a stdin.
    pub stdin: bool,
    /// How it ended, once stopped.
    pub exit: Option<Exit>,
}

/// What Delete returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// Host pid (0 if it never ran).
    pub pid: u32,
    /// How it ended (`None` if it never ran).
    pub exit: Option<Exit>,
}

/// Who this shim is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// Container id.
    pub id: String,
    /// Bundle.
    pub bundle: PathBuf,
    /// The shim's pid.
    pub shim_pid: u32,
    /// The init's pid; 0 when not created or deleted.
    pub task_pid: u32,
    /// Shim version.
    pub version: String,
}

/// Attach options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachOptions {
    /// "" = init.
    pub exec_id: String,
    /// Forward this client's data to stdin.
    pub stdin: bool,
    /// Receive stdout.
    pub stdout: bool,
    /// Receive stderr.
    pub stderr: bool,
    /// Replay the log first (init only).
    pub logs: bool,
    /// Stream live output.
    pub stream: bool,
}

/// What an attached client receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachEvent {
    /// Output.
    Output(Chunk),
    /// The end: output complete (or replay done); the exit status when it exited.
    End(Option<u32>),
}

/// What an attached client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachInput {
    /// Stdin bytes.
    Data(Bytes),
    /// New terminal size (width, height).
    Resize(u16, u16),
    /// Close stdin for everyone.
    CloseStdin,
}

/// One attached client.
#[derive(Debug)]
pub struct Attachment {
    /// Whether the process has a terminal.
    pub terminal: bool,
    /// Output, then one [`AttachEvent::End`].
    pub events: mpsc::Receiver<AttachEvent>,
    /// Where the client's input goes.
    pub input: AttachSink,
}

/// The input side of an attachment.
#[derive(Debug, Clone)]
pub struct AttachSink {
    pub(super) process: Arc<Process>,
    pub(super) stdin: bool,
}

impl AttachSink {
    /// Applies one input message.
    pub async fn send(&self, input: AttachInput) -> Result<()> {
        match input {
            AttachInput::Data(data) => {
                if !self.stdin {
                    return Ok(());
                }
                self.process.launched().await?.write_stdin(&data).await
            }
            AttachInput::Resize(w, h) => match self.process.io() {
                Some(io) => io.resize(w, h),
                None => Err(Error::failed_precondition("the process has not started")),
            },
            AttachInput::CloseStdin => {
                self.process.launched().await?.close_stdin().await;
                Ok(())
            }
        }
    }
}

/// How long an exit waits for the log writer to put the process' last output on disk.
pub(super) const LOG_FLUSH_WAIT: Duration = Duration::from_millis(500);

/// The exit status file the shim writes into the bundle before it reports an exit, so that
/// the status survives any daemon (and the shim itself).
pub const EXIT_FILE: &str = "exit.json";

/// The contents of [`EXIT_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Host pid of the init process.
    pub pid: u32,
    /// Exit code or 128 + signal.
    pub exit_status: u32,
    /// RFC 3339 time, nanoseconds, UTC.
    pub exited_at: String,
}

/// Writes `exit` to `<bundle>/exit.json` (write, then rename).
pub fn write_exit_file(bundle: &Path, exit: &Exit) -> Result<()> {
    let record = ExitRecord {
        pid: exit.pid,
        exit_status: exit.status,
        exited_at: rfc3339::format(exit.at),
    };
    let path = bundle.join(EXIT_FILE);
    let tmp = bundle.join(".exit.json.tmp");
    let data =
        serde_json::to_vec(&record).map_err(|e| Error::internal("encode exit").with_source(e))?;
    std::fs::write(&tmp, data)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| Error::internal(format!("write {}", path.display())).with_source(e))
}

/// Reads `<bundle>/exit.json`, if the shim wrote one.
pub fn read_exit_file(bundle: &Path) -> Option<Exit> {
    let data = std::fs::read(bundle.join(EXIT_FILE)).ok()?;
    let r: ExitRecord = serde_json::from_slice(&data).ok()?;
    Some(Exit {
        pid: r.pid,
        status: r.exit_status,
        at: rfc3339::parse(&r.exited_at)?,
    })
}
