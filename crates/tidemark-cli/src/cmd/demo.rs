//! `tidemark demo`: the whole cycle on a sample SQLite database, in a temporary directory.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use rusqlite::Connection;
use tidemark_engine::sqlite::Sqlite;
use tidemark_engine::Engine;
use tidemark_repo::config::InitOptions;
use tidemark_repo::key::Secret;
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::backup::{Backup, BackupOptions};
use tidemark_repo::progress::Progress;
use tidemark_repo::snapshot::SnapshotKind;
use tidemark_repo::Repository;
use tidemark_storage::{Location, StorageOptions};

use crate::context::Global;
use crate::output::size;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rows in the sample table.
    #[arg(long, default_value_t = 200_000)]
    rows: u32,
    /// Keep the temporary directory and print its path (the demo repository's password is
    /// random and not kept: the sample databases remain useful, the repository does not).
    #[arg(long)]
    keep: bool,
}

fn create_sample(path: &Path, rows: u32) -> rusqlite::Result<()> {
    let mut c = Connection::open(path)?;
    c.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL, item TEXT NOT NULL,
                              quantity INTEGER NOT NULL, price_cents INTEGER NOT NULL, placed_at TEXT NOT NULL);",
    )?;
    let tx = c.transaction()?;
    {
        let mut ins = tx.prepare("INSERT INTO orders VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
        let items = [
            "anchor", "buoy", "compass", "dinghy", "ensign", "fender", "gaff", "hawser",
        ];
        let mut x: u64 = 0x2545F4914F6CDD1D;
        for id in 0..rows {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ins.execute(rusqlite::params![
                id,
                format!("customer-{:05}", x % 20_000),
                items[(x >> 8) as usize % items.len()],
                1 + (x >> 16) % 9,
                100 + (x >> 24) % 50_000,
                format!(
                    "2026-{:02}-{:02}T{:02}:{:02}:00Z",
                    1 + (x >> 32) % 12,
                    1 + (x >> 36) % 28,
                    (x >> 40) % 24,
                    (x >> 44) % 60
                )
            ])?;
        }
    }
    tx.commit()
}

/// A digest of the table's content, to prove a restore brought back the same rows.
fn table_digest(path: &Path) -> rusqlite::Result<(u64, String)> {
    let c = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut h = blake3::Hasher::new();
    let mut n = 0u64;
    let mut stmt = c.prepare(
        "SELECT id, customer, item, quantity, price_cents, placed_at FROM orders ORDER BY id",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let line = format!(
            "{}|{}|{}|{}|{}|{}\n",
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, String>(5)?
        );
        h.update(line.as_bytes());
        n += 1;
    }
    Ok((n, h.finalize().to_hex()[..16].to_owned()))
}

async fn backup(
    repo: &Repository,
    db: &Path,
) -> Result<(
    tidemark_repo::id::SnapshotId,
    tidemark_repo::snapshot::Snapshot,
)> {
    let lock =
        LockGuard::acquire(repo, LockKind::Shared, "backup", &LockOptions::default()).await?;
    let engine = Sqlite::new(db);
    let opts = BackupOptions {
        engine: "sqlite".into(),
        kind: SnapshotKind::Physical,
        database: engine.identity().await?,
        tags: vec!["demo".into()],
        ..Default::default()
    };
    let mut b = Backup::start(repo, &lock, opts, Arc::new(Progress::default())).await?;
    let info = engine.backup(&mut b).await?;
    let r = b.finish(info.positions).await?;
    lock.release().await?;
    Ok(r)
}

pub async fn run(a: &Args, g: &Global) -> Result<i32> {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("tidemark-demo-")
        .tempdir()
        .context("failed to create a temporary directory")?;
    let root = dir.path().to_owned();
    let say = |s: String| {
        if !g.quiet {
            println!("{s}");
        }
    };
    let db = root.join("shop.db");
    let rows = a.rows;
    let db2 = db.clone();
    tokio::task::spawn_blocking(move || create_sample(&db2, rows)).await??;
    let before = table_digest(&db)?;
    say(format!(
        "1. created a sample SQLite database {} ({} rows, {})",
        db.display(),
        before.0,
        size(std::fs::metadata(&db)?.len())
    ));

    let storage = Location::parse(
        root.join("repository")
            .to_str()
            .context("temporary path is not UTF-8")?,
    )?
    .open(&StorageOptions::default())?;
    // A random password held in memory: the demo repository lives only as long as the demo.
    let secret = Secret::password(hex::encode(rand::random::<[u8; 32]>()));
    let repo = Repository::init(storage, &secret, &InitOptions::default()).await?;
    let (first_id, first) = backup(&repo, &db).await?;
    say(format!(
        "2. backed it up to {}: snapshot {}, {} read, {} stored (compressed, encrypted)",
        repo.location(),
        first_id.short(),
        size(first.summary.raw_bytes),
        size(first.summary.new_stored_bytes)
    ));

    let db2 = db.clone();
    let changed = tokio::task::spawn_blocking(move || -> rusqlite::Result<usize> {
        let c = Connection::open(&db2)?;
        // Recent orders change, as in a real shop: a contiguous range of rows.
        let max: i64 = c.query_row("SELECT max(id) FROM orders", [], |r| r.get(0))?;
        let n = c.execute(
            "UPDATE orders SET quantity = quantity + 1 WHERE id > ?1 - 2000",
            [max],
        )?;
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        Ok(n)
    })
    .await??;
    let (second_id, second) = backup(&repo, &db).await?;
    say(format!(
        "3. changed {changed} rows and backed up again: snapshot {}, {} read, only {} new stored ({:.1}% of the first backup)",
        second_id.short(),
        size(second.summary.raw_bytes),
        size(second.summary.new_stored_bytes),
        100.0 * second.summary.new_stored_bytes as f64 / first.summary.new_stored_bytes.max(1) as f64
    ));

    let target = root.join("restored.db");
    let t0 = Instant::now();
    let report = Sqlite::new(&target)
        .restore(&repo, &first_id.short(), &first, &target)
        .await?;
    say(format!(
        "4. restored the first snapshot to {} in {:.2}s ({})",
        report.target,
        t0.elapsed().as_secs_f64(),
        report.verified.as_deref().unwrap_or("")
    ));

    let after = table_digest(&target)?;
    let now = table_digest(&db)?;
    if after != before {
        bail!("the restored database differs from the first backup: {after:?} != {before:?}");
    }
    if now == before {
        bail!("the sample database did not change between backups; the demo proves nothing");
    }
    say(format!(
        "5. the restored table matches the first backup: {} rows, digest {} (the live database now has digest {})",
        after.0, after.1, now.1
    ));
    say(format!(
        "demo finished in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    if a.keep {
        let kept = dir.keep();
        say(format!("kept {}", kept.display()));
    }
    Ok(crate::exit::OK)
}
