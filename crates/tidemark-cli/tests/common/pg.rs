//! Support for the PostgreSQL tests: an archive that a real cluster's archive_command writes
//! to, physical backups of it, and checks on what a restored cluster keeps.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tidemark_testkit::Postgres;

use super::tidemark;

pub const BIN: &str = env!("CARGO_BIN_EXE_tidemark");

/// A repository inside the cluster's directory, usable by the postgres user, and a config
/// file naming it (so no secret or path needs to be in archive_command beyond the config).
pub struct Archive {
    pub config: PathBuf,
    pub repo: PathBuf,
}

/// `tidemark <command…> --url <url> --pg-password-file <pw> <extra…>`.
pub fn tidemark_pg(a: &Archive, command: &[&str], url: &str, pw: &Path, extra: &[&str]) -> Output {
    let conn = ["--url", url, "--pg-password-file", pw.to_str().unwrap()];
    tidemark(&a.config, &[command, &conn[..], extra].concat())
}

/// `tidemark pg restore <snapshot> --pgdata <dest> <extra…>`.
pub fn restore_into(a: &Archive, snapshot: &str, dest: &Path, extra: &[&str]) -> Output {
    let head = [
        "pg",
        "restore",
        snapshot,
        "--pgdata",
        dest.to_str().unwrap(),
    ];
    tidemark(&a.config, &[&head[..], extra].concat())
}

pub fn archive(cluster: &Postgres) -> Archive {
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
    let o = tidemark(&config, &["init", "-q"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    cluster.give(&repo);
    Archive { config, repo }
}

/// A cluster that archives its WAL with `tidemark wal-push` into a fresh archive, with `extra`
/// settings.
pub fn archiving_cluster(extra: &[&str]) -> (Postgres, Archive) {
    let mut conf = vec!["archive_mode = on", "archive_command = ''"];
    conf.extend_from_slice(extra);
    let cluster = Postgres::start(&conf);
    let a = archive(&cluster);
    cluster.psql(
        "postgres",
        &format!(
            "ALTER SYSTEM SET archive_command = 'TIDEMARK_CONFIG={} {BIN} wal-push -q %p'",
            a.config.display()
        ),
    );
    cluster.psql("postgres", "SELECT pg_reload_conf()");
    (cluster, a)
}

/// `tidemark pg backup --physical --read <read>` of `cluster`; its JSON answer.
pub fn physical_backup(cluster: &Postgres, a: &Archive, read: &str) -> serde_json::Value {
    let o = physical_backup_as(
        cluster,
        a,
        read,
        "postgres",
        tidemark_testkit::SUPERUSER_PASSWORD,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // The tests run on the database's host: `auto` reads the data directory.
    let want = if read == "replication" {
        "replication"
    } else {
        "local"
    };
    assert_eq!(v["snapshot"]["positions"]["pg.read"], want, "{v}");
    // Index files are cut one page per block, heap files into 64 KiB blocks: pg_authid's
    // index (global/2677, two pages) and pg_proc (base/1/1255, 768 KiB).
    let chunks = |name: &str| {
        let s = v["snapshot"]["streams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not in the snapshot"));
        let size = s["size"].as_u64().unwrap();
        (size, s["chunks"].as_array().unwrap().len() as u64)
    };
    let (size, n) = chunks("data/global/2677");
    assert!(
        size >= 16384 && n == size / 8192,
        "{read}: an index's pages"
    );
    let (size, n) = chunks("data/base/1/1255");
    assert!(
        size > 65536 && n == size.div_ceil(65536),
        "{read}: a table's blocks"
    );
    v
}

/// `tidemark pg backup --physical --read <read>` of `cluster` as `user`.
pub fn physical_backup_as(
    cluster: &Postgres,
    a: &Archive,
    read: &str,
    user: &str,
    password: &str,
) -> Output {
    let pw = cluster.write_private(&format!("{user}-password"), password);
    let url = format!("postgresql://{user}@127.0.0.1:{}/postgres", cluster.port);
    tidemark_pg(
        a,
        &["pg", "backup", "--physical", "--read", read, "--json"],
        &url,
        &pw,
        &[],
    )
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn archived_names(a: &Archive, system_id: &str) -> Vec<String> {
    let dir = a.repo.join(format!("logs/pg/{system_id}/wal"));
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // Temporary files of an upload that was killed are not objects.
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

/// Whether process `pid` runs (a zombie waiting for its reaper does not).
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// The `wal-fetch --prefetch-only` processes working in `data` (their current directory).
pub fn prefetchers_in(data: &Path) -> Vec<u32> {
    let data = data.canonicalize().unwrap_or_else(|_| data.to_owned());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains("--prefetch-only")
                && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == data)
                && running(*pid)
        })
        .collect()
}

/// A cluster that `pg restore --start` brought out of recovery holds nothing of tidemark's:
/// no prefetched WAL in its pg_wal (and no spool at all unless it archives with wal-push,
/// which keeps its records there), no prefetcher still running in it.
pub fn assert_nothing_of_ours(data: &Path, archiving: bool) {
    let spool = if archiving {
        data.join("pg_wal/tidemark-spool/prefetch")
    } else {
        data.join("pg_wal/tidemark-spool")
    };
    assert!(
        !spool.exists(),
        "the restored cluster keeps {}: {:?}",
        spool.display(),
        std::fs::read_dir(spool.join("prefetch"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    assert_eq!(
        prefetchers_in(data),
        Vec::<u32>::new(),
        "a prefetcher outlived recovery"
    );
}

/// Run `sql` on a restored server that `pg restore --start --start-port <port>` started in
/// `data` beside the cluster, then stop that server; the answer.
pub fn query_and_stop(cluster: &Postgres, data: &Path, port: &str, sql: &str) -> String {
    assert_nothing_of_ours(data, false);
    let out = Command::new(cluster.bin().join("psql"))
        .args(["-X", "-A", "-t", "-h"])
        .arg(cluster.dir.path())
        .args(["-p", port, "-U", "postgres", "-d", "postgres", "-c", sql])
        .output()
        .unwrap();
    let mut stop = tidemark_testkit::as_owner(&cluster.bin().join("pg_ctl"));
    stop.arg("-D").arg(data).args(["-m", "fast", "stop"]);
    let stopped = stop.output().unwrap();
    assert!(stopped.status.success(), "{stopped:?}");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `pg restore latest --pgdata <cluster's data dir> <target> --start`, as the cluster's own
/// server: the JSON report, or the failed command's output.
pub fn restore_started(
    cluster: &mut Postgres,
    a: &Archive,
    target: &[&str],
) -> Result<serde_json::Value, std::process::Output> {
    cluster.clear_data_dir();
    let dest = cluster.data_dir();
    let args = [
        &[
            "pg",
            "restore",
            "latest",
            "--json",
            "--start",
            "--pgdata",
            dest.to_str().unwrap(),
        ][..],
        target,
    ]
    .concat();
    let o = tidemark(&a.config, &args);
    if o.status.code() != Some(0) {
        return Err(o);
    }
    cluster.started_elsewhere();
    Ok(serde_json::from_slice(&o.stdout).unwrap())
}
