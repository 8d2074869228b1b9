//! Logical PostgreSQL backups against a real PostgreSQL 15 started in a temporary directory:
//! dumps come back with the same rows, restores never clobber a database by accident, and bad
//! credentials or a server that is down get clear errors.

use std::sync::Arc;

use tidemark_engine::postgres::logical::{self, RestoreOptions};
use tidemark_engine::postgres::{ConnOptions, PasswordSource, Postgres};
use tidemark_engine::Engine;
use tidemark_repo::config::InitOptions;
use tidemark_repo::key::{KdfParams, Secret};
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::backup::{Backup, BackupOptions};
use tidemark_repo::progress::Progress;
use tidemark_repo::snapshot::Snapshot;
use tidemark_repo::Repository;
use tidemark_storage::{ObjectStorage, Storage};
use tidemark_testkit::{Postgres as Cluster, SUPERUSER_PASSWORD};

async fn repo() -> Repository {
    let s: Arc<dyn Storage> = Arc::new(ObjectStorage::memory());
    Repository::init(
        s,
        &Secret::password("pw"),
        &InitOptions {
            kdf: KdfParams::insecure_for_tests(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

fn engine(cluster: &Cluster, db: &str, password: &str) -> Postgres {
    let pwfile = cluster.write_private(&format!("pw-{password}"), password);
    Postgres::new(ConnOptions {
        host: "127.0.0.1".into(),
        port: cluster.port,
        user: "postgres".into(),
        dbname: db.into(),
        password: PasswordSource::File(pwfile),
        ..Default::default()
    })
}

async fn backup(repo: &Repository, pg: &Postgres) -> tidemark_engine::Result<(String, Snapshot)> {
    let lock = LockGuard::acquire(repo, LockKind::Shared, "backup", &LockOptions::default())
        .await
        .unwrap();
    let opts = BackupOptions {
        engine: pg.name().into(),
        ..Default::default()
    };
    let b = Backup::start(repo, &lock, opts, Arc::new(Progress::default()))
        .await
        .unwrap();
    let out = tidemark_engine::run_backup(pg, b)
        .await
        .map(|f| (f.id.to_hex(), f.snapshot));
    lock.release().await.unwrap();
    out
}

fn fingerprint(cluster: &Cluster, db: &str, table: &str) -> String {
    cluster.psql(
        db,
        &format!("SELECT count(*) || ':' || sum(hashtext(t::text)) FROM {table} t"),
    )
}

fn seed(cluster: &Cluster) {
    cluster.psql("postgres", "CREATE DATABASE shop");
    cluster.psql(
        "shop",
        "CREATE TABLE orders (id int PRIMARY KEY, customer text, total numeric, at timestamptz);
         INSERT INTO orders SELECT g, 'customer ' || (g % 97), g * 1.25, '2026-01-01'::timestamptz + g * interval '1 minute'
           FROM generate_series(1, 20000) g;
         CREATE SCHEMA audit;
         CREATE TABLE audit.log (id serial PRIMARY KEY, line text);
         INSERT INTO audit.log (line) SELECT md5(g::text) FROM generate_series(1, 500) g;",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_logical_backup_restores_the_same_rows_and_never_clobbers_by_accident() {
    let cluster = Cluster::start(&[]);
    seed(&cluster);
    let repo = repo().await;
    let mut pg = engine(&cluster, "shop", SUPERUSER_PASSWORD);
    pg.logical.globals = true;
    let (id, snap) = backup(&repo, &pg).await.unwrap();
    let names: Vec<&str> = snap.streams.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["pg/shop.dump", "pg/globals.sql"]);
    assert_eq!(snap.database.system_id.as_deref().map(str::len), Some(19));

    let before = fingerprint(&cluster, "shop", "orders");
    // Into a new database, streamed into pg_restore.
    let into = |target: &str| RestoreOptions {
        target: Some(target.into()),
        ..Default::default()
    };
    let progress = || Arc::new(Progress::default());
    logical::restore(&pg, &repo, &id, &snap, &into("shop_copy"), progress())
        .await
        .unwrap();
    assert_eq!(fingerprint(&cluster, "shop_copy", "orders"), before);
    assert_eq!(
        fingerprint(&cluster, "shop_copy", "audit.log"),
        fingerprint(&cluster, "shop", "audit.log")
    );

    // Over an existing database only with --clean.
    cluster.psql("shop_copy", "DELETE FROM orders WHERE id > 100");
    let err = logical::restore(&pg, &repo, &id, &snap, &into("shop_copy"), progress())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("exists") && err.contains("--clean"), "{err}");
    assert_ne!(fingerprint(&cluster, "shop_copy", "orders"), before);
    let clean = RestoreOptions {
        clean: true,
        ..into("shop_copy")
    };
    logical::restore(&pg, &repo, &id, &snap, &clean, progress())
        .await
        .unwrap();
    assert_eq!(fingerprint(&cluster, "shop_copy", "orders"), before);

    // One table, in parallel from a temporary file.
    let one = RestoreOptions {
        tables: vec!["orders".into()],
        jobs: 2,
        ..into("orders_only")
    };
    logical::restore(&pg, &repo, &id, &snap, &one, progress())
        .await
        .unwrap();
    assert_eq!(fingerprint(&cluster, "orders_only", "orders"), before);
    assert_eq!(
        cluster.psql(
            "orders_only",
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'audit'"
        ),
        "0"
    );

    // A snapshot without that database is refused by name, and nothing is created.
    let err = logical::restore(
        &pg,
        &repo,
        &id,
        &snap,
        &RestoreOptions {
            source: Some("nope".into()),
            ..Default::default()
        },
        progress(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("\"nope\"") && err.contains("shop"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn all_databases_are_dumped_and_a_failed_restore_drops_what_it_created() {
    let cluster = Cluster::start(&[]);
    seed(&cluster);
    cluster.psql("postgres", "CREATE DATABASE \"odd/name\"");
    cluster.psql("odd/name", "CREATE TABLE t AS SELECT 1 AS x");
    let repo = repo().await;
    let mut pg = engine(&cluster, "postgres", SUPERUSER_PASSWORD);
    pg.logical.all = true;
    let (id, snap) = backup(&repo, &pg).await.unwrap();
    let mut names: Vec<String> = snap.streams.iter().map(|s| s.name.clone()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "pg/globals.sql",
            "pg/odd%2Fname.dump",
            "pg/postgres.dump",
            "pg/shop.dump"
        ]
    );
    let err = logical::restore(
        &pg,
        &repo,
        &id,
        &snap,
        &RestoreOptions::default(),
        Arc::new(Progress::default()),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("several databases"), "{err}");
    logical::restore(
        &pg,
        &repo,
        &id,
        &snap,
        &RestoreOptions {
            source: Some("odd/name".into()),
            target: Some("odd_copy".into()),
            ..Default::default()
        },
        Arc::new(Progress::default()),
    )
    .await
    .unwrap();
    assert_eq!(cluster.psql("odd_copy", "SELECT x FROM t"), "1");

    // A restore that fails half way (a role the dump names does not exist, and ownership is
    // kept) leaves no new database behind.
    cluster.psql(
        "shop",
        "CREATE ROLE shop_owner; ALTER TABLE orders OWNER TO shop_owner",
    );
    let mut one = engine(&cluster, "shop", SUPERUSER_PASSWORD);
    one.logical.all = false;
    let (id2, snap2) = backup(&repo, &one).await.unwrap();
    cluster.psql("shop", "REASSIGN OWNED BY shop_owner TO postgres");
    cluster.psql("postgres", "DROP ROLE shop_owner");
    let err = logical::restore(
        &one,
        &repo,
        &id2,
        &snap2,
        &RestoreOptions {
            target: Some("shop_failed".into()),
            ..Default::default()
        },
        Arc::new(Progress::default()),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("pg_restore exited") && err.contains("shop_owner"),
        "{err}"
    );
    assert_eq!(
        cluster.psql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'shop_failed'"
        ),
        "0"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_credentials_a_missing_database_and_a_stopped_server_are_clear_errors() {
    let mut cluster = Cluster::start(&[]);
    let repo = repo().await;

    let wrong = engine(&cluster, "postgres", "not-the-password");
    let err = backup(&repo, &wrong).await.unwrap_err().to_string();
    assert!(
        err.contains("refused the login") && err.contains("password"),
        "{err}"
    );
    assert!(
        !err.contains("not-the-password"),
        "the password leaked: {err}"
    );

    let mut missing = engine(&cluster, "postgres", SUPERUSER_PASSWORD);
    missing.logical.databases = vec!["does_not_exist".into()];
    let err = backup(&repo, &missing).await.unwrap_err().to_string();
    assert!(
        err.contains("does_not_exist") && err.contains("pg_dump exited"),
        "{err}"
    );
    assert!(
        repo.snapshots().await.unwrap().is_empty(),
        "a failed dump left a snapshot"
    );

    cluster.stop("fast");
    let down = engine(&cluster, "postgres", SUPERUSER_PASSWORD);
    let err = backup(&repo, &down).await.unwrap_err().to_string();
    assert!(
        err.contains("cannot reach PostgreSQL at 127.0.0.1:"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_census_is_taken_in_the_dumps_snapshot_and_names_a_changed_table() {
    use tidemark_engine::census;
    let cluster = Cluster::start(&[]);
    seed(&cluster);
    let repo = repo().await;
    let mut pg = engine(&cluster, "shop", SUPERUSER_PASSWORD);
    pg.logical.census = true;
    let (_, snap) = backup(&repo, &pg).await.unwrap();
    let recorded: census::Census =
        serde_json::from_value(snap.positions[census::POSITION].clone()).unwrap();
    assert!(!recorded.is_empty(), "{recorded:?}");
    assert!(
        recorded.keys().all(|k| k.starts_with("shop/")),
        "{recorded:?}"
    );

    let live = || async {
        let mut c = pg.connect().await.unwrap();
        c.query("BEGIN").await.unwrap();
        let r = census::postgres(&mut c, "shop/").await.unwrap();
        c.close().await;
        r
    };
    assert!(census::compare(&recorded, &live().await).is_empty());
    // A change of one value in one table is named; the others still agree.
    let (table, _) = recorded.iter().next().unwrap();
    let name = table.trim_start_matches("shop/");
    cluster.psql(
        "shop",
        &format!("UPDATE {name} SET id = id WHERE false; DELETE FROM {name} WHERE ctid = (SELECT min(ctid) FROM {name})"),
    );
    let diff = census::compare(&recorded, &live().await);
    assert_eq!(diff.len(), 1, "{diff:?}");
    assert!(diff[0].contains(name), "{diff:?}");
    // Same rows, one value changed: the checksum tells.
    cluster.psql(
        "shop",
        "UPDATE orders SET total = total + 0.01 WHERE id = 5",
    );
    let diff = census::compare(&recorded, &live().await).join("; ");
    assert!(
        diff.contains(
            "\"shop/public.orders\" has 20000 rows as recorded, but their content differs"
        ),
        "{diff}"
    );
}
