//! Keeping an idle shim small. A shim runs for every container and is idle nearly all the time,
//! so what it keeps resident while idle is what berth costs per container.
//!
//! - One malloc arena: the shim has at most a few threads, and every glibc arena is resident
//!   memory of its own.
//! - After a burst of activity (startup, Create, a request, an exit), once the shim has been
//!   idle for a while: free heap returned to the kernel (`malloc_trim`), and code and read-only
//!   data pages of the binary and its libraries unmapped (`MADV_DONTNEED` on clean, private,
//!   read-only file mappings). Those pages stay in the page cache, shared by every shim; the
//!   ones the shim needs again fault back in on its next wake-up, from memory.

use std::time::Duration;

/// Keeps glibc malloc to one arena. Call before any thread starts.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// A mapping whose resident pages can be dropped and faulted back from their file: readable,
/// not writable, private, file-backed, and with no page of it copied-on-write (relocated
/// read-only data, for one, has been written and must be kept).
fn droppable(smaps: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    let flush = |current: &mut Option<(usize, usize)>,
                 anonymous: Option<u64>,
                 out: &mut Vec<(usize, usize)>| {
        if let (Some(range), Some(0)) = (current.take(), anonymous) {
            out.push(range);
        }
    };
    let mut anonymous: Option<u64> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            flush(&mut current, anonymous, &mut out);
            anonymous = None;
            let perms = fields.next().unwrap_or("");
            let _offset = fields.next();
            let _dev = fields.next();
            let inode = fields.next().unwrap_or("0");
            let path = fields.next().unwrap_or("");
            let clean_kind = perms == "r-xp" || perms == "r--p";
            if clean_kind && inode != "0" && path.starts_with('/') {
                current = Some((start, end - start));
            }
            continue;
        }
        if first == "Anonymous:" {
            anonymous = fields.next().and_then(|v| v.parse().ok());
        }
    }
    flush(&mut current, anonymous, &mut out);
    out
}

/// Returns free heap to the kernel and drops the resident pages of clean read-only file
/// mappings. Returns the bytes of mappings it dropped.
pub fn trim() -> usize {
    // SAFETY: malloc_trim only releases free memory back to the kernel.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut dropped = 0;
    for (start, len) in droppable(&smaps) {
        // SAFETY: the range is a whole mapping that is private, read-only and has no
        // copied-on-write page, so every page reads back identical from its file on the next
        // access; nothing in it can have been modified, and nothing is unmapped.
        let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        if rc == 0 {
            dropped += len;
        }
    }
    dropped
}

/// CPU time this process has used.
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes one `rusage` into the zeroed struct we own.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Set by [`trim_soon`].
static NUDGE: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// How long a nudged trim waits for the burst to settle (the reply to go out).
const SETTLE: Duration = Duration::from_millis(250);

/// Asks for a trim shortly: the container (or an exec) just started and the shim is about to
/// go quiet, so there is no need to wait for a whole idle window to shrink.
pub fn trim_soon() {
    NUDGE.notify_one();
}

/// Trims (see [`trim`]) once the process has been idle — less than `busy` CPU time in a
/// `window`, or in a short settling time after [`trim_soon`] — after it was active. Runs
/// forever.
pub async fn trim_when_idle(window: Duration, busy: Duration) {
    let mut active = true;
    let mut last = cpu_time();
    loop {
        let nudged = tokio::select! {
            () = tokio::time::sleep(window) => false,
            () = NUDGE.notified() => true,
        };
        if nudged {
            active = true;
            last = cpu_time();
            tokio::time::sleep(SETTLE).await;
        }
        let now = cpu_time();
        if now.saturating_sub(last) >= busy {
            active = true;
        } else if active {
            let dropped = trim();
            tracing::debug!(dropped_kib = dropped / 1024, nudged, "idle: trimmed memory");
            active = false;
        }
        last = cpu_time();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0100000 r--p 00000000 fe:01 123 /usr/bin/berth-shim
Size:               1024 kB
Anonymous:             0 kB
55d0a0100000-55d0a0400000 r-xp 00100000 fe:01 123 /usr/bin/berth-shim
Anonymous:             0 kB
55d0a0400000-55d0a0440000 r--p 00400000 fe:01 123 /usr/bin/berth-shim
Anonymous:           256 kB
55d0a0440000-55d0a0450000 rw-p 00440000 fe:01 123 /usr/bin/berth-shim
Anonymous:            64 kB
7f0000000000-7f0000021000 rw-p 00000000 00:00 0
Anonymous:           132 kB
7f0000100000-7f0000101000 r--p 00000000 00:00 0 [vvar]
Anonymous:             0 kB
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
Anonymous:             0 kB
";

    #[test]
    fn only_clean_read_only_file_mappings_are_dropped() {
        assert_eq!(
            droppable(SMAPS),
            [(0x55d0a0000000, 0x100000), (0x55d0a0100000, 0x300000)]
        );
    }

    #[test]
    fn trimming_keeps_the_process_working() {
        let before = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(trim() > 0);
        // Code and data fault back in: formatting, allocation and I/O all still work.
        let after = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(after.contains("VmRSS") && before.contains("VmRSS"));
        assert_eq!(format!("{:?}", vec![1, 2, 3]), "[1, 2, 3]");
    }
}
