//! The agent's HTTP interface: `/metrics` (Prometheus), `/status` (JSON), `/healthz` (the
//! process answers), `/readyz` (every database's schedules run), and the timeline page at `/`.
//! GET only; nothing here
//! changes state, and nothing served holds a secret.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::status::{metrics, Status};

/// Shared, live status.
pub type Shared = Arc<Mutex<Status>>;

fn reply(code: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", ctype)
        .header("cache-control", "no-store")
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn route(status: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n");
    }
    let s = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(&s),
        ),
        "/status" => reply(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec_pretty(&s).expect("status serializes"),
        ),
        "/" | "/timeline" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            crate::timeline::page(&s, chrono::Utc::now()),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if s.ready => reply(StatusCode::OK, "text/plain", "ready\n"),
        "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "starting\n"),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Bind `addr` now (so that a taken port fails the start), then serve until `stop` is true.
///
/// # Errors
/// The bind error, naming the address.
pub async fn serve(
    addr: SocketAddr,
    status: Shared,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("failed to listen on {addr}: {e}; change agent.listen"))?;
    Ok(tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                _ = crate::until_stopped(&mut stop) => return,
            };
            let Ok((stream, _)) = conn else { continue };
            let status = status.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let r = route(&status, &req);
                    async move { Ok::<_, Infallible>(r) }
                });
                // A slow or broken client only costs its own task.
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
            });
        }
    }))
}
