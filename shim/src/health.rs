//! Docker healthchecks: the probe schedule and the health state it keeps.
//!
//! The shim runs them (not the engine) because a container's health must keep being checked
//! while any daemon restarts, and the shim already starts exec processes natively. The rules are
//! moby's: the first probe one interval after the start (`start_interval` while the container
//! is still starting within its start period); a probe that exits 0 makes it healthy and resets
//! the failing streak; any other result (an exit code, a timeout, a probe that could not run)
//! adds to the streak unless the container is still starting within its start period, and
//! `retries` failures in a row make it unhealthy. The last five results are kept, with their
//! output cut at 4096 bytes. When the monitor stops (the container stopped) the status becomes
//! unhealthy, as Docker reports it.
//!
//! Running one probe is behind [`Prober`], so the schedule is tested on tokio's paused clock.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use berth_core::{Error, Result};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// Longest probe output kept, in bytes (moby's `maxOutputLen`).
pub const MAX_OUTPUT: usize = 4096;
/// Results kept (moby's `maxLogEntries`).
pub const MAX_LOG: usize = 5;
/// Where the shim keeps the health state in the bundle, rewritten after every probe.
pub const HEALTH_FILE: &str = "health.json";

const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_START_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_RETRIES: u32 = 3;

/// A healthcheck as the engine resolved it; zero durations and retries mean Docker's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthConfig {
    /// The probe's argv.
    pub command: Vec<String>,
    /// Between the end of a probe and the start of the next.
    pub interval: Duration,
    /// How long a probe may run.
    pub timeout: Duration,
    /// Failures during this time after the start do not count.
    pub start_period: Duration,
    /// The interval while starting within the start period.
    pub start_interval: Duration,
    /// Failures in a row that make the container unhealthy.
    pub retries: u32,
}

impl HealthConfig {
    fn interval(&self) -> Duration {
        or_default(self.interval, DEFAULT_INTERVAL)
    }

    fn timeout(&self) -> Duration {
        or_default(self.timeout, DEFAULT_TIMEOUT)
    }

    fn start_interval(&self) -> Duration {
        or_default(self.start_interval, DEFAULT_START_INTERVAL)
    }

    fn retries(&self) -> u32 {
        if self.retries == 0 {
            DEFAULT_RETRIES
        } else {
            self.retries
        }
    }

    /// How long to wait before the next probe, `elapsed` after the start (moby's `getInterval`).
    fn next_wait(&self, elapsed: Duration, status: HealthStatus) -> Duration {
        if elapsed < self.start_period && status == HealthStatus::Starting {
            self.start_interval()
        } else {
            self.interval()
        }
    }
}

fn or_default(d: Duration, default: Duration) -> Duration {
    if d.is_zero() { default } else { d }
}

/// Docker's health states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// No probe has succeeded since the start.
    Starting,
    /// The last probe succeeded.
    Healthy,
    /// `retries` probes in a row failed, or the container stopped.
    Unhealthy,
}

/// One probe run, as Docker logs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// When it started (RFC 3339 in the file).
    #[serde(with = "rfc3339_serde")]
    pub start: SystemTime,
    /// When it ended.
    #[serde(with = "rfc3339_serde")]
    pub end: SystemTime,
    /// Its exit code; -1 when it timed out or could not run.
    pub exit_code: i32,
    /// Its output (at most [`MAX_OUTPUT`] bytes, then "..."), or why it failed.
    pub output: String,
}

/// The health of one run of the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthState {
    /// Current status.
    pub status: HealthStatus,
    /// Counted failures in a row.
    pub failing_streak: u32,
    /// The last [`MAX_LOG`] results, oldest first.
    pub log: VecDeque<ProbeResult>,
    /// The init's host pid (the run this is about).
    pub pid: u32,
}

impl HealthState {
    /// The state at the start of a run.
    pub fn starting(pid: u32) -> Self {
        Self {
            status: HealthStatus::Starting,
            failing_streak: 0,
            log: VecDeque::new(),
            pid,
        }
    }

    /// Applies one result as moby's `handleProbeResult` does; `in_start_period` says whether
    /// the probe started within the start period. Returns whether the status changed.
    pub fn record(&mut self, result: ProbeResult, in_start_period: bool, retries: u32) -> bool {
        let before = self.status;
        let ok = result.exit_code == 0;
        self.log.push_back(result);
        while self.log.len() > MAX_LOG {
            self.log.pop_front();
        }
        if ok {
            self.failing_streak = 0;
            self.status = HealthStatus::Healthy;
        } else if !(self.status == HealthStatus::Starting && in_start_period) {
            self.failing_streak += 1;
            if self.failing_streak >= retries {
                self.status = HealthStatus::Unhealthy;
            }
        }
        self.status != before
    }

    /// Writes the state to `<bundle>/health.json` (write, then rename).
    pub fn save(&self, bundle: &Path) -> Result<()> {
        let path = bundle.join(HEALTH_FILE);
        let tmp = bundle.join(".health.json.tmp");
        let data = serde_json::to_vec(self)
            .map_err(|e| Error::internal("encode health").with_source(e))?;
        std::fs::write(&tmp, data)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::internal(format!("write {}", path.display())).with_source(e))
    }

    /// Reads `<bundle>/health.json`, if there is one.
    pub fn load(bundle: &Path) -> Option<Self> {
        let data = std::fs::read(bundle.join(HEALTH_FILE)).ok()?;
        serde_json::from_slice(&data).ok()
    }
}

mod rfc3339_serde {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::rfc3339::format(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        crate::rfc3339::parse(&s).ok_or_else(|| D::Error::custom("bad RFC 3339 time"))
    }
}

/// How one probe ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// It exited with this code and output (already cut to [`MAX_OUTPUT`]).
    Exited {
        /// Exit code (128 + signal when killed).
        code: i32,
        /// Output.
        output: String,
    },
    /// It ran longer than the timeout and was killed; what it had written by then.
    TimedOut {
        /// Output.
        output: String,
    },
    /// It could not be run: why.
    Failed(String),
    /// Not run: the container is paused. Nothing is recorded.
    Skipped,
}

/// A probe being run.
pub type ProbeFuture<'a> = std::pin::Pin<Box<dyn Future<Output = Probe> + Send + 'a>>;

/// Runs one probe in the container.
pub trait Prober: Send + Sync {
    /// Runs `command`, killing it after `timeout`. Dropping the future must not leave the
    /// process running.
    fn probe<'a>(&'a self, command: &'a [String], timeout: Duration) -> ProbeFuture<'a>;
}

/// Collects probe output as moby's `limitedBuffer` does: the first [`MAX_OUTPUT`] bytes, then
/// "..." when anything was cut.
#[derive(Debug, Default)]
pub struct LimitedOutput {
    buf: Vec<u8>,
    truncated: bool,
}

impl LimitedOutput {
    /// Appends `data` while there is room.
    pub fn push(&mut self, data: &[u8]) {
        let keep = (MAX_OUTPUT - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..keep]);
        if keep < data.len() {
            self.truncated = true;
        }
    }

    /// The output as text (invalid UTF-8 replaced, as Go's JSON encoder does).
    pub fn text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.buf).into_owned();
        if self.truncated {
            s.push_str("...");
        }
        s
    }
}

/// Go's `time.Duration` formatting for the whole-unit values healthchecks use ("30s", "1.5s",
/// "500ms", "1m30s"), as Docker's timeout message shows it.
pub fn go_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    let frac = |v: u128, unit: u128| {
        let whole = v / unit;
        let rest = v % unit;
        if rest == 0 {
            whole.to_string()
        } else {
            let digits = unit.ilog10() as usize;
            let s = format!("{rest:0digits$}");
            format!("{whole}.{}", s.trim_end_matches('0'))
        }
    };
    if ns < 1_000 {
        return format!("{ns}ns");
    }
    if ns < 1_000_000 {
        return format!("{}µs", frac(ns, 1_000));
    }
    if ns < 1_000_000_000 {
        return format!("{}ms", frac(ns, 1_000_000));
    }
    let secs = ns / 1_000_000_000;
    let sub = ns % 1_000_000_000;
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&frac(
        u128::from(s as u64) * 1_000_000_000 + sub,
        1_000_000_000,
    ));
    out.push('s');
    out
}

/// Turns a probe's end into the result Docker logs.
fn result(probe: Probe, timeout: Duration, start: SystemTime) -> Option<ProbeResult> {
    let (exit_code, output) = match probe {
        Probe::Exited { code, output } => (code, output),
        Probe::TimedOut { output } if output.is_empty() => (
            -1,
            format!("Health check exceeded timeout ({})", go_duration(timeout)),
        ),
        Probe::TimedOut { output } => (
            -1,
            format!(
                "Health check exceeded timeout ({}): {output}",
                go_duration(timeout)
            ),
        ),
        Probe::Failed(why) => (-1, why),
        Probe::Skipped => return None,
    };
    Some(ProbeResult {
        start,
        end: SystemTime::now(),
        exit_code,
        output,
    })
}

/// What the monitor reports after each probe and when it stops.
pub trait HealthSink: Send + Sync {
    /// The state after a probe (`changed`: its status changed) or, with `stopped`, the final
    /// state once the monitor stopped.
    fn update(&self, state: &HealthState, changed: bool, stopped: bool);
}

/// Runs the schedule for one run of the container until `stop`, starting from `state`
/// (status starting). `started` is when the init started.
pub async fn monitor(
    config: HealthConfig,
    state: Arc<Mutex<HealthState>>,
    started: tokio::time::Instant,
    prober: Arc<dyn Prober>,
    sink: Arc<dyn HealthSink>,
    stop: CancellationToken,
) {
    loop {
        let status = state.lock().unwrap().status;
        let wait = config.next_wait(started.elapsed(), status);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        let start = SystemTime::now();
        let in_start_period = started.elapsed() < config.start_period;
        let probe = tokio::select! {
            _ = stop.cancelled() => break,
            p = prober.probe(&config.command, config.timeout()) => p,
        };
        let Some(result) = result(probe, config.timeout(), start) else {
            continue;
        };
        tracing::debug!(exit_code = result.exit_code, "health probe");
        let (snapshot, changed) = {
            let mut st = state.lock().unwrap();
            let changed = st.record(result, in_start_period, config.retries());
            (st.clone(), changed)
        };
        if changed {
            tracing::info!(status = ?snapshot.status, "health status changed");
        }
        sink.update(&snapshot, changed, false);
    }
    let snapshot = {
        let mut st = state.lock().unwrap();
        st.status = HealthStatus::Unhealthy;
        st.clone()
    };
    sink.update(&snapshot, false, true);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Answers probes from a script of outcomes (the last one repeats), taking `took` each.
    struct Scripted {
        outcomes: Mutex<VecDeque<Probe>>,
        took: Duration,
        calls: AtomicUsize,
        at: Mutex<Vec<tokio::time::Instant>>,
    }

    impl Scripted {
        fn new(outcomes: Vec<Probe>, took: Duration) -> Arc<Self> {
            Arc::new(Self {
                outcomes: Mutex::new(outcomes.into()),
                took,
                calls: AtomicUsize::new(0),
                at: Mutex::new(Vec::new()),
            })
        }
    }

    impl Prober for Scripted {
        fn probe<'a>(&'a self, _command: &'a [String], timeout: Duration) -> ProbeFuture<'a> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                self.at.lock().unwrap().push(tokio::time::Instant::now());
                let next = {
                    let mut q = self.outcomes.lock().unwrap();
                    if q.len() > 1 {
                        q.pop_front().unwrap()
                    } else {
                        q.front().cloned().unwrap()
                    }
                };
                if self.took >= timeout {
                    tokio::time::sleep(timeout).await;
                    return Probe::TimedOut {
                        output: String::new(),
                    };
                }
                tokio::time::sleep(self.took).await;
                next
            })
        }
    }

    #[derive(Default)]
    struct Recorder {
        updates: Mutex<Vec<(HealthState, bool, bool)>>,
    }

    impl HealthSink for Recorder {
        fn update(&self, state: &HealthState, changed: bool, stopped: bool) {
            self.updates
                .lock()
                .unwrap()
                .push((state.clone(), changed, stopped));
        }
    }

    fn ok() -> Probe {
        Probe::Exited {
            code: 0,
            output: "ok\n".into(),
        }
    }

    fn fail() -> Probe {
        Probe::Exited {
            code: 1,
            output: String::new(),
        }
    }

    fn config(interval: u64) -> HealthConfig {
        HealthConfig {
            command: vec!["true".into()],
            interval: Duration::from_secs(interval),
            timeout: Duration::from_secs(5),
            ..Default::default()
        }
    }

    struct Run {
        prober: Arc<Scripted>,
        sink: Arc<Recorder>,
        state: Arc<Mutex<HealthState>>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn run(config: HealthConfig, prober: Arc<Scripted>) -> Run {
        let sink = Arc::new(Recorder::default());
        let state = Arc::new(Mutex::new(HealthState::starting(42)));
        let stop = CancellationToken::new();
        let task = tokio::spawn(monitor(
            config,
            state.clone(),
            tokio::time::Instant::now(),
            prober.clone(),
            sink.clone(),
            stop.clone(),
        ));
        Run {
            prober,
            sink,
            state,
            stop,
            task,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn healthy_then_unhealthy_after_retries_then_healthy_again() {
        let script = vec![ok(), fail(), fail(), fail(), ok()];
        let r = run(config(10), Scripted::new(script, Duration::ZERO));
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(
            r.prober.calls.load(Ordering::SeqCst),
            0,
            "no probe before one interval"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(r.state.lock().unwrap().status, HealthStatus::Healthy);
        tokio::time::sleep(Duration::from_secs(20)).await;
        let st = r.state.lock().unwrap().clone();
        assert_eq!((st.status, st.failing_streak), (HealthStatus::Healthy, 2));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let st = r.state.lock().unwrap().clone();
        assert_eq!((st.status, st.failing_streak), (HealthStatus::Unhealthy, 3));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let st = r.state.lock().unwrap().clone();
        assert_eq!((st.status, st.failing_streak), (HealthStatus::Healthy, 0));
        assert_eq!(st.log.len(), MAX_LOG);
        let changes: Vec<_> = r
            .sink
            .updates
            .lock()
            .unwrap()
            .iter()
            .filter(|u| u.1)
            .map(|u| u.0.status)
            .collect();
        assert_eq!(
            changes,
            [
                HealthStatus::Healthy,
                HealthStatus::Unhealthy,
                HealthStatus::Healthy
            ]
        );
        r.stop.cancel();
        r.task.await.unwrap();
        let last = r.sink.updates.lock().unwrap().last().cloned().unwrap();
        assert_eq!(
            (last.0.status, last.1, last.2),
            (HealthStatus::Unhealthy, false, true)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn start_period_failures_do_not_count_and_use_the_start_interval() {
        let cfg = HealthConfig {
            start_period: Duration::from_secs(10),
            start_interval: Duration::from_secs(1),
            retries: 1,
            ..config(30)
        };
        let r = run(cfg, Scripted::new(vec![fail()], Duration::ZERO));
        tokio::time::sleep(Duration::from_millis(9_500)).await;
        let st = r.state.lock().unwrap().clone();
        assert_eq!(r.prober.calls.load(Ordering::SeqCst), 9);
        assert_eq!((st.status, st.failing_streak), (HealthStatus::Starting, 0));
        assert_eq!(st.log.len(), MAX_LOG);
        // The tenth probe starts at the end of the period and counts; with one retry, that is it.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let st = r.state.lock().unwrap().clone();
        assert_eq!((st.status, st.failing_streak), (HealthStatus::Unhealthy, 1));
        // After the period the interval is the normal one.
        let before = r.prober.calls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(r.prober.calls.load(Ordering::SeqCst), before);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(r.prober.calls.load(Ordering::SeqCst), before + 1);
        r.stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_in_the_start_period_ends_it() {
        let cfg = HealthConfig {
            start_period: Duration::from_secs(100),
            start_interval: Duration::from_secs(1),
            ..config(30)
        };
        let r = run(cfg, Scripted::new(vec![ok(), fail()], Duration::ZERO));
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(r.state.lock().unwrap().status, HealthStatus::Healthy);
        // Healthy: the normal interval, and failures count even within the period.
        tokio::time::sleep(Duration::from_secs(30)).await;
        let st = r.state.lock().unwrap().clone();
        assert_eq!((st.status, st.failing_streak), (HealthStatus::Healthy, 1));
        assert_eq!(r.prober.calls.load(Ordering::SeqCst), 2);
        r.stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_fail_with_dockers_message_and_the_next_waits_from_the_end() {
        let cfg = HealthConfig {
            timeout: Duration::from_millis(1500),
            ..config(10)
        };
        let r = run(cfg, Scripted::new(vec![ok()], Duration::from_secs(60)));
        tokio::time::sleep(Duration::from_secs(12)).await;
        let st = r.state.lock().unwrap().clone();
        assert_eq!((st.status, st.failing_streak), (HealthStatus::Starting, 1));
        assert_eq!(st.log[0].exit_code, -1);
        assert_eq!(st.log[0].output, "Health check exceeded timeout (1.5s)");
        tokio::time::sleep(Duration::from_secs(10)).await;
        let at = r.prober.at.lock().unwrap().clone();
        assert_eq!(at.len(), 2);
        assert_eq!(at[1] - at[0], Duration::from_millis(11_500));
        r.stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn stop_during_a_probe_ends_the_monitor_and_marks_it_unhealthy() {
        let r = run(config(1), Scripted::new(vec![ok()], Duration::from_secs(3)));
        tokio::time::sleep(Duration::from_secs(2)).await;
        r.stop.cancel();
        r.task.await.unwrap();
        let updates = r.sink.updates.lock().unwrap().clone();
        assert_eq!(updates.len(), 1);
        assert!(updates[0].2);
        assert_eq!(r.state.lock().unwrap().status, HealthStatus::Unhealthy);
    }

    #[test]
    fn output_is_cut_as_docker_cuts_it() {
        let mut o = LimitedOutput::default();
        o.push(&[b'a'; 4000]);
        o.push(&[b'b'; 200]);
        let t = o.text();
        assert_eq!(t.len(), MAX_OUTPUT + 3);
        assert!(t.ends_with("bb..."));
        let mut o = LimitedOutput::default();
        o.push(b"fine");
        assert_eq!(o.text(), "fine");
    }

    #[test]
    fn durations_print_as_go_prints_them() {
        let cases = [
            (Duration::from_secs(30), "30s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_micros(1500), "1.5ms"),
        ];
        for (d, want) in cases {
            assert_eq!(go_duration(d), want);
        }
    }

    #[test]
    fn the_state_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = HealthState::starting(7);
        st.record(
            ProbeResult {
                start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                end: SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5),
                exit_code: 0,
                output: "x".into(),
            },
            false,
            3,
        );
        st.save(dir.path()).unwrap();
        assert_eq!(HealthState::load(dir.path()), Some(st));
    }
}
