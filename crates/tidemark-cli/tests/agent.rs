//! `tidemark agent` end to end with SQLite: schedules every few seconds, retention, the HTTP
//! interface (Prometheus text checked by a parser), a SIGKILL in mid-backup and a restart,
//! a second agent refused, and configuration errors. PostgreSQL runs are in agent_pg.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{get, metric, parse_prometheus, try_get, Agent};
use tidemark_testkit::free_port;

struct Env {
    dir: tempfile::TempDir,
    port: u16,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("password"), "correct horse\n").unwrap();
        Env {
            dir,
            port: free_port(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tidemark"));
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("TIDEMARK_REPOSITORY", self.path("repo"))
            .env("TIDEMARK_PASSWORD_FILE", self.path("password"))
            .stdin(Stdio::null());
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.cmd(args).output().unwrap();
        assert!(
            o.status.success(),
            "tidemark {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Write the agent config with one SQLite database.
    fn config(&self, name: &str, schedule: &str, extra_location: &str, extra_db: &str) -> PathBuf {
        let text = format!(
            "agent:
  state_dir: {state}
  listen: 127.0.0.1:{port}
  shutdown_grace: 2s
repositories:
  main:
    locations:
      - {{name: local, url: {repo}{extra_location}}}
    password_file: {pw}
databases:
  app:
    engine: sqlite
    repository: main
    sqlite: {{path: {db}}}
    schedules: [{{kind: physical, cron: '{schedule}'}}]
{extra_db}",
            state = self.path("state").display(),
            port = self.port,
            repo = self.path("repo").display(),
            pw = self.path("password").display(),
            db = self.path("app.db").display(),
        );
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn start_agent(&self, config: &Path) -> Agent {
        let log = std::fs::File::create(self.path("agent.log")).unwrap();
        let child = self
            .cmd(&["agent", "-v", "--config", config.to_str().unwrap()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Agent(Some(child))
    }

    fn get(&self, path: &str) -> (u16, String) {
        get(self.port, path)
    }

    /// Poll /status until `f` holds.
    fn wait_for(
        &self,
        what: &str,
        secs: u64,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) =
                try_get(self.port, "/status").and_then(|(_, b)| serde_json::from_str(&b).ok())
            {
                if f(&s) {
                    return s;
                }
                if Instant::now() > end {
                    panic!(
                        "timed out waiting for {what}; status: {s:#}\nlog:\n{}",
                        self.log()
                    );
                }
            } else if Instant::now() > end {
                panic!(
                    "timed out waiting for {what}; the agent does not answer\nlog:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    /// Stop the agent with SIGTERM (waiting up to `secs`) and require a clean exit.
    fn stop(&self, agent: Agent, secs: u64) {
        let exit = agent.stop(secs);
        assert!(exit.success(), "{exit:?}\n{}", self.log());
    }

    fn snapshots(&self) -> Vec<serde_json::Value> {
        serde_json::from_str::<serde_json::Value>(&self.ok(&["snapshots", "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
}

fn make_db(path: &Path, rows: usize, blob: usize) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);")
        .unwrap();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let tx = c.unchecked_transaction().unwrap();
    for i in 0..rows {
        let v: Vec<u8> = (0..blob)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        tx.execute(
            "INSERT INTO t VALUES (?1, ?2)",
            rusqlite::params![i as i64, v],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

fn count_rows(path: &Path) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

fn successes(s: &serde_json::Value) -> u64 {
    s["databases"]["app"]["kinds"]["physical"]["successes"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn an_agent_backs_up_sqlite_every_few_seconds_keeps_its_retention_and_reports_it() {
    let env = Env::new();
    env.ok(&["init"]);
    make_db(&env.path("app.db"), 500, 200);
    let config = env.config(
        "agent.yaml",
        "@every 2s",
        "",
        "    retention: {keep_last: 3}\n",
    );
    let agent = env.start_agent(&config);
    let status = env.wait_for("four backups", 60, |s| successes(s) >= 4);
    let db = &status["databases"]["app"];
    assert_eq!(db["engine"], "sqlite");
    assert!(db["kinds"]["physical"]["last_success"]["snapshot"].is_string());
    assert!(db["kinds"]["physical"]["next_run"].is_string());
    // The plan is in the status before retention acts: what stays and why.
    let plan = db["retention_plan"].to_string();
    assert!(
        plan.contains("keep snapshot") && plan.contains("last 3"),
        "{plan}"
    );
    // Retention ran after each backup: never more than three snapshots of the database.
    let snaps = env.snapshots();
    assert!(snaps.len() <= 3 && !snaps.is_empty(), "{snaps:?}");
    assert!(
        snaps.iter().all(|s| s["tags"][0] == "tidemark.db=app"),
        "{snaps:?}"
    );

    let (code, text) = env.get("/metrics");
    assert_eq!(code, 200);
    let samples = parse_prometheus(&text);
    assert_eq!(metric(&samples, "tidemark_agent_ready"), Some(1.0));
    assert!(metric(&samples, "tidemark_backup_success_total").unwrap() >= 4.0);
    for family in [
        "tidemark_backup_last_success_timestamp_seconds",
        "tidemark_backup_last_duration_seconds",
        "tidemark_backup_last_read_bytes",
        "tidemark_backup_next_run_timestamp_seconds",
        "tidemark_recoverable_first_timestamp_seconds",
        "tidemark_recoverable_last_timestamp_seconds",
    ] {
        let s = samples
            .iter()
            .find(|s| s.0 == family)
            .unwrap_or_else(|| panic!("no {family}:\n{text}"));
        assert!(s.1.contains(&("database".into(), "app".into())), "{s:?}");
    }
    assert_eq!(env.get("/healthz").0, 200);
    assert_eq!(env.get("/readyz").0, 200);
    assert_eq!(env.get("/nothing").0, 404);

    let out = env.ok(&["status", "--config", config.to_str().unwrap()]);
    assert!(
        out.contains("app (sqlite, repository main)") && out.contains("physical     ok"),
        "{out}"
    );
    assert!(out.contains("recoverable: "), "{out}");
    assert!(out.contains("retention plan: keep snapshot"), "{out}");
    // Issue #15 point 11: each removal says whether it is planned or done.
    for l in out.lines().filter(|l| l.contains("remove")) {
        assert!(
            l.contains("retention plan: would remove") || l.contains("retention done: removed"),
            "{l}"
        );
    }

    // The newest snapshot restores to the same rows.
    let id = env.snapshots().last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let dest = env.path("restored.db");
    env.ok(&["restore", &id, "--target", dest.to_str().unwrap()]);
    assert_eq!(count_rows(&dest), 500);

    env.stop(agent, 20);
}

#[test]
fn an_agent_killed_in_mid_backup_leaves_no_snapshot_and_catches_up_after_a_restart() {
    let env = Env::new();
    env.ok(&["init"]);
    // 24 MiB of incompressible rows, uploaded at 2 MiB/s: the backup takes about 12 s.
    make_db(&env.path("app.db"), 6000, 4000);
    let slow = env.config("slow.yaml", "@every 3s", ", limit_upload: 2M", "");
    let agent = env.start_agent(&slow);
    env.wait_for("a running backup", 30, |s| {
        s["databases"]["app"]["running"].is_object()
    });
    // A firing while the backup runs is skipped (concurrency: skip) and counted.
    env.wait_for("a skipped firing", 30, |s| {
        s["databases"]["app"]["kinds"]["physical"]["skipped"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    });
    agent.kill9();
    let first_log = env.log();
    let state = std::fs::read_to_string(env.path("state/state.json")).unwrap_or_default();
    // Nothing half-visible: no snapshot, and the repository checks clean.
    assert!(env.snapshots().is_empty(), "{:?}", env.snapshots());
    env.ok(&["check"]);

    // Restarted without the limit, the agent catches up the missed run at once.
    let fast = env.config("fast.yaml", "@every 3s", "", "");
    let agent = env.start_agent(&fast);
    env.wait_for("a backup after the restart", 60, |s| successes(s) >= 1);
    assert!(
        env.log()
            .contains("catching up a run missed while the agent was down"),
        "{first_log}\n{state}\n{}",
        env.log()
    );
    env.ok(&["check", "--read-data"]);
    let id = env.snapshots()[0]["id"].as_str().unwrap().to_owned();
    let dest = env.path("restored.db");
    env.ok(&["restore", &id, "--target", dest.to_str().unwrap()]);
    assert_eq!(count_rows(&dest), 6000);
    env.stop(agent, 30);
}

#[test]
fn a_second_agent_for_the_same_database_is_refused() {
    let env = Env::new();
    env.ok(&["init"]);
    make_db(&env.path("app.db"), 10, 10);
    let config = env.config("agent.yaml", "@every 1h", "", "");
    let agent = env.start_agent(&config);
    env.wait_for("the agent", 30, |s| s["ready"] == true);

    // The same config (same state directory): held by the first.
    let o = env
        .cmd(&["agent", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("another agent (pid") && err.contains("state directory"),
        "{err}"
    );

    // Another state directory and port, the same database and repository.
    let other = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            &env.path("state").display().to_string(),
            &env.path("state2").display().to_string(),
        )
        .replace(&format!(":{}", env.port), &format!(":{}", free_port()));
    std::fs::write(env.path("other.yaml"), other).unwrap();
    let o = env
        .cmd(&[
            "agent",
            "--config",
            env.path("other.yaml").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("another agent already protects database \"app\""),
        "{err}"
    );
    env.stop(agent, 20);
    // Once the first has stopped, the second may start.
    let second = env.start_agent(&env.path("other.yaml"));
    let mut env2 = env;
    env2.port = serde_yaml_port(&env2.path("other.yaml"));
    env2.wait_for("the second agent", 30, |s| s["ready"] == true);
    assert!(second.stop(20).success());
}

fn serde_yaml_port(config: &Path) -> u16 {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text.lines().find(|l| l.contains("listen:")).unwrap();
    line.rsplit(':').next().unwrap().trim().parse().unwrap()
}

fn check(env: &Env, yaml: &str) -> Output {
    std::fs::write(env.path("bad.yaml"), yaml).unwrap();
    env.cmd(&[
        "agent",
        "--check",
        "--config",
        env.path("bad.yaml").to_str().unwrap(),
    ])
    .output()
    .unwrap()
}

#[test]
fn configuration_errors_name_the_field_and_what_to_do() {
    let env = Env::new();
    let good = std::fs::read_to_string(env.config("agent.yaml", "0 2 * * *", "", "")).unwrap();
    let o = check(&env, &good);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    for (from, to, says) in [
        (
            "'0 2 * * *'",
            "'0 2 * * * * *'",
            "databases.app.schedules[0].cron: \"0 2 * * * * *\" has 7 fields",
        ),
        (
            "kind: physical",
            "kind: logical",
            "databases.app.schedules[0].kind: the Sqlite engine cannot take logical backups",
        ),
        (
            "repository: main",
            "repository: other",
            "databases.app.repository: no repository named \"other\"; defined: main",
        ),
        (
            "engine: sqlite",
            "engine: oracle",
            "unknown variant `oracle`",
        ),
        (
            "shutdown_grace: 2s",
            "shutdown_grace: 2",
            "2 has no unit; write 2s",
        ),
        (
            "schedules: [",
            "location_retention: {offsite: {keep_last: 2}}\n    schedules: [",
            "databases.app.location_retention.offsite: repository \"main\" has no location \"offsite\"; use one of \"local\"",
        ),
    ] {
        assert!(good.contains(from), "{from}");
        let o = check(&env, &good.replacen(from, to, 1));
        assert_eq!(o.status.code(), Some(2), "{to}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says), "{to}: {err}");
        assert!(err.contains("hint: fix the fields named above"), "{err}");
    }
    // Two problems: one per line, as docs/agent.md shows, not flattened onto one.
    let o = check(
        &env,
        &good.replacen("'0 2 * * *'", "'0 2 * * * * *'", 1).replacen(
            "repository: main",
            "repository: other",
            1,
        ),
    );
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.trim_start().starts_with("databases.app.repository:"))
            && lines.iter().any(|l| l
                .trim_start()
                .starts_with("databases.app.schedules[0].cron:")),
        "{err}"
    );
    let o = env.cmd(&["agent"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--config"));
}

#[test]
fn failures_recoveries_and_a_stale_database_are_notified_once_each_and_the_url_stays_secret() {
    let env = Env::new();
    env.ok(&["init"]);
    // The first POST gets a 500: delivery must retry.
    let hooks = common::Receiver::start(1);
    std::fs::write(
        env.path("hook-url"),
        format!("http://127.0.0.1:{}/hook/secret-token-4711\n", hooks.port),
    )
    .unwrap();
    std::fs::write(
        env.path("slack-url"),
        format!("http://127.0.0.1:{}/slack/secret-token-4712\n", hooks.port),
    )
    .unwrap();
    // No database file yet: every backup fails.
    let config = env.config(
        "agent.yaml",
        "@every 1s",
        "",
        &format!(
            "    retry: {{attempts: 2, backoff: 1s}}
    notify: [hook, slack]
    alert_after: 3s
notifications:
  hook: {{kind: webhook, url_file: {}, min_interval: 1h}}
  slack: {{kind: slack, url_file: {}, min_interval: 1h}}
",
            env.path("hook-url").display(),
            env.path("slack-url").display()
        ),
    );
    let agent = env.start_agent(&config);
    let events = |prefix: &str| -> Vec<String> {
        hooks
            .bodies(prefix)
            .iter()
            .map(|b| b["event"].as_str().unwrap_or("slack").to_owned())
            .collect()
    };
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let end = Instant::now() + Duration::from_secs(60);
        while !f() {
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}: {:?}\n{}",
                hooks.bodies(""),
                env.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait("the stale alert", &|| {
        events("/hook").contains(&"no_recent_backup".to_owned())
    });
    let failures = env.wait_for("several failures", 30, |s| {
        s["databases"]["app"]["kinds"]["physical"]["failures"]
            .as_u64()
            .unwrap_or(0)
            >= 3
    });
    let failed = hooks
        .bodies("/hook")
        .into_iter()
        .find(|b| b["event"] == "backup_failed")
        .unwrap();
    assert_eq!(failed["database"], "app");
    assert_eq!(failed["kind"], "physical");
    assert!(
        failed["message"].as_str().unwrap().contains("app.db"),
        "{failed}"
    );
    // Each failure was retried once before it counted.
    let last = &failures["databases"]["app"]["kinds"]["physical"]["last_failure"];
    assert_eq!(last["attempts"], 2, "{last}");
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .ends_with("(after 2 attempt(s))"),
        "{last}"
    );
    // Repeats of a failure within min_interval are not sent again.
    assert_eq!(
        events("/hook")
            .iter()
            .filter(|e| *e == "backup_failed")
            .count(),
        1,
        "{failures}"
    );

    // The database appears: the next backup succeeds and the recovery is notified.
    make_db(&env.path("app.db"), 10, 10);
    wait("the recovery", &|| {
        events("/hook").contains(&"backup_recovered".to_owned())
    });
    let slack: Vec<String> = hooks
        .bodies("/slack")
        .iter()
        .map(|b| b["text"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        slack
            .iter()
            .any(|t| t.contains("backup failed") && t.contains("`app` (physical)")),
        "{slack:?}"
    );
    assert!(
        slack.iter().any(|t| t.contains("backup recovered")),
        "{slack:?}"
    );
    assert!(
        hooks.requests.load(std::sync::atomic::Ordering::SeqCst) > hooks.bodies("").len(),
        "the 500 was retried"
    );
    env.stop(agent, 20);
    let log = env.log();
    assert!(
        !log.contains("secret-token"),
        "a webhook URL was logged:\n{log}"
    );
    assert!(
        log.contains("failed to deliver a notification: HTTP 500"),
        "{log}"
    );
}

/// Run Debian's chromium headless (installed by dev/test) with a profile of its own.
fn chromium(env: &Env, args: &[&str]) -> Output {
    let profile = env.path("chromium-profile");
    let o = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(args)
        .env("HOME", env.path(""))
        .stdin(Stdio::null())
        .output()
        .expect("chromium is not installed; dev/test installs it");
    assert!(
        o.status.success(),
        "chromium {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

#[test]
fn the_timeline_page_draws_every_snapshot_in_a_real_headless_browser() {
    let env = Env::new();
    env.ok(&["init"]);
    make_db(&env.path("app.db"), 100, 100);
    let config = env.config("agent.yaml", "@every 1s", "", "");
    let agent = env.start_agent(&config);
    env.wait_for("three backups", 60, |s| successes(s) >= 3);
    env.stop(agent, 20);
    // The agent is stopped so that the page and the repository agree; start it again with no
    // schedule due, only to serve the page.
    let idle = env.config("idle.yaml", "@every 1h", "", "");
    let agent = env.start_agent(&idle);
    env.wait_for("the agent", 30, |s| {
        s["ready"] == true
            && s["databases"]["app"]["snapshots"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
    });
    let url = format!("http://127.0.0.1:{}/", env.port);

    let dom = String::from_utf8(chromium(&env, &["--dump-dom", &url]).stdout).unwrap();
    let ids: Vec<String> = env
        .snapshots()
        .iter()
        .map(|s| s["short_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(ids.len() >= 3);
    assert!(
        dom.contains("Recoverable windows") && dom.contains("data-database=\"app\""),
        "{dom}"
    );
    for id in &ids {
        assert!(
            dom.contains(&format!("data-snapshot=\"{id}\"")),
            "snapshot {id} is not drawn:\n{dom}"
        );
    }
    assert!(dom.contains("<svg"), "{dom}");

    // A screenshot of the page holds far more than a blank page of the same size.
    let shot = env.path("timeline.png");
    let blank = env.path("blank.png");
    let size = "--window-size=1100,400";
    chromium(
        &env,
        &[size, &format!("--screenshot={}", shot.display()), &url],
    );
    chromium(
        &env,
        &[
            size,
            &format!("--screenshot={}", blank.display()),
            "about:blank",
        ],
    );
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let blank_len = std::fs::metadata(&blank).unwrap().len() as usize;
    assert!(
        png.len() > 4 * blank_len,
        "{} vs blank {blank_len}",
        png.len()
    );
    env.stop(agent, 20);
}

/// Flip a byte in the middle of every pack file of the repository.

#[test]
fn verification_restores_prove_the_data_and_catch_a_corrupted_backup() {
    let env = Env::new();
    env.ok(&["init"]);
    make_db(&env.path("app.db"), 100, 300);
    let db = env.path("app.db");
    // WAL mode: read-only connections to a restored copy leave `-wal` and `-shm` files.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("PRAGMA journal_mode=WAL")
        .unwrap();
    env.ok(&[
        "backup",
        "--sqlite",
        db.to_str().unwrap(),
        "--tag",
        "tidemark.db=app",
    ]);
    let hooks = common::Receiver::start(0);
    std::fs::write(
        env.path("hook-url"),
        format!("http://127.0.0.1:{}/hook\n", hooks.port),
    )
    .unwrap();
    let config = env.config(
        "agent.yaml",
        "@every 1h",
        "",
        &format!(
            "    verification:
      cron: '@every 2s'
      queries: [{{sql: 'SELECT count(*) FROM t', expect: '100'}}]
    notify: [hook]
notifications:
  hook: {{kind: webhook, url_file: {}}}
",
            env.path("hook-url").display()
        ),
    );
    let agent = env.start_agent(&config);
    let s = env.wait_for("a verification", 60, |s| {
        s["databases"]["app"]["verification"]["ok"].is_boolean()
    });
    let v = &s["databases"]["app"]["verification"];
    assert_eq!(v["ok"], true, "{v:#}");
    let checks = v["checks"].to_string();
    assert!(checks.contains("PRAGMA integrity_check: ok"), "{checks}");
    assert!(
        checks.contains("1 tables, 100 rows: counts and checksums match the backup"),
        "{checks}"
    );
    assert!(checks.contains("SELECT count(*) FROM t"), "{checks}");
    assert!(
        v["rto_seconds"].as_f64().unwrap() > 0.0 && v["point"].is_string(),
        "{v:#}"
    );
    let samples = parse_prometheus(&env.get("/metrics").1);
    assert_eq!(metric(&samples, "tidemark_verification_success"), Some(1.0));
    assert!(metric(&samples, "tidemark_verification_rto_seconds").unwrap() > 0.0);
    // Several more runs at 2 s; each must leave the scratch space as it found it.
    std::thread::sleep(Duration::from_secs(7));

    common::corrupt_packs(&env.path("repo"));
    let s = env.wait_for("a failed verification", 60, |s| {
        s["databases"]["app"]["verification"]["ok"] == false
    });
    let err = s["databases"]["app"]["verification"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(err.contains("the restore failed"), "{err}");
    let samples = parse_prometheus(&env.get("/metrics").1);
    assert_eq!(metric(&samples, "tidemark_verification_success"), Some(0.0));
    let end = Instant::now() + Duration::from_secs(30);
    while !hooks
        .bodies("/hook")
        .iter()
        .any(|b| b["event"] == "verification_failed")
    {
        assert!(
            Instant::now() < end,
            "no verification_failed notification: {:?}",
            hooks.bodies("")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The database itself was never touched by the verification.
    assert_eq!(count_rows(&db), 100);
    env.stop(agent, 20);
    // Passed and failed runs alike left nothing in the scratch space (issue #15 point 5: four
    // files per run piled up there).
    let left: Vec<_> = std::fs::read_dir(env.path("state/verify"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "verification left {left:?}");
}

/// Issue #15 point 10: at the default log level the agent says where it listens and when each
/// database runs next, and its log lines carry values, not debug forms.
#[test]
fn the_agent_says_where_it_listens_and_when_each_database_runs_next() {
    let env = Env::new();
    env.ok(&["init"]);
    make_db(&env.path("app.db"), 10, 10);
    let config = env.config(
        "agent.yaml",
        "@every 2s",
        "",
        "    verification: {cron: '0 3 * * *'}\n",
    );
    let log = std::fs::File::create(env.path("agent.log")).unwrap();
    let agent = Agent(Some(
        env.cmd(&["agent", "--config", config.to_str().unwrap()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    ));
    env.wait_for("a backup", 30, |s| successes(s) >= 1);
    env.stop(agent, 20);
    let log = env.log();
    let line = log
        .lines()
        .find(|l| l.contains("agent running"))
        .unwrap_or_else(|| panic!("no start line:\n{log}"));
    assert!(
        line.contains(&format!("listening on 127.0.0.1:{}", env.port))
            && line.contains("app (sqlite: physical next at ")
            && line.contains("verification next at ")
            && line.contains(" 03:00:00 UTC"),
        "{line}"
    );
    assert!(log.contains("backup done"), "{log}");
    assert!(!log.contains("Some("), "{log}");
}

#[test]
fn a_wrong_repository_password_stops_the_agent_at_start_with_the_repository_named() {
    let env = Env::new();
    env.ok(&["init"]);
    make_db(&env.path("app.db"), 10, 10);
    let config = env.config("agent.yaml", "@every 1h", "", "");
    std::fs::write(env.path("password"), "not the password\n").unwrap();
    let o = env
        .cmd(&["agent", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    // The CLI's codes (README): 4 for a wrong password, 3 for no repository.
    assert_eq!(o.status.code(), Some(4));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("failed to open repository \"main\" at location \"local\"")
            && err.contains("wrong password"),
        "{err}"
    );
    assert!(
        !err.contains("not the password") && !err.contains("panicked"),
        "{err}"
    );
    std::fs::remove_dir_all(env.path("repo")).unwrap();
    std::fs::create_dir(env.path("repo")).unwrap();
    let o = env
        .cmd(&["agent", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn add_rows(path: &Path, from: i64, to: i64) {
    let c = rusqlite::Connection::open(path).unwrap();
    for i in from..to {
        c.execute(
            "INSERT INTO t VALUES (?1, randomblob(200))",
            rusqlite::params![i],
        )
        .unwrap();
    }
}

fn location<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    &s["databases"]["app"]["locations"][name]
}

fn labelled(samples: &[common::Sample], name: &str, location: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.0 == name && s.1.contains(&("location".into(), location.into())))
        .map(|s| s.2)
}

#[test]
fn one_read_goes_to_two_locations_a_dead_one_misses_snapshots_and_copy_fills_it() {
    // A local directory and a real S3 server (moto). The S3 server is stopped mid-run, then a
    // fresh, empty one takes its place.
    let env = Env::new();
    env.ok(&["init"]);
    make_db(&env.path("app.db"), 300, 200);
    let moto = tidemark_testkit::Moto::start();
    let s3_port = moto.server.port;
    moto.bucket("tm-offsite", "");
    let endpoint = moto.server.url();
    let hooks = common::Receiver::start(0);
    std::fs::write(
        env.path("hook-url"),
        format!("http://127.0.0.1:{}/hook\n", hooks.port),
    )
    .unwrap();
    let text = format!(
        "agent:
  state_dir: {state}
  listen: 127.0.0.1:{port}
repositories:
  main:
    locations:
      - {{name: local, url: {repo}}}
      - name: offsite
        url: s3://tm-offsite/repo
        options: {{endpoint: '{endpoint}', region: us-east-1, access_key_id: testing, secret_access_key: testing}}
    password_file: {pw}
databases:
  app:
    engine: sqlite
    repository: main
    sqlite: {{path: {db}}}
    schedules: [{{kind: physical, cron: '@every 3s'}}]
    retention: {{keep_last: 50}}
    location_retention:
      offsite: {{keep_last: 2}}
    notify: [hook]
notifications:
  hook: {{kind: webhook, url_file: {hook}}}
",
        hook = env.path("hook-url").display(),
        state = env.path("state").display(),
        port = env.port,
        repo = env.path("repo").display(),
        pw = env.path("password").display(),
        db = env.path("app.db").display(),
    );
    let config = env.path("agent.yaml");
    std::fs::write(&config, text).unwrap();
    let agent = env.start_agent(&config);

    // 1. Both locations get every backup; each keeps its own retention.
    let s = env.wait_for("three backups at both locations", 90, |s| {
        location(s, "local")["snapshots"].as_u64() >= Some(3)
            && location(s, "offsite")["ok"] == true
    });
    assert_eq!(location(&s, "local")["ok"], true, "{s:#}");
    assert!(
        location(&s, "offsite")["snapshots"].as_u64().unwrap() <= 2,
        "offsite keeps 2: {s:#}"
    );
    let plan = s["databases"]["app"]["retention_plan"].to_string();
    assert!(
        plan.contains("[offsite] keep snapshot") && plan.contains("[local] keep snapshot"),
        "{plan}"
    );

    // 2. The S3 server dies: backups go on locally, the offsite location is marked.
    drop(moto);
    add_rows(&env.path("app.db"), 300, 400);
    let failures_before = s["databases"]["app"]["kinds"]["physical"]["failures"]
        .as_u64()
        .unwrap_or(0);
    let s = env.wait_for("a backup that missed offsite", 90, |s| {
        location(s, "offsite")["ok"] == false
            && location(s, "offsite")["missing"]
                .as_array()
                .is_some_and(|m| !m.is_empty())
    });
    let missed: Vec<String> = location(&s, "offsite")["missing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        s["databases"]["app"]["kinds"]["physical"]["failures"]
            .as_u64()
            .unwrap_or(0),
        failures_before,
        "a dead location does not fail the backup: {s:#}"
    );
    let error = location(&s, "offsite")["last_error"].as_str().unwrap();
    assert!(
        !error.contains("testing"),
        "no secret in the status: {error}"
    );
    let samples = parse_prometheus(&env.get("/metrics").1);
    assert_eq!(
        labelled(&samples, "tidemark_location_up", "offsite"),
        Some(0.0)
    );
    assert_eq!(
        labelled(&samples, "tidemark_location_up", "local"),
        Some(1.0)
    );
    assert!(labelled(&samples, "tidemark_location_snapshots_missing", "offsite").unwrap() >= 1.0);
    let out = env.ok(&["status", "--config", config.to_str().unwrap()]);
    assert!(
        out.contains("location offsite: FAILING") && out.contains("MISSING"),
        "{out}"
    );
    assert!(out.contains("location local: ok"), "{out}");
    // Notified, naming the location and the snapshot it missed.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let sent = hooks.bodies("/hook");
        if let Some(b) = sent.iter().find(|b| b["event"] == "location_failed") {
            let m = b["message"].as_str().unwrap();
            assert!(m.contains("location offsite missed snapshot"), "{m}");
            assert!(missed.iter().any(|id| m.contains(id.as_str())), "{m}");
            break;
        }
        assert!(
            Instant::now() < end,
            "no location_failed notification: {sent:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    env.stop(agent, 20);

    // 3. A fresh, empty S3 server at the same address. `init --copy-from` makes it a location
    // of the repository again; `copy` fills what offsite missed, each object verified.
    let _moto = tidemark_testkit::Moto::start_on(s3_port);
    _moto.bucket("tm-offsite", "");
    let cli_config = env.path("offsite.yaml");
    std::fs::write(
        &cli_config,
        format!(
            "repository: s3://tm-offsite/repo\noptions: {{endpoint: '{endpoint}', region: us-east-1}}\npassword_file: {}\n",
            env.path("password").display()
        ),
    )
    .unwrap();
    let offsite = |args: &[&str]| {
        let mut c = env.cmd(&["--config", cli_config.to_str().unwrap()]);
        c.args(args)
            .env_remove("TIDEMARK_REPOSITORY")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing");
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "tidemark {args:?} at offsite failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let local = env.path("repo");
    let out = offsite(&["init", "--copy-from", local.to_str().unwrap()]);
    assert!(out.contains("added a location of"), "{out}");
    let mut copy = env.cmd(&[
        "copy",
        "--to",
        "s3://tm-offsite/repo",
        "--to-option",
        &format!("endpoint={endpoint}"),
        "--to-option",
        "region=us-east-1",
        "--json",
    ]);
    copy.args(&missed)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing");
    let o = copy.output().unwrap();
    assert!(
        o.status.success(),
        "copy failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        report["snapshots"].as_array().unwrap().len(),
        missed.len(),
        "{report}"
    );
    assert!(report["packs"].as_u64().unwrap() > 0, "{report}");
    // A secret on the command line is refused, and not echoed.
    let o = env
        .cmd(&[
            "copy",
            "--to",
            "s3://tm-offsite/repo",
            "--to-option",
            "secret_access_key=hunter2",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("secret_access_key") && !err.contains("hunter2"),
        "{err}"
    );

    // 4. The missed snapshot restores from the S3 location alone, with the rows it had.
    let dest = env.path("from-offsite.db");
    offsite(&["restore", &missed[0], "--target", dest.to_str().unwrap()]);
    assert_eq!(count_rows(&dest), 400);
    offsite(&["check", "--read-data"]);

    // 5. A restarted agent finds offsite whole again and backs up to both.
    let agent = env.start_agent(&config);
    let before = successes(&s);
    let s = env.wait_for("offsite back, missing nothing", 90, |s| {
        successes(s) > before
            && location(s, "offsite")["ok"] == true
            && location(s, "offsite")["missing"]
                .as_array()
                .is_some_and(|m| m.is_empty())
    });
    assert_eq!(
        s["databases"]["app"]["kinds"]["physical"]["last_success"]["locations"]["offsite"]["ok"],
        true,
        "{s:#}"
    );
    env.stop(agent, 20);
}

#[test]
fn retries_back_off_doubling_and_stop_at_the_deadline() {
    let env = Env::new();
    env.ok(&["init"]);
    // No database file: every attempt fails at once. Attempts at 0 s, 1 s and 3 s; the next
    // would start at 7 s, past the 4 s deadline, although 10 attempts are allowed.
    let config = env.config(
        "agent.yaml",
        "@every 1h",
        "",
        "    retry: {attempts: 10, backoff: 1s, deadline: 4s}\n",
    );
    // The first run comes from the catch-up of a schedule that fired while the agent was
    // down: a state file that says it fired an hour ago and never finished.
    std::fs::create_dir_all(env.path("state")).unwrap();
    let fired = (chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339();
    std::fs::write(
        env.path("state/state.json"),
        format!(r#"{{"started": null, "ready": false, "databases": {{"app": {{"engine": "sqlite", "repository": "main", "kinds": {{}}, "fired": {{"physical@@every 1h": "{fired}"}}, "done": {{}}}}}}}}"#),
    )
    .unwrap();
    let agent = env.start_agent(&config);
    let s = env.wait_for("the failed run", 60, |s| {
        s["databases"]["app"]["kinds"]["physical"]["failures"].as_u64() >= Some(1)
    });
    let f = &s["databases"]["app"]["kinds"]["physical"]["last_failure"];
    assert_eq!(f["attempts"], 3, "{f:#}");
    assert!(
        f["error"].as_str().unwrap().contains("after 3 attempt(s)"),
        "{f:#}"
    );
    let took = f["duration_seconds"].as_f64().unwrap();
    assert!((2.5..6.0).contains(&took), "about 3 s of backoff: {f:#}");
    env.stop(agent, 20);
}

#[test]
fn a_location_holding_another_repository_stops_the_agent_at_start_named() {
    let env = Env::new();
    env.ok(&["init"]);
    let other = env.path("other");
    env.ok(&["--repo", other.to_str().unwrap(), "init"]);
    make_db(&env.path("app.db"), 10, 10);
    let second = format!("}}\n      - {{name: elsewhere, url: {}", other.display());
    let config = env.config("agent.yaml", "@every 1h", &second, "");
    let o = env
        .cmd(&["agent", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("location \"elsewhere\"") && err.contains("holds a different repository"),
        "{err}"
    );
    // Nothing was written there.
    assert!(
        !other.join("snapshots").exists()
            || std::fs::read_dir(other.join("snapshots"))
                .unwrap()
                .next()
                .is_none()
    );
}
