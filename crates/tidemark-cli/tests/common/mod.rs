//! Support shared by the agent tests: the agent process, a tiny HTTP client, and a parser
//! for Prometheus's text format.
#![allow(dead_code)]

pub mod pg;

use std::io::{Read, Write};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The agent process; killed if a test fails before stopping it.
pub struct Agent(pub Option<Child>);

impl Agent {
    pub fn pid(&self) -> i32 {
        self.0.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// SIGTERM, then the exit status within `secs`.
    pub fn stop(mut self, secs: u64) -> std::process::ExitStatus {
        self.signal("-TERM");
        let mut child = self.0.take().unwrap();
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > end {
                let _ = child.kill();
                panic!("the agent did not stop within {secs}s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill9(mut self) {
        let mut child = self.0.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn try_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

pub fn get(port: u16, path: &str) -> (u16, String) {
    try_get(port, path).unwrap_or_else(|| panic!("GET {path} failed"))
}

/// A sample: metric name, labels, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Check Prometheus's text format 0.0.4 strictly enough to catch what a scraper rejects:
/// HELP/TYPE before a family's samples, each family once, metric and label names valid,
/// label values quoted and escaped, values that parse as floats. Returns (name, labels, value).
pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    fn valid_name(n: &str) -> bool {
        !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut typed: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a name and a kind");
            assert!(valid_name(name), "bad metric name {name:?}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                !typed.contains(&name.to_owned()),
                "family {name} declared twice"
            );
            typed.push(name.to_owned());
            current = Some(name.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let mut labels = Vec::new();
                let mut chars = body.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    assert!(valid_name(&key), "bad label name {key:?} in {line:?}");
                    assert_eq!(chars.next(), Some('"'), "unquoted label value in {line:?}");
                    let mut v = String::new();
                    loop {
                        match chars.next() {
                            Some('\\') => v.push(chars.next().expect("escape")),
                            Some('"') => break,
                            Some(c) => v.push(c),
                            None => panic!("unterminated label value in {line:?}"),
                        }
                    }
                    labels.push((key, v));
                    if chars.peek() == Some(&',') {
                        chars.next();
                    }
                }
                (n, labels)
            }
            None => (series, vec![]),
        };
        assert_eq!(
            current.as_deref(),
            Some(name),
            "sample {name} outside its family"
        );
        out.push((name.to_owned(), labels, value));
    }
    out
}

pub fn metric(samples: &[Sample], name: &str) -> Option<f64> {
    samples.iter().find(|s| s.0 == name).map(|s| s.2)
}

/// A local HTTP server that records the bodies POSTed to it (a webhook receiver). It answers
/// 500 to the first `fail_first` requests, then 200.
pub struct Receiver {
    pub port: u16,
    pub received: std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>,
    pub requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Receiver {
    pub fn start(fail_first: usize) -> Receiver {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (r, n) = (received.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head, body) = loop {
                    let Ok(k) = s.read(&mut chunk) else {
                        break (String::new(), Vec::new());
                    };
                    if k == 0 {
                        break (String::new(), Vec::new());
                    }
                    buf.extend_from_slice(&chunk[..k]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).into_owned();
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse().ok())?
                            })
                            .unwrap_or(0);
                        let mut body = buf[i + 4..].to_vec();
                        while body.len() < len {
                            let Ok(k) = s.read(&mut chunk) else { break };
                            if k == 0 {
                                break;
                            }
                            body.extend_from_slice(&chunk[..k]);
                        }
                        break (head, body);
                    }
                };
                let seen = n.fetch_add(1, Ordering::SeqCst);
                let status = if seen < fail_first {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                if seen >= fail_first {
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    if let Ok(v) = serde_json::from_slice(&body) {
                        r.lock().unwrap().push((path, v));
                    }
                }
            }
        });
        Receiver {
            port,
            received,
            requests,
        }
    }

    pub fn bodies(&self, path_prefix: &str) -> Vec<serde_json::Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.starts_with(path_prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// Flip one byte in the middle of every pack of the repository at `repo`.
pub fn corrupt_packs(repo: &std::path::Path) {
    let mut n = 0;
    let mut stack = vec![repo.join("data")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let mut b = std::fs::read(&p).unwrap();
                let i = b.len() / 2;
                b[i] ^= 0x40;
                std::fs::write(&p, b).unwrap();
                n += 1;
            }
        }
    }
    assert!(n > 0, "no pack to corrupt");
}

/// Run the tidemark binary with nothing from the environment but PATH, and the CLI config file
/// `config` (repository and password file).
pub fn tidemark(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tidemark"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TIDEMARK_CONFIG", config)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}
