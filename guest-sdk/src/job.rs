//! [`Job`]: what the host tells a task about the job it is running.

use serde::de::DeserializeOwned;

use crate::bindings::wasmq::task0_2_0::flow::{self as wit, DependencyOutcome};
use crate::bindings::wasmq::task0_2_0::types::JobContext;
use crate::TaskError;

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
    /// The workflow this job is a step of, if any.
    pub flow_id: Option<String>,
}

/// One step a job waited for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    /// The step's job id.
    pub job_id: String,
    /// The step's task.
    pub task: String,
    /// Its JSON result, or how it failed (only seen when the flow said to
    /// go on after a failure).
    pub outcome: Result<String, String>,
}

impl Job {
    /// True if a retry request on this attempt would exhaust the policy
    /// (useful to fail with a clearer message instead).
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }

    /// The steps this job waited for, in the flow's order, with how each
    /// ended: a chain's next step gets the previous step's result, a
    /// chord's `then` every member's. Empty outside a workflow (asked of
    /// the host only for a step of one).
    pub fn dependencies(&self) -> Vec<Dependency> {
        if self.flow_id.is_none() {
            return Vec::new();
        }
        wit::dependencies()
            .into_iter()
            .map(|d| Dependency {
                job_id: d.job_id,
                task: d.task,
                outcome: match d.outcome {
                    DependencyOutcome::Succeeded(r) => Ok(r),
                    DependencyOutcome::Failed(f) => Err(f),
                },
            })
            .collect()
    }

    /// The results of the steps this job waited for, in order, each
    /// deserialized into `T`. A step that failed (the flow went on
    /// anyway) or a result that is not a `T` fails with a message naming
    /// the step; read [`Job::dependencies`] to handle failures yourself.
    pub fn results<T: DeserializeOwned>(&self) -> Result<Vec<T>, TaskError> {
        self.dependencies()
            .iter()
            .map(|d| match &d.outcome {
                Ok(json) => serde_json::from_str(json).map_err(|e| {
                    TaskError::fail(format!(
                        "the result of step {} ({}) does not match: {e}",
                        d.job_id, d.task
                    ))
                }),
                Err(failure) => Err(TaskError::fail(format!(
                    "step {} ({}) failed: {failure}",
                    d.job_id, d.task
                ))),
            })
            .collect()
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
            flow_id: c.flow_id,
        }
    }
}
