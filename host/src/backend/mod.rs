//! The host-side state behind the guest's host interfaces: key-value,
//! counters, locks, step markers and child jobs.
//!
//! One trait, [`Backend`], with two implementations: [`memory`] (embedded
//! mode, `wasmq run`: one process, no Redis) and [`redis`], used by
//! workers. Every method takes the tenant explicitly: the sandbox passes the
//! job's tenant, never a name the guest chose, so a guest can only reach its
//! own tenant's state. Each method is one atomic operation, shaped so Redis
//! serves it in one round trip (a command or a Lua script).

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;

/// Why a backend call failed. The split decides whose problem it is: the
/// host's (retried without using the task's attempts, a bounded number of
/// times) or the guest's (its request was wrong, or over its tenant's
/// quota: retrying the same request cannot help).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// The store could not be reached, or refused for a reason of its own
    /// (out of memory, a read-only replica, an ACL, loading): the host's
    /// fault; retrying later may work.
    Unavailable(String),
    /// The request was refused as malformed or out of range (by the host's
    /// checks, or by the store itself: a counter that would overflow, an
    /// expiry out of range): the guest's problem.
    Invalid(String),
    /// Over a tenant quota (stored bytes or keys, child jobs per minute,
    /// idempotency keys): a capability refused.
    Denied(String),
    /// The delivery making the call no longer holds its job's lease:
    /// another delivery owns the job now, so this one may not complete a
    /// step.
    LeaseLost(String),
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::Unavailable(m) => write!(f, "state store unavailable: {m}"),
            BackendError::Invalid(m) => write!(f, "invalid request: {m}"),
            BackendError::Denied(m) => write!(f, "denied: {m}"),
            BackendError::LeaseLost(m) => write!(f, "lease lost: {m}"),
        }
    }
}

impl std::error::Error for BackendError {}

/// Who claims a step: one delivery of one job. A later delivery of the same
/// job takes over its claims at once (the earlier one lost its lease, or it
/// would not have been redelivered), while other jobs naming the same step
/// wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimant {
    /// The job's id.
    pub job: String,
    /// The delivery's lease token; `None` in embedded mode (`wasmq run`),
    /// where there are no leases. With a token, the store refuses to begin
    /// or complete a step once the job's lease names another delivery.
    pub token: Option<String>,
}

impl Claimant {
    /// A claimant without a lease (embedded mode, tests).
    pub fn unfenced(job: &str) -> Self {
        Claimant {
            job: job.to_string(),
            token: None,
        }
    }
}

/// Result of a backend call.
pub type BackendResult<T> = Result<T, BackendError>;

/// Where a step marker stands when a job reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepState {
    /// Completed before; the recorded output.
    Done(Vec<u8>),
    /// Claimed by the caller now: it must run the step.
    Run,
    /// Claimed by another run that has not finished (or whose claim has not
    /// lapsed yet).
    Busy,
}

/// A child job a task asked to enqueue.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChildJob {
    /// Task name within the tenant.
    pub task: String,
    /// JSON payload.
    pub payload: String,
    /// Delay before it may start.
    pub countdown: Option<Duration>,
    /// Idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// The parent run's W3C trace context: the child joins its trace.
    pub traceparent: Option<String>,
}

/// A workflow a task asked to start.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowRequest {
    /// The flow's JSON definition (see `flow`).
    pub definition: String,
    /// The job that starts it.
    pub started_by: String,
    /// 1 for the first flow this run starts, 2 for the second, ...: with
    /// `started_by`, what makes a repeated start find the same flow.
    pub ordinal: u32,
    /// The run's W3C trace context: the flow's jobs join its trace.
    pub traceparent: Option<String>,
}

/// A workflow that was started (or found already started).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StartedFlow {
    /// The flow's id.
    pub flow_id: String,
    /// Its jobs, in the order their steps appear in the definition.
    pub job_ids: Vec<String>,
}

/// The state store behind the host interfaces. See the module docs.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Value of `key`, if set and not expired.
    async fn kv_get(&self, tenant: &str, key: &str) -> BackendResult<Option<Vec<u8>>>;
    /// Set `key`, with an optional time to live.
    async fn kv_set(
        &self,
        tenant: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> BackendResult<()>;
    /// Set `key` only if it holds nothing; true if stored.
    async fn kv_set_if_absent(
        &self,
        tenant: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> BackendResult<bool>;
    /// Delete `key`; true if it existed.
    async fn kv_delete(&self, tenant: &str, key: &str) -> BackendResult<bool>;

    /// Add `delta` to counter `name`; the new value. `Invalid` when the
    /// counter would leave the i64 range (both backends refuse alike).
    async fn counter_incr(&self, tenant: &str, name: &str, delta: i64) -> BackendResult<i64>;
    /// Add `delta` to counter `name` unless `once_key` was used before;
    /// either way, the value recorded for `once_key` (atomic).
    async fn counter_incr_once(
        &self,
        tenant: &str,
        name: &str,
        delta: i64,
        once_key: &str,
    ) -> BackendResult<i64>;
    /// Current value of counter `name` (0 if unset).
    async fn counter_get(&self, tenant: &str, name: &str) -> BackendResult<i64>;

    /// Take lock `name` for `owner` for `ttl` if free (or expired): returns
    /// the new fencing token, strictly greater than any before for this lock.
    async fn lock_acquire(
        &self,
        tenant: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> BackendResult<Option<u64>>;
    /// Extend the lease if `owner` still holds it.
    async fn lock_renew(
        &self,
        tenant: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> BackendResult<bool>;
    /// Release the lock if `owner` still holds it.
    async fn lock_release(&self, tenant: &str, name: &str, owner: &str) -> BackendResult<bool>;

    /// Claim step `key` for `claimant` for `lease`, unless it is done or
    /// claimed by another job's live claim. `LeaseLost` when the claimant's
    /// delivery no longer holds its job.
    async fn step_begin(
        &self,
        tenant: &str,
        key: &str,
        claimant: &Claimant,
        lease: Duration,
    ) -> BackendResult<StepState>;
    /// Record step `key` as done with `output` and drop the claim;
    /// `LeaseLost` (nothing recorded) when the claimant's delivery no
    /// longer holds its job.
    async fn step_complete(
        &self,
        tenant: &str,
        key: &str,
        claimant: &Claimant,
        output: &[u8],
        ttl: Option<Duration>,
    ) -> BackendResult<()>;
    /// Drop `claimant`'s job's claim on step `key`, if it still holds it.
    async fn step_abandon(&self, tenant: &str, key: &str, claimant: &Claimant)
        -> BackendResult<()>;

    /// Enqueue a child job in `tenant`; its job id.
    async fn enqueue_child(&self, tenant: &str, child: ChildJob) -> BackendResult<String>;

    /// Start a workflow in `tenant`, or find the one this `request`'s job
    /// and ordinal started before.
    async fn start_flow(&self, tenant: &str, request: FlowRequest) -> BackendResult<StartedFlow>;

    // --- secrets ---

    /// The sealed value of secret `name` for `task` of `tenant`, with the
    /// field it was filed under (see [`crate::secrets`]): the task's own
    /// value if set, else the tenant's. `None` when neither is set. The
    /// default has no secrets at all.
    async fn secret_sealed(
        &self,
        tenant: &str,
        task: &str,
        name: &str,
    ) -> BackendResult<Option<(String, Vec<u8>)>> {
        let _ = (tenant, task, name);
        Ok(None)
    }
}
