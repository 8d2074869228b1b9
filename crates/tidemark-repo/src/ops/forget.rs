//! Forget: choose snapshots to keep by a retention policy, print the plan, delete the rest.
//! The newest snapshot of each group is always kept, so a policy can never empty a group.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Datelike, Duration, Utc};

use crate::error::Result;
use crate::id::SnapshotId;
use crate::repository::Repository;
use crate::snapshot::Snapshot;

/// A retention policy: one struct for the CLI, the agent's config and the CRDs.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepPolicy {
    /// Keep the newest n snapshots.
    #[serde(default)]
    pub last: u32,
    /// Keep the newest snapshot of each of the last n hours that have one.
    #[serde(default)]
    pub hourly: u32,
    /// The same per day.
    #[serde(default)]
    pub daily: u32,
    /// Per ISO week.
    #[serde(default)]
    pub weekly: u32,
    /// Per month.
    #[serde(default)]
    pub monthly: u32,
    /// Per year.
    #[serde(default)]
    pub yearly: u32,
    /// Keep every snapshot newer than this, relative to the newest snapshot of the group.
    #[serde(
        default,
        with = "crate::duration::opt_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub within: Option<Duration>,
    /// Only snapshots with all these tags are considered; others are kept.
    #[serde(default)]
    pub tags: Vec<String>,
}

impl KeepPolicy {
    /// Whether the policy keeps nothing by any rule (then only the newest survives).
    pub fn is_empty(&self) -> bool {
        self.last == 0
            && self.hourly == 0
            && self.daily == 0
            && self.weekly == 0
            && self.monthly == 0
            && self.yearly == 0
            && self.within.is_none()
    }
}

/// One snapshot's fate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Decision {
    /// The snapshot.
    pub id: SnapshotId,
    /// Its time.
    pub time: DateTime<Utc>,
    /// Its group: host, engine, database.
    pub group: String,
    /// Kept?
    pub keep: bool,
    /// Why: the rules that kept it, or empty when removed.
    pub reasons: Vec<String>,
}

/// The group a snapshot's retention is decided in: one database (by its system identifier
/// when the engine has one, else by host and name) and one kind. Kinds are separate so that a
/// newer logical dump never pushes out the physical base backup that point-in-time recovery
/// needs; the system identifier rather than the host name because an agent on Kubernetes gets a
/// new host name with every pod.
pub fn group_of(s: &Snapshot) -> String {
    let origin = s.database.system_id.as_deref().unwrap_or(&s.hostname);
    let kind = match s.kind {
        crate::snapshot::SnapshotKind::Logical => "logical",
        crate::snapshot::SnapshotKind::Physical => "physical",
        crate::snapshot::SnapshotKind::Files => "files",
    };
    format!("{}/{origin}/{}/{kind}", s.engine, s.database.name)
}

/// Decide which snapshots to keep. Pure: no storage access.
pub fn plan(snapshots: &[(SnapshotId, Snapshot)], policy: &KeepPolicy) -> Vec<Decision> {
    let mut groups: BTreeMap<String, Vec<&(SnapshotId, Snapshot)>> = BTreeMap::new();
    for s in snapshots {
        groups.entry(group_of(&s.1)).or_default().push(s);
    }
    let mut out = Vec::new();
    for (group, mut snaps) in groups {
        snaps.sort_by_key(|s| std::cmp::Reverse(s.1.time)); // newest first
        let newest = snaps[0].1.time;
        type Bucket = fn(&DateTime<Utc>) -> i64;
        let rules: [(&str, u32, Bucket); 5] = [
            ("hourly", policy.hourly, |t| t.timestamp() / 3600),
            ("daily", policy.daily, |t| t.num_days_from_ce() as i64),
            ("weekly", policy.weekly, |t| {
                let w = t.iso_week();
                w.year() as i64 * 100 + w.week() as i64
            }),
            ("monthly", policy.monthly, |t| {
                t.year() as i64 * 12 + t.month() as i64
            }),
            ("yearly", policy.yearly, |t| t.year() as i64),
        ];
        let mut seen: Vec<HashSet<i64>> = vec![HashSet::new(); rules.len()];
        let mut last_kept = 0u32;
        for (i, (id, s)) in snaps.iter().map(|x| (&x.0, &x.1)).enumerate() {
            let mut reasons = Vec::new();
            if !s.has_tags(&policy.tags) {
                reasons.push("not matched by the tag filter".to_owned());
            }
            if i == 0 {
                reasons.push("newest in its group".to_owned());
            }
            if last_kept < policy.last {
                last_kept += 1;
                reasons.push(format!("last {}", policy.last));
            }
            if let Some(w) = policy.within {
                if s.time >= newest - w {
                    reasons.push(format!("within {}s", w.num_seconds()));
                }
            }
            for (r, (name, n, bucket)) in rules.iter().enumerate() {
                let b = bucket(&s.time);
                if seen[r].len() < *n as usize && seen[r].insert(b) {
                    reasons.push(format!("{name} {n}"));
                }
            }
            out.push(Decision {
                id: *id,
                time: s.time,
                group: group.clone(),
                keep: !reasons.is_empty(),
                reasons,
            });
        }
    }
    out
}

/// Apply the keep rules alone (no log segments): delete the snapshots they remove, unless
/// `dry_run`. Returns the decisions. Engines with a log go through `retention`.
///
/// # Errors
/// Storage errors.
pub async fn forget(
    repo: &Repository,
    policy: &KeepPolicy,
    dry_run: bool,
) -> Result<Vec<Decision>> {
    let snapshots = repo.snapshots().await?;
    let facts: Vec<_> = snapshots
        .into_iter()
        .map(|(id, snapshot)| crate::ops::retention::SnapshotFacts {
            id,
            snapshot,
            needs: None,
            restorable: true,
        })
        .collect();
    let policy = crate::ops::retention::RetentionPolicy {
        keep: policy.clone(),
        pitr_window: None,
    };
    let plan = crate::ops::retention::plan(&facts, &[], &policy);
    if !dry_run {
        crate::ops::retention::apply(repo, &plan).await?;
    }
    Ok(plan.snapshots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{SnapshotKind, Summary};

    fn snap(t: DateTime<Utc>, n: u8) -> (SnapshotId, Snapshot) {
        (
            SnapshotId([n; 32]),
            Snapshot {
                version: 1,
                time: t,
                time_end: t,
                hostname: "h".into(),
                username: String::new(),
                engine: "sqlite".into(),
                kind: SnapshotKind::Physical,
                database: Default::default(),
                tags: vec![],
                parent: None,
                streams: vec![],
                positions: Default::default(),
                summary: Summary::default(),
            },
        )
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day() {
        let base = DateTime::parse_from_rfc3339("2026-11-20T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let snaps: Vec<_> = (0..12)
            .map(|i| snap(base + Duration::hours(i * 6), i as u8))
            .collect();
        let d = plan(
            &snaps,
            &KeepPolicy {
                daily: 2,
                ..Default::default()
            },
        );
        let kept: Vec<_> = d
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.time.to_rfc3339())
            .collect();
        assert_eq!(
            kept,
            vec!["2026-11-22T18:00:00+00:00", "2026-11-21T18:00:00+00:00"]
        );
    }

    #[test]
    fn an_empty_policy_still_keeps_the_newest_snapshot() {
        let base = Utc::now();
        let snaps: Vec<_> = (0..3)
            .map(|i| snap(base - Duration::hours(i), i as u8))
            .collect();
        let d = plan(&snaps, &KeepPolicy::default());
        assert_eq!(d.iter().filter(|d| d.keep).count(), 1);
        assert!(d.iter().find(|d| d.keep).unwrap().time == base);
    }

    #[test]
    fn last_and_within_combine() {
        let base = Utc::now();
        let snaps: Vec<_> = (0..10)
            .map(|i| snap(base - Duration::hours(i), i as u8))
            .collect();
        let d = plan(
            &snaps,
            &KeepPolicy {
                last: 2,
                within: Some(Duration::hours(4)),
                ..Default::default()
            },
        );
        assert_eq!(d.iter().filter(|d| d.keep).count(), 5);
    }
}
