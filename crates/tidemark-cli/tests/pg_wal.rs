//! WAL archiving end to end with a real PostgreSQL 15: `tidemark wal-push` as archive_command,
//! `tidemark wal-fetch` as restore_command, and the exit codes PostgreSQL relies on.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::pg::*;
use common::tidemark;
use tidemark_engine::postgres::wal::SegmentName;
use tidemark_testkit::Postgres;

mod common;

#[test]
fn archived_wal_recovers_every_committed_row_and_fetch_failures_stop_recovery() {
    let (mut cluster, a) = archiving_cluster(&[]);
    let system_id = cluster.system_id();

    let base = cluster.dir.path().join("base");
    cluster.base_backup(&base);
    cluster.psql("postgres", "CREATE TABLE t (id int, note text)");
    for round in 0..4 {
        cluster.psql(
            "postgres",
            &format!(
                "INSERT INTO t SELECT g, md5(g::text) FROM generate_series({}, {}) g",
                round * 5000 + 1,
                round * 5000 + 5000
            ),
        );
        cluster.psql("postgres", "SELECT pg_switch_wal()");
    }
    let last = archive_now(&cluster, 60);
    assert_eq!(
        cluster.psql("postgres", "SELECT failed_count FROM pg_stat_archiver"),
        "0"
    );
    let names = archived_names(&a, &system_id);
    assert!(names.iter().any(|n| n.ends_with(".backup")), "{names:?}");
    assert!(names.contains(&last), "{last} not in {names:?}");
    let want = cluster.psql("postgres", "SELECT count(*) || ':' || sum(id) FROM t");
    cluster.stop("immediate");

    // Recover the base backup from the archive alone.
    std::fs::write(base.join("recovery.signal"), "").unwrap();
    let mut auto = std::fs::read_to_string(base.join("postgresql.auto.conf")).unwrap();
    auto.push_str(&format!(
        "restore_command = 'TIDEMARK_CONFIG={} {BIN} wal-fetch %f %p'\nrecovery_target_action = 'promote'\n",
        a.config.display()
    ));
    std::fs::write(base.join("postgresql.auto.conf"), auto).unwrap();
    cluster.give(&base);
    cluster.swap_data_dir(&base);
    cluster.start_server();
    cluster.wait_for(
        "postgres",
        "SELECT pg_is_in_recovery()",
        "f",
        Duration::from_secs(120),
    );
    assert_eq!(
        cluster.psql("postgres", "SELECT count(*) || ':' || sum(id) FROM t"),
        want
    );
    let log = cluster.log();
    assert!(
        log.contains("restored log file") && log.contains("from archive"),
        "{log}"
    );
    cluster.stop("fast");

    // The exit codes PostgreSQL relies on.
    let dest = cluster.dir.path().join("fetched");
    let sysid = ["--system-id", system_id.as_str()];
    let fetch = |config: &Path, name: &str| {
        tidemark(
            config,
            &[
                &["wal-fetch", name, dest.to_str().unwrap(), "--prefetch", "0"][..],
                &sysid[..],
            ]
            .concat(),
        )
    };
    let o = fetch(&a.config, &last);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 16 << 20);
    // Absent: 1, quietly (PostgreSQL asks for files that do not exist as a matter of course).
    let o = fetch(&a.config, "000000090000000000000001");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let o = fetch(&a.config, "00000009.history");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    // A broken config or a damaged segment: 126, so recovery stops instead of ending early.
    let broken = cluster.write_private("broken.yaml", "repository: [unclosed\n");
    let o = fetch(&broken, &last);
    assert_eq!(o.status.code(), Some(126), "{}", stderr(&o));

    // Prefetch: a fetch starts a background prefetcher, and the next segment is then served
    // from the spool without opening the repository (so even a broken config does not matter).
    let whole: Vec<String> = archived_names(&a, &system_id)
        .into_iter()
        .filter(|n| SegmentName::parse(n).is_some())
        .collect();
    let (first, second) = (&whole[0], &whole[1]);
    // The prefetcher works while a server is in recovery: a data directory with a
    // recovery.signal and a postmaster.pid naming a live process (this test) stands in for one.
    let recovering = cluster.dir.path().join("recovering");
    std::fs::create_dir_all(&recovering).unwrap();
    std::fs::write(recovering.join("recovery.signal"), "").unwrap();
    std::fs::write(
        recovering.join("postmaster.pid"),
        format!("{}\n", std::process::id()),
    )
    .unwrap();
    let pgdata = ["--pgdata", recovering.to_str().unwrap()];
    let o = tidemark(
        &a.config,
        &[
            &["wal-fetch", first, dest.to_str().unwrap()][..],
            &sysid[..],
            &pgdata[..],
        ]
        .concat(),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let spool = cluster.dir.path().join("tidemark-spool/prefetch");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !spool.join(second).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing prefetched: {:?}",
            std::fs::read_dir(&spool).map(|d| d.count())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::remove_file(&dest).unwrap();
    let o = tidemark(
        &broken,
        &[
            &["wal-fetch", second, dest.to_str().unwrap()][..],
            &sysid[..],
        ]
        .concat(),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 16 << 20);
    assert!(
        !spool.join(second).exists(),
        "a served segment stays in the spool"
    );
    // Recovery ends (PostgreSQL removes recovery.signal): the prefetcher removes its spool
    // and exits, though requests came a moment ago.
    let holder: u32 = std::fs::read_to_string(spool.with_file_name("prefetcher.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::fs::remove_file(recovering.join("recovery.signal")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while spool.exists() || running(holder) {
        assert!(
            std::time::Instant::now() < deadline,
            "the prefetcher outlived recovery: spool {:?}",
            std::fs::read_dir(&spool).map(|d| d.count())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!cluster.dir.path().join("tidemark-spool").exists());

    // A second location of the archive, copied (each segment verified) while all is whole.
    let second = cluster.dir.path().join("second");
    let second_url = second.to_str().unwrap();
    let a_url = a.repo.to_str().unwrap();
    for args in [
        &["--repo", second_url, "init", "--copy-from", a_url][..],
        &["copy", "--to", second_url][..],
    ] {
        let o = tidemark(&a.config, args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    }

    let object = a.repo.join(format!("logs/pg/{system_id}/wal/{last}"));
    let mut bytes = std::fs::read(&object).unwrap();
    let mid = bytes.len() / 3;
    bytes[mid] ^= 0x40;
    std::fs::write(&object, bytes).unwrap();
    std::fs::remove_file(&dest).unwrap();
    let o = fetch(&a.config, &last);
    assert_eq!(o.status.code(), Some(126), "{}", stderr(&o));
    assert!(stderr(&o).contains(&last), "{}", stderr(&o));
    assert!(!dest.exists(), "a damaged segment was written to %p");

    // With the second location to fall back on, the damaged segment and a lost one come from
    // there, verified, and the warning names the damaged location.
    std::fs::remove_file(a.repo.join(format!("logs/pg/{system_id}/wal/{first}"))).unwrap();
    for name in [&last, first] {
        let o = tidemark(
            &a.config,
            &[
                &["wal-fetch", name, dest.to_str().unwrap(), "--prefetch", "0"][..],
                &sysid[..],
                &["--fallback", second_url][..],
            ]
            .concat(),
        );
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("read, verified, from") && stderr(&o).contains(name.as_str()),
            "{}",
            stderr(&o)
        );
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), 16 << 20);
        std::fs::remove_file(&dest).unwrap();
    }
    // A name no location has is still "absent", not a failure.
    let o = tidemark(
        &a.config,
        &[
            &[
                "wal-fetch",
                "000000090000000000000001",
                dest.to_str().unwrap(),
            ][..],
            &sysid[..],
            &["--fallback", second_url][..],
        ]
        .concat(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

#[test]
fn wal_push_killed_mid_upload_is_retried_and_leaves_no_gap_or_damaged_segment() {
    let cluster = Postgres::start(&["archive_mode = on", "archive_command = ''"]);
    let a = archive(&cluster);
    // The first attempt at each segment is killed with SIGKILL after a random delay (up to
    // 0.6 s, most of a wal-push); PostgreSQL retries it, and the retry runs unhindered.
    let script = cluster.write_private(
        "archive.sh",
        &format!(
            "#!/bin/sh\nset -u\nm=\"{dir}/killed-$(basename \"$1\")\"\n\
             if [ ! -e \"$m\" ]; then touch \"$m\"; \
             d=$(awk 'BEGIN{{srand(); printf \"%.2f\", rand()*0.6}}'); \
             TIDEMARK_CONFIG={config} timeout -s KILL \"$d\" {BIN} wal-push -q \"$1\"; exit 1; fi\n\
             TIDEMARK_CONFIG={config} exec {BIN} wal-push -q \"$1\"\n",
            dir = cluster.dir.path().display(),
            config = a.config.display(),
        ),
    );
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    cluster.psql(
        "postgres",
        &format!(
            "ALTER SYSTEM SET archive_command = '{} %p'",
            script.display()
        ),
    );
    cluster.psql("postgres", "SELECT pg_reload_conf()");
    let system_id = cluster.system_id();
    let first = cluster.psql("postgres", "SELECT pg_walfile_name(pg_current_wal_lsn())");
    cluster.psql("postgres", "CREATE TABLE t (id int, note text)");
    for round in 0..6 {
        cluster.psql(
            "postgres",
            &format!(
                "INSERT INTO t SELECT g, md5(g::text) FROM generate_series({}, {}) g",
                round * 40000 + 1,
                round * 40000 + 40000
            ),
        );
    }
    let last = archive_now(&cluster, 180);
    assert_ne!(
        cluster.psql("postgres", "SELECT failed_count FROM pg_stat_archiver"),
        "0",
        "no attempt was killed: the test proved nothing"
    );

    // No gap: every segment from the first to the last is there, and each reads back whole.
    let names = archived_names(&a, &system_id);
    let mut name = first.clone();
    let dest = cluster.dir.path().join("check");
    loop {
        assert!(names.contains(&name), "{name} is missing from {names:?}");
        let o = tidemark(
            &a.config,
            &[
                "wal-fetch",
                &name,
                dest.to_str().unwrap(),
                "--prefetch",
                "0",
                "--system-id",
                &system_id,
            ],
        );
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
        if name == last {
            break;
        }
        name = SegmentName::parse(&name)
            .unwrap()
            .next(16 << 20)
            .to_string();
    }
    // And nothing half-written was left behind in the repository.
    let o = tidemark(&a.config, &["check"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Restore a tidemark base backup and recover it to a point in time, then to the end.
fn restore_to(cluster: &mut Postgres, a: &Archive, dir: &str, target: &[&str]) -> String {
    restore_and_query(cluster, a, dir, target, "SELECT count(*) FROM t")
}

/// Restore the latest physical backup in place of the cluster's data directory with `target`,
/// let `pg restore --start` start it and wait for the promotion, and run `sql`. (`_dir` names
/// the attempt in messages.)
fn restore_and_query(
    cluster: &mut Postgres,
    a: &Archive,
    dir: &str,
    target: &[&str],
    sql: &str,
) -> String {
    let dest = cluster.data_dir();
    let report =
        restore_started(cluster, a, target).unwrap_or_else(|o| panic!("{dir}: {}", stderr(&o)));
    assert_eq!(report["server"]["outcome"], "promoted", "{dir}: {report}");
    assert_nothing_of_ours(&dest, true);
    assert!(report["server"]["recovery_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(
        cluster.psql("postgres", "SELECT pg_is_in_recovery()"),
        "f",
        "{dir}: {report}\n{}",
        std::fs::read_to_string(dest.join("log/tidemark-start.log")).unwrap_or_default()
    );
    let rows = cluster.psql("postgres", sql);
    cluster.stop("fast");
    rows
}

#[test]
fn a_physical_backup_recovers_to_a_time_and_to_the_end_of_the_archive() {
    let (mut cluster, a) = archiving_cluster(&[]);
    cluster.psql(
        "postgres",
        "CREATE TABLE t (id int, at timestamptz DEFAULT clock_timestamp());
         INSERT INTO t (id) SELECT g FROM generate_series(1, 1000) g",
    );
    let v = physical_backup(&cluster, &a, "local");
    assert_eq!(v["snapshot"]["kind"], "physical");
    assert!(v["snapshot"]["positions"]["pg.stop_lsn"].is_string(), "{v}");

    // A role that may replicate but not read the server's settings nor start a backup:
    // `--read local` says why it cannot, `auto` backs up over the replication protocol.
    cluster.psql(
        "postgres",
        "CREATE ROLE streamer LOGIN REPLICATION PASSWORD 'streamer-pw'",
    );
    let o = physical_backup_as(&cluster, &a, "local", "streamer", "streamer-pw");
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("pg_read_all_settings") && stderr(&o).contains("--read replication"),
        "{}",
        stderr(&o)
    );
    cluster.psql("postgres", "GRANT pg_read_all_settings TO streamer");
    let o = physical_backup_as(&cluster, &a, "local", "streamer", "streamer-pw");
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("may not run pg_backup_start(text, boolean)"),
        "{}",
        stderr(&o)
    );
    let o = physical_backup_as(&cluster, &a, "auto", "streamer", "streamer-pw");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let second: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        second["snapshot"]["positions"]["pg.read"], "replication",
        "{second}"
    );

    // PostgreSQL's own pg_verifybackup accepts what tidemark restored, for the manifest
    // tidemark wrote (local read) as for the one the server sent (replication). -n: the WAL is
    // in the archive, not in pg_wal.
    for (id, read) in [(&v["id"], "local"), (&second["id"], "replication")] {
        let dir = cluster.dir.path().join(format!("verify-{read}"));
        let o = restore_into(&a, id.as_str().unwrap(), &dir, &["--immediate"]);
        assert_eq!(o.status.code(), Some(0), "{read}: {}", stderr(&o));
        let out = Command::new(cluster.bin().join("pg_verifybackup"))
            .arg("-n")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{read}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // A restore started beside the running server on a port of its own (--start-port): the
    // original keeps its port, and the copy answers on the other.
    let beside = cluster.dir.path().join("beside");
    let port = tidemark_testkit::free_port().to_string();
    let o = restore_into(
        &a,
        "latest",
        &beside,
        &[
            "--immediate",
            "--start",
            "--start-port",
            &port,
            "--conf",
            "archive_mode=off",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        query_and_stop(
            &cluster,
            &beside,
            &port,
            "SELECT count(*) || ' ' || current_setting('port') FROM t"
        ),
        format!("1000 {port}")
    );
    assert_eq!(cluster.psql("postgres", "SELECT count(*) FROM t"), "1000");

    // Rows committed after the backup, on both sides of a target time.
    // One statement string is one transaction: its xid is the --to-xid target.
    let xid = cluster.psql(
        "postgres",
        "INSERT INTO t (id) SELECT g FROM generate_series(1001, 1100) g; SELECT txid_current()",
    );
    std::thread::sleep(Duration::from_millis(1200));
    let target = cluster.psql("postgres", "SELECT now()");
    let lsn = cluster.psql("postgres", "SELECT pg_current_wal_lsn()");
    cluster.psql("postgres", "SELECT pg_create_restore_point('after_1100')");
    std::thread::sleep(Duration::from_millis(1200));
    let last_insert = cluster.psql(
        "postgres",
        "INSERT INTO t (id) SELECT g FROM generate_series(1101, 1300) g; \
         SELECT to_char(max(at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM t",
    );
    archive_now(&cluster, 60);
    cluster.stop("fast");

    assert_eq!(
        restore_to(&mut cluster, &a, "pitr", &["--to-time", &target]),
        "1100"
    );
    // The same point by WAL position, by restore point name, and by the transaction.
    for target in [
        ["--to-lsn", lsn.as_str()],
        ["--to-name", "after_1100"],
        ["--to-xid", xid.as_str()],
    ] {
        let args = [&target[..], &["--timeline", "current"]].concat();
        let dir = target[0].trim_start_matches("--to-");
        assert_eq!(
            restore_to(&mut cluster, &a, dir, &args),
            "1100",
            "{target:?}"
        );
    }
    // The restores above promoted onto new timelines and archived them; the end of the original
    // history is on the base backup's timeline.
    assert_eq!(
        restore_to(&mut cluster, &a, "end", &["--timeline", "current"]),
        "1300"
    );

    // The window, and targets outside it, before anything is written.
    let o = tidemark(&a.config, &["pg", "window", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let w: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let c = &w[0];
    // The window ends with the last transaction in the archived WAL, read from its records:
    // the insert of rows 1101..1300 (or a later autovacuum), not the upload.
    assert_eq!(
        c["latest_is"], "the last transaction in the archived WAL ended",
        "{w}"
    );
    let last_insert: chrono::DateTime<chrono::Utc> = cluster_time(&last_insert);
    // The restore point made above, with its position, as `--to-name` finds it.
    let points = c["restore_points"].as_array().unwrap();
    assert!(
        points
            .iter()
            .any(|p| p["name"] == "after_1100" && p["lsn"].as_str().is_some()),
        "{w}"
    );
    let latest: chrono::DateTime<chrono::Utc> = c["latest"].as_str().unwrap().parse().unwrap();
    assert!(
        latest >= last_insert && latest < chrono::Utc::now(),
        "{latest} vs {last_insert}"
    );
    // The superuser's local backup and the replication role's.
    assert_eq!(c["base_backups"].as_array().unwrap().len(), 2, "{w}");
    assert!(c["earliest"].as_str() < c["latest"].as_str(), "{w}");
    let tl1 = &c["wal"][0];
    assert_eq!(tl1["timeline"], 1);
    assert_eq!(tl1["gaps"].as_array().unwrap().len(), 0, "{w}");
    for (flag, when, says) in [
        (
            "--to-time",
            "2099-01-01 00:00:00+00",
            "outside the recoverable window",
        ),
        (
            "--to-time",
            "2000-01-01 00:00:00+00",
            "before the recoverable window",
        ),
        ("--to-lsn", "FF/0", "beyond the end of the archived WAL"),
        // Looked up in the records of the archived WAL (the newest names are listed).
        (
            "--to-name",
            "no_such_point",
            "no restore point of that name is in the archived WAL; the newest it holds: after_1100\n",
        ),
        (
            "--to-xid",
            "4000000000",
            "that transaction did not end in the archived WAL (the transactions that ended there run from",
        ),
    ] {
        let dest = cluster.dir.path().join("never");
        let o = restore_into(&a, "latest", &dest, &[flag, when]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(says), "{}", stderr(&o));
        assert!(!dest.exists(), "a refused restore wrote {}", dest.display());
    }
    // A missing segment shows as a gap.
    let sys = c["system_id"].as_str().unwrap();
    let first = tl1["first"].as_str().unwrap();
    let hole = SegmentName::parse(first)
        .unwrap()
        .next(16 << 20)
        .to_string();
    let hole_path = a.repo.join(format!("logs/pg/{sys}/wal/{hole}"));
    let kept = cluster.dir.path().join("kept-segment");
    std::fs::copy(&hole_path, &kept).unwrap();
    std::fs::remove_file(&hole_path).unwrap();
    let o = tidemark(&a.config, &["pg", "window"]);
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .contains(&format!("1 gap(s): [[\"{hole}\",\"{hole}\"]]")),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Recovery to the end from the first backup would stop at the gap as if it were the
    // end: refused.
    let dest = cluster.dir.path().join("never");
    let o = tidemark(
        &a.config,
        &[
            "pg",
            "restore",
            v["id"].as_str().unwrap(),
            "--pgdata",
            dest.to_str().unwrap(),
            "--latest",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("gap ({hole} to {hole}")),
        "{}",
        stderr(&o)
    );
    assert!(!dest.exists(), "a refused restore wrote {}", dest.display());
    // So would recovery to a target after the gap.
    let after_gap = [
        ["--to-lsn", lsn.as_str()],
        ["--to-name", "after_1100"],
        ["--to-time", target.as_str()],
    ];
    for target in after_gap {
        let o = restore_into(&a, v["id"].as_str().unwrap(), &dest, &target);
        assert_eq!(o.status.code(), Some(2), "{target:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!(
                "between this base backup and the target has a gap ({hole} to {hole}"
            )),
            "{target:?}: {}",
            stderr(&o)
        );
        assert!(!dest.exists(), "a refused restore wrote {}", dest.display());
    }
    std::fs::rename(&kept, &hole_path).unwrap();
    cluster.give(&hole_path);

    // A data directory that is not empty is refused, and nothing in it changes.
    let busy = cluster.dir.path().join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("keep"), "x").unwrap();
    let o = tidemark(
        &a.config,
        &[
            "pg",
            "restore",
            "latest",
            "--pgdata",
            busy.to_str().unwrap(),
            "--immediate",
        ],
    );
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);

    // A damaged WAL object on the way to the target (one bit flipped in the stored segment
    // that holds it): wal-fetch names it and exits so that PostgreSQL stops recovery rather
    // than end it early, and a started restore fails loudly with the server's log; it never
    // reports a recovery that did not happen.
    let target_seg = SegmentName::containing(
        1,
        tidemark_engine::postgres::wal::parse_lsn(&lsn).unwrap(),
        16 << 20,
    );
    let object = a.repo.join(format!("logs/pg/{sys}/wal/{target_seg}"));
    let mut bytes = std::fs::read(&object).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&object, bytes).unwrap();
    cluster.clear_data_dir();
    let data = cluster.data_dir();
    let o = tidemark(
        &a.config,
        &[
            "pg",
            "restore",
            v["id"].as_str().unwrap(),
            "--pgdata",
            data.to_str().unwrap(),
            "--to-lsn",
            &lsn,
            "--start",
        ],
    );
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the server stopped during recovery")
            && stderr(&o).contains(&format!("object logs/pg/{sys}/wal/{target_seg} is damaged")),
        "{}",
        stderr(&o)
    );
}

#[test]
fn tablespaces_outside_the_data_directory_come_back_where_they_are_told() {
    let (cluster, a) = archiving_cluster(&[]);
    let ts = cluster.dir.path().join("ts1");
    std::fs::create_dir(&ts).unwrap();
    cluster.give(&ts);
    cluster.psql(
        "postgres",
        &format!("CREATE TABLESPACE ts1 LOCATION '{}'", ts.display()),
    );
    cluster.psql(
        "postgres",
        "CREATE TABLE t (id int PRIMARY KEY, pad text) TABLESPACE ts1;
         ALTER INDEX t_pkey SET TABLESPACE ts1;
         INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 5000) g",
    );
    let oid = cluster.psql(
        "postgres",
        "SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'",
    );
    let ids: Vec<String> = ["local", "replication"]
        .iter()
        .map(|read| {
            let v = physical_backup(&cluster, &a, read);
            assert_eq!(
                v["snapshot"]["positions"]["pg.tablespaces"], 1,
                "{read}: {v}"
            );
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();

    // By default a tablespace goes back where it was: refused while the original is there,
    // before anything is written.
    let dest = cluster.dir.path().join("restored");
    let o = restore_into(&a, &ids[0], &dest, &["--immediate"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains(&ts.display().to_string())
            && stderr(&o).contains(&format!("--tablespace-map {oid}=DIR")),
        "{}",
        stderr(&o)
    );
    assert!(!dest.exists(), "a refused restore wrote {}", dest.display());
    let o = restore_into(&a, &ids[0], &dest, &["--tablespace-map", "99999=/nowhere"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("its tablespaces are: {oid} ({})", ts.display())),
        "{}",
        stderr(&o)
    );
    assert!(!dest.exists(), "a refused restore wrote {}", dest.display());

    // Moved by OID (local read) and by the old directory (replication): PostgreSQL's
    // pg_verifybackup accepts the restored tree, tablespace included, and the started server
    // finds every row in the new place.
    for (id, from) in [(&ids[0], oid.clone()), (&ids[1], ts.display().to_string())] {
        let moved = cluster.dir.path().join(format!("moved-{}", from.len()));
        let map = format!("{from}={}", moved.display());
        let o = restore_into(&a, id, &dest, &["--immediate", "--tablespace-map", &map]);
        assert_eq!(o.status.code(), Some(0), "{from}: {}", stderr(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout)
                .contains(&format!("tablespace {oid}: {}", moved.display())),
            "{}",
            String::from_utf8_lossy(&o.stdout)
        );
        let out = Command::new(cluster.bin().join("pg_verifybackup"))
            .arg("-n")
            .arg(&dest)
            .output()
            .unwrap();
        assert!(out.status.success(), "{from}: {out:?}");
        std::fs::remove_dir_all(&dest).unwrap();
        std::fs::remove_dir_all(&moved).unwrap();

        let port = tidemark_testkit::free_port().to_string();
        let o = restore_into(
            &a,
            id,
            &dest,
            &[
                "--immediate",
                "--tablespace-map",
                &map,
                "--start",
                "--start-port",
                &port,
                "--conf",
                "archive_mode=off",
            ],
        );
        assert_eq!(o.status.code(), Some(0), "{from}: {}", stderr(&o));
        assert_eq!(
            query_and_stop(
                &cluster,
                &dest,
                &port,
                "SELECT (SELECT count(*) FROM t) || ' ' || pg_tablespace_location(oid) \
                 FROM pg_tablespace WHERE spcname = 'ts1'"
            ),
            format!("5000 {}", moved.display()),
            "{from}"
        );
        std::fs::remove_dir_all(&dest).unwrap();
    }
}

#[test]
fn pages_that_fail_their_checksums_are_named_and_the_backup_is_not_a_success() {
    let (mut cluster, a) = archiving_cluster(&[]);
    assert_eq!(cluster.psql("postgres", "SHOW data_checksums"), "on");
    cluster.psql(
        "postgres",
        "CREATE TABLE t (id int, pad text);
         INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 2000) g;
         CHECKPOINT",
    );
    // Clean pages pass in both read modes (the checksums PostgreSQL wrote are the ones
    // tidemark computes).
    physical_backup(&cluster, &a, "local");
    physical_backup(&cluster, &a, "replication");

    // One bit flipped in the middle of the table's second page, behind the server's back.
    let file = cluster.psql("postgres", "SELECT pg_relation_filepath('t')");
    cluster.stop("fast");
    let path = cluster.data_dir().join(&file);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8192 + 4000] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    cluster.start_server();

    for read in ["local", "replication"] {
        let o = physical_backup_as(
            &cluster,
            &a,
            read,
            "postgres",
            tidemark_testkit::SUPERUSER_PASSWORD,
        );
        // Exit 6 (damaged), with the snapshot kept and saying so.
        assert_eq!(o.status.code(), Some(6), "{read}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let positions = &v["snapshot"]["positions"];
        assert_eq!(positions["pg.checksum_failures"], 1, "{read}: {v}");
        let named = if read == "local" {
            format!("{file}: block 1")
        } else {
            // The server's own words.
            format!("checksum verification failed in file \"./{file}\", block 1")
        };
        assert!(stderr(&o).contains(&named), "{read}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("the source is damaged"),
            "{}",
            stderr(&o)
        );
        assert!(
            positions["pg.checksum_report"].to_string().contains(&file),
            "{read}: {v}"
        );
    }
}

/// A UTC time as the tests print it from SQL (`YYYY-MM-DDTHH:MM:SS.ffffffZ`).
fn cluster_time(s: &str) -> chrono::DateTime<chrono::Utc> {
    s.parse()
        .unwrap_or_else(|e| panic!("{s:?} is not a time: {e}"))
}

/// Archive everything up to now and wait until the archiver has it; the last segment written.
fn archive_now(cluster: &Postgres, timeout_secs: u64) -> String {
    cluster.archive_now(Duration::from_secs(timeout_secs))
}

#[test]
fn a_restore_to_a_point_on_a_later_timeline_follows_the_history() {
    let (mut cluster, a) = archiving_cluster(&[]);
    cluster.psql("postgres", "CREATE TABLE t (id int)");
    physical_backup(&cluster, &a, "replication");
    cluster.psql("postgres", "INSERT INTO t SELECT generate_series(1, 100)");
    std::thread::sleep(Duration::from_millis(1100));
    let branch = cluster.psql("postgres", "SELECT now()");
    std::thread::sleep(Duration::from_millis(1100));
    // Rows the branch must never see.
    cluster.psql("postgres", "INSERT INTO t SELECT generate_series(500, 599)");
    archive_now(&cluster, 60);
    cluster.stop("fast");

    // Branch off at `branch`: timeline 2, then write on it.
    assert_eq!(
        restore_to(&mut cluster, &a, "tl2", &["--to-time", &branch]),
        "100"
    );
    cluster.start_server();
    assert_eq!(
        cluster.psql(
            "postgres",
            "SELECT timeline_id FROM pg_control_checkpoint()"
        ),
        "2"
    );
    cluster.psql(
        "postgres",
        "INSERT INTO t SELECT generate_series(1000, 1049)",
    );
    std::thread::sleep(Duration::from_millis(1100));
    let on_tl2 = cluster.psql("postgres", "SELECT now()");
    std::thread::sleep(Duration::from_millis(1100));
    cluster.psql(
        "postgres",
        "INSERT INTO t SELECT generate_series(2000, 2049)",
    );
    archive_now(&cluster, 60);
    cluster.stop("fast");
    let system_id = {
        let names = std::fs::read_dir(a.repo.join("logs/pg"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>();
        names[0].clone()
    };
    let names = archived_names(&a, &system_id);
    assert!(names.contains(&"00000002.history".to_owned()), "{names:?}");

    // From the same base backup (timeline 1) to a point on timeline 2.
    assert_eq!(
        restore_to(&mut cluster, &a, "tl2b", &["--to-time", &on_tl2]),
        "150"
    );
    cluster.start_server();
    assert_eq!(
        cluster.psql(
            "postgres",
            "SELECT count(*) FROM t WHERE id BETWEEN 500 AND 599 OR id >= 2000"
        ),
        "0"
    );
    cluster.stop("fast");
}

/// The PITR check: a workload commits a row every ~50 ms for over a minute; restores to
/// several times each bring back exactly the rows committed up to that time, by PostgreSQL's own
/// commit timestamps.
#[test]
fn pitr_brings_back_exactly_the_rows_committed_up_to_each_target() {
    let (mut cluster, a) = archiving_cluster(&["track_commit_timestamp = on"]);
    cluster.psql(
        "postgres",
        "CREATE TABLE t (id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())",
    );
    physical_backup(&cluster, &a, "auto");

    // ~65 s of single-row transactions, one every 50 ms.
    let mut script = String::new();
    for i in 1..=1300 {
        script.push_str(&format!(
            "INSERT INTO t (id) VALUES ({i});\nSELECT pg_sleep(0.05);\n"
        ));
        // A named point between two commits of the same session: exactly 650 rows before it.
        if i == 650 {
            script.push_str("SELECT pg_create_restore_point('mid');\n");
        }
    }
    let script_path = cluster.write_private("workload.sql", &script);
    let mut workload = cluster.spawn_psql_file("postgres", &script_path);
    let mut targets = Vec::new();
    for wait in [15, 20, 20] {
        std::thread::sleep(Duration::from_secs(wait));
        targets.push(cluster.psql("postgres", "SELECT now()"));
    }
    assert!(workload.wait().unwrap().success(), "the workload failed");
    let expected: Vec<String> = targets
        .iter()
        .map(|t| {
            cluster.psql(
                "postgres",
                &format!("SELECT count(*) FROM t WHERE pg_xact_commit_timestamp(xmin) <= '{t}'"),
            )
        })
        .collect();
    // A second base backup, after every target: a restore to the named point must pick the
    // first one (the point is looked up in the archived WAL's records).
    physical_backup(&cluster, &a, "auto");
    archive_now(&cluster, 60);
    cluster.stop("fast");
    assert_eq!(
        restore_to(
            &mut cluster,
            &a,
            "name",
            &["--to-name", "mid", "--timeline", "current"]
        ),
        "650"
    );

    for (i, (target, want)) in targets.iter().zip(&expected).enumerate() {
        let got = restore_to(
            &mut cluster,
            &a,
            &format!("pitr{i}"),
            &["--to-time", target],
        );
        assert_eq!(&got, want, "rows at {target}");
    }
    assert!(
        expected.windows(2).all(|w| w[0] != w[1]),
        "targets too close: {expected:?}"
    );
    assert_eq!(
        restore_to(
            &mut cluster,
            &a,
            "end",
            &["--latest", "--timeline", "current"]
        ),
        "1300"
    );
}

/// A WAL segment file as PostgreSQL writes it, as far as wal-push looks: a long page header
/// naming the cluster, the timeline and the segment's start, then content.
fn fake_segment(dir: &Path, seg: u32, system_id: u64, fill: u8) -> String {
    let name = format!("00000001000000000000{seg:04X}");
    let mut page = vec![fill; 8192];
    page[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    page[2..4].copy_from_slice(&2u16.to_le_bytes());
    page[4..8].copy_from_slice(&1u32.to_le_bytes());
    page[8..16].copy_from_slice(&(u64::from(seg) << 24).to_le_bytes());
    page[16..24].fill(0);
    page[24..32].copy_from_slice(&system_id.to_le_bytes());
    page[32..36].copy_from_slice(&(16u32 << 20).to_le_bytes());
    page[36..40].copy_from_slice(&8192u32.to_le_bytes());
    std::fs::write(dir.join(&name), page).unwrap();
    name
}

#[test]
fn wal_push_archives_ready_segments_ahead_and_answers_later_calls_from_its_spool() {
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("pg_wal");
    std::fs::create_dir_all(wal.join("archive_status")).unwrap();
    let password = dir.path().join("password");
    std::fs::write(&password, "right\n").unwrap();
    let config = dir.path().join("tidemark.yaml");
    std::fs::write(
        &config,
        format!(
            "repository: {}\npassword_file: {}\n",
            dir.path().join("repo").display(),
            password.display()
        ),
    )
    .unwrap();
    assert!(tidemark(&config, &["init", "-q"]).status.success());
    let names: Vec<String> = (1..=3)
        .map(|s| fake_segment(&wal, s, 7_000_000_000_000_000_001, s as u8))
        .collect();
    for n in &names[1..] {
        std::fs::write(wal.join("archive_status").join(format!("{n}.ready")), "").unwrap();
    }
    let push = |name: &str| {
        Command::new(BIN)
            .args(["wal-push", "--json", &format!("pg_wal/{name}")])
            .current_dir(dir.path())
            .env_clear()
            .env("TIDEMARK_CONFIG", &config)
            .output()
            .unwrap()
    };
    let o = push(&names[0]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["outcome"], "stored");
    assert_eq!(report["ahead"], serde_json::json!([names[1], names[2]]));
    let stored = dir.path().join("repo/logs/pg/7000000000000000001/wal");
    assert_eq!(std::fs::read_dir(&stored).unwrap().count(), 3);

    // Later calls for the segments archived ahead do not open the repository: they succeed
    // even with a password that no longer opens it.
    std::fs::write(&password, "wrong\n").unwrap();
    let o = push(&names[1]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // A file that changed since it was archived is not taken from the spool: the repository
    // is opened (and here refuses the password), and with the right password the different
    // content is refused by name.
    fake_segment(&wal, 3, 7_000_000_000_000_000_001, 0xEE);
    let o = push(&names[2]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    std::fs::write(&password, "right\n").unwrap();
    let o = push(&names[2]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains(&names[2]), "{}", stderr(&o));

    // A second repository (two archive_commands chained, or a new repository) is not answered
    // from the first one's spool records: the segment is stored there too.
    let other = dir.path().join("other.yaml");
    std::fs::write(
        &other,
        format!(
            "repository: {}\npassword_file: {}\n",
            dir.path().join("repo2").display(),
            password.display()
        ),
    )
    .unwrap();
    assert!(tidemark(&other, &["init", "-q"]).status.success());
    let o = Command::new(BIN)
        .args(["wal-push", &format!("pg_wal/{}", names[1])])
        .current_dir(dir.path())
        .env_clear()
        .env("TIDEMARK_CONFIG", &other)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(dir
        .path()
        .join("repo2/logs/pg/7000000000000000001/wal")
        .join(&names[1])
        .exists());
}

/// A child process that is killed when the test ends, a failed assertion included.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// `tidemark pg receive` against `cluster`, logging to `log`.
fn start_receiver(cluster: &Postgres, a: &Archive, log: &Path) -> Reaped {
    let pw = cluster.write_private("pg-password", tidemark_testkit::SUPERUSER_PASSWORD);
    let url = format!("postgresql://postgres@127.0.0.1:{}/postgres", cluster.port);
    Command::new(BIN)
        .args(["pg", "receive", "--url", &url, "--pg-password-file"])
        .arg(&pw)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TIDEMARK_CONFIG", &a.config)
        .env("TIDEMARK_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .map(Reaped)
        .unwrap()
}

/// Wait until a receiver streams from `cluster` through its slot.
fn wait_for_receiver(cluster: &Postgres) {
    cluster.wait_for(
        "postgres",
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'tidemark' AND active",
        "1",
        Duration::from_secs(30),
    );
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The streaming check: no archive_command at all, only `tidemark pg receive` with a
/// slot. The receiver is killed and restarted once mid-workload (it must resume without a gap
/// or a duplicate), then killed together with an immediate stop of the server: every row
/// committed more than 1 s before that is in the restore.
#[test]
fn streamed_wal_recovers_everything_committed_more_than_a_second_before_a_crash() {
    let mut cluster = Postgres::start(&["track_commit_timestamp = on"]);
    let a = archive(&cluster);
    let system_id = cluster.system_id();
    let log = cluster.dir.path().join("receive.log");
    let mut receiver = start_receiver(&cluster, &a, &log);
    wait_for_receiver(&cluster);
    cluster.psql(
        "postgres",
        "CREATE TABLE t (id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp(), pad text)",
    );
    physical_backup(&cluster, &a, "replication");

    // A restore point in the segment being streamed (the backup ended the one before) is
    // read from the pieces' records: a name that is not there is refused with it listed.
    let rp = cluster.psql("postgres", "SELECT pg_create_restore_point('streamed_rp')");
    let rp_seg = SegmentName::containing(
        1,
        tidemark_engine::postgres::wal::parse_lsn(&rp).unwrap(),
        16 << 20,
    )
    .to_string();
    let dest = cluster.dir.path().join("never");
    let listed = (0..40).any(|_| {
        std::thread::sleep(Duration::from_millis(250));
        let o = restore_into(&a, "latest", &dest, &["--to-name", "nosuch"]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        stderr(&o).contains("the newest it holds: streamed_rp")
    });
    assert!(listed, "the streamed restore point was not found");
    assert!(!dest.exists(), "a refused restore wrote {}", dest.display());
    let names = archived_names(&a, &system_id);
    assert!(
        !names.contains(&rp_seg) && names.iter().any(|n| n.starts_with(&format!("{rp_seg}.s"))),
        "{rp_seg}, which holds the restore point, should be in pieces only: {names:?}"
    );

    // Single-row transactions every 10 ms, and a segment switch now and then so that pieces
    // turn into whole segments while it runs.
    let mut script = String::new();
    for i in 1..=3000 {
        script.push_str(&format!(
            "INSERT INTO t (id, pad) VALUES ({i}, md5('{i}'));\nSELECT pg_sleep(0.01);\n"
        ));
        if i % 150 == 0 {
            script.push_str("SELECT pg_switch_wal();\n");
        }
    }
    let script_path = cluster.write_private("workload.sql", &script);
    let mut workload = cluster.spawn_psql_file("postgres", &script_path);
    std::thread::sleep(Duration::from_secs(4));
    receiver.kill().unwrap();
    receiver.wait().unwrap();
    receiver = start_receiver(&cluster, &a, &cluster.dir.path().join("receive2.log"));
    std::thread::sleep(Duration::from_secs(6));
    let crash = unix_now();
    receiver.kill().unwrap();
    receiver.wait().unwrap();
    cluster.stop("immediate");
    let _ = workload.wait();

    // What the crashed server had committed, after its own crash recovery.
    cluster.start_server();
    let committed = cluster.psql("postgres", "SELECT count(*) FROM t");
    let due = cluster.psql(
        "postgres",
        &format!(
            "SELECT count(*) FROM t WHERE pg_xact_commit_timestamp(xmin) <= to_timestamp({})",
            crash - 1.0
        ),
    );
    cluster.stop("fast");
    let (committed, due): (u64, u64) = (committed.parse().unwrap(), due.parse().unwrap());
    assert!(due > 300, "the workload hardly ran: {due} rows");

    // The archive: whole segments without a gap, pieces only past the last whole segment.
    let names = archived_names(&a, &system_id);
    let whole: Vec<SegmentName> = names.iter().filter_map(|n| SegmentName::parse(n)).collect();
    assert!(whole.len() >= 3, "{names:?}");
    for w in whole.windows(2) {
        assert_eq!(w[0].next(16 << 20), w[1], "a gap in {names:?}");
    }
    let last_whole = *whole.last().unwrap();
    for n in names.iter().filter(|n| n.contains(".s")) {
        let (seg, _) = tidemark_engine::postgres::wal::parse_piece(n).unwrap();
        assert!(
            seg > last_whole,
            "piece {n} of a whole segment was left: {names:?}"
        );
    }
    let receive_log = std::fs::read_to_string(cluster.dir.path().join("receive2.log")).unwrap();
    assert!(receive_log.contains("streaming WAL"), "{receive_log}");
    // The window ends at the last streamed transaction, read from the records: within about
    // a second of the crash.
    let o = tidemark(&a.config, &["pg", "window", "--json"]);
    let w: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        w[0]["latest_is"], "the last transaction in the archived WAL ended",
        "{w}"
    );
    let latest: chrono::DateTime<chrono::Utc> = w[0]["latest"].as_str().unwrap().parse().unwrap();
    let latest = latest.timestamp_micros() as f64 / 1e6;
    assert!(
        latest > crash - 2.0 && latest <= crash + 0.5,
        "the last streamed transaction ended {:.2}s before the crash",
        crash - latest
    );

    let got = restore_and_query(
        &mut cluster,
        &a,
        "streamed",
        &["--latest"],
        "SELECT count(*) || ' ' || coalesce(max(id), 0) FROM t",
    );
    let (count, max) = got.split_once(' ').unwrap();
    let (count, max): (u64, u64) = (count.parse().unwrap(), max.parse().unwrap());
    eprintln!(
        "restored {count} rows; committed {due} up to 1 s before the crash, {committed} in all"
    );
    assert_eq!(count, max, "restored rows are not a prefix of the workload");
    assert!(
        count >= due && count <= committed,
        "restored {count} rows; {due} were committed more than 1 s before the crash, {committed} in all"
    );
}

/// A base backup taken from a standby (its last segment comes from the streamer, since a
/// standby does not switch segments), and streaming from that standby across its promotion:
/// the streamer follows timeline 2, and the standby's backup restores to the end of it.
#[test]
fn a_standby_is_backed_up_and_streamed_across_its_promotion() {
    let (mut primary, a) = archiving_cluster(&[]);
    primary.psql(
        "postgres",
        "CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1000)",
    );
    let mut standby = primary.start_standby(&["archive_mode = off"]);
    standby.wait_for(
        "postgres",
        "SELECT count(*) FROM t",
        "1000",
        Duration::from_secs(60),
    );
    let system_id = standby.system_id();
    let mut receiver = start_receiver(&standby, &a, &standby.dir.path().join("receive.log"));
    wait_for_receiver(&standby);
    let v = physical_backup(&standby, &a, "auto");
    assert_eq!(v["snapshot"]["positions"]["pg.timeline"], 1, "{v}");

    // Failover: the primary stops, the standby is promoted and takes writes on timeline 2.
    primary.psql(
        "postgres",
        "INSERT INTO t SELECT generate_series(1001, 1100)",
    );
    standby.wait_for(
        "postgres",
        "SELECT count(*) FROM t",
        "1100",
        Duration::from_secs(60),
    );
    primary.stop("fast");
    standby.promote();
    standby.psql(
        "postgres",
        "INSERT INTO t SELECT generate_series(1101, 1200)",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let names = archived_names(&a, &system_id);
        if names.iter().any(|n| n == "00000002.history")
            && names
                .iter()
                .any(|n| n.starts_with("00000002") && n.len() > 24 && n.contains(".s"))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timeline 2 was not streamed: {names:?}\n{}",
            std::fs::read_to_string(standby.dir.path().join("receive.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A graceful stop stores what was received and exits 0.
    std::thread::sleep(Duration::from_secs(1));
    let term = Command::new("kill")
        .args(["-TERM", &receiver.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = receiver.wait().unwrap();
    let log = std::fs::read_to_string(standby.dir.path().join("receive.log")).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("following the new timeline"), "{log}");

    standby.stop("fast");
    assert_eq!(
        restore_and_query(
            &mut standby,
            &a,
            "failover",
            &["--latest", "--conf", "archive_mode=off"],
            "SELECT count(*) || ' ' || current_setting('archive_mode') FROM t"
        ),
        "1200 off"
    );
}

/// `pg receive` with bad input: each gets a message that names the problem, and nothing is
/// archived.
#[test]
fn pg_receive_explains_wrong_credentials_a_down_server_and_slot_problems() {
    let cluster = Postgres::start(&[]);
    let a = archive(&cluster);
    let good = cluster.write_private("pg-password", tidemark_testkit::SUPERUSER_PASSWORD);
    let wrong = cluster.write_private("wrong-password", "not-the-password\n");
    let receive = |port: u16, pw: &Path, extra: &[&str]| {
        let url = format!("postgresql://postgres@127.0.0.1:{port}/postgres");
        tidemark_pg(&a, &["pg", "receive", "--once"], &url, pw, extra)
    };
    let o = receive(cluster.port, &wrong, &[]);
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("refused the login of user \"postgres\""),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("not-the-password"), "{}", stderr(&o));

    // TLS required of a server without it: said plainly, before any password is sent.
    let o = receive(cluster.port, &good, &["--sslmode", "require"]);
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("does not accept TLS connections"),
        "{}",
        stderr(&o)
    );

    let down = tidemark_testkit::free_port();
    let o = receive(down, &good, &[]);
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("cannot reach PostgreSQL at 127.0.0.1:{down}")),
        "{}",
        stderr(&o)
    );

    let o = receive(cluster.port, &good, &["--slot", "Bad-Name"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(
        stderr(&o).contains("not a valid replication slot name"),
        "{}",
        stderr(&o)
    );

    let o = receive(
        cluster.port,
        &good,
        &["--slot", "missing", "--no-create-slot"],
    );
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("replication slot \"missing\" does not exist"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        cluster.psql("postgres", "SELECT count(*) FROM pg_replication_slots"),
        "0"
    );
    assert!(
        !a.repo.join("logs").exists()
            || std::fs::read_dir(a.repo.join("logs")).unwrap().count() == 0
    );

    // A block that is not whole pages is refused before anything is read.
    let url = format!("postgresql://postgres@127.0.0.1:{}/postgres", cluster.port);
    let o = tidemark(
        &a.config,
        &[
            "pg",
            "backup",
            "--physical",
            "--block-kib",
            "12",
            "--url",
            &url,
            "--pg-password-file",
            good.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not a whole number of 8 KiB pages"),
        "{}",
        stderr(&o)
    );
}

/// tidemark's own connections (queries and replication) and PostgreSQL's tools (pg_dump) over
/// TLS, with libpq's sslmode meanings. The server refuses every TCP connection without TLS,
/// so a success proves the connection was encrypted.
#[test]
fn tls_connections_check_what_sslmode_asks_for() {
    let (cluster, a) = archiving_cluster(&[]);
    let (ca, other_ca) = cluster.enable_tls();
    let pw = cluster.write_private("pg-password", tidemark_testkit::SUPERUSER_PASSWORD);
    let port = cluster.port;
    let backup = |host: &str, query: &str, extra: &[&str]| {
        let url = format!("postgresql://postgres@{host}:{port}/postgres?{query}");
        tidemark_pg(&a, &["pg", "backup", "--json"], &url, &pw, extra)
    };
    let full = format!("sslmode=verify-full&sslrootcert={}", ca.display());
    // A physical backup over the replication protocol, the certificate and name checked.
    let o = backup("127.0.0.1", &full, &["--physical", "--read", "replication"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The default (prefer) encrypts when the server offers TLS; pg_dump gets the same mode.
    let o = backup("127.0.0.1", "", &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // verify-ca checks the chain but not the name: `localhost` is not in the certificate.
    let o = backup(
        "localhost",
        &format!("sslmode=verify-ca&sslrootcert={}", ca.display()),
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    for (host, query, says) in [
        ("localhost", full.clone(), "not valid for name"),
        (
            "127.0.0.1",
            format!("sslmode=verify-full&sslrootcert={}", other_ca.display()),
            "invalid peer certificate",
        ),
        ("127.0.0.1", "sslmode=verify-full".into(), "sslrootcert"),
        (
            "127.0.0.1",
            "sslmode=verify-ca&sslrootcert=/nonexistent/root.crt".into(),
            "/nonexistent/root.crt",
        ),
        ("127.0.0.1", "sslmode=disable".into(), "no encryption"),
    ] {
        let o = backup(host, &query, &[]);
        assert_eq!(o.status.code(), Some(8), "{query}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{query}: {}", stderr(&o));
        assert!(
            !stderr(&o).contains(tidemark_testkit::SUPERUSER_PASSWORD),
            "{}",
            stderr(&o)
        );
    }

    // A role that logs in by client certificate only (pg_hba `cert`): a physical backup over
    // replication and a logical one with pg_dump (given PGSSLCERT/PGSSLKEY), no password.
    cluster.psql(
        "postgres",
        "CREATE ROLE certuser LOGIN REPLICATION; GRANT pg_read_all_data TO certuser",
    );
    let tls = cluster.dir.path().join("tls");
    let (cert, key) = (tls.join("client.crt"), tls.join("client.key"));
    let as_cert = |extra: &[&str]| {
        let url = format!(
            "postgresql://certuser@127.0.0.1:{port}/postgres?sslmode=verify-full&sslrootcert={}",
            ca.display()
        );
        let mut args = vec!["pg", "backup", "--json", "--url", &url];
        args.extend_from_slice(extra);
        tidemark(&a.config, &args)
    };
    let (cert_s, key_s) = (cert.to_str().unwrap(), key.to_str().unwrap());
    for extra in [&["--physical", "--read", "replication"][..], &[]] {
        let o = as_cert(&[&["--sslcert", cert_s, "--sslkey", key_s], extra].concat());
        assert_eq!(o.status.code(), Some(0), "{extra:?}: {}", stderr(&o));
    }
    // Without the certificate the server refuses; a key others may read is refused before
    // it is sent; a certificate without its key is named.
    let o = as_cert(&[]);
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(stderr(&o).contains("certuser"), "{}", stderr(&o));
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let o = as_cert(&["--sslcert", cert_s, "--sslkey", key_s]);
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("may be read by others (mode 644)"),
        "{}",
        stderr(&o)
    );
    let o = as_cert(&["--sslcert", cert_s, "--sslkey", "/nonexistent/client.key"]);
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("/nonexistent/client.key"),
        "{}",
        stderr(&o)
    );
}

/// `pg restore --delta` over a stopped copy of the cluster: refused while the server runs
/// (nothing touched), then rewrites only what changed since the backup, removes the table
/// created after it, and the started server has the backup's rows; pg_control is written
/// last, so the directory never looks whole before it is.
#[test]
fn a_delta_restore_rewrites_what_changed_and_refuses_a_running_server() {
    let (mut cluster, a) = archiving_cluster(&[]);
    cluster.psql(
        "postgres",
        "CREATE TABLE t AS SELECT g AS x, repeat('r', 200) AS pad FROM generate_series(1, 50000) g",
    );
    // Hint bits and the visibility map set now, not by the first reader after the backup
    // (that would change every page of t, and a delta restore would rightly rewrite them).
    cluster.psql("postgres", "VACUUM FREEZE t");
    cluster.psql("postgres", "CHECKPOINT");
    physical_backup(&cluster, &a, "local");
    // After the backup: changes the restore must undo.
    cluster.psql(
        "postgres",
        "UPDATE t SET x = -x WHERE x <= 100; CREATE TABLE extra AS SELECT 1 AS y; CHECKPOINT",
    );
    let dest = cluster.data_dir();
    let control = std::fs::read(dest.join("global/pg_control")).unwrap();
    let o = restore_into(&a, "latest", &dest, &["--delta", "--immediate"]);
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("a server is running in it") && stderr(&o).contains("pg_ctl stop"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read(dest.join("global/pg_control")).unwrap(),
        control,
        "a refused delta restore touched the directory"
    );
    cluster.stop("fast");

    let o = tidemark(
        &a.config,
        &[
            "pg",
            "restore",
            "latest",
            "--json",
            "--start",
            "--delta",
            "--immediate",
            "--pgdata",
            dest.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    cluster.started_elsewhere();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["server"]["outcome"], "promoted", "{v}");
    let d = &v["restore"]["delta"];
    let (kept, written) = (
        d["bytes_kept"].as_u64().unwrap(),
        d["bytes_written"].as_u64().unwrap(),
    );
    // The table's blocks that the update did not touch and every unchanged catalog stay.
    assert!(kept > 4 * written, "{d}");
    assert!(d["removed"].as_u64().unwrap() >= 1, "{d}");
    assert!(v["restore"]["verified"]
        .as_str()
        .unwrap()
        .contains("match the backup manifest"));
    assert_eq!(
        cluster.psql("postgres", "SELECT count(*) FROM t WHERE x < 0"),
        "0"
    );
    assert_eq!(cluster.psql("postgres", "SELECT count(*) FROM t"), "50000");
    assert_eq!(
        cluster.psql("postgres", "SELECT to_regclass('extra') IS NULL"),
        "t"
    );
    cluster.stop("fast");

    // A directory of another cluster is refused, and so is one with no cluster.
    let mut other = Postgres::start(&[]);
    other.stop("fast");
    let o = restore_into(&a, "latest", &other.data_dir(), &["--delta", "--immediate"]);
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(stderr(&o).contains("another cluster"), "{}", stderr(&o));
    let busy = cluster.dir.path().join("not-a-cluster");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("keep"), "x").unwrap();
    let o = restore_into(&a, "latest", &busy, &["--delta", "--immediate"]);
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no PostgreSQL cluster"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);
}
