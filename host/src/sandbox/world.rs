//! Which `wasmq:task` world a component implements, and calling its entry
//! point: a 0.2.0 component's job context names the workflow the job is a
//! step of; a 0.1.0 one gets the context it was built for and nothing else.

use wasmtime::component::InstancePre;
use wasmtime::Store;

use super::bindings::{v0_1, v0_2};
use super::state::HostState;
use super::JobInput;
use crate::failure::{Category, Failure};

use v0_2::wasmq::task0_1_0::types::TaskError;

/// A component linked and checked against one of the worlds.
#[derive(Clone)]
pub(crate) enum WorldPre {
    /// `wasmq:task@0.2.0`.
    V0_2(v0_2::TaskPre<HostState>),
    /// `wasmq:task@0.1.0`.
    V0_1(v0_1::TaskPre<HostState>),
}

impl WorldPre {
    /// Check `pre`'s exports against the newest world first, then the
    /// older; the error names what a task must export.
    pub(crate) fn new(pre: InstancePre<HostState>) -> Result<Self, Failure> {
        let newest = match v0_2::TaskPre::new(pre.clone()) {
            Ok(v2) => return Ok(WorldPre::V0_2(v2)),
            Err(e) => e,
        };
        match v0_1::TaskPre::new(pre) {
            Ok(v1) => Ok(WorldPre::V0_1(v1)),
            Err(_) => Err(Failure::new(
                Category::InvalidComponent,
                format!(
                    "component does not implement the wasmq:task world (@0.2.0 or @0.1.0; \
                     export `run: func(job, payload) -> result<string, task-error>`): {newest:#}"
                ),
            )),
        }
    }

    /// The world's version, as a deploy reports it.
    pub(crate) fn version(&self) -> &'static str {
        match self {
            WorldPre::V0_2(_) => "0.2.0",
            WorldPre::V0_1(_) => "0.1.0",
        }
    }

    /// Instantiate in `store` and run `job` with `payload`.
    pub(crate) async fn run(
        &self,
        store: &mut Store<HostState>,
        job: &JobInput,
        payload: &str,
    ) -> wasmtime::Result<Result<String, TaskError>> {
        match self {
            WorldPre::V0_2(pre) => {
                let instance = pre.instantiate_async(&mut *store).await?;
                instance.call_run(store, &context_v0_2(job), payload).await
            }
            WorldPre::V0_1(pre) => {
                let instance = pre.instantiate_async(&mut *store).await?;
                instance.call_run(store, &context_v0_1(job), payload).await
            }
        }
    }
}

fn context_v0_1(job: &JobInput) -> v0_2::wasmq::task0_1_0::types::JobContext {
    v0_2::wasmq::task0_1_0::types::JobContext {
        id: job.id.clone(),
        task: job.task.clone(),
        tenant: job.tenant.clone(),
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        idempotency_key: job.idempotency_key.clone(),
    }
}

fn context_v0_2(job: &JobInput) -> v0_2::wasmq::task0_2_0::types::JobContext {
    v0_2::wasmq::task0_2_0::types::JobContext {
        id: job.id.clone(),
        task: job.task.clone(),
        tenant: job.tenant.clone(),
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        idempotency_key: job.idempotency_key.clone(),
        flow_id: job.flow.as_ref().map(|f| f.flow_id.clone()),
    }
}
