//! Durations as people write them in flags and config files: `90s`, `15m`, `12h`, `7d`, `2w`,
//! `1y` (365 days), and sums of them such as `1h30m`.

use chrono::Duration;

/// Parse a duration. A bare number is refused: the unit is what makes `7` mean something.
///
/// # Errors
/// A message that quotes the text and names the units.
pub fn parse(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration like 90s, 15m, 12h, 7d or 1h30m");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::zero();
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: i64 = rest[..digits].parse().map_err(|_| bad())?;
        let unit_len = rest[digits..]
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len() - digits);
        let unit = &rest[digits..digits + unit_len];
        let one = match unit {
            "s" => Duration::seconds(1),
            "m" => Duration::minutes(1),
            "h" => Duration::hours(1),
            "d" => Duration::days(1),
            "w" => Duration::weeks(1),
            "y" => Duration::days(365),
            _ => {
                return Err(format!(
                    "{s:?}: unknown unit {unit:?}; use s, m, h, d, w or y"
                ))
            }
        };
        total = n
            .checked_mul(one.num_seconds())
            .and_then(|secs| total.checked_add(&Duration::seconds(secs)))
            .ok_or_else(bad)?;
        rest = &rest[digits + unit_len..];
    }
    Ok(total)
}

/// Write a duration the way `parse` reads it, largest units first (`1d2h`, `90s` → `1m30s`).
pub fn format(d: Duration) -> String {
    let mut secs = d.num_seconds();
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    if secs < 0 {
        out.push('-');
        secs = -secs;
    }
    for (unit, len) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= len {
            out.push_str(&format!("{}{unit}", secs / len));
            secs %= len;
        }
    }
    out
}

/// Serde for `Option<Duration>`: written and read as text (`7d`); a bare number is refused
/// with a message, since `5` could mean seconds or minutes.
pub mod opt_serde {
    use chrono::Duration;
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Seconds(i64),
        Text(String),
    }

    /// Write as text.
    ///
    /// # Errors
    /// The serializer's.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&super::format(*d)),
            None => s.serialize_none(),
        }
    }

    /// Read text.
    ///
    /// # Errors
    /// A duration that does not parse.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(match Option::<Either>::deserialize(d)? {
            None => None,
            Some(Either::Seconds(n)) => {
                return Err(serde::de::Error::custom(format!(
                    "{n} has no unit; write {n}s, {n}m, {n}h or {n}d"
                )))
            }
            Some(Either::Text(t)) => Some(super::parse(&t).map_err(serde::de::Error::custom)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_sums() {
        assert_eq!(parse("90s").unwrap(), Duration::seconds(90));
        assert_eq!(parse("7d").unwrap(), Duration::days(7));
        assert_eq!(parse("1h30m").unwrap(), Duration::minutes(90));
        assert_eq!(parse("1y").unwrap(), Duration::days(365));
        for bad in ["", "7", "d", "7x", "1h30", "-1h", "99999999999999999999s"] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn formatting_round_trips() {
        for s in ["0s", "1m30s", "7d", "1d2h", "45s"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }
}
