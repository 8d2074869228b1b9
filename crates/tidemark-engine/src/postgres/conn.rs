//! Connection settings, resolved the way libpq resolves them, and handed to PostgreSQL's own
//! tools without the password ever reaching a command line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use zeroize::Zeroizing;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS only if the server insists.
    Allow,
    /// TLS if the server offers it (libpq's default).
    #[default]
    Prefer,
    /// TLS, no certificate check.
    Require,
    /// TLS, the certificate chain checked.
    VerifyCa,
    /// TLS, chain and host name checked.
    VerifyFull,
}

impl SslMode {
    /// Parse libpq's spelling.
    ///
    /// # Errors
    /// A message naming the allowed values.
    pub fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ))
            }
        })
    }

    /// libpq's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the password comes from. Never a literal on the command line or in a URL.
#[derive(Debug, Clone, Default)]
pub enum PasswordSource {
    /// The first line of this file.
    File(PathBuf),
    /// `PGPASSWORD`, then the passfile (`PGPASSFILE` or `~/.pgpass`), as libpq does.
    #[default]
    Environment,
}

/// How to reach one PostgreSQL server. `Debug` shows no secret (there is none in here).
#[derive(Debug, Clone)]
pub struct ConnOptions {
    /// Host name or address (TCP).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Role to log in as.
    pub user: String,
    /// Database for queries and single-database dumps.
    pub dbname: String,
    /// TLS mode.
    pub sslmode: SslMode,
    /// The certificate authorities trusted for `verify-ca`/`verify-full` (PEM), or `system`;
    /// `None` is libpq's default, `~/.postgresql/root.crt`.
    pub sslrootcert: Option<PathBuf>,
    /// The client certificate (PEM, chain allowed) for servers that authenticate by
    /// certificate (`cert` in pg_hba.conf); `None` is libpq's default,
    /// `~/.postgresql/postgresql.crt` when it exists.
    pub sslcert: Option<PathBuf>,
    /// Its private key (PEM); `None` is `~/.postgresql/postgresql.key`.
    pub sslkey: Option<PathBuf>,
    /// The password's source.
    pub password: PasswordSource,
    /// How long to wait for the TCP connection.
    pub connect_timeout: Duration,
}

impl Default for ConnOptions {
    fn default() -> Self {
        ConnOptions {
            host: "localhost".into(),
            port: 5432,
            user: "postgres".into(),
            dbname: "postgres".into(),
            sslmode: SslMode::Prefer,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            password: PasswordSource::Environment,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Percent-decoding for URL components.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 after decoding"))
}

impl ConnOptions {
    /// Defaults overridden by the libpq environment (`PGHOST`, `PGPORT`, `PGUSER`,
    /// `PGDATABASE`, `PGSSLMODE`, `PGSSLROOTCERT`, `PGCONNECT_TIMEOUT`).
    ///
    /// # Errors
    /// A message naming the variable that does not parse.
    pub fn from_env() -> Result<ConnOptions, String> {
        let mut o = ConnOptions::default();
        if let Some(h) = env("PGHOST") {
            o.host = h;
        }
        if let Some(p) = env("PGPORT") {
            o.port = p
                .parse()
                .map_err(|_| format!("PGPORT={p:?} is not a port number"))?;
        }
        if let Some(u) = env("PGUSER") {
            o.user = u;
        }
        if let Some(d) = env("PGDATABASE") {
            o.dbname = d;
        }
        if let Some(s) = env("PGSSLMODE") {
            o.sslmode = SslMode::parse(&s)?;
        }
        if let Some(r) = env("PGSSLROOTCERT") {
            o.sslrootcert = Some(PathBuf::from(r));
        }
        if let Some(c) = env("PGSSLCERT") {
            o.sslcert = Some(PathBuf::from(c));
        }
        if let Some(k) = env("PGSSLKEY") {
            o.sslkey = Some(PathBuf::from(k));
        }
        if let Some(t) = env("PGCONNECT_TIMEOUT") {
            let secs: u64 = t
                .parse()
                .map_err(|_| format!("PGCONNECT_TIMEOUT={t:?} is not a number of seconds"))?;
            o.connect_timeout = Duration::from_secs(secs.max(2));
        }
        Ok(o)
    }

    /// Apply a libpq URL (`postgresql://user@host:port/dbname?sslmode=require`) over `self`.
    /// A password in the URL is refused: URLs end up in logs, status and process lists.
    ///
    /// # Errors
    /// A message saying what is wrong with the URL.
    pub fn apply_url(&mut self, url: &str) -> Result<(), String> {
        let rest = url
            .strip_prefix("postgresql://")
            .or_else(|| url.strip_prefix("postgres://"))
            .ok_or_else(|| "a PostgreSQL URL starts with postgresql://".to_owned())?;
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let hostport = match authority.rsplit_once('@') {
            Some((userinfo, hp)) => {
                if userinfo.contains(':') {
                    return Err("the URL contains a password; put the password in a file (--pg-password-file) or PGPASSWORD instead".into());
                }
                if !userinfo.is_empty() {
                    self.user = decode(userinfo)?;
                }
                hp
            }
            None => authority,
        };
        if !hostport.is_empty() {
            let (h, p) = if let Some(v6) = hostport.strip_prefix('[') {
                let (h, after) = v6
                    .split_once(']')
                    .ok_or_else(|| "unclosed [ in the URL's host".to_owned())?;
                (h, after.strip_prefix(':'))
            } else {
                match hostport.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (hostport, None),
                }
            };
            if !h.is_empty() {
                self.host = decode(h)?;
            }
            if let Some(p) = p.filter(|p| !p.is_empty()) {
                self.port = p
                    .parse()
                    .map_err(|_| format!("port {p:?} in the URL is not a number"))?;
            }
        }
        let (path, query) = match tail.split_once('?') {
            Some((p, q)) => (p, q),
            None => (tail, ""),
        };
        let db = path.trim_start_matches('/');
        if !db.is_empty() {
            self.dbname = decode(db)?;
        }
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v)?;
            match k {
                "sslmode" => self.sslmode = SslMode::parse(&v)?,
                "sslrootcert" => self.sslrootcert = Some(PathBuf::from(v)),
                "sslcert" => self.sslcert = Some(PathBuf::from(v)),
                "sslkey" => self.sslkey = Some(PathBuf::from(v)),
                "user" => self.user = v,
                "dbname" => self.dbname = v,
                "host" => self.host = v,
                "port" => {
                    self.port = v
                        .parse()
                        .map_err(|_| format!("port {v:?} in the URL is not a number"))?
                }
                "connect_timeout" => {
                    let s: u64 = v
                        .parse()
                        .map_err(|_| format!("connect_timeout {v:?} is not a number"))?;
                    self.connect_timeout = Duration::from_secs(s.max(2));
                }
                "password" => {
                    return Err("the URL contains a password; put the password in a file (--pg-password-file) or PGPASSWORD instead".into())
                }
                "application_name" => {}
                other => {
                    return Err(format!(
                        "URL parameter {other:?} is not supported (use host, port, user, dbname, sslmode, sslrootcert, sslcert, sslkey, connect_timeout)"
                    ))
                }
            }
        }
        Ok(())
    }

    /// The Unix socket to connect to when `host` is a directory (starts with `/`, as in
    /// libpq): `<host>/.s.PGSQL.<port>`.
    pub fn socket_path(&self) -> Option<PathBuf> {
        self.host
            .starts_with('/')
            .then(|| Path::new(&self.host).join(format!(".s.PGSQL.{}", self.port)))
    }

    /// `host:port`, or the socket's path, for messages.
    pub fn server(&self) -> String {
        if let Some(socket) = self.socket_path() {
            return socket.display().to_string();
        }
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The password, if one is configured.
    ///
    /// # Errors
    /// A message naming the file that cannot be read, or saying that no password is set.
    pub fn password(&self) -> Result<Zeroizing<String>, String> {
        match &self.password {
            PasswordSource::File(p) => {
                let text = Zeroizing::new(std::fs::read_to_string(p).map_err(|e| {
                    format!(
                        "cannot read the PostgreSQL password file {}: {e}",
                        p.display()
                    )
                })?);
                let line = text.lines().next().unwrap_or("").to_owned();
                if line.is_empty() {
                    return Err(format!(
                        "the PostgreSQL password file {} is empty",
                        p.display()
                    ));
                }
                Ok(Zeroizing::new(line))
            }
            PasswordSource::Environment => {
                if let Some(p) = env("PGPASSWORD") {
                    return Ok(Zeroizing::new(p));
                }
                let passfile = env("PGPASSFILE")
                    .map(PathBuf::from)
                    .or_else(|| env("HOME").map(|h| Path::new(&h).join(".pgpass")));
                if let Some(f) = passfile {
                    if let Ok(text) = std::fs::read_to_string(&f) {
                        let text = Zeroizing::new(text);
                        if let Some(pw) = passfile_lookup(&text, self) {
                            return Ok(pw);
                        }
                    }
                }
                Err("the server asks for a password and none is configured: use --pg-password-file, PGPASSWORD or a passfile".into())
            }
        }
    }

    /// The environment for PostgreSQL's own tools (`pg_dump`, `pg_restore`, …): the
    /// connection as `PG*` variables, and the password, if any, in a private temporary
    /// passfile named by `PGPASSFILE`. Keep the returned value alive until the child exits.
    ///
    /// # Errors
    /// When the temporary passfile cannot be written.
    pub fn child_env(&self) -> std::io::Result<ChildEnv> {
        let mut vars = vec![
            ("PGHOST".to_owned(), self.host.clone()),
            ("PGPORT".to_owned(), self.port.to_string()),
            ("PGUSER".to_owned(), self.user.clone()),
            ("PGDATABASE".to_owned(), self.dbname.clone()),
            ("PGSSLMODE".to_owned(), self.sslmode.as_str().to_owned()),
            (
                "PGSSLROOTCERT".to_owned(),
                self.sslrootcert
                    .as_ref()
                    .map_or_else(String::new, |p| p.display().to_string()),
            ),
            (
                "PGSSLCERT".to_owned(),
                self.sslcert
                    .as_ref()
                    .map_or_else(String::new, |p| p.display().to_string()),
            ),
            (
                "PGSSLKEY".to_owned(),
                self.sslkey
                    .as_ref()
                    .map_or_else(String::new, |p| p.display().to_string()),
            ),
            (
                "PGCONNECT_TIMEOUT".to_owned(),
                self.connect_timeout.as_secs().max(2).to_string(),
            ),
        ];
        // A configured password file that cannot be read is an error here, not a silent
        // fallback to no password (which would surface later as a confusing login failure).
        let password = match (&self.password, self.password()) {
            (PasswordSource::File(_), Err(e)) => {
                return Err(std::io::Error::new(std::io::ErrorKind::NotFound, e))
            }
            (_, pw) => pw.ok(),
        };
        let mut dir = None;
        if let Some(pw) = password {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let d = tempfile::Builder::new()
                .prefix("tidemark-pgpass-")
                .tempdir()?;
            let path = d.path().join("pgpass");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            let escaped = pw.replace('\\', "\\\\").replace(':', "\\:");
            f.write_all(format!("*:*:*:*:{escaped}\n").as_bytes())?;
            f.sync_all()?;
            vars.push(("PGPASSFILE".to_owned(), path.display().to_string()));
            dir = Some(d);
        }
        Ok(ChildEnv { vars, _dir: dir })
    }
}

/// The `~/.pgpass` format: `host:port:database:user:password`, `*` matches anything, `\`
/// escapes `:` and `\`.
fn passfile_lookup(text: &str, o: &ConnOptions) -> Option<Zeroizing<String>> {
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let port = o.port.to_string();
        let want = [
            o.host.as_str(),
            port.as_str(),
            o.dbname.as_str(),
            o.user.as_str(),
        ];
        if fields[..4]
            .iter()
            .zip(want)
            .all(|(f, w)| f == "*" || f == w)
        {
            return Some(Zeroizing::new(fields.pop().unwrap_or_default()));
        }
    }
    None
}

/// Environment for a child process; holds the temporary passfile until dropped.
#[derive(Debug)]
pub struct ChildEnv {
    vars: Vec<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl ChildEnv {
    /// Set the variables on `cmd`, and remove `PGPASSWORD` so the child reads the passfile.
    pub fn apply(&self, cmd: &mut std::process::Command) {
        cmd.env_remove("PGPASSWORD");
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
    }

    /// The same for a tokio command.
    pub fn apply_tokio(&self, cmd: &mut tokio::process::Command) {
        cmd.env_remove("PGPASSWORD");
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
    }
}

/// How to reach the server. Unset fields come from the libpq environment (PGHOST, PGPORT,
/// PGUSER, PGDATABASE, PGSSLMODE, PGSSLROOTCERT). The password comes from a file, PGPASSWORD or a passfile;
/// never from a flag or a URL.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct ConnSpec {
    /// A libpq URL without a password: postgresql://user@host:port/dbname?sslmode=…
    #[cfg_attr(feature = "clap", arg(long, env = "TIDEMARK_PG_URL"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Host name or address, or the directory of the server's Unix socket (a path starting
    /// with /, as in libpq). Unset connection flags come from PGHOST, PGPORT, PGUSER,
    /// PGDATABASE, PGSSLMODE (and the password from PGPASSFILE or ~/.pgpass), as in libpq.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Port.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// User (role) to connect as.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Database to connect to (and to dump, unless --database or --all).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dbname: Option<String>,
    /// disable, allow, prefer, require, verify-ca or verify-full (libpq's meanings).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslmode: Option<String>,
    /// PEM file of the certificate authorities trusted for verify-ca and verify-full, or
    /// `system`; default ~/.postgresql/root.crt (PGSSLROOTCERT).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<PathBuf>,
    /// Client certificate (PEM) for servers that authenticate by certificate; default
    /// ~/.postgresql/postgresql.crt when it exists (PGSSLCERT).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslcert: Option<PathBuf>,
    /// The client certificate's private key (PEM, mode 0600); default
    /// ~/.postgresql/postgresql.key (PGSSLKEY).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sslkey: Option<PathBuf>,
    /// File whose first line is the PostgreSQL password.
    #[cfg_attr(feature = "clap", arg(long, env = "TIDEMARK_PG_PASSWORD_FILE"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg_password_file: Option<PathBuf>,
    /// Directory of pg_dump, pg_restore, …; default: the server's version under
    /// /usr/lib/postgresql, then PATH.
    #[cfg_attr(feature = "clap", arg(long, env = "TIDEMARK_PG_BIN"))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg_bin: Option<PathBuf>,
}

impl ConnSpec {
    /// The engine these settings reach: the libpq environment first, then the URL, then each
    /// field.
    ///
    /// # Errors
    /// A message naming the setting that is invalid.
    pub fn engine(&self) -> Result<super::Postgres, String> {
        let mut c = ConnOptions::from_env()?;
        if let Some(u) = &self.url {
            c.apply_url(u)?;
        }
        if let Some(h) = &self.host {
            c.host.clone_from(h);
        }
        if let Some(p) = self.port {
            c.port = p;
        }
        if let Some(u) = &self.user {
            c.user.clone_from(u);
        }
        if let Some(d) = &self.dbname {
            c.dbname.clone_from(d);
        }
        if let Some(s) = &self.sslmode {
            c.sslmode = SslMode::parse(s)?;
        }
        if let Some(r) = &self.sslrootcert {
            c.sslrootcert = Some(r.clone());
        }
        if let Some(r) = &self.sslcert {
            c.sslcert = Some(r.clone());
        }
        if let Some(r) = &self.sslkey {
            c.sslkey = Some(r.clone());
        }
        if let Some(f) = &self.pg_password_file {
            c.password = PasswordSource::File(f.clone());
        }
        let mut pg = super::Postgres::new(c);
        pg.bin_dir.clone_from(&self.pg_bin);
        Ok(pg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_sets_the_fields_and_refuses_a_password() {
        let mut o = ConnOptions::default();
        o.apply_url(
            "postgresql://app%40x@db.example:6543/shop?sslmode=require&sslrootcert=/etc/ca%20bundle.pem&sslcert=/c.crt&sslkey=/c.key",
        )
        .unwrap();
        assert_eq!(
            (o.sslcert.as_deref(), o.sslkey.as_deref()),
            (
                Some(std::path::Path::new("/c.crt")),
                Some(std::path::Path::new("/c.key"))
            )
        );
        assert_eq!(
            o.sslrootcert.as_deref(),
            Some(std::path::Path::new("/etc/ca bundle.pem"))
        );
        assert_eq!(
            (o.user.as_str(), o.host.as_str(), o.port, o.dbname.as_str()),
            ("app@x", "db.example", 6543, "shop")
        );
        assert_eq!(o.sslmode, SslMode::Require);
        let mut o = ConnOptions::default();
        let err = o.apply_url("postgresql://app:hunter2@db/shop").unwrap_err();
        assert!(
            err.contains("password") && !err.contains("hunter2"),
            "{err}"
        );
        assert!(o.apply_url("postgresql://db/x?password=hunter2").is_err());
        assert!(o.apply_url("mysql://db").is_err());
        o.apply_url("postgresql://[::1]:7000").unwrap();
        assert_eq!((o.host.as_str(), o.port), ("::1", 7000));
        assert_eq!(o.server(), "[::1]:7000");
    }

    #[test]
    fn passfile_lines_match_with_wildcards_and_escapes() {
        let o = ConnOptions {
            host: "db".into(),
            port: 5432,
            user: "app".into(),
            dbname: "shop".into(),
            ..Default::default()
        };
        let text = "# comment\nother:5432:*:*:no\ndb:5432:*:app:se\\:cr\\\\et\n*:*:*:*:fallback\n";
        assert_eq!(passfile_lookup(text, &o).unwrap().as_str(), "se:cr\\et");
        let o2 = ConnOptions {
            host: "elsewhere".into(),
            ..o
        };
        assert_eq!(passfile_lookup(text, &o2).unwrap().as_str(), "fallback");
    }

    #[test]
    fn the_child_passfile_is_private_and_escaped() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, "a:b\\c\nignored second line").unwrap();
        let o = ConnOptions {
            password: PasswordSource::File(pwfile),
            ..Default::default()
        };
        let env = o.child_env().unwrap();
        let (_, path) = env.vars.iter().find(|(k, _)| k == "PGPASSFILE").unwrap();
        let meta = std::fs::metadata(path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(path).unwrap(),
            "*:*:*:*:a\\:b\\\\c\n"
        );
        assert!(env.vars.iter().all(|(_, v)| !v.contains("a:b")));
        let p = path.clone();
        drop(env);
        assert!(
            !Path::new(&p).exists(),
            "the passfile is removed with the env"
        );
    }
}
