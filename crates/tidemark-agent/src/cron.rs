//! Cron schedules: the five fields of crontab(5) (minute hour day-of-month month day-of-week),
//! an optional leading seconds field (six fields), the `@hourly`-style shorthands, and
//! `@every <duration>` for intervals. Times are UTC, as in a Kubernetes CronJob's default.

use chrono::{DateTime, Datelike, Duration, Timelike, Utc};

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// Fields as sets of allowed values.
    Fields(Box<Fields>),
    /// Every so many seconds, counted from the Unix epoch (so that restarts keep the phase).
    Every(i64),
}

/// The allowed values of each field, as bit sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    seconds: u64,
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    /// Day-of-month and day-of-week were both restricted: crontab(5) then matches either.
    either_day: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn field(text: &str, name: &str, lo: u32, hi: u32, names: &[&str]) -> Result<(u64, bool), String> {
    let value = |s: &str| -> Result<u32, String> {
        if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
            return Ok(i as u32 + lo);
        }
        let v: u32 = s
            .parse()
            .map_err(|_| format!("{name} field {text:?}: {s:?} is not a number"))?;
        // Day-of-week 7 is Sunday too.
        let v = if name == "day-of-week" && v == 7 {
            0
        } else {
            v
        };
        if v < lo || v > hi {
            return Err(format!("{name} field {text:?}: {v} is outside {lo}-{hi}"));
        }
        Ok(v)
    };
    let mut bits = 0u64;
    let mut restricted = true;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s.parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                    format!("{name} field {text:?}: step {s:?} is not a positive number")
                })?;
                (r, step)
            }
            None => (part, 1),
        };
        let (from, to) = if range == "*" {
            if step == 1 && text == "*" {
                restricted = false;
            }
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (value(a)?, value(b)?);
            if a > b {
                return Err(format!(
                    "{name} field {text:?}: range {range:?} runs backwards"
                ));
            }
            (a, b)
        } else {
            let a = value(range)?;
            (a, if part.contains('/') { hi } else { a })
        };
        let mut v = from;
        while v <= to {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok((bits, restricted))
}

impl Schedule {
    /// Parse a schedule.
    ///
    /// # Errors
    /// A message naming the field and what is wrong with it.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        let t = text.trim();
        if let Some(d) = t.strip_prefix("@every ") {
            let d = tidemark_repo::duration::parse(d.trim())?;
            if d < Duration::seconds(1) {
                return Err(format!("{text:?}: the interval must be at least 1s"));
            }
            return Ok(Schedule::Every(d.num_seconds()));
        }
        let expanded = match t {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            s if s.starts_with('@') => {
                return Err(format!(
                    "{text:?}: unknown shorthand; use @hourly, @daily, @weekly, @monthly, @yearly or @every <duration>"
                ))
            }
            s => s,
        };
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        let (sec, rest) = match parts.len() {
            5 => ("0", &parts[..]),
            6 => (parts[0], &parts[1..]),
            n => {
                return Err(format!(
                    "{text:?} has {n} fields; a schedule has 5 (minute hour day-of-month month day-of-week) or 6 (seconds first)"
                ))
            }
        };
        let (seconds, _) = field(sec, "seconds", 0, 59, &[])?;
        let (minutes, _) = field(rest[0], "minute", 0, 59, &[])?;
        let (hours, _) = field(rest[1], "hour", 0, 23, &[])?;
        let (days, dr) = field(rest[2], "day-of-month", 1, 31, &[])?;
        let (months, _) = field(rest[3], "month", 1, 12, &MONTHS)?;
        let (weekdays, wr) = field(rest[4], "day-of-week", 0, 7, &DAYS)?;
        // 7 was folded into 0 by `field`; bit 7 stays unused.
        Ok(Schedule::Fields(Box::new(Fields {
            seconds,
            minutes,
            hours,
            days,
            months,
            weekdays,
            either_day: dr && wr,
        })))
    }

    /// The first time strictly after `t` that the schedule fires, or `None` if it never does
    /// (such as `0 0 31 2 *`) within the next eight years.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Every(n) => {
                let s = t.timestamp();
                DateTime::from_timestamp((s.div_euclid(*n) + 1) * n, 0)
            }
            Schedule::Fields(f) => f.next_after(t),
        }
    }
}

impl Fields {
    fn day_matches(&self, t: &DateTime<Utc>) -> bool {
        let dom = self.days & (1 << t.day()) != 0;
        let dow = self.weekdays & (1 << t.weekday().num_days_from_sunday()) != 0;
        if self.either_day {
            dom || dow
        } else {
            dom && dow
        }
    }

    fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut c = t.with_nanosecond(0)? + Duration::seconds(1);
        let limit = t + Duration::days(366 * 8);
        while c <= limit {
            if self.months & (1 << c.month()) == 0 {
                // First second of the next month.
                let (y, m) = if c.month() == 12 {
                    (c.year() + 1, 1)
                } else {
                    (c.year(), c.month() + 1)
                };
                c = DateTime::from_naive_utc_and_offset(
                    chrono::NaiveDate::from_ymd_opt(y, m, 1)?.and_hms_opt(0, 0, 0)?,
                    Utc,
                );
                continue;
            }
            if !self.day_matches(&c) {
                c = DateTime::from_naive_utc_and_offset(
                    c.date_naive().succ_opt()?.and_hms_opt(0, 0, 0)?,
                    Utc,
                );
                continue;
            }
            if self.hours & (1 << c.hour()) == 0 {
                c = c.with_minute(0)?.with_second(0)? + Duration::hours(1);
                continue;
            }
            if self.minutes & (1 << c.minute()) == 0 {
                c = c.with_second(0)? + Duration::minutes(1);
                continue;
            }
            if self.seconds & (1 << c.second()) == 0 {
                c += Duration::seconds(1);
                continue;
            }
            return Some(c);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next(expr: &str, from: &str) -> String {
        Schedule::parse(expr)
            .unwrap()
            .next_after(at(from))
            .unwrap()
            .to_rfc3339()
    }

    #[test]
    fn common_schedules_fire_when_crontab_says() {
        assert_eq!(
            next("0 2 * * *", "2026-12-03T01:59:59Z"),
            "2026-12-03T02:00:00+00:00"
        );
        assert_eq!(
            next("0 2 * * *", "2026-12-03T02:00:00Z"),
            "2026-12-04T02:00:00+00:00"
        );
        assert_eq!(
            next("*/15 * * * *", "2026-12-03T10:07:00Z"),
            "2026-12-03T10:15:00+00:00"
        );
        assert_eq!(
            next("30 4 1 * *", "2026-12-03T00:00:00Z"),
            "2027-01-01T04:30:00+00:00"
        );
        assert_eq!(
            next("0 0 * * sun", "2026-12-03T00:00:00Z"),
            "2026-12-06T00:00:00+00:00"
        );
        assert_eq!(
            next("0 0 * * 7", "2026-12-03T00:00:00Z"),
            "2026-12-06T00:00:00+00:00"
        );
        assert_eq!(
            next("0 0 29 feb *", "2026-12-03T00:00:00Z"),
            "2028-02-29T00:00:00+00:00"
        );
        assert_eq!(
            next("@hourly", "2026-12-03T10:07:00Z"),
            "2026-12-03T11:00:00+00:00"
        );
        assert_eq!(
            next("*/5 * * * * *", "2026-12-03T10:07:02Z"),
            "2026-12-03T10:07:05+00:00"
        );
        assert_eq!(
            next("@every 10s", "2026-12-03T10:07:02Z"),
            "2026-12-03T10:07:10+00:00"
        );
        assert_eq!(
            next("0 9-17/4 * * mon-fri", "2026-12-04T18:00:00Z"),
            "2026-12-07T09:00:00+00:00"
        );
    }

    #[test]
    fn day_of_month_and_day_of_week_together_match_either() {
        // The 13th or any Friday (crontab(5)).
        assert_eq!(
            next("0 0 13 * fri", "2026-12-03T00:00:00Z"),
            "2026-12-04T00:00:00+00:00"
        );
        assert_eq!(
            next("0 0 13 * fri", "2026-12-11T00:00:00Z"),
            "2026-12-13T00:00:00+00:00"
        );
    }

    #[test]
    fn bad_schedules_name_the_field() {
        for (expr, says) in [
            ("0 25 * * *", "hour field \"25\": 25 is outside 0-23"),
            ("0 2 * *", "has 4 fields"),
            ("*/0 * * * *", "step \"0\""),
            ("0 0 * foo *", "month field"),
            ("0 5-2 * * *", "runs backwards"),
            ("@often", "unknown shorthand"),
            ("@every 0s", "at least 1s"),
        ] {
            let e = Schedule::parse(expr).unwrap_err();
            assert!(e.contains(says), "{expr}: {e}");
        }
    }

    #[test]
    fn an_impossible_date_never_fires() {
        assert_eq!(
            Schedule::parse("0 0 31 2 *")
                .unwrap()
                .next_after(at("2026-01-01T00:00:00Z")),
            None
        );
    }
}
