//! Operations on a repository, one file per verb.

pub mod backup;
pub mod check;
pub mod copy;
pub mod forget;
pub mod prune;
pub mod repair;
pub mod restore;
pub mod retention;
