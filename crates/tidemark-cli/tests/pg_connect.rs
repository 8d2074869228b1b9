//! Reaching PostgreSQL as libpq does: a host that starts with `/` is the directory of the
//! server's Unix socket, and the `PG*` environment fills what the flags leave unset.

use std::process::Command;

use common::pg::*;
use common::tidemark;
use tidemark_testkit::Postgres;

mod common;

/// `tidemark` with the libpq environment `env` (and nothing else but PATH and the config).
fn tidemark_env(a: &Archive, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TIDEMARK_CONFIG", &a.config)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn a_socket_directory_and_the_libpq_environment_reach_a_server_without_tcp() {
    // No TCP at all: the server listens on its Unix socket only.
    let cluster = Postgres::start(&["listen_addresses = ''"]);
    let a = archive(&cluster);
    cluster.psql("postgres", "CREATE DATABASE app");
    cluster.psql(
        "app",
        "CREATE TABLE t AS SELECT generate_series(1, 10) AS x",
    );
    let dir = cluster.dir.path().to_str().unwrap().to_owned();
    let port = cluster.port.to_string();

    // --host as a socket directory (our own connection, then pg_dump's).
    let o = tidemark(
        &a.config,
        &[
            "pg", "backup", "--host", &dir, "--port", &port, "--user", "postgres", "--dbname",
            "app", "--json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The same through PGHOST, PGPORT, PGUSER and PGDATABASE alone, and a restore the same way.
    let env = [
        ("PGHOST", dir.as_str()),
        ("PGPORT", port.as_str()),
        ("PGUSER", "postgres"),
        ("PGDATABASE", "app"),
    ];
    let o = tidemark_env(&a, &env, &["pg", "backup", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = tidemark_env(
        &a,
        &env,
        &[
            "pg",
            "restore",
            "latest",
            "--database",
            "app",
            "--into",
            "copy",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(cluster.psql("copy", "SELECT sum(x) FROM t"), "55");
    // A URL with the socket directory as its host parameter.
    let url = format!("postgresql://postgres@/app?host={dir}&port={port}");
    let o = tidemark(&a.config, &["pg", "backup", "--url", &url]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    // A directory without a server's socket: the error names the socket it tried.
    let empty = cluster.dir.path().join("nothing-here");
    std::fs::create_dir_all(&empty).unwrap();
    let o = tidemark(
        &a.config,
        &[
            "pg",
            "backup",
            "--host",
            empty.to_str().unwrap(),
            "--port",
            &port,
        ],
    );
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    let socket = format!("{}/.s.PGSQL.{port}", empty.display());
    assert!(stderr(&o).contains(&socket), "{}", stderr(&o));
}
