//! [`Job`]: what the host tells a task about the job it is running.

use crate::bindings::wasmq::task::types::JobContext;

/// The job being run, as the host describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Unique id of this job (stable across retries of the same job).
    pub id: String,
    /// Name the task was deployed under (or the file name under `wasmq run`).
    pub task: String,
    /// Tenant that owns the job; every host call is scoped to it.
    pub tenant: String,
    /// 1 on the first run, 2 on the first retry, and so on.
    pub attempt: u32,
    /// Attempts allowed by the task's retry policy (1 = no retries).
    pub max_attempts: u32,
    /// The idempotency key the producer gave, if any.
    pub idempotency_key: Option<String>,
}

impl Job {
    /// True if a retry request on this attempt would exhaust the policy
    /// (useful to fail with a clearer message instead).
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }
}

impl From<JobContext> for Job {
    fn from(c: JobContext) -> Self {
        Job {
            id: c.id,
            task: c.task,
            tenant: c.tenant,
            attempt: c.attempt,
            max_attempts: c.max_attempts,
            idempotency_key: c.idempotency_key,
        }
    }
}
