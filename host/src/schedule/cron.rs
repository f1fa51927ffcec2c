//! When a cron expression ticks in a time zone, with Vixie cron's rules
//! across DST changes.
//!
//! croner parses the expression and searches a wall clock; this module
//! decides what a wall-clock time means on a day the clock jumps, as Vixie
//! cron (and so most users' expectations) does:
//! - a *fixed-time* job (its second, minute and hour fields do not start
//!   with `*`, e.g. `30 2 * * *` or `0 2,14 * * *`) runs once a day at each
//!   of its times: a time in the spring-forward gap runs at the first
//!   instant after the gap, and a time in the fall-back overlap runs at its
//!   first occurrence only;
//! - any other job (`*/15 * * * *`, `0 * * * *`) ticks by the wall clock:
//!   times in the gap do not happen, and the repeated hour ticks again.
//!
//! croner alone maps an ambiguous time to its first instant, so from inside
//! the repeated hour it would skip the repeat (or return a time in the
//! past), and it calls a job fixed-time only when each of those fields is a
//! single value. So every search also runs on the wall clock of each UTC
//! offset the zone uses around the start, keeping a tick only where the
//! zone really has that offset.

use std::str::FromStr;

use chrono::offset::LocalResult;
use chrono::{DateTime, Duration, FixedOffset, NaiveDateTime, Offset, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};

/// The most searches one `next_after` makes before giving up (each skips
/// at least one candidate that is not a tick: the repeats of a fixed-time
/// job in a fall-back hour, at most one per second of it).
const MAX_SEARCHES: usize = 4000;

/// A parsed cron expression in its zone.
#[derive(Debug, Clone)]
pub struct CronClock {
    cron: croner::Cron,
    zone: Tz,
    fixed_time: bool,
}

impl CronClock {
    /// Parse `expr` (5 fields, or 6 with seconds first, or 7 with a year;
    /// `@daily` and the other aliases) in zone `tz`, or say why not.
    pub fn parse(expr: &str, tz: &str) -> Result<CronClock, String> {
        let zone = Tz::from_str(tz).map_err(|_| {
            format!("time zone {tz:?} is not an IANA zone name (e.g. UTC, Europe/Paris)")
        })?;
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expr)
            .map_err(|e| format!("cron expression {expr:?} is not valid: {e}"))?;
        Ok(CronClock {
            cron,
            zone,
            fixed_time: vixie_fixed_time(expr),
        })
    }

    /// The first tick strictly after `t_ms`.
    pub fn next_after(&self, t_ms: u64) -> Option<u64> {
        // Cron ticks are whole seconds; croner keeps the start's fraction.
        let mut from = instant(t_ms - t_ms % 1000)?;
        for _ in 0..MAX_SEARCHES {
            let mut best: Option<u64> = None;
            let mut skipped: Option<DateTime<Utc>> = None;
            for candidate in self.candidates(&from) {
                let ms = to_ms(&candidate)?;
                if ms > t_ms && self.allowed(&candidate) {
                    best = Some(best.map_or(ms, |b| b.min(ms)));
                } else if candidate > from {
                    skipped = Some(skipped.map_or(candidate, |s| s.min(candidate)));
                }
            }
            if best.is_some() {
                return best;
            }
            // Only repeats of a fixed time, or a first occurrence already
            // past: search on from the earliest of them.
            from = skipped?;
        }
        None
    }

    /// The last tick at or before `t_ms`, by croner's backward search
    /// (used only to count back over a long outage, where a DST fold's
    /// exact ticks do not matter).
    pub fn latest_at_or_before(&self, t_ms: u64) -> Option<u64> {
        let at = instant(t_ms - t_ms % 1000)?.with_timezone(&self.zone);
        let prev = self.cron.find_previous_occurrence(&at, true).ok()?;
        to_ms(&prev).filter(|&p| p <= t_ms)
    }

    /// Ticks after `from` as each wall clock in play sees them: the zone's
    /// (croner's mapping) and each UTC offset the zone has around `from`.
    fn candidates(&self, from: &DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let mut found = Vec::with_capacity(3);
        if let Ok(t) = self
            .cron
            .find_next_occurrence(&from.with_timezone(&self.zone), false)
        {
            found.push(t.with_timezone(&Utc));
        }
        let mut offsets = vec![offset_at(&self.zone, from)];
        let later = offset_at(&self.zone, &(*from + Duration::hours(26)));
        if later != offsets[0] {
            offsets.push(later);
        }
        for offset in offsets {
            let Ok(t) = self
                .cron
                .find_next_occurrence(&from.with_timezone(&offset), false)
            else {
                continue;
            };
            let utc = t.with_timezone(&Utc);
            if offset_at(&self.zone, &utc) == offset {
                found.push(utc);
            } else if self.fixed_time {
                // A fixed time the zone skips runs right after the gap.
                if let Some(end) = self.gap_end(&t.naive_local()) {
                    found.push(end);
                }
            }
        }
        found
    }

    /// Whether `t` may be a tick: a fixed-time job does not run again in
    /// the repeat of a fall-back hour.
    fn allowed(&self, t: &DateTime<Utc>) -> bool {
        if !self.fixed_time {
            return true;
        }
        let wall = t.with_timezone(&self.zone).naive_local();
        match self.zone.from_local_datetime(&wall) {
            LocalResult::Ambiguous(first, _) => first.with_timezone(&Utc) == *t,
            _ => true,
        }
    }

    /// The first instant after the DST gap that `wall` falls in (`None` if
    /// `wall` is not in a gap).
    fn gap_end(&self, wall: &NaiveDateTime) -> Option<DateTime<Utc>> {
        if !matches!(self.zone.from_local_datetime(wall), LocalResult::None) {
            return None;
        }
        let mut minute = wall.with_second(0)?.with_nanosecond(0)?;
        // Gaps are at most a couple of hours, and end on a minute.
        for _ in 0..(3 * 60) {
            minute += Duration::minutes(1);
            if let Some(t) = self.zone.from_local_datetime(&minute).earliest() {
                return Some(t.with_timezone(&Utc));
            }
        }
        None
    }
}

/// Vixie cron's fixed-time test: none of the second, minute and hour
/// fields starts with `*` (aliases: `@hourly` is not fixed, the others
/// are).
fn vixie_fixed_time(expr: &str) -> bool {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    match fields.as_slice() {
        [alias] if alias.starts_with('@') => !alias.eq_ignore_ascii_case("@hourly"),
        [sec, min, hour, _, _, _, ..] => ![sec, min, hour].iter().any(|f| f.starts_with('*')),
        [min, hour, ..] => ![min, hour].iter().any(|f| f.starts_with('*')),
        _ => false,
    }
}

/// The UTC offset `zone` has at `t`.
fn offset_at(zone: &Tz, t: &DateTime<Utc>) -> FixedOffset {
    zone.offset_from_utc_datetime(&t.naive_utc()).fix()
}

/// `t_ms` as a UTC date-time.
pub(super) fn instant(t_ms: u64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(i64::try_from(t_ms).ok()?).single()
}

/// A date-time as unix milliseconds (none before 1970).
fn to_ms<Z: TimeZone>(t: &DateTime<Z>) -> Option<u64> {
    u64::try_from(t.timestamp_millis()).ok()
}
