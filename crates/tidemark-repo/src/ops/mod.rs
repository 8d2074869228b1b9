//! Operations on a repository, one file per verb.

pub mod backup;
pub mod restore;
