//! Where the repository is and how to open it: flags, then environment, then the config file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use serde::Deserialize;
use tidemark_repo::key::Secret;
use tidemark_repo::Repository;
use tidemark_storage::{Location, Storage, StorageOptions};

/// A mistake in how tidemark was invoked or configured.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct UsageError {
    /// What is wrong.
    pub message: String,
    /// What to do.
    pub hint: Option<String>,
}

pub fn usage(message: impl Into<String>, hint: impl Into<String>) -> anyhow::Error {
    UsageError {
        message: message.into(),
        hint: Some(hint.into()),
    }
    .into()
}

/// Options that apply to every command.
#[derive(Debug, clap::Args)]
pub struct Global {
    /// Repository location: a path, file:///…, s3://bucket/prefix, gs://…, az://…
    #[arg(short = 'r', long = "repo", env = "TIDEMARK_REPOSITORY", global = true)]
    pub repo: Option<String>,
    /// File holding the repository password (first line).
    #[arg(long, env = "TIDEMARK_PASSWORD_FILE", global = true)]
    pub password_file: Option<PathBuf>,
    /// File holding a raw key (at least 32 bytes) instead of a password.
    #[arg(long, env = "TIDEMARK_KEY_FILE", global = true)]
    pub key_file: Option<PathBuf>,
    /// Config file (YAML): repository, options, password_file, key_file, limits.
    #[arg(long, env = "TIDEMARK_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Print results as JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress and only errors on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// More log output (-v, -vv).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Upload limit in bytes per second (suffixes K, M, G).
    #[arg(long, env = "TIDEMARK_LIMIT_UPLOAD", global = true, value_parser = parse_rate)]
    pub limit_upload: Option<u64>,
    /// Download limit in bytes per second (suffixes K, M, G).
    #[arg(long, env = "TIDEMARK_LIMIT_DOWNLOAD", global = true, value_parser = parse_rate)]
    pub limit_download: Option<u64>,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    tidemark_storage::parse_rate(s)
}

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    repository: Option<String>,
    #[serde(default)]
    options: BTreeMap<String, String>,
    password_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    limit_upload: Option<String>,
    limit_download: Option<String>,
}

/// Everything needed to reach a repository.
pub struct Context {
    pub location: Location,
    pub storage_options: StorageOptions,
    password_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    config: Option<PathBuf>,
    repo_flag: Option<String>,
    pub json: bool,
    pub quiet: bool,
}

/// The text of a config file; a file that is missing, unreadable or not UTF-8 is a usage
/// error (exit 2), like one that does not parse.
///
/// # Errors
/// `UsageError` naming the file.
pub fn read_config(p: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(p).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::InvalidData => "it is not UTF-8 text".to_owned(),
            _ => e.to_string(),
        };
        usage(
            format!("failed to read config file {}: {why}", p.display()),
            "check the path given with --config or TIDEMARK_CONFIG",
        )
    })
}

impl Context {
    /// Resolve flags, environment and config file.
    pub fn resolve(g: &Global) -> Result<Context> {
        let file = match &g.config {
            Some(p) => {
                let text = read_config(p)?;
                serde_yaml_ng::from_str::<ConfigFile>(&text).map_err(|e| {
                    usage(format!("config file {} is invalid: {e}", p.display()), "fix the file; keys are repository, options, password_file, key_file, limit_upload, limit_download")
                })?
            }
            None => ConfigFile::default(),
        };
        let repo = g.repo.clone().or(file.repository).ok_or_else(|| {
            usage(
                "no repository given",
                "pass --repo, set TIDEMARK_REPOSITORY, or set `repository` in the config file",
            )
        })?;
        let mut location = Location::parse(&repo)?;
        for (k, v) in file.options {
            location.set_option(k, v);
        }
        let rate = |s: Option<String>| -> Result<Option<u64>> {
            s.map(|s| parse_rate(&s).map_err(|e| usage(e, "use a rate like 512K or 10M")))
                .transpose()
        };
        let storage_options = StorageOptions {
            limit_upload: g.limit_upload.or(rate(file.limit_upload)?),
            limit_download: g.limit_download.or(rate(file.limit_download)?),
            ..Default::default()
        };
        Ok(Context {
            location,
            storage_options,
            password_file: g.password_file.clone().or(file.password_file),
            key_file: g.key_file.clone().or(file.key_file),
            config: g.config.clone(),
            repo_flag: g.repo.clone(),
            json: g.json,
            quiet: g.quiet,
        })
    }

    /// Environment that lets another tidemark process (PostgreSQL's restore_command) open the
    /// same repository: file paths and the location, never a secret itself.
    ///
    /// # Errors
    /// A usage error when the secret came from TIDEMARK_PASSWORD, which cannot be passed on
    /// without writing it down.
    pub fn child_env(&self) -> Result<Vec<(&'static str, String)>> {
        let abs = |p: &PathBuf| -> Result<String> {
            Ok(std::path::absolute(p)
                .with_context(|| format!("failed to resolve {}", p.display()))?
                .display()
                .to_string())
        };
        let mut v = Vec::new();
        if let Some(c) = &self.config {
            v.push(("TIDEMARK_CONFIG", abs(c)?));
        }
        if let Some(r) = &self.repo_flag {
            let is_path = !r.contains("://");
            v.push((
                "TIDEMARK_REPOSITORY",
                if is_path {
                    abs(&PathBuf::from(r))?
                } else {
                    r.clone()
                },
            ));
        }
        if let Some(k) = &self.key_file {
            v.push(("TIDEMARK_KEY_FILE", abs(k)?));
        } else if let Some(p) = &self.password_file {
            v.push(("TIDEMARK_PASSWORD_FILE", abs(p)?));
        } else {
            return Err(usage(
                "the repository password came from TIDEMARK_PASSWORD, which PostgreSQL's restore_command cannot be given without writing it down",
                "use --password-file, --key-file or a config file",
            ));
        }
        Ok(v)
    }

    pub fn storage(&self) -> Result<Arc<dyn Storage>> {
        Ok(self.location.open(&self.storage_options)?)
    }

    /// The secret: key file, password file, or TIDEMARK_PASSWORD, in that order.
    pub fn secret(&self) -> Result<Secret> {
        let from_files =
            Secret::from_files(self.key_file.as_deref(), self.password_file.as_deref())
                .map_err(|e| usage(e, "check the path and its permissions"))?;
        if let Some(s) = from_files {
            return Ok(s);
        }
        if let Ok(p) = std::env::var("TIDEMARK_PASSWORD") {
            if !p.is_empty() {
                return Ok(Secret::password(p));
            }
        }
        Err(usage("no password or key given", "set TIDEMARK_PASSWORD_FILE (or --password-file), TIDEMARK_KEY_FILE, or TIDEMARK_PASSWORD"))
    }

    /// Another location of the same repository, given by URL with its own storage options
    /// (`KEY=VALUE`), reached with the same limits.
    ///
    /// # Errors
    /// A usage error for a bad URL or option.
    pub fn other_storage(&self, url: &str, options: &[String]) -> Result<Arc<dyn Storage>> {
        Ok(Self::other_location(url, options)?.open(&self.storage_options)?)
    }

    /// Another location given by URL with its own storage options (`KEY=VALUE`), not yet
    /// opened.
    ///
    /// # Errors
    /// A usage error for a bad URL or option, or a secret among the options.
    pub fn other_location(url: &str, options: &[String]) -> Result<Location> {
        let mut location = Location::parse(url)?;
        for o in options {
            let Some((k, v)) = o.split_once('=') else {
                return Err(usage(
                    format!("storage option {o:?} is not KEY=VALUE"),
                    "write it as, for example, endpoint=http://127.0.0.1:9000",
                ));
            };
            if tidemark_storage::is_secret(k) {
                return Err(usage(
                    format!("storage option {k:?} is a secret and is not taken on the command line, where process lists show it"),
                    "set it in the environment (for S3: AWS_SECRET_ACCESS_KEY) or in the config file",
                ));
            }
            location.set_option(k, v);
        }
        Ok(location)
    }

    pub async fn open(&self) -> Result<Repository> {
        let secret = self.secret()?;
        Ok(Repository::open(self.storage()?, &secret).await?)
    }
}
