//! Keeping idle berth processes small: every daemon and every shim (one per container) is idle
//! nearly all the time, so what it keeps resident while idle is what berth costs.
//!
//! - glibc malloc with few arenas and fixed thresholds ([`tune_malloc`]);
//! - after a burst of work, once idle: free heap back to the kernel (`malloc_trim`) and the
//!   resident pages of clean, read-only code and data of the binary and its shared libraries
//!   dropped (`MADV_DONTNEED`) — see [`trim`]. Those pages stay in the page cache, shared by every
//!   process mapping them; what a later request needs faults back in from memory.

use tokio_util::sync::CancellationToken;

/// Caps glibc's heap growth in a long-running process. By default every thread that allocates
/// may get its own arena (up to 8 per core), each keeping freed memory; `arenas` (two for a
/// daemon that mostly waits on sockets, one for a shim) are plenty. The mmap and trim
/// thresholds stay dynamic: glibc keeps big buffers that are freed and allocated again (a
/// 1,000-container listing, a layer) in the heap instead of mapping, faulting in and unmapping
/// them on every request, and [`trim_when_idle`] gives that memory back once the burst is over.
/// Call before any other thread starts.
pub fn tune_malloc(arenas: i32) {
    // SAFETY: mallopt only sets glibc allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

/// How often [`trim_when_idle`] looks at the process.
const TRIM_TICK: std::time::Duration = std::time::Duration::from_secs(1);
/// CPU time per tick below which the process counts as idle.
const IDLE_CPU: std::time::Duration = std::time::Duration::from_millis(2);
/// Consecutive idle ticks before memory is given back.
const IDLE_TICKS: u32 = 2;
/// Growth of the resident set since the last trim that makes another trim worth it.
const TRIM_MIN_GROWTH_KB: u64 = 256;

/// Gives memory back to the kernel once the process has been idle for [`IDLE_TICKS`] ticks and
/// its resident set has grown since the last time: after start-up and after every burst of
/// work. See [`trim`]. Runs until `shutdown`.
pub async fn trim_when_idle(shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(TRIM_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_cpu = cpu_time();
    let mut quiet = 0;
    // The resident set an idle tick after the last trim: what even an idle process maps again
    // (this loop, the runtime's timers). Growth beyond it is what the next trim can give back.
    let mut settled_kb: Option<u64> = Some(0);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cpu = cpu_time();
        let busy = cpu.saturating_sub(last_cpu) >= IDLE_CPU;
        last_cpu = cpu;
        quiet = if busy { 0 } else { quiet + 1 };
        let Some(settled) = settled_kb else {
            // Busy right after a trim: what this burst maps is given back once it is over.
            settled_kb = Some(if busy { 0 } else { resident_kb() });
            continue;
        };
        if quiet >= IDLE_TICKS && resident_kb() >= settled + TRIM_MIN_GROWTH_KB {
            trim();
            tracing::debug!(rss_kb = resident_kb(), "idle: memory given back");
            settled_kb = None;
            last_cpu = cpu_time();
        }
    }
}

/// User + system CPU time of the whole process so far.
pub fn cpu_time() -> std::time::Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    let Ok(usage) = getrusage(UsageWho::RUSAGE_SELF) else {
        return std::time::Duration::MAX;
    };
    let us = |t: nix::sys::time::TimeVal| {
        std::time::Duration::from_secs(t.tv_sec() as u64)
            + std::time::Duration::from_micros(t.tv_usec() as u64)
    };
    us(usage.user_time()) + us(usage.system_time())
}

/// The resident set size in KiB (0 when /proc is unreadable).
pub fn resident_kb() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a constant of the system.
    let page_kb = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64 / 1024;
    pages * page_kb
}

/// Returns what an idle process holds without using it: free heap pages of every malloc arena
/// (`malloc_trim`), and the page-table entries of the program's and its shared libraries' code
/// and read-only data. A page fault maps 64 KiB of a file around the faulting address, so
/// start-up and a burst of requests leave most of a daemon's binary resident although an idle
/// daemon runs almost none of it. Those pages stay in the page cache: the code a later request
/// needs is mapped again by a minor fault, not read from disk.
pub fn trim() -> usize {
    // SAFETY: malloc_trim only walks glibc's own arenas, under their locks.
    unsafe { libc::malloc_trim(0) };
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
    let mut dropped = 0;
    for (start, len) in clean_code_regions(&smaps, &exe.to_string_lossy()) {
        // SAFETY: the region is a private, read-only mapping of the executable or a shared
        // library with no anonymous (copy-on-write) pages, so dropping its pages loses nothing:
        // the next access maps the same bytes from the file again.
        if unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) } == 0 {
            dropped += len;
        }
    }
    dropped
}

/// The `(start, length)` of each mapping in `smaps` that [`trim`] may drop: read-only,
/// private, backed by `exe` or a shared library (both stay mapped for the life of the process),
/// resident, with no anonymous pages and not locked.
fn clean_code_regions(smaps: &str, exe: &str) -> Vec<(usize, usize)> {
    struct Region {
        start: usize,
        len: usize,
        eligible: bool,
        rss: bool,
        anon: bool,
        locked: bool,
    }
    fn flush(out: &mut Vec<(usize, usize)>, region: Option<Region>) {
        if let Some(r) = region
            && r.eligible
            && r.rss
            && !r.anon
            && !r.locked
        {
            out.push((r.start, r.len));
        }
    }
    let mut out = Vec::new();
    let mut current: Option<Region> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            flush(&mut out, current.take());
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            let file = !path.is_empty() && (path == exe || is_shared_library(path));
            current = Some(Region {
                start,
                len: end.saturating_sub(start),
                eligible: file && perms.len() == 4 && &perms[1..2] == "-" && perms.ends_with('p'),
                rss: false,
                anon: false,
                locked: false,
            });
            continue;
        }
        let Some(r) = current.as_mut() else { continue };
        let value = fields.next().unwrap_or("0");
        match first {
            "Rss:" => r.rss = value != "0",
            "Anonymous:" => r.anon = value != "0",
            "Locked:" => r.locked = value != "0",
            "VmFlags:" => r.locked |= line.split_whitespace().any(|f| f == "lo"),
            _ => {}
        }
    }
    flush(&mut out, current);
    out
}

/// Whether `path` names a shared library (`libc.so.6`, `ld-linux-x86-64.so.2`, `libm.so`).
fn is_shared_library(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.ends_with(".so") || name.contains(".so.")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55a71fd55000-55a71ffe7000 r--p 00000000 fe:00 1234 /usr/bin/berth-images
Rss:                1536 kB
Anonymous:             0 kB
Locked:                0 kB
VmFlags: rd mr mw me sd
55a71ffe7000-55a7208a3000 r-xp 00292000 fe:00 1234 /usr/bin/berth-images
Rss:                6832 kB
Anonymous:             0 kB
Locked:                0 kB
VmFlags: rd ex mr mw me sd
55a7208a3000-55a720924000 r--p 00b4e000 fe:00 1234 /usr/bin/berth-images
Rss:                 516 kB
Anonymous:           516 kB
Locked:                0 kB
VmFlags: rd mr mw me ac sd
55a720924000-55a720926000 rw-p 00bcf000 fe:00 1234 /usr/bin/berth-images
Rss:                   8 kB
Anonymous:             8 kB
Locked:                0 kB
VmFlags: rd wr mr mw me ac sd
7f50b4000000-7f50b40cd000 rw-p 00000000 00:00 0
Rss:                 788 kB
Anonymous:           788 kB
Locked:                0 kB
7f50c2542000-7f50c2698000 r-xp 00028000 fe:00 99 /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                1016 kB
Anonymous:             0 kB
Locked:                0 kB
VmFlags: rd ex mr mw me sd
7f50c2700000-7f50c2800000 r--p 00000000 fe:00 77 /usr/lib/locale/locale-archive
Rss:                  64 kB
Anonymous:             0 kB
Locked:                0 kB
7f50c2900000-7f50c2901000 r-xp 00000000 fe:00 98 /usr/lib/x86_64-linux-gnu/libm.so.6
Rss:                   0 kB
Anonymous:             0 kB
Locked:                0 kB
7f50c2a00000-7f50c2a10000 r-xp 00000000 fe:00 97 /usr/lib/x86_64-linux-gnu/libfoo.so
Rss:                  64 kB
Anonymous:             0 kB
Locked:                0 kB
VmFlags: rd ex mr mw me lo
7ffd1c3f0000-7ffd1c3f2000 r-xp 00000000 00:00 0 [vdso]
Rss:                   8 kB
Anonymous:             0 kB
";

    #[test]
    fn only_clean_read_only_code_and_data_of_the_program_and_its_libraries_are_trimmed() {
        let regions = clean_code_regions(SMAPS, "/usr/bin/berth-images");
        assert_eq!(
            regions,
            vec![
                (0x55a71fd55000, 0x55a71ffe7000 - 0x55a71fd55000),
                (0x55a71ffe7000, 0x55a7208a3000 - 0x55a71ffe7000),
                (0x7f50c2542000, 0x7f50c2698000 - 0x7f50c2542000),
            ],
            "skipped: relocated RELRO (anonymous pages), writable data, the heap, data files, \
             unmapped, locked and kernel mappings"
        );
    }

    #[test]
    fn the_running_program_has_trimmable_code_and_keeps_working_after_a_trim() {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let regions = clean_code_regions(&smaps, &exe.to_string_lossy());
        assert!(!regions.is_empty(), "no code regions found in\n{smaps}");
        assert!(trim() > 0);
        let v: Vec<u64> = (0..1000).collect();
        assert_eq!(v.iter().sum::<u64>(), 499_500);
        assert!(resident_kb() > 0);
        assert!(is_shared_library("/lib/ld-linux-x86-64.so.2"));
        assert!(!is_shared_library("/usr/lib/locale/locale-archive"));
    }
}
