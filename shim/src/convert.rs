//! Conversions between the wire types of `berth.shim.v1` / `berth.events.v1` and the shim's
//! domain types. A missing or malformed wire field is `InvalidArgument`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_core::{Error, Result};
use berth_proto::berth::events::v1 as ev;
use berth_proto::berth::shim::v1 as pb;
use berth_proto::berth::types::v1 as types;
use berth_proto::prost_types::Timestamp;

use crate::events::{Envelope, TaskEvent};
use crate::health::{HealthConfig, HealthState, HealthStatus};
use crate::logger::{LogFormat, Stream};
use crate::logreader::{LogEntry, ReadOptions};
use crate::reaper::Exit;
use crate::stdio::{Chunk, StdioMode, StdioSpec};
use crate::task::{
    AttachEvent, AttachInput, AttachOptions, CreateTask, Deleted, ExecTask, Info, LogSpec,
    ProcessState, RuntimeSettings, Status,
};

/// A protobuf timestamp for `t`.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The time a protobuf timestamp stands for (times before 1970 are invalid here).
pub fn system_time(ts: &Timestamp) -> Result<SystemTime> {
    let secs = u64::try_from(ts.seconds).map_err(|_| {
        Error::invalid_argument(format!("timestamp {}s is before 1970", ts.seconds))
    })?;
    let nanos = u32::try_from(ts.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| {
            Error::invalid_argument(format!("timestamp nanos {} out of range", ts.nanos))
        })?;
    Ok(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// A terminal size as (width, height).
pub fn terminal_size(s: &types::TerminalSize) -> Result<(u16, u16)> {
    let w =
        u16::try_from(s.width).map_err(|_| Error::invalid_argument("terminal width too large"))?;
    let h = u16::try_from(s.height)
        .map_err(|_| Error::invalid_argument("terminal height too large"))?;
    Ok((w, h))
}

impl TryFrom<pb::Stdio> for StdioSpec {
    type Error = Error;

    fn try_from(s: pb::Stdio) -> Result<Self> {
        let mode = match pb::StdioMode::try_from(s.mode) {
            Ok(pb::StdioMode::Unspecified | pb::StdioMode::None) => StdioMode::None,
            Ok(pb::StdioMode::Pipes) => StdioMode::Pipes,
            Ok(pb::StdioMode::Tty) => StdioMode::Tty,
            Err(_) => {
                return Err(Error::invalid_argument(format!(
                    "unknown stdio mode {}",
                    s.mode
                )));
            }
        };
        let size = s
            .terminal_size
            .as_ref()
            .map(terminal_size)
            .transpose()?
            .filter(|(w, h)| *w > 0 && *h > 0);
        Ok(Self {
            mode,
            stdin: s.stdin && mode != StdioMode::None,
            size,
        })
    }
}

impl TryFrom<pb::LogConfig> for LogSpec {
    type Error = Error;

    fn try_from(l: pb::LogConfig) -> Result<Self> {
        let format = match pb::LogFormat::try_from(l.format) {
            Ok(pb::LogFormat::Unspecified | pb::LogFormat::JsonFile) => Some(LogFormat::JsonFile),
            Ok(pb::LogFormat::Cri) => Some(LogFormat::Cri),
            Ok(pb::LogFormat::None) => None,
            Err(_) => {
                return Err(Error::invalid_argument(format!(
                    "unknown log format {}",
                    l.format
                )));
            }
        };
        let max_size = u64::try_from(l.max_size).map_err(|_| {
            Error::invalid_argument(format!("log max_size {} is negative", l.max_size))
        })?;
        let max_file = u32::try_from(l.max_file.max(1)).unwrap_or(1);
        let path = (!l.path.is_empty()).then(|| PathBuf::from(&l.path));
        if path.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(Error::invalid_argument(format!(
                "log path {:?} is not absolute",
                l.path
            )));
        }
        Ok(Self {
            format,
            path,
            max_size,
            max_file,
            attrs: l.attrs.into_iter().collect(),
        })
    }
}

impl From<pb::RuntimeConfig> for RuntimeSettings {
    fn from(r: pb::RuntimeConfig) -> Self {
        Self {
            binary: PathBuf::from(r.binary),
            root: (!r.root.is_empty()).then(|| PathBuf::from(r.root)),
            systemd_cgroup: r.systemd_cgroup,
            args: r.args,
        }
    }
}

/// A containerd mount as berth-core's.
pub fn mount(m: berth_proto::containerd::types::Mount) -> berth_core::mount::Mount {
    berth_core::mount::Mount {
        fstype: m.r#type,
        source: m.source,
        target: m.target,
        options: m.options,
    }
}

impl TryFrom<pb::CreateRequest> for CreateTask {
    type Error = Error;

    fn try_from(r: pb::CreateRequest) -> Result<Self> {
        let bundle = PathBuf::from(&r.bundle);
        if !r.bundle.is_empty() && !bundle.is_absolute() {
            return Err(Error::invalid_argument(format!(
                "bundle {:?} is not absolute",
                r.bundle
            )));
        }
        Ok(Self {
            id: r.id,
            bundle,
            rootfs: r.rootfs.into_iter().map(mount).collect(),
            stdio: r
                .stdio
                .map(StdioSpec::try_from)
                .transpose()?
                .unwrap_or_default(),
            log: match r.log {
                Some(l) => LogSpec::try_from(l)?,
                None => LogSpec {
                    format: Some(LogFormat::JsonFile),
                    max_file: 1,
                    ..Default::default()
                },
            },
            runtime: r.runtime.map(RuntimeSettings::from),
            events_address: (!r.events_address.is_empty()).then_some(r.events_address),
            namespace: (!r.namespace.is_empty()).then_some(r.namespace),
            start: r.start,
            hold_output_for: r.hold_output_for,
            health: r.health.map(HealthConfig::try_from).transpose()?,
        })
    }
}

impl TryFrom<pb::HealthConfig> for HealthConfig {
    type Error = Error;

    fn try_from(h: pb::HealthConfig) -> Result<Self> {
        if h.command.is_empty() || h.command[0].is_empty() {
            return Err(Error::invalid_argument(
                "health: the probe command is empty",
            ));
        }
        Ok(Self {
            command: h.command,
            interval: Duration::from_nanos(h.interval_ns),
            timeout: Duration::from_nanos(h.timeout_ns),
            start_period: Duration::from_nanos(h.start_period_ns),
            start_interval: Duration::from_nanos(h.start_interval_ns),
            retries: h.retries,
        })
    }
}

impl From<&HealthState> for types::Health {
    fn from(h: &HealthState) -> Self {
        let status = match h.status {
            HealthStatus::Starting => types::HealthStatus::Starting,
            HealthStatus::Healthy => types::HealthStatus::Healthy,
            HealthStatus::Unhealthy => types::HealthStatus::Unhealthy,
        };
        Self {
            status: status.into(),
            failing_streak: h.failing_streak,
            log: h
                .log
                .iter()
                .map(|r| types::HealthcheckResult {
                    start: Some(timestamp(r.start)),
                    end: Some(timestamp(r.end)),
                    exit_code: r.exit_code,
                    output: r.output.clone(),
                })
                .collect(),
            pid: h.pid,
        }
    }
}

impl TryFrom<pb::ExecRequest> for ExecTask {
    type Error = Error;

    fn try_from(r: pb::ExecRequest) -> Result<Self> {
        let mode = if r.terminal {
            StdioMode::Tty
        } else {
            StdioMode::Pipes
        };
        let size = r
            .terminal_size
            .as_ref()
            .map(terminal_size)
            .transpose()?
            .filter(|(w, h)| *w > 0 && *h > 0);
        Ok(Self {
            exec_id: r.exec_id,
            spec: r.spec,
            stdio: StdioSpec {
                mode,
                stdin: r.stdin,
                size,
            },
        })
    }
}

impl From<pb::AttachOptions> for AttachOptions {
    fn from(o: pb::AttachOptions) -> Self {
        Self {
            exec_id: o.exec_id,
            stdin: o.stdin,
            stdout: o.stdout,
            stderr: o.stderr,
            logs: o.logs,
            stream: o.stream,
        }
    }
}

/// One client message of an attach stream after the options; `None` for an empty message.
pub fn attach_input(r: pb::AttachRequest) -> Result<Option<AttachInput>> {
    use pb::attach_request::Event;
    Ok(match r.event {
        None => None,
        Some(Event::Options(_)) => {
            return Err(Error::invalid_argument(
                "attach options may only be sent first",
            ));
        }
        Some(Event::Data(d)) => Some(AttachInput::Data(d.into())),
        Some(Event::Resize(s)) => {
            let (w, h) = terminal_size(&s)?;
            Some(AttachInput::Resize(w, h))
        }
        Some(Event::CloseStdin(_)) => Some(AttachInput::CloseStdin),
    })
}

fn stream(s: Stream) -> i32 {
    match s {
        Stream::Stdout => types::OutputStream::Stdout as i32,
        Stream::Stderr => types::OutputStream::Stderr as i32,
    }
}

impl From<Chunk> for types::OutputChunk {
    fn from(c: Chunk) -> Self {
        Self {
            stream: stream(c.stream),
            data: c.data.to_vec(),
        }
    }
}

impl From<AttachEvent> for pb::AttachResponse {
    fn from(e: AttachEvent) -> Self {
        use pb::attach_response::Event;
        let event = match e {
            AttachEvent::Output(c) => Event::Output(c.into()),
            AttachEvent::End(exit_status) => Event::End(pb::AttachEnd { exit_status }),
        };
        Self { event: Some(event) }
    }
}

impl TryFrom<pb::LogsRequest> for ReadOptions {
    type Error = Error;

    fn try_from(r: pb::LogsRequest) -> Result<Self> {
        Ok(Self {
            since: r.since.as_ref().map(system_time).transpose()?,
            until: r.until.as_ref().map(system_time).transpose()?,
            // Negative means "all", as Docker's `--tail -1` / "all".
            tail: r.tail.and_then(|t| u64::try_from(t).ok()),
            follow: r.follow,
            stdout: r.stdout,
            stderr: r.stderr,
        })
    }
}

impl From<LogEntry> for types::LogEntry {
    fn from(e: LogEntry) -> Self {
        Self {
            stream: stream(e.stream),
            time: Some(timestamp(e.time)),
            data: e.data,
            partial: e.partial,
            attrs: e.attrs.into_iter().collect(),
        }
    }
}

fn status(s: Status) -> pb::TaskStatus {
    match s {
        Status::Created => pb::TaskStatus::Created,
        Status::Running => pb::TaskStatus::Running,
        Status::Paused => pb::TaskStatus::Paused,
        Status::Stopped => pb::TaskStatus::Stopped,
    }
}

impl From<ProcessState> for pb::StateResponse {
    fn from(s: ProcessState) -> Self {
        Self {
            id: s.id,
            exec_id: s.exec_id,
            bundle: s.bundle.display().to_string(),
            pid: s.pid,
            status: status(s.status) as i32,
            terminal: s.terminal,
            stdin: s.stdin,
            exit_status: s.exit.map(|e| e.status).unwrap_or(0),
            exited_at: s.exit.map(|e| timestamp(e.at)),
        }
    }
}

impl From<Exit> for pb::WaitResponse {
    fn from(e: Exit) -> Self {
        Self {
            exit_status: e.status,
            exited_at: Some(timestamp(e.at)),
        }
    }
}

impl From<Deleted> for pb::DeleteResponse {
    fn from(d: Deleted) -> Self {
        Self {
            pid: d.pid,
            exit_status: d.exit.map(|e| e.status).unwrap_or(0),
            exited_at: d.exit.map(|e| timestamp(e.at)),
        }
    }
}

impl From<Info> for pb::InfoResponse {
    fn from(i: Info) -> Self {
        Self {
            id: i.id,
            bundle: i.bundle.display().to_string(),
            shim_pid: i.shim_pid,
            task_pid: i.task_pid,
            version: i.version,
        }
    }
}

/// The hub's envelope for a task event: type TASK, containerd-style topics
/// (`/tasks/start`, `/tasks/exit`, `/tasks/oom`, `/tasks/exec-added`, `/tasks/exec-started`).
pub fn envelope(e: &Envelope) -> ev::Envelope {
    use ev::envelope::Payload;
    let container_id = e.container_id.clone();
    let mut attributes = std::collections::HashMap::new();
    let (topic, action, payload) = match &e.event {
        TaskEvent::Start { exec_id, pid } => (
            "/tasks/start",
            "start",
            Payload::TaskStart(ev::TaskStart {
                container_id: container_id.clone(),
                exec_id: exec_id.clone(),
                pid: *pid,
            }),
        ),
        TaskEvent::Exit {
            exec_id,
            pid,
            status,
            at,
        } => {
            attributes.insert("exitCode".to_string(), status.to_string());
            if !exec_id.is_empty() {
                attributes.insert("execID".to_string(), exec_id.clone());
            }
            (
                "/tasks/exit",
                if exec_id.is_empty() {
                    "die"
                } else {
                    "exec_die"
                },
                Payload::TaskExit(ev::TaskExit {
                    container_id: container_id.clone(),
                    exec_id: exec_id.clone(),
                    pid: *pid,
                    exit_status: *status,
                    exited_at: Some(timestamp(*at)),
                }),
            )
        }
        TaskEvent::Oom => (
            "/tasks/oom",
            "oom",
            Payload::TaskOom(ev::TaskOom {
                container_id: container_id.clone(),
            }),
        ),
        TaskEvent::ExecAdded { exec_id } => {
            attributes.insert("execID".to_string(), exec_id.clone());
            (
                "/tasks/exec-added",
                "exec_create",
                Payload::ExecAdded(ev::ExecAdded {
                    container_id: container_id.clone(),
                    exec_id: exec_id.clone(),
                }),
            )
        }
        TaskEvent::ExecStarted { exec_id, pid } => {
            attributes.insert("execID".to_string(), exec_id.clone());
            (
                "/tasks/exec-started",
                "exec_start",
                Payload::ExecStarted(ev::ExecStarted {
                    container_id: container_id.clone(),
                    exec_id: exec_id.clone(),
                    pid: *pid,
                }),
            )
        }
        TaskEvent::Health { state, changed } => {
            (
                "/tasks/health",
                // Docker's action when a probe changed the status; the hub's subscribers see
                // this TASK event, the engine publishes the container event.
                match (changed, state.status) {
                    (false, _) => "health_stopped",
                    (true, HealthStatus::Starting) => "health_status: starting",
                    (true, HealthStatus::Healthy) => "health_status: healthy",
                    (true, HealthStatus::Unhealthy) => "health_status: unhealthy",
                },
                Payload::TaskHealth(ev::TaskHealth {
                    container_id: container_id.clone(),
                    health: Some(state.into()),
                    changed: *changed,
                }),
            )
        }
    };
    ev::Envelope {
        timestamp: Some(timestamp(e.at)),
        namespace: e.namespace.clone(),
        topic: topic.to_string(),
        r#type: ev::EventType::Task as i32,
        action: action.to_string(),
        actor: Some(ev::Actor {
            id: container_id,
            attributes,
        }),
        scope: "local".to_string(),
        sequence: 0,
        source: "berth-shim".to_string(),
        payload: Some(payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123);
        assert_eq!(system_time(&timestamp(t)).unwrap(), t);
        assert!(
            system_time(&Timestamp {
                seconds: -1,
                nanos: 0
            })
            .is_err()
        );
    }

    #[test]
    fn create_requests_map_with_defaults() {
        let req = pb::CreateRequest {
            id: "c1".into(),
            bundle: "/b".into(),
            stdio: Some(pb::Stdio {
                mode: pb::StdioMode::Tty as i32,
                stdin: true,
                terminal_size: Some(types::TerminalSize {
                    width: 80,
                    height: 24,
                }),
            }),
            log: Some(pb::LogConfig {
                format: 0,
                path: String::new(),
                max_size: 10,
                max_file: 0,
                attrs: Default::default(),
            }),
            runtime: Some(pb::RuntimeConfig {
                binary: "crun".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = CreateTask::try_from(req).unwrap();
        assert_eq!(
            t.stdio,
            StdioSpec {
                mode: StdioMode::Tty,
                stdin: true,
                size: Some((80, 24))
            }
        );
        assert_eq!(t.log.format, Some(LogFormat::JsonFile));
        assert_eq!((t.log.max_size, t.log.max_file, t.log.path), (10, 1, None));
        assert_eq!(t.runtime.unwrap().binary, PathBuf::from("crun"));
        assert_eq!(t.events_address, None);

        let bad = pb::CreateRequest {
            bundle: "rel".into(),
            ..Default::default()
        };
        assert!(CreateTask::try_from(bad).is_err());
        let none = CreateTask::try_from(pb::CreateRequest::default()).unwrap();
        assert_eq!(none.stdio.mode, StdioMode::None);
        let neg = pb::LogConfig {
            max_size: -1,
            ..Default::default()
        };
        assert!(LogSpec::try_from(neg).is_err());
    }

    #[test]
    fn exit_events_carry_the_status() {
        let at = UNIX_EPOCH + Duration::from_secs(5);
        let env = envelope(&Envelope {
            container_id: "c1".into(),
            namespace: "default".into(),
            at,
            event: TaskEvent::Exit {
                exec_id: String::new(),
                pid: 7,
                status: 143,
                at,
            },
        });
        assert_eq!(env.topic, "/tasks/exit");
        assert_eq!(env.r#type, ev::EventType::Task as i32);
        assert_eq!(env.actor.as_ref().unwrap().attributes["exitCode"], "143");
        let Some(ev::envelope::Payload::TaskExit(x)) = env.payload else {
            panic!("payload")
        };
        assert_eq!(
            (x.pid, x.exit_status, x.exited_at.unwrap().seconds),
            (7, 143, 5)
        );
    }
}
