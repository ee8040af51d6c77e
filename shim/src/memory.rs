//! Keeping an idle shim small. A shim runs for every container and is idle nearly all the time,
//! so what it keeps resident while idle is what berth costs per container.
//!
//! - One malloc arena: the shim has at most a few threads, and every glibc arena is resident
//!   memory of its own.
//! - After a burst of activity (startup, Create, a request, an exit), once the shim has been
//!   idle for a while: [`berth_core::memory::trim`] — free heap back to the kernel, and the
//!   resident pages of the binary's and its libraries' clean read-only mappings dropped. Those
//!   pages stay in the page cache, shared by every shim; the ones the shim needs again fault
//!   back in on its next wake-up, from memory.

use std::time::Duration;

use berth_core::memory::{cpu_time, trim};

/// Keeps glibc malloc to one arena: the shim has at most a few threads, and every arena is
/// resident memory of its own. Call before any thread starts.
pub fn limit_malloc_arenas() {
    berth_core::memory::tune_malloc(1);
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
