//! Enqueueing child jobs in the job's own tenant.

use std::time::Duration;

use serde::Serialize;

use crate::bindings::wasmq::task0_1_0::jobs as wit;
use crate::{millis, HostError};

/// Options of a child job; `EnqueueOptions::default()` starts it now with no
/// idempotency key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnqueueOptions {
    /// Do not start the child before this long from now.
    pub countdown: Option<Duration>,
    /// Deduplicate on this key: while a job of the same task with this key
    /// has succeeded (within the key's TTL), a new one does not run again.
    /// Deriving it from the parent (`format!("{}-report", job.id)`) makes a
    /// retried parent enqueue its children only once.
    pub idempotency_key: Option<String>,
}

/// Enqueues task `task` of this tenant with `payload` serialized as JSON;
/// returns the new job's id.
pub fn enqueue(task: &str, payload: &impl Serialize) -> Result<String, HostError> {
    enqueue_with(task, payload, EnqueueOptions::default())
}

/// Like [`enqueue`], with a countdown and/or idempotency key.
pub fn enqueue_with(
    task: &str,
    payload: &impl Serialize,
    options: EnqueueOptions,
) -> Result<String, HostError> {
    let payload = serde_json::to_string(payload)
        .map_err(|e| HostError::Invalid(format!("payload for {task:?} does not serialize: {e}")))?;
    let options = wit::EnqueueOptions {
        countdown_ms: options.countdown.map(millis),
        idempotency_key: options.idempotency_key,
    };
    Ok(wit::enqueue(task, &payload, &options)?)
}
