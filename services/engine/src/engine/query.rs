//! Reading containers: Get and List (Docker's filters), top and stats.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::events::v1 as evpb;
use berth_proto::berth::types::v1 as types;
use berth_proto::prost_types::Timestamp;
use futures::StreamExt;

use super::{Ctr, Engine};
use crate::deps::BoxStream;
use crate::filters::Args;
use crate::record::{Record, status_name};

/// Docker's word for a container's health: none, starting, healthy or unhealthy.
pub fn health_word(health: Option<&types::Health>) -> &'static str {
    match health.map(|h| h.status()) {
        None | Some(types::HealthStatus::Unspecified) => "none",
        Some(types::HealthStatus::Starting) => "starting",
        Some(types::HealthStatus::Healthy) => "healthy",
        Some(types::HealthStatus::Unhealthy) => "unhealthy",
    }
}

/// The health a container starts a run with: starting, no failures, the earlier log kept (as
/// moby keeps it); none without a healthcheck.
pub(in crate::engine) fn health_at_start(rec: &Record, pid: u32) -> Option<types::Health> {
    crate::imageconfig::healthcheck(rec.config())?;
    let log = rec
        .state()
        .health
        .as_ref()
        .map(|h| h.log.clone())
        .unwrap_or_default();
    Some(types::Health {
        status: types::HealthStatus::Starting.into(),
        failing_streak: 0,
        log,
        pid,
    })
}

/// Filter keys of List.
pub fn list_keys() -> &'static [&'static str] {
    &[
        "id",
        "name",
        "label",
        "label!",
        "status",
        "ancestor",
        "exited",
        "network",
        "volume",
        "before",
        "since",
        "publish",
        "expose",
        "health",
        "isolation",
        "is-task",
        // berth's own: containers that carry the named extension (not a Docker filter).
        "berth.extension",
    ]
}

/// Parses a filter time: RFC 3339, Unix seconds (with fraction), or a Go duration ago
/// (`10m`, `1h30m`, `500ms`).
pub fn parse_time(s: &str) -> Result<SystemTime> {
    let invalid = || Error::invalid_argument(format!("invalid time value {s:?}"));
    if let Ok(secs) = s.parse::<f64>() {
        return Ok(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs.max(0.0)));
    }
    if let Some(t) = crate::logs::parse_rfc3339(s) {
        return Ok(t);
    }
    let d = berth_core::duration::parse_go(s).ok_or_else(invalid)?;
    Ok(SystemTime::now() - d)
}

/// Snapshotter usage calls in flight at once while listing with sizes.
const SIZE_CONCURRENCY: usize = 8;

/// Listed without `all`: containers with a live task.
fn is_live(status: pb::ContainerStatus) -> bool {
    matches!(
        status,
        pb::ContainerStatus::Running
            | pb::ContainerStatus::Paused
            | pb::ContainerStatus::Restarting
    )
}

/// The fields of `c` Docker's container listing shows (`ListContainersRequest.summary`).
fn summary_of(c: &pb::Container) -> pb::Container {
    let config = c.config.as_ref().map(|cfg| pb::ContainerConfig {
        entrypoint: cfg.entrypoint.clone(),
        cmd: cfg.cmd.clone(),
        labels: cfg.labels.clone(),
        ..Default::default()
    });
    let host_config = c.host_config.as_ref().map(|h| pb::HostConfig {
        network_mode: h.network_mode.clone(),
        ..Default::default()
    });
    pb::Container {
        id: c.id.clone(),
        name: c.name.clone(),
        created: c.created,
        image: c.image.clone(),
        image_id: c.image_id.clone(),
        config,
        host_config,
        networks: c.networks.clone(),
        state: c.state.clone(),
        network_settings: c.network_settings.clone(),
        mounts: c.mounts.clone(),
        size_rw: c.size_rw,
        size_root_fs: c.size_root_fs,
        ..Default::default()
    }
}

fn created(rec: &Record) -> SystemTime {
    rec.c
        .created
        .as_ref()
        .and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn short_ref(s: &str) -> String {
    let s = s.strip_prefix("docker.io/").unwrap_or(s);
    let s = s.strip_prefix("library/").unwrap_or(s);
    s.strip_suffix(":latest").unwrap_or(s).to_string()
}

fn ancestor_matches(rec: &Record, want: &str) -> bool {
    let image = &rec.c.image;
    let id = &rec.c.image_id;
    let bare_id = id.strip_prefix("sha256:").unwrap_or(id);
    let want_bare = want.strip_prefix("sha256:").unwrap_or(want);
    image == want
        || short_ref(image) == short_ref(want)
        || id == want
        || (want_bare.len() >= 4 && bare_id.starts_with(want_bare))
}

fn port_matches(spec: &str, port: u32, proto: i32) -> bool {
    let (ports, p) = spec.split_once('/').unwrap_or((spec, "tcp"));
    let proto_name = match types::Protocol::try_from(proto).unwrap_or(types::Protocol::Tcp) {
        types::Protocol::Udp => "udp",
        types::Protocol::Sctp => "sctp",
        _ => "tcp",
    };
    if !p.eq_ignore_ascii_case(proto_name) {
        return false;
    }
    match ports.split_once('-') {
        Some((a, b)) => match (a.parse::<u32>(), b.parse::<u32>()) {
            (Ok(a), Ok(b)) => (a..=b).contains(&port),
            _ => false,
        },
        None => ports.parse::<u32>() == Ok(port),
    }
}

impl Engine {
    /// The wire view of a container, with sizes when asked.
    pub async fn describe(&self, ctr: &Arc<Ctr>, size: bool) -> pb::Container {
        self.refresh_health(ctr).await;
        let mut c = ctr.record().c;
        c.exec_ids = self.exec_ids(&ctr.id);
        if size {
            let rw = self
                .deps
                .snapshots
                .usage(&c.snapshot_key)
                .await
                .unwrap_or(-1);
            c.size_rw = rw;
            c.size_root_fs = rw;
        }
        c
    }

    /// Lists containers, most recently created first.
    ///
    /// A listing touches every container, so the filters run on each record under its read
    /// lock without copying it, and only the containers returned are copied (just the fields a
    /// listing shows when `req.summary`). Sizes are asked of the snapshotter a few at a time.
    pub async fn list(&self, req: &pb::ListContainersRequest) -> Result<Vec<pb::Container>> {
        let args = Args::parse(&req.filters, list_keys())?;
        for s in args.values("status") {
            if !matches!(
                s,
                "created" | "restarting" | "running" | "removing" | "paused" | "exited" | "dead"
            ) {
                return Err(Error::invalid_argument(format!(
                    "invalid filter 'status={s}'"
                )));
            }
        }
        for h in args.values("health") {
            if !matches!(h, "starting" | "healthy" | "unhealthy" | "none") {
                return Err(Error::invalid_argument(format!(
                    "Unrecognised filter value for health: {h}"
                )));
            }
        }
        let bound = |key: &str| -> Result<Option<SystemTime>> {
            match args.values(key).next() {
                Some(v) => Ok(Some(self.get(v)?.with(created))),
                None => Ok(None),
            }
        };
        let before = bound("before")?;
        let since = bound("since")?;
        let all = req.all || req.limit > 0 || args.contains("status") || args.contains("exited");
        let mut hits: Vec<(SystemTime, Arc<Ctr>)> = Vec::new();
        for ctr in self.all() {
            let hit = ctr.with(|rec| -> Result<Option<SystemTime>> {
                if !all && !is_live(rec.status()) {
                    return Ok(None);
                }
                if !self.matches(&args, rec, before, since)? {
                    return Ok(None);
                }
                Ok(Some(created(rec)))
            })?;
            if let Some(t) = hit {
                hits.push((t, ctr));
            }
        }
        // Newest first; the id breaks ties so the order is stable from one call to the next.
        hits.sort_unstable_by(|(ta, a), (tb, b)| tb.cmp(ta).then_with(|| a.id.cmp(&b.id)));
        if req.limit > 0 {
            hits.truncate(req.limit as usize);
        }
        let mut execs = if req.summary {
            HashMap::new()
        } else {
            self.exec_ids_by_container()
        };
        let mut out: Vec<pb::Container> = hits
            .iter()
            .map(|(_, ctr)| {
                let mut c = ctr.with(|r| {
                    if req.summary {
                        summary_of(&r.c)
                    } else {
                        r.c.clone()
                    }
                });
                c.exec_ids = execs.remove(&ctr.id).unwrap_or_default();
                c
            })
            .collect();
        if req.size {
            let keys = hits
                .iter()
                .map(|(_, ctr)| ctr.with(|r| r.c.snapshot_key.clone()))
                .collect();
            self.fill_sizes(&mut out, keys).await;
        }
        Ok(out)
    }

    /// Exec ids per container, sorted, from one pass over the exec table.
    fn exec_ids_by_container(&self) -> HashMap<String, Vec<String>> {
        let mut by: HashMap<String, Vec<String>> = HashMap::new();
        for e in self.execs.lock().unwrap().values() {
            by.entry(e.container_id.clone())
                .or_default()
                .push(e.id.clone());
        }
        for ids in by.values_mut() {
            ids.sort();
        }
        by
    }

    /// Sets `size_rw` / `size_root_fs` (-1 when unknown), a few snapshotter calls at a time.
    async fn fill_sizes(&self, containers: &mut [pb::Container], keys: Vec<String>) {
        let sizes: Vec<i64> = futures::stream::iter(keys)
            .map(|key| {
                let snapshots = self.deps.snapshots.clone();
                async move { snapshots.usage(&key).await.unwrap_or(-1) }
            })
            .buffered(SIZE_CONCURRENCY)
            .collect()
            .await;
        for (c, rw) in containers.iter_mut().zip(sizes) {
            c.size_rw = rw;
            c.size_root_fs = rw;
        }
    }

    fn matches(
        &self,
        args: &Args,
        rec: &Record,
        before: Option<SystemTime>,
        since: Option<SystemTime>,
    ) -> Result<bool> {
        let c = &rec.c;
        if !args.fuzzy_match("id", &c.id) {
            return Ok(false);
        }
        if args.contains("name")
            && !args.values("name").any(|n| {
                let n = n.strip_prefix('/').unwrap_or(n);
                c.name.contains(n)
            })
        {
            return Ok(false);
        }
        let get = |k: &str| rec.labels().get(k).cloned();
        if !args.match_labels("label", get) || !args.match_labels_negated("label!", get) {
            return Ok(false);
        }
        if !args.exact_match("status", status_name(rec.status())) {
            return Ok(false);
        }
        if args.contains("exited") {
            if rec.status() != pb::ContainerStatus::Exited {
                return Ok(false);
            }
            let code = rec.state().exit_code.to_string();
            if !args.values("exited").any(|v| v == code) {
                return Ok(false);
            }
        }
        if args.contains("berth.extension")
            && !args
                .values("berth.extension")
                .any(|k| c.extensions.contains_key(k))
        {
            return Ok(false);
        }
        if args.contains("ancestor") && !args.values("ancestor").any(|a| ancestor_matches(rec, a)) {
            return Ok(false);
        }
        let settings = c.network_settings.as_ref();
        if args.contains("network") {
            let attached = settings.into_iter().flat_map(|s| s.networks.iter());
            let ok = args.values("network").any(|n| {
                c.networks.contains_key(n)
                    || attached.clone().any(|(name, ep)| {
                        name == n
                            || ep.network_id == n
                            || (n.len() >= 4 && ep.network_id.starts_with(n))
                    })
            });
            if !ok {
                return Ok(false);
            }
        }
        if args.contains("volume")
            && !args.values("volume").any(|v| {
                c.mounts
                    .iter()
                    .any(|m| m.name == v || m.destination == v || m.source == v)
            })
        {
            return Ok(false);
        }
        if let Some(b) = before
            && created(rec) >= b
        {
            return Ok(false);
        }
        if let Some(s) = since
            && created(rec) <= s
        {
            return Ok(false);
        }
        if args.contains("publish")
            && !args.values("publish").any(|spec| {
                settings
                    .into_iter()
                    .flat_map(|s| s.ports.iter())
                    .filter(|p| !p.host_bindings.is_empty())
                    .any(|p| port_matches(spec, p.container_port, p.protocol))
            })
        {
            return Ok(false);
        }
        if args.contains("expose")
            && !args.values("expose").any(|spec| {
                rec.config()
                    .exposed_ports
                    .iter()
                    .any(|p| port_matches(spec, p.port, p.protocol))
            })
        {
            return Ok(false);
        }
        if args.contains("health") {
            let word = health_word(rec.state().health.as_ref());
            if !args.values("health").any(|h| h == word) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Reads the latest probes from the shim of a running container with a healthcheck (the
    /// record follows status changes only), keeping them in memory for lists too.
    async fn refresh_health(&self, ctr: &Arc<Ctr>) {
        let pid =
            ctr.with(|r| (r.is_running() && r.state().health.is_some()).then_some(r.p.task_pid));
        let (Some(pid), Some(shim)) = (pid, ctr.shim()) else {
            return;
        };
        let Ok(Ok(fresh)) = tokio::time::timeout(Duration::from_secs(2), shim.health()).await
        else {
            return;
        };
        ctr.update(|r| {
            if r.p.task_pid == pid
                && fresh.pid == pid
                && let Some(h) = r.state_mut().health.as_mut()
            {
                *h = fresh;
            }
        });
    }

    /// A shim's TaskHealth: the record takes the new health of the run it is about (a late
    /// event of an earlier run is ignored), and a status changed by a probe is published as
    /// Docker's `health_status: <status>` container event.
    pub(in crate::engine) async fn on_health(&self, ev: evpb::TaskHealth) {
        let Ok(ctr) = self.get(&ev.container_id) else {
            return;
        };
        let Some(health) = ev.health else { return };
        let applied = ctr.update(|r| {
            let current = r.state().health.as_ref().map(|h| h.pid);
            if current != Some(health.pid) || health.pid == 0 {
                return false;
            }
            let word = health_word(Some(&health));
            r.state_mut().health = Some(health);
            if ev.changed {
                self.container_event(r, &format!("health_status: {word}"), []);
            }
            true
        });
        if applied && let Err(e) = self.persist(&ctr).await {
            tracing::warn!(id = %ctr.id, error = %e.chain(), "persisting health");
        }
    }

    /// `docker top`: runs `ps` on the host and keeps the rows of the container's processes.
    pub async fn top(&self, input: &str, ps_args: &str) -> Result<pb::TopResponse> {
        let ctr = self.get(input)?;
        if !ctr.with(|r| r.is_running()) {
            return Err(Error::failed_precondition(format!(
                "Container {} is not running",
                ctr.id
            )));
        }
        let shim = self.task_shim(&ctr).await?;
        let pids: HashSet<u32> = shim.pids().await?.into_iter().map(|p| p.pid).collect();
        let args: Vec<&str> = if ps_args.trim().is_empty() {
            vec!["-ef"]
        } else {
            ps_args.split_whitespace().collect()
        };
        let output = tokio::process::Command::new("ps")
            .args(&args)
            .output()
            .await
            .map_err(|e| Error::internal("run ps").with_source(e))?;
        if !output.status.success() {
            return Err(Error::invalid_argument(format!(
                "ps: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        parse_ps(&String::from_utf8_lossy(&output.stdout), &pids)
    }

    /// Stats samples: one, or one per second while `stream`.
    pub async fn stats(
        self: &Arc<Self>,
        input: &str,
        stream: bool,
        one_shot: bool,
    ) -> Result<BoxStream<pb::StatsResponse>> {
        let ctr = self.get(input)?;
        let engine = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        if stream {
            // Streams share one sample a second per container (see `stats.rs`).
            let sampler = self.sampler(&ctr);
            let mut samples = sampler.subscribe();
            tokio::spawn(async move {
                let _sampler = sampler;
                let mut prev: Option<(types::CpuStats, Timestamp)> = None;
                loop {
                    tokio::select! {
                        changed = samples.changed() => if changed.is_err() { return },
                        _ = tx.closed() => return,
                    }
                    let Some(sample) = samples.borrow_and_update().clone() else {
                        continue;
                    };
                    let out = with_previous(&sample, &mut prev);
                    if tx
                        .send(Ok(pb::StatsResponse { stats: Some(out) }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            return Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)));
        }
        tokio::spawn(async move {
            let mut prev: Option<(types::CpuStats, Timestamp)> = None;
            let mut first = true;
            loop {
                let sample = engine.sample(&ctr).await;
                let out = with_previous(&sample, &mut prev);
                // Docker's non-streaming sample carries precpu from a second read a second
                // later, unless one-shot.
                let emit = one_shot || !first;
                first = false;
                if emit {
                    let _ = tx.send(Ok(pb::StatsResponse { stats: Some(out) })).await;
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = tx.closed() => return,
                }
                if ctr.exits.borrow().removed {
                    return;
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// One stats sample of `ctr` (empty when it is not running): its cgroup read here (the
    /// shim is asked only when the cgroup cannot be found from the init's pid), and the init's
    /// `/proc/<pid>/net/dev`. A sample runs once a second per streamed container, so it wakes
    /// no shim and execs no runtime: `num_procs` is the cgroup's task count (`pids.current`),
    /// not a `runc ps`.
    pub(crate) async fn sample(&self, ctr: &Arc<Ctr>) -> pb::ContainerStats {
        let rec = ctr.record();
        let mut out = pb::ContainerStats {
            id: rec.c.id.clone(),
            name: rec.c.name.clone(),
            ..Default::default()
        };
        if !rec.is_running() {
            out.stats = Some(types::CgroupStats {
                read: Some(super::now()),
                ..Default::default()
            });
            return out;
        }
        let pid = rec.state().pid;
        let direct = u32::try_from(pid)
            .ok()
            .filter(|p| *p > 0)
            .and_then(|p| ctr.read_cgroup(p))
            .map(types::CgroupStats::from);
        let read = match direct {
            Some(stats) => Some(stats),
            None => match self.task_shim(ctr).await {
                Ok(shim) => Some(shim.stats().await.unwrap_or_default()),
                Err(_) => None,
            },
        };
        if let Some(mut stats) = read {
            if stats.read.is_none() {
                stats.read = Some(super::now());
            }
            if let Some(cpu) = stats.cpu.as_mut() {
                if cpu.system_usage_ns == 0 {
                    cpu.system_usage_ns = system_cpu_ns();
                }
                if cpu.online_cpus == 0 {
                    cpu.online_cpus = self.host_info().ncpu;
                }
            }
            out.num_procs = stats
                .pids
                .as_ref()
                .map_or(0, |p| u32::try_from(p.current).unwrap_or(u32::MAX));
            out.stats = Some(stats);
        }
        if self.runs_in_vm(rec.host_config()) {
            // The init's pid is its host relay's, outside the container's namespace: the
            // counters are read in the namespace itself, where eth0 carries the guest's traffic.
            if let Some(ns) = rec.p.netns.clone() {
                out.networks = tokio::task::spawn_blocking(move || net_dev_in(&ns))
                    .await
                    .unwrap_or_default();
            }
        } else if pid > 0 {
            out.networks = net_dev(&format!("/proc/{pid}/net/dev"));
        }
        out
    }

    /// Streams the container's log entries (see `logs`).
    pub async fn logs(&self, req: pb::LogsRequest) -> Result<BoxStream<pb::LogsResponse>> {
        if !req.stdout && !req.stderr {
            return Err(Error::invalid_argument(
                "You must choose at least one stream",
            ));
        }
        let ctr = self.get(&req.id)?;
        let rec = ctr.record();
        let log_type = rec
            .host_config()
            .log_config
            .as_ref()
            .map(|l| l.r#type.clone())
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| self.config.engine.log_driver.clone());
        if log_type == "none" {
            return Err(Error::failed_precondition(
                "configured logging driver does not support reading",
            ));
        }
        if rec.p.has_task
            && let Ok(shim) = self.task_shim(&ctr).await
        {
            let sreq = berth_proto::berth::shim::v1::LogsRequest {
                since: req.since,
                until: req.until,
                tail: req.tail,
                follow: req.follow,
                stdout: req.stdout,
                stderr: req.stderr,
            };
            match shim.logs(sreq).await {
                Ok(s) => {
                    return Ok(Box::pin(
                        s.map(|r| r.map(|l| pb::LogsResponse { entries: l.entries })),
                    ));
                }
                Err(e) => {
                    tracing::debug!(id = %ctr.id, error = %e.chain(), "shim logs; reading the file")
                }
            }
        }
        let path = std::path::PathBuf::from(&rec.c.log_path);
        let entries = tokio::task::spawn_blocking(move || crate::logs::read_json_logs(&path, &req))
            .await
            .map_err(|e| Error::internal("read logs").with_source(e))??;
        let batches: Vec<Result<pb::LogsResponse>> = entries
            .chunks(256)
            .map(|c| {
                Ok(pb::LogsResponse {
                    entries: c.to_vec(),
                })
            })
            .collect();
        Ok(Box::pin(futures::stream::iter(batches)))
    }
}

/// `sample` with the previous sample's CPU counters as `precpu`/`preread`; remembers its own.
fn with_previous(
    sample: &pb::ContainerStats,
    prev: &mut Option<(types::CpuStats, Timestamp)>,
) -> pb::ContainerStats {
    let read = sample
        .stats
        .as_ref()
        .and_then(|s| s.read)
        .unwrap_or_else(super::now);
    let mut out = sample.clone();
    if let Some((pc, pt)) = prev.as_ref() {
        out.precpu = Some(pc.clone());
        out.preread = Some(*pt);
    }
    *prev = sample
        .stats
        .as_ref()
        .and_then(|s| s.cpu.clone())
        .map(|c| (c, read));
    out
}

/// Docker's parsing of `ps` output: titles from the first line, the PID column found by name,
/// overhanging fields merged into the last column.
pub fn parse_ps(text: &str, pids: &HashSet<u32>) -> Result<pb::TopResponse> {
    let mut lines = text.lines();
    let titles: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let pid_index = titles
        .iter()
        .position(|t| t == "PID")
        .ok_or_else(|| Error::invalid_argument("Couldn't find PID field in ps output"))?;
    let mut processes = Vec::new();
    for line in lines {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < titles.len() {
            continue;
        }
        let Ok(pid) = fields[pid_index].parse::<u32>() else {
            continue;
        };
        if !pids.contains(&pid) {
            continue;
        }
        let mut values: Vec<String> = fields[..titles.len() - 1]
            .iter()
            .map(|s| s.to_string())
            .collect();
        values.push(fields[titles.len() - 1..].join(" "));
        processes.push(pb::TopRow { values });
    }
    Ok(pb::TopResponse { titles, processes })
}

/// Host-wide CPU time in nanoseconds, from /proc/stat (Docker's system_cpu_usage).
fn system_cpu_ns() -> u64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ticks: u64 = line
        .split_whitespace()
        .skip(1)
        .take(7)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    ticks * (1_000_000_000 / hz)
}

/// Interface counters of the network namespace bound at `netns`, less the VM tap mirrored
/// with eth0. Read by a short-lived thread that joins the namespace, so no pooled thread is
/// ever left in it.
fn net_dev_in(netns: &std::path::Path) -> HashMap<String, types::NetworkInterfaceStats> {
    let Ok(file) = std::fs::File::open(netns) else {
        return HashMap::new();
    };
    let read = std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        std::fs::read_to_string("/proc/thread-self/net/dev").ok()
    })
    .join()
    .ok()
    .flatten();
    read.map(|text| berth_core::procfs::parse_net_dev(&text))
        .unwrap_or_default()
        .into_iter()
        .filter(|(name, _)| name != berth_core::vm::VM_TAP_IFNAME)
        .collect()
}

/// Interface counters from a `/proc/<pid>/net/dev` file (the container's namespace).
pub fn net_dev(path: &str) -> HashMap<String, types::NetworkInterfaceStats> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    berth_core::procfs::parse_net_dev(&text)
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ps_output() {
        let text = "UID PID PPID C STIME TTY TIME CMD\n\
            root 1 0 0 10:00 ? 00:00:01 /sbin/init splash\n\
            root 42 1 0 10:00 ? 00:00:00 sleep 300\n\
            root 43 42 0 10:00 ? 00:00:00 sh -c echo hi there\n";
        let pids: HashSet<u32> = [42, 43].into();
        let top = parse_ps(text, &pids).unwrap();
        assert_eq!(top.titles.len(), 8);
        assert_eq!(top.processes.len(), 2);
        assert_eq!(top.processes[1].values[7], "sh -c echo hi there");
        assert!(parse_ps("USER COMMAND\nroot x\n", &pids).is_err());
    }

    #[test]
    fn durations_and_times() {
        assert_eq!(
            berth_core::duration::parse_go("1h30m"),
            Some(Duration::from_secs(5400))
        );
        assert_eq!(
            berth_core::duration::parse_go("500ms"),
            Some(Duration::from_millis(500))
        );
        assert_eq!(berth_core::duration::parse_go("x"), None);
        assert_eq!(
            parse_time("1700000000").unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
        assert!(parse_time("10m").unwrap() < SystemTime::now());
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z").unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn ports_and_ancestors() {
        assert!(port_matches("80", 80, types::Protocol::Tcp as i32));
        assert!(port_matches(
            "80/tcp",
            80,
            types::Protocol::Unspecified as i32
        ));
        assert!(!port_matches("80/udp", 80, types::Protocol::Tcp as i32));
        assert!(port_matches(
            "8000-8080/tcp",
            8042,
            types::Protocol::Tcp as i32
        ));
        let rec = Record {
            c: pb::Container {
                image: "busybox".into(),
                image_id: "sha256:abcdef0123".into(),
                ..Default::default()
            },
            p: Default::default(),
        };
        assert!(ancestor_matches(&rec, "busybox"));
        assert!(ancestor_matches(&rec, "busybox:latest"));
        assert!(ancestor_matches(&rec, "docker.io/library/busybox:latest"));
        assert!(ancestor_matches(&rec, "abcdef"));
        assert!(!ancestor_matches(&rec, "alpine"));
    }
}
