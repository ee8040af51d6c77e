//! A container's cgroup: where it is (v1, hybrid or v2), its resource counters, and OOM
//! notifications. The shim reads it for its container; the engine reads it directly for the
//! stats it samples once a second, so streaming `docker stats` wakes no shim.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use berth_proto::berth::types::v1 as types;

use crate::{Error, ErrorKind, Result};

/// Which cgroup hierarchy the counters come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Legacy per-controller hierarchies (also hybrid layouts, where cgroup2 holds no
    /// controllers the container uses).
    V1,
    /// The unified hierarchy.
    V2,
}

/// Where a container's cgroup lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroup {
    /// Directory per v1 controller (`memory`, `cpuacct`, `cpu`, `pids`, `blkio`, ...).
    V1(HashMap<String, PathBuf>),
    /// The unified directory.
    V2(PathBuf),
}

/// CPU time, nanoseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// Total CPU time.
    pub total_ns: u64,
    /// In user mode.
    pub user_ns: u64,
    /// In kernel mode.
    pub kernel_ns: u64,
    /// Per CPU (v1 only).
    pub per_cpu_ns: Vec<u64>,
    /// CFS periods.
    pub periods: u64,
    /// Periods in which the cgroup was throttled.
    pub throttled_periods: u64,
    /// Time spent throttled.
    pub throttled_ns: u64,
    /// Host-wide CPU time at the same moment (Docker's `system_cpu_usage`).
    pub system_ns: u64,
    /// CPUs online.
    pub online_cpus: u32,
}

/// Memory counters, bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Current usage.
    pub usage: u64,
    /// Peak usage.
    pub max_usage: u64,
    /// Effective limit (host memory when unlimited).
    pub limit: u64,
    /// Times the limit was hit.
    pub failcnt: u64,
    /// `memory.stat` as read (`inactive_file`, `total_inactive_file`, ...).
    pub stats: BTreeMap<String, u64>,
    /// Swap usage.
    pub swap_usage: u64,
    /// Swap limit.
    pub swap_limit: u64,
}

/// One block-I/O counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkioEntry {
    /// Device major.
    pub major: u64,
    /// Device minor.
    pub minor: u64,
    /// `Read`, `Write`, `Sync`, `Async`, `Discard`, `Total`, or "".
    pub op: String,
    /// The counter.
    pub value: u64,
}

/// Block-I/O counters, by v1 file name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlkioStats {
    /// Bytes transferred.
    pub io_service_bytes_recursive: Vec<BlkioEntry>,
    /// Operations.
    pub io_serviced_recursive: Vec<BlkioEntry>,
    /// Queued operations.
    pub io_queue_recursive: Vec<BlkioEntry>,
    /// Service time.
    pub io_service_time_recursive: Vec<BlkioEntry>,
    /// Wait time.
    pub io_wait_time_recursive: Vec<BlkioEntry>,
    /// Merged operations.
    pub io_merged_recursive: Vec<BlkioEntry>,
    /// Disk time.
    pub io_time_recursive: Vec<BlkioEntry>,
    /// Sectors.
    pub sectors_recursive: Vec<BlkioEntry>,
}

/// One sample of a container's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// When it was read.
    pub read: SystemTime,
    /// Which hierarchy.
    pub version: Version,
    /// CPU.
    pub cpu: CpuStats,
    /// Memory.
    pub memory: MemoryStats,
    /// Current number of tasks.
    pub pids_current: u64,
    /// Task limit; 0 = unlimited.
    pub pids_limit: u64,
    /// Block I/O.
    pub blkio: BlkioStats,
}

/// The host's view, for values that are relative to it.
#[derive(Debug, Clone, Copy)]
struct Host {
    memory: u64,
    system_ns: u64,
    online_cpus: u32,
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

fn host() -> Host {
    // The machine's memory, read once per process: a stats reader runs once a second per
    // container, and /proc/meminfo is one of the dearer files to read.
    static MEMORY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let memory = *MEMORY.get_or_init(crate::procfs::host_memory);
    let system_ns = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.strip_prefix("cpu ")?.to_string();
            // user nice system idle iowait irq softirq steal (guest time is already in user).
            let ticks: u64 = line
                .split_whitespace()
                .take(8)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum();
            Some(ticks * (1_000_000_000 / ticks_per_second()))
        })
        .unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    Host {
        memory,
        system_ns,
        online_cpus: online.max(1) as u32,
    }
}

impl Cgroup {
    /// The cgroup of process `pid`, resolved against this process' cgroup mounts.
    pub fn for_pid(pid: u32) -> Result<Self> {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|e| {
            Error::new(ErrorKind::NotFound, format!("cgroup of pid {pid}")).with_source(e)
        })?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| Error::internal("read mountinfo").with_source(e))?;
        Self::resolve(&cgroup, &mountinfo)
            .ok_or_else(|| Error::not_found(format!("no cgroup hierarchy found for pid {pid}")))
    }

    /// Resolves `/proc/<pid>/cgroup` text against `/proc/self/mountinfo` text.
    fn resolve(cgroup: &str, mountinfo: &str) -> Option<Self> {
        // (mount point, root within the hierarchy, controllers) per cgroup mount.
        let mut v1_mounts: Vec<(PathBuf, String, Vec<String>)> = Vec::new();
        let mut v2_mount: Option<(PathBuf, String)> = None;
        for line in mountinfo.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(sep) = fields.iter().position(|f| *f == "-") else {
                continue;
            };
            let (Some(fstype), Some(opts)) = (fields.get(sep + 1), fields.get(sep + 3)) else {
                continue;
            };
            let (Some(root), Some(mount_point)) = (fields.get(3), fields.get(4)) else {
                continue;
            };
            match *fstype {
                "cgroup" => {
                    let controllers = opts.split(',').map(str::to_string).collect();
                    v1_mounts.push((PathBuf::from(mount_point), root.to_string(), controllers));
                }
                "cgroup2" if v2_mount.is_none() => {
                    v2_mount = Some((PathBuf::from(mount_point), root.to_string()));
                }
                _ => {}
            }
        }
        let join = |mount: &Path, root: &str, path: &str| -> PathBuf {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(path)
                .trim_start_matches('/');
            mount.join(rel)
        };
        let mut v1 = HashMap::new();
        let mut unified = None;
        for line in cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if controllers.is_empty() {
                unified = Some(path.to_string());
                continue;
            }
            for controller in controllers.split(',') {
                if let Some((mount, root, _)) = v1_mounts
                    .iter()
                    .find(|(_, _, c)| c.iter().any(|c| c == controller))
                {
                    v1.insert(controller.to_string(), join(mount, root, path));
                }
            }
        }
        if v1.contains_key("memory") || v1.contains_key("cpuacct") {
            return Some(Self::V1(v1));
        }
        let (mount, root) = v2_mount?;
        Some(Self::V2(join(&mount, &root, &unified?)))
    }

    /// Which hierarchy.
    pub fn version(&self) -> Version {
        match self {
            Self::V1(_) => Version::V1,
            Self::V2(_) => Version::V2,
        }
    }

    /// Reads every counter. Missing files read as zero: controllers differ between kernels.
    pub fn stats(&self) -> Result<Stats> {
        self.read(&Opened::new(self, false))
    }

    fn read(&self, open: &Opened) -> Result<Stats> {
        let host = host();
        let mut stats = Stats {
            read: SystemTime::now(),
            version: self.version(),
            cpu: CpuStats {
                system_ns: host.system_ns,
                online_cpus: host.online_cpus,
                ..Default::default()
            },
            memory: MemoryStats::default(),
            pids_current: 0,
            pids_limit: 0,
            blkio: BlkioStats::default(),
        };
        match self {
            Self::V1(dirs) => {
                let memory = dirs
                    .get("memory")
                    .ok_or_else(|| Error::not_found("memory cgroup"))?;
                if !memory.exists() {
                    return Err(Error::not_found(format!(
                        "cgroup {} is gone",
                        memory.display()
                    )));
                }
                read_v1(open, &host, &mut stats);
            }
            Self::V2(dir) => {
                if !dir.exists() {
                    return Err(Error::not_found(format!(
                        "cgroup {} is gone",
                        dir.display()
                    )));
                }
                read_v2(open, &host, &mut stats);
            }
        }
        Ok(stats)
    }

    /// How many processes the kernel's OOM killer has killed in this cgroup.
    pub fn oom_kills(&self) -> Option<u64> {
        match self {
            Self::V1(dirs) => {
                let text =
                    std::fs::read_to_string(dirs.get("memory")?.join("memory.oom_control")).ok()?;
                flat_keyed(&text).get("oom_kill").copied()
            }
            Self::V2(dir) => {
                let text = std::fs::read_to_string(dir.join("memory.events")).ok()?;
                flat_keyed(&text).get("oom_kill").copied()
            }
        }
    }

    /// A descriptor that becomes readable when the OOM counters may have changed: on v1 an
    /// eventfd registered on `memory.oom_control` (it also fires once when the cgroup is
    /// removed), on v2 an inotify watch on `memory.events`.
    pub fn oom_notifier(&self) -> Result<std::os::fd::OwnedFd> {
        oom_notifier(self)
    }
}

/// v1: an eventfd registered on `memory.oom_control` through `cgroup.event_control`; v2: an
/// inotify watch on `memory.events`. Either becomes readable when an OOM may have happened
/// (v1 also fires once when the cgroup is removed).
fn oom_notifier(cgroup: &Cgroup) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    match cgroup {
        Cgroup::V1(dirs) => {
            let dir = dirs
                .get("memory")
                .ok_or_else(|| Error::not_found("memory cgroup"))?;
            let control = std::fs::File::open(dir.join("memory.oom_control"))
                .map_err(|e| Error::internal("open memory.oom_control").with_source(e))?;
            // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor we own.
            let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if efd < 0 {
                return Err(Error::internal("eventfd").with_source(std::io::Error::last_os_error()));
            }
            // SAFETY: efd was just created and is owned by nothing else.
            let efd = unsafe { OwnedFd::from_raw_fd(efd) };
            std::fs::write(
                dir.join("cgroup.event_control"),
                format!("{} {}", efd.as_raw_fd(), control.as_raw_fd()),
            )
            .map_err(|e| Error::internal("register oom notification").with_source(e))?;
            Ok(efd)
        }
        Cgroup::V2(dir) => {
            // SAFETY: inotify_init1 takes no pointers; a non-negative result is ours.
            let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
            if fd < 0 {
                return Err(Error::internal("inotify").with_source(std::io::Error::last_os_error()));
            }
            // SAFETY: fd was just created and is owned by nothing else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let path =
                std::ffi::CString::new(dir.join("memory.events").as_os_str().as_encoded_bytes())
                    .map_err(|e| Error::internal("cgroup path").with_source(e))?;
            // SAFETY: path is a valid NUL-terminated string for the duration of the call.
            let wd =
                unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), libc::IN_MODIFY) };
            if wd < 0 {
                return Err(Error::internal("watch memory.events")
                    .with_source(std::io::Error::last_os_error()));
            }
            Ok(fd)
        }
    }
}

/// A cgroup read again and again (a streamed `docker stats`): its directories and the files
/// read are kept open and read anew from offset 0, so a reading opens nothing. About 15 open
/// files per cgroup on v1, fewer on v2, while the reader lives.
pub struct Reader {
    cgroup: Cgroup,
    open: Opened,
}

impl Reader {
    pub fn new(cgroup: Cgroup) -> Self {
        let open = Opened::new(&cgroup, true);
        Self { cgroup, open }
    }

    /// Every counter, as [`Cgroup::stats`].
    pub fn stats(&self) -> Result<Stats> {
        self.cgroup.read(&self.open)
    }
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

/// The whole text of an open cgroup file, read from offset 0 with plain reads (a cgroup file
/// has no size to stat, and reading it again from 0 makes the kernel render it anew).
fn read_from_start(file: &std::fs::File) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    loop {
        if n == buf.len() {
            buf.resize(n * 2, 0);
        }
        match file.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(r) => n += r,
            Err(_) => return None,
        }
    }
    buf.truncate(n);
    String::from_utf8(buf).ok()
}

/// A cgroup directory, opened once for the files a stats read takes from it: each file is then
/// opened relative to it, one path component instead of the whole path (most of the cost of
/// reading a small cgroup file is the lookup of its path).
struct Dir {
    path: PathBuf,
    fd: Option<std::os::fd::OwnedFd>,
    /// With [`Reader`]: the files read so far, kept open and read again from offset 0.
    files: Option<std::sync::Mutex<HashMap<String, std::fs::File>>>,
}

impl Dir {
    fn open(path: &Path, keep: bool) -> Self {
        use std::os::unix::ffi::OsStrExt;
        let fd = std::ffi::CString::new(path.as_os_str().as_bytes())
            .ok()
            .and_then(|c| {
                // SAFETY: `c` is a valid C string; a non-negative result is a new descriptor
                // that we own.
                let fd = unsafe {
                    libc::open(
                        c.as_ptr(),
                        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                    )
                };
                (fd >= 0).then(|| {
                    use std::os::fd::FromRawFd;
                    // SAFETY: `fd` was just opened and is owned by nothing else.
                    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
                })
            });
        Self {
            path: path.to_path_buf(),
            fd,
            files: keep.then(Default::default),
        }
    }

    /// The text of file `name`. A file the kernel does not have (no CFQ/BFQ blkio counters,
    /// no swap accounting, a v2 controller the parent does not delegate) is remembered by its
    /// name and the cgroup's parent, and not looked for again under that parent: a stats
    /// reader runs once a second per container, and a failed lookup costs as much as a read.
    fn text(&self, name: &str) -> Option<String> {
        use std::collections::HashSet;
        use std::os::fd::{AsRawFd, FromRawFd};
        use std::sync::{Mutex, OnceLock};
        static ABSENT: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
        if let Some(files) = &self.files {
            let mut files = files.lock().unwrap();
            if let Some(file) = files.get(name) {
                match read_from_start(file) {
                    Some(text) => return Some(text),
                    None => {
                        files.remove(name);
                    }
                }
            }
        }
        let dirfd = self.fd.as_ref()?;
        // <parent>/<container> + <file> -> <parent>/<file>
        let key = self.path.parent()?.join(name);
        let absent = ABSENT.get_or_init(Default::default);
        if absent.lock().unwrap().contains(&key) {
            return None;
        }
        let c = std::ffi::CString::new(name).ok()?;
        // SAFETY: `dirfd` is an open directory descriptor and `c` a valid C string; a
        // non-negative result is a new descriptor that we own.
        let fd = unsafe {
            libc::openat(
                dirfd.as_raw_fd(),
                c.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT) {
                // The directory is open, so it was there: the file is what is missing.
                absent.lock().unwrap().insert(key);
            }
            return None;
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        let text = read_from_start(&file);
        if let Some(files) = &self.files {
            files.lock().unwrap().insert(name.to_string(), file);
        }
        text
    }

    fn u64(&self, name: &str) -> Option<u64> {
        let text = self.text(name)?;
        let t = text.trim();
        if t == "max" {
            return Some(u64::MAX);
        }
        t.parse().ok()
    }
}

/// `key value` lines.
fn flat_keyed(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k.to_string(), v))
        })
        .collect()
}

/// v1 blkio files: `MAJ:MIN Op value` lines, or `MAJ:MIN value`; the `Total` line is dropped.
fn parse_blkio_v1(text: &str) -> Vec<BlkioEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dev, op, value) = match f.as_slice() {
                [dev, op, v] => (*dev, op.to_string(), *v),
                [dev, v] => (*dev, String::new(), *v),
                _ => return None,
            };
            let (maj, min) = dev.split_once(':')?;
            Some(BlkioEntry {
                major: maj.parse().ok()?,
                minor: min.parse().ok()?,
                op,
                value: value.parse().ok()?,
            })
        })
        .collect()
}

/// v2 `io.stat`: `MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. dbytes=.. dios=..`, mapped onto
/// v1's service-bytes and serviced counters.
fn parse_io_stat_v2(text: &str) -> (Vec<BlkioEntry>, Vec<BlkioEntry>) {
    let mut bytes = Vec::new();
    let mut ios = Vec::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let Some((maj, min)) = it.next().and_then(|d| d.split_once(':')) else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (maj.parse::<u64>(), min.parse::<u64>()) else {
            continue;
        };
        for kv in it {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let Ok(value) = v.parse::<u64>() else {
                continue;
            };
            let (list, op) = match k {
                "rbytes" => (&mut bytes, "Read"),
                "wbytes" => (&mut bytes, "Write"),
                "dbytes" => (&mut bytes, "Discard"),
                "rios" => (&mut ios, "Read"),
                "wios" => (&mut ios, "Write"),
                "dios" => (&mut ios, "Discard"),
                _ => continue,
            };
            list.push(BlkioEntry {
                major,
                minor,
                op: op.into(),
                value,
            });
        }
    }
    (bytes, ios)
}

/// The directories of a cgroup, opened (one per directory: v1's cpu and cpuacct are usually
/// one), and which controller is in which.
struct Opened {
    dirs: Vec<Dir>,
    of: HashMap<String, usize>,
}

impl Opened {
    fn new(cgroup: &Cgroup, keep: bool) -> Self {
        let mut dirs: Vec<Dir> = Vec::new();
        let mut of = HashMap::new();
        match cgroup {
            Cgroup::V1(paths) => {
                for (controller, path) in paths {
                    let i = match dirs.iter().position(|d| d.path == *path) {
                        Some(i) => i,
                        None => {
                            dirs.push(Dir::open(path, keep));
                            dirs.len() - 1
                        }
                    };
                    of.insert(controller.clone(), i);
                }
            }
            Cgroup::V2(path) => dirs.push(Dir::open(path, keep)),
        }
        Self { dirs, of }
    }

    fn dir(&self, controller: &str) -> Option<&Dir> {
        self.of.get(controller).map(|&i| &self.dirs[i])
    }
}

fn read_v1(open: &Opened, host: &Host, stats: &mut Stats) {
    let dir = |controller: &str| open.dir(controller);
    let num = |controller: &str, name: &str| dir(controller).and_then(|d| d.u64(name)).unwrap_or(0);
    let text = |controller: &str, name: &str| {
        dir(controller)
            .and_then(|d| d.text(name))
            .unwrap_or_default()
    };

    let tick_ns = 1_000_000_000 / ticks_per_second();
    let cpu = &mut stats.cpu;
    cpu.total_ns = num("cpuacct", "cpuacct.usage");
    cpu.per_cpu_ns = text("cpuacct", "cpuacct.usage_percpu")
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let acct = flat_keyed(&text("cpuacct", "cpuacct.stat"));
    cpu.user_ns = acct.get("user").copied().unwrap_or(0) * tick_ns;
    cpu.kernel_ns = acct.get("system").copied().unwrap_or(0) * tick_ns;
    let throttle = flat_keyed(&text("cpu", "cpu.stat"));
    cpu.periods = throttle.get("nr_periods").copied().unwrap_or(0);
    cpu.throttled_periods = throttle.get("nr_throttled").copied().unwrap_or(0);
    cpu.throttled_ns = throttle.get("throttled_time").copied().unwrap_or(0);

    let mem = &mut stats.memory;
    mem.usage = num("memory", "memory.usage_in_bytes");
    mem.max_usage = num("memory", "memory.max_usage_in_bytes");
    let limit = num("memory", "memory.limit_in_bytes");
    // "Unlimited" is a huge page-aligned number in v1.
    mem.limit = if limit == 0 || (host.memory > 0 && limit > host.memory) {
        host.memory
    } else {
        limit
    };
    mem.failcnt = num("memory", "memory.failcnt");
    mem.stats = flat_keyed(&text("memory", "memory.stat"));
    let memsw = num("memory", "memory.memsw.usage_in_bytes");
    mem.swap_usage = memsw.saturating_sub(mem.usage);
    mem.swap_limit = num("memory", "memory.memsw.limit_in_bytes");

    stats.pids_current = num("pids", "pids.current");
    stats.pids_limit = match num("pids", "pids.max") {
        u64::MAX => 0,
        n => n,
    };

    let b = &mut stats.blkio;
    let blk = |name: &str| parse_blkio_v1(&text("blkio", name));
    // CFQ/BFQ counters when the scheduler provides them, else the throttle layer's.
    let pick = |names: &[&str]| {
        names
            .iter()
            .map(|n| blk(n))
            .find(|v| !v.is_empty())
            .unwrap_or_default()
    };
    b.io_service_bytes_recursive = pick(&[
        "blkio.io_service_bytes_recursive",
        "blkio.bfq.io_service_bytes_recursive",
        "blkio.throttle.io_service_bytes_recursive",
    ]);
    b.io_serviced_recursive = pick(&[
        "blkio.io_serviced_recursive",
        "blkio.bfq.io_serviced_recursive",
        "blkio.throttle.io_serviced_recursive",
    ]);
    b.io_queue_recursive = blk("blkio.io_queued_recursive");
    b.io_service_time_recursive = blk("blkio.io_service_time_recursive");
    b.io_wait_time_recursive = blk("blkio.io_wait_time_recursive");
    b.io_merged_recursive = blk("blkio.io_merged_recursive");
    b.io_time_recursive = blk("blkio.time_recursive");
    b.sectors_recursive = blk("blkio.sectors_recursive");
}

fn read_v2(open: &Opened, host: &Host, stats: &mut Stats) {
    let dir = &open.dirs[0];
    let num = |name: &str| dir.u64(name).unwrap_or(0);
    let text = |name: &str| dir.text(name).unwrap_or_default();

    let cpu = flat_keyed(&text("cpu.stat"));
    let us = |k: &str| cpu.get(k).copied().unwrap_or(0) * 1000;
    stats.cpu.total_ns = us("usage_usec");
    stats.cpu.user_ns = us("user_usec");
    stats.cpu.kernel_ns = us("system_usec");
    stats.cpu.periods = cpu.get("nr_periods").copied().unwrap_or(0);
    stats.cpu.throttled_periods = cpu.get("nr_throttled").copied().unwrap_or(0);
    stats.cpu.throttled_ns = us("throttled_usec");

    let mem = &mut stats.memory;
    mem.usage = num("memory.current");
    mem.max_usage = num("memory.peak");
    mem.limit = match num("memory.max") {
        0 | u64::MAX => host.memory,
        n => n,
    };
    let events = flat_keyed(&text("memory.events"));
    mem.failcnt = events.get("max").copied().unwrap_or(0);
    mem.stats = flat_keyed(&text("memory.stat"));
    mem.swap_usage = num("memory.swap.current");
    mem.swap_limit = num("memory.swap.max");

    stats.pids_current = num("pids.current");
    stats.pids_limit = match num("pids.max") {
        u64::MAX => 0,
        n => n,
    };
    let (bytes, ios) = parse_io_stat_v2(&text("io.stat"));
    stats.blkio.io_service_bytes_recursive = bytes;
    stats.blkio.io_serviced_recursive = ios;
}

fn blkio(entries: Vec<BlkioEntry>) -> Vec<types::BlkioEntry> {
    entries
        .into_iter()
        .map(|e| types::BlkioEntry {
            major: e.major,
            minor: e.minor,
            op: e.op,
            value: e.value,
        })
        .collect()
}

impl From<Stats> for types::CgroupStats {
    fn from(s: Stats) -> Self {
        let version = match s.version {
            Version::V1 => types::CgroupVersion::V1,
            Version::V2 => types::CgroupVersion::V2,
        };
        Self {
            read: Some(timestamp(s.read)),
            cgroup_version: version as i32,
            cpu: Some(types::CpuStats {
                usage: Some(types::CpuUsage {
                    total_ns: s.cpu.total_ns,
                    user_ns: s.cpu.user_ns,
                    kernel_ns: s.cpu.kernel_ns,
                    per_cpu_ns: s.cpu.per_cpu_ns,
                }),
                throttling: Some(types::CpuThrottling {
                    periods: s.cpu.periods,
                    throttled_periods: s.cpu.throttled_periods,
                    throttled_time_ns: s.cpu.throttled_ns,
                }),
                system_usage_ns: s.cpu.system_ns,
                online_cpus: s.cpu.online_cpus,
            }),
            memory: Some(types::MemoryStats {
                usage: s.memory.usage,
                max_usage: s.memory.max_usage,
                limit: s.memory.limit,
                failcnt: s.memory.failcnt,
                stats: s.memory.stats.into_iter().collect(),
                swap_usage: s.memory.swap_usage,
                swap_limit: s.memory.swap_limit,
            }),
            pids: Some(types::PidsStats {
                current: s.pids_current,
                limit: s.pids_limit,
            }),
            blkio: Some(types::BlkioStats {
                io_service_bytes_recursive: blkio(s.blkio.io_service_bytes_recursive),
                io_serviced_recursive: blkio(s.blkio.io_serviced_recursive),
                io_queue_recursive: blkio(s.blkio.io_queue_recursive),
                io_service_time_recursive: blkio(s.blkio.io_service_time_recursive),
                io_wait_time_recursive: blkio(s.blkio.io_wait_time_recursive),
                io_merged_recursive: blkio(s.blkio.io_merged_recursive),
                io_time_recursive: blkio(s.blkio.io_time_recursive),
                sectors_recursive: blkio(s.blkio.sectors_recursive),
            }),
        }
    }
}

fn timestamp(t: SystemTime) -> berth_proto::prost_types::Timestamp {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    berth_proto::prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_keeps_its_files_and_reads_them_anew() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("parent").join("ctr");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("memory.current"), "100\n").unwrap();
        std::fs::write(dir.join("pids.current"), "3\n").unwrap();
        let reader = Reader::new(Cgroup::V2(dir.clone()));
        let first = reader.stats().unwrap();
        assert_eq!((first.memory.usage, first.pids_current), (100, 3));
        // Rewritten in place, as the kernel renders a cgroup file anew on each read.
        std::fs::write(dir.join("memory.current"), "2048\n").unwrap();
        let second = reader.stats().unwrap();
        assert_eq!((second.memory.usage, second.pids_current), (2048, 3));
        // A file the kernel lacks reads as zero.
        assert_eq!(second.memory.swap_usage, 0);
        assert_eq!(Cgroup::V2(dir.clone()).stats().unwrap().memory.usage, 2048);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(reader.stats().unwrap_err().kind(), ErrorKind::NotFound);
    }

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn resolves_hybrid_as_v1_and_unified_as_v2() {
        let cg = "4:memory:/c1\n2:cpuacct:/c1\n1:cpu:/c1\n8:pids:/c1\n7:blkio:/c1\n0::/c1\n";
        let Cgroup::V1(dirs) = Cgroup::resolve(cg, MOUNTINFO).unwrap() else {
            panic!("not v1")
        };
        assert_eq!(dirs["memory"], Path::new("/sys/fs/cgroup/memory/c1"));
        assert_eq!(dirs["cpuacct"], Path::new("/sys/fs/cgroup/cpuacct/c1"));
        let v2 = "29 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            Cgroup::resolve("0::/system.slice/c1\n", v2).unwrap(),
            Cgroup::V2("/sys/fs/cgroup/system.slice/c1".into())
        );
        // A shim inside a cgroup namespace sees hierarchy roots that are not "/".
        let nested = "29 23 0:26 /outer /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            Cgroup::resolve("0::/outer/c1\n", nested).unwrap(),
            Cgroup::V2("/sys/fs/cgroup/c1".into())
        );
    }

    #[test]
    fn reads_v1_counters() {
        let dir = tempfile::tempdir().unwrap();
        let mut dirs = HashMap::new();
        for c in ["memory", "cpuacct", "cpu", "pids", "blkio"] {
            std::fs::create_dir(dir.path().join(c)).unwrap();
            dirs.insert(c.to_string(), dir.path().join(c));
        }
        let w = |c: &str, f: &str, v: &str| std::fs::write(dir.path().join(c).join(f), v).unwrap();
        w("cpuacct", "cpuacct.usage", "5000\n");
        w("cpuacct", "cpuacct.usage_percpu", "2000 3000 \n");
        w("cpuacct", "cpuacct.stat", "user 2\nsystem 1\n");
        w(
            "cpu",
            "cpu.stat",
            "nr_periods 10\nnr_throttled 2\nthrottled_time 77\n",
        );
        w("memory", "memory.usage_in_bytes", "4096\n");
        w("memory", "memory.limit_in_bytes", "9223372036854771712\n");
        w(
            "memory",
            "memory.stat",
            "cache 10\ntotal_inactive_file 7\ninactive_file 5\n",
        );
        w(
            "memory",
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        w("pids", "pids.current", "3\n");
        w("pids", "pids.max", "max\n");
        w(
            "blkio",
            "blkio.throttle.io_service_bytes_recursive",
            "8:0 Read 100\n8:0 Write 50\nTotal 150\n",
        );
        let cg = Cgroup::V1(dirs);
        let s = cg.stats().unwrap();
        assert_eq!(s.version, Version::V1);
        assert_eq!(
            (s.cpu.total_ns, s.cpu.per_cpu_ns.clone()),
            (5000, vec![2000, 3000])
        );
        assert_eq!(s.cpu.user_ns, 2 * (1_000_000_000 / ticks_per_second()));
        assert_eq!(
            (s.cpu.periods, s.cpu.throttled_periods, s.cpu.throttled_ns),
            (10, 2, 77)
        );
        assert_eq!(s.memory.usage, 4096);
        assert_eq!(
            s.memory.limit,
            host().memory,
            "unlimited reads as the host's memory"
        );
        assert_eq!(s.memory.stats["inactive_file"], 5);
        assert_eq!(s.memory.stats["total_inactive_file"], 7);
        assert_eq!((s.pids_current, s.pids_limit), (3, 0));
        assert_eq!(
            s.blkio.io_service_bytes_recursive,
            [
                BlkioEntry {
                    major: 8,
                    minor: 0,
                    op: "Read".into(),
                    value: 100
                },
                BlkioEntry {
                    major: 8,
                    minor: 0,
                    op: "Write".into(),
                    value: 50
                },
            ]
        );
        assert!(s.cpu.online_cpus >= 1);
        assert_eq!(cg.oom_kills(), Some(2));
    }

    #[test]
    fn reads_v2_counters() {
        let dir = tempfile::tempdir().unwrap();
        let w = |f: &str, v: &str| std::fs::write(dir.path().join(f), v).unwrap();
        w(
            "cpu.stat",
            "usage_usec 10\nuser_usec 6\nsystem_usec 4\nnr_periods 1\nnr_throttled 0\nthrottled_usec 0\n",
        );
        w("memory.current", "8192\n");
        w("memory.max", "1048576\n");
        w("memory.stat", "anon 1\nfile 2\ninactive_file 3\n");
        w("memory.events", "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n");
        w("pids.current", "2\n");
        w("pids.max", "100\n");
        w(
            "io.stat",
            "8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n",
        );
        let cg = Cgroup::V2(dir.path().into());
        let s = cg.stats().unwrap();
        assert_eq!(s.version, Version::V2);
        assert_eq!(
            (s.cpu.total_ns, s.cpu.user_ns, s.cpu.kernel_ns),
            (10_000, 6000, 4000)
        );
        assert_eq!(
            (s.memory.usage, s.memory.limit, s.memory.failcnt),
            (8192, 1_048_576, 4)
        );
        assert_eq!(s.memory.stats["inactive_file"], 3);
        assert_eq!((s.pids_current, s.pids_limit), (2, 100));
        assert_eq!(
            s.blkio.io_service_bytes_recursive[1],
            BlkioEntry {
                major: 8,
                minor: 0,
                op: "Write".into(),
                value: 20
            }
        );
        assert_eq!(s.blkio.io_serviced_recursive[0].value, 1);
        assert_eq!(cg.oom_kills(), Some(1));
        let gone = Cgroup::V2(dir.path().join("nope"));
        assert_eq!(gone.stats().unwrap_err().kind(), ErrorKind::NotFound);
    }
}
