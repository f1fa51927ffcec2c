//! The overview's chart data: per-minute throughput, failures and
//! latency over the last hour, as the JSON `app.js` polls and draws.
//!
//! Counts come from the per-minute stats hashes
//! ([`Broker::outcomes_by_minute`]); latencies from the newest succeeded
//! jobs ([`Broker::recent_run_times`]), so both cost the same with ten
//! jobs in Redis or a million. Minutes without data are zeros (counts) or
//! `null` (latencies), so the charts keep a steady time axis.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::broker::{Broker, RunTimes};

/// Minutes the charts show.
pub const WINDOW_MINUTES: u64 = 60;

/// Succeeded jobs the latency chart reads at most (the newest).
const LATENCY_SAMPLE: usize = 500;

/// The overview's series, one entry per minute, oldest first.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Series {
    /// Unix minutes (Redis clock).
    pub minutes: Vec<u64>,
    /// Runs that succeeded.
    pub succeeded: Vec<u64>,
    /// Runs that failed (a retry or a death).
    pub failed: Vec<u64>,
    /// Jobs dead-lettered.
    pub dead: Vec<u64>,
    /// Jobs cancelled.
    pub cancelled: Vec<u64>,
    /// Median enqueue-to-finish time of the jobs that succeeded in the
    /// minute (of the newest sampled), ms.
    pub e2e_p50_ms: Vec<Option<u64>>,
    /// Their 95th percentile, ms.
    pub e2e_p95_ms: Vec<Option<u64>>,
    /// Median run time (last attempt's start to finish), ms.
    pub run_p50_ms: Vec<Option<u64>>,
}

/// Sum the `queue:Q:OUTCOME` fields of one minute by outcome (the
/// `task:` fields count the same runs again).
fn by_outcome(counts: &BTreeMap<String, u64>) -> BTreeMap<&str, u64> {
    let mut out = BTreeMap::new();
    for (field, n) in counts {
        let Some(rest) = field.strip_prefix("queue:") else {
            continue;
        };
        if let Some((_, outcome)) = rest.rsplit_once(':') {
            *out.entry(outcome).or_insert(0) += n;
        }
    }
    out
}

/// The `p`th percentile (0–100) of sorted `xs`.
fn percentile(xs: &[u64], p: usize) -> Option<u64> {
    if xs.is_empty() {
        return None;
    }
    Some(xs[(xs.len() - 1) * p / 100])
}

/// The series for `tenant`, ending with the current minute.
pub async fn series(broker: &Broker, tenant: &str) -> anyhow::Result<Series> {
    let counts = broker.outcomes_by_minute(tenant, WINDOW_MINUTES).await?;
    let times = broker.recent_run_times(tenant, LATENCY_SAMPLE).await?;
    let now_minute = crate::broker::now_ms() / 60_000;
    let last = counts
        .last()
        .map_or(now_minute, |(m, _)| (*m).max(now_minute));
    Ok(build(last, &counts, &times))
}

/// The series ending at minute `last` from the raw counts and times.
fn build(last: u64, counts: &[(u64, BTreeMap<String, u64>)], times: &[RunTimes]) -> Series {
    let first = last + 1 - WINDOW_MINUTES;
    let counts: BTreeMap<u64, &BTreeMap<String, u64>> =
        counts.iter().map(|(m, c)| (*m, c)).collect();
    let mut e2e: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut run: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for t in times {
        let minute = t.finished_at_ms / 60_000;
        e2e.entry(minute)
            .or_default()
            .push(t.finished_at_ms.saturating_sub(t.enqueued_at_ms));
        run.entry(minute)
            .or_default()
            .push(t.finished_at_ms.saturating_sub(t.started_at_ms));
    }
    let mut s = Series::default();
    for minute in first..=last {
        let outcomes = counts
            .get(&minute)
            .map(|c| by_outcome(c))
            .unwrap_or_default();
        let n = |k: &str| outcomes.get(k).copied().unwrap_or(0);
        s.minutes.push(minute);
        s.succeeded.push(n("succeeded"));
        s.failed.push(n("failed"));
        s.dead.push(n("dead"));
        s.cancelled.push(n("cancelled"));
        let mut e = e2e.remove(&minute).unwrap_or_default();
        e.sort_unstable();
        let mut r = run.remove(&minute).unwrap_or_default();
        r.sort_unstable();
        s.e2e_p50_ms.push(percentile(&e, 50));
        s.e2e_p95_ms.push(percentile(&e, 95));
        s.run_p50_ms.push(percentile(&r, 50));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minutes_are_filled_and_task_fields_not_counted_twice() {
        let counts = vec![(
            100,
            BTreeMap::from([
                ("queue:a:succeeded".to_string(), 3),
                ("queue:b:succeeded".to_string(), 2),
                ("task:t:succeeded".to_string(), 5),
                ("queue:a:failed".to_string(), 1),
            ]),
        )];
        let times = [RunTimes {
            enqueued_at_ms: 100 * 60_000,
            started_at_ms: 100 * 60_000 + 10,
            finished_at_ms: 100 * 60_000 + 40,
        }];
        let s = build(101, &counts, &times);
        assert_eq!(s.minutes.len(), WINDOW_MINUTES as usize);
        assert_eq!(s.minutes.last(), Some(&101));
        let i = s.minutes.iter().position(|m| *m == 100).unwrap();
        assert_eq!((s.succeeded[i], s.failed[i]), (5, 1));
        assert_eq!(s.e2e_p50_ms[i], Some(40));
        assert_eq!(s.run_p50_ms[i], Some(30));
        assert_eq!(s.e2e_p50_ms[i + 1], None);
        assert_eq!(s.succeeded[i + 1], 0);
    }
}
