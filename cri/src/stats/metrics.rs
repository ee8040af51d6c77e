//! The metrics of `ListPodSandboxMetrics` and their descriptors: containerd's cAdvisor-style
//! set, the part berth's readings carry.

use berth_proto::berth::types::v1 as types;
use berth_proto::cri::runtime::v1 as cri;

use super::{Reading, now_nanos, value};
use crate::convert::nanos;

/// Which labels a metric has: containerd's base keys, plus the interface for network metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Labels {
    Base,
    Network,
}

const BASE_LABELS: &[&str] = &["pod", "namespace", "container", "id", "image"];
const NETWORK_LABELS: &[&str] = &["pod", "namespace", "container", "id", "image", "interface"];

#[derive(Debug)]
pub(super) struct Descriptor {
    pub(super) name: &'static str,
    pub(super) help: &'static str,
    labels: Labels,
    kind: cri::MetricType,
}

impl Descriptor {
    pub(super) fn labels(&self) -> &'static [&'static str] {
        match self.labels {
            Labels::Base => BASE_LABELS,
            Labels::Network => NETWORK_LABELS,
        }
    }
}

const fn counter(name: &'static str, help: &'static str) -> Descriptor {
    Descriptor {
        name,
        help,
        labels: Labels::Base,
        kind: cri::MetricType::Counter,
    }
}

const fn gauge(name: &'static str, help: &'static str) -> Descriptor {
    Descriptor {
        name,
        help,
        labels: Labels::Base,
        kind: cri::MetricType::Gauge,
    }
}

const fn net(name: &'static str, help: &'static str) -> Descriptor {
    Descriptor {
        name,
        help,
        labels: Labels::Network,
        kind: cri::MetricType::Counter,
    }
}

/// Names and help texts as containerd (and cAdvisor) have them.
pub(super) const DESCRIPTORS: &[Descriptor] = &[
    counter(
        "container_cpu_user_seconds_total",
        "Cumulative user CPU time consumed in seconds.",
    ),
    counter(
        "container_cpu_system_seconds_total",
        "Cumulative system CPU time consumed in seconds.",
    ),
    counter(
        "container_cpu_usage_seconds_total",
        "Cumulative CPU time consumed in seconds.",
    ),
    counter(
        "container_cpu_cfs_periods_total",
        "Number of elapsed enforcement period intervals.",
    ),
    counter(
        "container_cpu_cfs_throttled_periods_total",
        "Number of CPU throttled period intervals.",
    ),
    counter(
        "container_cpu_cfs_throttled_seconds_total",
        "Total time duration the container has been throttled.",
    ),
    gauge(
        "container_memory_cache",
        "Number of bytes of memory used by the container for caching purposes.",
    ),
    gauge(
        "container_memory_rss",
        "Size of RSS in bytes, total anonymous memory and swap cache memory used by the container.",
    ),
    gauge(
        "container_memory_mapped_file",
        "Size of container's memory mapped files in bytes.",
    ),
    gauge("container_memory_swap", "Container swap usage in bytes."),
    counter(
        "container_memory_failcnt",
        "Number of times container memory usage has hit its cgroup v1 upper memory limit, for cg2 this value is not currently supported",
    ),
    gauge(
        "container_memory_usage_bytes",
        "Current memory usage in bytes, including all memory regardless of when it was accessed",
    ),
    gauge(
        "container_memory_max_usage_bytes",
        "Maximum container memory usage recorded in bytes",
    ),
    gauge(
        "container_memory_working_set_bytes",
        "Amount of memory that is actively used by the container, excluding cached memory.",
    ),
    gauge(
        "container_memory_total_active_file_bytes",
        "Amount of cache memory bytes, in use by the container, in file on disk.",
    ),
    gauge(
        "container_memory_total_inactive_file_bytes",
        "Amount of inactive cache memory bytes, for the container, in file on disk.",
    ),
    net(
        "container_network_receive_bytes_total",
        "Cumulative count of bytes received",
    ),
    net(
        "container_network_receive_packets_total",
        "Cumulative count of packets received",
    ),
    net(
        "container_network_receive_packets_dropped_total",
        "Cumulative count of packets dropped while receiving",
    ),
    net(
        "container_network_receive_errors_total",
        "Cumulative count of errors encountered while receiving",
    ),
    net(
        "container_network_transmit_bytes_total",
        "Cumulative count of bytes transmitted",
    ),
    net(
        "container_network_transmit_packets_total",
        "Cumulative count of packets transmitted",
    ),
    net(
        "container_network_transmit_packets_dropped_total",
        "Cumulative count of packets dropped while transmitting",
    ),
    net(
        "container_network_transmit_errors_total",
        "Cumulative count of errors encountered while transmitting",
    ),
    gauge(
        "container_processes",
        "Number of processes running inside the container",
    ),
    gauge(
        "container_last_seen",
        "Last time a container was seen by the exporter",
    ),
    gauge(
        "container_start_time_seconds",
        "Start time of the container since unix epoch in seconds.",
    ),
];

fn metric(name: &str, labels: &[String], timestamp: i64, v: u64) -> cri::Metric {
    let kind = DESCRIPTORS
        .iter()
        .find(|d| d.name == name)
        .map_or(cri::MetricType::Gauge, |d| d.kind);
    cri::Metric {
        name: name.to_string(),
        timestamp,
        metric_type: kind as i32,
        label_values: labels.to_vec(),
        value: value(v),
    }
}

pub(super) fn network_metrics(
    n: &types::NetworkInterfaceStats,
    labels: &[String],
    at: i64,
) -> Vec<cri::Metric> {
    [
        ("container_network_receive_bytes_total", n.rx_bytes),
        ("container_network_receive_packets_total", n.rx_packets),
        (
            "container_network_receive_packets_dropped_total",
            n.rx_dropped,
        ),
        ("container_network_receive_errors_total", n.rx_errors),
        ("container_network_transmit_bytes_total", n.tx_bytes),
        ("container_network_transmit_packets_total", n.tx_packets),
        (
            "container_network_transmit_packets_dropped_total",
            n.tx_dropped,
        ),
        ("container_network_transmit_errors_total", n.tx_errors),
    ]
    .into_iter()
    .map(|(name, v)| metric(name, labels, at, v))
    .collect()
}

/// One running container's metrics. Times in whole seconds, as containerd reports them.
pub(super) fn container_metrics(
    r: &Reading,
    pod: &[String; 2],
    host_memory: u64,
) -> Vec<cri::Metric> {
    const NS: u64 = 1_000_000_000;
    let config = r.request.config.clone().unwrap_or_default();
    let labels = vec![
        pod[0].clone(),
        pod[1].clone(),
        config.metadata.map(|m| m.name).unwrap_or_default(),
        r.container.id.clone(),
        config.image.map(|i| i.image).unwrap_or_default(),
    ];
    let at = r.read_at();
    let now = now_nanos();
    let started = r
        .container
        .state
        .as_ref()
        .map_or(0, |s| nanos(s.started_at.as_ref()));
    let mut out = vec![
        metric(
            "container_last_seen",
            &labels,
            now,
            (now / 1_000_000_000) as u64,
        ),
        metric(
            "container_start_time_seconds",
            &labels,
            now,
            u64::try_from(started / 1_000_000_000).unwrap_or(0),
        ),
    ];
    if let Some(c) = r.cpu() {
        let u = c.usage.clone().unwrap_or_default();
        let t = c.throttling.unwrap_or_default();
        out.extend([
            metric(
                "container_cpu_usage_seconds_total",
                &labels,
                at,
                u.total_ns / NS,
            ),
            metric(
                "container_cpu_user_seconds_total",
                &labels,
                at,
                u.user_ns / NS,
            ),
            metric(
                "container_cpu_system_seconds_total",
                &labels,
                at,
                u.kernel_ns / NS,
            ),
            metric("container_cpu_cfs_periods_total", &labels, at, t.periods),
            metric(
                "container_cpu_cfs_throttled_periods_total",
                &labels,
                at,
                t.throttled_periods,
            ),
            metric(
                "container_cpu_cfs_throttled_seconds_total",
                &labels,
                at,
                t.throttled_time_ns / NS,
            ),
        ]);
    }
    if let Some(m) = r.memory(host_memory) {
        out.extend([
            metric("container_memory_usage_bytes", &labels, at, m.usage),
            metric("container_memory_max_usage_bytes", &labels, at, m.max_usage),
            metric(
                "container_memory_working_set_bytes",
                &labels,
                at,
                m.working_set,
            ),
            metric("container_memory_rss", &labels, at, m.rss),
            metric("container_memory_cache", &labels, at, m.cache),
            metric("container_memory_mapped_file", &labels, at, m.mapped_file),
            metric("container_memory_swap", &labels, at, m.swap),
            metric("container_memory_failcnt", &labels, at, m.failcnt),
            metric(
                "container_memory_total_active_file_bytes",
                &labels,
                at,
                m.active_file,
            ),
            metric(
                "container_memory_total_inactive_file_bytes",
                &labels,
                at,
                m.inactive_file,
            ),
        ]);
    }
    if let Some(s) = &r.sample {
        out.push(metric(
            "container_processes",
            &labels,
            at,
            u64::from(s.num_procs),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_are_unique_and_name_their_labels() {
        let mut names: Vec<_> = DESCRIPTORS.iter().map(|d| d.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DESCRIPTORS.len());
        let net = DESCRIPTORS
            .iter()
            .find(|d| d.name == "container_network_receive_bytes_total")
            .unwrap();
        assert_eq!(net.labels().last(), Some(&"interface"));
    }
}
