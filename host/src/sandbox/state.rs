//! The per-job store data: everything one instance may touch, built fresh
//! for every job and dropped with it.

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::config_api::JobSecrets;
use super::files::JobFiles;
use super::http::{AllowListHooks, Denials};
use super::limiter::JobLimiter;
use super::output::JobLog;
use super::postgres::JobDatabases;
use super::steps::OpenSteps;
use crate::backend::{Backend, Claimant};

/// Who the job is, as far as host calls are concerned.
#[derive(Debug, Clone)]
pub struct JobScope {
    /// Tenant every host call is scoped to.
    pub tenant: String,
    /// Who holds this job's step claims: the job and this delivery. A
    /// redelivery of a job whose worker died takes over that job's claims
    /// at once, while other jobs naming the same step still wait for it;
    /// a delivery that lost its lease can no longer begin or complete one.
    pub claimant: Claimant,
    /// Longest time to live a guest's entry may have (the tenant's cap,
    /// else [`crate::limits::MAX_TTL`]); entries asked to live longer, or
    /// forever, get this.
    pub max_ttl: Option<std::time::Duration>,
    /// The run's W3C trace context, passed on to the child jobs it
    /// enqueues.
    pub traceparent: Option<String>,
}

/// The `T` of `Store<T>`: see the module docs.
pub struct HostState {
    pub(crate) wasi: WasiCtx,
    pub(crate) http: WasiHttpCtx,
    pub(crate) http_hooks: AllowListHooks,
    pub(crate) table: ResourceTable,
    /// The job's directory grants, opened, and its disk account.
    pub(crate) files: JobFiles,
    pub(crate) limiter: JobLimiter,
    pub(crate) log: JobLog,
    pub(crate) denials: Denials,
    /// Steps the guest is inside now (shared with the HTTP hooks, which
    /// give requests made inside a step its idempotency token).
    pub(crate) steps: OpenSteps,
    pub(crate) scope: JobScope,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) children_enqueued: u32,
    /// Flows this run started so far (their ordinal makes a retried
    /// `start` find the flow its earlier delivery started).
    pub(crate) flows_started: u32,
    /// What the job, a step of a workflow, waited for (read when it was
    /// fetched), for `flow.dependencies`.
    pub(crate) flow_dependencies: Vec<super::DependencyInput>,
    /// The first host-side reason the run may not succeed: the state store
    /// was unavailable.
    pub(crate) host_fault: std::sync::OnceLock<String>,
    /// A step the run needed was held by another job.
    pub(crate) waiting_on_step: bool,
    /// The secrets the job may read, and those it read.
    pub(crate) secrets: JobSecrets,
    /// The databases the job may open, and what it used of them.
    pub(crate) databases: JobDatabases,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_hooks,
        }
    }
}
