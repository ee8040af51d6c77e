//! Image references normalised as Docker does: `busybox` is `docker.io/library/busybox:latest`,
//! `localhost:5000/x` keeps its registry, and a digest pins the content.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::id::Digest;

/// The registry Docker assumes when a reference names none.
pub const DEFAULT_DOMAIN: &str = "docker.io";
/// Docker Hub's legacy domain, accepted as an alias of [`DEFAULT_DOMAIN`].
pub const LEGACY_DOMAIN: &str = "index.docker.io";
/// The tag assumed when a reference has neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";

/// A normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses and normalises `s`. A reference without tag or digest gets `latest`.
    pub fn parse(s: &str) -> Result<Self> {
        let mut r = Self::parse_no_default(s)?;
        if r.tag.is_none() && r.digest.is_none() {
            r.tag = Some(DEFAULT_TAG.to_string());
        }
        Ok(r)
    }

    /// Parses and normalises `s`, leaving the tag empty when none is given (for "all tags of a
    /// repository" requests such as `docker push repo`).
    pub fn parse_no_default(s: &str) -> Result<Self> {
        let invalid = |why: &str| {
            if why.is_empty() {
                Error::invalid_argument("invalid reference format")
            } else {
                Error::invalid_argument(format!("invalid reference format: {why}"))
            }
        };
        if s.is_empty() || s.len() > 255 + 128 + 72 {
            return Err(invalid(""));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => (rest, Some(d.parse::<Digest>().map_err(|_| invalid(""))?)),
            None => (s, None),
        };
        // A tag follows the last ':' that comes after the last '/'.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            let mut b = tag.bytes();
            let ok = tag.len() <= 128
                && b.next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_')
                && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
            if !ok {
                return Err(invalid(""));
            }
        }
        let (domain, path) = split_domain(name);
        if path.is_empty() || path.len() > 255 {
            return Err(invalid(""));
        }
        if path.bytes().any(|c| c.is_ascii_uppercase()) {
            return Err(invalid(&format!(
                "repository name ({path}) must be lowercase"
            )));
        }
        if !path.split('/').all(valid_path_component) {
            return Err(invalid(""));
        }
        if !valid_domain(&domain) {
            return Err(invalid(""));
        }
        Ok(Self {
            domain,
            path,
            tag: tag.map(str::to_string),
            digest,
        })
    }

    /// The registry host (and port), e.g. `docker.io` or `127.0.0.1:5000`.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository path, e.g. `library/busybox`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The tag, if any.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if any.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// `domain/path`, the repository's full name.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The repository as Docker prints it: `busybox` for `docker.io/library/busybox`.
    pub fn familiar_repository(&self) -> String {
        if self.domain == DEFAULT_DOMAIN {
            self.path
                .strip_prefix("library/")
                .unwrap_or(&self.path)
                .to_string()
        } else {
            self.repository()
        }
    }

    /// The whole reference as Docker prints it (`busybox:latest`, `127.0.0.1:5000/x:1`).
    pub fn familiar(&self) -> String {
        self.with_repository(self.familiar_repository())
    }

    /// The same reference with another tag and no digest.
    pub fn with_tag(&self, tag: &str) -> Self {
        Self {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        }
    }

    /// The same repository pinned to `digest`, without a tag (a RepoDigest).
    pub fn with_digest(&self, digest: Digest) -> Self {
        Self {
            tag: None,
            digest: Some(digest),
            ..self.clone()
        }
    }

    fn with_repository(&self, repo: String) -> String {
        let mut out = repo;
        if let Some(tag) = &self.tag {
            out.push(':');
            out.push_str(tag);
        }
        if let Some(d) = &self.digest {
            out.push('@');
            out.push_str(d.as_str());
        }
        out
    }
}

fn split_domain(name: &str) -> (String, String) {
    let (domain, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.')
                || first.contains(':')
                || first == "localhost"
                || first.bytes().any(|c| c.is_ascii_uppercase()) =>
        {
            (first.to_string(), rest.to_string())
        }
        _ => (DEFAULT_DOMAIN.to_string(), name.to_string()),
    };
    let domain = if domain == LEGACY_DOMAIN {
        DEFAULT_DOMAIN.to_string()
    } else {
        domain
    };
    let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    (domain, path)
}

fn valid_path_component(c: &str) -> bool {
    // [a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

fn valid_domain(d: &str) -> bool {
    let host = if let Some(rest) = d.strip_prefix('[') {
        // [ipv6]:port
        match rest.split_once(']') {
            Some((_, port)) => return port.is_empty() || valid_port(port.trim_start_matches(':')),
            None => return false,
        }
    } else {
        match d.rsplit_once(':') {
            Some((h, port)) => {
                if !valid_port(port) {
                    return false;
                }
                h
            }
            None => d,
        }
    };
    !host.is_empty()
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn valid_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|c| c.is_ascii_digit())
}

impl FromStr for Reference {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.with_repository(self.repository()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        Reference::parse(s).unwrap().to_string()
    }

    #[test]
    fn normalises_like_docker() {
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(norm("library/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(
            norm("index.docker.io/library/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(norm("user/app:v1"), "docker.io/user/app:v1");
        assert_eq!(norm("localhost/app"), "localhost/app:latest");
        assert_eq!(
            norm("127.0.0.1:5000/busybox"),
            "127.0.0.1:5000/busybox:latest"
        );
        assert_eq!(norm("127.0.0.1:5000/a/b:c"), "127.0.0.1:5000/a/b:c");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            norm(&format!("busybox@{d}")),
            format!("docker.io/library/busybox@{d}")
        );
        assert_eq!(
            norm(&format!("busybox:1@{d}")),
            format!("docker.io/library/busybox:1@{d}")
        );
    }

    #[test]
    fn familiar_forms() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.familiar(), "busybox:latest");
        assert_eq!(r.familiar_repository(), "busybox");
        let r = Reference::parse("127.0.0.1:5000/x").unwrap();
        assert_eq!(r.familiar(), "127.0.0.1:5000/x:latest");
        let r = Reference::parse_no_default("user/app").unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.familiar(), "user/app");
    }

    #[test]
    fn rejects_bad_references() {
        for bad in [
            "",
            "Busybox",
            "busybox:",
            "busybox::x",
            "a//b",
            "-a",
            "a-",
            "busybox@sha256:x",
            ":tag",
        ] {
            let err = Reference::parse(bad).unwrap_err();
            assert!(
                err.message().starts_with("invalid reference format"),
                "{bad}: {err}"
            );
        }
        assert_eq!(
            Reference::parse("Foo/Bar").unwrap_err().message(),
            "invalid reference format: repository name (Bar) must be lowercase"
        );
        assert_eq!(
            Reference::parse("foo/Bar").unwrap_err().message(),
            "invalid reference format: repository name (foo/Bar) must be lowercase"
        );
    }
}
