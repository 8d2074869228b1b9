//! `tidemark agent` against a real PostgreSQL 15 that archives its WAL with `wal-push`:
//! physical and logical schedules every few seconds (queued, not skipped, when they meet),
//! retention that prunes the WAL no kept backup needs, and a restore of the newest backup to
//! the end of the archive that brings back every row; the archive copied to a second location
//! that restores alone; verification restores (logical and physical) in scratch servers.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{get, metric, parse_prometheus, tidemark, try_get, Agent};
use tidemark_testkit::{free_port, Postgres};

const BIN: &str = env!("CARGO_BIN_EXE_tidemark");

fn ok(config: &Path, args: &[&str]) -> String {
    let o = tidemark(config, args);
    assert!(
        o.status.success(),
        "tidemark {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn successes(s: &serde_json::Value, kind: &str) -> u64 {
    s["databases"]["pg"]["kinds"][kind]["successes"]
        .as_u64()
        .unwrap_or(0)
}

/// The names of the files in a repository's WAL archive (none if it has no archive yet).
fn archived(repo: &Path, system_id: &str) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(repo.join(format!("logs/pg/{system_id}/wal")))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// The first position (log and segment number, 16 hex digits) of the WAL segments archived.
fn first_archived(repo: &Path, system_id: &str) -> String {
    archived(repo, system_id)
        .into_iter()
        .filter(|n| n.len() >= 24 && !n.ends_with(".history"))
        .map(|n| n[8..24].to_owned())
        .min()
        .unwrap()
}

/// A repository in the cluster's directory, usable by the postgres user: (the CLI config naming
/// it, the repository, its password file).
fn repository(cluster: &Postgres) -> (PathBuf, PathBuf, PathBuf) {
    let repo = cluster.dir.path().join("repo");
    let password = cluster.write_private("repo-password", "archive secret\n");
    let config = cluster.write_private(
        "tidemark.yaml",
        &format!(
            "repository: {}\npassword_file: {}\n",
            repo.display(),
            password.display()
        ),
    );
    ok(&config, &["init", "-q"]);
    cluster.give(&repo);
    (config, repo, password)
}

fn start_agent(config: &Path, log_path: &Path) -> Agent {
    let log = std::fs::File::create(log_path).unwrap();
    let child = Command::new(BIN)
        .args(["agent", "-v", "--config", config.to_str().unwrap()])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Agent(Some(child))
}

/// Write the agent config with the database section `db` and start the agent: its log file
/// (the same each time) and the process.
fn launch(
    cluster: &Postgres,
    repo: &Path,
    password: &Path,
    port: u16,
    db: &str,
) -> (PathBuf, Agent) {
    let config = agent_yaml(cluster, repo, "", password, port, db);
    let log = cluster.dir.path().join("agent.log");
    let agent = start_agent(&config, &log);
    (log, agent)
}

/// The agent config: the repository at `repo`, then the locations in `more` (YAML list items,
/// each starting with a comma), and the database section `db`.
fn agent_yaml(
    cluster: &Postgres,
    repo: &Path,
    more: &str,
    password: &Path,
    port: u16,
    db: &str,
) -> PathBuf {
    let pg_pw = cluster.write_private("pg-password", tidemark_testkit::SUPERUSER_PASSWORD);
    let state: PathBuf = cluster.dir.path().join("agent-state");
    cluster.write_private(
        "agent.yaml",
        &format!(
            "agent: {{state_dir: {state}, listen: '127.0.0.1:{port}', shutdown_grace: 60s}}
repositories:
  main:
    locations: [{{name: local, url: {repo}}}{more}]
    password_file: {password}
databases:
  pg:
    engine: postgres
    repository: main
    postgres: {{url: 'postgresql://postgres@127.0.0.1:{pgport}/postgres', pg_password_file: {pg_pw}}}
{db}",
            state = state.display(),
            repo = repo.display(),
            password = password.display(),
            pgport = cluster.port,
            pg_pw = pg_pw.display(),
        ),
    )
}

/// Restore into the (stopped) cluster's emptied data directory with `pg restore <args…> --start`
/// and count the rows of `t`.
fn restore_and_count(cluster: &mut Postgres, config: &Path, args: &[&str]) -> String {
    cluster.clear_data_dir();
    let dest = cluster.data_dir();
    let head = ["pg", "restore"];
    let tail = ["--json", "--start", "--pgdata", dest.to_str().unwrap()];
    let o = tidemark(config, &[&head[..], args, &tail[..]].concat());
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    cluster.started_elsewhere();
    cluster.psql("postgres", "SELECT count(*) FROM t")
}

fn status(port: u16) -> serde_json::Value {
    try_get(port, "/status")
        .and_then(|(_, b)| serde_json::from_str(&b).ok())
        .unwrap_or_default()
}

fn wait(
    port: u16,
    log: &Path,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let s = status(port);
        if f(&s) {
            return s;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}: {s:#}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn an_agent_backs_up_postgres_on_schedule_prunes_the_wal_and_the_newest_backup_restores() {
    let (mut cluster, config, repo, password) = archiving_cluster();
    let system_id = cluster.system_id();

    let port = free_port();
    let (log_path, agent) = launch(
        &cluster,
        &repo,
        &password,
        port,
        "    schedules:
      - {kind: physical, cron: '@every 4s'}
      - {kind: logical, cron: '@every 4s'}
    concurrency: queue
    pitr: {mode: archive_command}
    retention: {keep_last: 1}
",
    );

    // Writes between backups, so that each base backup starts in a later WAL segment.
    let mut rows = 100;
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let s: serde_json::Value = try_get(port, "/status")
            .and_then(|(_, b)| serde_json::from_str(&b).ok())
            .unwrap_or_default();
        if successes(&s, "physical") >= 3 && successes(&s, "logical") >= 2 {
            break;
        }
        assert!(
            Instant::now() < end,
            "timed out: {s:#}\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        cluster.psql(
            "postgres",
            "INSERT INTO t SELECT generate_series(1, 100); SELECT pg_switch_wal()",
        );
        rows += 100;
        std::thread::sleep(Duration::from_secs(1));
    }
    // Both kinds fire at the same seconds: with `queue`, neither is skipped.
    let (_, body) = get(port, "/status");
    let s: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        s["databases"]["pg"]["kinds"]["logical"]["skipped"], 0,
        "{s:#}"
    );
    let samples = parse_prometheus(&get(port, "/metrics").1);
    assert!(metric(&samples, "tidemark_backup_last_success_timestamp_seconds").is_some());
    assert!(samples
        .iter()
        .any(|(n, labels, _)| n == "tidemark_snapshots"
            && labels.contains(&("engine".into(), "postgres".into()))));

    let exit = agent.stop(120);
    assert!(exit.success(), "{exit:?}");
    wait_status_gone(port);

    // Retention after the last backup kept one of each kind, and deleted the WAL from before
    // the kept base backup's start.
    let snaps: serde_json::Value =
        serde_json::from_str(&ok(&config, &["snapshots", "--json"])).unwrap();
    let snaps = snaps.as_array().unwrap();
    let physical: Vec<_> = snaps.iter().filter(|s| s["kind"] == "physical").collect();
    let logical: Vec<_> = snaps.iter().filter(|s| s["kind"] == "logical").collect();
    assert_eq!((physical.len(), logical.len()), (1, 1), "{snaps:#?}");
    let start_wal = physical[0]["positions"]["pg.start_wal"].as_str().unwrap();
    let base = physical[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        first_archived(&repo, &system_id),
        start_wal[8..24],
        "WAL before the kept base backup is pruned, and none after it"
    );
    ok(&config, &["check"]);

    // The newest base backup and the archive after it bring back every row.
    cluster.psql("postgres", "INSERT INTO t SELECT generate_series(1, 7)");
    rows += 7;
    cluster.archive_now(Duration::from_secs(60));
    cluster.stop("fast");
    let count = restore_and_count(&mut cluster, &config, &[&base]);
    assert_eq!(count, rows.to_string());
    cluster.stop("fast");
}

#[test]
fn the_wal_archive_is_copied_to_the_second_location_which_restores_alone_to_its_end() {
    let (mut cluster, first_config, repo, password) = archiving_cluster();
    let system_id = cluster.system_id();
    let second = cluster.dir.path().join("second");
    let port = free_port();
    let config = agent_yaml(
        &cluster,
        &repo,
        &format!(", {{name: second, url: {}}}", second.display()),
        &password,
        port,
        "    schedules: [{kind: physical, cron: '@every 3s'}]
    pitr: {mode: archive_command}
",
    );
    let log_path = cluster.dir.path().join("agent.log");
    let agent = start_agent(&config, &log_path);
    wait(port, &log_path, "a base backup", |s| {
        successes(s, "physical") >= 1
    });
    // wal-push archives to the first location only; the agent copies the segment over.
    cluster.psql("postgres", "INSERT INTO t SELECT generate_series(101, 150)");
    let last = cluster.archive_now(Duration::from_secs(60));
    let segments = |repo: &Path| archived(repo, &system_id);
    let end = Instant::now() + Duration::from_secs(120);
    while !segments(&second).iter().any(|n| n.starts_with(&last)) {
        assert!(
            Instant::now() < end,
            "segment {last} never reached the second location: {:?}\n{}",
            segments(&second),
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(agent.stop(120).success());
    // Every segment up to that one is there (the archive may have grown since the last copy).
    let upto = |repo: &Path| -> Vec<String> {
        segments(repo)
            .into_iter()
            .filter(|n| n.len() == 24 && *n <= last)
            .collect()
    };
    assert_eq!(upto(&second), upto(&repo));
    assert!(upto(&repo).len() >= 2, "{:?}", segments(&repo));

    cluster.stop("fast");
    cluster.give(&second);
    let cli = cluster.write_private(
        "second.yaml",
        &format!(
            "repository: {}\npassword_file: {}\n",
            second.display(),
            password.display()
        ),
    );
    ok(&cli, &["check", "--read-data"]);
    // The first base backup, from before rows 101 to 150: they come from the copied WAL.
    let snaps: serde_json::Value =
        serde_json::from_str(&ok(&cli, &["snapshots", "--json"])).unwrap();
    let first = snaps
        .as_array()
        .unwrap()
        .iter()
        .min_by_key(|s| s["time"].as_str().unwrap().to_owned())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The first location damaged (every pack) and missing the segment with rows 101 to 150:
    // with the second to fall back on, the base backup and the WAL still bring back every row.
    common::corrupt_packs(&repo);
    std::fs::remove_file(repo.join(format!("logs/pg/{system_id}/wal/{last}"))).unwrap();
    let fallback = ["--fallback", second.to_str().unwrap()];
    let count = restore_and_count(
        &mut cluster,
        &first_config,
        &[&[first.as_str(), "--latest"][..], &fallback[..]].concat(),
    );
    assert_eq!(count, "150");
    cluster.stop("fast");

    // The second location alone brings back every row: its base backup and its copied WAL.
    std::fs::remove_dir_all(&repo).unwrap();
    let count = restore_and_count(&mut cluster, &cli, &[&first, "--latest"]);
    assert_eq!(count, "150");
    cluster.stop("fast");
}

fn wait_status_gone(port: u16) {
    for _ in 0..50 {
        if try_get(port, "/healthz").is_none() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the agent still answers after it exited");
}

#[test]
fn the_agent_streams_wal_restarts_the_streamer_after_a_failure_and_reports_the_lag() {
    let mut cluster = Postgres::start(&[]);
    let (config, repo, password) = repository(&cluster);
    cluster.psql("postgres", "CREATE TABLE t(id int)");
    let port = free_port();
    let (log, agent) = launch(
        &cluster,
        &repo,
        &password,
        port,
        "    schedules: [{kind: physical, cron: '@every 5s'}]
    pitr: {mode: streaming, slot: agent_slot}
",
    );
    wait(port, &log, "a base backup and a measured lag", |s| {
        let d = &s["databases"]["pg"];
        d["kinds"]["physical"]["successes"].as_u64().unwrap_or(0) >= 1
            && d["wal"]["up"] == true
            && d["wal"]["lag_bytes"].is_u64()
    });
    cluster.psql("postgres", "INSERT INTO t SELECT generate_series(1, 1000)");

    // Cut the replication connection: the agent restarts the streamer.
    assert_eq!(
        cluster.psql(
            "postgres",
            "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots WHERE slot_name = 'agent_slot'"
        ),
        "1"
    );
    wait(port, &log, "a restart", |s| {
        s["databases"]["pg"]["wal"]["restarts"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    });
    cluster.psql("postgres", "INSERT INTO t SELECT generate_series(1, 1000)");
    let s = wait(port, &log, "the streamer back and caught up", |s| {
        let w = &s["databases"]["pg"]["wal"];
        w["up"] == true
            && w["lag_bytes"].as_u64().is_some_and(|b| b < 64 * 1024)
            && w["measured"].as_str().is_some()
    });
    assert!(
        s["databases"]["pg"]["wal"]["last_error"].is_string(),
        "{s:#}"
    );
    let samples = parse_prometheus(&get(port, "/metrics").1);
    assert!(metric(&samples, "tidemark_wal_archive_lag_bytes").is_some());
    assert!(metric(&samples, "tidemark_wal_streamer_restarts_total").unwrap() >= 1.0);
    assert_eq!(metric(&samples, "tidemark_wal_streamer_up"), Some(1.0));

    // Rows committed a second before the crash come back from the streamed WAL.
    std::thread::sleep(Duration::from_secs(2));
    assert!(agent.stop(120).success());
    cluster.stop("immediate");
    let count = restore_and_count(&mut cluster, &config, &["latest", "--latest"]);
    assert_eq!(count, "2000");
    cluster.stop("fast");
}

#[test]
fn verification_restores_a_logical_backup_into_a_scratch_server_and_compares_every_table() {
    let cluster = Postgres::start(&[]);
    let (_, repo, password) = repository(&cluster);
    // Types whose text depends on session settings, a second schema, NULLs, a wide table; the
    // database's own time zone is not UTC.
    cluster.psql(
        "postgres",
        "ALTER DATABASE postgres SET timezone TO 'Asia/Tokyo';
         CREATE TABLE t(id int PRIMARY KEY, at timestamptz, d date, iv interval, f float8,
                        n numeric, b bytea, j jsonb, s text);
         INSERT INTO t SELECT i, '2026-01-01 00:00:00+00'::timestamptz + i * interval '1 hour',
                date '2026-01-01' + i, i * interval '1 minute', i / 3.0, i * 1.5, sha256(i::text::bytea),
                jsonb_build_object('i', i), CASE WHEN i % 7 = 0 THEN NULL ELSE repeat('x', i % 50) END
           FROM generate_series(1, 1000) i;
         CREATE SCHEMA other; CREATE TABLE other.\"Mixed Case\"(k text); INSERT INTO other.\"Mixed Case\" VALUES ('a'), (NULL);",
    );
    let port = free_port();
    let (log_path, agent) = launch(
        &cluster,
        &repo,
        &password,
        port,
        "    schedules: [{kind: logical, cron: '@every 3s'}]
    verification:
      cron: '@every 5s'
      queries: [{sql: 'SELECT count(*) FROM t', expect: '1000'}]
",
    );
    let s = wait(port, &log_path, "a verification", |s| {
        s["databases"]["pg"]["verification"]["ok"].is_boolean()
    });
    let v = &s["databases"]["pg"]["verification"];
    assert_eq!(v["ok"], true, "{v:#}");
    let checks = v["checks"].to_string();
    assert!(
        checks.contains("2 tables, 1002 rows: counts and checksums match the backup"),
        "{checks}"
    );
    assert!(checks.contains("SELECT count(*) FROM t"), "{checks}");
    assert!(v["rto_seconds"].as_f64().unwrap() > 0.0, "{v:#}");

    let exit = agent.stop(60);
    assert!(exit.success(), "{exit:?}");
    wait_status_gone(port);

    // Every pack damaged, and no new backup (each dump is one new chunk): the next
    // verification fails, loudly, and the server is untouched.
    common::corrupt_packs(&repo);
    let (_, agent) = launch(
        &cluster,
        &repo,
        &password,
        port,
        "    schedules: [{kind: logical, cron: '@every 1h'}]
    verification: {cron: '@every 2s'}
",
    );
    let verified = v["started"].as_str().unwrap().to_owned();
    let s = wait(port, &log_path, "a failed verification", |s| {
        let v = &s["databases"]["pg"]["verification"];
        v["ok"] == false && v["started"].as_str() != Some(&verified)
    });
    let err = s["databases"]["pg"]["verification"]["error"].to_string();
    assert!(err.contains("restore"), "{err}");
    let samples = parse_prometheus(&get(port, "/metrics").1);
    assert_eq!(metric(&samples, "tidemark_verification_success"), Some(0.0));
    assert_eq!(cluster.psql("postgres", "SELECT count(*) FROM t"), "1000");
    let exit = agent.stop(60);
    assert!(exit.success(), "{exit:?}");
    // No scratch server of this agent is left running (other tests run their own at the same
    // time, so the pattern names this agent's state directory).
    let scratch = cluster.dir.path().join("agent-state");
    let left = Command::new("pgrep")
        .args(["-f", &format!("{}/.*tidemark-verify-", scratch.display())])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "a scratch server still runs: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    // And nothing of the passed and failed runs is left in the scratch space (issue #15).
    let files: Vec<_> = std::fs::read_dir(scratch.join("verify"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(files.is_empty(), "verification left {files:?}");
}

/// A cluster archiving its WAL into a new repository with `wal-push`, with a table `t` of 100
/// rows.
fn archiving_cluster() -> (Postgres, PathBuf, PathBuf, PathBuf) {
    let cluster = Postgres::start(&["archive_mode = on", "archive_command = ''"]);
    let (config, repo, password) = repository(&cluster);
    cluster.psql(
        "postgres",
        &format!(
            "ALTER SYSTEM SET archive_command = 'TIDEMARK_CONFIG={} {BIN} wal-push -q %p'",
            config.display()
        ),
    );
    cluster.psql("postgres", "SELECT pg_reload_conf()");
    cluster.psql(
        "postgres",
        "CREATE TABLE t(id int); INSERT INTO t SELECT generate_series(1, 100)",
    );
    (cluster, config, repo, password)
}

fn verification_rows(s: &serde_json::Value) -> Option<u64> {
    let v = &s["databases"]["pg"]["verification"];
    if v["ok"] != true {
        return None;
    }
    v["checks"].as_array()?.iter().find_map(|c| {
        let c = c.as_str()?;
        let (head, _) = c.split_once(" rows of database \"postgres\" read in full")?;
        head.rsplit(' ').next()?.parse().ok()
    })
}

#[test]
fn verification_restores_a_base_backup_and_the_archive_to_its_end_and_finds_a_gap() {
    let (cluster, _, repo, password) = archiving_cluster();
    let port = free_port();
    let (log_path, agent) = launch(
        &cluster,
        &repo,
        &password,
        port,
        "    schedules: [{kind: physical, cron: '@every 3s'}]
    pitr: {mode: archive_command}
    verification: {cron: '@every 4s', queries: [{sql: 'SELECT min(id) FROM t', expect: '1'}]}
",
    );
    wait(port, &log_path, "a base backup", |s| {
        successes(s, "physical") >= 1
    });
    // Rows written after the base backup come back: the restore goes to the archive's end.
    cluster.psql("postgres", "INSERT INTO t SELECT generate_series(101, 150)");
    cluster.archive_now(Duration::from_secs(60));
    let s = wait(port, &log_path, "a verification that saw 150 rows", |s| {
        verification_rows(s) == Some(150)
    });
    let v = &s["databases"]["pg"]["verification"];
    let checks = v["checks"].to_string();
    assert!(checks.contains("fetched and verified"), "{checks}");
    assert!(
        checks.contains("recovered to the end of the archived WAL"),
        "{checks}"
    );
    assert!(checks.contains("SELECT min(id) FROM t"), "{checks}");
    assert!(v["point"].is_string(), "{v:#}");
    let exit = agent.stop(60);
    assert!(exit.success(), "{exit:?}");
    wait_status_gone(port);

    // Three more segments after the newest base backup, and no new base backup: the
    // verification replays them all.
    for i in 0..3 {
        cluster.psql("postgres", &format!("INSERT INTO t VALUES ({})", 1000 + i));
        cluster.archive_now(Duration::from_secs(60));
    }
    let agent_config = agent_yaml(
        &cluster,
        &repo,
        "",
        &password,
        port,
        "    schedules: [{kind: physical, cron: '@every 1h'}]
    pitr: {mode: archive_command}
    verification: {cron: '@every 2s'}
",
    );
    let agent = start_agent(&agent_config, &log_path);
    wait(port, &log_path, "a verification that saw 153 rows", |s| {
        verification_rows(s) == Some(153)
    });
    let exit = agent.stop(60);
    assert!(exit.success(), "{exit:?}");
    wait_status_gone(port);

    // The middle one of those segments disappears from the archive. Recovery would stop
    // there: the verification says so.
    let system_id = cluster.system_id();
    let dir = repo.join(format!("logs/pg/{system_id}/wal"));
    let mut segments: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24)
        .collect();
    segments.sort();
    let gone = &segments[segments.len() - 2];
    std::fs::remove_file(dir.join(gone)).unwrap();
    let agent = start_agent(&agent_config, &log_path);
    let s = wait(port, &log_path, "a failed verification", |s| {
        s["databases"]["pg"]["verification"]["ok"] == false
    });
    let err = s["databases"]["pg"]["verification"]["error"].to_string();
    assert!(
        err.contains("recovery stopped at") && err.contains("missing"),
        "{err}"
    );
    // The gap is in the status and on the timeline page, with the verified points.
    let s = wait(port, &log_path, "the gap in the status", |s| {
        s["databases"]["pg"]["wal"]["gaps"]
            .as_array()
            .is_some_and(|g| !g.is_empty())
    });
    assert_eq!(
        s["databases"]["pg"]["wal"]["gaps"][0]["first_missing"],
        gone.as_str(),
        "{s:#}"
    );
    let (code, page) = get(port, "/");
    assert_eq!(code, 200);
    assert!(page.contains(&format!("data-gap=\"{gone}\"")), "{page}");
    assert!(
        page.contains("class=\"verified ok\"") && page.contains("class=\"verified failed\""),
        "{page}"
    );
    let exit = agent.stop(60);
    assert!(exit.success(), "{exit:?}");
    assert_eq!(cluster.psql("postgres", "SELECT count(*) FROM t"), "153");
}

#[test]
fn a_scratch_server_left_by_a_killed_agent_is_stopped_and_removed_at_the_next_start() {
    let cluster = Postgres::start(&[]);
    let (_, repo, password) = repository(&cluster);
    // What a verification leaves when the agent is killed in mid-restore: a running scratch
    // server in state_dir/verify (made here with the same code, then never stopped).
    let verify_dir = cluster.dir.path().join("agent-state/verify");
    let o = tidemark_engine::postgres::scratch::ScratchOptions {
        bin_dir: tidemark_testkit::pg_bin(),
        os_user: tidemark_engine::postgres::start::server_os_user(None),
        parent: verify_dir.clone(),
        timeout: Duration::from_secs(60),
    };
    let leftover = tidemark_engine::postgres::scratch::Scratch::init(&o).unwrap();
    let data = leftover.data_dir().to_path_buf();
    let pid: u32 = std::fs::read_to_string(data.join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::mem::forget(leftover);
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    let port = free_port();
    let (log_path, agent) = launch(
        &cluster,
        &repo,
        &password,
        port,
        "    schedules: [{kind: logical, cron: '@every 1h'}]\n",
    );
    wait(port, &log_path, "the agent ready", |s| s["ready"] == true);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the leftover server still runs"
    );
    assert!(!data.exists(), "the leftover directory is still there");
    let exit = agent.stop(30);
    assert!(exit.success(), "{exit:?}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("left by an agent that stopped abruptly"),
        "{log}"
    );
}
