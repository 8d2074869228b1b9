//! `tidemark status`: what a running agent reports, as a summary in the terminal (`--json`
//! for the agent's `/status` document as is).

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use tidemark_agent::status::Status;

use crate::context::{usage, Global};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The agent's address (default: agent.listen of --config).
    #[arg(long)]
    url: Option<String>,
}

fn ago(t: DateTime<Utc>) -> String {
    let d = Utc::now() - t;
    let s = d.num_seconds();
    match s {
        _ if d < chrono::Duration::zero() => format!(
            "in {}",
            tidemark_repo::duration::format(chrono::Duration::seconds(-s))
        ),
        s => format!(
            "{} ago",
            tidemark_repo::duration::format(chrono::Duration::seconds(s))
        ),
    }
}

pub async fn run(g: &Global, a: Args) -> Result<i32> {
    let base = match a.url {
        Some(u) => u,
        None => format!("http://{}", super::agent::load(g)?.listen()),
    };
    let url = format!("{}/status", base.trim_end_matches('/'));
    let resp = reqwest::get(&url).await.map_err(|e| {
        usage(
            format!("failed to reach the agent at {url}: {e}"),
            "is `tidemark agent` running with this config? pass --url to name another address",
        )
    })?;
    let text = resp
        .text()
        .await
        .context("failed to read the agent's status")?;
    let status: Status =
        serde_json::from_str(&text).context("the agent's /status is not a status document")?;
    if g.json {
        super::print_json(&status)?;
        return Ok(crate::exit::OK);
    }
    println!("agent {}", if status.ready { "ready" } else { "starting" });
    for (name, d) in &status.databases {
        println!("{name} ({}, repository {})", d.engine, d.repository);
        if let Some(r) = &d.running {
            println!(
                "  running: {} backup, attempt {}, since {}",
                r.kind,
                r.attempt,
                ago(r.since)
            );
        }
        for (kind, k) in &d.kinds {
            let last = match (&k.last_success, k.failing()) {
                (_, true) => format!(
                    "FAILING: {}",
                    k.last_failure
                        .as_ref()
                        .and_then(|f| f.error.clone())
                        .unwrap_or_default()
                ),
                (Some(s), false) => format!("ok {} ({:.1}s)", ago(s.started), s.duration_seconds),
                (None, false) => "never ran".into(),
            };
            let next = k.next_run.map(ago).unwrap_or_else(|| "-".into());
            println!(
                "  {kind:<12} {last}; next {next}; {} ok, {} failed, {} skipped",
                k.successes, k.failures, k.skipped
            );
        }
        match d.recoverable() {
            Some((first, last)) => println!(
                "  recoverable: {} to {} ({} snapshots)",
                first.format("%Y-%m-%d %H:%M:%S"),
                last.format("%Y-%m-%d %H:%M:%S"),
                d.snapshots.len()
            ),
            None => println!("  recoverable: nothing yet"),
        }
        for (loc, l) in &d.locations {
            let state = if l.ok { "ok" } else { "FAILING" };
            let last = l
                .last_success
                .map(|t| format!(", last backup {}", ago(t)))
                .unwrap_or_default();
            let missing = if l.missing.is_empty() {
                String::new()
            } else {
                format!(
                    ", MISSING {} (fill with `tidemark copy`): {}",
                    l.missing.len(),
                    l.missing.join(" ")
                )
            };
            let error = l
                .last_error
                .as_deref()
                .filter(|_| !l.ok)
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            println!(
                "  location {loc}: {state}, {} snapshots{last}{missing}{error}",
                l.snapshots
            );
        }
        if let Some(w) = &d.wal {
            let lag = w
                .lag_bytes
                .map(|b| format!("{b} bytes behind"))
                .unwrap_or_else(|| "lag unknown".into());
            let up = if w.mode == "streaming" {
                format!(
                    ", streamer {} ({} restarts)",
                    if w.up { "up" } else { "DOWN" },
                    w.restarts
                )
            } else {
                String::new()
            };
            println!("  wal: {} archiving, {lag}{up}", w.mode);
        }
        if let Some(v) = &d.verification {
            println!(
                "  verification: {} {} of snapshot {} in {:.1}s{}",
                if v.ok { "passed" } else { "FAILED" },
                ago(v.started),
                v.snapshot.as_deref().unwrap_or("-"),
                v.rto_seconds,
                v.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        }
        // The plan is what the last dry run found (planned); `retention` is what the last run
        // did (done).
        for line in &d.retention_plan {
            println!("  retention plan: {line}");
        }
        for line in &d.retention {
            println!("  retention done: {line}");
        }
        if let Some(e) = &d.retention_error {
            println!("  retention FAILED: {e}");
        }
    }
    Ok(crate::exit::OK)
}
