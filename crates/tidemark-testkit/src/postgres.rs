//! Throwaway PostgreSQL 15 clusters from Debian's `postgresql-15`, on 127.0.0.1.
//!
//! PostgreSQL refuses to run as root and the harness often is root: the cluster's directory is
//! then given to the `postgres` user, and `initdb`, `pg_ctl` and the server run through
//! `runuser -u postgres --`. The server is started by `pg_ctl` (it daemonizes), so it is stopped
//! with `pg_ctl stop`, which signals the PID in the cluster's own `postmaster.pid`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::process::free_port;

/// The password of the `postgres` superuser in every test cluster (host connections use
/// SCRAM-SHA-256; the Unix socket in the cluster directory trusts).
pub const SUPERUSER_PASSWORD: &str = "test-superuser-secret";

/// Where the server binaries are: `$TIDEMARK_PG_BIN`, else Debian's PostgreSQL 15.
///
/// # Panics
/// When `initdb` is not there, with the command that installs it.
pub fn pg_bin() -> PathBuf {
    let dir = std::env::var_os("TIDEMARK_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
    assert!(
        dir.join("initdb").is_file(),
        "PostgreSQL 15 is needed by this test and {} has no initdb; install it with: \
         apt-get install postgresql-15 (or run .ci/run), or set TIDEMARK_PG_BIN",
        dir.display()
    );
    dir
}

fn is_root() -> bool {
    // The effective uid, from /proc (no libc dependency for one number).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A command run as the cluster's owner: through `runuser -u postgres --` when we are root.
pub fn as_owner(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut cmd: Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("failed to run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A running PostgreSQL cluster in a temporary directory.
#[derive(Debug)]
pub struct Postgres {
    /// Its scratch directory (data directory, socket, log, anything a test puts there).
    pub dir: tempfile::TempDir,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    bin: PathBuf,
    running: bool,
}

impl Postgres {
    /// Create and start a cluster. `extra_conf` lines are appended to `postgresql.conf`.
    ///
    /// # Panics
    /// When PostgreSQL is missing or fails to initialize or start; the message has its log.
    pub fn start(extra_conf: &[&str]) -> Postgres {
        let bin = pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("tidemark-pg-")
            .tempdir()
            .expect("tempdir");
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).expect("write pwfile");
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:postgres"]).arg(dir.path());
                    c
                },
                "chown of the cluster directory",
            );
        }
        let mut initdb = as_owner(&bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                // As CloudNativePG and PostgreSQL 18 do by default; backups check them.
                "--data-checksums",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        run(initdb, "initdb");
        let port = free_port();
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = replica\nmax_wal_senders = 10\nfsync = off\nsynchronous_commit = on\n\
             log_min_messages = info\n",
            dir.path().display()
        );
        for l in extra_conf {
            conf.push_str(l);
            conf.push('\n');
        }
        let conf_path = dir.path().join("data/postgresql.conf");
        let mut base = std::fs::read_to_string(&conf_path).expect("read postgresql.conf");
        base.push_str(&conf);
        std::fs::write(&conf_path, base).expect("write postgresql.conf");
        // Replication connections from 127.0.0.1 (initdb allows them only for local sockets).
        let hba = dir.path().join("data/pg_hba.conf");
        let mut h = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
        h.push_str("host replication all 127.0.0.1/32 scram-sha-256\n");
        std::fs::write(&hba, h).expect("write pg_hba.conf");
        let mut pg = Postgres {
            dir,
            port,
            bin,
            running: false,
        };
        pg.start_server();
        pg
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The binaries' directory.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// The server log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Write a file the server's user can read (a password file, a config), mode 0600.
    pub fn write_private(&self, name: &str, content: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.dir.path().join(name);
        std::fs::write(&p, content).expect("write private file");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg("postgres:postgres").arg(&p);
                    c
                },
                "chown",
            );
        }
        p
    }

    /// Start the server (after `stop`, or a changed configuration).
    ///
    /// # Panics
    /// When it does not start; the message has its log.
    pub fn start_server(&mut self) {
        let mut c = as_owner(&self.bin.join("pg_ctl"));
        c.arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-w", "-t", "60", "start"]);
        let out = c.output().expect("run pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed ({}); log:\n{}",
            out.status,
            self.log()
        );
        self.running = true;
    }

    /// Stop the server: `fast` (clean) or `immediate` (as if it crashed).
    pub fn stop(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        let mut c = as_owner(&self.bin.join("pg_ctl"));
        c.arg("-D")
            .arg(self.data_dir())
            .args(["-m", mode, "-w", "stop"]);
        let _ = c.output();
        self.running = false;
    }

    /// psql on the Unix socket as the superuser in `db`, stopping at the first error.
    fn psql_base(&self, db: &str) -> Command {
        let mut c = Command::new(self.bin.join("psql"));
        c.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db]);
        c
    }

    /// psql running `sql` in `db`, unaligned and without headers.
    fn psql_command(&self, db: &str, sql: &str) -> Command {
        let mut c = self.psql_base(db);
        c.args(["-A", "-t", "-c", sql]);
        c
    }

    /// Start psql running the script `path` in `db` in the background (a workload), its output
    /// discarded.
    ///
    /// # Panics
    /// When psql cannot be started.
    pub fn spawn_psql_file(&self, db: &str, path: &Path) -> std::process::Child {
        self.psql_base(db)
            .args(["-o", "/dev/null", "-f"])
            .arg(path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start psql")
    }

    /// Run SQL through psql; the output.
    ///
    /// # Panics
    /// When psql fails; the message has its output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = run(self.psql_command(db, sql), &format!("psql {sql:?}"));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The cluster's system identifier, as the WAL archive's paths name it.
    pub fn system_id(&self) -> String {
        self.psql(
            "postgres",
            "SELECT system_identifier FROM pg_control_system()",
        )
    }

    /// Switch to a new WAL segment and wait until the archiver has archived the one written
    /// so far; returns its name.
    pub fn archive_now(&self, timeout: std::time::Duration) -> String {
        let last = self.psql("postgres", "SELECT pg_walfile_name(pg_current_wal_lsn())");
        self.psql("postgres", "SELECT pg_switch_wal()");
        self.wait_for(
            "postgres",
            &format!("SELECT last_archived_wal >= '{last}' FROM pg_stat_archiver"),
            "t",
            timeout,
        );
        last
    }

    /// Run SQL until it returns `want`, or panic after `timeout` with the last answer and the log.
    pub fn wait_for(&self, db: &str, sql: &str, want: &str, timeout: std::time::Duration) {
        let start = std::time::Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            let mut c = self.psql_command(db, sql);
            if let Ok(out) = c.output() {
                last = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                if out.status.success() && last == want {
                    return;
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!(
            "{sql:?} did not return {want:?} within {timeout:?} (last: {last:?}); log:\n{}",
            self.log()
        );
    }

    /// Give `path` (recursively) to the cluster's owner, so the server and its
    /// archive_command can use it.
    pub fn give(&self, path: &Path) {
        if is_root() {
            let mut c = Command::new("chown");
            c.args(["-R", "postgres:postgres"]).arg(path);
            run(c, "chown");
        }
    }

    /// Turn TLS on (a reload, no restart) with a server certificate for `127.0.0.1` signed by
    /// a throwaway certificate authority, and refuse every TCP connection without TLS (socket
    /// connections, which `psql` here uses, still work). The role `certuser`, when a test
    /// creates it, logs in with the client certificate `tls/client.crt` (key
    /// `tls/client.key`, mode 0600) and nothing else. Returns the CA certificate (PEM)
    /// and the certificate of a second, unrelated CA, both made with Debian's `openssl`.
    ///
    /// # Panics
    /// When `openssl` fails.
    pub fn enable_tls(&self) -> (PathBuf, PathBuf) {
        let d = self.dir.path().join("tls");
        std::fs::create_dir_all(&d).expect("create the TLS directory");
        let openssl = |args: &[&str]| {
            let mut c = Command::new("openssl");
            c.current_dir(&d).args(args);
            run(c, "openssl");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let (key, crt, subj) = (
                format!("{ca}.key"),
                format!("{ca}.crt"),
                format!("/CN=tidemark test {ca}"),
            );
            let mut a = vec!["req", "-x509", "-days", "2", "-subj", &subj];
            a.extend_from_slice(&ec);
            a.extend_from_slice(&["-keyout", &key, "-out", &crt]);
            openssl(&a);
        }
        // A key and a certificate signed by the CA, X.509 v3 (the extensions make it v3;
        // openssl makes v1 without them, which rustls refuses).
        let issue = |name: &str, subject: &str, extensions: &str| {
            let (key, csr, crt, cnf) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.cnf"),
            );
            std::fs::write(d.join(&cnf), extensions).expect("write the extensions file");
            let mut a = vec!["req", "-subj", subject];
            a.extend_from_slice(&ec);
            a.extend_from_slice(&["-keyout", &key, "-out", &csr]);
            openssl(&a);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &cnf,
                "-out",
                &crt,
            ]);
        };
        issue(
            "server",
            "/CN=127.0.0.1",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        // For the role `certuser`, which logs in by certificate only.
        issue("client", "/CN=certuser", "extendedKeyUsage=clientAuth\n");
        {
            use std::os::unix::fs::PermissionsExt;
            for key in ["server.key", "client.key"] {
                std::fs::set_permissions(d.join(key), std::fs::Permissions::from_mode(0o600))
                    .expect("chmod a key");
            }
        }
        self.give(&d);
        let hba = self.data_dir().join("pg_hba.conf");
        let h = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
        std::fs::write(
            &hba,
            format!(
                "hostnossl all all 0.0.0.0/0 reject\nhostnossl replication all 0.0.0.0/0 reject\n\
                 hostssl all certuser 0.0.0.0/0 cert\nhostssl replication certuser 0.0.0.0/0 cert\n{h}"
            ),
        )
        .expect("write pg_hba.conf");
        // One statement per call: ALTER SYSTEM refuses to run inside a transaction.
        for (name, value) in [
            ("ssl_cert_file", d.join("server.crt")),
            ("ssl_key_file", d.join("server.key")),
            ("ssl_ca_file", d.join("ca.crt")),
        ] {
            self.psql(
                "postgres",
                &format!("ALTER SYSTEM SET {name} = '{}'", value.display()),
            );
        }
        self.psql("postgres", "ALTER SYSTEM SET ssl = on");
        self.psql("postgres", "SELECT pg_reload_conf()");
        self.wait_for(
            "postgres",
            "SHOW ssl",
            "on",
            std::time::Duration::from_secs(10),
        );
        (d.join("ca.crt"), d.join("other-ca.crt"))
    }

    /// A streaming-replication standby of this (running) server, in its own directory and on
    /// its own port, started; `extra_conf` lines go into its `postgresql.auto.conf`.
    ///
    /// # Panics
    /// When pg_basebackup or the start fails.
    pub fn start_standby(&self, extra_conf: &[&str]) -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("tidemark-pg-standby-")
            .tempdir()
            .expect("tempdir");
        self.give(dir.path());
        let data = dir.path().join("data");
        let mut c = as_owner(&self.bin.join("pg_basebackup"));
        c.arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync", "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-U", "postgres"]);
        run(c, "pg_basebackup for a standby");
        let port = free_port();
        let auto = data.join("postgresql.auto.conf");
        let mut conf = std::fs::read_to_string(&auto).expect("read postgresql.auto.conf");
        conf.push_str(&format!(
            "port = {port}\nunix_socket_directories = '{}'\n",
            dir.path().display()
        ));
        for l in extra_conf {
            conf.push_str(l);
            conf.push('\n');
        }
        std::fs::write(&auto, conf).expect("write postgresql.auto.conf");
        self.give(dir.path());
        let mut pg = Postgres {
            dir,
            port,
            bin: self.bin.clone(),
            running: false,
        };
        pg.start_server();
        pg
    }

    /// Promote a standby and wait until it accepts writes.
    ///
    /// # Panics
    /// When pg_ctl promote fails.
    pub fn promote(&self) {
        let mut c = as_owner(&self.bin.join("pg_ctl"));
        c.arg("-D").arg(self.data_dir()).args(["-w", "promote"]);
        run(c, "pg_ctl promote");
    }

    /// Take a base backup of the running server into `dest` with pg_basebackup (WAL not
    /// included: it must come from the archive).
    pub fn base_backup(&self, dest: &Path) {
        let mut c = as_owner(&self.bin.join("pg_basebackup"));
        c.arg("-D")
            .arg(dest)
            .args(["-X", "none", "-c", "fast", "--no-sync", "-h"])
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string(), "-U", "postgres"]);
        run(c, "pg_basebackup");
    }

    /// Replace the data directory with `other` (the old one is kept as `data.old`); the
    /// server must be stopped.
    pub fn swap_data_dir(&self, other: &Path) {
        assert!(
            !self.running,
            "stop the server before swapping its data directory"
        );
        let old = self.dir.path().join("data.old");
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(self.data_dir(), &old).expect("move the data directory aside");
        std::fs::rename(other, self.data_dir()).expect("move the new data directory in");
    }

    /// Move the data directory aside (to `data.old`) so that a restore can create it anew; the
    /// server must be stopped.
    pub fn clear_data_dir(&self) {
        assert!(
            !self.running,
            "stop the server before moving its data directory"
        );
        let old = self.dir.path().join("data.old");
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(self.data_dir(), &old).expect("move the data directory aside");
    }

    /// Note that something else (`tidemark pg restore --start`) started the server, so that
    /// `stop` and drop stop it.
    pub fn started_elsewhere(&mut self) {
        self.running = true;
    }

    /// libpq environment for a TCP connection as the superuser, except the password.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PGHOST", "127.0.0.1".into()),
            ("PGPORT", self.port.to_string()),
            ("PGUSER", "postgres".into()),
        ]
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop("immediate");
    }
}
