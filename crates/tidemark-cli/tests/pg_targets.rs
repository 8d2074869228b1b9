//! Recovery targets that must resolve to the right thing, against real PostgreSQL 15: a
//! transaction that spans a base backup, a time shortly after a promotion, and two clusters
//! in one repository.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::pg::*;
use common::tidemark;
use tidemark_testkit::Postgres;

mod common;

#[test]
fn a_transaction_that_began_before_the_base_backup_is_a_target_by_its_commit() {
    let (mut cluster, a) = archiving_cluster(&[]);
    cluster.psql("postgres", "CREATE TABLE t (id int)");
    cluster.psql("postgres", "INSERT INTO t VALUES (1)");
    // A transaction begins (its xid is taken) before the base backup ...
    let mut long = Command::new(cluster.bin().join("psql"))
        .args(["-X", "-q", "-A", "-t", "-h"])
        .arg(cluster.dir.path())
        .args([
            "-p",
            &cluster.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = long.stdin.take().unwrap();
    writeln!(
        input,
        "BEGIN; INSERT INTO t VALUES (2); SELECT txid_current();"
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(long.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let xid = line.trim().to_owned();
    // ... while one with a later xid ends in the same segment (so that segment's xid range
    // holds the long one's, though it did not end there).
    cluster.psql("postgres", "INSERT INTO t VALUES (3)");
    cluster.psql("postgres", "SELECT pg_switch_wal()");
    physical_backup(&cluster, &a, "local");
    // ... and commits after it; rows after it must not come back.
    writeln!(input, "COMMIT;").unwrap();
    drop(input);
    assert!(long.wait().unwrap().success());
    cluster.psql("postgres", "INSERT INTO t VALUES (4)");
    cluster.archive_now(Duration::from_secs(60));
    cluster.stop("fast");

    let report = restore_started(&mut cluster, &a, &["--to-xid", &xid])
        .unwrap_or_else(|o| panic!("--to-xid {xid}: {}", stderr(&o)));
    assert_eq!(report["server"]["outcome"], "promoted", "{report}");
    assert_eq!(
        cluster.psql(
            "postgres",
            "SELECT string_agg(id::text, ',' ORDER BY id) FROM t"
        ),
        "1,2,3"
    );
    cluster.stop("fast");
}

#[test]
fn a_time_shortly_after_a_promotion_is_recovered_on_the_new_timeline() {
    let (mut cluster, a) = archiving_cluster(&[]);
    cluster.psql("postgres", "CREATE TABLE t (id int)");
    physical_backup(&cluster, &a, "replication");
    cluster.psql("postgres", "INSERT INTO t SELECT generate_series(1, 100)");
    cluster.archive_now(Duration::from_secs(60));
    // The primary dies: nothing more is committed on timeline 1.
    cluster.stop("immediate");

    // Fail over to the end of the archive: timeline 2, whose archiving is slow, so its
    // history file reaches the archive seconds after the promotion.
    let slow = format!(
        "archive_command=sleep 6; TIDEMARK_CONFIG={} {BIN} wal-push -q %p",
        a.config.display()
    );
    let report = restore_started(&mut cluster, &a, &["--latest", "--conf", &slow])
        .unwrap_or_else(|o| panic!("{}", stderr(&o)));
    assert_eq!(report["server"]["outcome"], "promoted", "{report}");
    let just_after = cluster.psql("postgres", "SELECT now()");
    std::thread::sleep(Duration::from_millis(1100));
    cluster.psql(
        "postgres",
        "INSERT INTO t SELECT generate_series(1000, 1049)",
    );
    cluster.archive_now(Duration::from_secs(120));
    cluster.stop("fast");
    let o = tidemark(&a.config, &["pg", "window", "--json"]);
    let window: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let history = window.to_string();
    // Timeline 2 began (its end-of-recovery checkpoint) before the target, and its history
    // file reached the archive only after it.
    let tl2 = &window[0]["wal"][1];
    assert_eq!(tl2["timeline"], 2, "{window}");
    let began: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(tl2["began"].clone()).unwrap_or_else(|e| panic!("{e}: {window}"));
    let target = chrono::DateTime::parse_from_str(&just_after, "%Y-%m-%d %H:%M:%S%.f%#z")
        .unwrap()
        .to_utc();
    assert!(began <= target, "{began} {target}");
    let system_id = window[0]["system_id"].as_str().unwrap();
    let archived: chrono::DateTime<chrono::Utc> = std::fs::metadata(
        a.repo
            .join(format!("logs/pg/{system_id}/wal/00000002.history")),
    )
    .unwrap()
    .modified()
    .unwrap()
    .into();
    assert!(
        archived > target,
        "the history file was archived at {archived}, before {target}"
    );

    // The time is on timeline 2 (it began before it), though the history file reached the
    // archive after it: every row of timeline 1, none written on timeline 2 after it.
    let report = restore_started(&mut cluster, &a, &["--to-time", &just_after])
        .unwrap_or_else(|o| panic!("--to-time {just_after} ({history}): {}", stderr(&o)));
    assert_eq!(report["server"]["outcome"], "promoted", "{report}");
    assert_eq!(cluster.psql("postgres", "SELECT count(*) FROM t"), "100");
    cluster.stop("fast");

    // Forced onto timeline 1, where nothing ended after that time, the server ends
    // recovery early: the error says which timeline was followed and what would work.
    let o = restore_started(
        &mut cluster,
        &a,
        &["--to-time", &just_after, "--timeline", "1"],
    )
    .expect_err("timeline 1 has no transaction after the target");
    let e = stderr(&o);
    assert!(
        e.contains("recovery ended before the target was reached"),
        "{e}"
    );
    assert!(e.contains("recovery followed timeline 1"), "{e}");
    assert!(e.contains("timeline 2, began"), "{e}");
    assert!(e.contains("--timeline N"), "{e}");
    // PostgreSQL shuts down when recovery ends before its target; make sure of it.
    let mut stop = tidemark_testkit::as_owner(&cluster.bin().join("pg_ctl"));
    stop.arg("-D")
        .arg(cluster.data_dir())
        .args(["-m", "immediate", "stop"]);
    let _ = stop.output();
}

#[test]
fn two_clusters_in_one_repository_are_never_confused() {
    let (mut first, a) = archiving_cluster(&[]);
    first.psql("postgres", "CREATE TABLE which AS SELECT 'first' AS name");
    physical_backup(&first, &a, "local");
    first.psql("postgres", "SELECT pg_create_restore_point('first_point')");
    first.archive_now(Duration::from_secs(60));
    // A second cluster archives into the same repository and is backed up later.
    let second = Postgres::start(&["archive_mode = on"]);
    second.psql(
        "postgres",
        &format!(
            "ALTER SYSTEM SET archive_command = 'TIDEMARK_CONFIG={} {BIN} wal-push -q %p'",
            a.config.display()
        ),
    );
    second.psql("postgres", "SELECT pg_reload_conf()");
    second.psql("postgres", "CREATE TABLE which AS SELECT 'second' AS name");
    physical_backup(&second, &a, "local");
    second.archive_now(Duration::from_secs(60));
    let (id, second_id) = (first.system_id(), second.system_id());
    first.stop("fast");

    // `latest` is ambiguous: refused, naming both clusters, and nothing is written.
    let dest = first.dir.path().join("restored");
    let o = restore_into(&a, "latest", &dest, &["--latest"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    for id in [&id, &second_id] {
        assert!(stderr(&o).contains(id.as_str()), "{}", stderr(&o));
    }
    assert!(stderr(&o).contains("--cluster"), "{}", stderr(&o));
    assert!(!dest.exists());
    // A restore point of the first cluster, though the newest backup is the second's.
    let o = restore_into(&a, "latest", &dest, &["--to-name", "first_point"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = restore_into(
        &a,
        "latest",
        &dest,
        &["--cluster", &id, "--to-name", "first_point"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    std::fs::remove_dir_all(&dest).unwrap();
    // The chosen cluster comes back, and only it.
    first.clear_data_dir();
    let data = first.data_dir();
    let o = restore_into(
        &a,
        "latest",
        &data,
        &["--cluster", &id, "--latest", "--start"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    first.started_elsewhere();
    assert_eq!(first.psql("postgres", "SELECT name FROM which"), "first");
    assert_eq!(first.system_id(), id);
    first.stop("fast");
    // An unknown cluster is named with the ones there are.
    let o = restore_into(&a, "latest", &dest, &["--cluster", "42", "--latest"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains(&id), "{}", stderr(&o));
}
