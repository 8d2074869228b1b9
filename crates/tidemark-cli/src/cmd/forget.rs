//! `tidemark forget`: apply a retention policy; print the plan; `--dry-run` stops there.

use anyhow::Result;
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::forget::KeepPolicy;
use tidemark_repo::ops::retention::{RetentionPlan, RetentionPolicy};

use crate::context::{usage, Context};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Keep the newest N snapshots.
    #[arg(long, default_value_t = 0)]
    keep_last: u32,
    /// Keep the newest snapshot of each of the last N hours.
    #[arg(long, default_value_t = 0)]
    keep_hourly: u32,
    /// ... of the last N days.
    #[arg(long, default_value_t = 0)]
    keep_daily: u32,
    /// ... of the last N weeks.
    #[arg(long, default_value_t = 0)]
    keep_weekly: u32,
    /// ... of the last N months.
    #[arg(long, default_value_t = 0)]
    keep_monthly: u32,
    /// ... of the last N years.
    #[arg(long, default_value_t = 0)]
    keep_yearly: u32,
    /// Keep everything within this duration of the newest snapshot (e.g. 7d, 12h, 30m).
    #[arg(long, value_parser = parse_duration)]
    keep_within: Option<chrono::Duration>,
    /// Keep what recovery to any second of this window needs (e.g. 7d): the newest base
    /// backup before it, every one in it and the WAL from the first of them on. The window ends
    /// at the newest snapshot.
    #[arg(long, value_parser = parse_duration)]
    pitr_window: Option<chrono::Duration>,
    /// Only consider snapshots with all these tags.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
}

fn parse_duration(s: &str) -> Result<chrono::Duration, String> {
    tidemark_repo::duration::parse(s)
}

pub async fn run(ctx: &Context, a: Args) -> Result<i32> {
    let policy = RetentionPolicy {
        keep: KeepPolicy {
            last: a.keep_last,
            hourly: a.keep_hourly,
            daily: a.keep_daily,
            weekly: a.keep_weekly,
            monthly: a.keep_monthly,
            yearly: a.keep_yearly,
            within: a.keep_within,
            tags: a.tags,
        },
        pitr_window: a.pitr_window,
    };
    if policy.keep.is_empty() && policy.pitr_window.is_none() {
        return Err(usage(
            "no keep rule given",
            "pass at least one --keep-* option or --pitr-window",
        ));
    }
    let repo = ctx.open().await?;
    let lock =
        LockGuard::acquire(&repo, LockKind::Shared, "forget", &LockOptions::default()).await?;
    let plan = tidemark_engine::retention::forget(&repo, &policy, a.dry_run).await;
    lock.release().await?;
    let plan = plan.map_err(super::backup::engine_error)?;
    if ctx.json {
        super::print_json(&serde_json::json!({"dry_run": a.dry_run, "plan": plan}))?;
        return Ok(crate::exit::OK);
    }
    print_plan(&plan);
    let removed = plan.removed().count();
    let segments = plan.delete_segments.len();
    if a.dry_run {
        println!(
            "would remove {removed} of {} snapshots and {segments} of {} log segments (dry run)",
            plan.snapshots.len(),
            segments + plan.kept_segments
        );
    } else {
        println!(
            "removed {removed} of {} snapshots and {segments} of {} log segments; run `tidemark prune` to free the snapshots' space",
            plan.snapshots.len(),
            segments + plan.kept_segments
        );
    }
    Ok(crate::exit::OK)
}

/// The plan as people read it: each snapshot and why it stays, the protected chains and the
/// point-in-time windows.
pub fn print_plan(plan: &RetentionPlan) {
    for d in &plan.snapshots {
        println!(
            "{} {} {}  {:<22} {}",
            if d.keep { "keep  " } else { "remove" },
            d.id.short(),
            d.time.format("%Y-%m-%d %H:%M:%S"),
            d.group,
            d.reasons.join(", ")
        );
    }
    for c in &plan.chains {
        match (&c.stream, &c.log_from) {
            (Some(stream), Some(from)) => println!(
                "protected chain of {}: base backup {} and {stream} from position {from} on",
                c.group,
                c.base.short()
            ),
            _ => println!(
                "protected: newest restorable snapshot {} of {}",
                c.base.short(),
                c.group
            ),
        }
    }
    for w in &plan.windows {
        println!(
            "pitr window of {}: {} to {}{}",
            w.group,
            w.covered_from.format("%Y-%m-%d %H:%M:%S"),
            w.until.format("%Y-%m-%d %H:%M:%S"),
            if w.covered_from > w.wanted_from {
                format!(
                    " (asked from {}: no older base backup)",
                    w.wanted_from.format("%Y-%m-%d %H:%M:%S")
                )
            } else {
                String::new()
            }
        );
    }
}
