//! Exit codes that mean something, and the hint a person can act on for each failure.

use tidemark_repo::Error as RepoError;
use tidemark_storage::ErrorKind;

/// Everything worked.
pub const OK: i32 = 0;
/// A failure not covered below.
pub const FAILURE: i32 = 1;
/// Wrong usage: bad flags, a bad config file, invalid values (clap also uses 2).
pub const USAGE: i32 = 2;
/// No repository at the location.
pub const NO_REPOSITORY: i32 = 3;
/// The password or key does not open the repository.
pub const WRONG_PASSWORD: i32 = 4;
/// Another process holds a conflicting lock.
pub const LOCKED: i32 = 5;
/// Data is damaged (check found problems, or a restore met a bad object).
pub const DAMAGED: i32 = 6;
/// The storage location failed or could not be reached.
pub const STORAGE: i32 = 7;
/// The source of a backup (stdin, a command, a database) failed; no snapshot was written.
pub const SOURCE: i32 = 8;
/// The snapshot was saved, but not at every location asked for (`--also`); each is named.
pub const PARTIAL: i32 = 9;

/// An error's exit code and hint.
pub fn classify(e: &anyhow::Error) -> (i32, Option<String>) {
    for cause in e.chain() {
        if let Some(r) = cause.downcast_ref::<RepoError>() {
            return repo(r);
        }
        if let Some(en) = cause.downcast_ref::<tidemark_engine::Error>() {
            return match en {
                tidemark_engine::Error::Repo(r) => repo(r),
                tidemark_engine::Error::Verification { .. } => (DAMAGED, None),
                tidemark_engine::Error::WrongSnapshot { .. } => (USAGE, None),
                _ => (SOURCE, None),
            };
        }
        if let Some(s) = cause.downcast_ref::<tidemark_storage::Error>() {
            return storage(s);
        }
        if cause
            .downcast_ref::<tidemark_storage::LocationError>()
            .is_some()
        {
            return (
                USAGE,
                Some("see `tidemark help` for location URLs and options".into()),
            );
        }
        if let Some(u) = cause.downcast_ref::<crate::context::UsageError>() {
            return (USAGE, u.hint.clone());
        }
        if cause
            .downcast_ref::<crate::cmd::backup::SourceFailed>()
            .is_some()
        {
            return (
                SOURCE,
                Some("no snapshot was written; fix the source and run the backup again".into()),
            );
        }
    }
    (FAILURE, None)
}

fn storage(s: &tidemark_storage::Error) -> (i32, Option<String>) {
    let hint = match s.kind {
        ErrorKind::Denied => "check the credentials and permissions for this location",
        ErrorKind::Timeout | ErrorKind::Transient => "the location did not answer; check the endpoint, the network and the service, then retry",
        ErrorKind::NotFound => "the object is missing; run `tidemark check`",
        _ => "check the location's configuration",
    };
    (STORAGE, Some(hint.into()))
}

fn repo(r: &RepoError) -> (i32, Option<String>) {
    match r {
        RepoError::Storage(s) => storage(s),
        RepoError::WrongPassword { .. } => (WRONG_PASSWORD, Some("check TIDEMARK_PASSWORD_FILE / --password-file, or the key file".into())),
        RepoError::NotARepository { .. } => (NO_REPOSITORY, Some("create one with `tidemark init`, or check --repo / TIDEMARK_REPOSITORY".into())),
        RepoError::AlreadyInitialized { .. } => (USAGE, None),
        RepoError::Locked { .. } => (LOCKED, Some("wait for it to finish; a lock whose holder died expires by itself within about 2.5 minutes".into())),
        RepoError::Corrupt { .. } | RepoError::MissingChunk { .. } => {
            (DAMAGED, Some("run `tidemark check --read-data` to find every damaged snapshot".into()))
        }
        RepoError::UnsupportedVersion { .. } => (DAMAGED, Some("use a newer tidemark".into())),
        RepoError::InvalidId { .. } | RepoError::SnapshotNotFound(_) | RepoError::AmbiguousSnapshot(_) | RepoError::Invalid(_) => {
            (USAGE, Some("list snapshots with `tidemark snapshots`".into()).filter(|_| matches!(r, RepoError::SnapshotNotFound(_) | RepoError::AmbiguousSnapshot(_))))
        }
        RepoError::Io { .. } | RepoError::Source(_) => (SOURCE, None),
        RepoError::LockLost(_) => (LOCKED, None),
        RepoError::EveryLocationFailed(_) => (STORAGE, Some("no snapshot was written anywhere; fix one location (each is named above) and run the backup again".into())),
    }
}

/// Whether the error is a write to a pipe whose reader went away.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes on one line, without repeating a cause already in the message.
pub fn one_line(e: &anyhow::Error) -> String {
    message(e).replace('\n', " ")
}

/// The error and its causes, each said once, joined by ": ". A message of several lines (a
/// config file's problems, one per line) keeps its lines; `one_line` is for logs that take one.
pub fn message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if s.is_empty() || out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}
