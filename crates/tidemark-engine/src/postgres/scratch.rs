//! A throwaway PostgreSQL server for verification restores: a new cluster (`initdb`, a random
//! password, SCRAM), or a restored data directory, in a private temporary directory, listening
//! on 127.0.0.1 at a free port with its socket in that directory and durability off. It is
//! stopped (`pg_ctl stop -m immediate`) and its directory removed when dropped.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::conn::{ConnOptions, PasswordSource, SslMode};
use super::Postgres;
use crate::{Error, Result};

/// The role a new scratch cluster is made with.
const ROLE: &str = "tidemark_verify";

/// How to make a scratch server.
#[derive(Debug, Clone)]
pub struct ScratchOptions {
    /// The directory of the server's programs (`initdb`, `pg_ctl`, `pg_restore`): the same
    /// major version as the backup.
    pub bin_dir: PathBuf,
    /// Run the server as this operating-system user (needed when tidemark runs as root).
    pub os_user: Option<String>,
    /// Where the temporary directory goes.
    pub parent: PathBuf,
    /// Give up on starting after this long.
    pub timeout: Duration,
}

/// A running throwaway server.
#[derive(Debug)]
pub struct Scratch {
    dir: tempfile::TempDir,
    data: PathBuf,
    o: ScratchOptions,
    port: u16,
    running: bool,
}

fn fail(what: &str, reason: impl std::fmt::Display) -> Error {
    Error::Database {
        action: "run the scratch server for",
        database: what.to_owned(),
        reason: reason.to_string(),
    }
}

fn io(action: &'static str, path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        action,
        path: path.display().to_string(),
        source: e,
    }
}

impl Scratch {
    /// A new, empty cluster, started.
    ///
    /// # Errors
    /// `Database` with the tool's output when initdb or the start fails; `Io`.
    pub fn init(o: &ScratchOptions) -> Result<Scratch> {
        let mut s = Scratch::empty(o)?;
        let pwfile = s.password_file();
        let mut secret = [0u8; 18];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut secret))
            .map_err(|e| io("read", Path::new("/dev/urandom"), e))?;
        write_private(&pwfile, &format!("{}\n", hex::encode(secret)))?;
        s.give_to_user()?;
        let out = s
            .command(&o.bin_dir.join("initdb"))
            .arg("-D")
            .arg(&s.data)
            .args([
                "-U",
                ROLE,
                "--auth=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .args(["--locale=C"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .map_err(|e| fail("initdb", format!("cannot run initdb: {e}")))?;
        if !out.status.success() {
            return Err(fail(
                "initdb",
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        s.start()?;
        Ok(s)
    }

    /// A directory to restore a data directory into (`data_dir`); then `start_restored`.
    ///
    /// # Errors
    /// `Io`.
    pub fn empty(o: &ScratchOptions) -> Result<Scratch> {
        std::fs::create_dir_all(&o.parent).map_err(|e| io("create", &o.parent, e))?;
        let dir = tempfile::Builder::new()
            .prefix("tidemark-verify-")
            .tempdir_in(&o.parent)
            .map_err(|e| io("create a directory in", &o.parent, e))?;
        let data = dir.path().join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| io("find a free port on", Path::new("127.0.0.1"), e))?
            .port();
        Ok(Scratch {
            dir,
            data,
            o: o.clone(),
            port,
            running: false,
        })
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    fn password_file(&self) -> PathBuf {
        self.dir.path().join("password")
    }

    fn command(&self, program: &Path) -> Command {
        match &self.o.os_user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn give_to_user(&self) -> Result<()> {
        let Some(u) = &self.o.os_user else {
            return Ok(());
        };
        let out = Command::new("chown")
            .arg("-R")
            .arg(format!("{u}:"))
            .arg(self.dir.path())
            .output()
            .map_err(|e| fail("chown", e))?;
        if !out.status.success() {
            return Err(fail(
                "chown",
                format!(
                    "cannot give {} to {u:?}: {}",
                    self.dir.path().display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(())
    }

    /// The settings that make the server private and fast to throw away.
    fn settings(&self) -> String {
        format!(
            "\n# tidemark verification (scratch server)\nlisten_addresses = '127.0.0.1'\nport = {}\n\
             unix_socket_directories = '{}'\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\narchive_mode = off\narchive_command = ''\n",
            self.port,
            self.dir.path().display()
        )
    }

    fn start(&mut self) -> Result<()> {
        let conf = self.data.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
        text.push_str(&self.settings());
        std::fs::write(&conf, text).map_err(|e| io("write", &conf, e))?;
        self.give_to_user()?;
        let log = self.dir.path().join("server.log");
        let out = self
            .command(&self.o.bin_dir.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&log)
            .args(["-o", "-c lc_messages=C", "-w", "-t"])
            .arg(self.o.timeout.as_secs().max(1).to_string())
            .arg("start")
            .output()
            .map_err(|e| fail("pg_ctl", format!("cannot run pg_ctl: {e}")))?;
        self.running = true;
        if !out.status.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = tail.lines().collect();
            return Err(fail(
                "pg_ctl start",
                format!(
                    "{}\n{}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    lines[lines.len().saturating_sub(10)..].join("\n")
                ),
            ));
        }
        Ok(())
    }

    /// Start a data directory restored into `data_dir` (recovery configured by the caller,
    /// WAL archiving off) and follow its recovery to the end.
    ///
    /// # Errors
    /// As `start::start_and_wait`.
    pub fn start_recovery(&mut self) -> Result<super::start::StartReport> {
        let conf = self.data.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
        text.push_str(&self.settings());
        std::fs::write(&conf, text).map_err(|e| io("write", &conf, e))?;
        self.give_to_user()?;
        self.running = true;
        super::start::start_and_wait(
            &self.data,
            &super::start::StartOptions {
                pg_ctl: self.o.bin_dir.join("pg_ctl"),
                os_user: self.o.os_user.clone(),
                timeout: self.o.timeout,
            },
        )
    }

    /// The private directory the server lives in (for tablespaces of a restore).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Reach the server: as the scratch role of a new cluster.
    pub fn postgres(&self) -> Postgres {
        let mut pg = Postgres::new(ConnOptions {
            host: "127.0.0.1".into(),
            port: self.port,
            user: ROLE.into(),
            dbname: "postgres".into(),
            sslmode: SslMode::Disable,
            password: PasswordSource::File(self.password_file()),
            ..Default::default()
        });
        pg.bin_dir = Some(self.o.bin_dir.clone());
        pg
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .command(&self.o.bin_dir.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| io("write", path, e))
}
