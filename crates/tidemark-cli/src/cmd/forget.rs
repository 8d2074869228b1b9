//! `tidemark forget`: apply a retention policy; print the plan; `--dry-run` stops there.

use anyhow::Result;
use tidemark_repo::lock::{LockGuard, LockKind, LockOptions};
use tidemark_repo::ops::forget::{forget, KeepPolicy};

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
    /// Only consider snapshots with all these tags.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
}

fn parse_duration(s: &str) -> Result<chrono::Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 7d or 12h"))?;
    Ok(match unit {
        "s" => chrono::Duration::seconds(n),
        "m" => chrono::Duration::minutes(n),
        "h" | "" => chrono::Duration::hours(n),
        "d" => chrono::Duration::days(n),
        "w" => chrono::Duration::weeks(n),
        "y" => chrono::Duration::days(365 * n),
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use s, m, h, d, w or y"
            ))
        }
    })
}

pub async fn run(ctx: &Context, a: Args) -> Result<i32> {
    let policy = KeepPolicy {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
        within: a.keep_within,
        tags: a.tags,
    };
    if policy.is_empty() {
        return Err(usage(
            "no keep rule given",
            "pass at least one --keep-* option",
        ));
    }
    let repo = ctx.open().await?;
    let lock =
        LockGuard::acquire(&repo, LockKind::Shared, "forget", &LockOptions::default()).await?;
    let plan = forget(&repo, &policy, a.dry_run).await;
    lock.release().await?;
    let plan = plan?;
    if ctx.json {
        super::print_json(&serde_json::json!({"dry_run": a.dry_run, "plan": plan}))?;
    } else {
        for d in &plan {
            println!(
                "{} {} {}  {:<22} {}",
                if d.keep { "keep  " } else { "remove" },
                d.id.short(),
                d.time.format("%Y-%m-%d %H:%M:%S"),
                d.group,
                d.reasons.join(", ")
            );
        }
        let removed = plan.iter().filter(|d| !d.keep).count();
        if a.dry_run {
            println!(
                "would remove {removed} of {} snapshots (dry run)",
                plan.len()
            );
        } else {
            println!(
                "removed {removed} of {} snapshots; run `tidemark prune` to free their space",
                plan.len()
            );
        }
    }
    Ok(crate::exit::OK)
}
