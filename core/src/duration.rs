//! Go's duration syntax, which Docker's filters (`until=10m`) and containerd's hosts.toml
//! (`dial_timeout = "500ms"`) use.

use std::time::Duration;

/// A Go-style duration: `1h2m3s`, `500ms`, `1.5s`, `10m`; units `h`, `m`, `s`, `ms`, `us`/`µs`,
/// `ns`. `None` for anything else, or an empty text.
pub fn parse_go(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..n_end].parse().ok()?;
        rest = &rest[n_end..];
        let u_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..u_end];
        rest = &rest[u_end..];
        let secs = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += Duration::from_secs_f64(n * secs);
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_go("x"), None);
        assert_eq!(parse_go("10"), None);
        assert_eq!(parse_go(""), None);
    }
}
