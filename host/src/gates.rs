//! Rate limits and concurrency keys: what a gate is, how it is written,
//! and the engine's constants for them (the Lua that enforces them is in
//! `broker::scripts`, the keys in `keys.rs`; see GUIDE.md "Rate limits"
//! and "Concurrency keys").
//!
//! A job of a gated task carries its gate in its record (field `gate`,
//! [`gate_field`]): the fetch script reads it in the read it does of every
//! popped job anyway, so ungated jobs cost nothing more. The field is
//! written by producers, so the worker checks each fetched job's gate
//! against its task's deployed policy ([`required_gate`]) and puts back,
//! with the right gate, a job whose gate would skip the task's rate. A job whose gate
//! is closed is set aside, keeping its score, in a waiting set of its lane
//! (the task's rate lane, or one concurrency key), and the fetch keeps
//! popping: other tasks' jobs are never held behind it.
//!
//! Rates are enforced with GCRA (the generic cell rate algorithm): one
//! number per lane, the theoretical arrival time, on the Redis clock.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A lane admits bursts of up to a tenth of its limit (at least one job):
/// `100/s` lets 10 jobs start at once after a quiet spell, then one every
/// 10 ms. Small enough that a rate measured over a few seconds is the
/// limit, large enough that workers polling every few milliseconds keep
/// up with it.
pub const RATE_BURST_DIVISOR: u32 = 10;

/// Most waiting jobs one lane moves back to its queue per fetch (a lane
/// with a large backlog is drained over several fetches, never in one
/// long script).
pub const LANE_RELEASE_BATCH: u32 = 100;

/// Most lanes one fetch looks at for jobs to move back (the others wait
/// for the next fetch).
pub const LANES_PER_FETCH: u32 = 50;

/// Most lanes of a queue `wasmq queues` and `wasmq jobs` look into for
/// jobs held back (a queue with more keys waiting shows the first ones').
pub const MAX_LANES_LISTED: usize = 1000;

/// Most jobs one fetch sets aside before it returns what it has: a
/// backlog of gated jobs is moved aside over several fetches (each about
/// a millisecond in Redis at most; setting a job aside costs a few
/// microseconds), so one script never blocks Redis long. A fetch that
/// stopped here tells its worker to fetch again at once.
pub const MAX_SET_ASIDE_PER_FETCH: u32 = 250;

/// When a concurrency key's lane has waiting jobs but no holder to wait
/// for (its jobs were moved back but not yet fetched), it is looked at
/// again after this long.
pub const KEY_LANE_RECHECK: Duration = Duration::from_secs(1);

/// How long a task's lane is held when a guest reports `rate-limited`
/// and the retry policy has no backoff to give (a zero `backoff_base`).
pub const DEFAULT_RATE_LIMITED_HOLD: Duration = Duration::from_secs(1);

/// The task error kind a guest returns when an upstream rate-limited it
/// (`task-error::kind(kinded-error { kind: "rate-limited", .. })`).
pub const RATE_LIMITED_KIND: &str = "rate-limited";

/// Longest concurrency key accepted (`--key`).
pub const MAX_KEY_BYTES: usize = 256;

/// A rate: `count` jobs per `per`, written `100/s`, `20/m` or `500/h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RateLimit {
    /// Jobs per period.
    pub count: u32,
    /// The period.
    pub per: Duration,
}

impl RateLimit {
    /// Parse `N/s`, `N/m` or `N/h` (N at least 1); the error names the text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "rate limit {text:?} is not a rate: write jobs per second, minute or hour, e.g. \"100/s\", \"20/m\", \"500/h\""
            )
        };
        let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(format!(
                "rate limit {text:?} allows no jobs at all: use at least 1 (or pause the queue)"
            ));
        }
        Ok(RateLimit { count, per })
    }

    /// How the scripts read it: `"COUNT PERIOD_MS"`.
    pub fn to_redis(self) -> String {
        format!("{} {}", self.count, self.per.as_millis())
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl TryFrom<String> for RateLimit {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        RateLimit::parse(&text)
    }
}

impl From<RateLimit> for String {
    fn from(rate: RateLimit) -> String {
        rate.to_string()
    }
}

/// The `gate` field of a job's record, or `None` for an ungated job:
/// `FLAGS:TASK_LEN:TASK:KEY`, FLAGS `r` (the task has a rate limit), `k`
/// (a concurrency key) or `rk`. The task name is length-prefixed, so a
/// key may hold any character.
pub fn gate_field(task: &str, rate_limited: bool, key: Option<&str>) -> Option<String> {
    let flags = match (rate_limited, key) {
        (false, None) => return None,
        (true, None) => "r",
        (false, Some(_)) => "k",
        (true, Some(_)) => "rk",
    };
    Some(format!(
        "{flags}:{}:{task}:{}",
        task.len(),
        key.unwrap_or_default()
    ))
}

/// What the fetch script reads from a `gate` field (the same reading as
/// its `gate_of`): the task it names, whether it says the task is rate
/// limited, and its concurrency key, if any. `None`: not a gate.
fn read_gate_field(text: &str) -> Option<(&str, bool, Option<&str>)> {
    let (flags, rest) = text.split_once(':')?;
    let (len, rest) = rest.split_once(':')?;
    if flags.is_empty() || !flags.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: usize = len.parse().ok()?;
    let task = rest.get(..len)?;
    let key = flags.contains('k').then(|| {
        rest.get(len..)
            .and_then(|k| k.strip_prefix(':'))
            .unwrap_or("")
    });
    Some((task, flags.contains('r'), key))
}

/// The gate a fetched job of `task` must carry, when the one in its record
/// (`recorded`, '' for none) would not make the fetch script enforce the
/// task's deployed policy; `None` when it does. `Some("")`: the job should
/// carry no gate.
///
/// Gates are written by producers, and a producer (the ACL user of the
/// hand-written enqueue, or any client) may leave one out or name another
/// task: the worker checks every job it fetches against the policy it runs
/// the task under, so a job written by hand is limited exactly like one
/// from `wasmq enqueue`. A concurrency key is the producer's to choose (it
/// is the job's data); it is kept when the gate names the job's own task.
pub fn required_gate(task: &str, rate_limited: bool, recorded: &str) -> Option<String> {
    if recorded.is_empty() && !rate_limited {
        return None; // most jobs: no gate, and none needed
    }
    let read = read_gate_field(recorded);
    let enforced = match read {
        // A gate that names the task, with the rate flag where the policy
        // has a rate, is enforced as the policy says (an extra rate flag
        // on a task without a rate finds no rate and costs nothing).
        Some((named, rated, _)) => named == task && (rated || !rate_limited),
        None => false,
    };
    if enforced {
        return None;
    }
    let key = match read {
        Some((named, _, key)) if named == task => key,
        _ => None,
    };
    Some(gate_field(task, rate_limited, key).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_that_skips_the_policy_is_replaced() {
        // Written by `wasmq enqueue`: enforced as it is.
        for (rated, key) in [(true, None), (true, Some("a:b")), (false, Some("k"))] {
            let gate = gate_field("mail", rated, key).unwrap();
            assert_eq!(required_gate("mail", rated, &gate), None, "{gate}");
        }
        assert_eq!(required_gate("mail", false, ""), None);
        // Hand-written without a gate, or with one that leaves the rate
        // out or names another task: the policy's gate, the key kept only
        // when it is the job's own task's.
        assert_eq!(required_gate("mail", true, "").unwrap(), "r:4:mail:");
        assert_eq!(
            required_gate("mail", true, "k:4:mail:u7").unwrap(),
            "rk:4:mail:u7"
        );
        assert_eq!(
            required_gate("mail", true, "rk:4:free:u7").unwrap(),
            "r:4:mail:"
        );
        assert_eq!(required_gate("mail", false, "k:4:free:u7").unwrap(), "");
        for junk in ["r", "r:x:mail:", "r:99:mail:", ":4:mail:", "1:4:mail:"] {
            assert_eq!(required_gate("mail", true, junk).unwrap(), "r:4:mail:");
            assert_eq!(required_gate("mail", false, junk).unwrap(), "");
        }
        // An extra rate flag on a task without a rate is harmless.
        assert_eq!(required_gate("mail", false, "r:4:mail:"), None);
    }

    #[test]
    fn rates_parse_and_bad_ones_are_named() {
        let r = RateLimit::parse("50/s").unwrap();
        assert_eq!((r.count, r.per), (50, Duration::from_secs(1)));
        assert_eq!(r.to_redis(), "50 1000");
        assert_eq!(RateLimit::parse("20/m").unwrap().to_string(), "20/m");
        assert_eq!(RateLimit::parse("500/h").unwrap().to_redis(), "500 3600000");
        for bad in ["50/x", "50", "/s", "-1/s", "fast"] {
            let err = RateLimit::parse(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
        assert!(RateLimit::parse("0/s").unwrap_err().contains("no jobs"));
    }

    #[test]
    fn gate_fields_name_task_and_key() {
        assert_eq!(gate_field("mail", false, None), None);
        assert_eq!(gate_field("mail", true, None).unwrap(), "r:4:mail:");
        assert_eq!(
            gate_field("sync", false, Some("a:b")).unwrap(),
            "k:4:sync:a:b"
        );
        assert_eq!(gate_field("s", true, Some("c")).unwrap(), "rk:1:s:c");
    }
}
