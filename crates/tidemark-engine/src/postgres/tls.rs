//! TLS for tidemark's own PostgreSQL connections, with libpq's `sslmode` meanings (pitr.md
//! §10): `prefer` and `require` encrypt without checking the certificate (`require` checks it
//! against `sslrootcert` when one is set, as libpq does when its root file exists),
//! `verify-ca` checks the chain, `verify-full` the chain and the host name. rustls with the
//! ring provider, already in the build for object storage.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::conn::{ConnOptions, SslMode};

/// The byte stream under a connection: plain TCP, TLS over it, or a Unix socket (where, as
/// in libpq, TLS is never asked for).
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Unix(tokio::net::UnixStream),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Why TLS could not be set up; the caller adds the server.
#[derive(Debug)]
pub(super) enum TlsFailure {
    Io(std::io::Error),
    /// A message for the user.
    Refused(String),
}

/// The `SSLRequest` message: length 8, code 1234.5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Ask for TLS as `opts.sslmode` says and set it up.
pub(super) async fn negotiate(
    mut tcp: TcpStream,
    opts: &ConnOptions,
) -> Result<Stream, TlsFailure> {
    if matches!(opts.sslmode, SslMode::Disable | SslMode::Allow) {
        return Ok(Stream::Plain(tcp));
    }
    // Built before anything is sent, so that a missing root certificate is reported as such.
    let config = client_config(opts)?;
    tcp.write_all(&SSL_REQUEST).await.map_err(TlsFailure::Io)?;
    // Exactly one byte: anything the server (or a man in the middle) sent after it is read
    // as part of the TLS handshake, never as plaintext protocol messages.
    let answer = tcp.read_u8().await.map_err(TlsFailure::Io)?;
    match answer {
        b'S' => {}
        b'N' if opts.sslmode == SslMode::Prefer => return Ok(Stream::Plain(tcp)),
        b'N' => {
            return Err(TlsFailure::Refused(format!(
            "the server does not accept TLS connections (ssl = off) and sslmode={} requires one; \
                 enable ssl on the server or lower sslmode on a trusted network",
            opts.sslmode.as_str()
        )))
        }
        other => {
            return Err(TlsFailure::Refused(format!(
                "the server answered the TLS request with {other:#04x}, not S or N"
            )))
        }
    }
    let name = ServerName::try_from(opts.host.clone()).map_err(|e| {
        TlsFailure::Refused(format!("{:?} is not a host name for TLS: {e}", opts.host))
    })?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| {
            TlsFailure::Refused(format!(
                "the TLS handshake failed (sslmode={}): {e}",
                opts.sslmode.as_str()
            ))
        })?;
    Ok(Stream::Tls(Box::new(tls)))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where the trusted certificates come from: `sslrootcert`, else libpq's default
/// `~/.postgresql/root.crt` when it exists; `system` means the system's store.
fn root_file(opts: &ConnOptions) -> Option<PathBuf> {
    opts.sslrootcert.clone().or_else(|| {
        let home = std::env::var_os("HOME")?;
        let p = PathBuf::from(home).join(".postgresql/root.crt");
        p.exists().then_some(p)
    })
}

fn roots(path: &std::path::Path) -> Result<rustls::RootCertStore, TlsFailure> {
    let mut store = rustls::RootCertStore::empty();
    if path.as_os_str() == "system" {
        let found = rustls_native_certs::load_native_certs();
        store.add_parsable_certificates(found.certs);
    } else {
        let text = std::fs::read(path).map_err(|e| {
            TlsFailure::Refused(format!(
                "cannot read the root certificate file {} (sslrootcert): {e}",
                path.display()
            ))
        })?;
        for cert in rustls_pemfile::certs(&mut text.as_slice()) {
            let cert = cert.map_err(|e| {
                TlsFailure::Refused(format!(
                    "the root certificate file {} does not parse as PEM: {e}",
                    path.display()
                ))
            })?;
            store.add(cert).map_err(|e| {
                TlsFailure::Refused(format!(
                    "a certificate in {} is not usable as a root: {e}",
                    path.display()
                ))
            })?;
        }
    }
    if store.is_empty() {
        return Err(TlsFailure::Refused(format!(
            "no certificate was found in {} (sslrootcert)",
            path.display()
        )));
    }
    Ok(store)
}

fn client_config(opts: &ConnOptions) -> Result<rustls::ClientConfig, TlsFailure> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFailure::Refused(format!("TLS cannot be configured: {e}")))?;
    let root = root_file(opts);
    let verifier: Arc<dyn ServerCertVerifier> = match (opts.sslmode, root) {
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(TlsFailure::Refused(format!(
                "sslmode={} needs the certificate authority that signed the server's \
                 certificate: set sslrootcert in the URL, --pg-sslrootcert or PGSSLROOTCERT \
                 (or `system` for the system's store); ~/.postgresql/root.crt does not exist",
                opts.sslmode.as_str()
            )))
        }
        (SslMode::Disable | SslMode::Allow | SslMode::Prefer, _) | (SslMode::Require, None) => {
            Arc::new(Unverified(provider()))
        }
        (mode, Some(root)) => {
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots(&root)?), provider())
                    .build()
                    .map_err(|e| TlsFailure::Refused(format!("TLS cannot be configured: {e}")))?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match client_identity(opts)? {
        None => Ok(builder.with_no_client_auth()),
        Some((chain, key, path)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
            TlsFailure::Refused(format!(
                "the client certificate {} and its key cannot be used: {e}",
                path.display()
            ))
        }),
    }
}

/// The file named by `set`, or libpq's default under `~/.postgresql/` when it exists; and
/// whether it was named.
fn named_or_default(set: Option<&PathBuf>, default: &str) -> Option<(PathBuf, bool)> {
    if let Some(p) = set {
        return Some((p.clone(), true));
    }
    let p = PathBuf::from(std::env::var_os("HOME")?)
        .join(".postgresql")
        .join(default);
    p.exists().then_some((p, false))
}

type Identity = (
    Vec<CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
    PathBuf,
);

/// The client certificate chain and key, when there is a certificate (`sslcert`, else
/// `~/.postgresql/postgresql.crt`). A named file that cannot be read is an error; so is a key
/// others may read (libpq's rule: no group or other access, or group read when root owns it).
fn client_identity(opts: &ConnOptions) -> Result<Option<Identity>, TlsFailure> {
    let Some((cert_path, _)) = named_or_default(opts.sslcert.as_ref(), "postgresql.crt") else {
        return Ok(None);
    };
    let refused = |what: String| TlsFailure::Refused(what);
    let text = std::fs::read(&cert_path).map_err(|e| {
        refused(format!(
            "cannot read the client certificate {} (sslcert): {e}",
            cert_path.display()
        ))
    })?;
    let chain = rustls_pemfile::certs(&mut text.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            refused(format!(
                "the client certificate {} does not parse as PEM: {e}",
                cert_path.display()
            ))
        })?;
    if chain.is_empty() {
        return Err(refused(format!(
            "no certificate was found in {} (sslcert)",
            cert_path.display()
        )));
    }
    let key_path = match named_or_default(opts.sslkey.as_ref(), "postgresql.key") {
        Some((p, _)) => p,
        None => {
            return Err(refused(format!(
                "the client certificate {} has no key: set sslkey in the URL, --sslkey or PGSSLKEY",
                cert_path.display()
            )))
        }
    };
    let cannot = |e: std::io::Error| {
        refused(format!(
            "cannot read the client key {} (sslkey): {e}",
            key_path.display()
        ))
    };
    let file = std::fs::File::open(&key_path).map_err(cannot)?;
    {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata().map_err(cannot)?;
        // /proc/self belongs to this process's effective user.
        let me = std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid());
        let mine = meta.uid() == me;
        let loose = if mine { 0o077 } else { 0o037 };
        if meta.mode() & loose != 0 {
            return Err(refused(format!(
                "the client key {} may be read by others (mode {:o}); allow only its owner: chmod 600 {}",
                key_path.display(),
                meta.mode() & 0o777,
                key_path.display()
            )));
        }
    }
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(file))
        .map_err(cannot)?
        .ok_or_else(|| {
            refused(format!(
                "no private key was found in {} (sslkey)",
                key_path.display()
            ))
        })?;
    Ok(Some((chain, key, cert_path)))
}

/// `prefer` and `require` without a root certificate: encrypted, the peer not authenticated
/// (libpq's meaning). The handshake's signatures are still checked.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name in the certificate is not
/// compared with the host.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
