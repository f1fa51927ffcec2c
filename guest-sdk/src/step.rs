//! Step markers: [`once`] runs a named step to success at most once per key,
//! across retries, duplicate deliveries and other jobs of the tenant.
//!
//! The seed's "email sent, SMS not yet" case: a task that fails after its
//! first side effect is retried, and the completed step is skipped, its
//! recorded output returned instead.
//!
//! "At most once" holds for steps that *complete*: if the job dies after the
//! side effect but before the host records completion (a worker killed, a
//! lost connection to the store), the next delivery of the job runs the
//! step again. For that window every step has an idempotency token
//! ([`step_token`]), the same on every delivery and retry: outgoing HTTP
//! requests made inside the step carry it as an `Idempotency-Key` header
//! (unless they set their own), so an API that honours the header applies
//! the repeat once. Against such APIs a step's effect happens exactly once;
//! against others, at least once.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bindings::wasmq::task0_1_0::step::{self as wit, StepState};
use crate::{millis, HostError, TaskError};

/// How long a claim on a step lasts by default. Long enough for a typical
/// HTTP call with retries inside the step; short enough that a crashed job
/// does not block a retry for long.
pub const DEFAULT_STEP_LEASE: Duration = Duration::from_secs(60);

/// How long a job waits before retrying a step another job is running.
const BUSY_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Options of [`once_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepOptions {
    /// How long this job's claim on the step lasts. If the job neither
    /// completes nor abandons the step by then (it crashed or hung), another
    /// job may run it. Default: 60 s.
    pub lease: Duration,
    /// How long the completion is remembered; `None` (the default) keeps it
    /// forever.
    pub ttl: Option<Duration>,
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions {
            lease: DEFAULT_STEP_LEASE,
            ttl: None,
        }
    }
}

/// The idempotency token of step `step`: the same on every delivery and
/// retry of every job of this tenant that names the step. Requests made
/// with [`crate::http`] inside [`once`] already carry it as their
/// `Idempotency-Key` header; pass it yourself to APIs that take it another
/// way (a body field, a query parameter).
pub fn step_token(step: &str) -> String {
    wit::idempotency_token(step)
}

/// Runs `f` unless step `step` has already completed; returns its output
/// either way.
///
/// - Completed before (by this job or any other of the tenant): `f` is not
///   called; the output recorded at completion is returned.
/// - Not completed: `f` runs. On `Ok`, its output is recorded (as JSON) and
///   returned. On `Err`, the claim is given up so a retry may run the step,
///   and the error is returned.
/// - Another job is running the step right now: returns a retry error
///   (retry after 1 s) without calling `f`.
///
/// The step key is tenant-scoped and not tied to the job: two jobs naming
/// the same key share the step (e.g. `format!("welcome-email:{user_id}")`).
pub fn once<T, F>(step: &str, f: F) -> Result<T, TaskError>
where
    T: Serialize + DeserializeOwned,
    F: FnOnce() -> Result<T, TaskError>,
{
    once_with(step, StepOptions::default(), f)
}

/// [`once`] with an explicit claim lease and completion TTL.
pub fn once_with<T, F>(step: &str, options: StepOptions, f: F) -> Result<T, TaskError>
where
    T: Serialize + DeserializeOwned,
    F: FnOnce() -> Result<T, TaskError>,
{
    match wit::begin(step, millis(options.lease)).map_err(HostError::from)? {
        StepState::Done(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            TaskError::fail(format!(
                "step {step:?} recorded an output that does not deserialize: {e}"
            ))
        }),
        StepState::Busy => Err(TaskError::retry_after(
            format!("step {step} is running in another job"),
            BUSY_RETRY_DELAY,
        )),
        StepState::Run => match f() {
            Ok(out) => {
                let bytes = match serde_json::to_vec(&out) {
                    Ok(bytes) => bytes,
                    Err(e) => {
                        // A bug in the task, not a transient failure. Give up
                        // the claim rather than block the step for a lease.
                        let _ = wit::abandon(step);
                        return Err(TaskError::fail(format!(
                            "output of step {step:?} does not serialize: {e}"
                        )));
                    }
                };
                // If recording fails, the side effect happened but is not
                // marked: the error (a retry when the store is unavailable)
                // leads to the step running again once the claim lapses.
                wit::complete(step, &bytes, options.ttl.map(millis)).map_err(HostError::from)?;
                Ok(out)
            }
            Err(e) => {
                // Best effort: if abandon fails the claim lapses after its
                // lease; the task's own error is the one worth reporting.
                let _ = wit::abandon(step);
                Err(e)
            }
        },
    }
}
