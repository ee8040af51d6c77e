//! Reading Docker `json-file` logs when the shim that writes them is gone, and RFC 3339 times.
//!
//! Files: `path` is the current file, `path.1` … `path.N` the rotated ones (`.1` newest). Each
//! line is `{"log":"…","stream":"stdout|stderr","time":"<RFC 3339 nano>"}` (plus optional
//! `attrs`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use berth_core::Result;
use berth_proto::berth::engine::v1 as pb;
use berth_proto::berth::types::v1 as types;
use serde::Deserialize;

#[derive(Deserialize)]
struct Line {
    log: String,
    stream: String,
    time: String,
    #[serde(default)]
    attrs: std::collections::HashMap<String, String>,
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `2006-01-02T15:04:05.999999999Z07:00` (offset or `Z`, optional fraction).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut nanos: i64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = &s[start..i];
        let digits = frac.len().min(9);
        nanos = frac[..digits].parse::<i64>().ok()? * 10i64.pow((9 - digits) as u32);
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' => 0,
        b'+' | b'-' => {
            let sign = if b[i] == b'-' { -1 } else { 1 };
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            sign * (oh * 3600 + om * 60)
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset;
    if secs < 0 {
        return None;
    }
    Some(SystemTime::UNIX_EPOCH + Duration::new(secs as u64, nanos as u32))
}

/// The files of a json-file log, oldest first.
fn files(path: &Path) -> Vec<PathBuf> {
    let mut rotated = Vec::new();
    for n in 1.. {
        let p = PathBuf::from(format!("{}.{n}", path.display()));
        if !p.exists() {
            break;
        }
        rotated.push(p);
    }
    rotated.reverse();
    rotated.push(path.to_path_buf());
    rotated
}

/// The entries of the log at `path` that `req` asks for (streams, since/until, tail).
pub fn read_json_logs(path: &Path, req: &pb::LogsRequest) -> Result<Vec<types::LogEntry>> {
    let since = req.since.and_then(|t| SystemTime::try_from(t).ok());
    let until = req.until.and_then(|t| SystemTime::try_from(t).ok());
    let mut out = Vec::new();
    for file in files(path) {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines() {
            let Ok(l) = serde_json::from_str::<Line>(line) else {
                continue;
            };
            let stream = match l.stream.as_str() {
                "stdout" if req.stdout => types::OutputStream::Stdout,
                "stderr" if req.stderr => types::OutputStream::Stderr,
                _ => continue,
            };
            let Some(time) = parse_rfc3339(&l.time) else {
                continue;
            };
            if since.is_some_and(|s| time < s) || until.is_some_and(|u| time > u) {
                continue;
            }
            out.push(types::LogEntry {
                stream: stream.into(),
                time: Some(time.into()),
                partial: !l.log.ends_with('\n'),
                data: l.log.into_bytes(),
                attrs: l.attrs,
            });
        }
    }
    if let Some(tail) = req.tail
        && tail >= 0
        && (tail as usize) < out.len()
    {
        out.drain(..out.len() - tail as usize);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        let t = parse_rfc3339("2023-11-14T22:13:20.123456789Z").unwrap();
        assert_eq!(
            t,
            SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789)
        );
        assert_eq!(
            parse_rfc3339("2023-11-15T00:13:20+02:00").unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20.5Z").unwrap(),
            SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 500_000_000)
        );
        assert!(parse_rfc3339("2023-11-14").is_none());
        assert!(parse_rfc3339("nonsense-that-is-long").is_none());
    }

    #[test]
    fn json_file_with_rotation_streams_and_tail() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("c-json.log");
        std::fs::write(
            format!("{}.1", path.display()),
            "{\"log\":\"old\\n\",\"stream\":\"stdout\",\"time\":\"2023-11-14T22:13:19Z\"}\n",
        )
        .unwrap();
        std::fs::write(
            &path,
            "{\"log\":\"out\\n\",\"stream\":\"stdout\",\"time\":\"2023-11-14T22:13:20Z\"}\n\
             {\"log\":\"err\\n\",\"stream\":\"stderr\",\"time\":\"2023-11-14T22:13:21Z\"}\n\
             {\"log\":\"part\",\"stream\":\"stdout\",\"time\":\"2023-11-14T22:13:22Z\"}\n",
        )
        .unwrap();
        let all = pb::LogsRequest {
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let e = read_json_logs(&path, &all).unwrap();
        let text: Vec<String> = e
            .iter()
            .map(|e| String::from_utf8_lossy(&e.data).into_owned())
            .collect();
        assert_eq!(text, ["old\n", "out\n", "err\n", "part"]);
        assert!(e[3].partial);
        let only_err = pb::LogsRequest {
            stderr: true,
            ..Default::default()
        };
        assert_eq!(read_json_logs(&path, &only_err).unwrap().len(), 1);
        let tail = pb::LogsRequest {
            tail: Some(2),
            ..all.clone()
        };
        assert_eq!(read_json_logs(&path, &tail).unwrap()[0].data, b"err\n");
        let since = pb::LogsRequest {
            since: Some((SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_001)).into()),
            ..all
        };
        assert_eq!(read_json_logs(&path, &since).unwrap().len(), 2);
        assert!(
            read_json_logs(&t.path().join("none"), &only_err)
                .unwrap()
                .is_empty()
        );
    }
}
