//! Docker's query-string conventions: repeated keys, its loose booleans, and `filters` JSON.

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use berth_core::{Error, Result};
use berth_proto::berth::types::v1::Filter;

/// The decoded query string of a request, in order, with repeated keys kept.
#[derive(Debug, Clone, Default)]
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Decodes `raw` (`a=1&b=x%20y&a=2`).
    pub fn parse(raw: &str) -> Self {
        Self(
            form_urlencoded::parse(raw.as_bytes())
                .into_owned()
                .collect(),
        )
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The first non-empty value of `key`.
    pub fn non_empty(&self, key: &str) -> Option<&str> {
        self.get(key).filter(|v| !v.is_empty())
    }

    /// Every value of `key`, in order.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Docker's boolean: absent, empty, `0`, `no`, `false` and `none` are false; anything else
    /// is true.
    pub fn bool(&self, key: &str) -> bool {
        self.get(key).is_some_and(truthy)
    }

    /// Like [`Self::bool`], but `default` when the key is absent.
    pub fn bool_or(&self, key: &str, default: bool) -> bool {
        self.get(key).map_or(default, truthy)
    }

    /// An integer parameter; absent or empty is `None`.
    pub fn int(&self, key: &str) -> Result<Option<i64>> {
        match self.non_empty(key) {
            None => Ok(None),
            Some(v) => v.trim().parse().map(Some).map_err(|_| {
                Error::invalid_argument(format!("invalid value for {key}: {v:?} is not an integer"))
            }),
        }
    }

    /// The `filters` parameter as berth filter terms.
    pub fn filters(&self) -> Result<Vec<Filter>> {
        parse_filters(self.get("filters").unwrap_or(""))
    }
}

fn truthy(v: &str) -> bool {
    let v = v.trim().to_ascii_lowercase();
    !matches!(v.as_str(), "" | "0" | "no" | "false" | "none")
}

impl<S: Send + Sync> FromRequestParts<S> for Query {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(Self::parse(parts.uri.query().unwrap_or("")))
    }
}

/// Parses Docker's filter JSON. Both shapes clients send are accepted: `{"key": ["v1", "v2"]}`
/// and the older `{"key": {"v1": true}}`. Terms come out sorted by key, then in given order.
pub fn parse_filters(json: &str) -> Result<Vec<Filter>> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let bad = |e: serde_json::Error| Error::invalid_argument(format!("invalid filter: {e}"));
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(json).map_err(bad)?;
    let mut out = Vec::new();
    for (key, value) in raw {
        match value {
            serde_json::Value::Array(items) => {
                for item in items {
                    match item {
                        serde_json::Value::String(v) => out.push(Filter {
                            key: key.clone(),
                            value: v,
                        }),
                        other => {
                            return Err(Error::invalid_argument(format!(
                                "invalid filter: value of {key:?} must be strings, not {other}"
                            )));
                        }
                    }
                }
            }
            serde_json::Value::Object(map) => {
                for (v, on) in map {
                    if on.as_bool().unwrap_or(true) {
                        out.push(Filter {
                            key: key.clone(),
                            value: v,
                        });
                    }
                }
            }
            serde_json::Value::Null => {}
            other => {
                return Err(Error::invalid_argument(format!(
                    "invalid filter: value of {key:?} must be a list or an object, not {other}"
                )));
            }
        }
    }
    Ok(out)
}

/// The values of `key` among `filters`.
pub fn filter_values<'a>(filters: &'a [Filter], key: &str) -> Vec<&'a str> {
    filters
        .iter()
        .filter(|f| f.key == key)
        .map(|f| f.value.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_follow_docker() {
        let q = Query::parse("a=1&b=0&c=true&d=False&e=&f=no&g=yes&h=none");
        assert!(q.bool("a"));
        assert!(!q.bool("b"));
        assert!(q.bool("c"));
        assert!(!q.bool("d"));
        assert!(!q.bool("e"));
        assert!(!q.bool("f"));
        assert!(q.bool("g"));
        assert!(!q.bool("h"));
        assert!(!q.bool("missing"));
        assert!(q.bool_or("missing", true));
    }

    #[test]
    fn repeated_keys_and_decoding() {
        let q = Query::parse("names=a&names=b%2Fc&x=1+2");
        assert_eq!(q.all("names"), ["a", "b/c"]);
        assert_eq!(q.get("x"), Some("1 2"));
        assert_eq!(q.int("missing").unwrap(), None);
        assert!(q.int("x").is_err());
    }

    #[test]
    fn filters_in_both_shapes() {
        let f = parse_filters(r#"{"status":["running","exited"],"label":{"a=b":true}}"#).unwrap();
        let pairs: Vec<_> = f
            .iter()
            .map(|f| (f.key.as_str(), f.value.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("label", "a=b"),
                ("status", "running"),
                ("status", "exited")
            ]
        );
        assert!(parse_filters("").unwrap().is_empty());
        let err = parse_filters("{bad").unwrap_err();
        assert_eq!(err.kind(), berth_core::ErrorKind::InvalidArgument);
        assert!(err.message().starts_with("invalid filter"));
        assert!(parse_filters(r#"{"a":1}"#).is_err());
    }
}
