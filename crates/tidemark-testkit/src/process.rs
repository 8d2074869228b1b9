//! Starting and stopping server processes for tests.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound, then released for the server to take).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port on 127.0.0.1");
    l.local_addr().expect("local address").port()
}

/// Find a server binary: the environment variable `env` if set, else `name` on PATH.
///
/// # Panics
/// When the binary cannot be found, with the command that installs it.
pub fn find_binary(env: &str, name: &str, install: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("{name} is needed by this test and was not found on PATH or in ${env}; install it with: {install} (or run .ci/run)");
}

/// A running server process, killed by PID when dropped, with its temporary directory.
#[derive(Debug)]
pub struct Server {
    child: Child,
    /// The port it listens on, on 127.0.0.1.
    pub port: u16,
    /// Its scratch directory, removed when dropped.
    pub dir: tempfile::TempDir,
    name: String,
}

impl Server {
    /// Start `cmd` (stdout and stderr to files in `dir`) and wait until `port` accepts connections.
    ///
    /// # Panics
    /// When the process cannot start or does not listen within 60 seconds.
    pub fn start(name: &str, mut cmd: Command, port: u16, dir: tempfile::TempDir) -> Server {
        let log = std::fs::File::create(dir.path().join("server.log")).expect("create server log");
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {name}: {e}"));
        let mut server = Server {
            child,
            port,
            dir,
            name: name.to_owned(),
        };
        server.wait_listening(Duration::from_secs(60));
        server
    }

    fn wait_listening(&mut self, limit: Duration) {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before listening; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} did not listen on 127.0.0.1:{} within {limit:?}; log:\n{}",
            self.name,
            self.port,
            self.log()
        );
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The server's base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
