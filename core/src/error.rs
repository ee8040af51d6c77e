//! The one error type that crosses process boundaries.
//!
//! Every error has an [`ErrorKind`]; the kind decides the gRPC code and the HTTP status, each
//! mapped in exactly one place ([`ErrorKind::grpc_code`], [`ErrorKind::http_status`]). Messages
//! are short lowercase phrases; [`Error::chain`] joins them with their causes, and that whole
//! chain is what a client sees (gRPC status message, Docker `{"message": …}`).

use std::fmt;

/// What went wrong, in terms a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is malformed or names something invalid.
    InvalidArgument,
    /// The named object does not exist.
    NotFound,
    /// An object with that name or key already exists.
    AlreadyExists,
    /// The object is in a state that forbids the operation (running, in use, has children).
    FailedPrecondition,
    /// A concurrent change got in the way; retrying may succeed.
    Aborted,
    /// Credentials are missing or were refused.
    Unauthenticated,
    /// The caller may not do this.
    PermissionDenied,
    /// A dependency (socket, registry, runtime) cannot be reached right now.
    Unavailable,
    /// The operation exists in the API but is not implemented (yet).
    Unimplemented,
    /// The operation was cancelled by the caller.
    Cancelled,
    /// The operation did not finish in time.
    DeadlineExceeded,
    /// A limit was reached (disk, ports, addresses).
    ResourceExhausted,
    /// A bug or an unexpected condition on our side.
    Internal,
}

impl ErrorKind {
    /// The gRPC status code for this kind. The only place kinds map to gRPC.
    pub fn grpc_code(self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::InvalidArgument => Code::InvalidArgument,
            Self::NotFound => Code::NotFound,
            Self::AlreadyExists => Code::AlreadyExists,
            Self::FailedPrecondition => Code::FailedPrecondition,
            Self::Aborted => Code::Aborted,
            Self::Unauthenticated => Code::Unauthenticated,
            Self::PermissionDenied => Code::PermissionDenied,
            Self::Unavailable => Code::Unavailable,
            Self::Unimplemented => Code::Unimplemented,
            Self::Cancelled => Code::Cancelled,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::ResourceExhausted => Code::ResourceExhausted,
            Self::Internal => Code::Internal,
        }
    }

    /// The kind a gRPC status code stands for (the inverse of [`Self::grpc_code`]).
    pub fn from_grpc_code(code: tonic::Code) -> Self {
        use tonic::Code;
        match code {
            Code::InvalidArgument | Code::OutOfRange => Self::InvalidArgument,
            Code::NotFound => Self::NotFound,
            Code::AlreadyExists => Self::AlreadyExists,
            Code::FailedPrecondition => Self::FailedPrecondition,
            Code::Aborted => Self::Aborted,
            Code::Unauthenticated => Self::Unauthenticated,
            Code::PermissionDenied => Self::PermissionDenied,
            Code::Unavailable => Self::Unavailable,
            Code::Unimplemented => Self::Unimplemented,
            Code::Cancelled => Self::Cancelled,
            Code::DeadlineExceeded => Self::DeadlineExceeded,
            Code::ResourceExhausted => Self::ResourceExhausted,
            Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => Self::Internal,
        }
    }

    /// The HTTP status the Docker API uses for this kind. The only place kinds map to HTTP.
    pub fn http_status(self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            Self::InvalidArgument => StatusCode::BAD_REQUEST,
            Self::NotFound => StatusCode::NOT_FOUND,
            // Docker answers 409 both for a taken name and for "container is running".
            Self::AlreadyExists | Self::FailedPrecondition | Self::Aborted => StatusCode::CONFLICT,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::PermissionDenied => StatusCode::FORBIDDEN,
            Self::Unavailable | Self::ResourceExhausted => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Self::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Self::Cancelled | Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error with a kind, a message and an optional cause.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Source>,
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the cause.
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What kind of error this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// This error's own message, without its causes.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The message followed by every cause, joined by ": ".
    pub fn chain(&self) -> String {
        let mut out = self.message.clone();
        let mut cur: Option<&(dyn std::error::Error + 'static)> =
            self.source.as_deref().map(|s| s as _);
        while let Some(err) = cur {
            let text = err.to_string();
            // Wrapped errors sometimes repeat their cause's text; do not print it twice.
            if !text.is_empty() && !out.ends_with(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            cur = err.source();
        }
        out
    }

    /// Returns `true` when the kind is `kind`.
    pub fn is(&self, kind: ErrorKind) -> bool {
        self.kind == kind
    }
}

macro_rules! constructors {
    ($($name:ident => $kind:ident),* $(,)?) => {
        impl Error {
            $(
                #[doc = concat!("A new [`ErrorKind::", stringify!($kind), "`] error.")]
                pub fn $name(message: impl Into<String>) -> Self {
                    Self::new(ErrorKind::$kind, message)
                }
            )*
        }
    };
}

constructors! {
    invalid_argument => InvalidArgument,
    not_found => NotFound,
    already_exists => AlreadyExists,
    failed_precondition => FailedPrecondition,
    unauthenticated => Unauthenticated,
    permission_denied => PermissionDenied,
    unavailable => Unavailable,
    unimplemented => Unimplemented,
    resource_exhausted => ResourceExhausted,
    internal => Internal,
}

/// Adds a message and a kind to any error, turning it into an [`Error`] with it as the cause.
pub trait Context<T> {
    /// Wraps the error as `kind` with `message`.
    fn context(self, kind: ErrorKind, message: impl Into<String>) -> Result<T>;
    /// Wraps the error as [`ErrorKind::Internal`] with a lazily built message.
    fn internal(self, message: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E> Context<T> for std::result::Result<T, E>
where
    E: Into<Source>,
{
    fn context(self, kind: ErrorKind, message: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::new(kind, message).with_source(e))
    }

    fn internal(self, message: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::internal(message()).with_source(e))
    }
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        use std::io::ErrorKind as Io;
        let kind = match err.kind() {
            Io::NotFound => ErrorKind::NotFound,
            Io::AlreadyExists => ErrorKind::AlreadyExists,
            Io::PermissionDenied => ErrorKind::PermissionDenied,
            Io::InvalidInput | Io::InvalidData => ErrorKind::InvalidArgument,
            Io::ConnectionRefused | Io::ConnectionReset | Io::BrokenPipe => ErrorKind::Unavailable,
            Io::TimedOut => ErrorKind::DeadlineExceeded,
            _ => ErrorKind::Internal,
        };
        Self::new(kind, "i/o error").with_source(err)
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        tonic::Status::new(err.kind.grpc_code(), err.chain())
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let kind = ErrorKind::from_grpc_code(status.code());
        let message = if status.message().is_empty() {
            status.code().description().to_string()
        } else {
            status.message().to_string()
        };
        Self::new(kind, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_grpc() {
        use ErrorKind::*;
        for kind in [
            InvalidArgument,
            NotFound,
            AlreadyExists,
            FailedPrecondition,
            Aborted,
            Unauthenticated,
            PermissionDenied,
            Unavailable,
            Unimplemented,
            Cancelled,
            DeadlineExceeded,
            ResourceExhausted,
            Internal,
        ] {
            assert_eq!(ErrorKind::from_grpc_code(kind.grpc_code()), kind);
        }
    }

    #[test]
    fn http_status_matches_docker() {
        assert_eq!(ErrorKind::NotFound.http_status(), 404);
        assert_eq!(ErrorKind::AlreadyExists.http_status(), 409);
        assert_eq!(ErrorKind::FailedPrecondition.http_status(), 409);
        assert_eq!(ErrorKind::InvalidArgument.http_status(), 400);
        assert_eq!(ErrorKind::Unauthenticated.http_status(), 401);
        assert_eq!(ErrorKind::Internal.http_status(), 500);
    }

    #[test]
    fn chain_reaches_the_status_message() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = Error::not_found("open layer").with_source(io);
        let status: tonic::Status = err.into();
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(status.message(), "open layer: no such file");
        let back: Error = status.into();
        assert_eq!(back.kind(), ErrorKind::NotFound);
        assert_eq!(back.message(), "open layer: no such file");
    }
}
