//! Registry errors as Docker words them, retries, and the small encoders the client needs.

use std::time::Duration;

use berth_core::{Error, ErrorKind, Result};
use reqwest::StatusCode;

/// Retries `f` on `Unavailable` errors (5xx, 429, dropped connections), with backoff.
pub async fn retry<T, F, Fut>(attempts: u32, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut n = 0;
    loop {
        match f().await {
            Err(e)
                if e.kind() == ErrorKind::Unavailable && n + 1 < attempts && !is_tls_error(&e) =>
            {
                n += 1;
                tokio::time::sleep(Duration::from_millis(200 << n)).await;
            }
            other => return other,
        }
    }
}

/// Whether `e` is a certificate / TLS failure (never worth retrying).
pub fn is_tls_error(e: &Error) -> bool {
    e.message().starts_with("tls:")
}

/// Maps a transport error to an [`Error`] whose message says what failed.
pub fn http_error(e: reqwest::Error, what: &str) -> Error {
    let mut texts = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = cur {
        texts.push(err.to_string());
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            texts.push(inner.to_string());
        }
        cur = err.source();
    }
    let all = texts.join(": ");
    let tls = [
        "certificate",
        "UnknownIssuer",
        "InvalidContentType",
        "handshake",
        "tls",
        "TLS",
    ]
    .iter()
    .any(|w| all.contains(w));
    let detail = texts.last().cloned().unwrap_or_default();
    if tls && e.is_connect() {
        let kind = if all.contains("certificate")
            || all.contains("UnknownIssuer")
            || all.contains("NotValidForName")
        {
            "certificate verification failed"
        } else {
            "handshake failed"
        };
        return Error::unavailable(format!("tls: {kind} for {what}: {detail}"));
    }
    if e.is_timeout() {
        return Error::unavailable(format!("{what}: timed out"));
    }
    if e.is_connect() {
        return Error::unavailable(format!("{what}: cannot connect: {detail}"));
    }
    Error::unavailable(format!("{what}: {all}"))
}

/// Why a registry has nothing to give, as Docker names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotThere {
    /// `DENIED`: the repository does not exist or the credentials do not reach it.
    Denied,
    /// `NAME_UNKNOWN`: no such repository.
    NameUnknown,
    /// `MANIFEST_UNKNOWN`: no such tag or digest.
    ManifestUnknown,
}

impl NotThere {
    const ALL: [(Self, &'static str); 3] = [
        (Self::Denied, "DENIED"),
        (Self::NameUnknown, "NAME_UNKNOWN"),
        (Self::ManifestUnknown, "MANIFEST_UNKNOWN"),
    ];

    fn text(self) -> &'static str {
        match self {
            Self::Denied => "denied",
            Self::NameUnknown => "name unknown",
            Self::ManifestUnknown => "manifest unknown",
        }
    }

    /// Which of these `err` (from [`Repository`]) is, if any.
    pub fn of(err: &Error) -> Option<Self> {
        Self::ALL
            .iter()
            .map(|(n, _)| *n)
            .find(|n| err.message().starts_with(&format!("{}: ", n.text())))
    }
}

/// The error for a response whose first registry error code is one of [`NotThere`]'s.
pub(super) fn not_there(status: StatusCode, body: &[u8]) -> Option<Error> {
    let (code, message) = first_registry_error(body)?;
    let (what, _) = NotThere::ALL.iter().find(|(_, c)| *c == code)?;
    let kind = match status {
        StatusCode::UNAUTHORIZED => ErrorKind::Unauthenticated,
        StatusCode::FORBIDDEN => ErrorKind::PermissionDenied,
        _ => ErrorKind::NotFound,
    };
    Some(Error::new(kind, format!("{}: {message}", what.text())))
}

/// Docker's wording for a pull of `reference` that found nothing, always a 404: a repository
/// that does not exist (or is denied) is "pull access denied for X, repository does not exist or
/// may require 'docker login'", as dockerd words it (clients such as docker-py raise
/// ImageNotFound on "repository does not exist"); a tag it does not have is "manifest for X:tag
/// not found". The registry's own error follows, as moby's `notFoundError` does. Any other
/// error is returned as it is.
pub fn not_found(err: Error, reference: &berth_core::Reference) -> Error {
    let Some(what) = NotThere::of(&err) else {
        return err;
    };
    let context = match what {
        NotThere::Denied | NotThere::NameUnknown => format!(
            "pull access denied for {}, repository does not exist or may require 'docker login'",
            reference.familiar_repository()
        ),
        NotThere::ManifestUnknown => format!("manifest for {} not found", reference.familiar()),
    };
    Error::not_found(format!("{context}: {}", err.message()))
}

/// The `errors` of a registry's error body (distribution's error envelope).
fn registry_errors(body: &[u8]) -> Vec<(String, String)> {
    #[derive(serde::Deserialize)]
    struct E {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    #[derive(serde::Deserialize)]
    struct Es {
        #[serde(default)]
        errors: Vec<E>,
    }
    serde_json::from_slice::<Es>(body)
        .map(|es| es.errors.into_iter().map(|e| (e.code, e.message)).collect())
        .unwrap_or_default()
}

fn first_registry_error(body: &[u8]) -> Option<(String, String)> {
    registry_errors(body).into_iter().next()
}

pub(super) fn registry_error_text(body: &[u8]) -> String {
    let errors = registry_errors(body);
    if errors.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = errors
        .iter()
        .map(|(code, message)| format!("{}: {message}", code.to_lowercase().replace('_', " ")))
        .collect();
    format!(" ({})", parts.join("; "))
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulls_that_find_nothing_have_dockers_words() {
        let r = berth_core::Reference::parse("127.0.0.1:5000/nosuch").unwrap();
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"latest"}}]}"#;
        let err = not_there(StatusCode::NOT_FOUND, body).unwrap();
        assert_eq!(NotThere::of(&err), Some(NotThere::ManifestUnknown));
        let err = not_found(err, &r);
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(
            err.message(),
            "manifest for 127.0.0.1:5000/nosuch:latest not found: manifest unknown: manifest unknown"
        );
        let hub = berth_core::Reference::parse("nosuch/thing").unwrap();
        let body = br#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#;
        let err = not_found(not_there(StatusCode::UNAUTHORIZED, body).unwrap(), &hub);
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(
            err.message(),
            "pull access denied for nosuch/thing, repository does not exist or may require \
             'docker login': denied: requested access to the resource is denied"
        );
        let body = br#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}"#;
        let err = not_found(not_there(StatusCode::NOT_FOUND, body).unwrap(), &r);
        assert_eq!(
            err.message(),
            "pull access denied for 127.0.0.1:5000/nosuch, repository does not exist or may \
             require 'docker login': name unknown: repository name not known to registry"
        );
        // Other codes keep the registry's answer as it was.
        let body = br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#;
        assert!(not_there(StatusCode::NOT_FOUND, body).is_none());
        let other = Error::unavailable("x: cannot connect");
        assert_eq!(not_found(other, &r).message(), "x: cannot connect");
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
    }
}
