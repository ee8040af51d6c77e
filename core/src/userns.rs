//! Container user namespaces: the id map containers get, and shifting ids through it.
//!
//! A rootful daemon with `[engine] userns_remap` maps each container's ids onto the subordinate
//! ranges of a host user (`/etc/subuid`, `/etc/subgid`), as dockerd's `userns-remap` does: all
//! ranges of the user, in file order, concatenated into the container's id space from 0. A
//! rootless daemon (`rootless = true`) runs as uid 0 of a user namespace whose map is
//! `0 <user> 1` plus `1 <subuid start> <count>`; its containers map `0..count` onto the
//! daemon's ids `1..=count` (the subordinate range on the host), never onto the user itself.
//!
//! [`IdMap`] is the result; everything that writes files a container sees (layer unpack,
//! volumes, the engine's per-container files, `docker cp`) shifts ownership through it, and
//! everything that reads them out (`docker cp`, export, commit) shifts back.

use std::fmt::Write as _;
use std::io::{Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::error::{Context, Error, ErrorKind, Result};

/// One contiguous run of ids: `container..container+size` are `host..host+size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// First id inside the container.
    pub container: u32,
    /// First id on the host (or, rootless, in the daemon's own namespace).
    pub host: u32,
    /// How many ids.
    pub size: u32,
}

impl IdRange {
    fn host_of(self, id: u32) -> Option<u32> {
        let off = id.checked_sub(self.container)?;
        (off < self.size).then(|| self.host + off)
    }

    fn container_of(self, id: u32) -> Option<u32> {
        let off = id.checked_sub(self.host)?;
        (off < self.size).then(|| self.container + off)
    }
}

/// The user and group id maps of a container's user namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMap {
    /// uid ranges, container ids ascending from 0.
    pub uids: Vec<IdRange>,
    /// gid ranges, container ids ascending from 0.
    pub gids: Vec<IdRange>,
}

/// Which of the two maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    /// User ids.
    Uid,
    /// Group ids.
    Gid,
}

impl IdKind {
    fn name(self) -> &'static str {
        match self {
            Self::Uid => "uid",
            Self::Gid => "gid",
        }
    }
}

impl IdMap {
    fn ranges(&self, kind: IdKind) -> &[IdRange] {
        match kind {
            IdKind::Uid => &self.uids,
            IdKind::Gid => &self.gids,
        }
    }

    /// The host id of container id `id`, if the map covers it.
    pub fn to_host(&self, kind: IdKind, id: u32) -> Option<u32> {
        self.ranges(kind).iter().find_map(|r| r.host_of(id))
    }

    /// The container id of host id `id`, if the map covers it.
    pub fn to_container(&self, kind: IdKind, id: u32) -> Option<u32> {
        self.ranges(kind).iter().find_map(|r| r.container_of(id))
    }

    /// Host `(uid, gid)` of container `(uid, gid)`; an id outside the map is an error naming
    /// `what` (a file, a tar entry) and the id.
    pub fn host_owner(
        &self,
        what: &dyn std::fmt::Display,
        uid: u32,
        gid: u32,
    ) -> Result<(u32, u32)> {
        let u = self
            .to_host(IdKind::Uid, uid)
            .ok_or_else(|| outside(what, IdKind::Uid, uid))?;
        let g = self
            .to_host(IdKind::Gid, gid)
            .ok_or_else(|| outside(what, IdKind::Gid, gid))?;
        Ok((u, g))
    }

    /// Container `(uid, gid)` of host `(uid, gid)`; ids outside the map are the overflow ids
    /// (65534, "nobody"), which is what the kernel shows the container for them.
    pub fn container_owner(&self, uid: u32, gid: u32) -> (u32, u32) {
        (
            self.to_container(IdKind::Uid, uid).unwrap_or(OVERFLOW_ID),
            self.to_container(IdKind::Gid, gid).unwrap_or(OVERFLOW_ID),
        )
    }

    /// The host uid and gid of the container's root.
    pub fn root(&self) -> (u32, u32) {
        (
            self.to_host(IdKind::Uid, 0).unwrap_or(OVERFLOW_ID),
            self.to_host(IdKind::Gid, 0).unwrap_or(OVERFLOW_ID),
        )
    }

    /// A short stable name of this map: snapshots unpacked with it are keyed by it, so
    /// differently shifted layers never mix.
    pub fn fingerprint(&self) -> String {
        let mut text = String::new();
        for (tag, ranges) in [("u", &self.uids), ("g", &self.gids)] {
            for r in ranges {
                let _ = write!(text, "{tag}:{}:{}:{};", r.container, r.host, r.size);
            }
        }
        hex::encode(&Sha256::digest(text.as_bytes())[..6])
    }

    /// The snapshot key of the layer chain `chain_id` unpacked with this map.
    pub fn snapshot_key(&self, chain_id: &str) -> String {
        format!("{chain_id}{}", self.snapshot_suffix())
    }

    /// What [`IdMap::snapshot_key`] appends to a chain id.
    pub fn snapshot_suffix(&self) -> String {
        format!("{SNAPSHOT_KEY_MARK}{}", self.fingerprint())
    }
}

/// The id the kernel shows for an id a user namespace does not map.
pub const OVERFLOW_ID: u32 = 65534;

/// What separates a chain id from the map fingerprint in the key of a shifted snapshot.
pub const SNAPSHOT_KEY_MARK: &str = "@userns-";

fn outside(what: &dyn std::fmt::Display, kind: IdKind, id: u32) -> Error {
    Error::invalid_argument(format!(
        "{what}: {} {id} is outside the container's user namespace map",
        kind.name()
    ))
}

/// The snapshot key of layer chain `chain_id` for containers with `map` (none: the chain id).
pub fn snapshot_key(chain_id: &str, map: Option<&IdMap>) -> String {
    match map {
        Some(m) if !chain_id.is_empty() => m.snapshot_key(chain_id),
        _ => chain_id.to_string(),
    }
}

// ------------------------------------------------------------------------------------------
// Parsing

/// The ranges `/etc/subuid`-style `text` gives `name` (or its numeric id `id`), in file order.
/// Lines are `name:start:count`; comments and malformed lines are skipped, as shadow-utils does.
pub fn subordinate_ranges(text: &str, name: &str, id: Option<u32>) -> Vec<(u32, u32)> {
    let id = id.map(|i| i.to_string());
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.starts_with('#') {
                return None;
            }
            let mut parts = line.split(':');
            let (owner, start, count) = (parts.next()?, parts.next()?, parts.next()?);
            if parts.next().is_some() || !(owner == name || id.as_deref() == Some(owner)) {
                return None;
            }
            let (start, count) = (start.parse().ok()?, count.parse::<u32>().ok()?);
            (count > 0).then_some((start, count))
        })
        .collect()
}

/// Lays host ranges end to end from container id 0.
pub fn concatenate(host_ranges: &[(u32, u32)]) -> Result<Vec<IdRange>> {
    let mut next = 0u32;
    let mut out = Vec::new();
    for &(host, size) in host_ranges {
        if host.checked_add(size).is_none() {
            return Err(Error::invalid_argument(format!(
                "subordinate range {host}:{size} runs past the largest id"
            )));
        }
        out.push(IdRange {
            container: next,
            host,
            size,
        });
        next = next.checked_add(size).ok_or_else(|| {
            Error::invalid_argument("subordinate ranges add up to more ids than exist")
        })?;
    }
    Ok(out)
}

/// Parses `/proc/PID/uid_map` (or `gid_map`): lines of `inside outside count`.
pub fn parse_proc_map(text: &str) -> Result<Vec<IdRange>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let nums: Vec<u32> = line
                .split_whitespace()
                .map(str::parse)
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| Error::invalid_argument(format!("bad id map line {line:?}")))?;
            match nums[..] {
                [container, host, size] => Ok(IdRange {
                    container,
                    host,
                    size,
                }),
                _ => Err(Error::invalid_argument(format!("bad id map line {line:?}"))),
            }
        })
        .collect()
}

/// The container ranges of a rootless daemon whose own map (`/proc/self/uid_map` text) is
/// `own`: every id of the daemon's namespace except 0 (the user who started it), laid end to
/// end from container id 0. Ranges are in the daemon's namespace, which is what the runtime
/// writes into the container's map.
pub fn rootless_ranges(own: &str, kind: IdKind) -> Result<Vec<IdRange>> {
    let mut ranges = parse_proc_map(own)?;
    if ranges
        .iter()
        .any(|r| r.container == 0 && r.host == 0 && r.size == u32::MAX)
    {
        return Err(Error::failed_precondition(format!(
            "rootless: this process is not in a user namespace (its {} map is the identity)",
            kind.name()
        )));
    }
    ranges.sort_by_key(|r| r.container);
    let mut inside: Vec<(u32, u32)> = Vec::new();
    for r in ranges {
        let (start, size) = if r.container == 0 {
            (1, r.size - 1)
        } else {
            (r.container, r.size)
        };
        if size > 0 {
            inside.push((start, size));
        }
    }
    if inside.is_empty() {
        return Err(Error::failed_precondition(format!(
            "rootless: the daemon's user namespace maps no {} besides its own (add a range for \
             the user to /etc/sub{})",
            kind.name(),
            kind.name()
        )));
    }
    concatenate(&inside)
}

// ------------------------------------------------------------------------------------------
// The host's user database

/// The files the remap user and its ranges are read from (and, for `default`, written to).
#[derive(Debug, Clone)]
pub struct HostIdFiles {
    /// `/etc/passwd`.
    pub passwd: PathBuf,
    /// `/etc/group`.
    pub group: PathBuf,
    /// `/etc/subuid`.
    pub subuid: PathBuf,
    /// `/etc/subgid`.
    pub subgid: PathBuf,
}

impl Default for HostIdFiles {
    fn default() -> Self {
        Self {
            passwd: "/etc/passwd".into(),
            group: "/etc/group".into(),
            subuid: "/etc/subuid".into(),
            subgid: "/etc/subgid".into(),
        }
    }
}

/// Docker's name for the user `userns-remap: default` makes.
pub const DEFAULT_REMAP_USER: &str = "dockremap";
/// Where subordinate ranges of users berth creates start at the lowest.
const FIRST_SUBORDINATE_ID: u32 = 100_000;
/// How many ids a range berth adds has (dockerd's and useradd's size).
pub const SUBORDINATE_COUNT: u32 = 65_536;

/// Looks `name_or_id` up in `/etc/passwd`- or `/etc/group`-style `text`: `(name, id)`.
pub fn lookup_entry(text: &str, name_or_id: &str) -> Option<(String, u32)> {
    let numeric: Option<u32> = name_or_id.parse().ok();
    text.lines().find_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (name == name_or_id || numeric == Some(id)).then(|| (name.to_string(), id))
    })
}

impl HostIdFiles {
    /// The map of `userns_remap` (`default`, `user` or `user:group`, names or ids).
    pub fn remap(&self, setting: &str) -> Result<IdMap> {
        let (user, group) = match setting.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (setting, None),
        };
        if user.is_empty() || group.is_some_and(str::is_empty) {
            return Err(Error::invalid_argument(format!(
                "userns_remap: {setting:?} is not \"default\", \"user\" or \"user:group\""
            )));
        }
        let user = if user == "default" {
            self.ensure_default_user()?;
            DEFAULT_REMAP_USER
        } else {
            user
        };
        let passwd = read(&self.passwd)?;
        let (user_name, uid) = lookup_entry(&passwd, user).ok_or_else(|| {
            Error::invalid_argument(format!("userns_remap: no such user {user:?}"))
        })?;
        // Docker's rule: without a group, the group named like the user.
        let group = group.unwrap_or(&user_name);
        let groups = read(&self.group)?;
        let (group_name, gid) = lookup_entry(&groups, group).ok_or_else(|| {
            Error::invalid_argument(format!("userns_remap: no such group {group:?}"))
        })?;
        let uids = subordinate_ranges(&read(&self.subuid)?, &user_name, Some(uid));
        let gids = subordinate_ranges(&read(&self.subgid)?, &group_name, Some(gid));
        for (ranges, what, file) in [
            (&uids, format!("user {user_name:?}"), &self.subuid),
            (&gids, format!("group {group_name:?}"), &self.subgid),
        ] {
            if ranges.is_empty() {
                return Err(Error::invalid_argument(format!(
                    "userns_remap: {what} has no subordinate ids in {}",
                    file.display()
                )));
            }
        }
        Ok(IdMap {
            uids: concatenate(&uids)?,
            gids: concatenate(&gids)?,
        })
    }

    /// Makes user and group `dockremap` with a range each, as dockerd does for `default`.
    fn ensure_default_user(&self) -> Result<()> {
        self.locked(|| {
            let passwd = read(&self.passwd)?;
            if lookup_entry(&passwd, DEFAULT_REMAP_USER).is_none() {
                let out = std::process::Command::new("useradd")
                    .args(["--system", "--shell", "/bin/false", "--no-create-home"])
                    .args(["--user-group", DEFAULT_REMAP_USER])
                    .output()
                    .context(ErrorKind::FailedPrecondition, "run useradd")?;
                if !out.status.success()
                    && lookup_entry(&read(&self.passwd)?, DEFAULT_REMAP_USER).is_none()
                {
                    return Err(Error::failed_precondition(format!(
                        "userns_remap: useradd {DEFAULT_REMAP_USER}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
            }
            for file in [&self.subuid, &self.subgid] {
                let text = read_or_empty(file)?;
                if subordinate_ranges(&text, DEFAULT_REMAP_USER, None).is_empty() {
                    let start = free_start(&text);
                    rewrite(
                        file,
                        &append_line(
                            &text,
                            &format!("{DEFAULT_REMAP_USER}:{start}:{SUBORDINATE_COUNT}"),
                        ),
                    )?;
                }
            }
            Ok(())
        })
    }

    /// Adds a fresh range of [`SUBORDINATE_COUNT`] ids for `name` to both subordinate files,
    /// past every range there (under the lock berth's editors share). Returns the starts.
    pub fn add_ranges(&self, name: &str) -> Result<(u32, u32)> {
        self.locked(|| {
            let mut starts = [0u32; 2];
            for (i, file) in [&self.subuid, &self.subgid].into_iter().enumerate() {
                let text = read_or_empty(file)?;
                starts[i] = free_start(&text);
                rewrite(
                    file,
                    &append_line(&text, &format!("{name}:{}:{SUBORDINATE_COUNT}", starts[i])),
                )?;
            }
            Ok((starts[0], starts[1]))
        })
    }

    /// Removes the lines of `name` from both subordinate files, leaving every other line as
    /// it was.
    pub fn remove_ranges(&self, name: &str) -> Result<()> {
        self.locked(|| {
            for file in [&self.subuid, &self.subgid] {
                let text = read_or_empty(file)?;
                let kept: String = text
                    .lines()
                    .filter(|l| l.split(':').next() != Some(name))
                    .map(|l| format!("{l}\n"))
                    .collect();
                if kept != text {
                    rewrite(file, &kept)?;
                }
            }
            Ok(())
        })
    }

    /// Runs `f` holding an exclusive `flock` on `<dir of subuid>/.berth-subid.lock`.
    fn locked<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let dir = self.subuid.parent().unwrap_or(Path::new("/"));
        let path = dir.join(".berth-subid.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .context(ErrorKind::Internal, format!("open {}", path.display()))?;
        let _lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| Error::internal(format!("lock {}", path.display())).with_source(e))?;
        f()
    }
}

/// The first id past every range in `text` (at least [`FIRST_SUBORDINATE_ID`]).
fn free_start(text: &str) -> u32 {
    text.lines()
        .filter_map(|l| {
            let mut p = l.split(':').skip(1);
            let start: u64 = p.next()?.trim().parse().ok()?;
            let count: u64 = p.next()?.trim().parse().ok()?;
            Some(start + count)
        })
        .max()
        .unwrap_or(0)
        .max(u64::from(FIRST_SUBORDINATE_ID))
        .min(u64::from(u32::MAX - SUBORDINATE_COUNT)) as u32
}

fn append_line(text: &str, line: &str) -> String {
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(line);
    out.push('\n');
    out
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).context(
        ErrorKind::FailedPrecondition,
        format!("read {}", path.display()),
    )
}

fn read_or_empty(path: &Path) -> Result<String> {
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        other => other.context(ErrorKind::Internal, format!("read {}", path.display())),
    }
}

/// Replaces `path`'s content atomically (temporary file, then rename), keeping mode 0644.
fn rewrite(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("berth-tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o644)
        .open(&tmp)
        .context(ErrorKind::Internal, format!("write {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.rewind().map(drop))
        .and_then(|()| f.sync_all())
        .context(ErrorKind::Internal, format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).context(ErrorKind::Internal, format!("replace {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ranges_by_name_or_id_in_order() {
        let text = "# c\nalice:100000:65536\nbob:165536:65536\n1001:300000:10\nalice:400000:5\nbad\nalice:x:1\n";
        assert_eq!(
            subordinate_ranges(text, "alice", Some(1001)),
            [(100000, 65536), (300000, 10), (400000, 5)]
        );
        assert!(subordinate_ranges(text, "carol", None).is_empty());
        let m = concatenate(&subordinate_ranges(text, "alice", Some(1001))).unwrap();
        assert_eq!(
            m,
            [
                IdRange {
                    container: 0,
                    host: 100000,
                    size: 65536
                },
                IdRange {
                    container: 65536,
                    host: 300000,
                    size: 10
                },
                IdRange {
                    container: 65546,
                    host: 400000,
                    size: 5
                },
            ]
        );
    }

    #[test]
    fn shifting_both_ways_and_outside_the_map() {
        let map = IdMap {
            uids: concatenate(&[(100000, 1000), (500000, 10)]).unwrap(),
            gids: concatenate(&[(200000, 1000)]).unwrap(),
        };
        assert_eq!(map.root(), (100000, 200000));
        assert_eq!(map.to_host(IdKind::Uid, 999), Some(100999));
        assert_eq!(map.to_host(IdKind::Uid, 1000), Some(500000));
        assert_eq!(map.to_host(IdKind::Uid, 1010), None);
        assert_eq!(map.to_container(IdKind::Uid, 500009), Some(1009));
        assert_eq!(map.to_container(IdKind::Gid, 0), None);
        assert_eq!(map.container_owner(100005, 5), (5, OVERFLOW_ID));
        assert_eq!(map.host_owner(&"f", 3, 4).unwrap(), (100003, 200004));
        let err = map.host_owner(&"tar entry \"etc/x\"", 0, 5000).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(
            err.message()
                .contains("tar entry \"etc/x\": gid 5000 is outside"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn rootless_maps_the_subordinate_range_not_the_user() {
        let own = "         0       1000          1\n         1     100000      65536\n";
        let r = rootless_ranges(own, IdKind::Uid).unwrap();
        assert_eq!(
            r,
            [IdRange {
                container: 0,
                host: 1,
                size: 65536
            }]
        );
        // One line covering the user and more: the user (inside 0) is still left out.
        let r = rootless_ranges("0 1000 11\n", IdKind::Uid).unwrap();
        assert_eq!(
            r,
            [IdRange {
                container: 0,
                host: 1,
                size: 10
            }]
        );
        // Two subordinate ranges, listed out of order, are laid end to end.
        let r = rootless_ranges("1 100000 5\n0 1000 1\n6 300000 5\n", IdKind::Gid).unwrap();
        assert_eq!(
            r,
            [
                IdRange {
                    container: 0,
                    host: 1,
                    size: 5
                },
                IdRange {
                    container: 5,
                    host: 6,
                    size: 5
                },
            ]
        );
        assert!(rootless_ranges("0 1000 1\n", IdKind::Uid).is_err());
        assert!(rootless_ranges("0 0 4294967295\n", IdKind::Uid).is_err());
        assert!(rootless_ranges("0 x 1\n", IdKind::Uid).is_err());
    }

    #[test]
    fn snapshot_keys_depend_on_the_map() {
        let a = IdMap {
            uids: concatenate(&[(100000, 65536)]).unwrap(),
            gids: concatenate(&[(100000, 65536)]).unwrap(),
        };
        let mut b = a.clone();
        b.gids[0].host = 200000;
        assert_eq!(snapshot_key("sha256:c", None), "sha256:c");
        assert_eq!(snapshot_key("", Some(&a)), "");
        let ka = snapshot_key("sha256:c", Some(&a));
        assert!(ka.starts_with("sha256:c@userns-"), "{ka}");
        assert_ne!(ka, snapshot_key("sha256:c", Some(&b)));
        assert_eq!(ka, a.snapshot_key("sha256:c"));
    }

    fn files(dir: &Path) -> HostIdFiles {
        HostIdFiles {
            passwd: dir.join("passwd"),
            group: dir.join("group"),
            subuid: dir.join("subuid"),
            subgid: dir.join("subgid"),
        }
    }

    #[test]
    fn remap_resolves_users_and_groups_by_name_or_id() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        std::fs::write(
            &f.passwd,
            "root:x:0:0::/root:/bin/sh\nrm:x:990:991::/:/bin/false\n",
        )
        .unwrap();
        std::fs::write(&f.group, "root:x:0:\nrm:x:991:\nother:x:992:\n").unwrap();
        std::fs::write(&f.subuid, "rm:100000:65536\n").unwrap();
        std::fs::write(&f.subgid, "rm:200000:65536\nother:300000:10\n").unwrap();
        let m = f.remap("rm").unwrap();
        assert_eq!(m.root(), (100000, 200000));
        assert_eq!(f.remap("990").unwrap(), m);
        assert_eq!(f.remap("rm:992").unwrap().root(), (100000, 300000));
        let err = f.remap("nobody-here").unwrap_err();
        assert!(err.message().contains("no such user"), "{}", err.message());
        let err = f.remap("root").unwrap_err();
        assert!(
            err.message()
                .contains("user \"root\" has no subordinate ids"),
            "{}",
            err.message()
        );
        assert!(f.remap("rm:").is_err());
    }

    #[test]
    fn ranges_are_added_past_the_others_and_removed_alone() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        std::fs::write(&f.subuid, "a:100000:65536\nb:500000:10").unwrap();
        std::fs::write(&f.subgid, "").unwrap();
        let (u, g) = f.add_ranges("t1").unwrap();
        assert_eq!((u, g), (500010, 100000));
        assert_eq!(
            std::fs::read_to_string(&f.subuid).unwrap(),
            "a:100000:65536\nb:500000:10\nt1:500010:65536\n"
        );
        f.remove_ranges("t1").unwrap();
        assert_eq!(
            std::fs::read_to_string(&f.subuid).unwrap(),
            "a:100000:65536\nb:500000:10\n"
        );
        assert_eq!(std::fs::read_to_string(&f.subgid).unwrap(), "");
    }
}
