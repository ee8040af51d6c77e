//! Go's `fmt` output for the values moby prints into history lines: `%q` of string slices,
//! durations and ints, so berth's history reads as Docker's.

use std::time::Duration;

use berth_builder::dockerfile::HealthConfig;

/// Go's `%q` of a string slice: `["a" "b"]`, as moby's history comments print argv.
pub fn quoted_list(list: &[String]) -> String {
    let items: Vec<String> = list
        .iter()
        .map(|s| serde_json::to_string(s).unwrap_or_default())
        .collect();
    format!("[{}]", items.join(" "))
}

/// Go's `%q` of a `*container.HealthConfig`, as moby's HEALTHCHECK history line prints it:
/// `&{["CMD-SHELL" "true"] "30s" "5s" "0s" "0s" '\x00'}` (test, interval, timeout, start
/// period, start interval, retries).
pub fn health_config(h: &HealthConfig) -> String {
    format!(
        "&{{{} {:?} {:?} {:?} {:?} {}}}",
        quoted_list(&h.test),
        duration(h.interval),
        duration(h.timeout),
        duration(h.start_period),
        duration(h.start_interval),
        quoted_rune(h.retries),
    )
}

/// Go's `time.Duration.String()`: `0s`, `500ms`, `1.5s`, `1m30s`, `1h0m0s`.
pub fn duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    if ns < 1_000 {
        return format!("{ns}ns");
    }
    if ns < 1_000_000 {
        return format!("{}µs", decimal(ns, 1_000));
    }
    if ns < 1_000_000_000 {
        return format!("{}ms", decimal(ns, 1_000_000));
    }
    let secs = ns / 1_000_000_000;
    let (h, m) = (secs / 3600, (secs / 60) % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&format!("{}s", decimal(ns % 60_000_000_000, 1_000_000_000)));
    out
}

/// `v / unit` with its fraction, trailing zeros dropped.
fn decimal(v: u128, unit: u128) -> String {
    let (int, rem) = (v / unit, v % unit);
    if rem == 0 {
        return int.to_string();
    }
    let width = unit.ilog10() as usize;
    let frac = format!("{rem:0width$}");
    format!("{int}.{}", frac.trim_end_matches('0'))
}

/// Go's `%q` of an int: the quoted rune (`'\x00'`, `'\x03'`, `'\n'`, `'A'`).
fn quoted_rune(n: u32) -> String {
    let body = match char::from_u32(n) {
        Some('\x07') => "\\a".to_string(),
        Some('\x08') => "\\b".to_string(),
        Some('\x0c') => "\\f".to_string(),
        Some('\n') => "\\n".to_string(),
        Some('\r') => "\\r".to_string(),
        Some('\t') => "\\t".to_string(),
        Some('\x0b') => "\\v".to_string(),
        Some('\\') => "\\\\".to_string(),
        Some('\'') => "\\'".to_string(),
        Some(c) if !c.is_control() => c.to_string(),
        _ if n < 0x80 => format!("\\x{n:02x}"),
        _ if n < 0x10000 => format!("\\u{n:04x}"),
        _ => format!("\\U{n:08x}"),
    };
    format!("'{body}'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_go_prints_them() {
        let ms = Duration::from_millis;
        assert_eq!(duration(Duration::ZERO), "0s");
        assert_eq!(duration(ms(500)), "500ms");
        assert_eq!(duration(ms(1500)), "1.5s");
        assert_eq!(duration(Duration::from_secs(30)), "30s");
        assert_eq!(duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(duration(Duration::from_micros(1500)), "1.5ms");
        assert_eq!(duration(Duration::from_nanos(1500)), "1.5µs");
        assert_eq!(duration(Duration::from_nanos(7)), "7ns");
    }

    #[test]
    fn healthcheck_history_is_gos_struct_form() {
        let h = HealthConfig {
            test: vec!["CMD-SHELL".into(), "true".into()],
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            start_period: Duration::ZERO,
            start_interval: Duration::ZERO,
            retries: 3,
        };
        assert_eq!(
            health_config(&h),
            r#"&{["CMD-SHELL" "true"] "30s" "5s" "0s" "0s" '\x03'}"#
        );
        assert_eq!(quoted_rune(0), r"'\x00'");
        assert_eq!(quoted_rune(10), r"'\n'");
        assert_eq!(quoted_rune(65), "'A'");
    }
}
