//! cgroup resources: the request's `Resources` as OCI `LinuxResources`, with Docker's defaults
//! and the host's missing features turned into warnings, as dockerd does.

use std::collections::HashMap;

use berth_core::{Error, Result};
use berth_proto::berth::engine::v1 as pb;
use oci_spec::runtime::{
    LinuxBlockIo, LinuxCpu, LinuxHugepageLimitBuilder, LinuxMemory, LinuxPids, LinuxResources,
    LinuxThrottleDevice, LinuxThrottleDeviceBuilder, LinuxWeightDevice, LinuxWeightDeviceBuilder,
};

use super::HostInfo;

/// Docker's CFS period for `--cpus`.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The smallest memory limit Docker accepts.
pub const MIN_MEMORY: i64 = 6 * 1024 * 1024;

/// Checks values the way dockerd does before anything is created.
pub fn validate(r: &pb::Resources, host: &HostInfo) -> Result<()> {
    if !r.hugepage_limits.is_empty() && !host.hugetlb {
        return Err(Error::invalid_argument(
            "hugepage limits are not supported here: the hugetlb cgroup controller is not where the runtime sets limits",
        ));
    }
    for h in &r.hugepage_limits {
        let digits = h.page_size.trim_end_matches(['K', 'M', 'G', 'B']);
        let unit = &h.page_size[digits.len()..];
        if digits.is_empty()
            || !digits.bytes().all(|b| b.is_ascii_digit())
            || !matches!(unit, "KB" | "MB" | "GB")
        {
            return Err(Error::invalid_argument(format!(
                "invalid hugepage size {:?} (want e.g. 2MB or 1GB)",
                h.page_size
            )));
        }
    }
    if let Some(m) = r.memory
        && m > 0
        && m < MIN_MEMORY
    {
        return Err(Error::invalid_argument(
            "Minimum memory limit allowed is 6MB",
        ));
    }
    if let (Some(m), Some(s)) = (r.memory, r.memory_swap)
        && m > 0
        && s > 0
        && s < m
    {
        return Err(Error::invalid_argument(
            "Minimum memoryswap limit should be larger than memory limit, see usage",
        ));
    }
    if r.memory_swap.is_some_and(|s| s > 0) && r.memory.is_none_or(|m| m <= 0) {
        return Err(Error::invalid_argument(
            "You should always set the Memory limit when using Memoryswap limit, see usage",
        ));
    }
    if let Some(res) = r.memory_reservation.filter(|v| *v > 0) {
        if res < MIN_MEMORY {
            return Err(Error::invalid_argument(
                "Minimum memory reservation allowed is 6MB",
            ));
        }
        if r.memory.is_some_and(|m| m > 0 && m < res) {
            return Err(Error::invalid_argument(
                "Minimum memory limit can not be less than memory reservation limit, see usage",
            ));
        }
    }
    if let Some(s) = r.memory_swappiness
        && s != -1
        && !(0..=100).contains(&s)
    {
        return Err(Error::invalid_argument(format!(
            "Invalid value: {s}, valid memory swappiness range is 0-100"
        )));
    }
    if let Some(n) = r.nano_cpus
        && n != 0
    {
        if r.cpu_quota.is_some_and(|q| q > 0) || r.cpu_period.is_some_and(|p| p > 0) {
            return Err(Error::invalid_argument(
                "Conflicting options: Nano CPUs and CPU Period cannot both be set",
            ));
        }
        let max = i64::from(host.ncpu) * 1_000_000_000;
        if n < 0 || n > max {
            return Err(Error::invalid_argument(format!(
                "Range of CPUs is from 0.01 to {}.00, as there are only {} CPUs available",
                host.ncpu, host.ncpu
            )));
        }
    }
    if let Some(p) = r.cpu_period
        && p != 0
        && !(1000..=1_000_000).contains(&p)
    {
        return Err(Error::invalid_argument(
            "CPU cfs period can not be less than 1ms (i.e. 1000) or larger than 1s (i.e. 1000000)",
        ));
    }
    if let Some(q) = r.cpu_quota
        && q > 0
        && q < 1000
    {
        return Err(Error::invalid_argument(
            "CPU cfs quota can not be less than 1ms (i.e. 1000)",
        ));
    }
    if let Some(w) = r.blkio_weight
        && w != 0
        && !(10..=1000).contains(&w)
    {
        return Err(Error::invalid_argument(
            "Range of blkio weight is from 10 to 1000",
        ));
    }
    if r.cpu_realtime_period.is_some_and(|p| p > 0) && !host.cpu_realtime {
        return Err(Error::invalid_argument(
            "Your kernel does not support cgroup cpu real-time period",
        ));
    }
    if r.cpu_realtime_runtime.is_some_and(|p| p > 0) && !host.cpu_realtime {
        return Err(Error::invalid_argument(
            "Your kernel does not support cgroup cpu real-time runtime",
        ));
    }
    if let (Some(p), Some(rt)) = (r.cpu_realtime_period, r.cpu_realtime_runtime)
        && p != 0
        && rt != 0
        && rt > p
    {
        return Err(Error::invalid_argument(
            "cpu real-time runtime cannot be higher than cpu real-time period",
        ));
    }
    for set in [&r.cpuset_cpus, &r.cpuset_mems].into_iter().flatten() {
        parse_cpuset(set)?;
    }
    if let Some(cpus) = &r.cpuset_cpus
        && let Some(max) = parse_cpuset(cpus)?.into_iter().max()
        && max >= host.ncpu
    {
        return Err(Error::invalid_argument(format!(
            "Requested CPUs are not available - requested {cpus}, available: 0-{}",
            host.ncpu.saturating_sub(1)
        )));
    }
    Ok(())
}

/// Gives the cgroup v1 ancestors of `cgroups_path` (under the cpu hierarchy at `cpu_root`) the
/// real-time budget a child with `runtime_us` needs: the kernel refuses a child more RT runtime
/// than its parent has left, and a cgroup the runtime creates starts with none (dockerd does
/// the same for its cgroup parent from `--cpu-rt-runtime`). Each ancestor gets what its
/// other children already hold plus what the new child needs, set from the top down.
pub fn ensure_rt_budget(
    cpu_root: &std::path::Path,
    cgroups_path: &str,
    runtime_us: i64,
) -> Result<()> {
    let parts: Vec<&str> = cgroups_path
        .trim_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    if parts.len() < 2 || runtime_us <= 0 {
        return Ok(());
    }
    let read = |p: &std::path::Path| -> i64 {
        std::fs::read_to_string(p.join("cpu.rt_runtime_us"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let held_by_others = |dir: &std::path::Path, except: &str| -> i64 {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()) && e.file_name() != except)
            .map(|e| read(&e.path()).max(0))
            .sum()
    };
    // Ancestors from the top; the last part is the container's own cgroup.
    let mut dirs = Vec::new();
    let mut dir = cpu_root.to_path_buf();
    for part in &parts[..parts.len() - 1] {
        dir = dir.join(part);
        dirs.push(dir.clone());
    }
    let mut needs = vec![0i64; dirs.len()];
    let mut need = runtime_us;
    for (i, d) in dirs.iter().enumerate().rev() {
        need += held_by_others(d, parts[i + 1]);
        needs[i] = need;
    }
    for (d, need) in dirs.iter().zip(needs) {
        std::fs::create_dir_all(d).map_err(|e| {
            Error::internal(format!("create cgroup {}", d.display())).with_source(e)
        })?;
        if read(d) < need {
            std::fs::write(d.join("cpu.rt_runtime_us"), need.to_string()).map_err(|e| {
                Error::invalid_argument(format!(
                    "cannot give cgroup {} a real-time runtime of {need}us",
                    d.display()
                ))
                .with_source(e)
            })?;
        }
    }
    Ok(())
}

/// Without cgroups of its own (rootless mode, no delegated cgroup v2 tree) a container cannot
/// be limited: every limit set in `r`, and a cgroup parent, is refused by its Docker flag.
pub fn refuse_without_cgroups(r: &pb::Resources, cgroup_parent: &str) -> Result<()> {
    let set = |v: Option<i64>| v.is_some_and(|v| v != 0);
    let flags: Vec<&str> = [
        (set(r.memory), "--memory"),
        (set(r.memory_swap), "--memory-swap"),
        (set(r.memory_reservation), "--memory-reservation"),
        (
            r.memory_swappiness.is_some_and(|v| v >= 0),
            "--memory-swappiness",
        ),
        (r.oom_kill_disable == Some(true), "--oom-kill-disable"),
        (set(r.nano_cpus), "--cpus"),
        (set(r.cpu_shares), "--cpu-shares"),
        (set(r.cpu_period), "--cpu-period"),
        (set(r.cpu_quota), "--cpu-quota"),
        (set(r.cpu_realtime_period), "--cpu-rt-period"),
        (set(r.cpu_realtime_runtime), "--cpu-rt-runtime"),
        (
            r.cpuset_cpus.as_deref().is_some_and(|v| !v.is_empty()),
            "--cpuset-cpus",
        ),
        (
            r.cpuset_mems.as_deref().is_some_and(|v| !v.is_empty()),
            "--cpuset-mems",
        ),
        (r.pids_limit.is_some_and(|v| v > 0), "--pids-limit"),
        (r.blkio_weight.is_some_and(|v| v != 0), "--blkio-weight"),
        (!r.blkio_weight_device.is_empty(), "--blkio-weight-device"),
        (!r.blkio_device_read_bps.is_empty(), "--device-read-bps"),
        (!r.blkio_device_write_bps.is_empty(), "--device-write-bps"),
        (!r.blkio_device_read_iops.is_empty(), "--device-read-iops"),
        (!r.blkio_device_write_iops.is_empty(), "--device-write-iops"),
        (!r.unified.is_empty(), "unified cgroup settings"),
        (!r.hugepage_limits.is_empty(), "hugepage limits"),
        (!cgroup_parent.is_empty(), "--cgroup-parent"),
    ]
    .into_iter()
    .filter_map(|(on, flag)| on.then_some(flag))
    .collect();
    if flags.is_empty() {
        return Ok(());
    }
    Err(Error::invalid_argument(format!(
        "{} cannot be honoured: this rootless engine has no cgroups to put limits in (cgroup v2 \
         delegated by a systemd user session is needed; see docs/rootless.md)",
        flags.join(", ")
    )))
}

/// `0-2,4` → [0, 1, 2, 4].
pub fn parse_cpuset(s: &str) -> Result<Vec<u32>> {
    let invalid = || Error::invalid_argument(format!("Invalid value {s} for cpuset"));
    let mut out = Vec::new();
    if s.trim().is_empty() {
        return Ok(out);
    }
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: u32 = a.trim().parse().map_err(|_| invalid())?;
                let b: u32 = b.trim().parse().map_err(|_| invalid())?;
                if a > b {
                    return Err(invalid());
                }
                out.extend(a..=b);
            }
            None => out.push(part.trim().parse().map_err(|_| invalid())?),
        }
    }
    Ok(out)
}

/// A device's major and minor numbers, for the per-device blkio settings.
pub type DeviceNumbers<'a> = dyn Fn(&str) -> Result<(i64, i64)> + 'a;

/// Converts `r` into OCI resources. Only fields set in `r` are set in the result, so the same
/// function serves create (everything) and update (changes only). `create` enables Docker's
/// create-time defaults (swap = 2 × memory when unset). Host features that are missing drop
/// the setting with a warning.
pub fn to_oci(
    r: &pb::Resources,
    host: &HostInfo,
    create: bool,
    devnum: &DeviceNumbers<'_>,
    warnings: &mut Vec<String>,
) -> Result<LinuxResources> {
    let mut out = LinuxResources::default();
    out.set_devices(None);

    // Memory.
    let mut mem = LinuxMemory::default();
    let mut any_mem = false;
    if let Some(m) = r.memory.filter(|m| *m != 0) {
        mem.set_limit(Some(m));
        any_mem = true;
    }
    let mut swap = r.memory_swap.filter(|s| *s != 0);
    if create && swap.is_none() && r.memory.is_some_and(|m| m > 0) {
        swap = r.memory.map(|m| m * 2);
    }
    if let Some(s) = swap {
        if host.swap_limit {
            mem.set_swap(Some(s));
            any_mem = true;
        } else if r.memory_swap.is_some() {
            warnings.push(
                "Your kernel does not support swap limit capabilities or the cgroup is not mounted. Memory limited without swap."
                    .into(),
            );
        }
    }
    if let Some(v) = r.memory_reservation.filter(|v| *v != 0) {
        mem.set_reservation(Some(v));
        any_mem = true;
    }
    if let Some(v) = r.memory_swappiness.filter(|v| *v >= 0) {
        mem.set_swappiness(Some(v as u64));
        any_mem = true;
    }
    if let Some(v) = r.oom_kill_disable {
        if v && r.memory.is_none_or(|m| m <= 0) {
            warnings.push(
                "OOM killer is disabled for the container, but no memory limit is set, this can result in the system running out of resources."
                    .into(),
            );
        }
        mem.set_disable_oom_killer(Some(v));
        any_mem = true;
    }
    if any_mem {
        out.set_memory(Some(mem));
    }

    // CPU.
    let mut cpu = LinuxCpu::default();
    let mut any_cpu = false;
    if let Some(n) = r.nano_cpus.filter(|n| *n > 0) {
        cpu.set_period(Some(CPU_PERIOD_US));
        cpu.set_quota(Some(n * CPU_PERIOD_US as i64 / 1_000_000_000));
        any_cpu = true;
    }
    if let Some(p) = r.cpu_period.filter(|p| *p > 0) {
        cpu.set_period(Some(p as u64));
        any_cpu = true;
    }
    if let Some(q) = r.cpu_quota.filter(|q| *q != 0) {
        cpu.set_quota(Some(q));
        any_cpu = true;
    }
    if let Some(s) = r.cpu_shares.filter(|s| *s > 0) {
        // The kernel's minimum is 2.
        cpu.set_shares(Some((s as u64).max(2)));
        any_cpu = true;
    }
    if let Some(v) = r.cpu_realtime_period.filter(|v| *v > 0) {
        cpu.set_realtime_period(Some(v as u64));
        any_cpu = true;
    }
    if let Some(v) = r.cpu_realtime_runtime.filter(|v| *v != 0) {
        cpu.set_realtime_runtime(Some(v));
        any_cpu = true;
    }
    if let Some(v) = r.cpuset_cpus.as_ref().filter(|v| !v.is_empty()) {
        cpu.set_cpus(Some(v.clone()));
        any_cpu = true;
    }
    if let Some(v) = r.cpuset_mems.as_ref().filter(|v| !v.is_empty()) {
        cpu.set_mems(Some(v.clone()));
        any_cpu = true;
    }
    if any_cpu {
        out.set_cpu(Some(cpu));
    }

    // Pids: 0 and -1 both mean unlimited (-1 for the runtime).
    if let Some(p) = r.pids_limit {
        let limit = if p <= 0 { -1 } else { p };
        if create && limit == -1 {
            // Nothing to set at create: the default is unlimited.
        } else {
            let mut pids = LinuxPids::default();
            pids.set_limit(limit);
            out.set_pids(Some(pids));
        }
    }

    // Block I/O.
    let mut bio = LinuxBlockIo::default();
    let mut any_bio = false;
    if let Some(w) = r.blkio_weight.filter(|w| *w > 0) {
        if host.blkio_weight {
            bio.set_weight(Some(w as u16));
            any_bio = true;
        } else {
            warnings.push(
                "Your kernel does not support Block I/O weight or the cgroup is not mounted. Weight discarded."
                    .into(),
            );
        }
    }
    if !r.blkio_weight_device.is_empty() {
        if host.blkio_weight {
            let mut v: Vec<LinuxWeightDevice> = Vec::new();
            for d in &r.blkio_weight_device {
                let (major, minor) = devnum(&d.path)?;
                v.push(
                    LinuxWeightDeviceBuilder::default()
                        .major(major)
                        .minor(minor)
                        .weight(d.weight as u16)
                        .build()
                        .map_err(|e| Error::internal("blkio weight device").with_source(e))?,
                );
            }
            bio.set_weight_device(Some(v));
            any_bio = true;
        } else {
            warnings.push(
                "Your kernel does not support Block I/O weight_device or the cgroup is not mounted. Weight-device discarded."
                    .into(),
            );
        }
    }
    let throttle = |list: &[pb::ThrottleDevice]| -> Result<Option<Vec<LinuxThrottleDevice>>> {
        if list.is_empty() {
            return Ok(None);
        }
        let mut v = Vec::new();
        for d in list {
            let (major, minor) = devnum(&d.path)?;
            v.push(
                LinuxThrottleDeviceBuilder::default()
                    .major(major)
                    .minor(minor)
                    .rate(d.rate)
                    .build()
                    .map_err(|e| Error::internal("blkio throttle device").with_source(e))?,
            );
        }
        Ok(Some(v))
    };
    if let Some(v) = throttle(&r.blkio_device_read_bps)? {
        bio.set_throttle_read_bps_device(Some(v));
        any_bio = true;
    }
    if let Some(v) = throttle(&r.blkio_device_write_bps)? {
        bio.set_throttle_write_bps_device(Some(v));
        any_bio = true;
    }
    if let Some(v) = throttle(&r.blkio_device_read_iops)? {
        bio.set_throttle_read_iops_device(Some(v));
        any_bio = true;
    }
    if let Some(v) = throttle(&r.blkio_device_write_iops)? {
        bio.set_throttle_write_iops_device(Some(v));
        any_bio = true;
    }
    if any_bio {
        out.set_block_io(Some(bio));
    }
    if !r.hugepage_limits.is_empty() {
        out.set_hugepage_limits(Some(
            r.hugepage_limits
                .iter()
                .map(|h| {
                    LinuxHugepageLimitBuilder::default()
                        .page_size(h.page_size.clone())
                        .limit(h.limit as i64)
                        .build()
                        .map_err(|e| Error::internal("hugepage limit").with_source(e))
                })
                .collect::<Result<Vec<_>>>()?,
        ));
    }
    if !r.unified.is_empty() {
        out.set_unified(Some(
            r.unified
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>(),
        ));
    }
    Ok(out)
}

/// Applies the set fields of `update` onto `current` (both wire resources), for Update.
pub fn merge(current: &mut pb::Resources, update: &pb::Resources) {
    macro_rules! take {
        ($($f:ident),*) => { $( if update.$f.is_some() { current.$f = update.$f.clone(); } )* };
    }
    take!(
        memory,
        memory_swap,
        memory_reservation,
        memory_swappiness,
        nano_cpus,
        cpu_shares,
        cpu_period,
        cpu_quota,
        cpu_realtime_period,
        cpu_realtime_runtime,
        cpuset_cpus,
        cpuset_mems,
        pids_limit,
        blkio_weight,
        oom_kill_disable
    );
    if update.nano_cpus.is_some_and(|n| n > 0) {
        current.cpu_period = None;
        current.cpu_quota = None;
    }
    if !update.blkio_weight_device.is_empty() {
        current.blkio_weight_device = update.blkio_weight_device.clone();
    }
    for (k, v) in &update.unified {
        current.unified.insert(k.clone(), v.clone());
    }
    if !update.hugepage_limits.is_empty() {
        current.hugepage_limits = update.hugepage_limits.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostInfo {
        HostInfo {
            ncpu: 2,
            swap_limit: true,
            blkio_weight: false,
            ..HostInfo::default()
        }
    }

    fn no_dev(_: &str) -> Result<(i64, i64)> {
        Ok((8, 0))
    }

    #[test]
    fn hugepage_limits_need_the_controller_and_valid_sizes() {
        let r = pb::Resources {
            hugepage_limits: vec![pb::HugepageLimit {
                page_size: "2MB".into(),
                limit: 4 << 20,
            }],
            ..Default::default()
        };
        let err = validate(&r, &host()).unwrap_err();
        assert!(err.message().contains("hugetlb"), "{}", err.message());
        let with = HostInfo {
            hugetlb: true,
            ..host()
        };
        validate(&r, &with).unwrap();
        let oci = to_oci(&r, &with, true, &no_dev, &mut Vec::new()).unwrap();
        let j = serde_json::to_value(&oci).unwrap();
        assert_eq!(j["hugepageLimits"][0]["pageSize"], "2MB");
        assert_eq!(j["hugepageLimits"][0]["limit"], 4 << 20);
        let bad = pb::Resources {
            hugepage_limits: vec![pb::HugepageLimit {
                page_size: "2M".into(),
                limit: 1,
            }],
            ..Default::default()
        };
        assert!(validate(&bad, &with).is_err());
    }

    #[test]
    fn memory_cpu_pids_cpuset() {
        let r = pb::Resources {
            memory: Some(64 << 20),
            nano_cpus: Some(500_000_000),
            cpu_shares: Some(512),
            cpuset_cpus: Some("0".into()),
            pids_limit: Some(20),
            ..Default::default()
        };
        validate(&r, &host()).unwrap();
        let mut w = Vec::new();
        let out = to_oci(&r, &host(), true, &no_dev, &mut w).unwrap();
        let mem = out.memory().unwrap();
        assert_eq!(mem.limit(), Some(64 << 20));
        assert_eq!(
            mem.swap(),
            Some(128 << 20),
            "swap defaults to twice the memory"
        );
        let cpu = out.cpu().as_ref().unwrap();
        assert_eq!((cpu.quota(), cpu.period()), (Some(50_000), Some(100_000)));
        assert_eq!(cpu.shares(), Some(512));
        assert_eq!(cpu.cpus().as_deref(), Some("0"));
        assert_eq!(out.pids().as_ref().unwrap().limit(), 20);
        assert!(w.is_empty());
    }

    #[test]
    fn missing_host_features_warn() {
        let r = pb::Resources {
            memory: Some(64 << 20),
            memory_swap: Some(-1),
            blkio_weight: Some(300),
            ..Default::default()
        };
        let h = HostInfo {
            swap_limit: false,
            ..host()
        };
        let mut w = Vec::new();
        let out = to_oci(&r, &h, true, &no_dev, &mut w).unwrap();
        assert_eq!(out.memory().unwrap().swap(), None);
        assert!(out.block_io().is_none());
        assert_eq!(w.len(), 2, "{w:?}");
    }

    #[test]
    fn validation_matches_docker() {
        let bad = |r: pb::Resources| validate(&r, &host()).unwrap_err().message().to_string();
        assert_eq!(
            bad(pb::Resources {
                memory: Some(1024),
                ..Default::default()
            }),
            "Minimum memory limit allowed is 6MB"
        );
        assert!(
            bad(pb::Resources {
                nano_cpus: Some(3_000_000_000),
                ..Default::default()
            })
            .contains("only 2 CPUs")
        );
        assert!(
            bad(pb::Resources {
                cpuset_cpus: Some("0-3".into()),
                ..Default::default()
            })
            .contains("Requested CPUs are not available")
        );
        assert!(
            bad(pb::Resources {
                cpuset_cpus: Some("x".into()),
                ..Default::default()
            })
            .contains("Invalid value")
        );
        assert!(
            bad(pb::Resources {
                memory: Some(64 << 20),
                memory_swap: Some(32 << 20),
                ..Default::default()
            })
            .contains("memoryswap")
        );
    }

    #[test]
    fn update_sets_only_what_is_given() {
        let r = pb::Resources {
            pids_limit: Some(0),
            ..Default::default()
        };
        let out = to_oci(&r, &host(), false, &no_dev, &mut Vec::new()).unwrap();
        assert_eq!(out.pids().as_ref().unwrap().limit(), -1);
        assert!(out.memory().is_none() && out.cpu().is_none());
        let mut cur = pb::Resources {
            memory: Some(10 << 20),
            cpu_quota: Some(5000),
            ..Default::default()
        };
        merge(
            &mut cur,
            &pb::Resources {
                nano_cpus: Some(1_000_000_000),
                ..Default::default()
            },
        );
        assert_eq!(cur.memory, Some(10 << 20));
        assert_eq!(cur.cpu_quota, None);
        assert_eq!(cur.nano_cpus, Some(1_000_000_000));
        assert_eq!(parse_cpuset("0-2,4").unwrap(), [0, 1, 2, 4]);
    }

    #[test]
    fn rt_budget_covers_the_other_children_and_the_new_one() {
        let root = tempfile::tempdir().unwrap();
        let other = root.path().join("a/b/other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("cpu.rt_runtime_us"), "1000").unwrap();
        std::fs::create_dir_all(root.path().join("a/sibling")).unwrap();
        std::fs::write(root.path().join("a/sibling/cpu.rt_runtime_us"), "300").unwrap();
        ensure_rt_budget(root.path(), "/a/b/ctr", 5000).unwrap();
        let rt = |p: &str| std::fs::read_to_string(root.path().join(p).join("cpu.rt_runtime_us"));
        assert_eq!(rt("a/b").unwrap(), "6000");
        assert_eq!(rt("a").unwrap(), "6300");
        // Enough already: left alone.
        std::fs::write(root.path().join("a/b/cpu.rt_runtime_us"), "9000").unwrap();
        ensure_rt_budget(root.path(), "/a/b/ctr", 5000).unwrap();
        assert_eq!(rt("a/b").unwrap(), "9000");
        assert!(!root.path().join("a/b/ctr").exists());
    }

    #[test]
    fn memory_reservation_bounds() {
        let r = pb::Resources {
            memory_reservation: Some(1 << 20),
            ..Default::default()
        };
        assert_eq!(
            validate(&r, &host()).unwrap_err().message(),
            "Minimum memory reservation allowed is 6MB"
        );
        let r = pb::Resources {
            memory: Some(8 << 20),
            memory_reservation: Some(16 << 20),
            ..Default::default()
        };
        assert!(
            validate(&r, &host())
                .unwrap_err()
                .message()
                .contains("reservation limit")
        );
    }

    #[test]
    fn realtime_needs_kernel_support_and_a_sane_runtime() {
        let r = pb::Resources {
            cpu_realtime_runtime: Some(1000),
            ..Default::default()
        };
        assert_eq!(
            validate(&r, &host()).unwrap_err().message(),
            "Your kernel does not support cgroup cpu real-time runtime"
        );
        let rt = HostInfo {
            cpu_realtime: true,
            ..host()
        };
        validate(&r, &rt).unwrap();
        let r = pb::Resources {
            cpu_realtime_runtime: Some(2000),
            cpu_realtime_period: Some(1000),
            ..Default::default()
        };
        assert_eq!(
            validate(&r, &rt).unwrap_err().message(),
            "cpu real-time runtime cannot be higher than cpu real-time period"
        );
    }

    #[test]
    fn without_cgroups_every_limit_is_refused_by_its_flag() {
        refuse_without_cgroups(&pb::Resources::default(), "").unwrap();
        // Docker's "unset" spellings pass.
        refuse_without_cgroups(
            &pb::Resources {
                memory: Some(0),
                pids_limit: Some(-1),
                memory_swappiness: Some(-1),
                ..Default::default()
            },
            "",
        )
        .unwrap();
        let err = refuse_without_cgroups(
            &pb::Resources {
                memory: Some(64 << 20),
                nano_cpus: Some(1_000_000_000),
                pids_limit: Some(10),
                ..Default::default()
            },
            "/mine",
        )
        .unwrap_err();
        assert_eq!(err.kind(), berth_core::ErrorKind::InvalidArgument);
        assert!(
            err.message()
                .starts_with("--memory, --cpus, --pids-limit, --cgroup-parent cannot be honoured"),
            "{}",
            err.message()
        );
    }
}
