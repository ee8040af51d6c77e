//! berth-shim's json-file logs with real runc: max-size/max-file rotation, reading over the
//! rotated set, and following new lines (across rotations) until the container's output ends.
//! Needs root; skips otherwise.

use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use anyhow::Result;
use berth_integration::shim_kit::{ShimTest, read_json_log, skip};
use berth_proto::berth::shim::v1 as pb;
use berth_proto::berth::types::v1 as types;

const T: Duration = Duration::from_secs(30);

async fn read_logs(
    c: &mut berth_integration::shim_kit::Client,
    req: pb::LogsRequest,
) -> Result<Vec<String>> {
    let mut stream = c.logs(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(batch) = tokio::time::timeout(T, stream.message()).await?? {
        out.extend(
            batch
                .entries
                .into_iter()
                .map(|e| String::from_utf8_lossy(&e.data).into_owned()),
        );
    }
    Ok(out)
}

fn both() -> pb::LogsRequest {
    pb::LogsRequest {
        stdout: true,
        stderr: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_max_file_files_of_at_most_max_size() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let script =
        "i=0; while [ $i -lt 400 ]; do echo \"line $i padding-padding-padding\"; i=$((i+1)); done";
    let mut t = ShimTest::new("rotate", &["sh", "-c", script], false)?;
    t.start_shim()?;
    let mut c = t.client();
    let mut req = t.create_request(pb::StdioMode::Pipes, false);
    let (max_size, max_file) = (4096u64, 3u32);
    let log = req.log.as_mut().unwrap();
    log.max_size = max_size as i64;
    log.max_file = max_file as i32;
    log.attrs.insert("tag".into(), "rot".into());
    c.create(req).await?;
    c.start(pb::StartRequest::default()).await?;
    assert_eq!(
        c.wait(pb::WaitRequest::default())
            .await?
            .into_inner()
            .exit_status,
        0
    );

    let dir = t.log_path().parent().unwrap().to_path_buf();
    let mut names: Vec<String> = std::fs::read_dir(&dir)?
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["container.log", "container.log.1", "container.log.2"]
    );
    for name in &names {
        let len = std::fs::metadata(dir.join(name))?.len();
        assert!(len <= max_size, "{name}: {len} bytes > {max_size}");
        assert!(len > 0);
    }
    // Oldest first: .2, .1, current; together a contiguous tail of the output ending at 399.
    let mut lines = Vec::new();
    for name in ["container.log.2", "container.log.1", "container.log"] {
        lines.extend(read_json_log(&dir.join(name)).into_iter().map(|(_, l)| l));
    }
    let first: usize = lines[0].split(' ').nth(1).unwrap().parse()?;
    assert!(first > 0, "the oldest lines were rotated away");
    let want: Vec<String> = (first..400)
        .map(|i| format!("line {i} padding-padding-padding\n"))
        .collect();
    assert_eq!(lines, want);
    let raw = std::fs::read_to_string(dir.join("container.log"))?;
    assert!(
        raw.lines()
            .all(|l| l.contains("\"attrs\":{\"tag\":\"rot\"}")),
        "attrs in every entry"
    );

    // The read API sees the same set, and tails across files.
    assert_eq!(read_logs(&mut c, both()).await?, want);
    let tail = read_logs(
        &mut c,
        pb::LogsRequest {
            tail: Some(3),
            ..both()
        },
    )
    .await?;
    assert_eq!(tail, want[want.len() - 3..]);
    assert!(
        read_logs(
            &mut c,
            pb::LogsRequest {
                stderr: false,
                stdout: false,
                ..both()
            }
        )
        .await
        .is_err()
    );
    c.delete(pb::DeleteRequest::default()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_streams_new_lines_until_the_output_ends() -> Result<()> {
    if skip() {
        return Ok(());
    }
    let script = "i=0; while [ $i -lt 30 ]; do echo \"tick $i ----------------------------------------\"; i=$((i+1)); sleep 0.05; done; echo done >&2";
    let mut t = ShimTest::new("follow", &["sh", "-c", script], false)?;
    t.start_shim()?;
    let mut c = t.client();
    let mut req = t.create_request(pb::StdioMode::Pipes, false);
    // Small files, so following crosses several rotations.
    let log = req.log.as_mut().unwrap();
    log.max_size = 1000;
    log.max_file = 10;
    c.create(req).await?;
    let mut follower = c.clone();
    let follow = tokio::spawn(async move {
        let started = Instant::now();
        let mut stream = follower
            .logs(pb::LogsRequest {
                follow: true,
                ..both()
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        let mut first_at = None;
        while let Some(batch) = tokio::time::timeout(T, stream.message()).await?? {
            first_at.get_or_insert(started.elapsed());
            out.extend(
                batch
                    .entries
                    .into_iter()
                    .map(|e| (e.stream, String::from_utf8_lossy(&e.data).into_owned())),
            );
        }
        anyhow::Ok((out, first_at, started.elapsed()))
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.start(pb::StartRequest::default()).await?;
    let (entries, first_at, ended_at) = follow.await??;
    // Each stream in order (stdout and stderr are separate pipes, so their relative order is
    // only as good as the shim's reads).
    let stream_of = |s: types::OutputStream| -> Vec<String> {
        entries
            .iter()
            .filter(|(st, _)| *st == s as i32)
            .map(|(_, l)| l.clone())
            .collect()
    };
    let want: Vec<String> = (0..30)
        .map(|i| format!("tick {i} ----------------------------------------\n"))
        .collect();
    assert_eq!(stream_of(types::OutputStream::Stdout), want);
    assert_eq!(stream_of(types::OutputStream::Stderr), ["done\n"]);
    // Lines streamed while the container ran (it runs for ~1.5 s), and the stream ended by itself.
    assert!(first_at.unwrap() < ended_at, "{first_at:?} vs {ended_at:?}");
    assert!(
        ended_at >= Duration::from_millis(1000),
        "followed while it ran: {ended_at:?}"
    );
    let rotated = std::fs::read_dir(t.log_path().parent().unwrap())?.count();
    assert!(rotated > 1, "the follower crossed rotations");
    // The log ends with the output, just before the exit is recorded.
    let waited = tokio::time::timeout(T, c.wait(pb::WaitRequest::default())).await??;
    assert_eq!(waited.into_inner().exit_status, 0);
    c.delete(pb::DeleteRequest::default()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_disk_does_not_stall_the_container() -> Result<()> {
    if skip() {
        return Ok(());
    }
    // 2.6 MB of output, far more than the 1 MiB log buffer.
    let script = "yes 'a line of output that goes nowhere fast' | head -n 60000";
    let mut t = ShimTest::new("stall", &["sh", "-c", script], false)?;
    // The "disk": a FIFO whose reader never reads. The first 64 KiB fit in the pipe, then every
    // write blocks forever.
    let log = t.log_path();
    std::fs::create_dir_all(log.parent().unwrap())?;
    nix::unistd::mkfifo(&log, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&log)?;
    t.start_shim()?;
    let mut c = t.client();
    c.create(t.create_request(pb::StdioMode::Pipes, false))
        .await?;
    let attached = berth_integration::shim_kit::attach(
        &mut c,
        pb::AttachOptions {
            stdout: true,
            stderr: true,
            stream: true,
            ..Default::default()
        },
    )
    .await?;
    c.start(pb::StartRequest::default()).await?;
    // The container finishes, and attachers still get every byte.
    let (out, _, status) = attached.collect(T).await?;
    assert_eq!(status, Some(0));
    assert_eq!(
        out.len(),
        60000 * "a line of output that goes nowhere fast\n".len()
    );
    let waited = tokio::time::timeout(T, c.wait(pb::WaitRequest::default())).await??;
    assert_eq!(waited.into_inner().exit_status, 0);
    assert!(
        t.shim_log().contains("dropping log data"),
        "{}",
        t.shim_log()
    );
    drop(reader);
    c.delete(pb::DeleteRequest::default()).await?;
    Ok(())
}
