//! Docker's JSON progress messages (`docker pull`/`push`/`load` output) and their text forms.

use bytes::Bytes;
use serde_json::{Value, json};

/// Go's `units.HumanSize`: decimal units, four significant digits (`2.155MB`, `512B`).
pub fn human_size(size: f64) -> String {
    const UNITS: [&str; 9] = ["B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"];
    let mut size = size;
    let mut i = 0;
    while size >= 1000.0 && i < UNITS.len() - 1 {
        size /= 1000.0;
        i += 1;
    }
    format!("{}{}", g4(size), UNITS[i])
}

// `%.4g` for 0 <= v < 1000 (after unit scaling): four significant digits, no trailing zeros.
fn g4(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let digits = if v >= 1.0 {
        v.log10().floor() as i32 + 1
    } else {
        0
    };
    let decimals = (4 - digits).max(0) as usize;
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    // Rounding may add a digit (999.95 -> "1000"); Go prints "1e+03" there, close enough.
    s
}

/// The progress bar Docker sends along with `progressDetail`: `[=====>    ]  1.2MB/3.4MB`.
pub fn bar(current: i64, total: i64) -> String {
    if current <= 0 && total <= 0 {
        return String::new();
    }
    if total <= 0 {
        return format!("{:>8}", human_size(current as f64));
    }
    let pct = ((current as f64 / total as f64 * 100.0) as i64 / 2).clamp(0, 50) as usize;
    let bar = format!("[{}>{}] ", "=".repeat(pct), " ".repeat(50 - pct));
    let numbers = if current > total {
        format!("{:>8}", human_size(current as f64))
    } else {
        format!(
            "{:>8}/{}",
            human_size(current as f64),
            human_size(total as f64)
        )
    };
    bar + &numbers
}

/// A status line: `{"status": ...}` with an optional `id`.
pub fn status(status: &str, id: Option<&str>) -> Value {
    let mut v = json!({ "status": status });
    if let Some(id) = id {
        v["id"] = json!(id);
    }
    v
}

/// A per-layer line with (possibly empty) progress.
pub fn layer(status: &str, id: &str, current: i64, total: i64) -> Value {
    let mut v = json!({ "status": status, "progressDetail": {}, "id": id });
    if current > 0 || total > 0 {
        v["progressDetail"] = json!({ "current": current, "total": total });
        v["progress"] = json!(bar(current, total));
    }
    v
}

/// An error line: Docker reports failures after the stream started this way.
pub fn error(message: &str) -> Value {
    json!({ "errorDetail": { "message": message }, "error": message })
}

/// A `{"stream": ...}` line (`docker load` output).
pub fn stream(text: &str) -> Value {
    json!({ "stream": text })
}

/// One message as a newline-terminated JSON line.
pub fn line(v: &Value) -> Bytes {
    let mut out = serde_json::to_vec(v).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

/// The 12-hex short form of a digest (`sha256:abcdef...` → `abcdef123456`).
pub fn short_digest(digest: &str) -> String {
    let hex = digest.split_once(':').map_or(digest, |(_, h)| h);
    hex.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_go_units() {
        assert_eq!(human_size(0.0), "0B");
        assert_eq!(human_size(512.0), "512B");
        assert_eq!(human_size(1000.0), "1kB");
        assert_eq!(human_size(2_155_000.0), "2.155MB");
        assert_eq!(human_size(1_234_567.0), "1.235MB");
        assert_eq!(human_size(1_500_000_000.0), "1.5GB");
        assert_eq!(human_size(12_345.0), "12.35kB");
    }

    #[test]
    fn progress_lines() {
        assert_eq!(
            bar(1_000_000, 2_000_000),
            format!("[{}>{}]      1MB/2MB", "=".repeat(25), " ".repeat(25))
        );
        let v = layer("Downloading", "abcdef123456", 5, 10);
        assert_eq!(v["progressDetail"], json!({"current": 5, "total": 10}));
        assert!(v["progress"].as_str().unwrap().starts_with("[="));
        let v = layer("Pull complete", "abcdef123456", 0, 0);
        assert_eq!(v["progressDetail"], json!({}));
        assert!(v.get("progress").is_none());
        assert_eq!(
            short_digest(&format!("sha256:{}", "ab".repeat(32))),
            "abababababab"
        );
        assert_eq!(&line(&status("x", None))[..], b"{\"status\":\"x\"}\n");
    }
}
