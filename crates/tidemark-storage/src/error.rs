//! The storage error: what failed, on which object and location, and whether retrying can help.

use std::fmt;

/// The one place where failures are classified. Layers decide on `kind`, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The object does not exist.
    NotFound,
    /// A create-if-absent write found an object already there.
    AlreadyExists,
    /// The location refused our credentials or permissions.
    Denied,
    /// The location or network failed in a way that may pass: a timeout, a dropped
    /// connection, a 5xx or 429 response, an injected fault.
    Transient,
    /// The operation did not finish within the timeout layer's limit.
    Timeout,
    /// The request is wrong for this location (bad config, unsupported operation).
    Invalid,
    /// Anything else that retrying will not fix.
    Permanent,
}

impl ErrorKind {
    /// Whether the retry layer should try again.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Transient | ErrorKind::Timeout)
    }
}

/// A failed storage operation.
#[derive(Debug)]
pub struct Error {
    /// The class of failure.
    pub kind: ErrorKind,
    /// The operation, as a verb: `upload`, `read`, `list`, `delete`.
    pub op: &'static str,
    /// The object path (or prefix) the operation was on.
    pub path: String,
    /// The location's name.
    pub location: String,
    /// The underlying cause.
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Result with the storage error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error without an underlying cause.
    pub fn new(kind: ErrorKind, op: &'static str, path: &str, location: &str) -> Self {
        Error {
            kind,
            op,
            path: path.to_owned(),
            location: location.to_owned(),
            source: None,
        }
    }

    /// Attach an underlying cause.
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Whether retrying may help.
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }

    /// Classify an `object_store` error for `op` on `path` at `location`.
    pub(crate) fn from_object_store(
        e: object_store::Error,
        op: &'static str,
        path: &str,
        location: &str,
    ) -> Self {
        let kind = match &e {
            object_store::Error::NotFound { .. } => ErrorKind::NotFound,
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => ErrorKind::AlreadyExists,
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => ErrorKind::Denied,
            object_store::Error::NotSupported { .. }
            | object_store::Error::InvalidPath { .. }
            | object_store::Error::UnknownConfigurationKey { .. }
            | object_store::Error::NotImplemented => ErrorKind::Invalid,
            other => classify_chain(other),
        };
        Error::new(kind, op, path, location).with_source(e)
    }
}

/// Classify an HTTP failure: by status when there is a response, else by the transport error.
pub(crate) fn classify_response(
    status: Option<u16>,
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
    op: &'static str,
    path: &str,
    location: &str,
) -> Error {
    let kind = match status {
        Some(s) => classify_status(s),
        None => classify_chain(source.as_ref()),
    };
    Error::new(kind, op, path, location).with_source(source)
}

/// Walk an error's causes for the evidence that decides whether it may pass.
fn classify_chain(e: &(dyn std::error::Error + 'static)) -> ErrorKind {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<reqwest::Error>() {
            if r.is_connect() || r.is_timeout() || r.is_request() || r.is_body() {
                return ErrorKind::Transient;
            }
            if let Some(status) = r.status() {
                return classify_status(status.as_u16());
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            return match io.kind() {
                K::NotFound => ErrorKind::NotFound,
                K::AlreadyExists => ErrorKind::AlreadyExists,
                K::PermissionDenied => ErrorKind::Denied,
                K::ConnectionRefused
                | K::ConnectionReset
                | K::ConnectionAborted
                | K::NotConnected
                | K::BrokenPipe
                | K::TimedOut
                | K::Interrupted
                | K::UnexpectedEof
                | K::WouldBlock => ErrorKind::Transient,
                _ => ErrorKind::Permanent,
            };
        }
        // object_store keeps the HTTP status of a failed request only in the message of a
        // private type; this is the one place that reads it.
        if let Some(status) = status_in_message(&err.to_string()) {
            return classify_status(status);
        }
        cur = err.source();
    }
    ErrorKind::Permanent
}

fn classify_status(status: u16) -> ErrorKind {
    match status {
        401 | 403 => ErrorKind::Denied,
        404 => ErrorKind::NotFound,
        409 | 412 => ErrorKind::AlreadyExists,
        408 | 429 | 500..=599 => ErrorKind::Transient,
        _ => ErrorKind::Permanent,
    }
}

fn status_in_message(msg: &str) -> Option<u16> {
    let at = msg.find("status code: ")? + "status code: ".len();
    msg.get(at..at + 3)?.parse().ok()
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            ErrorKind::NotFound => " (not found)",
            ErrorKind::AlreadyExists => " (already exists)",
            ErrorKind::Denied => " (access denied)",
            ErrorKind::Timeout => " (timed out)",
            _ => "",
        };
        write!(
            f,
            "failed to {} {:?} at location {:?}{}",
            self.op, self.path, self.location, what
        )
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_and_throttling_are_retryable_but_client_errors_are_not() {
        assert!(classify_status(503).is_retryable());
        assert!(classify_status(429).is_retryable());
        assert!(!classify_status(403).is_retryable());
        assert_eq!(classify_status(412), ErrorKind::AlreadyExists);
    }

    #[test]
    fn status_is_read_from_an_object_store_message() {
        let m = "Error performing PUT http://x in 2ms - Server returned non-2xx status code: 503 Service Unavailable: ";
        assert_eq!(status_in_message(m), Some(503));
        assert_eq!(status_in_message("no status here"), None);
    }

    #[test]
    fn refused_connections_are_transient() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(classify_chain(&io), ErrorKind::Transient);
    }

    #[test]
    fn display_names_the_operation_object_and_location() {
        let e = Error::new(ErrorKind::NotFound, "read", "config", "s3-eu");
        assert_eq!(
            e.to_string(),
            r#"failed to read "config" at location "s3-eu" (not found)"#
        );
    }
}
