//! `--also URL`: a backup read once and written to other locations of the repository as well
//! (format §9a), as the agent does with a repository's `locations`.
//!
//! The repository (`--repo`) must open and lock: it is where the command starts. Each `--also`
//! location is reached through it with its key, and an empty one is made a location of the
//! repository. One that holds another repository, or is damaged, stops the command before
//! anything is read. One that cannot be reached or locked is left out and named; the backup
//! goes on to the others, and the command then exits with [`crate::exit::PARTIAL`] and the
//! `tidemark copy` that fills the gap.

use std::sync::Arc;

use anyhow::Result;
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::backup::{Backup, BackupOptions, Finished};
use tidemark_repo::progress::Progress;
use tidemark_repo::Repository;

use crate::context::Context;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct AlsoArgs {
    /// Write the backup to this location of the repository as well, from the same read
    /// (repeatable). Storage options go in the URL's query (s3://bucket/p?region=eu-west-1),
    /// secrets in the environment. An empty location is made a location of the repository; one
    /// that fails is left out and named, and the exit code is 9.
    #[arg(long = "also", value_name = "URL")]
    pub also: Vec<String>,
}

/// The locations a backup writes to, each locked: the repository first.
pub struct Targets {
    reached: Vec<Repository>,
    locks: Vec<LockGuard>,
    /// Locations given with `--also` that could not be reached or locked: (URL, why).
    left_out: Vec<(String, String)>,
}

impl Targets {
    /// Lock `primary` (its failure is the command's) and reach and lock every `--also` location.
    ///
    /// # Errors
    /// The repository's lock; a bad `--also` URL; an `--also` location holding another
    /// repository or damaged objects.
    pub async fn acquire(
        ctx: &Context,
        primary: Repository,
        also: &AlsoArgs,
        lock_opts: &LockOptions,
    ) -> Result<Targets> {
        let lock = LockGuard::acquire(&primary, LockKind::Shared, "backup", lock_opts).await?;
        let mut t = Targets {
            reached: vec![primary],
            locks: vec![lock],
            left_out: Vec::new(),
        };
        for url in &also.also {
            // A bad URL stops the command; a location that fails to open (a directory that
            // cannot be made, a client that cannot be built) is left out like an unreachable one.
            let location = match Context::other_location(url, &[]) {
                Ok(l) => l,
                Err(e) => {
                    t.release().await;
                    return Err(e);
                }
            };
            let storage = match location.open(&ctx.storage_options) {
                Ok(s) => s,
                Err(e) => {
                    t.leave_out(url, e.to_string());
                    continue;
                }
            };
            let reached = match t.reached[0].attach(storage).await {
                Ok(r) => r,
                Err(e @ tidemark_repo::Error::Invalid(_)) => {
                    t.release().await;
                    return Err(e.into());
                }
                Err(e) => {
                    t.leave_out(url, format!("unreachable: {e}"));
                    continue;
                }
            };
            if t.reached.iter().any(|r| r.location() == reached.location()) {
                let location = reached.location().to_owned();
                t.release().await;
                return Err(crate::context::usage(
                    format!("location {location} is given twice"),
                    "give each location of the repository once: --repo, then --also for the others",
                ));
            }
            match LockGuard::acquire(&reached, LockKind::Shared, "backup", lock_opts).await {
                Ok(l) => {
                    t.reached.push(reached);
                    t.locks.push(l);
                }
                Err(e) => t.leave_out(url, format!("failed to lock: {e}")),
            }
        }
        Ok(t)
    }

    fn leave_out(&mut self, url: &str, why: String) {
        tracing::warn!(location = %url, "location left out of the backup: {why}");
        self.left_out.push((url.to_owned(), why));
    }

    /// Start the backup at every location reached.
    ///
    /// # Errors
    /// As `Backup::start_at`.
    pub async fn start(
        &self,
        opts: BackupOptions,
        progress: Arc<Progress>,
    ) -> tidemark_repo::Result<Backup<'_>> {
        let targets = self
            .reached
            .iter()
            .cloned()
            .zip(self.locks.iter())
            .collect();
        Backup::start_at(targets, opts, progress).await
    }

    /// Release every lock. A lock that cannot be released expires by itself.
    pub async fn release(&mut self) {
        for l in std::mem::take(&mut self.locks) {
            if let Err(e) = l.release().await {
                tracing::warn!("failed to release a lock (it expires by itself): {e}");
            }
        }
    }

    /// Each location and why it missed the snapshot (`None`: it has it), in the order given.
    pub fn outcomes(&self, f: &Finished) -> Vec<(String, Option<String>)> {
        let mut out: Vec<(String, Option<String>)> = self
            .reached
            .iter()
            .zip(&f.locations)
            .map(|(r, o)| (r.location().to_owned(), o.error.clone()))
            .collect();
        out.extend(
            self.left_out
                .iter()
                .map(|(url, why)| (url.clone(), Some(why.clone()))),
        );
        out
    }

    /// Say which locations missed the snapshot and how to fill them; the exit code:
    /// `PARTIAL` when one did, else `OK`.
    pub fn report_missing(&self, f: &Finished) -> i32 {
        let missing: Vec<_> = self
            .outcomes(f)
            .into_iter()
            .filter_map(|(l, e)| e.map(|e| (l, e)))
            .collect();
        if missing.is_empty() {
            return crate::exit::OK;
        }
        for (location, why) in &missing {
            eprintln!(
                "tidemark: location {location} missed snapshot {}: {why}",
                f.id.short()
            );
        }
        eprintln!(
            "hint: the snapshot is complete at the other locations; once a location is back, fill it with `tidemark copy --to URL {}`",
            f.id.short()
        );
        crate::exit::PARTIAL
    }
}

/// The `locations` member of `--json` output.
pub fn locations_json(outcomes: &[(String, Option<String>)]) -> serde_json::Value {
    outcomes
        .iter()
        .map(|(l, e)| serde_json::json!({"location": l, "ok": e.is_none(), "error": e}))
        .collect()
}

#[derive(Debug, Clone, Default, clap::Args)]
pub struct FallbackArgs {
    /// Another location of the repository to read a chunk from when --repo's copy is missing or
    /// damaged (repeatable; options in the URL's query). Every chunk is verified wherever it
    /// is read from; nothing is written there.
    #[arg(long = "fallback", value_name = "URL")]
    pub fallback: Vec<String>,
}

/// The repository at `--repo`, with each `--fallback` location opened (read only: a location
/// without the repository is an error, not made a home) to fall back on.
///
/// # Errors
/// Opening any of them; a fallback holding another repository.
pub async fn open_with_fallbacks(ctx: &Context, f: &FallbackArgs) -> Result<Repository> {
    let repo = ctx.open().await?;
    if f.fallback.is_empty() {
        return Ok(repo);
    }
    let secret = ctx.secret()?;
    let mut others = Vec::with_capacity(f.fallback.len());
    for url in &f.fallback {
        others.push(Repository::open(ctx.other_storage(url, &[])?, &secret).await?);
    }
    Ok(repo.with_fallbacks(others)?)
}

/// After a restore: say on stderr when chunks had to be read from a fallback location.
pub fn report_fallbacks(repo: &Repository) {
    let n = repo.chunks_read_elsewhere();
    if n > 0 {
        eprintln!(
            "tidemark: {n} chunk(s) were missing or damaged at {} and were read, verified, from another location; the restore is whole",
            repo.location()
        );
        eprintln!(
            "hint: run `tidemark check --read-data` at {} to find the damage",
            repo.location()
        );
    }
}
