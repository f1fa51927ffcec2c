//! What happens after a run that did not succeed: retry (when, and why) or
//! dead-letter (with which category).
//!
//! Backoff is exponential with full jitter and a cap, as Celery's
//! `retry_backoff`, `retry_jitter` and `retry_backoff_max`: attempt n waits a
//! uniformly random time in `[0, min(max, base * 2^(n-1))]` (or exactly that
//! bound without jitter). An explicit delay from the task wins.

use std::time::Duration;

use rand::Rng;

use crate::failure::{Category, Failure};
use crate::policy::RetryPolicy;
use crate::sandbox::Verdict;

/// The decision for a run that ended with `verdict` on `attempt` (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The job succeeded with this result.
    Succeed(String),
    /// Run again after `delay`; `error` is what this attempt ended with.
    Retry {
        /// How long to wait.
        delay: Duration,
        /// Why this attempt did not succeed.
        error: Failure,
    },
    /// Dead-letter the job with this failure.
    Dead(Failure),
}

/// The backoff before retry number `attempt` (the attempt that just failed).
pub fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    let bound = policy
        .backoff_base
        .saturating_mul(1u32 << exp.min(31))
        .min(policy.backoff_max);
    if policy.jitter {
        Duration::from_millis(rand::rng().random_range(0..=bound.as_millis() as u64))
    } else {
        bound
    }
}

/// Decide what to do after a run.
pub fn decide(policy: &RetryPolicy, attempt: u32, verdict: Verdict) -> Decision {
    let (error, explicit_delay, retryable) = match verdict {
        Verdict::Succeeded { result } => return Decision::Succeed(result),
        Verdict::Retry { message, delay } => (
            Failure::new(Category::TaskError, format!("retry requested: {message}")),
            delay,
            true,
        ),
        Verdict::Failed { failure, kind } => {
            let retryable = match failure.category {
                // Timeouts and traps may be transient (a slow API, a panic on
                // a bad response); permanent categories are not.
                Category::Timeout | Category::Trap => true,
                Category::TaskError => kind.is_some_and(|k| policy.auto_retry_kinds.contains(&k)),
                c => !c.is_permanent(),
            };
            (failure, None, retryable)
        }
    };
    if !retryable {
        return Decision::Dead(error);
    }
    if attempt >= policy.max_attempts {
        return Decision::Dead(Failure::new(
            Category::RetryExhausted,
            format!("gave up after {attempt} attempt(s); last error: {error}"),
        ));
    }
    let delay = explicit_delay.unwrap_or_else(|| backoff(policy, attempt));
    Decision::Retry { delay, error }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: bool) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(5),
            jitter,
            auto_retry_kinds: vec!["network".into()],
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = policy(false);
        let got: Vec<u64> = (1..=5).map(|a| backoff(&p, a).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 5, 5]);
        for a in 1..=5 {
            assert!(backoff(&policy(true), a) <= backoff(&p, a));
        }
    }

    #[test]
    fn kinds_and_categories_decide() {
        let p = policy(false);
        let kinded = |kind: &str| Verdict::Failed {
            failure: Failure::new(Category::TaskError, "x"),
            kind: Some(kind.into()),
        };
        assert!(matches!(
            decide(&p, 1, kinded("network")),
            Decision::Retry { .. }
        ));
        assert!(matches!(
            decide(&p, 1, kinded("validation")),
            Decision::Dead(_)
        ));
        let fuel = Verdict::Failed {
            failure: Failure::new(Category::FuelExhausted, "x"),
            kind: None,
        };
        assert!(
            matches!(decide(&p, 1, fuel), Decision::Dead(f) if f.category == Category::FuelExhausted)
        );
        let retry = Verdict::Retry {
            message: "later".into(),
            delay: Some(Duration::from_millis(7)),
        };
        assert_eq!(
            decide(&p, 2, retry.clone()),
            Decision::Retry {
                delay: Duration::from_millis(7),
                error: Failure::new(Category::TaskError, "retry requested: later")
            }
        );
        assert!(
            matches!(decide(&p, 5, retry), Decision::Dead(f) if f.category == Category::RetryExhausted)
        );
    }
}
