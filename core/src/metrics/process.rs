//! This process's own metrics, read from `/proc/self` at scrape time (the names the Prometheus
//! client libraries use).

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use super::{Exposition, Kind};

static START: OnceLock<f64> = OnceLock::new();

/// The process start time (seconds since the epoch), fixed at the first call.
pub fn start_time() -> f64 {
    *START.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    })
}

fn page_size() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as f64 } else { 4096.0 }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 { n as f64 } else { 100.0 }
}

/// Resident and virtual memory in bytes, from `/proc/self/statm`.
fn memory() -> Option<(f64, f64)> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let mut f = statm.split_whitespace();
    let size: f64 = f.next()?.parse().ok()?;
    let resident: f64 = f.next()?.parse().ok()?;
    Some((resident * page_size(), size * page_size()))
}

/// User plus system CPU seconds, from `/proc/self/stat`.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

fn open_fds() -> Option<f64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as f64)
}

/// The process families as exposition text.
pub fn render() -> String {
    let mut e = Exposition::new();
    if let Some((rss, vsz)) = memory() {
        e.single(
            "process_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory size in bytes.",
            rss,
        );
        e.single(
            "process_virtual_memory_bytes",
            Kind::Gauge,
            "Virtual memory size in bytes.",
            vsz,
        );
    }
    if let Some(fds) = open_fds() {
        e.single(
            "process_open_fds",
            Kind::Gauge,
            "Open file descriptors.",
            fds,
        );
    }
    if let Some(cpu) = cpu_seconds() {
        e.single(
            "process_cpu_seconds_total",
            Kind::Counter,
            "User and system CPU time spent in seconds.",
            cpu,
        );
    }
    e.single(
        "process_start_time_seconds",
        Kind::Gauge,
        "Start time of the process since the epoch in seconds.",
        start_time(),
    );
    e.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let samples = super::super::text::parse(&render()).unwrap();
        let get = |n: &str| samples.iter().find(|s| s.name == n).map(|s| s.value);
        assert!(get("process_resident_memory_bytes").unwrap() > 1e6);
        assert!(get("process_open_fds").unwrap() >= 3.0);
        assert!(get("process_cpu_seconds_total").unwrap() >= 0.0);
        assert!(get("process_start_time_seconds").unwrap() > 1.6e9);
    }
}
