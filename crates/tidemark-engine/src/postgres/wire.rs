//! A small PostgreSQL frontend on the `postgres-protocol` message codec: startup, password
//! authentication (SCRAM-SHA-256, MD5, cleartext), and the simple query protocol in text, in
//! normal and in replication mode. It is what tidemark needs to ask a server about itself and,
//! in replication mode, to stream base backups and WAL; it is not a general client.

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::{backend::Message, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::conn::ConnOptions;
use super::tls::{Stream, TlsFailure};

/// Errors of the connection, with the server named.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// TCP connect, read or write failed.
    #[error("cannot reach PostgreSQL at {server}: {source}; check that the server runs and the host and port are right")]
    Io {
        /// host:port.
        server: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server refused the login.
    #[error("PostgreSQL at {server} refused the login of user {user:?}: {message}; check the user and the password file")]
    Auth {
        /// host:port.
        server: String,
        /// The user.
        user: String,
        /// The server's message.
        message: String,
    },
    /// The server answered a query with an error.
    #[error("PostgreSQL at {server} failed {query:?}: {message}")]
    Query {
        /// host:port.
        server: String,
        /// The statement.
        query: String,
        /// The server's message with its SQLSTATE.
        message: String,
    },
    /// Something the server sent is not what the protocol allows here.
    #[error("PostgreSQL at {server} sent an unexpected message: {what}")]
    Protocol {
        /// host:port.
        server: String,
        /// What was wrong.
        what: String,
    },
    /// TLS was required and could not be set up, or the certificate was not trusted.
    #[error("cannot set up TLS with PostgreSQL at {server}: {reason}")]
    Tls {
        /// host:port.
        server: String,
        /// What failed.
        reason: String,
    },
}

/// One result row: text values, NULL as None.
pub type Row = Vec<Option<String>>;

/// A connection to one server.
pub struct Connection {
    stream: Stream,
    buf: BytesMut,
    server: String,
    /// Server parameters reported at startup (`server_version`, …).
    pub parameters: Vec<(String, String)>,
    /// The server's warnings (NoticeResponse at WARNING), as `WARNING <code>: <message>`; the
    /// first hundred.
    pub warnings: Vec<String>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// The severity (not localized), SQLSTATE and message of an ErrorResponse or NoticeResponse.
fn fields(
    mut fields: postgres_protocol::message::backend::ErrorFields<'_>,
) -> (String, String, String) {
    let (mut severity, mut localized) = (String::new(), String::new());
    let mut code = String::new();
    let mut message = String::new();
    while let Ok(Some(f)) = fields.next() {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'V' => severity = v,
            b'S' => localized = v,
            b'C' => code = v,
            b'M' => message = v,
            _ => {}
        }
    }
    if severity.is_empty() {
        severity = localized;
    }
    (severity, code, message)
}

/// The text of an ErrorResponse: severity, SQLSTATE and message.
pub(crate) fn error_text(body: &postgres_protocol::message::backend::ErrorResponseBody) -> String {
    let (severity, code, message) = fields(body.fields());
    format!("{severity} {code}: {message}")
}

/// The SQLSTATE of an ErrorResponse (`XX001`: data corrupted).
pub fn error_code(body: &postgres_protocol::message::backend::ErrorResponseBody) -> String {
    fields(body.fields()).1
}

/// A connect of `server` that must answer within the connect timeout.
async fn within<T>(
    opts: &ConnOptions,
    server: &str,
    connect: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, WireError> {
    let io = |source| WireError::Io {
        server: server.to_owned(),
        source,
    };
    tokio::time::timeout(opts.connect_timeout, connect)
        .await
        .map_err(|_| {
            io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", opts.connect_timeout),
            ))
        })?
        .map_err(io)
}

impl Connection {
    /// Connect and log in. `replication` opens a physical replication connection
    /// (`replication=true`), in which only replication commands and simple queries work.
    ///
    /// # Errors
    /// `Io` when the server cannot be reached, `Auth` when it refuses the login.
    pub async fn connect(opts: &ConnOptions, replication: bool) -> Result<Connection, WireError> {
        let server = opts.server();
        let stream = if let Some(socket) = opts.socket_path() {
            let s = within(opts, &server, tokio::net::UnixStream::connect(socket)).await?;
            super::tls::Stream::Unix(s)
        } else {
            Self::tcp(opts, &server).await?
        };
        Self::login(opts, replication, server, stream).await
    }

    /// A TCP connection to `opts`, with TLS as its sslmode says.
    async fn tcp(opts: &ConnOptions, server: &str) -> Result<super::tls::Stream, WireError> {
        let server = server.to_owned();
        let connect = TcpStream::connect((opts.host.as_str(), opts.port));
        let stream = within(opts, &server, connect).await?;
        let _ = stream.set_nodelay(true);
        let stream =
            tokio::time::timeout(opts.connect_timeout, super::tls::negotiate(stream, opts))
                .await
                .unwrap_or_else(|_| {
                    Err(TlsFailure::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "no answer to the TLS request within {:?}",
                            opts.connect_timeout
                        ),
                    )))
                })
                .map_err(|f| match f {
                    TlsFailure::Io(source) => WireError::Io {
                        server: server.clone(),
                        source,
                    },
                    TlsFailure::Refused(reason) => WireError::Tls {
                        server: server.clone(),
                        reason,
                    },
                })?;
        Ok(stream)
    }

    async fn login(
        opts: &ConnOptions,
        replication: bool,
        server: String,
        stream: super::tls::Stream,
    ) -> Result<Connection, WireError> {
        let mut c = Connection {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
            server,
            parameters: Vec::new(),
            warnings: Vec::new(),
        };
        let mut params: Vec<(&str, &str)> = vec![
            ("user", opts.user.as_str()),
            ("application_name", "tidemark"),
            ("client_encoding", "UTF8"),
        ];
        if replication {
            params.push(("replication", "true"));
        } else {
            params.push(("database", opts.dbname.as_str()));
        }
        let mut out = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut out).map_err(|e| c.io(e))?;
        c.send(&out).await?;
        c.authenticate(opts).await?;
        Ok(c)
    }

    fn io(&self, source: std::io::Error) -> WireError {
        WireError::Io {
            server: self.server.clone(),
            source,
        }
    }

    fn protocol(&self, what: impl Into<String>) -> WireError {
        WireError::Protocol {
            server: self.server.clone(),
            what: what.into(),
        }
    }

    /// The server's `host:port`.
    pub fn server(&self) -> &str {
        &self.server
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        let r = self.stream.write_all(bytes).await;
        r.map_err(|e| self.io(e))
    }

    /// Read more bytes from the server into the buffer; the end of the connection is an error.
    async fn read_more(&mut self) -> Result<(), WireError> {
        if self.buf.capacity() - self.buf.len() < 8192 {
            self.buf.reserve(256 * 1024);
        }
        let n = self
            .stream
            .read_buf(&mut self.buf)
            .await
            .map_err(|e| self.io(e))?;
        if n == 0 {
            return Err(self.io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            )));
        }
        Ok(())
    }

    /// The next backend message (notices are skipped).
    pub async fn recv(&mut self) -> Result<Message, WireError> {
        loop {
            match Message::parse(&mut self.buf) {
                Ok(Some(Message::NoticeResponse(body))) => {
                    let (severity, code, message) = fields(body.fields());
                    if severity == "WARNING" && self.warnings.len() < 100 {
                        self.warnings.push(format!("{severity} {code}: {message}"));
                    }
                    // The next message may already be buffered.
                    continue;
                }
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => return Err(self.protocol(e.to_string())),
            }
            self.read_more().await?;
        }
    }

    async fn authenticate(&mut self, opts: &ConnOptions) -> Result<(), WireError> {
        let auth_err = |c: &Connection, message: String| WireError::Auth {
            server: c.server.clone(),
            user: opts.user.clone(),
            message,
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let msg = self.recv().await?;
            let mut out = BytesMut::new();
            match msg {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let pw = opts.password().map_err(|e| auth_err(self, e))?;
                    frontend::password_message(pw.as_bytes(), &mut out).map_err(|e| self.io(e))?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let pw = opts.password().map_err(|e| auth_err(self, e))?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        opts.user.as_bytes(),
                        pw.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut out)
                        .map_err(|e| self.io(e))?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechs = body.mechanisms();
                    let mut has_scram = false;
                    while let Ok(Some(m)) = mechs.next() {
                        has_scram |= m == SCRAM_SHA_256;
                    }
                    if !has_scram {
                        return Err(auth_err(
                            self,
                            "the server offers no SASL mechanism tidemark supports (SCRAM-SHA-256)"
                                .into(),
                        ));
                    }
                    let pw = opts.password().map_err(|e| auth_err(self, e))?;
                    let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)
                        .map_err(|e| self.io(e))?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| self.protocol("SASL continue before SASL start"))?;
                    s.update(body.data())
                        .map_err(|e| auth_err(self, format!("SCRAM exchange failed: {e}")))?;
                    frontend::sasl_response(s.message(), &mut out).map_err(|e| self.io(e))?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| self.protocol("SASL final before SASL start"))?;
                    s.finish(body.data()).map_err(|e| {
                        auth_err(self, format!("the server's SCRAM signature is wrong: {e}"))
                    })?;
                }
                Message::ParameterStatus(p) => {
                    let name = p.name().unwrap_or_default().to_owned();
                    let value = p.value().unwrap_or_default().to_owned();
                    self.parameters.push((name, value));
                }
                Message::BackendKeyData(_) => {}
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => {
                    return Err(auth_err(self, error_text(&body)));
                }
                _ => return Err(self.protocol("unexpected message during login")),
            }
            if !out.is_empty() {
                self.send(&out).await?;
            }
        }
    }

    /// Run one statement with the simple query protocol; the rows of its (last) result.
    ///
    /// # Errors
    /// `Query` with the server's message, `Io`, `Protocol`.
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Row>, WireError> {
        self.start_query(sql).await?;
        self.finish_query(sql).await
    }

    /// Read the replies to `sql` (already sent, or whose COPY has ended) up to ReadyForQuery;
    /// the rows of the last result.
    ///
    /// # Errors
    /// `Query` with the server's message, `Io`, `Protocol`.
    pub async fn finish_query(&mut self, sql: &str) -> Result<Vec<Row>, WireError> {
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.recv().await? {
                Message::RowDescription(_) => rows.clear(),
                Message::DataRow(body) => {
                    let buf = body.buffer();
                    let mut row = Vec::new();
                    let mut ranges = body.ranges();
                    while let Some(r) = ranges.next().map_err(|e| self.protocol(e.to_string()))? {
                        row.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(row);
                }
                Message::CommandComplete(_) | Message::EmptyQueryResponse => {}
                Message::ErrorResponse(body) => error = Some(error_text(&body)),
                Message::ReadyForQuery(_) => break,
                Message::ParameterStatus(_) => {}
                _ => return Err(self.protocol(format!("unexpected message in reply to {sql:?}"))),
            }
        }
        match error {
            Some(message) => Err(WireError::Query {
                server: self.server.clone(),
                query: sql.to_owned(),
                message,
            }),
            None => Ok(rows),
        }
    }

    /// Send a simple query without reading its reply (for replication commands that answer
    /// with COPY streams).
    ///
    /// # Errors
    /// `Io`.
    pub async fn start_query(&mut self, sql: &str) -> Result<(), WireError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(|e| self.io(e))?;
        self.send(&out).await
    }

    /// A `Query` error from an ErrorResponse received while streaming.
    pub fn query_error(
        &self,
        sql: &str,
        body: &postgres_protocol::message::backend::ErrorResponseBody,
    ) -> WireError {
        WireError::Query {
            server: self.server.clone(),
            query: sql.to_owned(),
            message: error_text(body),
        }
    }

    /// The next raw message frame: its type byte and body. For COPY BOTH (streaming
    /// replication), whose start message the codec does not know. Cancel-safe: a partial frame
    /// stays buffered.
    ///
    /// # Errors
    /// `Io`, `Protocol` for an impossible length.
    pub async fn recv_frame(&mut self) -> Result<(u8, bytes::Bytes), WireError> {
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes"));
                if len < 4 {
                    return Err(self.protocol(format!("a message of length {len}")));
                }
                let total = 1 + len as usize;
                if self.buf.len() >= total {
                    let mut frame = self.buf.split_to(total);
                    let tag = frame[0];
                    let body = frame.split_off(5).freeze();
                    return Ok((tag, body));
                }
                if self.buf.capacity() < total {
                    self.buf.reserve(total - self.buf.len());
                }
            }
            self.read_more().await?;
        }
    }

    /// The server's message in an ErrorResponse frame body (from `recv_frame`).
    pub fn frame_error(&self, sql: &str, body: &[u8]) -> WireError {
        let mut frame = BytesMut::with_capacity(body.len() + 5);
        frame.extend_from_slice(b"E");
        frame.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        frame.extend_from_slice(body);
        match Message::parse(&mut frame) {
            Ok(Some(Message::ErrorResponse(b))) => self.query_error(sql, &b),
            _ => self.protocol("an unreadable error message"),
        }
    }

    /// Send one CopyData message.
    ///
    /// # Errors
    /// `Io`.
    pub async fn send_copy_data(&mut self, data: &[u8]) -> Result<(), WireError> {
        let mut out = BytesMut::with_capacity(data.len() + 5);
        frontend::CopyData::new(data)
            .map_err(|e| self.io(e))?
            .write(&mut out);
        self.send(&out).await
    }

    /// Send CopyDone.
    ///
    /// # Errors
    /// `Io`.
    pub async fn send_copy_done(&mut self) -> Result<(), WireError> {
        let mut out = BytesMut::new();
        frontend::copy_done(&mut out);
        self.send(&out).await
    }

    /// Close politely.
    pub async fn close(mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = self.stream.write_all(&out).await;
        let _ = self.stream.shutdown().await;
    }
}
