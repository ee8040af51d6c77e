//! Docker's `filters` semantics: terms with the same key are OR-ed, different keys AND-ed.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use berth_core::{Error, Result};
use berth_proto::berth::types::v1 as types;

/// Parsed filter terms, key → values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Args(BTreeMap<String, BTreeSet<String>>);

impl Args {
    /// Parses `filters`, refusing keys not in `allowed` (Docker: `invalid filter 'x'`).
    pub fn parse(filters: &[types::Filter], allowed: &[&str]) -> Result<Self> {
        let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for f in filters {
            if !allowed.contains(&f.key.as_str()) {
                return Err(Error::invalid_argument(format!(
                    "invalid filter '{}'",
                    f.key
                )));
            }
            map.entry(f.key.clone())
                .or_default()
                .insert(f.value.clone());
        }
        Ok(Self(map))
    }

    /// Builds filters from `(key, value)` pairs without checking keys (tests, internal use).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (k, v) in pairs {
            map.entry(k.into()).or_default().insert(v.into());
        }
        Self(map)
    }

    /// Whether any term has `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// The values given for `key`.
    pub fn values(&self, key: &str) -> impl Iterator<Item = &str> {
        self.0.get(key).into_iter().flatten().map(String::as_str)
    }

    /// True when `key` is absent or one of its values equals `source`.
    pub fn exact_match(&self, key: &str, source: &str) -> bool {
        match self.0.get(key) {
            None => true,
            Some(vals) => vals.contains(source),
        }
    }

    /// True when `key` is absent or one of its values equals or is a prefix of `source`.
    pub fn fuzzy_match(&self, key: &str, source: &str) -> bool {
        match self.0.get(key) {
            None => true,
            Some(vals) => vals.iter().any(|v| source.starts_with(v.as_str())),
        }
    }

    /// True when `key` is absent or every `k` / `k=v` value is in `sources` (Docker's
    /// MatchKVList: label filters are AND-ed).
    pub fn match_kv_list<S: std::hash::BuildHasher>(
        &self,
        key: &str,
        sources: &HashMap<String, String, S>,
    ) -> bool {
        let Some(vals) = self.0.get(key) else {
            return true;
        };
        vals.iter().all(|v| match v.split_once('=') {
            Some((k, want)) => sources.get(k).is_some_and(|have| have == want),
            None => sources.contains_key(v.as_str()),
        })
    }

    /// Like [`Self::match_kv_list`] but over any lookup.
    pub fn match_labels(&self, key: &str, get: impl Fn(&str) -> Option<String>) -> bool {
        let Some(vals) = self.0.get(key) else {
            return true;
        };
        vals.iter().all(|v| match v.split_once('=') {
            Some((k, want)) => get(k).is_some_and(|have| have == want),
            None => get(v).is_some(),
        })
    }

    /// `label!` semantics: true when none of the values matches.
    pub fn match_labels_negated(&self, key: &str, get: impl Fn(&str) -> Option<String>) -> bool {
        let Some(vals) = self.0.get(key) else {
            return true;
        };
        !vals.iter().any(|v| match v.split_once('=') {
            Some((k, want)) => get(k).is_some_and(|have| have == want),
            None => get(v).is_some(),
        })
    }

    /// The boolean value of `key` (`true`/`1`, `false`/`0`); `None` when absent.
    pub fn bool_value(&self, key: &str) -> Result<Option<bool>> {
        let Some(vals) = self.0.get(key) else {
            return Ok(None);
        };
        let mut out = None;
        for v in vals {
            let b = match v.to_ascii_lowercase().as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "invalid filter '{key}={v}'"
                    )));
                }
            };
            if out.is_some_and(|o| o != b) {
                return Err(Error::invalid_argument(format!(
                    "conflicting values for filter '{key}'"
                )));
            }
            out = Some(b);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(k: &str, v: &str) -> types::Filter {
        types::Filter {
            key: k.into(),
            value: v.into(),
        }
    }

    #[test]
    fn parse_refuses_unknown_keys() {
        let err = Args::parse(&[f("nope", "x")], &["label"]).unwrap_err();
        assert_eq!(err.message(), "invalid filter 'nope'");
        let a = Args::parse(&[f("label", "a"), f("label", "b=c")], &["label"]).unwrap();
        assert_eq!(a.values("label").count(), 2);
    }

    #[test]
    fn matching() {
        let a = Args::from_pairs([
            ("id", "abc"),
            ("id", "def"),
            ("label", "a"),
            ("label", "b=1"),
        ]);
        assert!(a.exact_match("id", "def"));
        assert!(!a.exact_match("id", "de"));
        assert!(a.exact_match("other", "anything"));
        assert!(a.fuzzy_match("id", "abcdef"));
        assert!(!a.fuzzy_match("id", "xyz"));
        let labels: HashMap<String, String> =
            [("a".into(), "".into()), ("b".into(), "1".into())].into();
        assert!(a.match_kv_list("label", &labels));
        let labels: HashMap<String, String> =
            [("a".into(), "".into()), ("b".into(), "2".into())].into();
        assert!(!a.match_kv_list("label", &labels));
        assert!(a.match_kv_list("missing", &HashMap::<String, String>::new()));
    }

    #[test]
    fn booleans() {
        let a = Args::from_pairs([("dangling", "true")]);
        assert_eq!(a.bool_value("dangling").unwrap(), Some(true));
        assert_eq!(a.bool_value("x").unwrap(), None);
        assert!(Args::from_pairs([("d", "maybe")]).bool_value("d").is_err());
        assert!(
            Args::from_pairs([("d", "1"), ("d", "false")])
                .bool_value("d")
                .is_err()
        );
    }
}
