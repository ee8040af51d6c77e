//! The engine's metrics: container lifecycle counters (counted where the engine publishes the
//! Docker event, so they agree with `docker events`), and at scrape time the containers by
//! state and every running container's cgroup statistics under cAdvisor's names.
//!
//! A scrape asks each running container's shim for one `Stats` sample (the same reading
//! `docker stats` shows, at most [`SCRAPE_CONCURRENCY`] at a time) and reads its network
//! counters from `/proc/<pid>/net/dev`: one cgroup read per container per scrape, whatever
//! the number of metrics.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};

use berth_core::metrics::{Collector, Exposition, Kind};
use berth_proto::berth::types::v1 as types;
use futures::StreamExt;

use crate::engine::Engine;
use crate::record::{Record, status_name};

/// Shims asked for stats at once during a scrape.
const SCRAPE_CONCURRENCY: usize = 32;

/// How long a scrape waits for one container's sample.
const SAMPLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Counts a container event the engine publishes.
pub fn container_event(action: &str, attrs: &[(String, String)]) {
    match action {
        "start" => metrics::counter!("berth_container_starts_total").increment(1),
        "die" => {
            let code = attrs
                .iter()
                .find(|(k, _)| k == "exitCode")
                .and_then(|(_, v)| v.parse::<i64>().ok())
                .unwrap_or(-1);
            metrics::counter!("berth_container_exits_total", "code_class" => code_class(code))
                .increment(1);
        }
        "oom" => metrics::counter!("berth_container_oom_kills_total").increment(1),
        "restart" => {
            metrics::counter!("berth_container_restarts_total", "reason" => "api").increment(1)
        }
        _ => {}
    }
}

/// Counts a restart the restart policy schedules.
pub fn policy_restart() {
    metrics::counter!("berth_container_restarts_total", "reason" => "policy").increment(1);
}

/// The class of an exit code: `0`, `1-125` (the program failed), `126-127` (it could not be
/// run), `128+` (killed by a signal), `other`.
pub fn code_class(code: i64) -> &'static str {
    match code {
        0 => "0",
        1..=125 => "1-125",
        126 | 127 => "126-127",
        128..=255 => "128+",
        _ => "other",
    }
}

fn describe() {
    metrics::describe_counter!(
        "berth_events_total",
        "Events published to the hub, by type (repeats of retried task payloads not counted)."
    );
    metrics::describe_counter!(
        "berth_container_starts_total",
        "Container starts (Docker's start events)."
    );
    metrics::describe_counter!(
        "berth_container_exits_total",
        "Container exits (die events) by exit code class."
    );
    metrics::describe_counter!(
        "berth_container_oom_kills_total",
        "Containers whose run had a process OOM-killed (oom events)."
    );
    metrics::describe_counter!(
        "berth_container_restarts_total",
        "Container restarts: by the restart policy, or asked for through the API."
    );
}

/// The engine's scrape-time collector. Holds the engine weakly: the gRPC server owning it
/// must not keep the engine alive.
pub fn collector(engine: Weak<Engine>) -> Collector {
    describe();
    Arc::new(move || {
        let engine = engine.clone();
        Box::pin(async move {
            match engine.upgrade() {
                Some(engine) => render(&engine).await,
                None => String::new(),
            }
        })
    })
}

/// One running container's readings.
struct Reading {
    rec: Record,
    stats: types::CgroupStats,
    networks: std::collections::HashMap<String, types::NetworkInterfaceStats>,
}

async fn render(engine: &Arc<Engine>) -> String {
    let all = engine.all();
    let mut by_state: BTreeMap<&'static str, u64> = [
        "created",
        "running",
        "paused",
        "restarting",
        "removing",
        "exited",
        "dead",
    ]
    .into_iter()
    .map(|s| (s, 0))
    .collect();
    for c in &all {
        *by_state
            .entry(status_name(c.with(|r| r.status())))
            .or_default() += 1;
    }
    let running: Vec<_> = all
        .into_iter()
        .filter(|c| c.with(|r| r.is_running()))
        .collect();
    let readings: Vec<Reading> = futures::stream::iter(running)
        .map(|ctr| {
            let engine = engine.clone();
            async move {
                // A shim that does not answer costs its container's samples, not the scrape.
                let sample = tokio::time::timeout(SAMPLE_TIMEOUT, engine.sample(&ctr))
                    .await
                    .ok()?;
                Some(Reading {
                    rec: ctr.record(),
                    stats: sample.stats.unwrap_or_default(),
                    networks: sample.networks,
                })
            }
        })
        .buffer_unordered(SCRAPE_CONCURRENCY)
        .filter_map(std::future::ready)
        .collect()
        .await;

    let mut e = Exposition::new();
    e.family(
        "berth_containers",
        Kind::Gauge,
        "Containers by state (Docker's status words).",
    );
    for (state, n) in &by_state {
        e.sample("berth_containers", &[("state", state)], *n as f64);
    }
    e.single(
        "berth_events_retained",
        Kind::Gauge,
        "Events kept for `docker events --since` (in memory and in events.log).",
        engine.hub.retained() as f64,
    );
    write_cgroup_metrics(&mut e, &readings);
    e.finish()
}

type Value = fn(&Reading) -> Option<f64>;

fn ns(v: u64) -> f64 {
    v as f64 / 1e9
}

fn mem(r: &Reading) -> Option<&types::MemoryStats> {
    r.stats.memory.as_ref()
}

fn cpu(r: &Reading) -> Option<&types::CpuStats> {
    r.stats.cpu.as_ref()
}

/// cAdvisor's working set: usage less the inactive page cache the kernel can drop.
fn working_set(m: &types::MemoryStats) -> u64 {
    let inactive = m
        .stats
        .get("total_inactive_file")
        .or_else(|| m.stats.get("inactive_file"))
        .copied()
        .unwrap_or(0);
    m.usage.saturating_sub(inactive)
}

/// The configured limit as the cgroup holds it; 0 when the container has none (cAdvisor's
/// `spec` value, where the cgroup's "limit" would be the host's memory).
fn memory_limit(r: &Reading) -> Option<f64> {
    let configured = r
        .rec
        .host_config()
        .resources
        .as_ref()
        .and_then(|res| res.memory)
        .unwrap_or(0);
    Some(if configured > 0 {
        mem(r).map(|m| m.limit as f64).unwrap_or(configured as f64)
    } else {
        0.0
    })
}

/// Per-container families: (name, kind, help, value).
const CONTAINER_METRICS: &[(&str, Kind, &str, Value)] = &[
    (
        "container_cpu_usage_seconds_total",
        Kind::Counter,
        "Cumulative cpu time consumed in seconds.",
        |r| cpu(r)?.usage.as_ref().map(|u| ns(u.total_ns)),
    ),
    (
        "container_cpu_user_seconds_total",
        Kind::Counter,
        "Cumulative user cpu time consumed in seconds.",
        |r| cpu(r)?.usage.as_ref().map(|u| ns(u.user_ns)),
    ),
    (
        "container_cpu_system_seconds_total",
        Kind::Counter,
        "Cumulative system cpu time consumed in seconds.",
        |r| cpu(r)?.usage.as_ref().map(|u| ns(u.kernel_ns)),
    ),
    (
        "container_cpu_cfs_periods_total",
        Kind::Counter,
        "Number of elapsed enforcement period intervals.",
        |r| cpu(r)?.throttling.as_ref().map(|t| t.periods as f64),
    ),
    (
        "container_cpu_cfs_throttled_periods_total",
        Kind::Counter,
        "Number of throttled period intervals.",
        |r| {
            cpu(r)?
                .throttling
                .as_ref()
                .map(|t| t.throttled_periods as f64)
        },
    ),
    (
        "container_cpu_cfs_throttled_seconds_total",
        Kind::Counter,
        "Total time duration the container has been throttled.",
        |r| cpu(r)?.throttling.as_ref().map(|t| ns(t.throttled_time_ns)),
    ),
    (
        "container_memory_usage_bytes",
        Kind::Gauge,
        "Current memory usage in bytes, including all memory regardless of when it was accessed.",
        |r| mem(r).map(|m| m.usage as f64),
    ),
    (
        "container_memory_working_set_bytes",
        Kind::Gauge,
        "Current working set in bytes.",
        |r| mem(r).map(|m| working_set(m) as f64),
    ),
    (
        "container_memory_max_usage_bytes",
        Kind::Gauge,
        "Maximum memory usage recorded in bytes.",
        |r| mem(r).map(|m| m.max_usage as f64),
    ),
    (
        "container_memory_rss",
        Kind::Gauge,
        "Size of RSS in bytes.",
        |r| {
            let m = mem(r)?;
            m.stats
                .get("total_rss")
                .or_else(|| m.stats.get("rss"))
                .or_else(|| m.stats.get("anon"))
                .map(|v| *v as f64)
        },
    ),
    (
        "container_memory_cache",
        Kind::Gauge,
        "Number of bytes of page cache memory.",
        |r| {
            let m = mem(r)?;
            m.stats
                .get("total_cache")
                .or_else(|| m.stats.get("cache"))
                .or_else(|| m.stats.get("file"))
                .map(|v| *v as f64)
        },
    ),
    (
        "container_memory_swap",
        Kind::Gauge,
        "Container swap usage in bytes.",
        |r| mem(r).map(|m| m.swap_usage as f64),
    ),
    (
        "container_memory_failcnt",
        Kind::Counter,
        "Number of memory usage hits limits.",
        |r| mem(r).map(|m| m.failcnt as f64),
    ),
    (
        "container_spec_memory_limit_bytes",
        Kind::Gauge,
        "Memory limit for the container (0: none).",
        memory_limit,
    ),
    (
        "container_threads",
        Kind::Gauge,
        "Number of threads running inside the container (pids.current).",
        |r| r.stats.pids.as_ref().map(|p| p.current as f64),
    ),
    (
        "container_threads_max",
        Kind::Gauge,
        "Maximum number of threads allowed inside the container (pids.max; 0: unlimited).",
        |r| r.stats.pids.as_ref().map(|p| p.limit as f64),
    ),
];

/// Per-device block I/O families: (name, help, which counters, op).
const BLKIO_METRICS: &[(&str, &str, bool, &str)] = &[
    (
        "container_fs_reads_bytes_total",
        "Cumulative count of bytes read.",
        true,
        "Read",
    ),
    (
        "container_fs_writes_bytes_total",
        "Cumulative count of bytes written.",
        true,
        "Write",
    ),
    (
        "container_fs_reads_total",
        "Cumulative count of reads completed.",
        false,
        "Read",
    ),
    (
        "container_fs_writes_total",
        "Cumulative count of writes completed.",
        false,
        "Write",
    ),
];

type NetValue = fn(&types::NetworkInterfaceStats) -> u64;

const NETWORK_METRICS: &[(&str, &str, NetValue)] = &[
    (
        "container_network_receive_bytes_total",
        "Cumulative count of bytes received.",
        |n| n.rx_bytes,
    ),
    (
        "container_network_receive_packets_total",
        "Cumulative count of packets received.",
        |n| n.rx_packets,
    ),
    (
        "container_network_receive_errors_total",
        "Cumulative count of errors encountered while receiving.",
        |n| n.rx_errors,
    ),
    (
        "container_network_receive_packets_dropped_total",
        "Cumulative count of packets dropped while receiving.",
        |n| n.rx_dropped,
    ),
    (
        "container_network_transmit_bytes_total",
        "Cumulative count of bytes transmitted.",
        |n| n.tx_bytes,
    ),
    (
        "container_network_transmit_packets_total",
        "Cumulative count of packets transmitted.",
        |n| n.tx_packets,
    ),
    (
        "container_network_transmit_errors_total",
        "Cumulative count of errors encountered while transmitting.",
        |n| n.tx_errors,
    ),
    (
        "container_network_transmit_packets_dropped_total",
        "Cumulative count of packets dropped while transmitting.",
        |n| n.tx_dropped,
    ),
];

/// The labels of a container: id, name, image, and the CRI's pod and namespace when set.
fn labels(rec: &Record) -> Vec<(&'static str, String)> {
    let mut l = vec![
        ("id", rec.c.id.clone()),
        ("name", rec.c.name.clone()),
        ("image", rec.c.image.clone()),
    ];
    let get = |k: &str| rec.c.config.as_ref().and_then(|c| c.labels.get(k)).cloned();
    if let Some(pod) = get("io.kubernetes.pod.name") {
        l.push(("pod", pod));
    }
    if let Some(ns) = get("io.kubernetes.pod.namespace") {
        l.push(("namespace", ns));
    }
    l
}

fn pairs<'a>(l: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    l.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn write_cgroup_metrics(e: &mut Exposition, readings: &[Reading]) {
    let base: Vec<Vec<(&'static str, String)>> = readings.iter().map(|r| labels(&r.rec)).collect();
    for (name, kind, help, value) in CONTAINER_METRICS {
        e.family(name, *kind, help);
        for (r, l) in readings.iter().zip(&base) {
            if let Some(v) = value(r) {
                e.sample(name, &pairs(l), v);
            }
        }
    }
    for (name, help, bytes, op) in BLKIO_METRICS {
        e.family(name, Kind::Counter, help);
        for (r, l) in readings.iter().zip(&base) {
            let Some(b) = r.stats.blkio.as_ref() else {
                continue;
            };
            let entries = if *bytes {
                &b.io_service_bytes_recursive
            } else {
                &b.io_serviced_recursive
            };
            let mut per_device: BTreeMap<String, u64> = BTreeMap::new();
            for entry in entries.iter().filter(|x| x.op.eq_ignore_ascii_case(op)) {
                *per_device
                    .entry(format!("{}:{}", entry.major, entry.minor))
                    .or_default() += entry.value;
            }
            for (device, v) in per_device {
                let mut labels = pairs(l);
                labels.push(("device", &device));
                e.sample(name, &labels, v as f64);
            }
        }
    }
    for (name, help, value) in NETWORK_METRICS {
        e.family(name, Kind::Counter, help);
        for (r, l) in readings.iter().zip(&base) {
            let ifaces: BTreeMap<_, _> = r.networks.iter().filter(|(i, _)| *i != "lo").collect();
            for (iface, n) in ifaces {
                let mut labels = pairs(l);
                labels.push(("interface", iface));
                e.sample(name, &labels, value(n) as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_fall_into_docker_meaningful_classes() {
        assert_eq!(code_class(0), "0");
        assert_eq!(code_class(3), "1-125");
        assert_eq!(code_class(127), "126-127");
        assert_eq!(code_class(137), "128+");
        assert_eq!(code_class(-1), "other");
    }

    #[test]
    fn working_set_drops_inactive_file_pages() {
        let mut m = types::MemoryStats {
            usage: 1000,
            ..Default::default()
        };
        m.stats.insert("total_inactive_file".into(), 300);
        assert_eq!(working_set(&m), 700);
        m.stats.insert("total_inactive_file".into(), 3000);
        assert_eq!(working_set(&m), 0);
    }

    #[test]
    fn a_reading_becomes_cadvisor_samples_with_container_labels() {
        let rec = Record {
            c: berth_proto::berth::engine::v1::Container {
                id: "abc".into(),
                name: "web".into(),
                image: "busybox".into(),
                ..Default::default()
            },
            p: Default::default(),
        };
        let reading = Reading {
            rec,
            stats: types::CgroupStats {
                cpu: Some(types::CpuStats {
                    usage: Some(types::CpuUsage {
                        total_ns: 2_500_000_000,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                memory: Some(types::MemoryStats {
                    usage: 4096,
                    limit: 1 << 40,
                    ..Default::default()
                }),
                blkio: Some(types::BlkioStats {
                    io_service_bytes_recursive: vec![types::BlkioEntry {
                        major: 8,
                        minor: 0,
                        op: "Read".into(),
                        value: 512,
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            },
            networks: [(
                "eth0".to_string(),
                types::NetworkInterfaceStats {
                    rx_bytes: 99,
                    ..Default::default()
                },
            )]
            .into_iter()
            .collect(),
        };
        let mut e = Exposition::new();
        write_cgroup_metrics(&mut e, &[reading]);
        let samples = berth_core::metrics::text::parse(&e.finish()).unwrap();
        let get = |n: &str| samples.iter().find(|s| s.name == n).unwrap();
        let cpu = get("container_cpu_usage_seconds_total");
        assert_eq!(cpu.value, 2.5);
        assert!(cpu.has(&[("id", "abc"), ("name", "web"), ("image", "busybox")]));
        assert_eq!(get("container_memory_usage_bytes").value, 4096.0);
        assert_eq!(
            get("container_spec_memory_limit_bytes").value,
            0.0,
            "no limit set"
        );
        assert!(get("container_fs_reads_bytes_total").has(&[("device", "8:0")]));
        let rx = get("container_network_receive_bytes_total");
        assert!(rx.has(&[("interface", "eth0")]) && rx.value == 99.0);
    }
}
