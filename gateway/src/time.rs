//! Time as the Docker API writes and reads it: RFC 3339 with nanoseconds, Unix timestamps with
//! a fractional part (`since`/`until`), Go durations, and the human durations of `docker ps`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_core::{Error, Result};
use prost_types::Timestamp;

/// Go's zero time, which Docker prints for "never" (`StartedAt` of a created container).
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// Now as a protobuf timestamp.
pub fn now() -> Timestamp {
    from_system(SystemTime::now())
}

/// A `SystemTime` as a protobuf timestamp.
pub fn from_system(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Nanoseconds since the epoch.
pub fn unix_nanos(ts: &Timestamp) -> i128 {
    i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos)
}

/// `true` for an unset or zero timestamp (never happened).
pub fn is_zero(ts: Option<&Timestamp>) -> bool {
    ts.is_none_or(|t| t.seconds == 0 && t.nanos == 0)
}

// Howard Hinnant's days-from-civil and its inverse, for the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn split(ts: &Timestamp) -> (String, u32) {
    let secs = ts.seconds;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, mo, d) = civil_from_days(days);
    let date = format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    (date, ts.nanos.clamp(0, 999_999_999) as u32)
}

/// RFC 3339 in UTC with trailing zeros of the fraction trimmed (Go's `RFC3339Nano`), the form
/// of `Created`, `StartedAt` and friends. An unset timestamp is Go's zero time.
pub fn rfc3339(ts: Option<&Timestamp>) -> String {
    let Some(ts) = ts.filter(|t| !is_zero(Some(t))) else {
        return ZERO_TIME.to_string();
    };
    let (date, nanos) = split(ts);
    if nanos == 0 {
        format!("{date}Z")
    } else {
        let frac = format!("{nanos:09}");
        format!("{date}.{}Z", frac.trim_end_matches('0'))
    }
}

/// RFC 3339 with exactly nine fraction digits, as `docker logs --timestamps` prints it.
pub fn rfc3339_fixed(ts: &Timestamp) -> String {
    let (date, nanos) = split(ts);
    format!("{date}.{nanos:09}Z")
}

/// Parses RFC 3339 (`2024-01-02T03:04:05.123Z`, `...+02:00`) into a timestamp.
pub fn parse_rfc3339(s: &str) -> Option<Timestamp> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)? as u32, num(8..10)? as u32);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let mut padded = frac[..digits.min(9)].to_string();
        while padded.len() < 9 {
            padded.push('0');
        }
        nanos = padded.parse().ok()?;
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            if rest.len() != 6 {
                return None;
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    let seconds = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset;
    Some(Timestamp {
        seconds,
        nanos: nanos as i32,
    })
}

/// Parses a Go duration (`300ms`, `1.5h`, `2h45m`, `-1m`).
pub fn parse_go_duration(s: &str) -> Option<(bool, Duration)> {
    let (neg, mut rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if rest == "0" {
        return Some((false, Duration::ZERO));
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest
            .bytes()
            .take_while(|c| c.is_ascii_digit() || *c == b'.')
            .count();
        if n == 0 {
            return None;
        }
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u: usize = rest
            .chars()
            .take_while(|c| c.is_ascii_alphabetic() || matches!(c, 'µ' | 'μ'))
            .map(char::len_utf8)
            .sum();
        let unit = &rest[..u];
        rest = &rest[u..];
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
    }
    Some((neg, Duration::from_secs_f64(total)))
}

/// Parses Docker's `since`/`until` values: `seconds[.nanoseconds]` (what the CLI sends), RFC 3339,
/// a date, or a Go duration counted back from `now` (what users type into raw API calls).
pub fn parse_docker_time(value: &str, now: &Timestamp) -> Result<Timestamp> {
    let bad = || Error::invalid_argument(format!("invalid time value {value:?}"));
    let v = value.trim();
    if v.is_empty() {
        return Err(bad());
    }
    if v.bytes()
        .all(|c| c.is_ascii_digit() || c == b'.' || c == b'-')
        && !v.contains("--")
    {
        if let Some((secs, frac)) = v.split_once('.') {
            let seconds: i64 = secs.parse().map_err(|_| bad())?;
            let mut padded = frac.chars().take(9).collect::<String>();
            while padded.len() < 9 {
                padded.push('0');
            }
            let nanos: i32 = padded.parse().map_err(|_| bad())?;
            return Ok(Timestamp { seconds, nanos });
        }
        if let Ok(seconds) = v.parse::<i64>() {
            return Ok(Timestamp { seconds, nanos: 0 });
        }
        if v.len() == 10 {
            return parse_rfc3339(&format!("{v}T00:00:00Z")).ok_or_else(bad);
        }
        return Err(bad());
    }
    if let Some(ts) = parse_rfc3339(v) {
        return Ok(ts);
    }
    if let Some((neg, d)) = parse_go_duration(v) {
        let now_ns = unix_nanos(now);
        let delta = d.as_nanos() as i128;
        let t = if neg { now_ns + delta } else { now_ns - delta };
        return Ok(Timestamp {
            seconds: t.div_euclid(1_000_000_000) as i64,
            nanos: t.rem_euclid(1_000_000_000) as i32,
        });
    }
    Err(bad())
}

/// Go's `units.HumanDuration`, as `docker ps` prints "Up 5 minutes".
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 1.0 {
        return "Less than a second".into();
    }
    if secs < 2.0 {
        return "1 second".into();
    }
    if secs < 60.0 {
        return format!("{} seconds", secs as u64);
    }
    let minutes = (secs / 60.0) as u64;
    if minutes == 1 {
        return "About a minute".into();
    }
    if minutes < 60 {
        return format!("{minutes} minutes");
    }
    let hours = (secs / 3600.0 + 0.5) as u64;
    if hours == 1 {
        return "About an hour".into();
    }
    if hours < 48 {
        return format!("{hours} hours");
    }
    if hours < 24 * 7 * 2 {
        return format!("{} days", hours / 24);
    }
    if hours < 24 * 30 * 2 {
        return format!("{} weeks", hours / 24 / 7);
    }
    if hours < 24 * 365 * 2 {
        return format!("{} months", hours / 24 / 30);
    }
    format!("{} years", (secs / 3600.0 / 24.0 / 365.0) as u64)
}

/// The time from `ts` to now (zero when `ts` is in the future).
pub fn since(ts: Option<&Timestamp>) -> Duration {
    let now = unix_nanos(&now());
    let then = ts.map(unix_nanos).unwrap_or(now);
    Duration::from_nanos((now - then).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(seconds: i64, nanos: i32) -> Timestamp {
        Timestamp { seconds, nanos }
    }

    #[test]
    fn formats_like_go() {
        assert_eq!(rfc3339(Some(&ts(0, 0))), ZERO_TIME);
        assert_eq!(rfc3339(None), ZERO_TIME);
        assert_eq!(
            rfc3339(Some(&ts(1_700_000_000, 120_000_000))),
            "2023-11-14T22:13:20.12Z"
        );
        assert_eq!(rfc3339(Some(&ts(951_782_400, 0))), "2000-02-29T00:00:00Z");
        assert_eq!(
            rfc3339_fixed(&ts(1_700_000_000, 5)),
            "2023-11-14T22:13:20.000000005Z"
        );
    }

    #[test]
    fn parses_rfc3339_and_docker_times() {
        let now = ts(1_700_000_000, 0);
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20.12Z"),
            Some(ts(1_700_000_000, 120_000_000))
        );
        assert_eq!(
            parse_rfc3339("2023-11-15T00:13:20+02:00"),
            Some(ts(1_700_000_000, 0))
        );
        assert_eq!(parse_rfc3339("2023-11-14"), None);
        assert_eq!(
            parse_docker_time("1700000000.000000007", &now).unwrap(),
            ts(1_700_000_000, 7)
        );
        assert_eq!(
            parse_docker_time("1700000000.5", &now).unwrap(),
            ts(1_700_000_000, 500_000_000)
        );
        assert_eq!(
            parse_docker_time("1700000000", &now).unwrap(),
            ts(1_700_000_000, 0)
        );
        assert_eq!(
            parse_docker_time("10m", &now).unwrap(),
            ts(1_700_000_000 - 600, 0)
        );
        assert_eq!(
            parse_docker_time("1h30m", &now).unwrap(),
            ts(1_700_000_000 - 5400, 0)
        );
        assert_eq!(
            parse_docker_time("2023-11-14", &now).unwrap(),
            ts(1_699_920_000, 0)
        );
        assert!(parse_docker_time("yesterday", &now).is_err());
        assert!(parse_docker_time("", &now).is_err());
    }

    #[test]
    fn human_durations_match_docker_ps() {
        let s = Duration::from_secs;
        assert_eq!(
            human_duration(Duration::from_millis(300)),
            "Less than a second"
        );
        assert_eq!(human_duration(s(1)), "1 second");
        assert_eq!(human_duration(s(45)), "45 seconds");
        assert_eq!(human_duration(s(90)), "About a minute");
        assert_eq!(human_duration(s(600)), "10 minutes");
        assert_eq!(human_duration(s(3600)), "About an hour");
        assert_eq!(human_duration(s(5 * 3600)), "5 hours");
        assert_eq!(human_duration(s(3 * 86_400)), "3 days");
        assert_eq!(human_duration(s(20 * 86_400)), "2 weeks");
        assert_eq!(human_duration(s(90 * 86_400)), "3 months");
        assert_eq!(human_duration(s(800 * 86_400)), "2 years");
    }
}
