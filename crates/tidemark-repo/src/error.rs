//! The repository error. Messages name the action and the object; the CLI adds hints.

/// Failures of repository operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A storage operation failed (the storage error names the object and location).
    #[error(transparent)]
    Storage(#[from] tidemark_storage::Error),
    /// No key object opens with the given secret.
    #[error("wrong password or key for repository {location:?}")]
    WrongPassword {
        /// The location.
        location: String,
    },
    /// The location holds no repository.
    #[error("no repository at {location:?}")]
    NotARepository {
        /// The location.
        location: String,
    },
    /// `init` found a repository already there.
    #[error("a repository already exists at {location:?}")]
    AlreadyInitialized {
        /// The location.
        location: String,
    },
    /// An object uses a format version this build does not know.
    #[error("object {object} has format version {version}, which this tidemark does not support")]
    UnsupportedVersion {
        /// The object path.
        object: String,
        /// Its version.
        version: u32,
    },
    /// An object failed verification: it was changed, truncated or is not what its name says.
    #[error("object {object} is damaged: {reason}")]
    Corrupt {
        /// The object path (and chunk, where relevant).
        object: String,
        /// What check failed.
        reason: String,
    },
    /// Text that should be an id is not one.
    #[error("{text:?} is not a valid {kind}")]
    InvalidId {
        /// The id type.
        kind: &'static str,
        /// The text.
        text: String,
    },
    /// No snapshot matches.
    #[error("no snapshot matches {0:?}")]
    SnapshotNotFound(String),
    /// More than one snapshot matches a prefix.
    #[error("snapshot prefix {0:?} is ambiguous")]
    AmbiguousSnapshot(String),
    /// A chunk a snapshot needs is in no index.
    #[error("chunk {chunk} of stream {stream:?} is missing from the repository")]
    MissingChunk {
        /// The chunk id.
        chunk: String,
        /// The stream that needs it.
        stream: String,
    },
    /// Another process holds a conflicting lock.
    #[error("repository is locked by {holder}")]
    Locked {
        /// Who holds it: operation, host, pid, since when.
        holder: String,
    },
    /// Our own lock could not be refreshed in time; the operation stopped before writing more.
    #[error("lost the repository lock: {0}")]
    LockLost(String),
    /// A local file could not be read or written.
    #[error("failed to {action} {path:?}")]
    Io {
        /// The action.
        action: &'static str,
        /// The local path (or `stdin`/`stdout`).
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A backup to several locations failed at each of them (each named, with its error).
    #[error("the backup failed at every location: {0}")]
    EveryLocationFailed(String),
    /// An argument or option is invalid.
    #[error("{0}")]
    Invalid(String),
    /// An engine or command that produces a stream failed.
    #[error("{0}")]
    Source(String),
}

/// Result with the repository error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn corrupt(object: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            object: object.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<String>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
