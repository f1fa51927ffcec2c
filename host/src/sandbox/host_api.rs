//! The host interfaces of the `wasmq:task` world, as seen from the guest:
//! argument checks (every bound is in [`crate::limits`]), tenant scoping
//! and the per-job caps, in front of the [`Backend`](crate::backend::Backend).
//!
//! Every call uses the tenant of the job the store was built for; the names
//! a guest passes are only ever keys *within* that tenant.
//!
//! Errors reach the guest as `host-error`, and the job remembers what they
//! mean for its outcome: an unavailable store is the host's fault (the
//! worker retries the job without using an attempt, a bounded number of
//! times); a quota refusal is a denial (the job ends `denied` unless it
//! succeeds anyway); a malformed or out-of-range request is the guest's.
//!
//! Each call is a `debug` span (`kv.get`, `lock.acquire`, ...) under the
//! job's run span: exported when a collector is configured, a disabled
//! callsite otherwise. No span records a key or value: names a guest
//! chooses stay out of traces.

use std::time::{Duration, Instant};

use super::bindings::v0_2::wasmq::task0_1_0::{counter, jobs, kv, lock, log, step, types};
use super::bindings::v0_2::wasmq::task0_2_0::{flow, types as types_v0_2};
use super::state::HostState;
use super::steps::step_token;
use crate::backend::{BackendError, ChildJob, FlowRequest, StepState};
use crate::limits::{self, MAX_NAME_BYTES, MAX_VALUE_BYTES};

use types::HostError;

/// A waiting lock acquire retries after this, doubling up to
/// [`LOCK_POLL_MAX`]: quick when the lock is held briefly, cheap when long.
const LOCK_POLL_MIN: Duration = Duration::from_millis(1);
const LOCK_POLL_MAX: Duration = Duration::from_millis(50);

fn invalid(m: String) -> HostError {
    HostError::Invalid(m)
}

fn check_name(what: &str, name: &str) -> Result<(), HostError> {
    limits::check_name(&format!("{what} name"), name, MAX_NAME_BYTES).map_err(invalid)
}

fn check_value(what: &str, value: &[u8]) -> Result<(), HostError> {
    limits::check_len(what, value.len(), MAX_VALUE_BYTES).map_err(invalid)
}

fn lease(ms: u64) -> Result<Duration, HostError> {
    let d = Duration::from_millis(ms);
    if d.is_zero() || d > limits::MAX_LEASE {
        return Err(HostError::Invalid(format!(
            "lease of {ms} ms is outside 1 ms ..= {} ms",
            limits::MAX_LEASE.as_millis()
        )));
    }
    Ok(d)
}

impl From<BackendError> for HostError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Unavailable(m) | BackendError::LeaseLost(m) => HostError::Unavailable(m),
            BackendError::Invalid(m) => HostError::Invalid(m),
            BackendError::Denied(m) => HostError::Denied(m),
        }
    }
}

impl HostState {
    /// Convert a backend error for the guest, remembering what it means for
    /// the job: the first time the host failed it (the worker then retries
    /// the job without counting the attempt against the task), and every
    /// quota refusal (the job ends `denied` even if the guest swallows it).
    pub(super) fn fault(&self, e: BackendError) -> HostError {
        match &e {
            BackendError::Unavailable(m) | BackendError::LeaseLost(m) => {
                let _ = self.host_fault.set(m.clone());
            }
            BackendError::Denied(m) => self.denials.record(m.clone()),
            BackendError::Invalid(_) => {}
        }
        e.into()
    }

    /// The time to live an entry gets: what the guest asked for, within
    /// [`limits::MAX_TTL`] and the tenant's cap (an entry asked to live
    /// forever under a cap lives as long as the cap).
    fn ttl(&self, asked_ms: Option<u64>) -> Result<Option<Duration>, HostError> {
        let asked = match asked_ms {
            Some(0) => {
                return Err(HostError::Invalid(
                    "ttl of 0 ms; omit the ttl to keep forever".into(),
                ))
            }
            Some(ms) => Some(Duration::from_millis(ms)),
            None => None,
        };
        if let Some(asked) = asked.filter(|&t| t > limits::MAX_TTL) {
            return Err(HostError::Invalid(format!(
                "ttl of {} is over the limit of {}",
                humantime::format_duration(asked),
                humantime::format_duration(limits::MAX_TTL)
            )));
        }
        Ok(match (asked, self.scope.max_ttl) {
            (Some(t), Some(cap)) => Some(t.min(cap)),
            (None, cap) => cap,
            (asked, None) => asked,
        })
    }
}

impl types::Host for HostState {}
impl types_v0_2::Host for HostState {}

impl log::Host for HostState {
    async fn write(&mut self, level: log::Level, message: String) {
        let level = match level {
            log::Level::Debug => "debug",
            log::Level::Info => "info",
            log::Level::Warn => "warn",
            log::Level::Error => "error",
        };
        let mut end = message.len().min(limits::MAX_LOG_LINE_BYTES);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.log.line(&format!("[{level}] {}", &message[..end]));
    }
}

impl kv::Host for HostState {
    #[tracing::instrument(level = "debug", name = "kv.get", skip_all)]
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, HostError> {
        check_name("key", &key)?;
        self.backend
            .kv_get(&self.scope.tenant, &key)
            .await
            .map_err(|e| self.fault(e))
    }

    #[tracing::instrument(level = "debug", name = "kv.set", skip_all)]
    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<(), HostError> {
        check_name("key", &key)?;
        check_value("value", &value)?;
        let ttl = self.ttl(ttl_ms)?;
        self.backend
            .kv_set(&self.scope.tenant, &key, &value, ttl)
            .await
            .map_err(|e| self.fault(e))
    }

    #[tracing::instrument(level = "debug", name = "kv.set_if_absent", skip_all)]
    async fn set_if_absent(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, HostError> {
        check_name("key", &key)?;
        check_value("value", &value)?;
        let ttl = self.ttl(ttl_ms)?;
        self.backend
            .kv_set_if_absent(&self.scope.tenant, &key, &value, ttl)
            .await
            .map_err(|e| self.fault(e))
    }

    #[tracing::instrument(level = "debug", name = "kv.delete", skip_all)]
    async fn delete(&mut self, key: String) -> Result<bool, HostError> {
        check_name("key", &key)?;
        self.backend
            .kv_delete(&self.scope.tenant, &key)
            .await
            .map_err(|e| self.fault(e))
    }
}

impl counter::Host for HostState {
    #[tracing::instrument(level = "debug", name = "counter.incr", skip_all)]
    async fn incr(&mut self, name: String, delta: i64) -> Result<i64, HostError> {
        check_name("counter", &name)?;
        self.backend
            .counter_incr(&self.scope.tenant, &name, delta)
            .await
            .map_err(|e| self.fault(e))
    }

    #[tracing::instrument(level = "debug", name = "counter.incr_once", skip_all)]
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

    #[tracing::instrument(level = "debug", name = "counter.get", skip_all)]
    async fn get(&mut self, name: String) -> Result<i64, HostError> {
        check_name("counter", &name)?;
        self.backend
            .counter_get(&self.scope.tenant, &name)
            .await
            .map_err(|e| self.fault(e))
    }
}

/// A lock lease handed back by the guest: its name and owner bounded
/// before either reaches Redis.
fn check_lease(held: &lock::Lease) -> Result<(), HostError> {
    check_name("lock", &held.name)?;
    limits::check_name("lock owner token", &held.owner, limits::MAX_OWNER_BYTES).map_err(invalid)
}

impl lock::Host for HostState {
    #[tracing::instrument(level = "debug", name = "lock.acquire", skip_all)]
    async fn acquire(
        &mut self,
        name: String,
        ttl_ms: u64,
        wait_ms: Option<u64>,
    ) -> Result<Option<lock::Lease>, HostError> {
        check_name("lock", &name)?;
        let ttl = lease(ttl_ms)?;
        let owner = uuid::Uuid::new_v4().simple().to_string();
        // The job's own deadline bounds the wait: the sandbox cancels it
        // with the rest of the job when it times out.
        let give_up = Instant::now()
            .checked_add(Duration::from_millis(wait_ms.unwrap_or(0)))
            .unwrap_or_else(|| Instant::now() + limits::MAX_DELAY);
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
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(LOCK_POLL_MAX);
        }
    }

    #[tracing::instrument(level = "debug", name = "lock.renew", skip_all)]
    async fn renew(&mut self, held: lock::Lease, ttl_ms: u64) -> Result<bool, HostError> {
        check_lease(&held)?;
        let ttl = lease(ttl_ms)?;
        self.backend
            .lock_renew(&self.scope.tenant, &held.name, &held.owner, ttl)
            .await
            .map_err(|e| self.fault(e))
    }

    #[tracing::instrument(level = "debug", name = "lock.release", skip_all)]
    async fn release(&mut self, held: lock::Lease) -> Result<bool, HostError> {
        check_lease(&held)?;
        self.backend
            .lock_release(&self.scope.tenant, &held.name, &held.owner)
            .await
            .map_err(|e| self.fault(e))
    }
}

impl step::Host for HostState {
    #[tracing::instrument(level = "debug", name = "step.begin", skip_all)]
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
            StepState::Run => {
                self.steps.enter(&self.scope.tenant, &key);
                step::StepState::Run
            }
            StepState::Busy => {
                // Waiting for another job's step is not this task failing:
                // if the run ends in a retry because of it, the worker
                // retries without using one of the task's attempts.
                self.waiting_on_step = true;
                step::StepState::Busy
            }
        })
    }

    #[tracing::instrument(level = "debug", name = "step.complete", skip_all)]
    async fn complete(
        &mut self,
        key: String,
        output: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> Result<(), HostError> {
        check_name("step", &key)?;
        check_value("step output", &output)?;
        let ttl = self.ttl(ttl_ms)?;
        self.steps.leave(&key);
        self.backend
            .step_complete(&self.scope.tenant, &key, &self.scope.claimant, &output, ttl)
            .await
            .map_err(|e| self.fault(e))
    }

    #[tracing::instrument(level = "debug", name = "step.abandon", skip_all)]
    async fn abandon(&mut self, key: String) -> Result<(), HostError> {
        check_name("step", &key)?;
        self.steps.leave(&key);
        self.backend
            .step_abandon(&self.scope.tenant, &key, &self.scope.claimant)
            .await
            .map_err(|e| self.fault(e))
    }

    #[tracing::instrument(level = "debug", name = "step.idempotency_token", skip_all)]
    async fn idempotency_token(&mut self, key: String) -> String {
        step_token(&self.scope.tenant, &key)
    }
}

impl jobs::Host for HostState {
    #[tracing::instrument(level = "debug", name = "jobs.enqueue", skip_all)]
    async fn enqueue(
        &mut self,
        task: String,
        payload: String,
        options: jobs::EnqueueOptions,
    ) -> Result<String, HostError> {
        check_name("task", &task)?;
        check_value("child payload", payload.as_bytes())?;
        if let Some(key) = &options.idempotency_key {
            limits::check_name("idempotency key", key, limits::MAX_IDEMPOTENCY_KEY_BYTES)
                .map_err(invalid)?;
        }
        let countdown = options.countdown_ms.map(Duration::from_millis);
        if let Some(countdown) = countdown {
            limits::check_delay("countdown", countdown).map_err(invalid)?;
        }
        if serde_json::from_str::<serde::de::IgnoredAny>(&payload).is_err() {
            return Err(HostError::Invalid("child payload is not valid JSON".into()));
        }
        let key = options.idempotency_key.as_deref().unwrap_or("");
        if let Err(what) = self
            .secrets
            .refuse_in("a child job", &[&task, &payload, key])
        {
            self.denials.record(what.clone());
            return Err(HostError::Denied(what));
        }
        if self.children_enqueued >= limits::MAX_CHILDREN_PER_JOB {
            let what = format!(
                "enqueueing more than {} child jobs from one job",
                limits::MAX_CHILDREN_PER_JOB
            );
            self.denials.record(what.clone());
            return Err(HostError::Denied(what));
        }
        self.children_enqueued += 1;
        let child = ChildJob {
            task,
            payload,
            countdown,
            idempotency_key: options.idempotency_key,
            traceparent: self.scope.traceparent.clone(),
        };
        self.backend
            .enqueue_child(&self.scope.tenant, child)
            .await
            .map_err(|e| self.fault(e))
    }
}

impl flow::Host for HostState {
    #[tracing::instrument(level = "debug", name = "flow.dependencies", skip_all)]
    async fn dependencies(&mut self) -> Vec<flow::Dependency> {
        self.flow_dependencies
            .iter()
            .map(|d| flow::Dependency {
                job_id: d.job_id.clone(),
                task: d.task.clone(),
                outcome: match &d.outcome {
                    Ok(result) => flow::DependencyOutcome::Succeeded(result.clone()),
                    Err(failure) => flow::DependencyOutcome::Failed(failure.clone()),
                },
            })
            .collect()
    }

    #[tracing::instrument(level = "debug", name = "flow.start", skip_all)]
    async fn start(&mut self, definition: String) -> Result<flow::Started, HostError> {
        limits::check_len(
            "flow definition",
            definition.len(),
            limits::MAX_FLOW_DEFINITION_BYTES,
        )
        .map_err(invalid)?;
        if let Err(what) = self.secrets.refuse_in("a flow", &[&definition]) {
            self.denials.record(what.clone());
            return Err(HostError::Denied(what));
        }
        if self.flows_started >= limits::MAX_FLOWS_PER_JOB {
            let what = format!(
                "starting more than {} flows from one job",
                limits::MAX_FLOWS_PER_JOB
            );
            self.denials.record(what.clone());
            return Err(HostError::Denied(what));
        }
        // A flow's steps are child jobs: they count against the same cap.
        let steps = crate::flow::plan(&definition).map_err(invalid)?.steps.len() as u32;
        if self.children_enqueued.saturating_add(steps) > limits::MAX_CHILDREN_PER_JOB {
            let what = format!(
                "enqueueing more than {} child jobs (flow steps included) from one job",
                limits::MAX_CHILDREN_PER_JOB
            );
            self.denials.record(what.clone());
            return Err(HostError::Denied(what));
        }
        self.children_enqueued += steps;
        self.flows_started += 1;
        let request = FlowRequest {
            definition,
            started_by: self.scope.claimant.job.clone(),
            ordinal: self.flows_started,
            traceparent: self.scope.traceparent.clone(),
        };
        let started = self
            .backend
            .start_flow(&self.scope.tenant, request)
            .await
            .map_err(|e| self.fault(e))?;
        Ok(flow::Started {
            flow_id: started.flow_id,
            job_ids: started.job_ids,
        })
    }
}
