//! The `tidemark` binary end to end: exit codes, one-line errors, round trips, damage, and
//! backups killed with SIGKILL.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("password"), "correct horse\n").unwrap();
        Env { dir }
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

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "tidemark {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn init(&self) {
        self.ok(&["init"]);
    }

    fn snapshot_ids(&self) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.ok(&["snapshots", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    }
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn dump_like(path: &Path, rows: usize, seed: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    for i in 0..rows {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        writeln!(
            f,
            "{i}\t{}\tname-{:08x}\t{}.{:02}",
            x % 1000,
            x >> 40,
            (x >> 20) % 100000,
            x % 100
        )
        .unwrap();
    }
}

#[test]
fn a_wrong_password_is_one_line_with_exit_code_4() {
    let env = Env::new();
    env.init();
    std::fs::write(env.path("wrong"), "nope\n").unwrap();
    let o = env
        .cmd(&["snapshots"])
        .env("TIDEMARK_PASSWORD_FILE", env.path("wrong"))
        .output()
        .unwrap();
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.starts_with("tidemark: wrong password"), "{err}");
    assert!(!err.contains("panicked") && !err.contains("nope"), "{err}");
}

#[test]
fn a_missing_repository_has_exit_code_3_and_a_hint() {
    let env = Env::new();
    let o = env.run(&["snapshots"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no repository at") && stderr(&o).contains("tidemark init"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_corrupt_config_has_exit_code_6_and_names_the_config() {
    let env = Env::new();
    env.init();
    let cfg = env.path("repo/config");
    let mut b = std::fs::read(&cfg).unwrap();
    b[30] ^= 0xff;
    std::fs::write(&cfg, b).unwrap();
    let o = env.run(&["snapshots"]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(stderr(&o).contains("config is damaged"), "{}", stderr(&o));
}

/// Issue #15 point 6: a config file that cannot be read is a config error (2), like one that
/// does not parse.
#[test]
fn an_unreadable_config_file_exits_2_naming_the_file() {
    let env = Env::new();
    std::fs::write(env.path("latin1.yaml"), b"repository: /tmp/caf\xe9\n").unwrap();
    for name in ["missing.yaml", "latin1.yaml"] {
        let path = env.path(name);
        let o = env.run(&["--config", path.to_str().unwrap(), "snapshots"]);
        assert_eq!(code(&o), 2, "{name}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(path.to_str().unwrap()),
            "{}",
            stderr(&o)
        );
    }
}

#[test]
fn a_broken_config_file_is_a_usage_error_naming_the_file() {
    let env = Env::new();
    std::fs::write(env.path("tidemark.yaml"), "repository: [unclosed\n").unwrap();
    let o = env
        .cmd(&[
            "--config",
            env.path("tidemark.yaml").to_str().unwrap(),
            "snapshots",
        ])
        .env_remove("TIDEMARK_REPOSITORY")
        .output()
        .unwrap();
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("tidemark.yaml"), "{}", stderr(&o));
}

#[test]
fn stdin_backups_round_trip_through_dump_and_restore() {
    let env = Env::new();
    env.init();
    dump_like(&env.path("dump.sql"), 200_000, 1);
    let o = env
        .cmd(&[
            "backup",
            "--stdin",
            "--stream-name",
            "dump.sql",
            "--tag",
            "t1",
        ])
        .stdin(std::fs::File::open(env.path("dump.sql")).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let ids = env.snapshot_ids();
    assert_eq!(ids.len(), 1);
    let dumped = env.cmd(&["dump", &ids[0][..8]]).output().unwrap();
    assert_eq!(dumped.stdout, std::fs::read(env.path("dump.sql")).unwrap());
    env.ok(&[
        "restore",
        "latest",
        "--target",
        env.path("out.sql").to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(env.path("out.sql")).unwrap(),
        std::fs::read(env.path("dump.sql")).unwrap()
    );
    let table = env.ok(&["snapshots"]);
    assert!(
        table.contains(&ids[0][..8]) && table.contains("t1"),
        "{table}"
    );
}

#[test]
fn a_failing_backup_command_writes_no_snapshot_and_exits_8() {
    let env = Env::new();
    env.init();
    let o = env.run(&["backup", "--command", "echo partial; exit 3"]);
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(env.snapshot_ids().is_empty());
    env.ok(&["backup", "--command", "echo whole"]);
    assert_eq!(env.snapshot_ids().len(), 1);
}

#[test]
fn files_and_directories_are_restored_with_their_tree() {
    let env = Env::new();
    env.init();
    let src = env.path("src");
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    std::fs::write(src.join("a/b/one.txt"), "one").unwrap();
    dump_like(&src.join("big.tsv"), 50_000, 2);
    std::fs::write(src.join("empty"), "").unwrap();
    std::os::unix::fs::symlink("a/b/one.txt", src.join("link")).unwrap();
    env.ok(&["backup", src.to_str().unwrap()]);
    let out = env.path("out");
    env.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(out.join("src/a/b/one.txt")).unwrap(), b"one");
    assert_eq!(
        std::fs::read(out.join("src/big.tsv")).unwrap(),
        std::fs::read(src.join("big.tsv")).unwrap()
    );
    assert_eq!(std::fs::read(out.join("src/empty")).unwrap(), b"");
    assert_eq!(
        std::fs::read_link(out.join("src/link")).unwrap(),
        PathBuf::from("a/b/one.txt")
    );
}

#[test]
fn an_sqlite_database_is_backed_up_online_and_restored_verified() {
    let env = Env::new();
    env.init();
    let db = env.path("app.db");
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);")
        .unwrap();
    for i in 0..5000 {
        c.execute("INSERT INTO t(v) VALUES (?1)", [format!("row {i}")])
            .unwrap();
    }
    // The connection stays open with WAL content not yet checkpointed: the copy must include it.
    env.ok(&["backup", "--sqlite", db.to_str().unwrap()]);
    let target = env.path("out/restored.db");
    let out = env.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert!(out.contains("integrity_check: ok"), "{out}");
    // Nothing but the target remains: the integrity check's connection on the WAL-mode
    // temporary file left `-wal` and `-shm` files beside it (issue #15 point 4).
    assert_eq!(everything_in(&env.path("out")), vec![target.clone()]);
    let r = rusqlite::Connection::open(&target).unwrap();
    let n: i64 = r
        .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
        .unwrap();
    assert_eq!(n, 5000);
    let o = env.run(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_ne!(
        code(&o),
        0,
        "restoring over an existing database is refused"
    );
    // A restore that fails leaves nothing at all.
    std::fs::create_dir(env.path("failed")).unwrap();
    common::corrupt_packs(&env.path("repo"));
    let failed = env.path("failed/restored.db");
    let o = env.run(&["restore", "latest", "--target", failed.to_str().unwrap()]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert_eq!(everything_in(&env.path("failed")), Vec::<PathBuf>::new());
}

#[test]
fn a_flipped_byte_is_found_by_check_read_data_and_fails_the_restore() {
    let env = Env::new();
    env.init();
    dump_like(&env.path("a.sql"), 100_000, 3);
    dump_like(&env.path("b.sql"), 100_000, 4);
    env.ok(&[
        "backup",
        "--command",
        &format!("cat {}", env.path("a.sql").display()),
    ]);
    let good = env.snapshot_ids();
    env.ok(&[
        "backup",
        "--command",
        &format!("cat {}", env.path("b.sql").display()),
    ]);
    let bad: Vec<_> = env
        .snapshot_ids()
        .into_iter()
        .filter(|i| !good.contains(i))
        .collect();
    assert_eq!(env.run(&["check", "--read-data"]).status.code(), Some(0));

    // Flip one byte inside the pack written by the second backup only.
    let mut packs: Vec<_> = walk(&env.path("repo/data"));
    packs.sort_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap());
    let pack = packs.last().unwrap();
    let mut bytes = std::fs::read(pack).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x01;
    std::fs::write(pack, bytes).unwrap();

    let o = env.run(&["check", "--read-data"]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("snapshot {} is damaged", bad[0])),
        "{}",
        stderr(&o)
    );
    assert!(
        !stderr(&o).contains(&format!("snapshot {} is damaged", good[0])),
        "{}",
        stderr(&o)
    );
    let o = env.run(&[
        "restore",
        &bad[0],
        "--target",
        env.path("out.sql").to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(
        !env.path("out.sql").exists(),
        "no partial file is left at the target"
    );
    env.ok(&[
        "restore",
        &good[0],
        "--target",
        env.path("good.sql").to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(env.path("good.sql")).unwrap(),
        std::fs::read(env.path("a.sql")).unwrap()
    );
}

/// Issue #15 points 1–2: with the index deleted, restore still works, check says to repair
/// (not to prune), prune keeps the packs, and `repair index` makes check clean again.
#[test]
fn a_deleted_index_is_repaired_and_check_never_advises_losing_data() {
    let env = Env::new();
    env.init();
    dump_like(&env.path("a.sql"), 100_000, 5);
    env.ok(&[
        "backup",
        "--command",
        &format!("cat {}", env.path("a.sql").display()),
    ]);
    let id = env.snapshot_ids().remove(0);
    for i in walk(&env.path("repo/index")) {
        std::fs::remove_file(i).unwrap();
    }
    let packs = walk(&env.path("repo/data"));

    let o = env.run(&["check"]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    let said = format!("{}{}", stderr(&o), String::from_utf8_lossy(&o.stdout));
    assert!(said.contains("tidemark repair index"), "{said}");
    assert!(
        !said.contains("prune` removes"),
        "advice that deletes data: {said}"
    );
    env.ok(&["prune", "--grace-minutes", "0"]);
    assert_eq!(
        walk(&env.path("repo/data")).len(),
        packs.len(),
        "prune kept every pack"
    );
    let out = env.cmd(&["dump", &id]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout == std::fs::read(env.path("a.sql")).unwrap());

    env.ok(&["repair", "index"]);
    env.ok(&["repair", "index"]);
    let o = env.run(&["check", "--read-data"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// Every entry of `dir`, hidden ones included, sorted.
fn everything_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if !p.file_name().unwrap().to_string_lossy().starts_with('.') {
            out.push(p);
        }
    }
    out
}

#[test]
fn backups_killed_at_random_moments_never_leave_a_partial_snapshot() {
    let env = Env::new();
    env.init();
    dump_like(&env.path("big.sql"), 1_500_000, 5);
    let big = std::fs::read(env.path("big.sql")).unwrap();
    let cmd = format!("cat {}", env.path("big.sql").display());
    // Time one whole backup like the ones killed below (the data is stored already, so they
    // only deduplicate: timing the first, which stores it, made most kills land too late),
    // then kill the others at random moments well within that time.
    env.ok(&["backup", "--command", &cmd]);
    let started = std::time::Instant::now();
    env.ok(&["backup", "--command", &cmd]);
    let whole = started.elapsed().as_millis() as u64;
    let mut listed = 2;
    let mut killed_mid_backup = 0;
    for round in 0..20 {
        let mut child = env
            .cmd(&["backup", "--command", &cmd])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = Duration::from_millis(rand::random::<u64>() % (whole * 6 / 10).max(1));
        std::thread::sleep(delay);
        let pid = child.id();
        // SIGKILL: no chance to clean up.
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        let status = child.wait().unwrap();
        let now = env.snapshot_ids().len();
        // A kill can land after the snapshot was written and before the process exited: then
        // the snapshot is complete (every listed snapshot is restored whole below).
        if status.success() {
            assert_eq!(
                now,
                listed + 1,
                "round {round}: a finished backup is listed"
            );
        } else {
            assert!(
                now == listed || now == listed + 1,
                "round {round}: {now} snapshots after {listed}"
            );
            if now == listed {
                killed_mid_backup += 1;
            }
        }
        listed = now;
    }
    assert!(
        killed_mid_backup > 12,
        "most rounds must be killed mid-backup to test anything (only {killed_mid_backup} were)"
    );
    // The repository is sound, the stale locks do not block, and the next backup works.
    let o = env.run(&["check", "--read-data"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    env.ok(&["backup", "--command", &cmd]);
    for id in env.snapshot_ids() {
        let out = env.cmd(&["dump", &id]).output().unwrap();
        assert!(out.stdout == big, "snapshot {id} restores whole");
    }
    env.ok(&["prune", "--grace-minutes", "0"]);
    env.ok(&["prune", "--grace-minutes", "0"]);
    let o = env.run(&["check", "--read-data"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("not indexed"),
        "prune removed the leftovers"
    );
    // The killed processes' locks were recognised as stale (their pids are gone) and removed.
    assert!(
        walk(&env.path("repo/locks")).is_empty(),
        "stale locks remain: {:?}",
        walk(&env.path("repo/locks"))
    );
}

#[test]
fn two_concurrent_backup_processes_both_write_valid_snapshots() {
    let env = Env::new();
    env.init();
    dump_like(&env.path("a.sql"), 300_000, 8);
    dump_like(&env.path("b.sql"), 300_000, 9);
    let a = env
        .cmd(&[
            "backup",
            "--command",
            &format!("cat {}", env.path("a.sql").display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let b = env
        .cmd(&[
            "backup",
            "--command",
            &format!("cat {}", env.path("b.sql").display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for c in [a, b] {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_eq!(env.snapshot_ids().len(), 2);
    assert_eq!(code(&env.run(&["check", "--read-data"])), 0);
    let mut restored: Vec<Vec<u8>> = env
        .snapshot_ids()
        .iter()
        .map(|id| env.cmd(&["dump", id]).output().unwrap().stdout)
        .collect();
    restored.sort();
    let mut want = vec![
        std::fs::read(env.path("a.sql")).unwrap(),
        std::fs::read(env.path("b.sql")).unwrap(),
    ];
    want.sort();
    assert!(restored == want, "both snapshots restore their own stream");
}

#[test]
fn the_config_file_supplies_the_repository_and_password() {
    let env = Env::new();
    let cfg = env.path("tidemark.yaml");
    std::fs::write(
        &cfg,
        format!(
            "repository: {}\npassword_file: {}\nlimit_upload: 100M\n",
            env.path("cfgrepo").display(),
            env.path("password").display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        env.cmd(args)
            .env_remove("TIDEMARK_REPOSITORY")
            .env_remove("TIDEMARK_PASSWORD_FILE")
            .env("TIDEMARK_CONFIG", &cfg)
            .output()
            .unwrap()
    };
    assert!(run(&["init"]).status.success());
    assert!(run(&["backup", "--command", "echo hello"]).status.success());
    let o = run(&["dump", "latest"]);
    assert_eq!(o.stdout, b"hello\n", "{}", stderr(&o));
    // A flag wins over the config file.
    let o = env
        .cmd(&[
            "--repo",
            env.path("elsewhere").to_str().unwrap(),
            "snapshots",
        ])
        .env("TIDEMARK_CONFIG", &cfg)
        .env_remove("TIDEMARK_REPOSITORY")
        .output()
        .unwrap();
    assert_eq!(code(&o), 3, "{}", stderr(&o));
}

#[test]
fn forget_dry_run_prints_the_plan_and_changes_nothing() {
    let env = Env::new();
    env.init();
    for i in 0..3 {
        env.ok(&["backup", "--command", &format!("echo {i}")]);
    }
    let out = env.ok(&["forget", "--keep-last", "1", "--dry-run"]);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("remove")).count(),
        2,
        "{out}"
    );
    assert_eq!(env.snapshot_ids().len(), 3);
    env.ok(&["forget", "--keep-last", "1"]);
    assert_eq!(env.snapshot_ids().len(), 1);
    let o = env.run(&["forget"]);
    assert_eq!(code(&o), 2, "a policy is required: {}", stderr(&o));
}

#[test]
fn keys_are_managed_from_the_command_line() {
    let env = Env::new();
    env.init();
    std::fs::write(env.path("second"), "second password\n").unwrap();
    env.ok(&[
        "key",
        "add",
        "--new-password-file",
        env.path("second").to_str().unwrap(),
    ]);
    let list = env.ok(&["key", "list", "--json"]);
    let keys: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 2);
    let other = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| !k["current"].as_bool().unwrap())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let o = env
        .cmd(&["snapshots"])
        .env("TIDEMARK_PASSWORD_FILE", env.path("second"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    env.ok(&["key", "remove", &other[..8]]);
    let o = env
        .cmd(&["snapshots"])
        .env("TIDEMARK_PASSWORD_FILE", env.path("second"))
        .output()
        .unwrap();
    assert_eq!(code(&o), 4);
}

/// Issue #15 point 12: the help says what `pg` does now, not only dumps.
#[test]
fn the_help_says_what_pg_does() {
    let env = Env::new();
    let o = env.run(&["--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    let pg = help
        .lines()
        .find(|l| l.trim_start().starts_with("pg "))
        .unwrap_or_else(|| panic!("{help}"));
    assert!(
        pg.contains("physical") && pg.contains("point in time") && pg.contains("WAL"),
        "{pg}"
    );
}

#[test]
fn the_demo_runs_with_nothing_installed() {
    let o = Command::new(env!("CARGO_BIN_EXE_tidemark"))
        .args(["demo", "--rows", "50000"])
        .env_clear()
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("5. the restored table matches the first backup"),
        "{out}"
    );
}

#[test]
fn a_reader_that_stops_early_is_not_an_error() {
    use std::io::Read;
    let env = Env::new();
    env.init();
    dump_like(&env.path("d.sql"), 300_000, 12);
    env.ok(&[
        "backup",
        "--command",
        &format!("cat {}", env.path("d.sql").display()),
    ]);
    let mut child = env
        .cmd(&["dump", "latest"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 10];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap(); // then the pipe closes, like `| head`
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
}

/// Every process's command line, to prove a secret never appears in one.
fn all_cmdlines() -> String {
    let mut out = String::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            out.push_str(&String::from_utf8_lossy(&c).replace('\0', " "));
            out.push('\n');
        }
    }
    out
}

#[test]
fn pg_backup_and_restore_round_trip_without_the_password_in_any_command_line() {
    let cluster = tidemark_testkit::Postgres::start(&[]);
    cluster.psql("postgres", "CREATE DATABASE app");
    cluster.psql(
        "app",
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 50000) g",
    );
    let env = Env::new();
    env.init();
    let pwfile = env.path("pgpass");
    std::fs::write(&pwfile, tidemark_testkit::SUPERUSER_PASSWORD).unwrap();
    let url = format!("postgresql://postgres@127.0.0.1:{}/app", cluster.port);
    let conn = [
        "--url",
        url.as_str(),
        "--pg-password-file",
        pwfile.to_str().unwrap(),
    ];

    // Written to a second location from the same dump, too.
    let second = env.path("second");
    let head = ["pg", "backup", "--json", "--globals", "--also"];
    let mut backup = env.cmd(&[&head[..], &[second.to_str().unwrap()], &conn[..]].concat());
    let mut child = backup
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    let watch = std::time::Instant::now();
    // The JSON answer and errors are small: the pipes cannot fill while we watch.
    while child.try_wait().unwrap().is_none() {
        seen.push_str(&all_cmdlines());
        assert!(
            watch.elapsed() < Duration::from_secs(120),
            "pg backup did not finish in 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "pg backup failed: {}", stderr(&out));
    assert!(
        seen.contains("pg_dump"),
        "the watcher never saw pg_dump run"
    );
    assert!(
        !seen.contains(tidemark_testkit::SUPERUSER_PASSWORD),
        "the PostgreSQL password appeared in a command line"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["snapshot"]["engine"], "postgres");
    assert_eq!(v["snapshot"]["kind"], "logical");
    assert_eq!(v["locations"][1]["ok"], true, "{v:#}");

    let restore = |extra: &[&str]| {
        env.run(
            &[
                &["pg", "restore", "latest", "--into", "app_copy"][..],
                extra,
                &conn[..],
            ]
            .concat(),
        )
    };
    let o = restore(&[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let fp = "SELECT count(*) || ':' || sum(hashtext(v)) FROM t";
    assert_eq!(cluster.psql("app_copy", fp), cluster.psql("app", fp));
    // A second restore to the same name is refused without --clean: a usage-class error from
    // the database side, one line, exit 8 (the source refused), nothing changed.
    let o = restore(&[]);
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    assert!(stderr(&o).contains("--clean"), "{}", stderr(&o));
    assert_eq!(code(&restore(&["--clean"])), 0);
    // The second location alone restores the same data.
    let o = env
        .cmd(
            &[
                &["pg", "restore", "latest", "--into", "app_second"][..],
                &conn[..],
            ]
            .concat(),
        )
        .env("TIDEMARK_REPOSITORY", &second)
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(cluster.psql("app_second", fp), cluster.psql("app", fp));

    // Wrong password: one line naming the server and the user, exit 8, no snapshot.
    std::fs::write(&pwfile, "wrong").unwrap();
    let before = env.snapshot_ids().len();
    let o = env.run(&[&["pg", "backup"][..], &conn[..]].concat());
    assert_eq!(code(&o), 8, "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("refused the login of user \"postgres\""), "{e}");
    assert_eq!(env.snapshot_ids().len(), before);

    // A password inside the URL is refused before anything connects.
    let o = env.run(&[
        "pg",
        "backup",
        "--url",
        "postgresql://postgres:hunter2@127.0.0.1/app",
    ]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(!stderr(&o).contains("hunter2"));
}

#[test]
fn several_locations_take_one_backup_a_failing_one_is_named_restores_fall_back() {
    let env = Env::new();
    env.init();
    let data = env.path("data.txt");
    dump_like(&data, 20_000, 1);
    let data = data.to_str().unwrap();
    let second = env.path("second");
    let at_second = |args: &[&str]| {
        let o = env
            .cmd(args)
            .env("TIDEMARK_REPOSITORY", &second)
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?} at second: {}", stderr(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    let ids_at_second = || -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&at_second(&["snapshots", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    };

    // An empty location is made a location of the repository and gets the same snapshot,
    // from one read.
    let out = env.ok(&["backup", "--json", "--also", second.to_str().unwrap(), data]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let locations = v["locations"].as_array().unwrap();
    assert_eq!(locations.len(), 2, "{v:#}");
    assert!(locations.iter().all(|l| l["ok"] == true), "{v:#}");
    let id = v["id"].as_str().unwrap().to_owned();
    let ids = ids_at_second();
    assert_eq!(ids.len(), 1);
    assert!(id.starts_with(&ids[0]), "{ids:?}");
    // A damaged pack at the first location: the restore fails there alone, and with the
    // second location to fall back on it is whole, and says where the damage is.
    common::corrupt_packs(&env.path("repo"));
    let out_dir = env.path("restored-first");
    let o = env.run(&["restore", &id, "--target", out_dir.to_str().unwrap()]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    let o = env.run(&[
        "restore",
        &id,
        "--target",
        out_dir.to_str().unwrap(),
        "--fallback",
        second.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("read, verified, from another location")
            && stderr(&o).contains("tidemark check --read-data"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read(out_dir.join("data.txt")).unwrap(),
        std::fs::read(data).unwrap()
    );

    // The second location alone restores it, whole.
    std::fs::remove_dir_all(env.path("repo")).unwrap();
    let out_dir = env.path("restored");
    at_second(&["restore", &id, "--target", out_dir.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(out_dir.join("data.txt")).unwrap(),
        std::fs::read(data).unwrap()
    );
    at_second(&["check", "--read-data"]);

    // From now on the second location is the repository. A location that cannot be reached
    // (a path under a regular file) is left out and named: the snapshot is saved, exit code 9.
    std::fs::write(env.path("blocker"), "").unwrap();
    let blocked = env.path("blocker/third");
    let backup_also = |also: &Path| {
        env.cmd(&["backup", "--also", also.to_str().unwrap(), data])
            .env("TIDEMARK_REPOSITORY", &second)
            .output()
            .unwrap()
    };
    let o = backup_also(&blocked);
    let err = stderr(&o);
    assert_eq!(code(&o), 9, "{err}");
    assert!(
        err.contains(&format!("location {} missed snapshot", blocked.display()))
            && err.contains("tidemark copy --to"),
        "{err}"
    );
    assert_eq!(ids_at_second().len(), 2);

    // A location holding another repository stops the command before anything is read.
    let other = env.path("other");
    let o = env
        .cmd(&["init"])
        .env("TIDEMARK_REPOSITORY", &other)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for (also, says) in [
        (&other, "holds a different repository"),
        (&second, "is given twice"),
    ] {
        let o = backup_also(also);
        let err = stderr(&o);
        assert_eq!(code(&o), 2, "{err}");
        assert!(err.contains(says), "{err}");
    }
    assert_eq!(ids_at_second().len(), 2, "nothing was written");
}
