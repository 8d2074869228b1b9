//! PostgreSQL: logical dumps with PostgreSQL's own `pg_dump`/`pg_restore`, WAL archiving and
//! (planned) physical base backups over the replication protocol. Design: docs/design/pitr.md.

pub mod archive;
pub mod conn;
#[doc(hidden)]
pub mod fuzzing;
mod local;
pub mod logical;
mod page;
pub mod physical;
pub mod scratch;
pub mod start;
pub mod stream;
pub mod tar;
mod tls;
pub mod wal;
pub mod walscan;
pub mod wire;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tidemark_repo::ops::backup::Backup;
use tidemark_repo::snapshot::{DatabaseIdentity, Snapshot};
use tidemark_repo::Repository;

pub use conn::{ConnOptions, ConnSpec, PasswordSource, SslMode};

use crate::{BackupInfo, Capabilities, Engine, Error, RestoreReport, Result};

/// What the server says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// `pg_control_system().system_identifier`: tells clusters apart.
    pub system_id: String,
    /// `server_version`.
    pub version: String,
    /// `server_version_num`.
    pub version_num: u32,
    /// Whether the server is a standby.
    pub in_recovery: bool,
}

/// A PostgreSQL server to protect.
#[derive(Debug, Clone)]
pub struct Postgres {
    /// How to connect.
    pub conn: ConnOptions,
    /// Where `pg_dump`, `pg_restore`, … are; `None` searches PATH and then Debian's
    /// `/usr/lib/postgresql/<major>/bin`.
    pub bin_dir: Option<PathBuf>,
    /// What a logical backup takes.
    pub logical: logical::DumpOptions,
    /// Take a physical base backup instead of a logical one.
    pub physical: Option<physical::PhysicalOptions>,
}

/// The `server_version_num` of a major version from a version string such as `15.4 (Debian …)`
/// (what snapshots record): enough for `Postgres::program` to find that major's tools; 0 when
/// the string names none.
pub fn major_version_num(version: &str) -> u32 {
    version
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        .map_or(0, |m| m * 10_000)
}

/// Quote an identifier for SQL.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quote a string literal for SQL (standard_conforming_strings, the default since 9.1).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl Postgres {
    /// A server reached with `conn`.
    pub fn new(conn: ConnOptions) -> Self {
        Postgres {
            conn,
            bin_dir: None,
            logical: logical::DumpOptions::default(),
            physical: None,
        }
    }

    fn db_error(&self, action: &'static str, e: impl std::fmt::Display) -> Error {
        Error::Database {
            action,
            database: self.conn.server(),
            reason: e.to_string(),
        }
    }

    /// A connection for queries.
    ///
    /// # Errors
    /// `Database` when the server cannot be reached or refuses the login.
    pub async fn connect(&self) -> Result<wire::Connection> {
        wire::Connection::connect(&self.conn, false)
            .await
            .map_err(|e| self.db_error("connect to", e))
    }

    /// Ask the server who it is.
    ///
    /// # Errors
    /// `Database`.
    pub async fn server_info(&self) -> Result<ServerInfo> {
        let mut c = self.connect().await?;
        let rows = c
            .query(
                "SELECT system_identifier::text, current_setting('server_version'), \
                 current_setting('server_version_num'), pg_is_in_recovery()::text \
                 FROM pg_control_system()",
            )
            .await
            .map_err(|e| self.db_error("query", e))?;
        c.close().await;
        let row = rows
            .first()
            .ok_or_else(|| self.db_error("query", "pg_control_system() returned no row"))?;
        let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok(ServerInfo {
            system_id: get(0),
            version: get(1),
            version_num: get(2).parse().unwrap_or(0),
            in_recovery: get(3) == "true",
        })
    }

    /// Databases that can be dumped: connectable, not templates.
    ///
    /// # Errors
    /// `Database`.
    pub async fn databases(&self) -> Result<Vec<String>> {
        let mut c = self.connect().await?;
        let rows = c
            .query(
                "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate \
                 ORDER BY datname",
            )
            .await
            .map_err(|e| self.db_error("list the databases of", e))?;
        c.close().await;
        Ok(rows
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect())
    }

    /// The path of one of PostgreSQL's programs, matching the server's major version when
    /// Debian's layout is there.
    pub fn program(&self, name: &str, version_num: u32) -> PathBuf {
        if let Some(d) = &self.bin_dir {
            return d.join(name);
        }
        let major = version_num / 10000;
        let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin/{name}"));
        if major > 0 && debian.is_file() {
            return debian;
        }
        if let Some(paths) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&paths) {
                if dir.join(name).is_file() {
                    return dir.join(name);
                }
            }
        }
        PathBuf::from(name)
    }
}

#[async_trait]
impl Engine for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            logical: true,
            physical: true,
            online: true,
            log_archiving: true,
            point_in_time: true,
            verify: true,
        }
    }

    async fn identity(&self) -> Result<DatabaseIdentity> {
        let info = self.server_info().await?;
        Ok(DatabaseIdentity {
            name: self.conn.server(),
            system_id: Some(info.system_id),
            version: Some(info.version),
        })
    }

    async fn backup(&self, backup: &mut Backup<'_>) -> Result<BackupInfo> {
        match &self.physical {
            Some(o) => physical::backup(self, backup, o).await,
            None => logical::backup(self, backup).await,
        }
    }

    /// Restore a physical snapshot into a new data directory at `target` (verified against
    /// its manifest; recovery settings are not written here).
    async fn restore(
        &self,
        repo: &Repository,
        id: &str,
        snapshot: &Snapshot,
        target: &Path,
    ) -> Result<RestoreReport> {
        if snapshot.kind != tidemark_repo::snapshot::SnapshotKind::Physical {
            return Err(Error::WrongSnapshot {
                snapshot: id.to_owned(),
                engine: "postgres",
                reason: "a logical PostgreSQL snapshot is restored into a database, not a path: use `tidemark pg restore --into`".into(),
            });
        }
        physical::restore(
            repo,
            id,
            snapshot,
            target,
            &physical::RestoreOptions::default(),
            Default::default(),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_major_version_is_read_from_a_version_string() {
        assert_eq!(super::major_version_num("15.4 (Debian 15.4-1)"), 150_000);
        assert_eq!(super::major_version_num("9.6.24"), 90_000);
        assert_eq!(super::major_version_num(""), 0);
    }
}
