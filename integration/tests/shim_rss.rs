//! The resident memory of an idle shim with one `sleep` container (target ≤ 3 MB, see
//! ../shared/BENCHMARKS.md; containerd-shim-runc-v2 takes 13 MB here). Prints the measurement;
//! asserts only a loose bound, since debug builds are larger. Measure the release build with
//! `BERTH_BIN_DIR=target/release cargo test -p berth-integration --test shim_rss -- --nocapture`.
//! Needs root; skips otherwise.

use std::time::Duration;

use anyhow::Result;
use berth_integration::shim_kit::{ShimTest, bin_dir, skip};
use berth_proto::berth::shim::v1 as pb;

fn status_field(pid: i32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_shim_rss() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let mut t = ShimTest::new("rss", &["sleep", "1000"], false)?;
    // Trim after 1 s of idleness instead of the default 5, to keep the test short
    // (BERTH_SHIM_TRIM_SECS=5 measures the default).
    let window: u64 = std::env::var("BERTH_SHIM_TRIM_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let out = t
        .start_command()
        .args(["--idle-trim-secs", &window.to_string()])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.adopt(String::from_utf8(out.stdout)?.trim())?;
    let mut c = t.client();
    c.create(t.create_request(pb::StdioMode::Pipes, false))
        .await?;
    c.start(pb::StartRequest::default()).await?;
    let state = c.state(pb::StateRequest::default()).await?.into_inner();
    assert_eq!(state.status(), pb::TaskStatus::Running);
    drop(c);

    let pid = t.shim_pid.unwrap();
    let report = |when: &str| {
        let rss = t.shim_rss_kib().unwrap();
        let threads = status_field(pid, "Threads:").unwrap_or_default();
        let anon = status_field(pid, "RssAnon:").unwrap_or_default();
        let file = status_field(pid, "RssFile:").unwrap_or_default();
        let pss = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Pss:").map(|v| v.trim().to_string()))
            })
            .unwrap_or_default();
        eprintln!(
            "berth-shim {when} ({}): VmRSS {rss} kB (RssAnon {anon}, RssFile {file}), Pss {pss}, threads {threads}",
            bin_dir().join("berth-shim").display()
        );
        rss
    };
    report("right after start");
    // Start nudges a trim once the shim has been quiet for a moment (250 ms).
    tokio::time::sleep(Duration::from_secs(1)).await;
    report("1 s after start");
    // Idle: the blocking pool's threads time out and the shim trims after a quiet second.
    tokio::time::sleep(Duration::from_secs(3 * window + 1)).await;
    let rss = report("idle");
    assert!(rss < 32 * 1024, "idle shim uses {rss} kB");

    let mut c = t.client();
    c.delete(pb::DeleteRequest {
        exec_id: String::new(),
        force: true,
    })
    .await?;
    c.shutdown(pb::ShutdownRequest { now: false }).await?;
    Ok(())
}
