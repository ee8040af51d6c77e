//! CRI stats, metrics and container events on `<state>/cri.sock`, real binaries and the
//! reference CNI plugins: a pod with two busybox containers, one of which holds anonymous
//! memory, burned some CPU and wrote a file into its writable layer. ContainerStats and
//! ListContainerStats answer what the container's own cgroup files say (read by the test
//! before and after the call), the writable layer holds the file, the filters (id prefix, pod,
//! labels) choose; PodSandboxStats answers the pod cgroup's files (its cgroup parent) and the
//! pod's eth0; the metric descriptors name what ListPodSandboxMetrics answers; GetContainerEvents delivers created,
//! started, stopped and deleted for a container and for its sandbox, in order, with statuses;
//! unknown ids are NOT_FOUND. Root only; needs /usr/lib/cni.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use berth_integration::cri_kit::{
    self, CriStack, Runtime, plugins_ready, run_pod, sh_container, start_container,
};
use berth_proto::cri::runtime::v1 as cri;
use berth_proto::cri::runtime::v1::runtime_service_client::RuntimeServiceClient;
use tonic::Code;

type Events = tokio::sync::mpsc::UnboundedReceiver<cri::ContainerEventResponse>;

/// Anonymous memory the busy container keeps, and the file it writes into its rootfs.
const HELD_BYTES: u64 = 16 << 20;
const FILE_BYTES: u64 = 8 << 20;
/// What memory counters may move between two reads of an idle cgroup (the kernel's per-CPU
/// charge batches).
const SLACK: u64 = 1 << 20;

fn pod_config(log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        labels: [("app".to_string(), format!("stats-{}", std::process::id()))].into(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: pod_cgroup(),
            ..Default::default()
        }),
        ..cri_kit::pod_config("berth-cri-test", "stats", Some(log_dir))
    }
}

fn container(name: &str, script: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        labels: [("role".to_string(), name.to_string())].into(),
        ..sh_container(name, script)
    }
}

/// ContainerStats of `id`.
async fn container_stats(rt: &mut Runtime, id: &str) -> Result<cri::ContainerStats> {
    rt.container_stats(cri::ContainerStatsRequest {
        container_id: id.into(),
    })
    .await?
    .into_inner()
    .stats
    .context("no stats")
}

/// The pod's cgroup parent (unique to this test process).
fn pod_cgroup() -> String {
    format!("berth-cri-stats-{}", std::process::id())
}

/// Removes the pod's cgroups (runc makes the parent and leaves it) when dropped.
struct CgroupGuard;

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        for controller in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let parent = controller.path().join(pod_cgroup());
            for child in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                if child.path().is_dir() {
                    let _ = std::fs::remove_dir(child.path());
                }
            }
            let _ = std::fs::remove_dir(&parent);
        }
    }
}

/// The cgroup counters of a process, read as the kernel has them (v1 or v2).
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    cpu_ns: u64,
    usage: u64,
    working_set: u64,
    rss: u64,
}

fn cgroup_dirs(pid: u32) -> Result<HashMap<String, PathBuf>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let mut dirs = HashMap::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            dirs.insert("unified".into(), Path::new("/sys/fs/cgroup").join(path));
            dirs.insert(
                "unified-hybrid".into(),
                Path::new("/sys/fs/cgroup/unified").join(path),
            );
        }
        for c in controllers.split(',') {
            dirs.insert(
                c.to_string(),
                Path::new("/sys/fs/cgroup").join(c).join(path),
            );
        }
    }
    Ok(dirs)
}

fn keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
        .collect()
}

fn read_counters(pid: u32) -> Result<Counters> {
    read_dirs(&cgroup_dirs(pid)?)
}

/// The pod's cgroup parent's counters.
fn read_pod_counters() -> Result<Counters> {
    let root = Path::new("/sys/fs/cgroup");
    let dirs = ["memory", "cpuacct"]
        .into_iter()
        .map(|c| (c.to_string(), root.join(c).join(pod_cgroup())))
        .chain([("unified".to_string(), root.join(pod_cgroup()))])
        .collect();
    read_dirs(&dirs)
}

fn read_dirs(dirs: &HashMap<String, PathBuf>) -> Result<Counters> {
    let read = |p: PathBuf| std::fs::read_to_string(&p).with_context(|| p.display().to_string());
    if let Some(mem) = dirs
        .get("memory")
        .filter(|d| d.join("memory.stat").exists())
    {
        let cpu = dirs.get("cpuacct").context("no cpuacct cgroup")?;
        let usage: u64 = read(mem.join("memory.usage_in_bytes"))?.trim().parse()?;
        let stat = keyed(&read(mem.join("memory.stat"))?);
        return Ok(Counters {
            cpu_ns: read(cpu.join("cpuacct.usage"))?.trim().parse()?,
            usage,
            working_set: usage.saturating_sub(stat["total_inactive_file"]),
            rss: stat["total_rss"],
        });
    }
    let dir = dirs.get("unified").context("no cgroup")?;
    let usage: u64 = read(dir.join("memory.current"))?.trim().parse()?;
    let stat = keyed(&read(dir.join("memory.stat"))?);
    Ok(Counters {
        cpu_ns: keyed(&read(dir.join("cpu.stat"))?)["usage_usec"] * 1000,
        usage,
        working_set: usage.saturating_sub(stat["inactive_file"]),
        rss: stat["anon"],
    })
}

fn within(what: &str, got: u64, a: u64, b: u64, slack: u64) -> Result<()> {
    let (lo, hi) = (a.min(b).saturating_sub(slack), a.max(b) + slack);
    ensure!(
        (lo..=hi).contains(&got),
        "{what}: {got} not in the cgroup's {lo}..={hi}"
    );
    Ok(())
}

fn v(x: &Option<cri::UInt64Value>) -> u64 {
    x.as_ref().map_or(u64::MAX, |v| v.value)
}

async fn wait_log(path: &Path, line: &str) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().any(|l| l.ends_with(line)) {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("{} never said {line:?}: {text:?}", path.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Events until `done` says the list is complete (a generous bound only so a hang fails).
async fn collect_until(
    events: &mut Events,
    got: &mut Vec<cri::ContainerEventResponse>,
    done: impl Fn(&[cri::ContainerEventResponse]) -> bool,
) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(120);
    while !done(got) {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Some(e)) => got.push(e),
            Ok(None) => bail!("the event stream ended: {got:#?}"),
            Err(_) => bail!("events missing: {got:#?}"),
        }
    }
    Ok(())
}

fn kinds(events: &[cri::ContainerEventResponse], id: &str) -> Vec<cri::ContainerEventType> {
    events
        .iter()
        .filter(|e| e.container_id == id)
        .map(|e| e.container_event_type())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_metrics_and_events_of_a_pod() -> Result<()> {
    use cri::ContainerEventType as E;
    if !plugins_ready() {
        return Ok(());
    }
    // Dropped last: after the pod guard has removed the pod.
    let _cgroups = CgroupGuard;
    let s = CriStack::start("crs", 7)?;
    let (d, logs) = (&s.d, &s.logs);
    let mut rt = s.runtime();

    // Subscribed before anything happens; a second subscriber that never reads must not hold
    // the first one up.
    let mut stream = rt
        .get_container_events(cri::GetEventsRequest {})
        .await?
        .into_inner();
    let _idle_subscriber = RuntimeServiceClient::new(berth_core::uds::channel(d.cri_socket()))
        .get_container_events(cri::GetEventsRequest {})
        .await?
        .into_inner();
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(e)) = stream.message().await {
            if tx.send(e).is_err() {
                return;
            }
        }
    });

    let pod_config = pod_config(logs.path());
    let guard = run_pod(&mut rt, d, &pod_config).await?;
    let pod = guard.id.clone();
    let mut ids = HashMap::new();
    let busy_script = format!(
        "head -c {FILE_BYTES} /dev/zero > /written; \
         held=$(head -c {HELD_BYTES} /dev/zero | tr '\\000' a); \
         i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; \
         echo ready; while true; do sleep 1000; done"
    );
    for (name, script) in [
        ("busy", busy_script.as_str()),
        ("idle", "echo ready; exec sleep 1000"),
    ] {
        let id = start_container(&mut rt, &pod, &pod_config, container(name, script)).await?;
        ids.insert(name, id);
    }
    let (busy, idle) = (ids["busy"].clone(), ids["idle"].clone());
    for name in ["busy", "idle"] {
        wait_log(&logs.path().join(name).join("0.log"), " stdout F ready").await?;
    }
    let pid = |id: &str| -> Result<u32> {
        Ok(d.ok(&["inspect", "-f", "{{.State.Pid}}", id])?
            .trim()
            .parse()?)
    };
    let busy_pid = pid(&busy)?;

    // ContainerStats against the cgroup files.
    let before = read_counters(busy_pid)?;
    let stats = container_stats(&mut rt, &busy).await?;
    let after = read_counters(busy_pid)?;
    let attrs = stats.attributes.clone().unwrap_or_default();
    ensure!(
        attrs.id == busy && attrs.labels["role"] == "busy",
        "{attrs:?}"
    );
    ensure!(attrs.metadata.unwrap_or_default().name == "busy");
    let cpu = stats.cpu.context("no cpu")?;
    within(
        "usage_core_nano_seconds",
        v(&cpu.usage_core_nano_seconds),
        before.cpu_ns,
        after.cpu_ns,
        0,
    )?;
    ensure!(
        cpu.timestamp > 0 && cpu.usage_nano_cores.is_none(),
        "first reading: {cpu:?}"
    );
    let mem = stats.memory.context("no memory")?;
    within(
        "usage_bytes",
        v(&mem.usage_bytes),
        before.usage,
        after.usage,
        SLACK,
    )?;
    within(
        "working_set_bytes",
        v(&mem.working_set_bytes),
        before.working_set,
        after.working_set,
        SLACK,
    )?;
    within("rss_bytes", v(&mem.rss_bytes), before.rss, after.rss, SLACK)?;
    ensure!(
        v(&mem.rss_bytes) >= HELD_BYTES,
        "the held memory is anonymous: {mem:?}"
    );
    ensure!(
        v(&mem.page_faults) > 0 && v(&mem.major_page_faults) != u64::MAX,
        "{mem:?}"
    );
    // No limit: containerd's 0.
    ensure!(v(&mem.available_bytes) == 0, "{mem:?}");
    let layer = stats.writable_layer.clone().context("no writable layer")?;
    ensure!(
        v(&layer.used_bytes) >= FILE_BYTES && v(&layer.inodes_used) >= 1,
        "the written file is in the writable layer: {layer:?}"
    );
    ensure!(!layer.fs_id.unwrap_or_default().mountpoint.is_empty());
    ensure!(stats.swap.is_some(), "{stats:?}");

    // The second reading has a rate.
    let stats = container_stats(&mut rt, &busy).await?;
    ensure!(
        stats.cpu.and_then(|c| c.usage_nano_cores).is_some(),
        "second reading without usage_nano_cores"
    );

    // ListContainerStats and its filters.
    let list = |filter: cri::ContainerStatsFilter| {
        let mut rt = rt.clone();
        async move {
            let mut ids: Vec<String> = rt
                .list_container_stats(cri::ListContainerStatsRequest {
                    filter: Some(filter),
                })
                .await?
                .into_inner()
                .stats
                .into_iter()
                .map(|s| s.attributes.unwrap_or_default().id)
                .collect();
            ids.sort();
            anyhow::Ok(ids)
        }
    };
    let mut both = vec![busy.clone(), idle.clone()];
    both.sort();
    let by_pod = list(cri::ContainerStatsFilter {
        pod_sandbox_id: pod.clone(),
        ..Default::default()
    })
    .await?;
    ensure!(by_pod == both, "{by_pod:?}");
    let by_label = list(cri::ContainerStatsFilter {
        label_selector: [("role".to_string(), "idle".to_string())].into(),
        pod_sandbox_id: pod[..12].into(),
        ..Default::default()
    })
    .await?;
    ensure!(by_label == [idle.clone()], "{by_label:?}");
    let by_id = list(cri::ContainerStatsFilter {
        id: busy[..12].into(),
        ..Default::default()
    })
    .await?;
    ensure!(by_id == [busy.clone()], "{by_id:?}");
    let none = list(cri::ContainerStatsFilter {
        pod_sandbox_id: "f".repeat(64),
        ..Default::default()
    })
    .await?;
    ensure!(none.is_empty(), "{none:?}");

    // PodSandboxStats: the pod's cgroup and its eth0.
    let b0 = read_pod_counters()?;
    let ps = rt
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await?
        .into_inner()
        .stats
        .context("no pod stats")?;
    let b1 = read_pod_counters()?;
    ensure!(ps.attributes.clone().unwrap_or_default().id == pod);
    let linux = ps.linux.context("no linux pod stats")?;
    within(
        "pod usage_core_nano_seconds",
        v(&linux.cpu.unwrap_or_default().usage_core_nano_seconds),
        b0.cpu_ns,
        b1.cpu_ns,
        0,
    )?;
    let pod_memory = linux.memory.unwrap_or_default();
    within(
        "pod usage_bytes",
        v(&pod_memory.usage_bytes),
        b0.usage,
        b1.usage,
        SLACK,
    )?;
    within(
        "pod working_set_bytes",
        v(&pod_memory.working_set_bytes),
        b0.working_set,
        b1.working_set,
        SLACK,
    )?;
    ensure!(v(&pod_memory.rss_bytes) >= HELD_BYTES, "{pod_memory:?}");
    ensure!(linux.containers.len() == 2, "{:?}", linux.containers);
    // busy's sh and sleep, idle's sleep.
    ensure!(
        v(&linux.process.unwrap_or_default().process_count) >= 3,
        "{:?}",
        linux.process
    );
    let network = linux.network.context("no pod network")?;
    let eth0 = network.default_interface.context("no default interface")?;
    ensure!(eth0.name == "eth0", "{eth0:?}");
    let dev = std::fs::read_to_string(format!("/proc/{busy_pid}/net/dev"))?;
    let rx_now: u64 = dev
        .lines()
        .find(|l| l.trim_start().starts_with("eth0:"))
        .and_then(|l| l.split_once(':'))
        .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
        .context("no eth0 in the pod")?;
    ensure!(v(&eth0.rx_bytes) <= rx_now, "{eth0:?} vs {rx_now}");

    let listed = rt
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest {
            filter: Some(cri::PodSandboxStatsFilter {
                id: String::new(),
                label_selector: pod_config.labels.clone(),
            }),
        })
        .await?
        .into_inner()
        .stats;
    ensure!(
        listed.len() == 1 && listed[0].attributes.clone().unwrap_or_default().id == pod,
        "{listed:?}"
    );

    // Metrics.
    let descriptors = rt
        .list_metric_descriptors(cri::ListMetricDescriptorsRequest {})
        .await?
        .into_inner()
        .descriptors;
    let described: HashMap<String, Vec<String>> = descriptors
        .into_iter()
        .map(|d| (d.name, d.label_keys))
        .collect();
    for name in [
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_network_receive_bytes_total",
    ] {
        ensure!(described.contains_key(name), "{name} not described");
    }
    let metrics = rt
        .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
        .await?
        .into_inner()
        .pod_metrics;
    let ours = metrics
        .iter()
        .find(|p| p.pod_sandbox_id == pod)
        .context("our pod has no metrics")?;
    for m in ours
        .metrics
        .iter()
        .chain(ours.container_metrics.iter().flat_map(|c| &c.metrics))
    {
        let keys = described
            .get(&m.name)
            .with_context(|| format!("{} answered but not described", m.name))?;
        ensure!(keys.len() == m.label_values.len(), "{m:?} vs {keys:?}");
    }
    ensure!(
        ours.metrics
            .iter()
            .any(|m| m.name == "container_network_receive_bytes_total"
                && m.label_values.last().map(String::as_str) == Some("eth0")),
        "{:?}",
        ours.metrics
    );
    let busy_metrics = ours
        .container_metrics
        .iter()
        .find(|c| c.container_id == busy)
        .context("no metrics of busy")?;
    let ws = busy_metrics
        .metrics
        .iter()
        .find(|m| m.name == "container_memory_working_set_bytes")
        .context("no working set metric")?;
    ensure!(
        ws.label_values[..4]
            == [
                "stats".to_string(),
                "berth-cri-test".into(),
                "busy".into(),
                busy.clone()
            ],
        "{ws:?}"
    );
    let now = read_counters(busy_pid)?;
    within(
        "working set metric",
        v(&ws.value),
        now.working_set,
        now.working_set,
        2 * SLACK,
    )?;

    // Unknown ids.
    let unknown = "0".repeat(64);
    let err = rt
        .container_stats(cri::ContainerStatsRequest {
            container_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::NotFound, "{err:?}");
    let err = rt
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: unknown,
        })
        .await
        .unwrap_err();
    ensure!(err.code() == Code::NotFound, "{err:?}");

    // The lifecycle, ending with the pod's removal.
    rt.stop_container(cri::StopContainerRequest {
        container_id: busy.clone(),
        timeout: 1,
    })
    .await?;
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: busy.clone(),
    })
    .await?;
    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await?;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await?;
    let mut got = Vec::new();
    collect_until(&mut events, &mut got, |g| {
        kinds(g, &pod).contains(&E::ContainerDeletedEvent)
    })
    .await?;
    let lifecycle = [
        E::ContainerCreatedEvent,
        E::ContainerStartedEvent,
        E::ContainerStoppedEvent,
        E::ContainerDeletedEvent,
    ];
    ensure!(
        kinds(&got, &busy) == lifecycle,
        "busy: {:?}",
        kinds(&got, &busy)
    );
    ensure!(
        kinds(&got, &pod) == lifecycle,
        "pod: {:?}",
        kinds(&got, &pod)
    );
    ensure!(
        kinds(&got, &idle) == lifecycle,
        "idle: {:?}",
        kinds(&got, &idle)
    );
    ensure!(
        got.windows(2).all(|w| w[0].created_at <= w[1].created_at),
        "events in time order"
    );
    let started = got
        .iter()
        .find(|e| e.container_id == busy && e.container_event_type() == E::ContainerStartedEvent)
        .context("no started event")?;
    let pod_status = started
        .pod_sandbox_status
        .clone()
        .context("no pod status")?;
    ensure!(pod_status.id == pod, "{pod_status:?}");
    ensure!(
        started.containers_statuses.iter().any(|s| s.id == busy),
        "{:?}",
        started.containers_statuses
    );
    let deleted = got.last().context("no events")?;
    ensure!(
        deleted.container_id == pod && deleted.pod_sandbox_status.is_none(),
        "{deleted:?}"
    );
    Ok(())
}
