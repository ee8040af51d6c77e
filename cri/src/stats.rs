//! The CRI's stats and metrics methods: `ContainerStats`, `ListContainerStats`,
//! `PodSandboxStats`, `ListPodSandboxStats`, `ListMetricDescriptors` and
//! `ListPodSandboxMetrics`, with containerd's semantics.
//!
//! Every number comes from one reading per container per call: the engine's one-shot `Stats`
//! sample (the container's cgroup read once by its shim, the same reading `docker stats` and the
//! engine's metrics scrape use), the snapshotter's `Usage` of the container's writable snapshot,
//! and, for pods, the interface counters read inside the pod's network namespace.
//!
//! A pod's CPU and memory are its cgroup's (its `cgroup_parent`, read here once: the engine has
//! no pod-level reading), as containerd reports them. A pod without a cgroup parent has no
//! cgroup of its own (berth's pods have no pause process): its figures are then the sums over
//! its running containers (one that has exited no longer counts, so the CPU total can go down;
//! `usage_nano_cores` is then left out, as containerd does when a counter goes back).
//!
//! `usage_nano_cores` is computed as containerd computes it: from the previous reading of the
//! same container (or pod) kept here, `Δusage / Δtime`; the first reading has none.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use berth_core::uds::{Channel, channel};
use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::engine::v1::tasks_client::TasksClient;
use berth_proto::berth::types::v1 as types;
use berth_proto::containerd::services::snapshots::v1 as snapshots;
use berth_proto::containerd::services::snapshots::v1::snapshots_client::SnapshotsClient;
use berth_proto::cri::runtime::v1 as cri;
use futures::StreamExt;

use crate::backend::Fut;
use crate::containers::{ContainerStore, blob_of};
use crate::convert::{nanos, not_found_is_none, required_id};
use crate::pods::SandboxStore;

mod metrics;

use metrics::{DESCRIPTORS, container_metrics, network_metrics};

/// Containers read at once in a list call.
const CONCURRENCY: usize = 8;
/// A memory limit above this is "unlimited" (containerd's bound).
const UNLIMITED: u64 = 1 << 62;
/// The interface kubelet reads a pod's network from first.
const DEFAULT_INTERFACE: &str = "eth0";

/// Where the counters come from.
pub trait StatsSource: Send + Sync + 'static {
    /// One reading of container `id`'s counters (the engine's one-shot sample); `None` when the
    /// container is gone.
    fn sample<'a>(&'a self, id: &'a str) -> Fut<'a, Option<pb::ContainerStats>>;
    /// Bytes and inodes of snapshot `key` (`snapshotter` "" = the default); `None` when it is
    /// gone.
    fn layer<'a>(&'a self, snapshotter: &'a str, key: &'a str) -> Fut<'a, Option<(u64, u64)>>;
    /// Interface counters (without `lo`) in the network namespace file `netns`.
    fn interfaces<'a>(&'a self, netns: &'a str) -> Fut<'a, Vec<Interface>>;
    /// The host's memory, bytes (a limit this large is no limit).
    fn host_memory(&self) -> u64;
    /// The counters of the cgroup `parent` (a pod's cgroupfs `cgroup_parent`); `None` when it
    /// does not exist (yet: runc makes it with the pod's first container).
    fn pod_cgroup<'a>(&'a self, parent: &'a str) -> Fut<'a, Option<PodCgroup>>;
}

/// A pod cgroup's CPU time and memory, read once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodCgroup {
    pub cpu_ns: u64,
    /// As the engine reports a container's (`memory.stat` keys as read).
    pub memory: types::MemoryStats,
    pub v2: bool,
}

/// Where the cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Reads the pod cgroup `parent` under `root` with the engine's and shim's reader
/// (`berth_core::cgroup`): the unified hierarchy when `root` is one (`cgroup.controllers`),
/// otherwise v1's `cpuacct` and `memory` (also in hybrid layouts, where the engine's containers
/// use v1). `None` when the cgroup does not exist.
fn read_pod_cgroup(root: &std::path::Path, parent: &str) -> Option<PodCgroup> {
    use berth_core::cgroup::Cgroup;
    let parent = parent.trim_matches('/');
    if parent.is_empty() || parent.split('/').any(|p| p == "..") {
        return None;
    }
    let v2 = root.join("cgroup.controllers").exists();
    let cgroup = if v2 {
        Cgroup::V2(root.join(parent))
    } else {
        Cgroup::V1(
            ["cpuacct", "memory"]
                .into_iter()
                .map(|c| (c.to_string(), root.join(c).join(parent)))
                .collect(),
        )
    };
    let stats = cgroup.stats().ok()?;
    let cpu_ns = stats.cpu.total_ns;
    let memory = types::CgroupStats::from(stats).memory.unwrap_or_default();
    Some(PodCgroup { cpu_ns, memory, v2 })
}

/// One interface's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub counters: types::NetworkInterfaceStats,
}

/// [`StatsSource`] over berth-engine's `Tasks.Stats`, the snapshotter and the host's procfs.
#[derive(Debug, Clone)]
pub struct GrpcStatsSource {
    tasks: TasksClient<Channel>,
    snapshots: SnapshotsClient<Channel>,
    snapshotter: String,
}

impl GrpcStatsSource {
    /// A source over the services `sockets` names; `snapshotter` is the default snapshotter.
    pub fn new(sockets: &crate::Sockets, snapshotter: &str) -> Self {
        Self {
            tasks: TasksClient::new(channel(&sockets.engine))
                .max_decoding_message_size(crate::MAX_MESSAGE),
            snapshots: SnapshotsClient::new(channel(&sockets.snapshotter)),
            snapshotter: snapshotter.to_string(),
        }
    }
}

impl StatsSource for GrpcStatsSource {
    fn sample<'a>(&'a self, id: &'a str) -> Fut<'a, Option<pb::ContainerStats>> {
        Box::pin(async move {
            let r = self
                .tasks
                .clone()
                .stats(pb::StatsRequest {
                    id: id.to_string(),
                    stream: false,
                    one_shot: true,
                })
                .await;
            let Some(response) = not_found_is_none(r)? else {
                return Ok(None);
            };
            let mut stream = response.into_inner();
            match stream.next().await {
                Some(Ok(r)) => Ok(r.stats),
                Some(Err(status)) => not_found_is_none(Err::<(), _>(status)).map(|_| None),
                None => Ok(None),
            }
        })
    }

    fn layer<'a>(&'a self, snapshotter: &'a str, key: &'a str) -> Fut<'a, Option<(u64, u64)>> {
        Box::pin(async move {
            if key.is_empty() {
                return Ok(None);
            }
            let snapshotter = if snapshotter.is_empty() {
                self.snapshotter.clone()
            } else {
                snapshotter.to_string()
            };
            let r = self
                .snapshots
                .clone()
                .usage(snapshots::UsageRequest {
                    snapshotter,
                    key: key.to_string(),
                })
                .await;
            Ok(not_found_is_none(r)?.map(|u| {
                let u = u.into_inner();
                (
                    u64::try_from(u.size).unwrap_or(0),
                    u64::try_from(u.inodes).unwrap_or(0),
                )
            }))
        })
    }

    fn interfaces<'a>(&'a self, netns: &'a str) -> Fut<'a, Vec<Interface>> {
        let netns = netns.to_string();
        Box::pin(async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            // A thread of its own: setns changes only the calling thread, which ends right
            // after (a pooled thread would stay in the pod's namespace).
            std::thread::spawn(move || {
                let read = || -> std::io::Result<String> {
                    let ns = std::fs::File::open(&netns)?;
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)?;
                    std::fs::read_to_string("/proc/thread-self/net/dev")
                };
                let _ = tx.send(read());
            });
            let text = rx
                .await
                .map_err(|_| Error::internal("the network counters thread ended early"))?
                .map_err(|e| Error::internal("read the pod's network counters").with_source(e))?;
            Ok(parse_net_dev(&text))
        })
    }

    fn pod_cgroup<'a>(&'a self, parent: &'a str) -> Fut<'a, Option<PodCgroup>> {
        let parent = parent.to_string();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                read_pod_cgroup(std::path::Path::new(CGROUP_ROOT), &parent)
            })
            .await
            .map_err(|e| Error::internal("read the pod's cgroup").with_source(e))
        })
    }

    fn host_memory(&self) -> u64 {
        berth_core::procfs::host_memory()
    }
}

/// Interface counters from a `/proc/.../net/dev` text, without `lo`, in the file's order.
fn parse_net_dev(text: &str) -> Vec<Interface> {
    berth_core::procfs::parse_net_dev(text)
        .into_iter()
        .map(|(name, counters)| Interface { name, counters })
        .collect()
}

/// One container's reading: its record, its CRI request, the counters (`None` when it is not
/// running) and its writable layer's usage.
#[derive(Debug, Clone)]
struct Reading {
    container: pb::Container,
    request: cri::CreateContainerRequest,
    sample: Option<pb::ContainerStats>,
    layer: Option<(u64, u64)>,
    layer_at: i64,
}

impl Reading {
    fn cgroup(&self) -> Option<&types::CgroupStats> {
        self.sample.as_ref().and_then(|s| s.stats.as_ref())
    }

    fn read_at(&self) -> i64 {
        nanos(self.cgroup().and_then(|s| s.read.as_ref()))
    }

    fn memory(&self, host_memory: u64) -> Option<Memory> {
        let stats = self.cgroup()?;
        let v2 = stats.cgroup_version() == types::CgroupVersion::V2;
        stats
            .memory
            .as_ref()
            .map(|m| Memory::of(m, v2, host_memory))
    }

    fn cpu(&self) -> Option<&types::CpuStats> {
        self.cgroup().and_then(|s| s.cpu.as_ref())
    }

    fn pod_id(&self) -> &str {
        &self.request.pod_sandbox_id
    }
}

/// The memory figures the CRI and the metrics want, from one cgroup reading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Memory {
    usage: u64,
    max_usage: u64,
    working_set: u64,
    /// 0 without a limit (containerd's answer).
    available: u64,
    rss: u64,
    cache: u64,
    mapped_file: u64,
    active_file: u64,
    inactive_file: u64,
    page_faults: u64,
    major_page_faults: u64,
    failcnt: u64,
    swap: u64,
    /// 0 without a swap limit.
    swap_available: u64,
}

impl Memory {
    /// cgroup v1 names the hierarchical counters `total_*`; v2's are hierarchical already.
    fn of(m: &types::MemoryStats, v2: bool, host_memory: u64) -> Self {
        let stat = |v1: &str, v2name: &str| -> u64 {
            let key = if v2 { v2name } else { v1 };
            m.stats.get(key).copied().unwrap_or(0)
        };
        let inactive_file = stat("total_inactive_file", "inactive_file");
        let working_set = m.usage.saturating_sub(inactive_file);
        let limited = |limit: u64| {
            limit != 0 && limit <= UNLIMITED && (host_memory == 0 || limit < host_memory)
        };
        Self {
            usage: m.usage,
            max_usage: m.max_usage,
            working_set,
            available: if limited(m.limit) {
                m.limit.saturating_sub(working_set)
            } else {
                0
            },
            rss: stat("total_rss", "anon"),
            cache: stat("total_cache", "file"),
            mapped_file: stat("total_mapped_file", "file_mapped"),
            active_file: stat("total_active_file", "active_file"),
            inactive_file,
            page_faults: stat("total_pgfault", "pgfault"),
            major_page_faults: stat("total_pgmajfault", "pgmajfault"),
            failcnt: m.failcnt,
            swap: m.swap_usage,
            swap_available: if m.swap_limit != 0 && m.swap_limit <= UNLIMITED {
                m.swap_limit.saturating_sub(m.swap_usage)
            } else {
                0
            },
        }
    }

    fn add(&mut self, o: &Memory) {
        self.usage += o.usage;
        self.max_usage += o.max_usage;
        self.working_set += o.working_set;
        self.available += o.available;
        self.rss += o.rss;
        self.cache += o.cache;
        self.mapped_file += o.mapped_file;
        self.active_file += o.active_file;
        self.inactive_file += o.inactive_file;
        self.page_faults += o.page_faults;
        self.major_page_faults += o.major_page_faults;
        self.failcnt += o.failcnt;
        self.swap += o.swap;
        self.swap_available += o.swap_available;
    }

    fn usage(&self, timestamp: i64) -> cri::MemoryUsage {
        cri::MemoryUsage {
            timestamp,
            working_set_bytes: value(self.working_set),
            available_bytes: value(self.available),
            usage_bytes: value(self.usage),
            rss_bytes: value(self.rss),
            page_faults: value(self.page_faults),
            major_page_faults: value(self.major_page_faults),
        }
    }
}

fn value(value: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value })
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// The last CPU readings, by container id and by pod id.
#[derive(Debug, Default)]
struct Previous {
    containers: HashMap<String, CpuSample>,
    pods: HashMap<String, CpuSample>,
}

/// A previous CPU reading: cumulative usage (ns) and when it was read (ns since the epoch).
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    usage: u64,
    at: i64,
}

/// The six stats and metrics methods.
pub struct Stats {
    containers: Arc<dyn ContainerStore>,
    sandboxes: Arc<dyn SandboxStore>,
    source: Arc<dyn StatsSource>,
    /// The snapshotter's root, the writable layers' `fs_id` (as `ImageFsInfo` names it).
    mountpoint: String,
    /// The last CPU reading of each container and pod, for `usage_nano_cores`.
    previous: Mutex<Previous>,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

impl Stats {
    /// Stats of the containers and pods in the stores, counters from `source`.
    pub fn new(
        containers: impl ContainerStore,
        sandboxes: impl SandboxStore,
        source: impl StatsSource,
        mountpoint: String,
    ) -> Self {
        Self {
            containers: Arc::new(containers),
            sandboxes: Arc::new(sandboxes),
            source: Arc::new(source),
            mountpoint,
            previous: Mutex::new(Previous::default()),
        }
    }

    /// ContainerStats: NOT_FOUND for an unknown id or a container that is not a pod's.
    pub async fn container(
        &self,
        req: cri::ContainerStatsRequest,
    ) -> Result<cri::ContainerStatsResponse> {
        let id = required_id(&req.container_id, "container_id")?;
        let container = self
            .containers
            .get(id)
            .await?
            .ok_or_else(|| Error::not_found(format!("container {id} not found")))?;
        let request = blob_of(&container)
            .ok_or_else(|| Error::not_found(format!("container {id} is not a CRI container")))?;
        let reading = self.read(container, request).await?;
        let host = self.source.host_memory();
        Ok(cri::ContainerStatsResponse {
            stats: Some(self.container_stats(&reading, host)),
        })
    }

    /// ListContainerStats: every pod container matching the filter (id prefix, pod sandbox id
    /// prefix, every label of the selector).
    pub async fn list_containers(
        &self,
        req: cri::ListContainerStatsRequest,
    ) -> Result<cri::ListContainerStatsResponse> {
        let filter = req.filter.unwrap_or_default();
        let all = self.cri_containers().await?;
        let unfiltered = filter == cri::ContainerStatsFilter::default();
        if unfiltered {
            self.forget_except(false, all.iter().map(|(c, _)| c.id.as_str()));
        }
        let chosen = all
            .into_iter()
            .filter(|(c, r)| container_matches(c, r, &filter))
            .collect();
        let readings = self.read_all(chosen).await;
        let host = self.source.host_memory();
        Ok(cri::ListContainerStatsResponse {
            stats: readings
                .iter()
                .map(|r| self.container_stats(r, host))
                .collect(),
        })
    }

    /// PodSandboxStats: NOT_FOUND for an unknown pod, UNAVAILABLE for one that is not ready
    /// (containerd's answers).
    pub async fn pod(
        &self,
        req: cri::PodSandboxStatsRequest,
    ) -> Result<cri::PodSandboxStatsResponse> {
        let id = required_id(&req.pod_sandbox_id, "pod_sandbox_id")?;
        let sandbox = self
            .sandboxes
            .get(id, false)
            .await?
            .and_then(|g| g.sandbox)
            .ok_or_else(|| Error::not_found(format!("pod sandbox {id} not found")))?;
        if sandbox.state() != pb::SandboxState::Ready {
            return Err(Error::unavailable(format!(
                "pod sandbox {} is not ready",
                sandbox.id
            )));
        }
        let containers = self
            .cri_containers()
            .await?
            .into_iter()
            .filter(|(_, r)| r.pod_sandbox_id == sandbox.id)
            .collect();
        let readings = self.read_all(containers).await;
        Ok(cri::PodSandboxStatsResponse {
            stats: Some(self.pod_stats(&sandbox, &readings).await),
        })
    }

    /// ListPodSandboxStats: the ready pods matching the filter (id prefix, every label).
    pub async fn list_pods(
        &self,
        req: cri::ListPodSandboxStatsRequest,
    ) -> Result<cri::ListPodSandboxStatsResponse> {
        let filter = req.filter.unwrap_or_default();
        let (pods, readings) = self.ready_pods(&filter).await?;
        let mut stats = Vec::with_capacity(pods.len());
        for pod in &pods {
            let own: Vec<Reading> = readings
                .iter()
                .filter(|r| r.pod_id() == pod.id)
                .cloned()
                .collect();
            stats.push(self.pod_stats(pod, &own).await);
        }
        Ok(cri::ListPodSandboxStatsResponse { stats })
    }

    /// ListMetricDescriptors: the metrics `ListPodSandboxMetrics` answers.
    pub fn descriptors(&self) -> cri::ListMetricDescriptorsResponse {
        cri::ListMetricDescriptorsResponse {
            descriptors: DESCRIPTORS
                .iter()
                .map(|d| cri::MetricDescriptor {
                    name: d.name.into(),
                    help: d.help.into(),
                    label_keys: d.labels().iter().map(|k| k.to_string()).collect(),
                })
                .collect(),
        }
    }

    /// ListPodSandboxMetrics: cAdvisor's metrics for every ready pod and its running
    /// containers, from the same readings as the stats.
    pub async fn metrics(&self) -> Result<cri::ListPodSandboxMetricsResponse> {
        let (pods, readings) = self
            .ready_pods(&cri::PodSandboxStatsFilter::default())
            .await?;
        let host = self.source.host_memory();
        let mut pod_metrics = Vec::with_capacity(pods.len());
        for pod in &pods {
            let meta = pod
                .config
                .as_ref()
                .and_then(|c| c.metadata.clone())
                .unwrap_or_default();
            let base = [meta.name, meta.namespace];
            let now = now_nanos();
            let mut metrics = Vec::new();
            if let Some(netns) = pod_netns(pod) {
                let ifaces = self.source.interfaces(&netns).await.unwrap_or_else(|e| {
                    tracing::debug!(pod = %pod.id, error = %e.chain(), "pod network counters");
                    Vec::new()
                });
                for iface in ifaces {
                    let labels = vec![
                        base[0].clone(),
                        base[1].clone(),
                        String::new(),
                        pod.id.clone(),
                        String::new(),
                        iface.name.clone(),
                    ];
                    metrics.extend(network_metrics(&iface.counters, &labels, now));
                }
            }
            let container_metrics = readings
                .iter()
                .filter(|r| r.pod_id() == pod.id && r.cgroup().is_some())
                .map(|r| cri::ContainerMetrics {
                    container_id: r.container.id.clone(),
                    metrics: container_metrics(r, &base, host),
                })
                .collect();
            pod_metrics.push(cri::PodSandboxMetrics {
                pod_sandbox_id: pod.id.clone(),
                metrics,
                container_metrics,
            });
        }
        Ok(cri::ListPodSandboxMetricsResponse { pod_metrics })
    }

    /// The ready pods matching `filter` and the readings of all their containers.
    async fn ready_pods(
        &self,
        filter: &cri::PodSandboxStatsFilter,
    ) -> Result<(Vec<pb::Sandbox>, Vec<Reading>)> {
        let mut filters = vec![types::Filter {
            key: "state".into(),
            value: "ready".into(),
        }];
        if !filter.id.is_empty() {
            filters.push(types::Filter {
                key: "id".into(),
                value: filter.id.clone(),
            });
        }
        let pods: Vec<pb::Sandbox> = self
            .sandboxes
            .list(filters)
            .await?
            .into_iter()
            .filter(|s| {
                let labels = s.config.as_ref().map(|c| &c.labels);
                filter
                    .label_selector
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            })
            .collect();
        let all = self.cri_containers().await?;
        if filter == &cri::PodSandboxStatsFilter::default() {
            self.forget_except(true, pods.iter().map(|p| p.id.as_str()));
        }
        let chosen = all
            .into_iter()
            .filter(|(_, r)| pods.iter().any(|p| p.id == r.pod_sandbox_id))
            .collect();
        Ok((pods, self.read_all(chosen).await))
    }

    /// Every pod container with its CRI request.
    async fn cri_containers(&self) -> Result<Vec<(pb::Container, cri::CreateContainerRequest)>> {
        Ok(self
            .containers
            .list()
            .await?
            .into_iter()
            .filter_map(|c| blob_of(&c).map(|r| (c, r)))
            .collect())
    }

    /// The readings of `containers`. One that cannot be read (its shim went away meanwhile, say)
    /// is left out with a warning rather than failing the whole list, as containerd skips one.
    async fn read_all(
        &self,
        containers: Vec<(pb::Container, cri::CreateContainerRequest)>,
    ) -> Vec<Reading> {
        let readings: Vec<(String, Result<Reading>)> =
            futures::stream::iter(containers.into_iter().map(|(c, r)| async move {
                let id = c.id.clone();
                (id, self.read(c, r).await)
            }))
            .buffered(CONCURRENCY)
            .collect()
            .await;
        readings
            .into_iter()
            .filter_map(|(id, r)| {
                r.map_err(|e| tracing::warn!(%id, error = %e.chain(), "container stats"))
                    .ok()
            })
            .collect()
    }

    /// One container's reading: its counters (only while it runs) and its writable layer.
    async fn read(
        &self,
        container: pb::Container,
        request: cri::CreateContainerRequest,
    ) -> Result<Reading> {
        let running = container
            .state
            .as_ref()
            .is_some_and(|s| s.status == pb::ContainerStatus::Running as i32);
        let (sample, layer) = tokio::join!(
            async {
                if running {
                    self.source.sample(&container.id).await
                } else {
                    Ok(None)
                }
            },
            self.source
                .layer(&container.snapshotter, &container.snapshot_key)
        );
        let layer = layer.unwrap_or_else(|e| {
            // As containerd: a layer it cannot measure counts as empty.
            tracing::debug!(id = %container.id, error = %e.chain(), "writable layer usage");
            None
        });
        Ok(Reading {
            container,
            request,
            sample: sample?.filter(|s| s.stats.as_ref().is_some_and(|c| c.cpu.is_some())),
            layer,
            layer_at: now_nanos(),
        })
    }

    fn container_stats(&self, r: &Reading, host_memory: u64) -> cri::ContainerStats {
        let config = r.request.config.clone().unwrap_or_default();
        let at = r.read_at();
        let cpu = r.cpu().map(|c| {
            let usage = c.usage.as_ref().map_or(0, |u| u.total_ns);
            cri::CpuUsage {
                timestamp: at,
                usage_core_nano_seconds: value(usage),
                usage_nano_cores: self
                    .nano_cores(false, &r.container.id, usage, at)
                    .and_then(value),
            }
        });
        let memory = r.memory(host_memory);
        let (used, inodes) = r.layer.unwrap_or_default();
        cri::ContainerStats {
            attributes: Some(cri::ContainerAttributes {
                id: r.container.id.clone(),
                metadata: config.metadata,
                labels: config.labels,
                annotations: config.annotations,
            }),
            cpu,
            memory: memory.as_ref().map(|m| m.usage(at)),
            writable_layer: Some(cri::FilesystemUsage {
                timestamp: r.layer_at,
                fs_id: Some(cri::FilesystemIdentifier {
                    mountpoint: self.mountpoint.clone(),
                }),
                used_bytes: value(used),
                inodes_used: value(inodes),
            }),
            swap: memory.as_ref().map(|m| cri::SwapUsage {
                timestamp: at,
                swap_available_bytes: value(m.swap_available),
                swap_usage_bytes: value(m.swap),
            }),
        }
    }

    async fn pod_stats(&self, pod: &pb::Sandbox, readings: &[Reading]) -> cri::PodSandboxStats {
        let now = now_nanos();
        let host = self.source.host_memory();
        let config = pod.config.clone().unwrap_or_default();
        let metadata = config.metadata.map(|m| cri::PodSandboxMetadata {
            name: m.name,
            uid: m.uid,
            namespace: m.namespace,
            attempt: m.attempt,
        });
        let mut cpu_total = 0u64;
        let mut memory = Memory::default();
        let mut processes = 0u64;
        for r in readings {
            if let Some(c) = r.cpu() {
                cpu_total += c.usage.as_ref().map_or(0, |u| u.total_ns);
            }
            if let Some(m) = r.memory(host) {
                memory.add(&m);
            }
            processes += r.sample.as_ref().map_or(0, |s| u64::from(s.num_procs));
        }
        // The pod's own cgroup when it has one: it also keeps what exited containers used.
        let parent = config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .unwrap_or_default();
        if !parent.is_empty() {
            match self.source.pod_cgroup(&parent).await {
                Ok(Some(c)) => {
                    cpu_total = c.cpu_ns;
                    memory = Memory::of(&c.memory, c.v2, host);
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(pod = %pod.id, error = %e.chain(), "pod cgroup"),
            }
        }
        let network = match pod_netns(pod) {
            Some(netns) => match self.source.interfaces(&netns).await {
                Ok(ifaces) => Some(network_usage(&ifaces, now)),
                Err(e) => {
                    tracing::debug!(pod = %pod.id, error = %e.chain(), "pod network counters");
                    None
                }
            },
            None => None,
        };
        cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes {
                id: pod.id.clone(),
                metadata,
                labels: config.labels,
                annotations: config.annotations,
            }),
            linux: Some(cri::LinuxPodSandboxStats {
                cpu: Some(cri::CpuUsage {
                    timestamp: now,
                    usage_core_nano_seconds: value(cpu_total),
                    usage_nano_cores: self
                        .nano_cores(true, &pod.id, cpu_total, now)
                        .and_then(value),
                }),
                memory: Some(memory.usage(now)),
                network,
                process: Some(cri::ProcessUsage {
                    timestamp: now,
                    process_count: value(processes),
                }),
                containers: readings
                    .iter()
                    .map(|r| self.container_stats(r, host))
                    .collect(),
            }),
            windows: None,
        }
    }

    fn nano_cores(&self, pod: bool, id: &str, usage: u64, at: i64) -> Option<u64> {
        let mut previous = self.previous.lock().unwrap_or_else(|p| p.into_inner());
        let map = if pod {
            &mut previous.pods
        } else {
            &mut previous.containers
        };
        nano_cores(map, id, usage, at)
    }

    /// Drops the previous readings of the containers (or pods) not in `alive`.
    fn forget_except<'a>(&self, pods: bool, alive: impl Iterator<Item = &'a str>) {
        let keep: std::collections::HashSet<&str> = alive.collect();
        let mut previous = self.previous.lock().unwrap_or_else(|p| p.into_inner());
        let map = if pods {
            &mut previous.pods
        } else {
            &mut previous.containers
        };
        map.retain(|id, _| keep.contains(id.as_str()));
    }
}

/// containerd's `getUsageNanoCores`: CPU time per second of wall time since the previous
/// reading of `id` in `previous`; `None` for the first reading, or when time or the counter went
/// back (the previous reading is then kept).
fn nano_cores(
    previous: &mut HashMap<String, CpuSample>,
    id: &str,
    usage: u64,
    at: i64,
) -> Option<u64> {
    let Some(old) = previous.get(id).copied() else {
        previous.insert(id.to_string(), CpuSample { usage, at });
        return None;
    };
    let elapsed = at - old.at;
    if elapsed <= 0 || usage < old.usage {
        return None;
    }
    previous.insert(id.to_string(), CpuSample { usage, at });
    Some(((usage - old.usage) as f64 / elapsed as f64 * 1e9) as u64)
}

fn container_matches(
    c: &pb::Container,
    r: &cri::CreateContainerRequest,
    f: &cri::ContainerStatsFilter,
) -> bool {
    if !f.id.is_empty() && !c.id.starts_with(&f.id) {
        return false;
    }
    if !f.pod_sandbox_id.is_empty() && !r.pod_sandbox_id.starts_with(&f.pod_sandbox_id) {
        return false;
    }
    let labels = r.config.as_ref().map(|c| &c.labels);
    f.label_selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The pod's own network namespace; `None` with the host's network.
fn pod_netns(pod: &pb::Sandbox) -> Option<String> {
    pod.namespaces
        .as_ref()
        .map(|n| n.network.clone())
        .filter(|n| !n.is_empty())
}

fn network_usage(ifaces: &[Interface], timestamp: i64) -> cri::NetworkUsage {
    let usage = |i: &Interface| cri::NetworkInterfaceUsage {
        name: i.name.clone(),
        rx_bytes: value(i.counters.rx_bytes),
        rx_errors: value(i.counters.rx_errors),
        tx_bytes: value(i.counters.tx_bytes),
        tx_errors: value(i.counters.tx_errors),
    };
    let interfaces: Vec<cri::NetworkInterfaceUsage> = ifaces.iter().map(usage).collect();
    let default_interface = interfaces
        .iter()
        .find(|i| i.name == DEFAULT_INTERFACE)
        .or(interfaces.first())
        .cloned();
    cri::NetworkUsage {
        timestamp,
        default_interface,
        interfaces,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(v2: bool) -> types::MemoryStats {
        let stats = if v2 {
            [
                ("inactive_file", 100),
                ("anon", 700),
                ("pgfault", 9),
                ("pgmajfault", 2),
            ]
        } else {
            [
                ("total_inactive_file", 100),
                ("total_rss", 700),
                ("total_pgfault", 9),
                ("total_pgmajfault", 2),
            ]
        };
        types::MemoryStats {
            usage: 1000,
            limit: 4000,
            stats: stats.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            swap_usage: 10,
            swap_limit: 50,
            ..Default::default()
        }
    }

    #[test]
    fn memory_figures_follow_containerd_on_both_hierarchies() {
        for v2 in [false, true] {
            let m = Memory::of(&memory(v2), v2, 1 << 30);
            assert_eq!(
                (
                    m.working_set,
                    m.available,
                    m.rss,
                    m.page_faults,
                    m.major_page_faults
                ),
                (900, 3100, 700, 9, 2),
                "v2={v2}"
            );
            assert_eq!((m.swap, m.swap_available), (10, 40));
        }
        // No limit: the engine reports the host's memory; available is then 0, as containerd.
        let mut unlimited = memory(false);
        unlimited.limit = 1 << 30;
        assert_eq!(Memory::of(&unlimited, false, 1 << 30).available, 0);
        unlimited.limit = 9_223_372_036_854_771_712;
        assert_eq!(Memory::of(&unlimited, false, 0).available, 0);
        // More inactive file pages than usage (a race between the files): no negative set.
        let mut odd = memory(false);
        odd.stats.insert("total_inactive_file".into(), 5000);
        assert_eq!(Memory::of(&odd, false, 0).working_set, 0);
    }

    #[test]
    fn pod_cgroups_are_read_on_both_hierarchies() {
        let w = |dir: &std::path::Path, name: &str, text: &str| {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join(name), text).unwrap();
        };
        let v1 = tempfile::tempdir().unwrap();
        let mem = v1.path().join("memory/kubepods/pod1");
        w(
            &v1.path().join("cpuacct/kubepods/pod1"),
            "cpuacct.usage",
            "12345\n",
        );
        w(&mem, "memory.usage_in_bytes", "4096\n");
        w(&mem, "memory.limit_in_bytes", "9223372036854771712\n");
        w(&mem, "memory.memsw.usage_in_bytes", "5096\n");
        w(
            &mem,
            "memory.stat",
            "total_rss 1000\ntotal_inactive_file 96\n",
        );
        let got = read_pod_cgroup(v1.path(), "/kubepods/pod1/").unwrap();
        assert!(!got.v2);
        assert_eq!(
            (got.cpu_ns, got.memory.usage, got.memory.swap_usage),
            (12345, 4096, 1000)
        );
        // The reader gives an unlimited v1 limit as the host's memory, as for containers.
        let m = Memory::of(&got.memory, got.v2, berth_core::procfs::host_memory());
        assert_eq!((m.working_set, m.rss, m.available), (4000, 1000, 0));
        assert_eq!(read_pod_cgroup(v1.path(), "kubepods/other"), None);
        assert_eq!(read_pod_cgroup(v1.path(), "../etc"), None);

        let v2 = tempfile::tempdir().unwrap();
        w(v2.path(), "cgroup.controllers", "cpu memory\n");
        let dir = v2.path().join("kubepods/pod2");
        w(&dir, "cpu.stat", "usage_usec 7\nuser_usec 5\n");
        w(&dir, "memory.current", "8192\n");
        w(&dir, "memory.max", "16384\n");
        w(&dir, "memory.stat", "anon 100\ninactive_file 192\n");
        let got = read_pod_cgroup(v2.path(), "kubepods/pod2").unwrap();
        assert!(got.v2);
        let m = Memory::of(&got.memory, got.v2, 1 << 40);
        assert_eq!(
            (got.cpu_ns, m.working_set, m.available, m.rss),
            (7000, 8000, 8384, 100)
        );
    }

    #[test]
    fn nano_cores_come_from_the_previous_reading() {
        let mut prev = HashMap::new();
        assert_eq!(nano_cores(&mut prev, "c", 1_000, 1_000_000_000), None);
        // Half a CPU over two seconds.
        assert_eq!(
            nano_cores(&mut prev, "c", 1_000_001_000, 3_000_000_000),
            Some(500_000_000)
        );
        // Same time, or a counter that went back: nothing, and the reading stays.
        assert_eq!(
            nano_cores(&mut prev, "c", 2_000_000_000, 3_000_000_000),
            None
        );
        assert_eq!(nano_cores(&mut prev, "c", 5, 4_000_000_000), None);
        assert_eq!(
            nano_cores(&mut prev, "c", 1_000_001_000 + 2_000_000_000, 4_000_000_000),
            Some(2_000_000_000)
        );
        assert_eq!(nano_cores(&mut prev, "other", 7, 4_000_000_000), None);
    }

    #[test]
    fn net_dev_interfaces_make_the_network_usage() {
        // The columns are berth_core::procfs's to read (tested there); here: named interfaces.
        let text = "Inter-| Receive | Transmit\n face |bytes ...|bytes ...\n    \
            lo: 100 1 0 0 0 0 0 0 100 1 0 0 0 0 0 0\n  \
            eth0: 5000 40 1 2 0 0 0 0 3000 30 3 4 0 0 0 0\n";
        let got = parse_net_dev(text);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name, "eth0");
        assert_eq!(got[0].counters.rx_bytes, 5000);
        let usage = network_usage(&got, 7);
        assert_eq!(usage.default_interface.unwrap().name, "eth0");
    }

    #[test]
    fn filters_match_prefixes_and_every_label() {
        let c = pb::Container {
            id: "abcdef".into(),
            ..Default::default()
        };
        let r = cri::CreateContainerRequest {
            pod_sandbox_id: "123456".into(),
            config: Some(cri::ContainerConfig {
                labels: [("a".to_string(), "1".to_string()), ("b".into(), "2".into())].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let f = |id: &str, pod: &str, labels: &[(&str, &str)]| cri::ContainerStatsFilter {
            id: id.into(),
            pod_sandbox_id: pod.into(),
            label_selector: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert!(container_matches(&c, &r, &f("", "", &[])));
        assert!(container_matches(
            &c,
            &r,
            &f("abc", "123", &[("a", "1"), ("b", "2")])
        ));
        assert!(!container_matches(&c, &r, &f("abd", "", &[])));
        assert!(!container_matches(&c, &r, &f("", "124", &[])));
        assert!(!container_matches(&c, &r, &f("", "", &[("a", "2")])));
        assert!(!container_matches(&c, &r, &f("", "", &[("c", "")])));
    }
}
