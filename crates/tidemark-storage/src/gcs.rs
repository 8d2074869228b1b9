//! Google Cloud Storage through its JSON API, with `object_store` supplying credentials.
//!
//! `object_store` talks to GCS with the XML API, which fake-gcs-server (the emulator our tests
//! run) does not implement (fsouza/fake-gcs-server#331). The JSON API is fully supported by GCS
//! and by the emulator, so every operation here uses it: multipart uploads with
//! `ifGenerationMatch=0` for create-if-absent, resumable uploads for multipart, `alt=media` with
//! a Range header for reads, and paged object listing.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use object_store::gcp::GcpCredentialProvider;
use serde::Deserialize;
use url::Url;

use crate::error::{classify_response, Error, ErrorKind, Result};
use crate::storage::{Capabilities, ObjectMeta, PutMode, Storage, Upload};

/// Resumable upload chunks must be multiples of 256 KiB.
const RESUMABLE_QUANTUM: usize = 256 << 10;

/// A GCS bucket (and optional prefix).
#[derive(Debug, Clone)]
pub struct GcsStorage {
    http: reqwest::Client,
    credentials: Option<GcpCredentialProvider>,
    base: Url,
    bucket: String,
    prefix: String,
    name: String,
}

#[derive(Debug, Deserialize)]
struct ObjectResource {
    name: String,
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    updated: Option<DateTime<Utc>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListResponse {
    #[serde(default)]
    items: Vec<ObjectResource>,
    #[serde(default)]
    next_page_token: Option<String>,
}

impl GcsStorage {
    /// A bucket at `base` (`https://storage.googleapis.com` or an emulator). Without
    /// `credentials`, requests are anonymous (emulators).
    ///
    /// # Errors
    /// `Invalid` when the HTTP client cannot be built.
    pub fn new(
        base: Url,
        bucket: &str,
        prefix: &str,
        name: impl Into<String>,
        credentials: Option<GcpCredentialProvider>,
        connect_timeout: std::time::Duration,
    ) -> Result<Self> {
        let name = name.into();
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .build()
            .map_err(|e| Error::new(ErrorKind::Invalid, "configure", "", &name).with_source(e))?;
        Ok(GcsStorage {
            http,
            credentials,
            base,
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            name,
        })
    }

    fn full(&self, op: &'static str, path: &str) -> Result<String> {
        if path.starts_with('/') || path.split('/').any(|c| c == "." || c == "..") {
            return Err(Error::new(ErrorKind::Invalid, op, path, &self.name));
        }
        Ok(if self.prefix.is_empty() {
            path.to_owned()
        } else {
            format!("{}/{}", self.prefix, path)
        })
    }

    fn url(&self, upload: bool, object: Option<&str>) -> Url {
        let mut u = self.base.clone();
        {
            let mut seg = u.path_segments_mut().expect("http base URL");
            seg.pop_if_empty();
            if upload {
                seg.push("upload");
            }
            seg.extend(["storage", "v1", "b", &self.bucket, "o"]);
            if let Some(o) = object {
                seg.push(o);
            }
        }
        u
    }

    async fn send(
        &self,
        op: &'static str,
        path: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response> {
        let req = match &self.credentials {
            Some(c) => {
                let cred = c
                    .get_credential()
                    .await
                    .map_err(|e| Error::from_object_store(e, op, path, &self.name))?;
                req.bearer_auth(&cred.bearer)
            }
            None => req,
        };
        let resp = req
            .send()
            .await
            .map_err(|e| classify_response(None, e.into(), op, path, &self.name))?;
        let status = resp.status();
        if status.is_success() || status.as_u16() == 308 {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        Err(classify_response(
            Some(status.as_u16()),
            format!("HTTP {status}: {}", body.trim()).into(),
            op,
            path,
            &self.name,
        ))
    }

    fn relative(&self, full: &str) -> String {
        if self.prefix.is_empty() {
            full.to_owned()
        } else {
            full.strip_prefix(&self.prefix)
                .map(|r| r.trim_start_matches('/').to_owned())
                .unwrap_or_else(|| full.to_owned())
        }
    }
}

fn meta(path: String, o: &ObjectResource) -> ObjectMeta {
    ObjectMeta {
        path,
        size: o.size.as_deref().and_then(|s| s.parse().ok()).unwrap_or(0),
        modified: o.updated.unwrap_or_else(Utc::now),
    }
}

#[async_trait]
impl Storage for GcsStorage {
    fn name(&self) -> &str {
        &self.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::durable_store()
    }

    async fn put(&self, path: &str, data: Bytes, mode: PutMode) -> Result<()> {
        let full = self.full("upload", path)?;
        let mut url = self.url(true, None);
        // A multipart (metadata + media) upload: the form official clients use for small
        // objects, and the one whose preconditions emulators have honoured longest.
        url.query_pairs_mut().append_pair("uploadType", "multipart");
        if mode == PutMode::CreateNew {
            // Generation 0 means "no live object": the server refuses with 412 if one exists.
            url.query_pairs_mut().append_pair("ifGenerationMatch", "0");
        }
        let boundary = format!("tidemark-{}", hex_random());
        let metadata = serde_json::json!({ "name": full }).to_string();
        let mut body = Vec::with_capacity(data.len() + metadata.len() + 256);
        body.extend_from_slice(format!("--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{metadata}\r\n").as_bytes());
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(&data);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let req = self
            .http
            .post(url)
            .header(
                "content-type",
                format!("multipart/related; boundary={boundary}"),
            )
            .body(body);
        self.send("upload", path, req).await?;
        Ok(())
    }

    async fn put_multipart(&self, path: &str) -> Result<Box<dyn Upload>> {
        let full = self.full("upload", path)?;
        let mut url = self.url(true, None);
        url.query_pairs_mut()
            .append_pair("uploadType", "resumable")
            .append_pair("name", &full);
        let resp = self
            .send(
                "upload",
                path,
                self.http.post(url).header("content-length", "0"),
            )
            .await?;
        let session = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Error::new(ErrorKind::Permanent, "upload", path, &self.name)
                    .with_source("no resumable session URL")
            })?
            .to_owned();
        Ok(Box::new(GcsUpload {
            storage: self.clone(),
            path: path.to_owned(),
            session,
            sent: 0,
            buffer: Vec::new(),
        }))
    }

    async fn get(&self, path: &str) -> Result<Bytes> {
        let full = self.full("read", path)?;
        let mut url = self.url(false, Some(&full));
        url.query_pairs_mut().append_pair("alt", "media");
        let resp = self.send("read", path, self.http.get(url)).await?;
        resp.bytes()
            .await
            .map_err(|e| classify_response(None, e.into(), "read", path, &self.name))
    }

    async fn get_range(&self, path: &str, range: Range<u64>) -> Result<Bytes> {
        let want = range.end - range.start;
        if want == 0 {
            self.head(path).await?;
            return Ok(Bytes::new());
        }
        let full = self.full("read", path)?;
        let mut url = self.url(false, Some(&full));
        url.query_pairs_mut().append_pair("alt", "media");
        let req = self
            .http
            .get(url)
            .header("range", format!("bytes={}-{}", range.start, range.end - 1));
        let resp = self.send("read", path, req).await?;
        let b = resp
            .bytes()
            .await
            .map_err(|e| classify_response(None, e.into(), "read", path, &self.name))?;
        if b.len() as u64 != want {
            return Err(Error::new(ErrorKind::Invalid, "read", path, &self.name)
                .with_source(format!("asked for {want} bytes, got {}", b.len())));
        }
        Ok(b)
    }

    async fn head(&self, path: &str) -> Result<ObjectMeta> {
        let full = self.full("stat", path)?;
        let resp = self
            .send("stat", path, self.http.get(self.url(false, Some(&full))))
            .await?;
        let body = resp
            .bytes()
            .await
            .map_err(|e| classify_response(None, e.into(), "stat", path, &self.name))?;
        let o: ObjectResource = serde_json::from_slice(&body)
            .map_err(|e| classify_response(None, e.into(), "stat", path, &self.name))?;
        Ok(meta(path.to_owned(), &o))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let full_prefix = if self.prefix.is_empty() {
            prefix.to_owned()
        } else {
            format!("{}/{}", self.prefix, prefix)
        };
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = self.url(false, None);
            url.query_pairs_mut()
                .append_pair("prefix", &full_prefix)
                .append_pair("maxResults", "1000");
            if let Some(t) = &token {
                url.query_pairs_mut().append_pair("pageToken", t);
            }
            let resp = self.send("list", prefix, self.http.get(url)).await?;
            let body = resp
                .bytes()
                .await
                .map_err(|e| classify_response(None, e.into(), "list", prefix, &self.name))?;
            let page: ListResponse = serde_json::from_slice(&body)
                .map_err(|e| classify_response(None, e.into(), "list", prefix, &self.name))?;
            for o in &page.items {
                let rel = self.relative(&o.name);
                if !rel.split('/').any(|c| c.starts_with('.')) {
                    out.push(meta(rel, o));
                }
            }
            match page.next_page_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok(out),
            }
        }
    }

    async fn delete(&self, path: &str) -> Result<()> {
        let full = self.full("delete", path)?;
        match self
            .send(
                "delete",
                path,
                self.http.delete(self.url(false, Some(&full))),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A resumable upload: parts are buffered to 256 KiB multiples and sent with Content-Range.
struct GcsUpload {
    storage: GcsStorage,
    path: String,
    session: String,
    sent: u64,
    buffer: Vec<u8>,
}

impl GcsUpload {
    async fn send_chunk(&mut self, data: Vec<u8>, last: bool) -> Result<()> {
        let len = data.len() as u64;
        let total = if last {
            (self.sent + len).to_string()
        } else {
            "*".to_owned()
        };
        let range = if len == 0 {
            format!("bytes */{total}")
        } else {
            format!("bytes {}-{}/{total}", self.sent, self.sent + len - 1)
        };
        let req = self
            .storage
            .http
            .put(&self.session)
            .header("content-range", range)
            .body(data);
        self.storage.send("upload", &self.path, req).await?;
        self.sent += len;
        Ok(())
    }
}

#[async_trait]
impl Upload for GcsUpload {
    async fn write_part(&mut self, data: Bytes) -> Result<()> {
        self.buffer.extend_from_slice(&data);
        let whole = self.buffer.len() / RESUMABLE_QUANTUM * RESUMABLE_QUANTUM;
        // Keep the tail back so the final request is never empty of data.
        if whole > 0 && whole < self.buffer.len() {
            let rest = self.buffer.split_off(whole);
            let chunk = std::mem::replace(&mut self.buffer, rest);
            self.send_chunk(chunk, false).await?;
        }
        Ok(())
    }

    async fn complete(mut self: Box<Self>) -> Result<()> {
        let rest = std::mem::take(&mut self.buffer);
        self.send_chunk(rest, true).await
    }

    async fn abort(self: Box<Self>) -> Result<()> {
        let _ = self.storage.http.delete(&self.session).send().await;
        Ok(())
    }
}

fn hex_random() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// The credentials of a GCS location: none for an emulator, else what `object_store` finds
/// (service account file or key, application default credentials, instance metadata).
pub(crate) fn credentials(store: &object_store::gcp::GoogleCloudStorage) -> GcpCredentialProvider {
    Arc::clone(store.credentials())
}
