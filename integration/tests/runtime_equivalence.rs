//! Issue 18: the shim's in-process runtime (youki's libcontainer, `--runtime libcontainer`)
//! against runc, through the real docker CLI on one berth stack. The same `docker run` options
//! with each runtime must give the same output of a probe script: `/proc/self/{status,
//! mountinfo, cgroup, limits, oom_score_adj}`, the namespaces of `/proc/self/ns/*`, `id`,
//! `hostname`, `ls -l /dev`, `mount`, who owns the stdio the container was given (and whether
//! the user can reopen it as `/dev/stdout`), how seccomp denies `unshare -U`, `mount` and `linux32`,
//! and the cgroup limits read inside the container and, from the host, in its cgroup dirs. The
//! matrix: root and `--user 1000:1000`, with and without `-t`, on the default bridge, the host
//! network and a joined network namespace (`--network container:<helper>`).
//!
//! Only what must differ between two containers is normalised (see [`normalise`]); on a
//! mismatch the test prints a unified diff of the two outputs. Root only; skips otherwise.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use berth_integration::gateway_kit::{DockerStack, ready};
use berth_integration::py_kit;
use berth_integration::stack::wait_for;

const RUNTIMES: [&str; 2] = ["runc", "libcontainer"];

/// The limits every probe container runs with.
const LIMITS: &[&str] = &[
    "--memory",
    "64m",
    "--pids-limit",
    "50",
    "--cpus",
    "0.5",
    "--cpuset-cpus",
    "0",
];

/// The cgroup v1 files read inside (under the container's `/sys/fs/cgroup/<controller>`) and
/// outside (the container's cgroup dir on the host), by controller.
const CGROUP_FILES: &[(&str, &str)] = &[
    ("memory", "memory.limit_in_bytes"),
    ("memory", "memory.memsw.limit_in_bytes"),
    ("pids", "pids.max"),
    ("cpu", "cpu.cfs_quota_us"),
    ("cpu", "cpu.cfs_period_us"),
    ("cpu", "cpu.shares"),
    ("cpuset", "cpuset.cpus"),
    ("cpuset", "cpuset.mems"),
];

/// The last line the probe prints before it sleeps (so the host side can be read while the
/// container still runs).
const DONE: &str = "== done";

fn probe_script() -> String {
    let mut s = String::from(
        r#"
echo "== status"; cat /proc/self/status
echo "== mountinfo"; cat /proc/self/mountinfo
echo "== cgroup"; cat /proc/self/cgroup
echo "== limits"; cat /proc/self/limits
echo "== oom_score_adj"; cat /proc/self/oom_score_adj
echo "== ns"; for n in /proc/self/ns/*; do echo "$n $(readlink $n)"; done
echo "== id"; id
echo "== hostname"; hostname
echo "== dev"; ls -l /dev
echo "== mount"; mount
echo "== stdio"
stat -L -c '%n %u:%g %a %F %t,%T' /proc/self/fd/0 /proc/self/fd/1 /proc/self/fd/2
(echo through /dev/stdout > /dev/stdout) 2>&1; echo "dev-stdout=$?"
echo "== seccomp"
unshare -U true 2>&1; echo "unshare=$?"
mount -t tmpfs x /mnt 2>&1; echo "mount=$?"
linux32 true 2>&1; echo "linux32=$?"
echo "== read-only"
(echo x > /sys/kernel/uevent_helper) 2>&1; echo "sys-write=$?"
(echo 1 > /sys/fs/cgroup/pids/pids.max) 2>&1; echo "cgroup-write=$?"
mkdir /sys/fs/cgroup/x 2>&1; echo "cgroup-tmpfs-write=$?"
echo "== cgroup limits inside"
"#,
    );
    for (controller, file) in CGROUP_FILES {
        let _ = writeln!(
            s,
            "echo \"{controller}/{file}=$(cat /sys/fs/cgroup/{controller}/{file} 2>&1)\""
        );
    }
    let _ = writeln!(s, "echo '{DONE}'; exec sleep 100000");
    s
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Net {
    Bridge,
    Host,
    Joined,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    user: bool,
    tty: bool,
    net: Net,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "{}{}, {:?} network",
            if self.user {
                "--user 1000:1000"
            } else {
                "root"
            },
            if self.tty { ", -t" } else { "" },
            self.net
        )
    }
}

/// What the probe compares against: namespaces of the host and of the joined container, the
/// stack's dir (mounts below it belong to containers) and the helper's id.
struct World {
    /// `readlink` text of a namespace (`net:[4026531833]`) → `host` or `joined`.
    namespaces: HashMap<String, &'static str>,
    helper_id: String,
    helper_pid: i32,
    stack_dir: String,
}

/// `type:[inode]` of each namespace in `dir` (a `/proc/<pid>/ns`).
fn namespaces(dir: &Path) -> Result<Vec<String>> {
    let mut links = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let link = std::fs::read_link(entry?.path())?;
        links.push(link.to_string_lossy().into_owned());
    }
    Ok(links)
}

impl World {
    fn new(d: &DockerStack, helper_id: String) -> Result<Self> {
        let helper_pid: i32 = d
            .ok(&["inspect", "-f", "{{.State.Pid}}", &helper_id])?
            .parse()?;
        let mut map = HashMap::new();
        for link in namespaces(&Path::new("/proc").join(helper_pid.to_string()).join("ns"))? {
            map.insert(link, "joined");
        }
        // The host's namespaces are PID 1's; where PID 1 is a sandbox's init whose links this
        // process may not read (ptrace access), this test's own, which are the host's too: the
        // test runs outside any container.
        let host = namespaces(Path::new("/proc/1/ns"))
            .or_else(|_| namespaces(Path::new("/proc/self/ns")))?;
        for link in host {
            map.insert(link, "host");
        }
        Ok(Self {
            namespaces: map,
            helper_id,
            helper_pid,
            stack_dir: d.stack.dir().display().to_string(),
        })
    }

    /// Device numbers (`0:27`) of the host's own mounts, i.e. not of a container of this stack
    /// (those are mounted below the stack's dir): a container showing one of these shares the
    /// host's filesystem, any other anonymous device is one of its own.
    fn host_devices(&self) -> Result<HashSet<String>> {
        let info = std::fs::read_to_string("/proc/self/mountinfo")?;
        Ok(info
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f.len() > 4 && !f[4].starts_with(&self.stack_dir)).then(|| f[2].to_string())
            })
            .collect())
    }
}

/// `docker run`s the probe with `runtime` for `case`; returns its output with what the host
/// sees of its cgroups appended, normalised.
fn probe(d: &DockerStack, w: &World, case: Case, runtime: &str) -> Result<String> {
    let script = probe_script();
    let helper = format!("container:{}", w.helper_id);
    let mut args = vec!["run", "-d", "--runtime", runtime];
    args.extend_from_slice(LIMITS);
    // Docker refuses a hostname with a joined network namespace (the container takes the
    // joined one's).
    if case.net != Net::Joined {
        args.extend(["--hostname", "probe"]);
    }
    if case.user {
        args.extend(["--user", "1000:1000"]);
    }
    if case.tty {
        args.push("-t");
    }
    match case.net {
        Net::Bridge => {}
        Net::Host => args.extend(["--network", "host"]),
        Net::Joined => args.extend(["--network", helper.as_str()]),
    }
    args.extend(["busybox", "sh", "-c", &script]);
    let id = d.ok(&args).map_err(|e| e.context(diagnostics(d)))?;
    let result = read_probe(d, w, &id);
    let _ = d.run(&["rm", "-f", &id]);
    result
}

fn read_probe(d: &DockerStack, w: &World, id: &str) -> Result<String> {
    let logs = |d: &DockerStack| -> Option<String> {
        let out = d.run(&["logs", id]).ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains(DONE).then_some(text)
    };
    let Some(inside) = wait_for(Duration::from_secs(30), || logs(d)) else {
        let out = d.run(&["logs", id])?;
        bail!(
            "the probe never finished; logs:\n{}{}\nps: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            d.ok(&["ps", "-a"])?
        );
    };
    let pid: i32 = d.ok(&["inspect", "-f", "{{.State.Pid}}", id])?.parse()?;
    let outside = outside(pid)?;
    let host_devices = w.host_devices()?;
    Ok(normalise(
        &format!("{inside}{outside}"),
        w,
        id,
        &host_devices,
    ))
}

/// What a failed `docker run` leaves to read: `docker ps -a`, the shims' logs, the stack's log.
fn diagnostics(d: &DockerStack) -> String {
    let mut out = format!("docker ps -a:\n{:?}\n", d.ok(&["ps", "-a", "--no-trunc"]));
    let bundles = d.stack.state_dir().join("bundles");
    for entry in std::fs::read_dir(bundles).into_iter().flatten().flatten() {
        let log = std::fs::read_to_string(entry.path().join("shim.log")).unwrap_or_default();
        let _ = writeln!(out, "shim.log of {:?}:\n{log}", entry.file_name());
    }
    let log = d.stack.log_text();
    let tail: Vec<&str> = log.lines().rev().take(60).collect();
    let _ = writeln!(out, "berth up's log (last lines):");
    for l in tail.iter().rev() {
        let _ = writeln!(out, "{l}");
    }
    out
}

/// The container's cgroup limits read on the host, in the dirs its `/proc/<pid>/cgroup` names.
fn outside(pid: i32) -> Result<String> {
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let mut out = String::from("== cgroup limits outside\n");
    for (controller, file) in CGROUP_FILES {
        let line = cgroup.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, hierarchy, path) = (parts.next()?, parts.next()?, parts.next()?);
            hierarchy
                .split(',')
                .any(|c| c == *controller)
                .then(|| (hierarchy.to_string(), path.to_string()))
        });
        let Some((hierarchy, path)) = line else {
            let _ = writeln!(out, "{controller}: not in /proc/<pid>/cgroup");
            continue;
        };
        let file_path = Path::new("/sys/fs/cgroup")
            .join(&hierarchy)
            .join(path.trim_start_matches('/'))
            .join(file);
        let value = std::fs::read_to_string(&file_path)
            .map(|v| v.trim_end().to_string())
            .unwrap_or_else(|e| format!("error: {e}"));
        let _ = writeln!(out, "{hierarchy}:{path} {file}={value}");
    }
    Ok(out)
}

/// What is dropped from `/proc/self/status`: counters of memory the process has touched and of
/// its context switches, which depend on page faults and scheduling, not on how it was started
/// (`VmPeak VmSize VmHWM VmRSS RssAnon RssFile RssShmem VmData VmStk VmPTE VmSwap
/// voluntary_ctxt_switches nonvoluntary_ctxt_switches`), and `SigQ`, whose first number counts
/// the signals queued host-wide for the real uid at that moment. Every other line is kept:
/// Name, Umask, State, the pids (the container's own pid namespace makes them the same), Uid,
/// Gid, Groups, FDSize, Cap*, NoNewPrivs, Seccomp, Sig{Pnd,Blk,Ign,Cgt}, Cpus_allowed,
/// Mems_allowed, ...
const STATUS_DROPPED: &[&str] = &[
    "VmPeak",
    "VmSize",
    "VmHWM",
    "VmRSS",
    "RssAnon",
    "RssFile",
    "RssShmem",
    "VmData",
    "VmStk",
    "VmPTE",
    "VmSwap",
    "voluntary_ctxt_switches",
    "nonvoluntary_ctxt_switches",
    "SigQ",
];

/// Status lines holding the probe's own pid in the container's pid namespace. The value is
/// not the runtime's to choose: runc's `runc init` is a Go program whose threads take pids in
/// the new namespace before it execs the command (2-5 here, 2-4 with a terminal; plain `runc
/// run` shows the same), so the command's first child gets pid 6 (5) under runc and 2 under a
/// runtime that runs no Go in the container. Only a value other than 1 is replaced.
const PIDS: &[&str] = &["Pid", "Tgid", "NStgid", "NSpid"];

/// Replaces, and only replaces, what must differ between two containers:
/// - the container's id (full and short) → `<id>`, the helper's → `<helper>`;
/// - namespace inodes → `host`, `joined` (the helper's) or `new`;
/// - in mountinfo, mount ids and parent ids → `m<n>`, the mount's position in the file (a
///   parent outside the container's view → `out`); anonymous device numbers (`0:N`) that are
///   not a host filesystem's → `0:a<n>` by first appearance (new superblocks: the overlay
///   rootfs, proc, tmpfs, mqueue, ...);
/// - overlay `upperdir=`/`workdir=` paths (each container has its own snapshot) in mountinfo
///   and `mount`;
/// - the dates in `ls -l /dev`;
/// - the superblock flag (`ro`/`rw`, after the fstype and source) of a `sysfs` mount that is
///   itself read-only: runc passes `MS_RDONLY` to mount(2), which also marks the new superblock;
///   libcontainer mounts with the new mount API and makes the mount read-only
///   (`MOUNT_ATTR_RDONLY`), leaving the superblock `rw`. Writes fail with EROFS either way,
///   which the probe's `== read-only` section checks;
/// - the status lines of [`STATUS_DROPPED`], and the probe's pid ([`PIDS`]).
fn normalise(text: &str, w: &World, id: &str, host_devices: &HashSet<String>) -> String {
    let text = text
        .replace(id, "<id>")
        .replace(&id[..12], "<id>")
        .replace(&w.helper_id, "<helper>")
        .replace(&w.helper_id[..12], "<helper>");
    let mut section = String::new();
    let mut out = String::new();
    // mountinfo: mount id → position, anonymous device → position of first appearance.
    let mut mount_ids = HashMap::new();
    let mut devices: HashMap<String, usize> = HashMap::new();
    let mut in_mountinfo = false;
    for line in text.split('\n') {
        if line.trim_end_matches('\r') == "== mountinfo" {
            in_mountinfo = true;
        } else if line.starts_with("== ") {
            in_mountinfo = false;
        } else if in_mountinfo && let Some(id) = line.split(' ').next() {
            let n = mount_ids.len() + 1;
            mount_ids.entry(id.to_string()).or_insert(n);
        }
    }
    for raw in text.split('\n') {
        let (line, cr) = match raw.strip_suffix('\r') {
            Some(l) => (l, "\r"),
            None => (raw, ""),
        };
        if let Some(name) = line.strip_prefix("== ") {
            section = name.to_string();
            let _ = writeln!(out, "{line}{cr}");
            continue;
        }
        let line = match section.as_str() {
            "status" => {
                let key = line.split(':').next().unwrap_or("");
                if STATUS_DROPPED.contains(&key) {
                    continue;
                }
                match (PIDS.contains(&key), line.split_once('\t')) {
                    (true, Some((k, v))) if v != "1" => format!("{k}\t<pid>"),
                    _ => line.to_string(),
                }
            }
            "mountinfo" => mountinfo_line(line, &mount_ids, &mut devices, host_devices),
            "ns" => match line.split_once(' ') {
                Some((path, link)) => {
                    let kind = link.split(':').next().unwrap_or(link);
                    let label = w.namespaces.get(link).copied().unwrap_or("new");
                    format!("{path} {kind}:{label}")
                }
                None => line.to_string(),
            },
            "dev" => undate(line),
            "mount" => overlay_paths(line),
            _ => line.to_string(),
        };
        let _ = writeln!(out, "{line}{cr}");
    }
    out.truncate(out.trim_end_matches('\n').len());
    out
}

fn mountinfo_line(
    line: &str,
    mount_ids: &HashMap<String, usize>,
    devices: &mut HashMap<String, usize>,
    host_devices: &HashSet<String>,
) -> String {
    let mut f: Vec<String> = line.split(' ').map(str::to_string).collect();
    if f.len() < 10 {
        return line.to_string();
    }
    f[0] = format!("m{}", mount_ids.get(&f[0]).copied().unwrap_or(0));
    f[1] = match mount_ids.get(&f[1]) {
        Some(n) => format!("m{n}"),
        None => "out".into(),
    };
    if f[2].starts_with("0:") && !host_devices.contains(&f[2]) {
        let n = devices.len() + 1;
        let n = *devices.entry(f[2].clone()).or_insert(n);
        f[2] = format!("0:a{n}");
    }
    let dash = f.iter().position(|x| x == "-").unwrap_or(f.len());
    if f.get(dash + 1).is_some_and(|t| t == "overlay")
        && let Some(opts) = f.get_mut(dash + 3)
    {
        *opts = overlay_paths(opts);
    }
    let mount_ro = f[5].split(',').any(|o| o == "ro");
    if mount_ro
        && f.get(dash + 1).is_some_and(|t| t == "sysfs")
        && let Some(opts) = f.get_mut(dash + 3)
    {
        *opts = opts
            .split(',')
            .map(|o| if o == "ro" || o == "rw" { "<sb>" } else { o })
            .collect::<Vec<_>>()
            .join(",");
    }
    f.join(" ")
}

/// `upperdir=<path>` and `workdir=<path>` (a container's own snapshot) → `upperdir=<upper>`,
/// `workdir=<work>`; `lowerdir` (the image's layers, the same for both) is kept.
fn overlay_paths(s: &str) -> String {
    let mut out = s.to_string();
    for (key, placeholder) in [("upperdir=", "<upper>"), ("workdir=", "<work>")] {
        if let Some(start) = out.find(key).map(|i| i + key.len()) {
            let end = out[start..]
                .find([',', ')', ' '])
                .map_or(out.len(), |e| start + e);
            out.replace_range(start..end, placeholder);
        }
    }
    out
}

/// `ls -l` with its date and time (`Dec  7 20:57`) replaced by `<date>`, spacing kept.
fn undate(line: &str) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut tokens = Vec::new();
    let mut start = None;
    for (i, c) in line.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(s)) => {
                tokens.push((s, &line[s..i]));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        tokens.push((s, &line[s..]));
    }
    match tokens.iter().position(|(_, t)| MONTHS.contains(t)) {
        Some(i) if i + 2 < tokens.len() => {
            let (from, _) = tokens[i];
            let (at, last) = tokens[i + 2];
            format!("{}<date>{}", &line[..from], &line[at + last.len()..])
        }
        _ => line.to_string(),
    }
}

/// A unified diff of `a` and `b` (by `diff -u`).
fn diff(a: &str, b: &str, names: (&str, &str)) -> String {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return format!("(no diff: {e})"),
    };
    let (pa, pb) = (dir.path().join(names.0), dir.path().join(names.1));
    if std::fs::write(&pa, a).is_err() || std::fs::write(&pb, b).is_err() {
        return "(no diff: cannot write)".into();
    }
    std::process::Command::new("diff")
        .arg("-u")
        .arg(&pa)
        .arg(&pb)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("(no diff: {e})"))
}

/// The checks that make a match meaningful: runc's output shows the limits and the filter.
fn sanity(case: Case, runc: &str) -> Result<()> {
    for want in [
        "Seccomp:\t2",
        "memory/memory.limit_in_bytes=67108864",
        ":/berth/<id> memory.limit_in_bytes=67108864",
        "pids/pids.max=50",
        ":/berth/<id> pids.max=50",
        ":/berth/<id> cpu.cfs_quota_us=50000",
        ":/berth/<id> cpuset.cpus=0",
        "/proc/self/ns/cgroup cgroup:host",
        "/proc/self/ns/pid pid:new",
        "cpu/cpu.cfs_quota_us=50000",
        "cpuset/cpuset.cpus=0",
        "unshare=1",
        "mount=1",
        "sys-write=1",
        "cgroup-write=1",
        "== cgroup limits outside",
    ] {
        ensure!(
            runc.contains(want),
            "{}: runc's probe lacks {want:?}:\n{runc}",
            case.name()
        );
    }
    if case.user {
        ensure!(runc.contains("uid=1000"), "{}: {runc}", case.name());
    }
    if case.net != Net::Joined {
        ensure!(runc.contains("== hostname\nprobe") || runc.contains("== hostname\r\nprobe"));
    }
    let net = match case.net {
        Net::Bridge => "net:new",
        Net::Host => "net:host",
        Net::Joined => "net:joined",
    };
    ensure!(
        runc.contains(&format!("/proc/self/ns/net {net}")),
        "{}: {runc}",
        case.name()
    );
    Ok(())
}

#[test]
fn libcontainer_matches_runc() -> Result<()> {
    if !ready() {
        return Ok(());
    }
    let d = DockerStack::start()?;
    let _registry = py_kit::with_busybox(&d)?;
    let helper = d.ok(&[
        "run",
        "-d",
        "--runtime",
        "runc",
        "busybox",
        "sleep",
        "100000",
    ])?;
    let w = World::new(&d, helper)?;
    ensure!(w.helper_pid > 0);

    let mut mismatches = Vec::new();
    for net in [Net::Bridge, Net::Host, Net::Joined] {
        for user in [false, true] {
            for tty in [false, true] {
                let case = Case { user, tty, net };
                let runc = probe(&d, &w, case, RUNTIMES[0])
                    .with_context(|| format!("{}: runc", case.name()))?;
                sanity(case, &runc)?;
                let lc = probe(&d, &w, case, RUNTIMES[1])
                    .with_context(|| format!("{}: libcontainer", case.name()))?;
                if runc != lc {
                    mismatches.push(format!(
                        "--- {} ---\n{}",
                        case.name(),
                        diff(&runc, &lc, RUNTIMES.into())
                    ));
                }
            }
        }
    }
    ensure!(
        mismatches.is_empty(),
        "{} of 12 cases differ between runc and libcontainer:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    Ok(())
}
