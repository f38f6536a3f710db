//! Five-field cron expressions (minute hour day-of-month month day-of-week), in UTC.
//!
//! Supports `*`, numbers, ranges `a-b`, lists `a,b`, and steps `*/n`, `a-b/n`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cron expression '{expr}': {reason} (expected five fields: minute hour day-of-month month day-of-week, e.g. '*/15 * * * *')")]
pub struct CronError {
    pub expr: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronSchedule {
    expr: String,
    minutes: u64,
    hours: u64,
    dom: u64,
    months: u64,
    dow: u64,
    dom_any: bool,
    dow_any: bool,
}

impl fmt::Display for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.expr)
    }
}

fn field(spec: &str, min: u32, max: u32, name: &str) -> Result<u64, String> {
    let mut bits = 0u64;
    for part in spec.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u32>()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("{name}: bad step '{s}'"))?,
            ),
            None => (part, 1),
        };
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            let a: u32 = a.parse().map_err(|_| format!("{name}: bad number '{a}'"))?;
            let b: u32 = b.parse().map_err(|_| format!("{name}: bad number '{b}'"))?;
            (a, b)
        } else {
            let a: u32 = range
                .parse()
                .map_err(|_| format!("{name}: bad number '{range}'"))?;
            (a, if step > 1 { max } else { a })
        };
        if lo < min || hi > max || lo > hi {
            return Err(format!("{name}: {lo}-{hi} is outside {min}-{max}"));
        }
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

impl CronSchedule {
    pub fn parse(expr: &str) -> Result<CronSchedule, CronError> {
        let err = |reason: String| CronError {
            expr: expr.to_string(),
            reason,
        };
        let f: Vec<&str> = expr.split_whitespace().collect();
        if f.len() != 5 {
            return Err(err(format!("found {} fields", f.len())));
        }
        let mut dow = field(f[4], 0, 7, "day-of-week").map_err(err)?;
        if dow & (1 << 7) != 0 {
            dow |= 1; // 7 is Sunday too
        }
        Ok(CronSchedule {
            expr: expr.to_string(),
            minutes: field(f[0], 0, 59, "minute").map_err(err)?,
            hours: field(f[1], 0, 23, "hour").map_err(err)?,
            dom: field(f[2], 1, 31, "day-of-month").map_err(err)?,
            months: field(f[3], 1, 12, "month").map_err(err)?,
            dow,
            dom_any: f[2] == "*",
            dow_any: f[4] == "*",
        })
    }

    /// The first matching minute strictly after `after_ms` (Unix milliseconds, UTC).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        let mut minute = after_ms.div_euclid(60_000) + 1;
        // Search at most ~4 years of minutes, day by day where a day cannot match.
        let limit = minute + 4 * 366 * 24 * 60;
        while minute < limit {
            let days = minute.div_euclid(1440);
            let (_, month, day) = civil_from_days(days);
            let weekday = (days + 4).rem_euclid(7) as u32; // 1970-01-01 was a Thursday
            let dom_ok = self.dom & (1 << day) != 0;
            let dow_ok = self.dow & (1 << weekday) != 0;
            let day_ok = match (self.dom_any, self.dow_any) {
                (true, true) => true,
                (false, true) => dom_ok,
                (true, false) => dow_ok,
                (false, false) => dom_ok || dow_ok,
            };
            if self.months & (1 << month) == 0 || !day_ok {
                minute = (days + 1) * 1440;
                continue;
            }
            let m = minute.rem_euclid(1440);
            let (h, mi) = ((m / 60) as u32, (m % 60) as u32);
            if self.hours & (1 << h) != 0 && self.minutes & (1 << mi) != 0 {
                return Some(minute * 60_000);
            }
            minute += 1;
        }
        None
    }
}

/// Days since 1970-01-01 → (year, month 1-12, day 1-31). Howard Hinnant's algorithm.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fifteen_minutes() {
        let c = CronSchedule::parse("*/15 * * * *").unwrap();
        // 2026-01-01T00:07:00Z
        let t = 1_767_225_600_000 + 7 * 60_000;
        assert_eq!(c.next_after(t), Some(1_767_225_600_000 + 15 * 60_000));
    }

    #[test]
    fn daily_at_two() {
        let c = CronSchedule::parse("0 2 * * *").unwrap();
        let t = 1_767_225_600_000 + 3 * 3_600_000; // 03:00
        assert_eq!(c.next_after(t), Some(1_767_225_600_000 + 26 * 3_600_000));
    }

    #[test]
    fn weekday_only() {
        // 2026-01-01 is a Thursday; next Monday is 2026-01-05.
        let c = CronSchedule::parse("30 1 * * 1").unwrap();
        let t = 1_767_225_600_000;
        assert_eq!(
            c.next_after(t),
            Some(1_767_225_600_000 + 4 * 86_400_000 + 90 * 60_000)
        );
    }

    #[test]
    fn bad_expressions_are_explained() {
        let e = CronSchedule::parse("61 * * * *").unwrap_err();
        assert!(e.to_string().contains("minute"), "{e}");
        assert!(CronSchedule::parse("* * *").is_err());
        assert!(CronSchedule::parse("*/0 * * * *").is_err());
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }
}
