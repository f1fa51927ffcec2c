//! The host interfaces of the `wasmq:task` world, as seen from the guest:
//! argument checks, tenant scoping and the per-job caps, in front of the
//! [`Backend`](crate::backend::Backend).
//!
//! Every call uses the tenant of the job the store was built for; the names
//! a guest passes are only ever keys *within* that tenant.

use std::time::{Duration, Instant};

use super::bindings::wasmq::task::{counter, jobs, kv, lock, log, step, types};
use super::state::HostState;
use crate::backend::{BackendError, ChildJob, StepState};

use types::HostError;

/// Longest key, counter, lock or step name a guest may use.
pub const MAX_NAME_BYTES: usize = 512;
/// Largest key-value entry or step output.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Child jobs one job may enqueue: a guest that enqueues in a loop is a
/// fork bomb for the whole queue.
pub const MAX_CHILDREN_PER_JOB: u32 = 1_000;
/// Longest lease a guest may ask for (locks, step claims).
pub const MAX_LEASE: Duration = Duration::from_secs(3600);
/// A waiting lock acquire retries after this, doubling up to
/// [`LOCK_POLL_MAX`]: quick when the lock is held briefly, cheap when long.
const LOCK_POLL_MIN: Duration = Duration::from_millis(1);
const LOCK_POLL_MAX: Duration = Duration::from_millis(50);

fn check_name(what: &str, name: &str) -> Result<(), HostError> {
    if name.is_empty() {
        return Err(HostError::Invalid(format!("{what} name is empty")));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(HostError::Invalid(format!(
            "{what} name is {} bytes, over the limit of {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    Ok(())
}

fn check_value(what: &str, value: &[u8]) -> Result<(), HostError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(HostError::Invalid(format!(
            "{what} is {} bytes, over the limit of {MAX_VALUE_BYTES}",
            value.len()
        )));
    }
    Ok(())
}

fn lease(ms: u64) -> Result<Duration, HostError> {
    let d = Duration::from_millis(ms);
    if d.is_zero() || d > MAX_LEASE {
        return Err(HostError::Invalid(format!(
            "lease of {ms} ms is outside 1 ms ..= {} ms",
            MAX_LEASE.as_millis()
        )));
    }
    Ok(d)
}

fn ttl(ms: Option<u64>) -> Result<Option<Duration>, HostError> {
    match ms {
        Some(0) => Err(HostError::Invalid(
            "ttl of 0 ms; omit the ttl to keep forever".into(),
        )),
        other => Ok(other.map(Duration::from_millis)),
    }
}

impl From<BackendError> for HostError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Unavailable(m) => HostError::Unavailable(m),
            BackendError::Invalid(m) => HostError::Invalid(m),
        }
    }
}

impl HostState {
    /// Convert a backend error for the guest, remembering the first time the
    /// state store was unavailable: the worker then retries the job without
    /// counting the attempt against the task (the fault was the host's).
    fn fault(&self, e: BackendError) -> HostError {
        if let BackendError::Unavailable(m) = &e {
            let _ = self.host_fault.set(m.clone());
        }
        e.into()
    }
}

impl types::Host for HostState {}

impl log::Host for HostState {
    async fn write(&mut self, level: log::Level, message: String) {
        let level = match level {
            log::Level::Debug => "debug",
            log::Level::Info => "info",
            log::Level::Warn => "warn",
            log::Level::Error => "error",
        };
        self.log.line(&format!("[{level}] {message}"));
    }
}

impl kv::Host for HostState {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, HostError> {
        check_name("key", &key)?;
        self.backend
            .kv_get(&self.scope.tenant, &key)
            .await
            .map_err(|e| self.fault(e))
    }

    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<(), HostError> {
        check_name("key", &key)?;
        check_value("value", &value)?;
        self.backend
            .kv_set(&self.scope.tenant, &key, &value, ttl(ttl_ms)?)
            .await
            .map_err(|e| self.fault(e))
    }

    async fn set_if_absent(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, HostError> {
        check_name("key", &key)?;
        check_value("value", &value)?;
        self.backend
            .kv_set_if_absent(&self.scope.tenant, &key, &value, ttl(ttl_ms)?)
            .await
            .map_err(|e| self.fault(e))
    }

    async fn delete(&mut self, key: String) -> Result<bool, HostError> {
        check_name("key", &key)?;
        self.backend
            .kv_delete(&self.scope.tenant, &key)
            .await
            .map_err(|e| self.fault(e))
    }
}

impl counter::Host for HostState {
    async fn incr(&mut self, name: String, delta: i64) -> Result<i64, HostError> {
        check_name("counter", &name)?;
        self.backend
            .counter_incr(&self.scope.tenant, &name, delta)
            .await
            .map_err(|e| self.fault(e))
    }

    async fn incr_once(
        &mut self,
        name: String,
        delta: i64,
        once_key: String,
    ) -> Result<i64, HostError> {
        check_name("counter", &name)?;
        check_name("once key", &once_key)?;
        self.backend
            .counter_incr_once(&self.scope.tenant, &name, delta, &once_key)
            .await
            .map_err(|e| self.fault(e))
    }

    async fn get(&mut self, name: String) -> Result<i64, HostError> {
        check_name("counter", &name)?;
        self.backend
            .counter_get(&self.scope.tenant, &name)
            .await
            .map_err(|e| self.fault(e))
    }
}

impl lock::Host for HostState {
    async fn acquire(
        &mut self,
        name: String,
        ttl_ms: u64,
        wait_ms: Option<u64>,
    ) -> Result<Option<lock::Lease>, HostError> {
        check_name("lock", &name)?;
        let ttl = lease(ttl_ms)?;
        let owner = uuid::Uuid::new_v4().simple().to_string();
        let give_up = Instant::now() + Duration::from_millis(wait_ms.unwrap_or(0));
        let mut poll = LOCK_POLL_MIN;
        loop {
            if let Some(fencing_token) = self
                .backend
                .lock_acquire(&self.scope.tenant, &name, &owner, ttl)
                .await
                .map_err(|e| self.fault(e))?
            {
                return Ok(Some(lock::Lease {
                    name,
                    owner,
                    fencing_token,
                }));
            }
            if Instant::now() + poll > give_up {
                return Ok(None);
            }
            // The job's own deadline still applies: the sandbox cancels this
            // wait with the rest of the job when it times out.
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(LOCK_POLL_MAX);
        }
    }

    async fn renew(&mut self, held: lock::Lease, ttl_ms: u64) -> Result<bool, HostError> {
        check_name("lock", &held.name)?;
        let ttl = lease(ttl_ms)?;
        self.backend
            .lock_renew(&self.scope.tenant, &held.name, &held.owner, ttl)
            .await
            .map_err(|e| self.fault(e))
    }

    async fn release(&mut self, held: lock::Lease) -> Result<bool, HostError> {
        check_name("lock", &held.name)?;
        self.backend
            .lock_release(&self.scope.tenant, &held.name, &held.owner)
            .await
            .map_err(|e| self.fault(e))
    }
}

impl step::Host for HostState {
    async fn begin(&mut self, key: String, lease_ms: u64) -> Result<step::StepState, HostError> {
        check_name("step", &key)?;
        let lease = lease(lease_ms)?;
        let state = self
            .backend
            .step_begin(&self.scope.tenant, &key, &self.scope.claimant, lease)
            .await
            .map_err(|e| self.fault(e))?;
        Ok(match state {
            StepState::Done(output) => step::StepState::Done(output),
            StepState::Run => step::StepState::Run,
            StepState::Busy => {
                // Waiting for another job's step is not this task failing:
                // if the run ends in a retry because of it, the worker
                // retries without using one of the task's attempts.
                let _ = self
                    .host_fault
                    .set(format!("step {key:?} is held by another job"));
                step::StepState::Busy
            }
        })
    }

    async fn complete(
        &mut self,
        key: String,
        output: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<(), HostError> {
        check_name("step", &key)?;
        check_value("step output", &output)?;
        let ttl = ttl(ttl_ms)?;
        self.backend
            .step_complete(&self.scope.tenant, &key, &self.scope.claimant, &output, ttl)
            .await
            .map_err(|e| self.fault(e))
    }

    async fn abandon(&mut self, key: String) -> Result<(), HostError> {
        check_name("step", &key)?;
        self.backend
            .step_abandon(&self.scope.tenant, &key, &self.scope.claimant)
            .await
            .map_err(|e| self.fault(e))
    }
}

impl jobs::Host for HostState {
    async fn enqueue(
        &mut self,
        task: String,
        payload: String,
        options: jobs::EnqueueOptions,
    ) -> Result<String, HostError> {
        check_name("task", &task)?;
        check_value("child payload", payload.as_bytes())?;
        if serde_json::from_str::<serde::de::IgnoredAny>(&payload).is_err() {
            return Err(HostError::Invalid("child payload is not valid JSON".into()));
        }
        if self.children_enqueued >= MAX_CHILDREN_PER_JOB {
            let what =
                format!("enqueueing more than {MAX_CHILDREN_PER_JOB} child jobs from one job");
            self.denials.record(what.clone());
            return Err(HostError::Denied(what));
        }
        self.children_enqueued += 1;
        let child = ChildJob {
            task,
            payload,
            countdown: options.countdown_ms.map(Duration::from_millis),
            idempotency_key: options.idempotency_key,
        };
        self.backend
            .enqueue_child(&self.scope.tenant, child)
            .await
            .map_err(|e| self.fault(e))
    }
}
