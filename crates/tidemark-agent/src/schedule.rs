//! When runs are due: the pure part of the scheduler, given times rather than reading a clock,
//! so that catch-up, skipping and jitter are tested with any times at all.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};

use crate::config::{BackupKind, CatchUp, ScheduleConfig};
use crate::cron::Schedule;

/// One schedule of a database, parsed.
#[derive(Debug, Clone)]
pub struct Planned {
    /// `kind@cron`: the key under which its last firing is recorded.
    pub key: String,
    /// What it takes.
    pub kind: BackupKind,
    /// When.
    pub schedule: Schedule,
    /// Random delay bound.
    pub jitter: Duration,
    /// When it fires next (before jitter).
    pub next: Option<DateTime<Utc>>,
}

impl Planned {
    /// Parse a validated schedule.
    pub fn new(s: &ScheduleConfig) -> Planned {
        Planned {
            key: format!("{}@{}", s.kind.as_str(), s.cron.trim()),
            kind: s.kind,
            schedule: Schedule::parse(&s.cron).expect("validated on load"),
            jitter: s.jitter.unwrap_or_else(Duration::zero),
            next: None,
        }
    }
}

/// At start: set each schedule's next time after `now`, and return the schedules that missed
/// a run (per `catch_up`). `done` holds, per schedule, the latest scheduled time accounted for
/// by a run that finished (itself, or skipped while it ran); `fired` the latest time it fired.
/// A schedule missed a run when a time after its `done` has passed, or when it fired but no run
/// of it ever finished (the agent was killed in the first). A schedule that never fired
/// starts from now.
pub fn start(
    planned: &mut [Planned],
    fired: &BTreeMap<String, DateTime<Utc>>,
    done: &BTreeMap<String, DateTime<Utc>>,
    now: DateTime<Utc>,
    catch_up: CatchUp,
) -> Vec<usize> {
    let mut missed = Vec::new();
    for (i, p) in planned.iter_mut().enumerate() {
        let due = match done.get(&p.key) {
            Some(last) => p.schedule.next_after(*last).is_some_and(|d| d <= now),
            None => fired.contains_key(&p.key),
        };
        if catch_up == CatchUp::Once && due {
            missed.push(i);
        }
        p.next = p.schedule.next_after(now);
    }
    missed
}

/// The schedule that fires first, and when.
pub fn earliest(planned: &[Planned]) -> Option<(usize, DateTime<Utc>)> {
    planned
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.next.map(|n| (i, n)))
        .min_by_key(|(_, n)| *n)
}

/// After schedule `i` fired for `at`: its next time, after `now` (firings missed while the
/// agent was busy are not made up; they were skipped). Returns how many were passed over.
pub fn advance(p: &mut Planned, at: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    let mut next = p.schedule.next_after(at);
    let mut passed = 0;
    while let Some(n) = next {
        if n > now {
            break;
        }
        passed += 1;
        next = p.schedule.next_after(n);
    }
    p.next = next;
    passed
}

/// A random delay in `[0, jitter]`.
pub fn jitter(j: Duration) -> Duration {
    if j <= Duration::zero() {
        return Duration::zero();
    }
    let ms = j.num_milliseconds().max(1);
    Duration::milliseconds((rand::random::<u64>() % (ms as u64 + 1)) as i64)
}

/// The wait before attempt `attempt` (2, 3, …): `backoff` doubled for each retry, at most 1 h.
pub fn backoff(first: Duration, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(2).min(16);
    (first * (1 << doublings)).min(Duration::hours(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn daily() -> Planned {
        Planned::new(&ScheduleConfig {
            kind: BackupKind::Physical,
            cron: "0 2 * * *".into(),
            jitter: None,
        })
    }

    #[test]
    fn a_run_missed_while_the_agent_was_down_is_caught_up_once() {
        let mut p = vec![daily()];
        let done = BTreeMap::from([(p[0].key.clone(), at("2026-12-01T02:00:00Z"))]);
        // Down from before the 2nd until the 4th at noon: two runs missed, one is made up.
        let missed = start(
            &mut p,
            &done,
            &done,
            at("2026-12-04T12:00:00Z"),
            CatchUp::Once,
        );
        assert_eq!(missed, vec![0]);
        assert_eq!(p[0].next, Some(at("2026-12-05T02:00:00Z")));
        let missed = start(
            &mut p,
            &done,
            &done,
            at("2026-12-04T12:00:00Z"),
            CatchUp::Skip,
        );
        assert!(missed.is_empty());
    }

    #[test]
    fn nothing_is_missed_when_the_agent_was_back_in_time_or_never_ran() {
        let mut p = vec![daily()];
        let done = BTreeMap::from([(p[0].key.clone(), at("2026-12-04T02:00:00Z"))]);
        let none = BTreeMap::new();
        let now = at("2026-12-04T12:00:00Z");
        assert!(start(&mut p, &done, &done, now, CatchUp::Once).is_empty());
        assert!(start(&mut p, &none, &none, now, CatchUp::Once).is_empty());
    }

    #[test]
    fn a_run_killed_before_it_finished_is_caught_up_even_if_later_times_were_skipped() {
        let mut p = vec![daily()];
        // Fired on the 3rd and the 4th (the 4th skipped, the 3rd's run still going), then killed.
        let fired = BTreeMap::from([(p[0].key.clone(), at("2026-12-04T02:00:00Z"))]);
        let done = BTreeMap::from([(p[0].key.clone(), at("2026-12-02T02:00:00Z"))]);
        let now = at("2026-12-04T03:00:00Z");
        assert_eq!(start(&mut p, &fired, &done, now, CatchUp::Once), vec![0]);
        // The first run ever was killed: nothing finished yet.
        assert_eq!(
            start(&mut p, &fired, &BTreeMap::new(), now, CatchUp::Once),
            vec![0]
        );
    }

    #[test]
    fn firings_passed_over_while_busy_are_counted_not_replayed() {
        let mut p = Planned::new(&ScheduleConfig {
            kind: BackupKind::Logical,
            cron: "@every 10s".into(),
            jitter: None,
        });
        let passed = advance(
            &mut p,
            at("2026-12-04T00:00:00Z"),
            at("2026-12-04T00:00:35Z"),
        );
        assert_eq!(passed, 3);
        assert_eq!(p.next, Some(at("2026-12-04T00:00:40Z")));
    }

    #[test]
    fn backoff_doubles_up_to_an_hour_and_jitter_stays_in_bounds() {
        let b = Duration::seconds(30);
        assert_eq!(backoff(b, 2), Duration::seconds(30));
        assert_eq!(backoff(b, 4), Duration::seconds(120));
        assert_eq!(backoff(b, 30), Duration::hours(1));
        for _ in 0..100 {
            let j = jitter(Duration::seconds(5));
            assert!(j >= Duration::zero() && j <= Duration::seconds(5));
        }
        assert_eq!(jitter(Duration::zero()), Duration::zero());
    }
}
