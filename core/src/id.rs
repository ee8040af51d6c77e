//! Validated identifiers: 64-hex object ids with unique-prefix lookup, Docker-style names and
//! content digests.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// A 64-character lowercase hex id, as Docker uses for containers, networks and exec instances.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(String);

impl Id {
    /// A new random id. Ids that are all digits are avoided, as Docker does, because a short
    /// prefix of one would read as a number.
    pub fn random() -> Self {
        let mut rng = rand::rng();
        loop {
            let mut bytes = [0u8; 32];
            rng.fill_bytes(&mut bytes);
            let hex = hex::encode(bytes);
            if !hex[..12].bytes().all(|b| b.is_ascii_digit()) {
                return Self(hex);
            }
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 12-character short form Docker prints.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }

    /// Returns `true` when `s` is a full 64-hex id.
    pub fn is_valid(s: &str) -> bool {
        s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
}

impl FromStr for Id {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if Self::is_valid(s) {
            Ok(Self(s.to_string()))
        } else {
            Err(Error::invalid_argument(format!(
                "invalid id {s:?}: want 64 lowercase hex characters"
            )))
        }
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How an object of some kind is named in error messages ("container", "network", ...).
#[derive(Debug, Clone, Copy)]
pub struct ObjectKind(pub &'static str);

/// Finds the one object whose id is `input`, whose name is `input`, or whose id starts with
/// `input`, in that order of precedence (Docker's rule). `objects` yields `(id, name)` pairs.
///
/// Errors: `NotFound` when nothing matches, `InvalidArgument` when a prefix matches several
/// objects.
pub fn resolve<'a, I>(kind: ObjectKind, input: &str, objects: I) -> Result<&'a str>
where
    I: IntoIterator<Item = (&'a str, &'a str)> + Clone,
{
    let input_name = input.strip_prefix('/').unwrap_or(input);
    if input.is_empty() {
        return Err(Error::invalid_argument(format!(
            "{} name or id is empty",
            kind.0
        )));
    }
    if let Some((id, _)) = objects.clone().into_iter().find(|(id, _)| *id == input) {
        return Ok(id);
    }
    if let Some((id, _)) = objects
        .clone()
        .into_iter()
        .find(|(_, name)| *name == input_name)
    {
        return Ok(id);
    }
    let is_hex = input
        .bytes()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if is_hex {
        let mut matches = objects.into_iter().filter(|(id, _)| id.starts_with(input));
        if let Some((first, _)) = matches.next() {
            if matches.next().is_some() {
                return Err(Error::invalid_argument(format!(
                    "multiple IDs found with provided prefix: {input}"
                )));
            }
            return Ok(first);
        }
    }
    Err(Error::not_found(format!("No such {}: {input}", kind.0)))
}

/// Checks a container (or volume, network) name as Docker does: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`,
/// with an optional leading `/`. Returns the name without the slash.
pub fn validate_name(name: &str) -> Result<&str> {
    let bare = name.strip_prefix('/').unwrap_or(name);
    let mut bytes = bare.bytes();
    let ok = match bytes.next() {
        Some(first) => {
            first.is_ascii_alphanumeric()
                && bare.len() >= 2
                && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        }
        None => false,
    };
    if ok {
        Ok(bare)
    } else {
        Err(Error::invalid_argument(format!(
            "Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        )))
    }
}

/// A content digest, `algorithm:hex` (sha256 or sha512).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// The sha256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Self {
        Self::from_sha256_bytes(&Sha256::digest(data))
    }

    /// A sha256 digest from its 32 raw bytes.
    pub fn from_sha256_bytes(bytes: &[u8]) -> Self {
        Self(format!("sha256:{}", hex::encode(bytes)))
    }

    /// `sha256`, `sha512`.
    pub fn algorithm(&self) -> &str {
        self.0.split_once(':').map(|(a, _)| a).unwrap_or_default()
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        self.0.split_once(':').map(|(_, h)| h).unwrap_or_default()
    }

    /// The whole digest string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Digest {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let invalid = || Error::invalid_argument(format!("invalid digest {s:?}"));
        let (alg, hex) = s.split_once(':').ok_or_else(invalid)?;
        let want = match alg {
            "sha256" => 64,
            "sha512" => 128,
            _ => {
                return Err(Error::invalid_argument(format!(
                    "unsupported digest algorithm {alg:?} in {s:?}"
                )));
            }
        };
        if hex.len() != want || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(invalid());
        }
        Ok(Self(s.to_string()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_are_valid_and_distinct() {
        let a = Id::random();
        let b = Id::random();
        assert!(Id::is_valid(a.as_str()));
        assert_ne!(a, b);
        assert_eq!(a.short().len(), 12);
        assert!("abc".parse::<Id>().is_err());
        assert!(a.as_str().to_uppercase().parse::<Id>().is_err());
    }

    #[test]
    fn resolve_by_id_name_and_prefix() {
        let a = format!("abc1{}", "0".repeat(60));
        let b = format!("abd2{}", "0".repeat(60));
        let objs = [(a.as_str(), "web"), (b.as_str(), "db")];
        let k = ObjectKind("container");
        assert_eq!(resolve(k, &a, objs).unwrap(), a);
        assert_eq!(resolve(k, "db", objs).unwrap(), b);
        assert_eq!(resolve(k, "/db", objs).unwrap(), b);
        assert_eq!(resolve(k, "abc", objs).unwrap(), a);
        let err = resolve(k, "ab", objs).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        let err = resolve(k, "zzz", objs).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::NotFound);
        assert_eq!(err.message(), "No such container: zzz");
    }

    #[test]
    fn a_name_wins_over_a_prefix() {
        let a = format!("beef{}", "0".repeat(60));
        let b = format!("cafe{}", "0".repeat(60));
        let objs = [(a.as_str(), "x1"), (b.as_str(), "beef")];
        assert_eq!(resolve(ObjectKind("container"), "beef", objs).unwrap(), b);
    }

    #[test]
    fn names() {
        assert_eq!(validate_name("/web-1").unwrap(), "web-1");
        assert!(validate_name("a").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name("").is_err());
    }

    #[test]
    fn digests() {
        let d = Digest::sha256_of(b"");
        assert_eq!(
            d.as_str(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(d.as_str().parse::<Digest>().unwrap(), d);
        assert!("sha256:abc".parse::<Digest>().is_err());
        assert!("md5:abc".parse::<Digest>().is_err());
        assert_eq!(d.algorithm(), "sha256");
    }
}
