//! The Prometheus endpoint (`[telemetry] metrics_addr`) of a real stack, scraped before and
//! after known activity through the docker CLI and parsed as the text format: starts, exits by
//! class and an OOM kill counted; a container's memory limit and usage as its cgroup has them;
//! Docker API and gRPC calls counted and timed; every service up with its process metrics.
//!
//! Root only (mounts, netns, cgroups); skips cleanly otherwise.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail, ensure};
use berth_core::metrics::text::{Sample, parse};
use berth_integration::gateway_kit::{DockerStack, http_get, ready, run_for};
use berth_integration::images_kit::{Registry, RegistryOptions, free_port, oci_dir};
use berth_integration::stack::Stack;

struct Scrape(Vec<Sample>);

impl Scrape {
    fn take(addr: &str) -> Result<Self> {
        let resp = http_get(addr, "/metrics")?;
        let (head, body) = resp.split_once("\r\n\r\n").context("no header end")?;
        ensure!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        ensure!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        Ok(Self(parse(body)?))
    }

    /// Sum of the samples named `name` that carry every label of `labels` (0 when none).
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|s| s.name == name && s.has(labels))
            .map(|s| s.value)
            .sum()
    }

    fn one(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let found: Vec<&Sample> = self
            .0
            .iter()
            .filter(|s| s.name == name && s.has(labels))
            .collect();
        match found.as_slice() {
            [s] => Ok(s.value),
            other => bail!("{name} {labels:?}: {} samples", other.len()),
        }
    }
}

/// The container's cgroup file `v1_file` (memory controller) or `v2_file`.
fn cgroup_file(pid: &str, v1_file: &str, v2_file: &str) -> Result<u64> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let mut candidates: Vec<PathBuf> = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "memory") {
            candidates.push(
                PathBuf::from("/sys/fs/cgroup/memory")
                    .join(path)
                    .join(v1_file),
            );
        } else if controllers.is_empty() {
            candidates.push(PathBuf::from("/sys/fs/cgroup").join(path).join(v2_file));
            candidates.push(
                PathBuf::from("/sys/fs/cgroup/unified")
                    .join(path)
                    .join(v2_file),
            );
        }
    }
    for c in &candidates {
        if let Ok(text) = std::fs::read_to_string(c) {
            return Ok(text.trim().parse()?);
        }
    }
    bail!("no memory cgroup file among {candidates:?}")
}

#[test]
fn metrics_endpoint_counts_what_happened() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let registry = Registry::start(RegistryOptions::default())?;
    registry.push_oci(&oci_dir("busybox"), "busybox:latest")?;
    let addr = format!("127.0.0.1:{}", free_port());
    let d = DockerStack::start_with(&format!("[telemetry]\nmetrics_addr = \"{addr}\"\n"))?;
    let busybox = format!("{}/busybox:latest", registry.host);

    let before = Scrape::take(&addr)?;
    for service in ["snapshotter", "images", "network", "engine", "gateway"] {
        ensure!(
            before.one("berth_up", &[("service", service)])? == 1.0,
            "{service} down"
        );
        ensure!(
            before.one("process_resident_memory_bytes", &[("service", service)])? > 1e6,
            "{service} rss"
        );
        ensure!(before.one("process_open_fds", &[("service", service)])? >= 3.0);
    }

    // Known activity: a pull, two runs that exit 0 and 3, one that keeps running with a memory limit,
    // one OOM kill, one inspect of nothing.
    d.ok(&["pull", &busybox])?;
    d.ok(&["tag", &busybox, "busybox"])?;
    d.ok(&["run", "--rm", "busybox", "true"])?;
    let out = d.run(&["run", "--rm", "busybox", "sh", "-c", "exit 3"])?;
    ensure!(out.status.code() == Some(3), "{out:?}");
    let publish = format!("127.0.0.1:{}:80", free_port());
    let id = d.ok(&[
        "run", "-d", "--name", "met-mem", "-m", "64m", "-p", &publish, "busybox", "sleep", "300",
    ])?;
    let out = d.run(&[
        "run",
        "--name",
        "met-oom",
        "-m",
        "16m",
        "--memory-swap",
        "16m",
        "busybox",
        "tail",
        "/dev/zero",
    ])?;
    ensure!(out.status.code() == Some(137), "{out:?}");
    ensure!(d.ok(&["inspect", "-f", "{{.State.OOMKilled}}", "met-oom"])? == "true");
    ensure!(!d.run(&["inspect", "met-nothing"])?.status.success());

    let after = Scrape::take(&addr)?;
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);
    let engine = ("service", "engine");
    ensure!(delta("berth_container_starts_total", &[engine]) == 4.0);
    for (class, n) in [("0", 1.0), ("1-125", 1.0), ("128+", 1.0)] {
        let got = delta(
            "berth_container_exits_total",
            &[engine, ("code_class", class)],
        );
        ensure!(got == n, "exits of class {class}: {got}");
    }
    ensure!(delta("berth_container_oom_kills_total", &[engine]) == 1.0);
    ensure!(after.one("berth_containers", &[engine, ("state", "running")])? == 1.0);
    ensure!(after.one("berth_containers", &[engine, ("state", "exited")])? == 1.0);
    // create, start, die for each of the four runs at least (plus destroy, oom, …).
    ensure!(delta("berth_events_total", &[engine, ("type", "container")]) >= 12.0);
    ensure!(after.one("berth_events_retained", &[engine])? >= 12.0);

    // Images, network, snapshotter.
    let images = ("service", "images");
    ensure!(delta("berth_image_pulls_total", &[images, ("result", "ok")]) == 1.0);
    let pulled = delta("berth_image_pull_bytes_total", &[images]);
    let store = after.one("berth_image_content_store_bytes", &[images])?;
    ensure!(
        pulled > 0.0 && pulled <= store,
        "pulled {pulled}, store {store}"
    );
    ensure!(delta("berth_image_layers_unpacked_total", &[images]) >= 1.0);
    ensure!(after.one("berth_images", &[images])? >= 1.0);
    let bridge = [("service", "network"), ("driver", "bridge")];
    ensure!(after.one("berth_network_endpoints", &bridge)? >= 1.0);
    let ports = d.ok(&["port", "met-mem"])?;
    ensure!(
        after.one("berth_network_published_ports", &bridge)? >= 1.0,
        "docker port: {ports}; {:?}",
        after
            .0
            .iter()
            .filter(|s| s.name.starts_with("berth_network"))
            .collect::<Vec<_>>()
    );
    let snap = ("service", "snapshotter");
    ensure!(after.one("berth_snapshots", &[snap, ("kind", "committed")])? >= 1.0);
    ensure!(after.one("berth_snapshots", &[snap, ("kind", "active")])? >= 1.0);
    ensure!(after.one("berth_snapshot_disk_bytes", &[snap, ("kind", "committed")])? > 0.0);

    // The running container's cgroup, as the scrape saw it and as the kernel has it.
    let c = [
        ("id", id.as_str()),
        ("name", "met-mem"),
        ("image", "busybox"),
    ];
    let pid = d.ok(&["inspect", "-f", "{{.State.Pid}}", "met-mem"])?;
    let limit = cgroup_file(&pid, "memory.limit_in_bytes", "memory.max")?;
    ensure!(limit == 64 << 20, "cgroup limit {limit}");
    ensure!(after.one("container_spec_memory_limit_bytes", &c)? == limit as f64);
    let usage = after.one("container_memory_usage_bytes", &c)?;
    let now = cgroup_file(&pid, "memory.usage_in_bytes", "memory.current")? as f64;
    ensure!(
        usage > 0.0 && (usage - now).abs() <= (1 << 20) as f64,
        "scraped usage {usage}, cgroup now {now}"
    );
    ensure!(after.one("container_memory_working_set_bytes", &c)? <= usage);
    ensure!(after.one("container_cpu_usage_seconds_total", &c)? > 0.0);
    ensure!(after.one("container_threads", &c)? >= 1.0);
    ensure!(after.sum("container_network_receive_packets_total", &c) >= 0.0);
    ensure!(
        after
            .0
            .iter()
            .any(|s| s.name == "container_network_transmit_bytes_total" && s.has(&c)),
        "no network counters for the container"
    );

    // Requests: the Docker API by route and status, gRPC by method and code, each timed.
    let create = [
        ("service", "gateway"),
        ("method", "POST"),
        ("route", "/containers/create"),
    ];
    let created = [create.as_slice(), &[("status", "201")]].concat();
    ensure!(delta("berth_http_requests_total", &created) == 4.0);
    ensure!(delta("berth_http_request_duration_seconds_count", &created) == 4.0);
    ensure!(delta("berth_http_request_duration_seconds_sum", &created) > 0.0);
    let missing = [
        ("service", "gateway"),
        ("route", "/containers/{id}/json"),
        ("status", "404"),
    ];
    ensure!(delta("berth_http_requests_total", &missing) >= 1.0);
    let grpc_create = [
        engine,
        ("method", "/berth.engine.v1.Containers/Create"),
        ("code", "OK"),
    ];
    ensure!(delta("berth_grpc_requests_total", &grpc_create) == 4.0);
    ensure!(delta("berth_grpc_request_duration_seconds_count", &grpc_create) == 4.0);
    let not_found = [engine, ("code", "NotFound")];
    ensure!(delta("berth_grpc_requests_total", &not_found) >= 1.0);
    ensure!(
        after.sum(
            "berth_grpc_request_duration_seconds_bucket",
            &[engine, ("le", "+Inf")]
        ) == after.sum("berth_grpc_request_duration_seconds_count", &[engine])
    );

    // `berth status` reads the same metrics: memory, request rate and error share per service.
    let out = d.stack.berth("status").output()?;
    let status = String::from_utf8_lossy(&out.stdout);
    println!("{status}");
    ensure!(out.status.success(), "berth status: {status}");
    for service in ["snapshotter", "images", "network", "engine", "gateway"] {
        let row: Vec<&str> = status
            .lines()
            .find(|l| l.starts_with(&format!("{service} ")))
            .context("no row")?
            .split_whitespace()
            .collect();
        ensure!(row[4].ends_with("MiB") && row[4] != "0.0MiB", "{row:?}");
        let rate: f64 = row[5].parse()?;
        let err: f64 = row[6].parse()?;
        ensure!((0.0..=100.0).contains(&err), "{row:?}");
        if service == "engine" || service == "gateway" {
            ensure!(rate > 0.0, "{row:?}");
        }
    }

    d.ok(&["rm", "-f", "met-mem", "met-oom"])?;
    Ok(())
}

#[test]
fn a_metrics_address_beyond_loopback_is_refused() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let (_dir, mut cmd) = Stack::builder()
        .toml("[telemetry]\nmetrics_addr = \"0.0.0.0:9323\"\n")
        .prepare()?;
    let out = run_for(&mut cmd, std::time::Duration::from_secs(30))?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "berth up accepted it");
    ensure!(err.contains("metrics_allow_remote"), "{err}");
    Ok(())
}
