//! Retention over six months of simulated time: daily base backups (some fail), hourly log
//! segments, a clock that jumps forward and back, and policies from sensible to misconfigured.
//! After every run of the planner, whatever it deletes is removed from the simulated
//! repository, and the invariants are checked: the newest restorable chain (base backup plus
//! every segment after its start) is whole, and every second of the PITR window has a base
//! backup at or before it with all the log after it.
//!
//! The clock is injected: the simulation owns it, the planner reads none.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, Utc};
use tidemark_repo::id::SnapshotId;
use tidemark_repo::ops::forget::KeepPolicy;
use tidemark_repo::ops::retention::{plan, LogNeeds, RetentionPolicy, SegmentFacts, SnapshotFacts};
use tidemark_repo::snapshot::{DatabaseIdentity, Snapshot, SnapshotKind, Summary};

const STREAM: &str = "pg/42/wal";

fn key(n: u64) -> String {
    format!("{n:016X}")
}

struct Sim {
    /// The injected clock: what the "agent" stamps on backups.
    clock: DateTime<Utc>,
    /// Real time, to know which segment is which.
    real: DateTime<Utc>,
    next_segment: u64,
    snapshots: Vec<SnapshotFacts>,
    segments: BTreeSet<u64>,
    rng: u64,
    made: u8,
    /// The log position of the newest restorable base backup ever made.
    best_made: u64,
}

impl Sim {
    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// One hour passes: one segment is archived.
    fn hour(&mut self) {
        self.clock += Duration::hours(1);
        self.real += Duration::hours(1);
        self.segments.insert(self.next_segment);
        self.next_segment += 1;
    }

    /// A base backup starts now and needs this segment and the next.
    fn backup(&mut self, damaged: bool) {
        self.made = self.made.wrapping_add(1);
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&self.next_segment.to_le_bytes());
        id[8] = self.made;
        let host = format!("pod-{}", self.rand() % 5);
        self.snapshots.push(SnapshotFacts {
            id: SnapshotId(id),
            snapshot: Snapshot {
                version: 1,
                time: self.clock,
                time_end: self.clock + Duration::minutes(20),
                hostname: host,
                username: String::new(),
                engine: "postgres".into(),
                kind: SnapshotKind::Physical,
                database: DatabaseIdentity {
                    name: "main".into(),
                    system_id: Some("42".into()),
                    version: None,
                },
                tags: vec![],
                parent: None,
                streams: vec![],
                positions: Default::default(),
                summary: Summary::default(),
            },
            needs: Some(LogNeeds {
                stream: STREAM.into(),
                from: key(self.next_segment),
                to: key(self.next_segment + 1),
            }),
            restorable: !damaged,
        });
        if !damaged {
            self.best_made = self.best_made.max(self.next_segment);
        }
    }

    fn facts(&self) -> Vec<SegmentFacts> {
        self.segments
            .iter()
            .map(|n| SegmentFacts {
                stream: STREAM.into(),
                name: format!("seg-{n:08}"),
                key: Some(key(*n)),
            })
            .collect()
    }

    fn retain(&mut self, policy: &RetentionPolicy) {
        let p = plan(&self.snapshots, &self.facts(), policy);
        let removed: BTreeSet<SnapshotId> = p.removed().map(|d| d.id).collect();
        self.snapshots.retain(|s| !removed.contains(&s.id));
        for (_, name) in &p.delete_segments {
            let n: u64 = name.trim_start_matches("seg-").parse().unwrap();
            self.segments.remove(&n);
        }
        self.check(policy);
    }

    fn from(s: &SnapshotFacts) -> u64 {
        u64::from_str_radix(&s.needs.as_ref().unwrap().from, 16).unwrap()
    }

    /// Every segment from `start` up to the newest archived one is present.
    fn log_whole_from(&self, start: u64) -> bool {
        (start..self.next_segment).all(|n| self.segments.contains(&n))
    }

    fn check(&self, policy: &RetentionPolicy) {
        assert!(
            !self.snapshots.is_empty(),
            "retention emptied the repository"
        );
        if self.best_made == 0 {
            return; // only damaged backups so far: nothing restorable to protect
        }
        // The newest restorable chain, by log position.
        let newest = self
            .snapshots
            .iter()
            .filter(|s| s.restorable)
            .max_by_key(|s| Sim::from(s))
            .expect("a restorable base backup survives");
        assert_eq!(
            Sim::from(newest),
            self.best_made,
            "the newest restorable base backup was deleted"
        );
        assert!(
            self.log_whole_from(Sim::from(newest)),
            "log after the newest base backup has a hole"
        );
        // Every kept base backup has the segments it needs to be consistent.
        for s in &self.snapshots {
            let f = Sim::from(s);
            // (Segments not archived yet are not expected.)
            assert!(
                (f..=f + 1)
                    .filter(|n| *n < self.next_segment)
                    .all(|n| self.segments.contains(&n)),
                "a kept base backup lost a segment it needs"
            );
        }
        // The PITR window: from (newest snapshot end - window) on, by segment position.
        if let Some(w) = policy.pitr_window {
            let until = self
                .snapshots
                .iter()
                .map(|s| s.snapshot.time_end)
                .max()
                .unwrap();
            let start = until - w;
            // The base that covers the window's start: the newest one stamped at or before
            // it, else the oldest; all log from there on must be present.
            let mut bases: Vec<&SnapshotFacts> =
                self.snapshots.iter().filter(|s| s.restorable).collect();
            bases.sort_by_key(|s| Sim::from(s));
            let cover = bases
                .iter()
                .rev()
                .find(|s| s.snapshot.time <= start)
                .or(bases.first())
                .unwrap();
            assert!(
                self.log_whole_from(Sim::from(cover)),
                "the PITR window has a hole"
            );
        }
    }

    fn new(seed: u64) -> Sim {
        Sim {
            clock: DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            real: DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            next_segment: 1,
            snapshots: Vec::new(),
            segments: BTreeSet::new(),
            rng: seed | 1,
            made: 0,
            best_made: 0,
        }
    }
}

/// Six months: a backup attempt every day at 02:00 on the injected clock, one in eight fails
/// (no snapshot), one in twenty is damaged (not restorable), and retention runs after each.
fn six_months(seed: u64, policy: &RetentionPolicy, clock_jumps: bool) -> Sim {
    let mut sim = Sim::new(seed);
    for day in 0..183 {
        for _ in 0..24 {
            sim.hour();
        }
        if clock_jumps && day % 30 == 17 {
            // An NTP step or a bad RTC: a year forward, or three days back.
            let forward = sim.rand().is_multiple_of(2);
            sim.clock += if forward {
                Duration::days(365)
            } else {
                -Duration::days(3)
            };
        }
        if clock_jumps && day % 30 == 20 {
            sim.clock = sim.real;
        }
        match sim.rand() % 160 {
            0..=19 => continue,          // the backup failed: nothing was written
            20..=27 => sim.backup(true), // the source had damaged pages
            _ => sim.backup(false),
        }
        sim.retain(policy);
    }
    sim
}

fn policy(keep: KeepPolicy, window: Option<Duration>) -> RetentionPolicy {
    RetentionPolicy {
        keep,
        pitr_window: window,
    }
}

#[test]
fn retention_over_months_never_loses_the_newest_restorable_chain_or_the_pitr_window() {
    let policies = [
        policy(
            KeepPolicy {
                daily: 7,
                weekly: 4,
                monthly: 3,
                ..Default::default()
            },
            Some(Duration::days(7)),
        ),
        policy(
            KeepPolicy {
                last: 2,
                ..Default::default()
            },
            Some(Duration::days(3)),
        ),
        // Misconfigured: nothing kept by any rule.
        policy(KeepPolicy::default(), None),
        // Misconfigured: a window shorter than the backup interval.
        policy(KeepPolicy::default(), Some(Duration::minutes(1))),
    ];
    for (i, p) in policies.iter().enumerate() {
        for seed in [1u64, 7, 2026] {
            for jumps in [false, true] {
                let sim = six_months(seed + i as u64, p, jumps);
                assert!(!sim.snapshots.is_empty());
            }
        }
    }
}

#[test]
fn a_seven_day_window_keeps_about_a_week_of_log_not_all_of_it() {
    let p = policy(KeepPolicy::default(), Some(Duration::days(7)));
    let sim = six_months(5, &p, false);
    let hours = sim.segments.len();
    // A week of hourly segments plus up to the gap back to the base backup before the window
    // (failed and damaged backups can stretch it), never the whole six months.
    assert!((7 * 24..30 * 24).contains(&hours), "{hours} segments kept");
}
