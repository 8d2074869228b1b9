//! A table census: each table's row count and a content checksum, recorded by a backup at
//! backup time (snapshot position `census`) and compared by verification restores, so that a
//! restore proves the data came back, not only that the database opens.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The snapshot position that holds the census.
pub const POSITION: &str = "census";

/// One table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCensus {
    /// Rows.
    pub rows: u64,
    /// The content checksum. SQLite: BLAKE3 (hex) over every row in key order, each value as
    /// a type tag and its bytes. PostgreSQL: `pg:` and the sum of `hashtextextended` over each
    /// row's text (order-free, computed by the server), in fixed output settings.
    pub blake3: String,
}

/// Tables by name.
pub type Census = BTreeMap<String, TableCensus>;

/// What a comparison found: one line per table that differs, empty when all agree.
pub fn compare(recorded: &Census, restored: &Census) -> Vec<String> {
    let mut out = Vec::new();
    for (t, want) in recorded {
        match restored.get(t) {
            None => out.push(format!("table {t:?} is missing")),
            Some(got) if got.rows != want.rows => out.push(format!(
                "table {t:?} has {} rows, the backup recorded {}",
                got.rows, want.rows
            )),
            Some(got) if got.blake3 != want.blake3 => out.push(format!(
                "table {t:?} has {} rows as recorded, but their content differs",
                got.rows
            )),
            Some(_) => {}
        }
    }
    for t in restored.keys().filter(|t| !recorded.contains_key(*t)) {
        out.push(format!("table {t:?} was not in the backup"));
    }
    out
}

/// The census of an SQLite database file that nothing else writes (our copy, or a restore):
/// every table but SQLite's own, rows in rowid order
/// (primary-key order for WITHOUT ROWID tables).
///
/// # Errors
/// SQLite's errors.
pub fn sqlite(path: &Path) -> rusqlite::Result<Census> {
    let c = crate::sqlite::open_still(path)?;
    let tables: Vec<(String, bool)> = c
        .prepare(
            "SELECT name, sql LIKE '%WITHOUT ROWID%' FROM sqlite_schema \
             WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Census::new();
    for (t, without_rowid) in tables {
        let q = format!("\"{}\"", t.replace('"', "\"\""));
        let sql = if without_rowid {
            format!("SELECT * FROM {q}")
        } else {
            format!("SELECT * FROM {q} ORDER BY rowid")
        };
        let mut stmt = c.prepare(&sql)?;
        let n = stmt.column_count();
        let mut rows = stmt.query([])?;
        let mut h = blake3::Hasher::new();
        let mut count = 0u64;
        while let Some(r) = rows.next()? {
            count += 1;
            for i in 0..n {
                match r.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => h.update(b"N"),
                    rusqlite::types::ValueRef::Integer(v) => {
                        h.update(b"I").update(&v.to_le_bytes())
                    }
                    rusqlite::types::ValueRef::Real(v) => h.update(b"R").update(&v.to_le_bytes()),
                    rusqlite::types::ValueRef::Text(v) | rusqlite::types::ValueRef::Blob(v) => h
                        .update(b"B")
                        .update(&(v.len() as u64).to_le_bytes())
                        .update(v),
                };
            }
        }
        out.insert(
            t,
            TableCensus {
                rows: count,
                blake3: h.finalize().to_hex().to_string(),
            },
        );
    }
    Ok(out)
}

/// Session settings that make a row's text the same on any server of one major version.
const PG_SETTINGS: &str = "SET LOCAL TimeZone = 'UTC'; SET LOCAL DateStyle = 'ISO, YMD'; \
     SET LOCAL IntervalStyle = 'postgres'; SET LOCAL extra_float_digits = 1; \
     SET LOCAL bytea_output = 'hex'; SET LOCAL lc_monetary = 'C'";

/// The census of the database `conn` is connected to, in its current transaction (which must
/// be open: the settings are local to it). Every ordinary table outside the system schemas,
/// named `schema.table` (quoted where needed); `prefix` is put before each name.
///
/// # Errors
/// The server's error, naming the table.
pub async fn postgres(
    conn: &mut crate::postgres::wire::Connection,
    prefix: &str,
) -> Result<Census, String> {
    conn.query(PG_SETTINGS).await.map_err(|e| e.to_string())?;
    let tables = conn
        .query(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' \
             ORDER BY 1",
        )
        .await
        .map_err(|e| format!("failed to list the tables: {e}"))?;
    let mut out = Census::new();
    for row in tables {
        let Some(Some(t)) = row.into_iter().next() else {
            continue;
        };
        let r = conn
            .query(&format!(
                "SELECT count(*)::text, coalesce(sum(hashtextextended(x::text, 0)::numeric), 0)::text FROM {t} x"
            ))
            .await
            .map_err(|e| format!("failed to count table {t}: {e}"))?;
        let get = |i: usize| r.first().and_then(|r| r.get(i).cloned().flatten());
        let rows = get(0).and_then(|n| n.parse().ok()).unwrap_or(0);
        out.insert(
            format!("{prefix}{t}"),
            TableCensus {
                rows,
                blake3: format!("pg:{}", get(1).unwrap_or_default()),
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_value_a_lost_row_and_a_missing_table_are_all_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.db");
        let c = rusqlite::Connection::open(&p).unwrap();
        c.execute_batch(
            "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1,'a'),(2,'b');
             CREATE TABLE k(id TEXT PRIMARY KEY, n) WITHOUT ROWID; INSERT INTO k VALUES ('x', 1.5);",
        )
        .unwrap();
        let before = sqlite(&p).unwrap();
        assert_eq!(before["t"].rows, 2);
        assert_eq!(before["k"].rows, 1);
        assert!(compare(&before, &sqlite(&p).unwrap()).is_empty());
        c.execute("UPDATE t SET v = 'B' WHERE id = 2", []).unwrap();
        let d = compare(&before, &sqlite(&p).unwrap());
        assert_eq!(
            d,
            vec!["table \"t\" has 2 rows as recorded, but their content differs"]
        );
        c.execute_batch("DELETE FROM t WHERE id = 1; DROP TABLE k")
            .unwrap();
        let d = compare(&before, &sqlite(&p).unwrap()).join("; ");
        assert!(
            d.contains("\"k\" is missing") && d.contains("has 1 rows, the backup recorded 2"),
            "{d}"
        );
    }
}
