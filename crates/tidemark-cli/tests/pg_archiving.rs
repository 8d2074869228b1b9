//! Archiving faults that could stop or skip WAL without a word, each against a real
//! PostgreSQL 15: records that end exactly on page and segment boundaries, a repository
//! created again at the same place, and a prefetcher that must not outlive recovery.

use std::path::Path;
use std::time::Duration;

use common::pg::*;
use common::tidemark;
use tidemark_testkit::Postgres;

mod common;

/// `end_at(boundary)`: emit a logical message sized so that its record ends exactly at the
/// next multiple of `boundary` bytes (a page or a segment end). Its record is 55 bytes plus
/// the message (header 24, main-data length 5, xl_logical_message 24, the prefix "p" and its
/// NUL), and every page it crosses adds a 24-byte header. Retried when other WAL slipped in.
const END_AT: &str = "
CREATE FUNCTION end_at(boundary bigint) RETURNS pg_lsn LANGUAGE plpgsql AS $$
DECLARE l bigint; e bigint; k bigint; n bigint; r pg_lsn;
BEGIN
  FOR i IN 1..10 LOOP
    l := (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint;
    e := (l / boundary + 1) * boundary;
    k := (e - 1) / 8192 - l / 8192;
    n := e - l - 24 * k - 55;
    IF n < 300 THEN
      PERFORM pg_logical_emit_message(false, 'p', repeat('y', 400));
      CONTINUE;
    END IF;
    r := pg_logical_emit_message(false, 'p', repeat('z', n::int));
    IF (r - '0/0'::pg_lsn)::bigint = e THEN RETURN r; END IF;
  END LOOP;
  RAISE EXCEPTION 'no record ended at a boundary of %', boundary;
END $$";

#[test]
fn records_ending_on_page_and_segment_boundaries_are_archived_without_a_failure() {
    let (cluster, a) = archiving_cluster(&[]);
    cluster.psql("postgres", END_AT);
    cluster.psql("postgres", "CREATE TABLE t (id int, pad text)");
    physical_backup(&cluster, &a, "local");
    // Four segments end exactly with a record (wal-push used to panic on the first and
    // PostgreSQL then retried it for ever), one page does, and rows follow each.
    let seg: u64 = 16 << 20;
    for i in 1..=4 {
        let end = cluster.psql("postgres", &format!("SELECT end_at({seg})"));
        let lsn = tidemark_engine::postgres::wal::parse_lsn(&end).unwrap();
        assert_eq!(lsn % seg, 0, "{end}");
        cluster.psql(
            "postgres",
            &format!("INSERT INTO t SELECT g, repeat('r', 300) FROM generate_series({i} * 100 - 99, {i} * 100) g"),
        );
        if i == 2 {
            let end = cluster.psql("postgres", "SELECT end_at(8192)");
            let lsn = tidemark_engine::postgres::wal::parse_lsn(&end).unwrap();
            assert_eq!(lsn % 8192, 0, "{end}");
            cluster.psql("postgres", "INSERT INTO t VALUES (0, 'after a page end')");
        }
    }
    cluster.archive_now(Duration::from_secs(120));
    let (archived, failed) = cluster
        .psql(
            "postgres",
            "SELECT archived_count || ' ' || failed_count FROM pg_stat_archiver",
        )
        .split_once(' ')
        .map(|(a, f)| (a.parse::<u64>().unwrap(), f.parse::<u64>().unwrap()))
        .unwrap();
    assert_eq!(failed, 0, "archive_command failed {failed} times");
    assert!(archived >= 5, "{archived} archived");

    // The archive has no gap, and recovery to its end brings back every row; the restored
    // cluster, out of recovery with archiving off, holds nothing of ours.
    let o = tidemark(&a.config, &["pg", "window", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let window: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let wal = &window[0]["wal"];
    assert_eq!(wal.as_array().map(Vec::len), Some(1), "{window}");
    assert_eq!(wal[0]["gaps"], serde_json::json!([]), "{window}");
    assert!(wal[0]["segments"].as_u64().unwrap() >= 5, "{window}");
    let beside = cluster.dir.path().join("beside");
    let port = tidemark_testkit::free_port().to_string();
    let o = restore_into(
        &a,
        "latest",
        &beside,
        &[
            "--latest",
            "--start",
            "--start-port",
            &port,
            "--conf",
            "archive_mode=off",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        query_and_stop(&cluster, &beside, &port, "SELECT count(*) FROM t"),
        "401"
    );
    std::fs::remove_dir_all(&beside).expect("nothing writes into a stopped restored cluster");
}

/// Real segments of `cluster`, copied into `dir` as PostgreSQL leaves them for
/// archive_command: the files, and a `.ready` mark for each in archive_status.
fn ready_segments(cluster: &Postgres, dir: &Path, n: usize) -> Vec<String> {
    cluster.psql("postgres", "CREATE TABLE w (x int)");
    for _ in 0..n + 2 {
        cluster.psql("postgres", "INSERT INTO w SELECT generate_series(1, 1000)");
        cluster.psql("postgres", "SELECT pg_switch_wal()");
    }
    let current = cluster.psql("postgres", "SELECT pg_walfile_name(pg_current_wal_lsn())");
    let pg_wal = cluster.data_dir().join("pg_wal");
    let mut names: Vec<String> = std::fs::read_dir(&pg_wal)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && *n < current)
        .collect();
    names.sort();
    assert!(names.len() >= n, "{current}: {names:?}");
    let names = names.split_off(names.len() - n);
    std::fs::create_dir_all(dir.join("archive_status")).unwrap();
    for name in &names {
        std::fs::copy(pg_wal.join(name), dir.join(name)).unwrap();
        std::fs::write(dir.join("archive_status").join(format!("{name}.ready")), "").unwrap();
    }
    names
}

#[test]
fn a_repository_created_again_at_the_same_place_gets_every_segment() {
    let cluster = Postgres::start(&[]);
    let a = archive(&cluster);
    let system_id = cluster.system_id();
    let wal = cluster.dir.path().join("wal");
    let names = ready_segments(&cluster, &wal, 3);
    let push = |name: &str| {
        let o = tidemark(&a.config, &["wal-push", wal.join(name).to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
    };
    // The first call archives the other two ahead and records them in its spool.
    push(&names[0]);
    assert_eq!(archived_names(&a, &system_id), names);
    // The repository is deleted and created again at the same path: PostgreSQL then asks
    // for the segments archived ahead (and, after a retry, the first), and each must reach
    // the new repository, not be skipped as "already pushed".
    std::fs::remove_dir_all(&a.repo).unwrap();
    let o = tidemark(&a.config, &["init", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for name in &names {
        push(name);
    }
    assert_eq!(archived_names(&a, &system_id), names);
    // Records of segments PostgreSQL no longer has are dropped, for the old repository as
    // for the new one; what is left is the new repository's records of segments still there.
    std::fs::remove_file(wal.join(&names[0])).unwrap();
    push(&names[2]);
    let records: Vec<String> = walk(&wal.join("tidemark-spool"));
    assert!(records.iter().any(|r| r == "repositories"), "{records:?}");
    assert!(
        records.iter().all(|r| !r.contains(&names[0])),
        "{records:?}"
    );
    for name in &names[1..] {
        assert!(
            records.iter().any(|r| r.ends_with(&format!("/{name}.ok"))),
            "{records:?}"
        );
    }
}

/// Every file under `dir`, as paths relative to it.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(
                walk(&p)
                    .into_iter()
                    .map(|n| format!("{}/{n}", e.file_name().to_string_lossy())),
            );
        } else {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}
