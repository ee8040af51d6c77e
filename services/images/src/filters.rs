//! Docker's image filters for List and Prune.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use berth_core::{Error, Reference, Result};
use berth_proto::berth::types::v1::Filter;

/// Filters grouped by key (terms of one key are OR-ed, keys AND-ed).
#[derive(Debug, Default)]
pub struct Filters(HashMap<String, Vec<String>>);

impl Filters {
    /// Groups `filters`, refusing keys outside `allowed`.
    pub fn parse(filters: Vec<Filter>, allowed: &[&str]) -> Result<Self> {
        let mut m: HashMap<String, Vec<String>> = HashMap::new();
        for f in filters {
            if !allowed.contains(&f.key.as_str()) {
                return Err(Error::invalid_argument(format!(
                    "invalid filter '{}'",
                    f.key
                )));
            }
            m.entry(f.key).or_default().push(f.value);
        }
        Ok(Self(m))
    }

    pub fn get(&self, key: &str) -> &[String] {
        self.0.get(key).map(Vec::as_slice).unwrap_or_default()
    }

    pub fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// `dangling=true|false` (`1`/`0` too), if given.
    pub fn dangling(&self) -> Result<Option<bool>> {
        match self.get("dangling").first().map(String::as_str) {
            None => Ok(None),
            Some("true") | Some("1") => Ok(Some(true)),
            Some("false") | Some("0") => Ok(Some(false)),
            Some(v) => Err(Error::invalid_argument(format!(
                "invalid filter 'dangling={v}'"
            ))),
        }
    }

    /// Whether `labels` pass the `label` and `label!` terms.
    pub fn labels_match(&self, labels: &BTreeMap<String, String>) -> bool {
        let one = |term: &str| match term.split_once('=') {
            Some((k, v)) => labels.get(k).is_some_and(|x| x == v),
            None => labels.contains_key(term),
        };
        self.get("label").iter().all(|t| one(t)) && !self.get("label!").iter().any(|t| one(t))
    }

    /// The `until` cut-off, if given.
    pub fn until(&self, now: SystemTime) -> Result<Option<SystemTime>> {
        self.get("until")
            .first()
            .map(|v| parse_time(v, now))
            .transpose()
    }
}

/// A Docker filter time: a Unix timestamp (with fraction), an RFC 3339 time, or a Go duration
/// (`24h`, `1h30m`) meaning that long ago.
pub fn parse_time(v: &str, now: SystemTime) -> Result<SystemTime> {
    let bad = || Error::invalid_argument(format!("invalid time or duration {v:?}"));
    if let Some(t) = crate::time::parse_rfc3339(v) {
        return Ok(t);
    }
    if let Ok(secs) = v.parse::<f64>()
        && secs >= 0.0
    {
        return Ok(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs));
    }
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = v.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        if (c == 'm' || c == 'u' || c == 'n') && chars.peek() == Some(&'s') {
            unit.push(chars.next().unwrap_or('s'));
        }
        let n: f64 = num.parse().map_err(|_| bad())?;
        num.clear();
        total += n * match unit.as_str() {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return Err(bad()),
        };
        any = true;
    }
    if !num.is_empty() || !any {
        return Err(bad());
    }
    now.checked_sub(Duration::from_secs_f64(total))
        .ok_or_else(bad)
}

/// Docker's reference filter: `pattern` against the familiar and full names (with and without
/// the tag), `*` not crossing `/`.
pub fn reference_matches(pattern: &str, tag: &str) -> bool {
    let Ok(r) = Reference::parse(tag) else {
        return false;
    };
    let names = [
        r.familiar(),
        r.familiar_repository(),
        r.to_string(),
        r.repository(),
    ];
    names.iter().any(|n| glob(pattern.as_bytes(), n.as_bytes()))
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some(b'*') => (0..=s.len())
            .take_while(|&i| i == 0 || s[i - 1] != b'/')
            .any(|i| glob(&p[1..], &s[i..])),
        Some(b'?') => !s.is_empty() && s[0] != b'/' && glob(&p[1..], &s[1..]),
        Some(c) => s.first() == Some(c) && glob(&p[1..], &s[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        assert!(reference_matches(
            "busybox",
            "docker.io/library/busybox:latest"
        ));
        assert!(reference_matches(
            "busy*",
            "docker.io/library/busybox:latest"
        ));
        assert!(reference_matches(
            "*:latest",
            "docker.io/library/busybox:latest"
        ));
        assert!(!reference_matches(
            "alpine",
            "docker.io/library/busybox:latest"
        ));
        assert!(reference_matches("127.0.0.1:5000/*", "127.0.0.1:5000/x:1"));
        assert!(!reference_matches("*", "127.0.0.1:5000/x:1") || reference_matches("*", "x:1"));
    }

    #[test]
    fn times() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100_000);
        assert_eq!(
            parse_time("1h", now).unwrap(),
            now - Duration::from_secs(3600)
        );
        assert_eq!(
            parse_time("1h30m", now).unwrap(),
            now - Duration::from_secs(5400)
        );
        assert_eq!(
            parse_time("50", now).unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(50)
        );
        assert!(parse_time("soon", now).is_err());
    }

    #[test]
    fn labels_and_keys() {
        let f = Filters::parse(
            vec![
                Filter {
                    key: "label".into(),
                    value: "a=1".into(),
                },
                Filter {
                    key: "label!".into(),
                    value: "b".into(),
                },
            ],
            &["label", "label!"],
        )
        .unwrap();
        let mut l = BTreeMap::new();
        l.insert("a".to_string(), "1".to_string());
        assert!(f.labels_match(&l));
        l.insert("b".into(), "x".into());
        assert!(!f.labels_match(&l));
        assert!(
            Filters::parse(
                vec![Filter {
                    key: "nope".into(),
                    value: String::new()
                }],
                &["label"]
            )
            .is_err()
        );
    }
}
