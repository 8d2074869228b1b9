//! The timeline page (`/` and `/timeline`): each database's recoverable window drawn as SVG on
//! the server, with no script, so that it renders anywhere (and in a headless browser in the
//! tests): base backups and dumps as marks, the archived WAL as a band, failures in red.

use std::fmt::Write as _;

use chrono::{DateTime, Duration, Utc};

use crate::status::{DatabaseStatus, Status};

const WIDTH: f64 = 1000.0;
const LEFT: f64 = 150.0;
const ROW: f64 = 70.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fmt(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// The span the page shows: from the oldest snapshot of any database to now.
fn span(s: &Status, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let first = s
        .databases
        .values()
        .flat_map(|d| d.snapshots.iter().map(|p| p.time))
        .min()
        .unwrap_or(now - Duration::hours(1));
    let first = first.min(now - Duration::minutes(1));
    (first, now)
}

fn x(t: DateTime<Utc>, (from, to): (DateTime<Utc>, DateTime<Utc>)) -> f64 {
    let total = (to - from).num_milliseconds().max(1) as f64;
    let at = (t - from).num_milliseconds() as f64;
    LEFT + (WIDTH - LEFT - 20.0) * (at / total).clamp(0.0, 1.0)
}

/// Where the WAL covers, for a database that archives it: from its oldest base backup to the
/// last measured archive position's time (approximated by when it was measured).
fn wal_band(d: &DatabaseStatus) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let w = d.wal.as_ref()?;
    let from = d
        .snapshots
        .iter()
        .filter(|s| s.kind == "physical")
        .map(|s| s.time)
        .min()?;
    let to = w.measured?;
    (to > from).then_some((from, to))
}

fn row(
    out: &mut String,
    name: &str,
    d: &DatabaseStatus,
    y: f64,
    span: (DateTime<Utc>, DateTime<Utc>),
) {
    let _ = write!(
        out,
        r##"<g class="database" data-database="{n}"><text x="10" y="{ty}" class="name">{n}</text><text x="10" y="{sy}" class="sub">{e}</text><line x1="{l}" y1="{y}" x2="{r}" y2="{y}" class="axis"/>"##,
        n = esc(name),
        e = esc(&d.engine),
        ty = y - 4.0,
        sy = y + 12.0,
        l = LEFT,
        r = WIDTH - 20.0,
    );
    if let Some((from, to)) = wal_band(d) {
        let (x1, x2) = (x(from, span), x(to, span));
        let _ = write!(
            out,
            r##"<rect class="wal" data-wal-from="{}" data-wal-to="{}" x="{x1:.1}" y="{:.1}" width="{:.1}" height="8"><title>WAL archived from {} to {}</title></rect>"##,
            from.to_rfc3339(),
            to.to_rfc3339(),
            y - 4.0,
            (x2 - x1).max(1.0),
            fmt(from),
            fmt(to)
        );
    }
    for g in d.wal.iter().flat_map(|w| &w.gaps) {
        let (x1, x2) = (x(g.after, span), x(g.before, span));
        let _ = write!(
            out,
            r##"<rect class="gap" data-gap="{first}" x="{x1:.1}" y="{:.1}" width="{:.1}" height="12"><title>WAL missing from the archive: {first} to {last} (between {} and {}); recovery stops there</title></rect>"##,
            y - 6.0,
            (x2 - x1).max(3.0),
            fmt(g.after),
            fmt(g.before),
            first = esc(&g.first_missing),
            last = esc(&g.last_missing),
        );
    }
    for v in &d.verified {
        let vx = x(v.point, span);
        let (class, what) = if v.ok {
            ("verified ok", "verified: the data came back whole")
        } else {
            ("verified failed", "verification FAILED")
        };
        let _ = write!(
            out,
            r##"<path class="{class}" data-verified="{}" d="M{vx:.1} {:.1} l5 6 l-5 6 l-5 -6 z"><title>{what} at {} (snapshot {})</title></path>"##,
            v.point.to_rfc3339(),
            y - 22.0,
            fmt(v.point),
            esc(v.snapshot.as_deref().unwrap_or("-")),
        );
    }
    for s in &d.snapshots {
        let cx = x(s.time, span);
        let class = if s.kind == "logical" {
            "logical"
        } else {
            "base"
        };
        let _ = write!(
            out,
            r##"<circle class="snapshot {class}" data-snapshot="{id}" cx="{cx:.1}" cy="{y}" r="6"><title>{kind} snapshot {id} at {t}</title></circle>"##,
            id = esc(&s.id),
            kind = esc(&s.kind),
            t = fmt(s.time),
        );
    }
    for (kind, k) in &d.kinds {
        if let (Some(f), true) = (&k.last_failure, k.failing()) {
            let fx = x(f.started, span);
            let _ = write!(
                out,
                r##"<path class="failure" data-failure="{kind}" d="M{:.1} {:.1} l6 10 l-12 0 z"><title>{kind} backup failed at {}: {}</title></path>"##,
                fx,
                y + 8.0,
                fmt(f.started),
                esc(f.error.as_deref().unwrap_or("")),
                kind = esc(kind),
            );
        }
    }
    out.push_str("</g>");
}

/// Render the page for `s` as of `now`.
pub fn page(s: &Status, now: DateTime<Utc>) -> String {
    let span = span(s, now);
    let height = ROW * s.databases.len().max(1) as f64 + 60.0;
    let mut out = String::new();
    let _ = write!(
        out,
        r##"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>tidemark: recoverable windows</title>
<style>
body{{font-family:sans-serif;margin:20px;color:#222}} h1{{font-size:20px}}
table{{border-collapse:collapse;margin-top:16px}} td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}}
.axis{{stroke:#999;stroke-width:1}} .wal{{fill:#7fb3e6}} .base{{fill:#1f5fa8}} .logical{{fill:#7a4fb0}}
.failure{{fill:#d22}} .gap{{fill:#d22;opacity:.85}} .verified.ok{{fill:#2a8a3a}} .verified.failed{{fill:#d22}} .name{{font-weight:bold;font-size:14px}} .sub{{fill:#666;font-size:11px}} .tick{{fill:#666;font-size:11px}}
.legend span{{display:inline-block;margin-right:16px}} .sw{{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}}
</style></head><body>
<h1>Recoverable windows</h1>
<div class="legend"><span><i class="sw" style="background:#1f5fa8"></i>base backup</span><span><i class="sw" style="background:#7a4fb0"></i>logical dump</span><span><i class="sw" style="background:#7fb3e6"></i>archived WAL</span><span><i class="sw" style="background:#d22"></i>failing backup, WAL gap, failed verification</span><span><i class="sw" style="background:#2a8a3a"></i>verified restore</span></div>
<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}">
<text class="tick" x="{LEFT}" y="20">{}</text><text class="tick" x="{}" y="20" text-anchor="end">{} (now)</text>
"##,
        fmt(span.0),
        WIDTH - 20.0,
        fmt(span.1),
    );
    for (i, (name, d)) in s.databases.iter().enumerate() {
        row(&mut out, name, d, 60.0 + ROW * i as f64, span);
    }
    out.push_str("</svg>\n<table><tr><th>database</th><th>recoverable</th><th>snapshots</th><th>WAL lag</th><th>WAL gaps</th><th>last verification</th></tr>");
    for (name, d) in &s.databases {
        let window = match d.recoverable() {
            Some((a, b)) => format!("{} to {}", fmt(a), fmt(b)),
            None => "nothing yet".into(),
        };
        let lag = d
            .wal
            .as_ref()
            .and_then(|w| w.lag_bytes)
            .map(|b| format!("{b} bytes"))
            .unwrap_or_else(|| "-".into());
        let gaps = d.wal.as_ref().map_or(0, |w| w.gaps.len());
        let verified = match &d.verification {
            Some(v) if v.ok => format!("passed {} ({:.1}s)", fmt(v.started), v.rto_seconds),
            Some(v) => format!("FAILED {}", fmt(v.started)),
            None => "-".into(),
        };
        let _ = write!(
            out,
            r##"<tr data-row="{n}"><td>{n}</td><td class="window">{}</td><td>{}</td><td>{}</td><td class="gaps">{gaps}</td><td class="verification">{}</td></tr>"##,
            esc(&window),
            d.snapshots.len(),
            esc(&lag),
            esc(&verified),
            n = esc(name),
        );
    }
    out.push_str("</table></body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::SnapshotPoint;

    #[test]
    fn names_are_escaped_and_every_snapshot_is_drawn() {
        let now = Utc::now();
        let mut s = Status::default();
        let d = s.databases.entry("a<b".into()).or_default();
        d.engine = "sqlite".into();
        for i in 0..3 {
            d.snapshots.push(SnapshotPoint {
                id: format!("s{i}"),
                kind: "physical".into(),
                time: now - Duration::hours(3 - i),
                time_end: now - Duration::hours(3 - i),
            });
        }
        let html = page(&s, now);
        assert!(html.contains("a&lt;b") && !html.contains("a<b"));
        assert_eq!(html.matches("data-snapshot=").count(), 3);
    }

    #[test]
    fn gaps_and_verified_points_are_drawn_where_they_are() {
        use crate::status::{VerifiedPoint, WalGap, WalStatus};
        let now = Utc::now();
        let mut s = Status::default();
        let d = s.databases.entry("pg".into()).or_default();
        d.snapshots.push(SnapshotPoint {
            id: "b1".into(),
            kind: "physical".into(),
            time: now - Duration::hours(4),
            time_end: now - Duration::hours(4),
        });
        d.wal = Some(WalStatus {
            measured: Some(now),
            gaps: vec![WalGap {
                first_missing: "000000010000000000000007".into(),
                last_missing: "000000010000000000000008".into(),
                after: now - Duration::hours(2),
                before: now - Duration::hours(1),
            }],
            ..Default::default()
        });
        d.verified = vec![
            VerifiedPoint {
                point: now - Duration::hours(3),
                ok: true,
                snapshot: Some("b1".into()),
            },
            VerifiedPoint {
                point: now - Duration::minutes(30),
                ok: false,
                snapshot: Some("b1".into()),
            },
        ];
        let html = page(&s, now);
        assert!(
            html.contains(r#"data-gap="000000010000000000000007""#),
            "{html}"
        );
        assert!(html.contains("recovery stops there"));
        assert_eq!(html.matches(r#"class="verified ok""#).count(), 1);
        assert_eq!(html.matches(r#"class="verified failed""#).count(), 1);
        // The gap sits between its two times: right of the first verified point.
        let at = |needle: &str| -> f64 {
            let i = html.find(needle).unwrap();
            let rest = &html[i..];
            let j = rest
                .find(" x=\"")
                .map(|j| j + 4)
                .or_else(|| rest.find(" d=\"M").map(|j| j + 5))
                .unwrap();
            rest[j..]
                .split(|c: char| c != '.' && !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        assert!(at("data-gap=") > at("class=\"verified ok\""));
        assert!(at("data-gap=") < at("class=\"verified failed\""));
        assert!(html.contains(r#"<td class="gaps">1</td>"#));
    }
}
