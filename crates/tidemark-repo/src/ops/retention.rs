//! Retention that cannot lose the ability to restore: the keep rules of `forget`, a
//! point-in-time window, and the newest restorable chain, planned over snapshots and log
//! segments together. Pure: the caller lists the objects, the engine says what each snapshot
//! needs of the log, and nothing here reads a clock.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::id::SnapshotId;
use crate::ops::forget::{group_of, plan as keep_plan, Decision, KeepPolicy};
use crate::repository::Repository;
use crate::snapshot::Snapshot;

/// A retention policy with a point-in-time window: one struct for the CLI, the agent's config
/// and the CRDs. Written flat (`keep_last: 7`, `keep_daily: 14`, `pitr_window: 7d`); unknown
/// fields are refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(from = "FlatPolicy", into = "FlatPolicy")]
pub struct RetentionPolicy {
    /// The count and calendar rules.
    pub keep: KeepPolicy,
    /// Keep what recovery to any second of this window needs: the newest base backup from
    /// before the window, every base backup in it and the log from the first of them on. The
    /// window ends at the newest snapshot of the group (never at the wall clock, which may jump).
    pub pitr_window: Option<Duration>,
}

/// The policy as written in files.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlatPolicy {
    #[serde(default, skip_serializing_if = "is_zero")]
    keep_last: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    keep_hourly: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    keep_daily: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    keep_weekly: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    keep_monthly: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    keep_yearly: u32,
    #[serde(
        default,
        with = "crate::duration::opt_serde",
        skip_serializing_if = "Option::is_none"
    )]
    keep_within: Option<Duration>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    keep_tags: Vec<String>,
    #[serde(
        default,
        with = "crate::duration::opt_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pitr_window: Option<Duration>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl From<FlatPolicy> for RetentionPolicy {
    fn from(f: FlatPolicy) -> Self {
        RetentionPolicy {
            keep: KeepPolicy {
                last: f.keep_last,
                hourly: f.keep_hourly,
                daily: f.keep_daily,
                weekly: f.keep_weekly,
                monthly: f.keep_monthly,
                yearly: f.keep_yearly,
                within: f.keep_within,
                tags: f.keep_tags,
            },
            pitr_window: f.pitr_window,
        }
    }
}

impl From<RetentionPolicy> for FlatPolicy {
    fn from(p: RetentionPolicy) -> Self {
        let k = p.keep;
        FlatPolicy {
            keep_last: k.last,
            keep_hourly: k.hourly,
            keep_daily: k.daily,
            keep_weekly: k.weekly,
            keep_monthly: k.monthly,
            keep_yearly: k.yearly,
            keep_within: k.within,
            keep_tags: k.tags,
            pitr_window: p.pitr_window,
        }
    }
}

/// What a snapshot needs of a log stream to be restored, and where recovery from it can go.
/// Keys are the engine's position keys: byte order is log order across the whole stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogNeeds {
    /// The log stream (`pg/<system id>/wal`).
    pub stream: String,
    /// The first segment the snapshot needs (its start).
    pub from: String,
    /// The last segment it needs to be consistent (its stop).
    pub to: String,
}

/// A snapshot as retention sees it.
#[derive(Debug, Clone)]
pub struct SnapshotFacts {
    /// The id.
    pub id: SnapshotId,
    /// The manifest.
    pub snapshot: Snapshot,
    /// For base backups of engines with a log: what of it the snapshot needs.
    pub needs: Option<LogNeeds>,
    /// False for a snapshot that must not be the base of the protected chain (its source had
    /// damaged pages, or a verification restore of it failed).
    pub restorable: bool,
}

/// A log segment as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentFacts {
    /// The stream.
    pub stream: String,
    /// The object's name in the stream.
    pub name: String,
    /// Its position key; `None` for objects that are always kept (timeline history files).
    pub key: Option<String>,
}

/// The chain retention protects in one group: a base backup and the log from its start.
#[derive(Debug, Clone, Serialize)]
pub struct Chain {
    /// The group.
    pub group: String,
    /// The base backup.
    pub base: SnapshotId,
    /// Its time.
    pub time: DateTime<Utc>,
    /// The log stream, when the group has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// The first log segment kept for it (by key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_from: Option<String>,
}

/// A point-in-time window as planned for one group.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// The group.
    pub group: String,
    /// Where the window asked for starts.
    pub wanted_from: DateTime<Utc>,
    /// Where recovery can really start with what is kept (later than `wanted_from` when the
    /// oldest base backup is younger than the window).
    pub covered_from: DateTime<Utc>,
    /// Where it ends: the newest snapshot of the group.
    pub until: DateTime<Utc>,
}

/// The whole plan: what goes, what stays and why. Shown by `forget --dry-run` and the agent's
/// status before anything is deleted.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RetentionPlan {
    /// Each snapshot's fate, with the rules that kept it.
    pub snapshots: Vec<Decision>,
    /// Log segments to delete, as (stream, name).
    pub delete_segments: Vec<(String, String)>,
    /// Log segments kept.
    pub kept_segments: usize,
    /// The protected chain of each group.
    pub chains: Vec<Chain>,
    /// The point-in-time window of each group with log needs, when the policy has one.
    pub windows: Vec<Window>,
}

impl RetentionPlan {
    /// Snapshots the plan removes.
    pub fn removed(&self) -> impl Iterator<Item = &Decision> {
        self.snapshots.iter().filter(|d| !d.keep)
    }
}

/// Plan retention. Three rules only ever add to what the keep rules keep:
/// 1. the newest restorable snapshot of each group, newest by log position when it has one
///    (a clock that jumped cannot make an old base backup look new), and with it every log
///    segment from its start on: the newest restorable chain;
/// 2. the point-in-time window: the newest base backup that starts at or before the window's
///    start, every later one, and the log from the first of them on;
/// 3. every kept base backup keeps the log segments between its start and its stop.
///
/// A segment is deleted only when it lies in a stream that some snapshot needs and no rule
/// keeps it; streams no snapshot refers to are left alone.
pub fn plan(
    facts: &[SnapshotFacts],
    segments: &[SegmentFacts],
    policy: &RetentionPolicy,
) -> RetentionPlan {
    let pairs: Vec<(SnapshotId, Snapshot)> =
        facts.iter().map(|f| (f.id, f.snapshot.clone())).collect();
    let mut decisions = keep_plan(&pairs, &policy.keep);
    let by_id: BTreeMap<SnapshotId, &SnapshotFacts> = facts.iter().map(|f| (f.id, f)).collect();
    let mut groups: BTreeMap<String, Vec<&SnapshotFacts>> = BTreeMap::new();
    for f in facts {
        groups.entry(group_of(&f.snapshot)).or_default().push(f);
    }
    let mut keep_extra: BTreeMap<SnapshotId, Vec<String>> = BTreeMap::new();
    // (stream -> lowest key from which everything is kept)
    let mut keep_from: BTreeMap<String, String> = BTreeMap::new();
    let mut chains = Vec::new();
    let mut windows = Vec::new();
    let lower = |map: &mut BTreeMap<String, String>, stream: &str, key: &str| {
        let e = map
            .entry(stream.to_owned())
            .or_insert_with(|| key.to_owned());
        if key < e.as_str() {
            *e = key.to_owned();
        }
    };
    for (group, members) in &groups {
        // Rule 1: the newest restorable chain.
        let newest = members.iter().filter(|f| f.restorable).max_by(|a, b| {
            let ka = a.needs.as_ref().map(|n| n.from.as_str());
            let kb = b.needs.as_ref().map(|n| n.from.as_str());
            ka.cmp(&kb).then(a.snapshot.time.cmp(&b.snapshot.time))
        });
        if let Some(base) = newest {
            keep_extra
                .entry(base.id)
                .or_default()
                .push("newest restorable chain".into());
            if let Some(n) = &base.needs {
                lower(&mut keep_from, &n.stream, &n.from);
            }
            chains.push(Chain {
                group: group.clone(),
                base: base.id,
                time: base.snapshot.time,
                stream: base.needs.as_ref().map(|n| n.stream.clone()),
                log_from: base.needs.as_ref().map(|n| n.from.clone()),
            });
        }
        // Rule 2: the point-in-time window, for groups whose snapshots use a log.
        let Some(w) = policy.pitr_window else {
            continue;
        };
        let mut bases: Vec<&&SnapshotFacts> = members
            .iter()
            .filter(|f| f.restorable && f.needs.is_some())
            .collect();
        if bases.is_empty() {
            continue;
        }
        bases.sort_by(|a, b| {
            let (ka, kb) = (
                &a.needs.as_ref().unwrap().from,
                &b.needs.as_ref().unwrap().from,
            );
            ka.cmp(kb).then(a.snapshot.time.cmp(&b.snapshot.time))
        });
        let until = members.iter().map(|f| f.snapshot.time_end).max().unwrap();
        let start = until - w;
        // The newest base that starts at or before the window's start; else the oldest.
        let first = bases
            .iter()
            .rposition(|f| f.snapshot.time <= start)
            .unwrap_or(0);
        for f in &bases[first..] {
            keep_extra
                .entry(f.id)
                .or_default()
                .push(format!("pitr window {}s", w.num_seconds()));
        }
        let n = bases[first].needs.as_ref().unwrap();
        lower(&mut keep_from, &n.stream, &n.from);
        windows.push(Window {
            group: group.clone(),
            wanted_from: start,
            covered_from: bases[first].snapshot.time.max(start),
            until,
        });
    }
    for d in &mut decisions {
        if let Some(extra) = keep_extra.remove(&d.id) {
            d.keep = true;
            d.reasons.extend(extra);
        }
    }
    // Rule 3 and the deletion of segments.
    let mut ranges: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    let mut known: BTreeSet<&str> = BTreeSet::new();
    for d in &decisions {
        let Some(n) = by_id.get(&d.id).and_then(|f| f.needs.as_ref()) else {
            continue;
        };
        known.insert(&n.stream);
        if d.keep {
            ranges.entry(&n.stream).or_default().push((&n.from, &n.to));
        }
    }
    let mut delete_segments = Vec::new();
    let mut kept_segments = 0;
    for s in segments {
        let needed = match &s.key {
            None => true,
            Some(_) if !known.contains(s.stream.as_str()) => true,
            Some(k) => {
                keep_from.get(&s.stream).is_some_and(|f| k >= f)
                    || ranges.get(s.stream.as_str()).is_some_and(|r| {
                        r.iter()
                            .any(|(from, to)| k.as_str() >= *from && k.as_str() <= *to)
                    })
            }
        };
        if needed {
            kept_segments += 1;
        } else {
            delete_segments.push((s.stream.clone(), s.name.clone()));
        }
    }
    RetentionPlan {
        snapshots: decisions,
        delete_segments,
        kept_segments,
        chains,
        windows,
    }
}

/// Carry out a plan: delete the snapshots it removes, then the log segments. In this order a
/// crash in between leaves segments nobody needs (the next run deletes them), never a snapshot
/// whose log is gone. Space held by the snapshots' chunks is freed by `prune`.
///
/// # Errors
/// Storage errors; what was deleted before the error stays deleted.
pub async fn apply(repo: &Repository, plan: &RetentionPlan) -> Result<()> {
    for d in plan.removed() {
        repo.storage()
            .delete(&format!("snapshots/{}", d.id))
            .await?;
    }
    for (stream, name) in &plan.delete_segments {
        crate::log::delete_segment(repo, stream, name).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{SnapshotKind, Summary};

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn key(n: u64) -> String {
        format!("{n:016X}")
    }

    fn base(n: u8, time: DateTime<Utc>, from: u64, to: u64) -> SnapshotFacts {
        SnapshotFacts {
            id: SnapshotId([n; 32]),
            snapshot: Snapshot {
                version: 1,
                time,
                time_end: time + Duration::minutes(5),
                hostname: "h".into(),
                username: String::new(),
                engine: "postgres".into(),
                kind: SnapshotKind::Physical,
                database: crate::snapshot::DatabaseIdentity {
                    name: "cluster".into(),
                    system_id: Some("7".into()),
                    version: None,
                },
                tags: vec![],
                parent: None,
                streams: vec![],
                positions: Default::default(),
                summary: Summary::default(),
            },
            needs: Some(LogNeeds {
                stream: "pg/7/wal".into(),
                from: key(from),
                to: key(to),
            }),
            restorable: true,
        }
    }

    fn segs(range: std::ops::Range<u64>) -> Vec<SegmentFacts> {
        range
            .map(|n| SegmentFacts {
                stream: "pg/7/wal".into(),
                name: format!("seg{n}"),
                key: Some(key(n)),
            })
            .collect()
    }

    #[test]
    fn an_empty_policy_keeps_the_newest_base_backup_and_the_log_after_it() {
        let facts = vec![
            base(1, t0(), 0, 1),
            base(2, t0() + Duration::days(1), 10, 11),
            base(3, t0() + Duration::days(2), 20, 21),
        ];
        let p = plan(&facts, &segs(0..30), &RetentionPolicy::default());
        let kept: Vec<_> = p
            .snapshots
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.id.0[0])
            .collect();
        assert_eq!(kept, vec![3]);
        assert_eq!(p.kept_segments, 10);
        assert_eq!(p.delete_segments.len(), 20);
        assert_eq!(p.delete_segments[0].1, "seg0");
    }

    #[test]
    fn the_chain_is_chosen_by_log_position_not_by_a_clock_that_jumped() {
        // The newest base backup (by position) was stamped by a clock set back a year.
        let facts = vec![
            base(1, t0(), 0, 1),
            base(2, t0() - Duration::days(365), 10, 11),
        ];
        let p = plan(&facts, &segs(0..20), &RetentionPolicy::default());
        let chain = &p.chains[0];
        assert_eq!(chain.base.0[0], 2);
        assert!(p.snapshots.iter().any(|d| d.id.0[0] == 2 && d.keep));
        // The newest by time is kept too (the keep rules' own guarantee), with its two segments.
        assert!(p.snapshots.iter().all(|d| d.keep));
        assert_eq!(p.kept_segments, 10 + 2);
    }

    #[test]
    fn a_damaged_newest_backup_does_not_become_the_chain() {
        let mut damaged = base(2, t0() + Duration::days(1), 10, 11);
        damaged.restorable = false;
        let facts = vec![base(1, t0(), 0, 1), damaged];
        let p = plan(&facts, &segs(0..20), &RetentionPolicy::default());
        assert_eq!(p.chains[0].base.0[0], 1);
        assert!(p.snapshots.iter().all(|d| d.keep));
        assert!(p.delete_segments.is_empty());
    }

    #[test]
    fn the_pitr_window_keeps_the_base_backup_before_it_and_every_later_one() {
        let facts: Vec<_> = (0..10)
            .map(|d| {
                base(
                    d as u8,
                    t0() + Duration::days(d),
                    d as u64 * 10,
                    d as u64 * 10 + 1,
                )
            })
            .collect();
        let policy = RetentionPolicy {
            pitr_window: Some(Duration::days(3)),
            ..Default::default()
        };
        let p = plan(&facts, &segs(0..100), &policy);
        let kept: Vec<_> = p
            .snapshots
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.id.0[0])
            .collect();
        // Newest ends at day 9 + 5 min; the window starts at day 6 + 5 min: day 6 is its base.
        assert_eq!(kept, vec![9, 8, 7, 6]);
        assert_eq!(p.kept_segments, 40);
        assert_eq!(p.windows[0].covered_from, p.windows[0].wanted_from);
    }

    #[test]
    fn kept_backups_outside_the_window_keep_only_their_own_segments() {
        let facts: Vec<_> = (0..10)
            .map(|d| {
                base(
                    d as u8,
                    t0() + Duration::days(d),
                    d as u64 * 10,
                    d as u64 * 10 + 2,
                )
            })
            .collect();
        let policy = RetentionPolicy {
            keep: KeepPolicy {
                last: 1,
                monthly: 2,
                ..Default::default()
            },
            pitr_window: None,
        };
        // monthly 2 keeps the newest of January and of February.
        let mut facts = facts;
        facts.push(base(20, t0() + Duration::days(40), 400, 401));
        let p = plan(&facts, &segs(0..410), &policy);
        let kept: BTreeSet<u8> = p
            .snapshots
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.id.0[0])
            .collect();
        assert_eq!(kept, BTreeSet::from([20, 9]));
        // 90..=92 for the January backup, 400..410 for the chain.
        assert_eq!(p.kept_segments, 3 + 10);
    }

    #[test]
    fn logical_dumps_do_not_push_out_the_physical_chain() {
        let mut dump = base(9, t0() + Duration::days(5), 0, 0);
        dump.snapshot.kind = SnapshotKind::Logical;
        dump.needs = None;
        let facts = vec![base(1, t0(), 0, 1), dump];
        let policy = RetentionPolicy {
            keep: KeepPolicy {
                last: 1,
                ..Default::default()
            },
            pitr_window: None,
        };
        let p = plan(&facts, &segs(0..5), &policy);
        assert!(p.snapshots.iter().all(|d| d.keep));
        assert_eq!(p.kept_segments, 5);
    }

    #[test]
    fn streams_no_snapshot_refers_to_and_history_files_are_kept() {
        let facts = vec![base(1, t0(), 10, 11)];
        let mut segments = segs(0..12);
        segments.push(SegmentFacts {
            stream: "pg/7/wal".into(),
            name: "00000002.history".into(),
            key: None,
        });
        segments.push(SegmentFacts {
            stream: "pg/8/wal".into(),
            name: "other".into(),
            key: Some(key(0)),
        });
        let p = plan(&facts, &segments, &RetentionPolicy::default());
        assert_eq!(p.delete_segments.len(), 10);
        assert!(p.delete_segments.iter().all(|(s, _)| s == "pg/7/wal"));
    }
}
