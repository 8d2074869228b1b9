//! Location URLs (`file:///…`, `s3://bucket/prefix`, `gs://…`, `az://…`, `memory://`) and the
//! options that turn one into a layered `Arc<dyn Storage>`.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::{ClientOptions, RetryConfig};
use url::Url;

use crate::gcs::GcsStorage;
use crate::layer::{RetryLayer, RetryPolicy, ThrottleLayer, TimeoutLayer};
use crate::local::LocalStorage;
use crate::object::ObjectStorage;
use crate::storage::{Capabilities, Storage};

/// How a location is accessed: one struct shared by the CLI, the agent's config and tests.
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// Attempts per operation for transient failures, including the first (default 6).
    pub attempts: u32,
    /// First retry delay; doubles each attempt up to `max_backoff` (default 200 ms).
    pub backoff: Duration,
    /// Longest delay between attempts (default 10 s).
    pub max_backoff: Duration,
    /// Time allowed for one operation before its data starts counting (default 30 s).
    pub timeout: Duration,
    /// Slowest transfer rate tolerated before an operation times out, in bytes/s (default 256 KiB/s).
    pub min_throughput: u64,
    /// Time allowed to open a connection (default 10 s).
    pub connect_timeout: Duration,
    /// Upload limit in bytes/s, none by default.
    pub limit_upload: Option<u64>,
    /// Download limit in bytes/s, none by default.
    pub limit_download: Option<u64>,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            attempts: 6,
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
            min_throughput: 256 << 10,
            connect_timeout: Duration::from_secs(10),
            limit_upload: None,
            limit_download: None,
        }
    }
}

/// A location that cannot be opened, with what to fix.
#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    /// The text is not a location.
    #[error("invalid location {text:?}: {reason}")]
    Invalid {
        /// What was given.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A secret was put in the URL, where it would show in process lists and logs.
    #[error("location {location:?} carries the secret option {key:?} in its URL; set it in the environment or the config file instead")]
    SecretInUrl {
        /// The location without its query.
        location: String,
        /// The option.
        key: String,
    },
    /// An option is unknown for this kind of location.
    #[error("unknown option {key:?} for location {location:?}")]
    UnknownOption {
        /// The location.
        location: String,
        /// The option.
        key: String,
    },
    /// The client for the location could not be built.
    #[error("failed to configure location {location:?}")]
    Build {
        /// The location.
        location: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A parsed location: a URL without its query, plus options from the query and elsewhere.
#[derive(Clone, PartialEq, Eq)]
pub struct Location {
    url: Url,
    options: BTreeMap<String, String>,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Options may hold credentials from the environment or config: show only their names.
        f.debug_struct("Location")
            .field("url", &self.url.as_str())
            .field("options", &self.options.keys())
            .finish()
    }
}

/// Whether a storage option holds a secret (which must not be passed on a command line or in a
/// URL, where process lists and logs would show it).
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "secret",
        "password",
        "token",
        "sas",
        "access_key",
        "service_account_key",
        "credential",
    ]
    .iter()
    .any(|s| k.contains(s))
        && k != "access_key_id"
        && k != "aws_access_key_id"
}

impl Location {
    /// Parse a location. A plain path (`/srv/backups`, `./repo`) means a local directory.
    ///
    /// # Errors
    /// `Invalid` for text that is neither a path nor a URL, `SecretInUrl` for credentials in
    /// the query string.
    pub fn parse(text: &str) -> Result<Self, LocationError> {
        let invalid = |reason: &str| LocationError::Invalid {
            text: text.to_owned(),
            reason: reason.to_owned(),
        };
        if text.is_empty() {
            return Err(invalid("it is empty"));
        }
        let mut url = if text.contains("://") {
            Url::parse(text).map_err(|e| invalid(&e.to_string()))?
        } else {
            let abs = std::path::absolute(text).map_err(|e| invalid(&e.to_string()))?;
            Url::from_file_path(&abs).map_err(|()| invalid("not an absolute path"))?
        };
        match url.scheme() {
            "file" | "s3" | "gs" | "az" | "azure" | "memory" => {}
            other => {
                return Err(invalid(&format!(
                    "unsupported scheme {other:?}; use file, s3, gs, az or memory"
                )))
            }
        }
        if matches!(url.scheme(), "s3" | "gs" | "az" | "azure")
            && url.host_str().unwrap_or("").is_empty()
        {
            return Err(invalid("it names no bucket or container"));
        }
        let mut options = BTreeMap::new();
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        url.set_query(None);
        if url.password().is_some() {
            let _ = url.set_password(None);
            return Err(LocationError::SecretInUrl {
                location: url.to_string(),
                key: "password".into(),
            });
        }
        for (k, v) in pairs {
            if is_secret(&k) {
                return Err(LocationError::SecretInUrl {
                    location: url.to_string(),
                    key: k,
                });
            }
            options.insert(k, v);
        }
        url.set_query(None);
        url.set_fragment(None);
        Ok(Location { url, options })
    }

    /// Set an option (from the config file or the environment). Secrets are allowed here.
    pub fn set_option(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.options.insert(key.into(), value.into());
    }

    /// The location as a user wrote it, without query or credentials: used in every message.
    pub fn display_name(&self) -> String {
        let mut u = self.url.clone();
        let _ = u.set_password(None);
        let _ = u.set_username("");
        u.to_string().trim_end_matches('/').to_owned()
    }

    /// Open the location, wrapped in the retry, bandwidth and timeout layers.
    ///
    /// # Errors
    /// `UnknownOption` or `Build` when the location cannot be configured. Connection problems
    /// are not detected here; they surface on the first operation.
    pub fn open(&self, opts: &StorageOptions) -> Result<Arc<dyn Storage>, LocationError> {
        let backend = self.open_backend(opts)?;
        let timed: Arc<dyn Storage> = Arc::new(TimeoutLayer::new(
            backend,
            opts.timeout,
            opts.min_throughput,
        ));
        let throttled: Arc<dyn Storage> =
            if opts.limit_upload.is_some() || opts.limit_download.is_some() {
                Arc::new(ThrottleLayer::new(
                    timed,
                    opts.limit_upload,
                    opts.limit_download,
                ))
            } else {
                timed
            };
        let policy = RetryPolicy {
            attempts: opts.attempts,
            backoff: opts.backoff,
            max_backoff: opts.max_backoff,
        };
        Ok(Arc::new(RetryLayer::new(throttled, policy)))
    }

    /// Open the location without any layer.
    ///
    /// # Errors
    /// As for `open`.
    pub fn open_backend(&self, opts: &StorageOptions) -> Result<Arc<dyn Storage>, LocationError> {
        let name = self.display_name();
        let build = |e: Box<dyn std::error::Error + Send + Sync>| LocationError::Build {
            location: name.clone(),
            source: e,
        };
        let prefix = self.url.path().trim_matches('/').to_owned();
        let client = ClientOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            .with_timeout_disabled()
            .with_allow_http(
                self.options
                    .get("endpoint")
                    .is_some_and(|e| e.starts_with("http://")),
            );
        // Retries belong to RetryLayer, where failures are classified once.
        let retry = RetryConfig {
            max_retries: 0,
            ..Default::default()
        };
        let cloud_caps = Capabilities::durable_store();
        let bucket_url = format!(
            "{}://{}",
            self.url.scheme(),
            self.url.host_str().unwrap_or("")
        );
        match self.url.scheme() {
            "file" => {
                let path = self
                    .url
                    .to_file_path()
                    .map_err(|()| LocationError::Invalid {
                        text: self.url.to_string(),
                        reason: "not a local path".into(),
                    })?;
                self.no_options()?;
                Ok(Arc::new(
                    LocalStorage::new(path, name.clone()).map_err(|e| build(Box::new(e)))?,
                ))
            }
            "memory" => Ok(Arc::new(ObjectStorage::memory())),
            "s3" => {
                let mut b = AmazonS3Builder::from_env()
                    .with_url(bucket_url)
                    .with_client_options(client)
                    .with_retry(retry)
                    .with_conditional_put(S3ConditionalPut::ETagMatch);
                if std::env::var_os("AWS_REGION").is_none()
                    && std::env::var_os("AWS_DEFAULT_REGION").is_none()
                {
                    b = b.with_region("us-east-1");
                }
                for (k, v) in &self.options {
                    let (k, v) = match k.as_str() {
                        "path_style" => (
                            "virtual_hosted_style_request",
                            if v == "true" { "false" } else { "true" },
                        ),
                        _ => (k.as_str(), v.as_str()),
                    };
                    let key = AmazonS3ConfigKey::from_str(k).map_err(|_| self.unknown(k))?;
                    b = b.with_config(key, v);
                }
                let store = b.build().map_err(|e| build(Box::new(e)))?;
                Ok(Arc::new(ObjectStorage::new(
                    Arc::new(store),
                    &prefix,
                    name,
                    cloud_caps,
                )))
            }
            "gs" => {
                let bucket = self.url.host_str().unwrap_or("");
                let (base, credentials) = match self.options.get("endpoint") {
                    // An emulator such as fake-gcs-server: its base URL, no credentials.
                    Some(e) => (e.clone(), None),
                    None => {
                        let mut b = GoogleCloudStorageBuilder::from_env()
                            .with_url(bucket_url)
                            .with_client_options(client)
                            .with_retry(retry);
                        for (k, v) in &self.options {
                            let key = GoogleConfigKey::from_str(k).map_err(|_| self.unknown(k))?;
                            b = b.with_config(key, v);
                        }
                        let store = b.build().map_err(|e| build(Box::new(e)))?;
                        (
                            "https://storage.googleapis.com".to_owned(),
                            Some(crate::gcs::credentials(&store)),
                        )
                    }
                };
                if let Some(k) = self
                    .options
                    .keys()
                    .find(|k| k.as_str() != "endpoint" && self.options.contains_key("endpoint"))
                {
                    return Err(self.unknown(k));
                }
                let base = Url::parse(&base).map_err(|e| build(Box::new(e)))?;
                let s = GcsStorage::new(
                    base,
                    bucket,
                    &prefix,
                    name.clone(),
                    credentials,
                    opts.connect_timeout,
                )
                .map_err(|e| build(Box::new(e)))?;
                Ok(Arc::new(s))
            }
            "az" | "azure" => {
                let container = self.url.host_str().unwrap_or("");
                let mut b = MicrosoftAzureBuilder::from_env()
                    .with_container_name(container)
                    .with_client_options(client)
                    .with_retry(retry);
                for (k, v) in &self.options {
                    let key = AzureConfigKey::from_str(k).map_err(|_| self.unknown(k))?;
                    b = b.with_config(key, v);
                }
                let store = b.build().map_err(|e| build(Box::new(e)))?;
                Ok(Arc::new(ObjectStorage::new(
                    Arc::new(store),
                    &prefix,
                    name,
                    cloud_caps,
                )))
            }
            _ => unreachable!("scheme checked in parse"),
        }
    }

    fn unknown(&self, key: &str) -> LocationError {
        LocationError::UnknownOption {
            location: self.display_name(),
            key: key.to_owned(),
        }
    }

    fn no_options(&self) -> Result<(), LocationError> {
        match self.options.keys().next() {
            Some(k) => Err(self.unknown(k)),
            None => Ok(()),
        }
    }
}

/// Parse a rate in bytes per second: a number with an optional K, M or G suffix (powers of
/// 1024).
///
/// # Errors
/// A message quoting the text.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("{s:?} is not a rate like 512K or 10M"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_path_is_a_file_location() {
        let l = Location::parse("/srv/backups").unwrap();
        assert_eq!(l.display_name(), "file:///srv/backups");
    }

    #[test]
    fn query_options_are_split_from_the_url() {
        let l =
            Location::parse("s3://bucket/pre/fix?endpoint=http://127.0.0.1:9000&region=eu-west-1")
                .unwrap();
        assert_eq!(l.display_name(), "s3://bucket/pre/fix");
        assert_eq!(
            l.options.get("region").map(String::as_str),
            Some("eu-west-1")
        );
    }

    #[test]
    fn secrets_in_the_url_are_refused_without_echoing_them() {
        let e = Location::parse("s3://b/p?secret_access_key=hunter2").unwrap_err();
        assert!(matches!(e, LocationError::SecretInUrl { .. }));
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = Location::parse("s3://AKIA:hunter2@b/p").unwrap_err();
        assert!(matches!(e, LocationError::SecretInUrl { .. }));
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn unknown_schemes_and_missing_buckets_are_refused() {
        assert!(Location::parse("ftp://x/y").is_err());
        assert!(Location::parse("s3:///prefix").is_err());
    }

    #[test]
    fn unknown_options_are_named() {
        let l = Location::parse("s3://b?colour=blue").unwrap();
        let e = l.open(&StorageOptions::default()).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn debug_output_hides_option_values() {
        let mut l = Location::parse("s3://b").unwrap();
        l.set_option("secret_access_key", "hunter2");
        assert!(!format!("{l:?}").contains("hunter2"));
    }
}
