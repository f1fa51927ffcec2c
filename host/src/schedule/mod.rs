//! Schedules (periodic jobs): what a schedule is, when it ticks, and which
//! ticks a worker fires when it finds one due.
//!
//! Pure computation on millisecond instants; Redis (where schedules live
//! and where a tick is claimed) is [`crate::broker`]'s, and the loop that
//! fires them is the worker's scheduler. Instants are the Redis server's
//! clock, as every due time in wasmq is, so workers whose clocks disagree
//! cannot fire a tick early.
//!
//! A cron schedule's ticks are computed in its time zone with Vixie cron's
//! rules across DST changes ([`cron`]).

mod cron;

use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};

pub use cron::CronClock;

/// The shortest `--every`: a tick is a job, and schedules are polled at
/// most a few times a second.
pub const MIN_EVERY: Duration = Duration::from_secs(1);

/// The longest `--every` (a year): longer periods are a cron expression's.
pub const MAX_EVERY: Duration = Duration::from_secs(366 * 24 * 3600);

/// How late a tick may be found and still count as on time rather than
/// missed. Workers look at due schedules several times a second, so a tick
/// found later than this fell due while no worker was looking (all
/// stopped, or Redis unreachable): the catch-up policy decides about it.
pub const ON_TIME_GRACE_MS: u64 = 1000;

/// The most missed ticks `--catch-up all` fires (the latest ones): a
/// schedule that was down for a month must not flood its queue.
pub const MAX_CATCH_UP: usize = 100;

/// The most cron ticks walked forward to plan a catch-up; a longer
/// outage is walked back from now instead (and its dropped ticks counted
/// up to this). Bounds the CPU a catch-up costs each worker that plans it.
const FORWARD_WALK: usize = 1_000;

/// The longest schedule name (it is part of every tick's idempotency key).
pub const MAX_SCHEDULE_NAME_BYTES: usize = 200;

/// What to do with ticks that fell due while no worker ran
/// (`--catch-up`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    /// Drop them; fire only ticks that are on time.
    Skip,
    /// Fire the latest due tick once, however many were missed.
    #[default]
    One,
    /// Fire every missed tick (the latest [`MAX_CATCH_UP`]).
    All,
}

impl CatchUp {
    /// The flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::Skip => "skip",
            CatchUp::One => "one",
            CatchUp::All => "all",
        }
    }
}

/// When a schedule ticks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Timing {
    /// Every `every_ms`, at `anchor_ms + k * every_ms` (the anchor is when
    /// the schedule was added, on the Redis clock).
    Every {
        /// The period.
        every_ms: u64,
        /// One tick's phase.
        anchor_ms: u64,
    },
    /// A cron expression (5 fields, or 6 with seconds first) in a time
    /// zone (an IANA name).
    Cron {
        /// The expression as given.
        cron: String,
        /// The zone, e.g. `Europe/Paris`; `UTC` by default.
        tz: String,
    },
}

/// A schedule as stored: its task, payload, timing and policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// The deployed task each tick enqueues.
    pub task: String,
    /// Each tick's job payload.
    pub payload: serde_json::Value,
    /// When it ticks.
    pub timing: Timing,
    /// What to do about missed ticks.
    #[serde(default)]
    pub catch_up: CatchUp,
    /// A paused schedule fires nothing; its ticks meanwhile are dropped.
    #[serde(default)]
    pub paused: bool,
}

/// Which ticks a worker fires for a due schedule, and where it goes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Ticks to fire, oldest first (each one job).
    pub fire: Vec<u64>,
    /// The first tick after now (`None`: the expression has no more).
    pub next: Option<u64>,
    /// Due ticks that are not fired (the catch-up policy dropped them).
    pub dropped: u64,
}

/// `Err` naming the problem unless `name` can name a schedule.
pub fn check_name(name: &str) -> Result<(), String> {
    crate::limits::check_name("schedule name", name, MAX_SCHEDULE_NAME_BYTES)?;
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "schedule name {name:?} holds whitespace or control characters"
        ));
    }
    Ok(())
}

/// What every schedule job's idempotency key starts with; producers and
/// guests may not use it.
pub const TICK_KEY_PREFIX: &str = "schedule:";

/// The idempotency key of a schedule's tick: the schedule and the tick's
/// instant, so a tick is one job however many workers fire it.
pub fn tick_key(name: &str, tick_ms: u64) -> String {
    format!("{TICK_KEY_PREFIX}{name}:{tick_ms}")
}

/// The idempotency key of a `schedule run` (never a tick's).
pub fn run_key(name: &str, at_ms: u64) -> String {
    format!("{TICK_KEY_PREFIX}{name}:run:{at_ms}")
}

impl Timing {
    /// An `--every` timing anchored at `anchor_ms`, or why not.
    pub fn every(every: Duration, anchor_ms: u64) -> Result<Timing, String> {
        if every < MIN_EVERY || every > MAX_EVERY {
            return Err(format!(
                "--every {} is out of range: from {} to {}",
                humantime::format_duration(every),
                humantime::format_duration(MIN_EVERY),
                humantime::format_duration(MAX_EVERY)
            ));
        }
        if every.subsec_nanos() != 0 {
            return Err(format!(
                "--every {} is not a whole number of seconds",
                humantime::format_duration(every)
            ));
        }
        Ok(Timing::Every {
            every_ms: every.as_millis() as u64,
            anchor_ms,
        })
    }

    /// A cron timing, or why not: the expression must parse, the zone must
    /// be an IANA name, and the expression must tick again after now.
    pub fn cron(expr: &str, tz: Option<&str>) -> Result<Timing, String> {
        let timing = Timing::Cron {
            cron: expr.trim().to_string(),
            tz: tz.unwrap_or("UTC").to_string(),
        };
        let now = Utc::now().timestamp_millis().max(0) as u64;
        if timing.ticker()?.next_after(now).is_none() {
            return Err(format!("cron expression {expr:?} never ticks again"));
        }
        Ok(timing)
    }

    /// The timing, ready to compute ticks; or why it cannot (a definition
    /// stored by another version, or edited by hand).
    pub fn ticker(&self) -> Result<Ticker, String> {
        match self {
            Timing::Every {
                every_ms,
                anchor_ms,
            } => {
                let every = Duration::from_millis(*every_ms);
                Timing::every(every, *anchor_ms)?;
                Ok(Ticker::Every {
                    every_ms: *every_ms,
                    anchor_ms: *anchor_ms,
                })
            }
            Timing::Cron { cron, tz } => Ok(Ticker::Cron(Box::new(CronClock::parse(cron, tz)?))),
        }
    }

    /// How the schedule reads in `schedule list`.
    pub fn describe(&self) -> String {
        match self {
            Timing::Every { every_ms, .. } => format!(
                "every {}",
                humantime::format_duration(Duration::from_millis(*every_ms))
            ),
            Timing::Cron { cron, tz } => format!("cron {cron:?} {tz}"),
        }
    }
}

/// A timing ready to compute ticks (a cron expression parsed once).
#[derive(Debug, Clone)]
pub enum Ticker {
    /// `anchor_ms + k * every_ms`.
    Every {
        /// The period (checked: 1 s to a year).
        every_ms: u64,
        /// One tick.
        anchor_ms: u64,
    },
    /// A cron expression in its zone.
    Cron(Box<CronClock>),
}

impl Ticker {
    /// The first tick strictly after `t_ms` (`None`: no more ticks).
    pub fn next_after(&self, t_ms: u64) -> Option<u64> {
        match self {
            Ticker::Every {
                every_ms,
                anchor_ms,
            } => {
                let every = (*every_ms).max(1);
                if t_ms < *anchor_ms {
                    let behind = (anchor_ms - t_ms - 1) / every;
                    return Some(anchor_ms - behind * every);
                }
                let periods = (t_ms - anchor_ms) / every + 1;
                anchor_ms.checked_add(periods.checked_mul(every)?)
            }
            Ticker::Cron(clock) => clock.next_after(t_ms),
        }
    }

    /// The last tick at or before `t_ms`.
    pub fn latest_at_or_before(&self, t_ms: u64) -> Option<u64> {
        match self {
            Ticker::Every {
                every_ms,
                anchor_ms,
            } => {
                let every = (*every_ms).max(1);
                if t_ms >= *anchor_ms {
                    return Some(anchor_ms + (t_ms - anchor_ms) / every * every);
                }
                let behind = (anchor_ms - t_ms).div_ceil(every);
                anchor_ms.checked_sub(behind.checked_mul(every)?)
            }
            Ticker::Cron(clock) => clock.latest_at_or_before(t_ms),
        }
    }

    /// Up to `max` ticks in `[from_ms, to_ms]`, the latest ones, oldest
    /// first. A cron timing is walked forward with [`Ticker::next_after`],
    /// as a running scheduler ticks, so a DST fold reads the same here as
    /// in the ticks fired on time; only a range of more than
    /// [`FORWARD_WALK`] ticks (a long outage) is walked back from its end.
    fn latest_ticks(&self, from_ms: u64, to_ms: u64, max: usize) -> Vec<u64> {
        if let Ticker::Cron(_) = self {
            let mut ticks = std::collections::VecDeque::new();
            let mut cursor = self.first_at_or_after(from_ms);
            let mut steps = 0;
            while let Some(t) = cursor.filter(|&t| t <= to_ms) {
                if steps == FORWARD_WALK {
                    return self.latest_ticks_backward(from_ms, to_ms, max);
                }
                ticks.push_back(t);
                if ticks.len() > max {
                    ticks.pop_front();
                }
                cursor = self.next_after(t);
                steps += 1;
            }
            return ticks.into();
        }
        self.latest_ticks_backward(from_ms, to_ms, max)
    }

    /// The first tick at or after `t_ms`.
    fn first_at_or_after(&self, t_ms: u64) -> Option<u64> {
        match t_ms.checked_sub(1) {
            Some(before) => self.next_after(before),
            None => self.latest_at_or_before(0).filter(|&t| t == 0),
        }
    }

    /// [`Ticker::latest_ticks`], walking back from `to_ms` (exact for
    /// `--every`; for cron, croner's backward search).
    fn latest_ticks_backward(&self, from_ms: u64, to_ms: u64, max: usize) -> Vec<u64> {
        let mut ticks: Vec<u64> = Vec::new();
        let mut cursor = self.latest_at_or_before(to_ms);
        while let Some(t) = cursor {
            // Strictly back in time, and not before the range.
            if t < from_ms || ticks.len() >= max || ticks.last().is_some_and(|&l| t >= l) {
                break;
            }
            ticks.push(t);
            cursor = t.checked_sub(1).and_then(|b| self.latest_at_or_before(b));
        }
        ticks.reverse();
        ticks
    }

    /// How many ticks lie in `[from_ms, to_ms]` (a cron timing's counted
    /// up to [`FORWARD_WALK`]).
    fn count_ticks(&self, from_ms: u64, to_ms: u64) -> u64 {
        let Some(first) = self.first_at_or_after(from_ms).filter(|&t| t <= to_ms) else {
            return 0;
        };
        match self {
            Ticker::Every { every_ms, .. } => (to_ms - first) / (*every_ms).max(1) + 1,
            Ticker::Cron(_) => {
                let mut count = 1;
                let mut cursor = self.next_after(first);
                while cursor.is_some_and(|t| t <= to_ms) && count < FORWARD_WALK as u64 {
                    count += 1;
                    cursor = cursor.and_then(|t| self.next_after(t));
                }
                count
            }
        }
    }
}

impl Schedule {
    /// What to fire for this schedule, due at `due_ms`, when the Redis clock
    /// reads `now_ms`: every due tick is in `[due_ms, now_ms]` (none is
    /// fired early), the policy picks among them, and the next tick is
    /// after now. Fails when the timing cannot be read.
    pub fn plan(&self, due_ms: u64, now_ms: u64) -> Result<Plan, String> {
        let ticker = self.timing.ticker()?;
        let next = ticker.next_after(now_ms).filter(|&n| n > now_ms);
        if due_ms > now_ms {
            return Ok(Plan {
                fire: Vec::new(),
                next: Some(due_ms),
                dropped: 0,
            });
        }
        let on_time_from = now_ms.saturating_sub(ON_TIME_GRACE_MS).max(due_ms);
        let fire = match self.catch_up {
            CatchUp::Skip => ticker.latest_ticks(on_time_from, now_ms, MAX_CATCH_UP),
            CatchUp::One => ticker.latest_ticks(due_ms, now_ms, 1),
            CatchUp::All => ticker.latest_ticks(due_ms, now_ms, MAX_CATCH_UP),
        };
        let due = ticker.count_ticks(due_ms, now_ms).max(fire.len() as u64);
        Ok(Plan {
            dropped: due - fire.len() as u64,
            fire,
            next,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::cron::instant;
    use super::*;
    use chrono::DateTime;

    fn ms(rfc3339: &str) -> u64 {
        DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .timestamp_millis() as u64
    }

    fn cron(expr: &str, tz: &str) -> Timing {
        Timing::cron(expr, Some(tz)).unwrap()
    }

    fn ticker(timing: &Timing) -> Ticker {
        timing.ticker().unwrap()
    }

    /// The `n` ticks after `from`, each computed from the one before (what
    /// a running scheduler does).
    fn ticks(timing: &Timing, from: &str, n: usize) -> Vec<String> {
        let timing = ticker(timing);
        let mut t = ms(from);
        (0..n)
            .map(|_| {
                t = timing.next_after(t).unwrap();
                instant(t).unwrap().to_rfc3339()
            })
            .collect()
    }

    #[test]
    fn a_daily_tick_across_spring_forward_keeps_its_wall_clock_time() {
        // Paris: 2026-03-29 02:00 CET becomes 03:00 CEST.
        let t = cron("30 9 * * *", "Europe/Paris");
        assert_eq!(
            ticks(&t, "2026-03-27T12:00:00Z", 3),
            [
                "2026-03-28T08:30:00+00:00", // 09:30 CET
                "2026-03-29T07:30:00+00:00", // 09:30 CEST
                "2026-03-30T07:30:00+00:00",
            ]
        );
    }

    #[test]
    fn a_tick_in_the_spring_forward_gap_fires_right_after_it_once() {
        // 02:30 does not exist in Paris on 2026-03-29.
        let t = cron("30 2 * * *", "Europe/Paris");
        assert_eq!(
            ticks(&t, "2026-03-28T12:00:00Z", 3),
            [
                "2026-03-29T01:00:00+00:00", // 03:00 CEST, the first instant after the gap
                "2026-03-30T00:30:00+00:00", // 02:30 CEST
                "2026-03-31T00:30:00+00:00",
            ]
        );
    }

    #[test]
    fn a_tick_in_the_fall_back_overlap_fires_once() {
        // New York: 2026-11-01 02:00 EDT becomes 01:00 EST; 01:30 happens
        // twice, the schedule fires at the first.
        let t = cron("30 1 * * *", "America/New_York");
        assert_eq!(
            ticks(&t, "2026-10-31T12:00:00Z", 3),
            [
                "2026-11-01T05:30:00+00:00", // 01:30 EDT
                "2026-11-02T06:30:00+00:00", // 01:30 EST
                "2026-11-03T06:30:00+00:00",
            ]
        );
    }

    #[test]
    fn an_hourly_wildcard_ticks_by_the_wall_clock_through_the_overlap() {
        // Every 30 minutes in New York through the fall-back hour: the
        // repeated 01:00 and 01:30 both tick again (Vixie cron's rule for
        // wildcard fields), so the instants stay 30 minutes apart.
        let t = cron("*/30 * * * *", "America/New_York");
        let got = ticks(&t, "2026-11-01T04:50:00Z", 5);
        assert_eq!(
            got,
            [
                "2026-11-01T05:00:00+00:00", // 01:00 EDT
                "2026-11-01T05:30:00+00:00", // 01:30 EDT
                "2026-11-01T06:00:00+00:00", // 01:00 EST
                "2026-11-01T06:30:00+00:00", // 01:30 EST
                "2026-11-01T07:00:00+00:00", // 02:00 EST
            ]
        );
    }

    #[test]
    fn an_hourly_job_runs_in_both_one_oclocks_of_the_fall_back_night() {
        let t = cron("0 * * * *", "America/New_York");
        assert_eq!(
            ticks(&t, "2026-11-01T04:30:00Z", 4),
            [
                "2026-11-01T05:00:00+00:00", // 01:00 EDT
                "2026-11-01T06:00:00+00:00", // 01:00 EST
                "2026-11-01T07:00:00+00:00", // 02:00 EST
                "2026-11-01T08:00:00+00:00",
            ]
        );
        // And through spring forward, the 02:00 that does not exist is
        // skipped: 01:00 EST, then 03:00 EDT, an hour later.
        assert_eq!(
            ticks(&t, "2026-03-08T05:30:00Z", 2),
            ["2026-03-08T06:00:00+00:00", "2026-03-08T07:00:00+00:00"]
        );
    }

    #[test]
    fn a_fixed_time_searched_from_inside_the_repeated_hour_is_not_in_the_past() {
        // 06:10Z is 01:10 EST, the second pass of New York's repeated hour;
        // 01:30 already ran at its first occurrence (05:30Z).
        let t = ticker(&cron("30 1 * * *", "America/New_York"));
        assert_eq!(
            t.next_after(ms("2026-11-01T06:10:00Z")),
            Some(ms("2026-11-02T06:30:00Z"))
        );
    }

    #[test]
    fn lists_of_fixed_times_follow_the_fixed_time_rules() {
        // Vixie calls `0 2,14` fixed-time (no field starts with `*`): once
        // in Paris's repeated 02:00 hour...
        let t = cron("0 2,14 * * *", "Europe/Paris");
        assert_eq!(
            ticks(&t, "2026-10-24T20:00:00Z", 3),
            [
                "2026-10-25T00:00:00+00:00", // 02:00 CEST, the first
                "2026-10-25T13:00:00+00:00", // 14:00 CET
                "2026-10-26T01:00:00+00:00",
            ]
        );
        // ...and a time in New York's spring-forward gap runs right after
        // it.
        let t = cron("30 2,14 * * *", "America/New_York");
        assert_eq!(
            ticks(&t, "2026-03-08T05:00:00Z", 2),
            [
                "2026-03-08T07:00:00+00:00", // 03:00 EDT, the end of the gap
                "2026-03-08T18:30:00+00:00", // 14:30 EDT
            ]
        );
    }

    #[test]
    fn every_tick_is_later_than_the_one_before_through_dst_changes() {
        let zones = [
            "America/New_York",
            "Europe/Paris",
            "Australia/Lord_Howe",
            "UTC",
        ];
        let exprs = [
            "30 1 * * *",
            "0 2,14 * * *",
            "*/20 * * * *",
            "0 * * * *",
            "15 2 * * *",
            "0 0-59/10 1-3 * * *",
            "@daily",
        ];
        for zone in zones {
            for expr in exprs {
                let t = ticker(&cron(expr, zone));
                // From before each 2026 change to well after it.
                for start in [
                    "2026-03-07T00:00:00Z",
                    "2026-04-04T00:00:00Z",
                    "2026-10-03T00:00:00Z",
                    "2026-10-24T00:00:00Z",
                    "2026-10-31T00:00:00Z",
                ] {
                    let mut at = ms(start);
                    for _ in 0..400 {
                        let next = t.next_after(at).unwrap();
                        assert!(next > at, "{expr} in {zone}: {next} after {at}");
                        assert!(
                            next - at <= 25 * 3600 * 1000,
                            "{expr} in {zone}: gap after {at}"
                        );
                        at = next;
                    }
                }
            }
        }
    }

    #[test]
    fn seconds_are_optional_and_bad_input_is_named() {
        let t = cron("*/15 * * * * *", "UTC");
        assert_eq!(
            ticks(&t, "2026-01-01T00:00:01Z", 2),
            ["2026-01-01T00:00:15+00:00", "2026-01-01T00:00:30+00:00"]
        );
        let err = Timing::cron("61 * * * *", None).unwrap_err();
        assert!(err.contains("61 * * * *"), "{err}");
        let err = Timing::cron("* * * * *", Some("Mars/Olympus")).unwrap_err();
        assert!(err.contains("Mars/Olympus"), "{err}");
        let err = Timing::every(Duration::from_millis(500), 0).unwrap_err();
        assert!(err.contains("out of range"), "{err}");
        let err = Timing::every(Duration::from_millis(1500), 0).unwrap_err();
        assert!(err.contains("whole number"), "{err}");
        let daily = cron("@daily", "UTC");
        assert_eq!(
            ticks(&daily, "2026-01-01T10:00:00Z", 1),
            ["2026-01-02T00:00:00+00:00"]
        );
        assert!(check_name("nightly report").is_err());
        assert!(check_name("").is_err());
        assert!(check_name("nightly-report").is_ok());
    }

    #[test]
    fn cron_ticks_are_whole_seconds_whatever_the_start() {
        let t = ticker(&cron("*/10 * * * * *", "UTC"));
        let start = ms("2026-01-01T00:00:05Z") + 123;
        assert_eq!(t.next_after(start), Some(ms("2026-01-01T00:00:10Z")));
        assert_eq!(
            t.next_after(start - 123 + 5000),
            Some(ms("2026-01-01T00:00:20Z"))
        );
        assert_eq!(
            t.latest_at_or_before(start),
            Some(ms("2026-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn every_ticks_at_its_anchor_phase() {
        let t = ticker(&Timing::every(Duration::from_secs(10), 1_000_003).unwrap());
        assert_eq!(t.next_after(1_000_003), Some(1_010_003));
        assert_eq!(t.next_after(1_010_002), Some(1_010_003));
        assert_eq!(t.next_after(1_010_003), Some(1_020_003));
        assert_eq!(t.next_after(999_000), Some(1_000_003));
        assert_eq!(t.latest_at_or_before(1_029_999), Some(1_020_003));
        assert_eq!(t.latest_at_or_before(1_000_002), Some(990_003));
    }

    fn every_second(catch_up: CatchUp) -> Schedule {
        Schedule {
            task: "t".into(),
            payload: serde_json::json!({}),
            timing: Timing::every(Duration::from_secs(1), 0).unwrap(),
            catch_up,
            paused: false,
        }
    }

    #[test]
    fn on_time_every_policy_fires_the_due_tick_and_none_early() {
        for policy in [CatchUp::Skip, CatchUp::One, CatchUp::All] {
            let s = every_second(policy);
            let plan = s.plan(5000, 5100).unwrap();
            assert_eq!(plan.fire, [5000], "{policy:?}");
            assert_eq!(plan.next, Some(6000));
            assert_eq!(plan.dropped, 0);
            let early = s.plan(6000, 5999).unwrap();
            assert!(early.fire.is_empty(), "{policy:?}");
            assert_eq!(early.next, Some(6000));
        }
    }

    #[test]
    fn after_an_outage_each_policy_fires_what_it_promises() {
        // Due at 10 s, found at 20.5 s: ticks 10..=20 are due; 20 is on time.
        let skip = every_second(CatchUp::Skip).plan(10_000, 20_500).unwrap();
        assert_eq!(skip.fire, [20_000]);
        assert_eq!(skip.dropped, 10);
        let one = every_second(CatchUp::One).plan(10_000, 20_500).unwrap();
        assert_eq!(one.fire, [20_000]);
        assert_eq!(one.dropped, 10);
        let all = every_second(CatchUp::All).plan(10_000, 20_500).unwrap();
        assert_eq!(all.fire, (10..=20).map(|s| s * 1000).collect::<Vec<_>>());
        assert_eq!(all.next, Some(21_000));
        // Found within the grace of the latest tick: that one is on time.
        let skip = every_second(CatchUp::Skip).plan(10_000, 21_999).unwrap();
        assert_eq!(skip.fire, [21_000]);
        let mut slow = every_second(CatchUp::Skip);
        slow.timing = Timing::every(Duration::from_secs(4), 0).unwrap();
        let plan = slow.plan(4_000, 10_000).unwrap();
        assert!(plan.fire.is_empty());
        assert_eq!(plan.dropped, 2);
        assert_eq!(plan.next, Some(12_000));
    }

    #[test]
    fn a_tick_in_the_repeated_hour_is_fired_when_found_due() {
        // The second 01:00 of New York's fall-back night, found due 200 ms
        // late: fired, not mistaken for the first 01:00.
        let s = Schedule {
            task: "t".into(),
            payload: serde_json::json!({}),
            timing: cron("0 * * * *", "America/New_York"),
            catch_up: CatchUp::Skip,
            paused: false,
        };
        let due = ms("2026-11-01T06:00:00Z");
        let plan = s.plan(due, due + 200).unwrap();
        assert_eq!(plan.fire, [due]);
        assert_eq!(plan.next, Some(ms("2026-11-01T07:00:00Z")));
        // Down from before the first 01:00 to after the second: `all`
        // fires both.
        let mut all = s.clone();
        all.catch_up = CatchUp::All;
        let plan = all
            .plan(ms("2026-11-01T05:00:00Z"), ms("2026-11-01T06:30:00Z"))
            .unwrap();
        assert_eq!(plan.fire, [ms("2026-11-01T05:00:00Z"), due]);
    }

    #[test]
    fn catch_up_all_is_bounded() {
        let plan = every_second(CatchUp::All).plan(0, 1_000_000).unwrap();
        assert_eq!(plan.fire.len(), MAX_CATCH_UP);
        assert_eq!(plan.fire.last(), Some(&1_000_000));
        assert_eq!(plan.dropped, 1001 - MAX_CATCH_UP as u64);
    }

    #[test]
    fn the_definition_round_trips_as_json() {
        let s = Schedule {
            task: "report".into(),
            payload: serde_json::json!({"kind": "nightly"}),
            timing: cron("0 2 * * *", "Europe/Paris"),
            catch_up: CatchUp::All,
            paused: true,
        };
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Schedule>(&text).unwrap(), s);
    }
}
