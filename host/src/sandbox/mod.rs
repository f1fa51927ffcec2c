//! One job's run in a fresh, sandboxed instance.
//!
//! Owns: the [`Linker`] with WASI p2, `wasi:http` and the wasmq host
//! interfaces; the task versions prepared for it (`InstancePre`s, each
//! compiled once per process: see `compiler.rs`); and [`Sandbox::run`],
//! which builds a fresh `Store` for every job with its fuel, memory cap,
//! wall-clock deadline and grants, calls the task, and files whatever
//! happened under one verdict with a failure category.
//!
//! Nothing is granted by default: no preopened directories, no environment,
//! no sockets (`wasi:sockets` is linked so components built with std
//! instantiate, but the context grants no address and no name lookup), HTTP
//! only to the policy's allow-list. Guest stdout/stderr go to the job's
//! bounded log. Directory grants are opened beneath the tenant's caps and
//! writes under them are charged to its disk quota ([`files`], [`disk`]).

mod bindings;
mod compiler;
mod config_api;
mod disk;
mod files;
mod host_api;
mod http;
mod limiter;
mod output;
mod pacing;
pub(crate) mod postgres;
mod redact;
mod state;
mod steps;
mod world;

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, Store, Trap, UpdateDeadline};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi_http::WasiHttpCtx;

use crate::backend::{Backend, Claimant};
use crate::component::CompiledCache;
use crate::engine::CompileSettings;
use crate::failure::{Category, Failure};
use crate::fence::LeaseWatch;
use crate::policy::SandboxPolicy;
use crate::secrets::SecretsKey;
use crate::tenants::TenantLimits;
pub use crate::usage::Usage;
use bindings::v0_2::wasmq::task0_1_0::types::TaskError;
use bindings::v0_2::Task;
pub use compiler::CompileStats;
use compiler::Compiler;
use config_api::JobSecrets;
use disk::DiskLedgers;
pub use disk::{ENTRY_BYTES as DISK_ENTRY_BYTES, MEASURE_EVERY as DISK_MEASURE_EVERY};
use files::JobFiles;
use http::{AllowListHooks, Denials};
use limiter::JobLimiter;
use output::JobLog;
pub use pacing::{ComputeThreads, COMPUTE_BURST};
use pacing::{OwnedRun, RunClock};
use state::{HostState, JobScope};
use steps::OpenSteps;
pub use steps::{step_token, IDEMPOTENCY_HEADER};
use world::WorldPre;

/// Task error kinds the host gives a meaning to. A task (through the SDK)
/// reports a payload that does not fit its argument type as `bad-payload`,
/// and a refused capability as `denied`.
const KIND_BAD_PAYLOAD: &str = "bad-payload";
const KIND_DENIED: &str = "denied";

/// How long to wait before retrying a job that found every instance slot
/// taken (only possible when the pool is sized below the concurrency).
const POOL_FULL_RETRY: Duration = Duration::from_millis(100);

/// One job as the sandbox sees it.
#[derive(Debug, Clone)]
pub struct JobInput {
    /// Job id.
    pub id: String,
    /// Task name.
    pub task: String,
    /// Tenant that owns the job.
    pub tenant: String,
    /// 1-based attempt number.
    pub attempt: u32,
    /// Attempts the retry policy allows.
    pub max_attempts: u32,
    /// Producer's idempotency key.
    pub idempotency_key: Option<String>,
    /// JSON payload.
    pub payload: String,
    /// This delivery's lease token (workers); `None` in embedded mode.
    /// Step claims carry it, so a delivery that lost its lease can neither
    /// begin nor complete a step.
    pub lease_token: Option<String>,
    /// Whether this delivery still holds its lease: the run stops, and its
    /// outbound requests are refused, once it does not.
    pub lease: Arc<LeaseWatch>,
    /// Longest time to live of a guest's stored entry (the tenant's cap);
    /// `None`: the global limit only.
    pub max_value_ttl: Option<Duration>,
    /// The run's W3C `traceparent` (a child of the producer's), sent on
    /// its outgoing HTTP requests and given to the child jobs it enqueues.
    pub traceparent: Option<String>,
    /// The job's place in a workflow, with the results of the steps it
    /// waited for; `None` for a job outside any flow.
    pub flow: Option<FlowInput>,
}

/// What a step of a workflow is told about the flow (a 0.2.0 component
/// reads it in its job context).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowInput {
    /// The flow's id.
    pub flow_id: String,
    /// The steps the job waited for, in the flow's order.
    pub dependencies: Vec<DependencyInput>,
}

/// One step a job waited for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DependencyInput {
    /// The step's job id.
    pub job_id: String,
    /// The step's task.
    pub task: String,
    /// Its JSON result, or how it failed ("CATEGORY: message").
    pub outcome: Result<String, String>,
}

impl JobInput {
    /// A first-attempt job of `tenant` without a lease (embedded mode,
    /// tests).
    pub fn new(id: &str, task: &str, tenant: &str, payload: &str) -> Self {
        JobInput {
            id: id.to_string(),
            task: task.to_string(),
            tenant: tenant.to_string(),
            attempt: 1,
            max_attempts: 1,
            idempotency_key: None,
            payload: payload.to_string(),
            lease_token: None,
            lease: Arc::new(LeaseWatch::unbounded()),
            max_value_ttl: None,
            traceparent: None,
            flow: None,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The task returned this JSON result.
    Succeeded {
        /// The result, valid JSON.
        result: String,
    },
    /// The task asked to be run again.
    Retry {
        /// Why.
        message: String,
        /// Explicit delay; `None` means "use the policy's backoff".
        delay: Option<Duration>,
    },
    /// The run failed.
    Failed {
        /// Category and cause.
        failure: Failure,
        /// The task's error kind, for `task-error`s raised with a kind (the
        /// retry policy's auto-retry kinds match on it).
        kind: Option<String>,
    },
}

/// The result of [`Sandbox::run`].
#[derive(Debug, Clone)]
pub struct JobOutcome {
    /// How it ended.
    pub verdict: Verdict,
    /// What it cost.
    pub usage: Usage,
    /// Captured stdout, stderr and log lines (bounded).
    pub log: String,
    /// Set when a host call found the state store (Redis) unavailable, or
    /// no instance slot was free: a failure of this run may be the host's
    /// doing, not the task's.
    pub host_fault: Option<String>,
    /// A step the run needed was held by another job: a retry it asked for
    /// is waiting, not failing.
    pub waiting_on_step: bool,
    /// The delivery lost its lease while the run went on: the run was
    /// stopped there, and belongs to whichever delivery holds the job now.
    pub lease_lost: bool,
    /// Every capability the run was refused, in order (HTTP destinations,
    /// quotas, ...), including those the guest swallowed.
    pub denials: Vec<String>,
}

/// A compiled task version, ready to instantiate.
#[derive(Clone)]
pub struct PreparedTask {
    /// sha256 of the component bytes.
    pub hash: String,
    /// Size of the component (a tenant's cap applies to it on every job).
    pub component_bytes: u64,
    pre: WorldPre,
}

impl PreparedTask {
    /// The `wasmq:task` world version the component implements.
    pub fn world_version(&self) -> &'static str {
        self.pre.version()
    }
}

/// Returned by the epoch callback once the wall-clock deadline has passed.
#[derive(Debug)]
struct DeadlineExceeded;

impl std::fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("wall-clock deadline exceeded")
    }
}

impl std::error::Error for DeadlineExceeded {}

/// See the module docs.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<HostState>,
    cache: CompiledCache,
    compiler: Compiler,
    /// Every tenant's disk use in this process (one sandbox per worker
    /// process, so the jobs of a tenant share one account).
    disks: DiskLedgers,
    /// The key that opens the tenants' secrets (`None`: a job that reads
    /// a secret that is set fails as the host's fault).
    secrets_key: Option<Arc<SecretsKey>>,
    /// This worker's database pools, per tenant and database.
    databases: Arc<postgres::Databases>,
}

impl Sandbox {
    /// A sandbox on `engine`, caching compiled components in `cache`,
    /// compiling with the default [`CompileSettings`].
    pub fn new(engine: Engine, cache: CompiledCache) -> anyhow::Result<Self> {
        let mut linker = Linker::new(&engine);
        // WASI p2: clocks, random, cli (stdio, no env), filesystem (no
        // preopens unless granted), sockets (no address granted), io.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        // Preopens from the handles we opened, and writes metered.
        files::add_to_linker(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        Task::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)?;
        Ok(Sandbox {
            engine,
            linker,
            cache,
            compiler: Compiler::new(CompileSettings::default()),
            disks: DiskLedgers::default(),
            secrets_key: None,
            databases: Arc::default(),
        })
    }

    /// The same sandbox, keeping at most `size` connections per tenant and
    /// database (default [`crate::limits::DB_POOL_SIZE`]).
    pub fn with_db_pool_size(mut self, size: usize) -> Self {
        self.databases = Arc::new(postgres::Databases::with_pool_size(size));
        self
    }

    /// The same sandbox, opening secrets with `key`.
    pub fn with_secrets_key(mut self, key: Option<Arc<SecretsKey>>) -> Self {
        self.secrets_key = key;
        self
    }

    /// The same sandbox, compiling with `settings` (a worker's priority,
    /// budget and default size cap).
    pub fn with_compile_settings(mut self, settings: CompileSettings) -> Self {
        self.compiler = Compiler::new(settings);
        self
    }

    /// Its compile settings.
    pub fn compile_settings(&self) -> &CompileSettings {
        self.compiler.settings()
    }

    /// The engine jobs run on.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// A task version already prepared in this process, by hash.
    pub fn cached(&self, hash: &str) -> Option<PreparedTask> {
        self.compiler.ready(hash)
    }

    /// Run one job in a fresh instance of `task`, unpaced (a cpu pool, or
    /// a job that has the runtime to itself).
    pub async fn run(
        &self,
        task: &PreparedTask,
        job: &JobInput,
        policy: &SandboxPolicy,
        backend: Arc<dyn Backend>,
    ) -> JobOutcome {
        self.run_paced(task, job, policy, backend, None).await
    }

    /// Run one job in a fresh instance of `task`; with `compute`, a run
    /// that computes past its burst finishes on those threads (io pools:
    /// see [`ComputeThreads`]). For a tenant without a record, as
    /// [`Sandbox::run_capped`] with no caps.
    pub async fn run_paced(
        &self,
        task: &PreparedTask,
        job: &JobInput,
        policy: &SandboxPolicy,
        backend: Arc<dyn Backend>,
        compute: Option<&ComputeThreads>,
    ) -> JobOutcome {
        self.run_capped(task, job, policy, None, backend, compute)
            .await
    }

    /// [`Sandbox::run_paced`] for a job whose tenant's current record is
    /// `caps` (`None`: no record, uncapped). Its directory grants must then
    /// fit the record, and are opened beneath its allowed directories and
    /// metered against its disk quota; one that does not fit fails the job
    /// `denied`, naming the grant and the cap. (The caller clamps the other
    /// limits into `policy`: [`TenantLimits::clamp`].)
    pub async fn run_capped(
        &self,
        task: &PreparedTask,
        job: &JobInput,
        policy: &SandboxPolicy,
        caps: Option<&TenantLimits>,
        backend: Arc<dyn Backend>,
        compute: Option<&ComputeThreads>,
    ) -> JobOutcome {
        let started = Instant::now();
        let log = JobLog::new(policy.max_log_bytes);
        let finish = |verdict, usage, host_fault| JobOutcome {
            verdict,
            usage,
            log: log.text(),
            host_fault,
            waiting_on_step: false,
            lease_lost: false,
            denials: Vec::new(),
        };
        if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&job.payload) {
            let failure = Failure::new(
                Category::BadPayload,
                format!("payload is not valid JSON: {e}"),
            );
            return finish(
                Verdict::Failed {
                    failure,
                    kind: None,
                },
                Usage::default(),
                None,
            );
        }
        let clock = RunClock::default();
        let denials = Denials::default();
        let store = match self.open_files(job, policy, caps, &denials).await {
            Ok(files) => self.new_store(job, policy, files, denials, &log, backend, &clock),
            Err(failure) => Err(failure),
        };
        let mut store = match store {
            Ok(store) => store,
            Err(failure) => {
                return finish(
                    Verdict::Failed {
                        failure,
                        kind: None,
                    },
                    Usage::default(),
                    None,
                )
            }
        };
        let deadline = started + policy.timeout;
        // The epoch callback stops a guest that computes past its deadline;
        // the timeout around the call stops one that waits past it (on HTTP,
        // a lock, a sleep), when no wasm runs to reach an epoch check.
        // Owned, so that it can move to the compute threads mid-run.
        // A delivery that lost its lease stops here: the job belongs to the
        // delivery that holds it now, and nothing more may be done for it.
        let (pre, input, run_clock) = (task.pre.clone(), job.clone(), clock.clone());
        let lease = job.lease.clone();
        // The caller's span (the job's run span) goes with the run, also
        // onto the compute threads: host calls and requests are its children.
        let span = tracing::Span::current();
        let run: OwnedRun<_> = Box::pin(tracing::Instrument::instrument(
            async move {
                let call = pre.run(&mut store, &input, &input.payload);
                let result = tokio::select! {
                    // The lease first: once it is lost the run must not take
                    // another step.
                    biased;
                    _ = lease.lost() => None,
                    result = tokio::time::timeout_at(deadline.into(), run_clock.metered(call)) => Some(result),
                };
                (result, store)
            },
            span,
        ));
        let (result, store) = match pacing::run_paced(run, &clock, compute).await {
            Ok(finished) => finished,
            // Only while the worker shuts down (or on a host bug): the run
            // is lost, not failed; try again without using an attempt.
            Err(lost) => {
                let verdict = Verdict::Retry {
                    message: lost.clone(),
                    delay: None,
                };
                return finish(verdict, Usage::default(), Some(lost));
            }
        };

        let state = store.data();
        let usage = Usage {
            fuel: store
                .get_fuel()
                .map_or(0, |left| policy.fuel.saturating_sub(left)),
            peak_memory_bytes: state.limiter.peak_memory_bytes as u64,
            wall_time_us: started.elapsed().as_micros() as u64,
            run_time_us: clock.ran().as_micros() as u64,
            net_out_bytes: state.http_hooks.traffic().sent(),
            net_in_bytes: state.http_hooks.traffic().received(),
            denied: state.denials.all().len() as u64,
            db_time_us: state.databases.time_us,
            db_rows: state.databases.rows,
        };
        let Some(result) = result else {
            let message = "the delivery lost its lease mid-run; the run was stopped".to_string();
            let mut outcome = finish(
                Verdict::Retry {
                    message: message.clone(),
                    delay: None,
                },
                usage,
                Some(message),
            );
            outcome.lease_lost = true;
            outcome.denials = state.denials.all();
            redact_secrets(&mut outcome, &state.secrets);
            return outcome;
        };
        let verdict = match result {
            Err(_elapsed) => timed_out(policy),
            Ok(Err(error)) => classify_error(&error, state, policy),
            Ok(Ok(Ok(result))) => check_result(result, policy),
            Ok(Ok(Err(task_error))) => from_task_error(task_error),
        };
        let verdict = match (verdict, state.denials.first()) {
            // A refused capability explains whatever the guest did next.
            (Verdict::Succeeded { result }, _) => Verdict::Succeeded { result },
            (_, Some(denied)) => Verdict::Failed {
                failure: Failure::new(Category::Denied, format!("{denied} was refused")),
                kind: None,
            },
            (verdict, None) => verdict,
        };
        // Past the disk quota the job is refused whatever the guest made of
        // the error: some of what it wrote is not there.
        let verdict = match state.files.quota_refusal() {
            Some(refusal) => failed(Category::Denied, format!("{refusal} was refused")),
            None => verdict,
        };
        let host_fault = state.host_fault.get().cloned();
        let mut outcome = finish(verdict, usage, host_fault);
        outcome.waiting_on_step = state.waiting_on_step;
        outcome.denials = state.denials.all();
        redact_secrets(&mut outcome, &state.secrets);
        outcome
    }

    /// The job's directory grants, opened beneath `caps` (see [`files`]),
    /// and for writable ones under a quota, its tenant's disk account.
    async fn open_files(
        &self,
        job: &JobInput,
        policy: &SandboxPolicy,
        caps: Option<&TenantLimits>,
        denials: &Denials,
    ) -> Result<JobFiles, Failure> {
        if policy.dirs.is_empty() {
            return Ok(JobFiles::default());
        }
        let opened = files::open_grants(&job.tenant, caps, &policy.dirs)
            .map_err(|m| Failure::new(Category::Denied, m))?;
        let quota = caps.and_then(|c| c.max_disk_bytes);
        let disk = match quota {
            Some(quota) if !opened.writable.is_empty() => Some(
                self.disks
                    .job(&job.tenant, quota, opened.writable, denials.clone())
                    .await,
            ),
            // No record (uncapped), or nothing writable: nothing to meter.
            // (A record without a quota has had its writable grants refused.)
            _ => None,
        };
        Ok(JobFiles {
            preopens: opened.preopens,
            disk,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn new_store(
        &self,
        job: &JobInput,
        policy: &SandboxPolicy,
        files: JobFiles,
        denials: Denials,
        log: &JobLog,
        backend: Arc<dyn Backend>,
        clock: &RunClock,
    ) -> Result<Store<HostState>, Failure> {
        let denied = |m: String| Failure::new(Category::Denied, m);
        let steps = OpenSteps::default();
        let http_hooks =
            AllowListHooks::new(policy, denials.clone(), steps.clone(), job.lease.clone())
                .map_err(denied)?
                .with_traceparent(job.traceparent.as_deref());
        let mut wasi = WasiCtxBuilder::new();
        // No preopens here: ours come from `files` (see `files`).
        wasi.stdout(log.clone()).stderr(log.clone());
        let state = HostState {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            http_hooks,
            table: ResourceTable::new(),
            files,
            limiter: JobLimiter::new(policy.memory_bytes, policy.max_table_elements),
            log: log.clone(),
            denials,
            steps,
            scope: JobScope {
                tenant: job.tenant.clone(),
                claimant: Claimant {
                    job: job.id.clone(),
                    token: job.lease_token.clone(),
                },
                max_ttl: job.max_value_ttl,
                traceparent: job.traceparent.clone(),
            },
            backend,
            children_enqueued: 0,
            flows_started: 0,
            flow_dependencies: job
                .flow
                .as_ref()
                .map(|f| f.dependencies.clone())
                .unwrap_or_default(),
            host_fault: std::sync::OnceLock::new(),
            waiting_on_step: false,
            secrets: JobSecrets::new(self.secrets_key.clone(), &policy.secrets, &job.task),
            databases: postgres::JobDatabases::new(self.databases.clone(), &policy.databases),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        // Fails only on an engine built without fuel (benchmarks).
        let _ = store.set_fuel(policy.fuel);
        let deadline = Instant::now() + policy.timeout;
        store.set_epoch_deadline(1);
        let clock = clock.clone();
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                Err(wasmtime::Error::new(DeadlineExceeded))
            } else {
                clock.tick();
                // Yield to the async runtime every tick, so other jobs on
                // this thread, lease renewals and timeouts keep running
                // (and an io job past its burst can move; see `pacing`).
                // tokio's own yield_now puts this task at the back of the
                // run queue; a plain self-wake would put it in the LIFO
                // slot and run it again at once.
                Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(tokio::task::yield_now()),
                ))
            }
        });
        Ok(store)
    }
}

/// Blot the secrets a run read out of everything of it that is kept or
/// shown: its log, its result (which a flow hands on to later steps), its
/// failure message and kind, and its denials (a value passed as a name).
fn redact_secrets(outcome: &mut JobOutcome, secrets: &JobSecrets) {
    if !secrets.any_read() {
        return;
    }
    let redactor = secrets.redactor();
    let redact = |text: &mut String| *text = redactor.redact(text);
    redact(&mut outcome.log);
    outcome.denials.iter_mut().for_each(redact);
    match &mut outcome.verdict {
        Verdict::Succeeded { result } => redact(result),
        Verdict::Retry { message, .. } => redact(message),
        Verdict::Failed { failure, kind } => {
            redact(&mut failure.message);
            kind.iter_mut().for_each(redact);
        }
    }
    if let Some(fault) = outcome.host_fault.as_mut() {
        redact(fault);
    }
}

fn timed_out(policy: &SandboxPolicy) -> Verdict {
    Verdict::Failed {
        failure: Failure::new(
            Category::Timeout,
            format!(
                "job ran past its {} wall-clock timeout",
                humantime::format_duration(policy.timeout)
            ),
        ),
        kind: None,
    }
}

fn failed(category: Category, message: String) -> Verdict {
    Verdict::Failed {
        failure: Failure::new(category, message),
        kind: None,
    }
}

/// File an error from instantiation or the call under its category.
fn classify_error(error: &wasmtime::Error, state: &HostState, policy: &SandboxPolicy) -> Verdict {
    if error.downcast_ref::<DeadlineExceeded>().is_some() {
        return timed_out(policy);
    }
    if error
        .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
    {
        // The host's shortage, not the task's failure: a worker retries it
        // without using one of the job's attempts.
        let message = format!("no free instance slot on this worker: {error}");
        let _ = state.host_fault.set(message.clone());
        return Verdict::Retry {
            message,
            delay: Some(POOL_FULL_RETRY),
        };
    }
    if let Some(limit) = &state.limiter.limit_hit {
        return failed(
            Category::MemoryLimit,
            format!("{limit}; raise the task's memory limit or use less"),
        );
    }
    let tail = state.log.tail(3);
    let output = if tail.is_empty() {
        String::new()
    } else {
        format!(" (guest output: {tail})")
    };
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => failed(
            Category::FuelExhausted,
            format!("used all {} units of fuel; raise the task's fuel or do less per job", policy.fuel),
        ),
        Some(Trap::Interrupt) => timed_out(policy),
        Some(Trap::StackOverflow) => failed(Category::Trap, "wasm stack overflow (unbounded recursion?)".into()),
        // Rust and C guests keep their stack in linear memory; overflowing it
        // runs off the bottom of memory.
        Some(Trap::MemoryOutOfBounds) => failed(
            Category::Trap,
            format!("guest trapped: out of bounds memory access (a bad pointer, or unbounded recursion overflowing the guest's stack){output}"),
        ),
        Some(trap) => failed(Category::Trap, format!("guest trapped: {trap}{output}")),
        None => failed(Category::Trap, format!("guest failed: {error:#}{output}")),
    }
}

fn check_result(result: String, policy: &SandboxPolicy) -> Verdict {
    if result.len() > policy.max_result_bytes {
        return failed(
            Category::OutputTooLarge,
            format!(
                "result is {} bytes, over the cap of {} bytes; store large output elsewhere and return a reference",
                result.len(),
                policy.max_result_bytes
            ),
        );
    }
    if let Err(e) =
        crate::limits::check_json_depth("result", &result, crate::limits::MAX_JSON_DEPTH)
    {
        return failed(
            Category::TaskError,
            format!("task returned a result that cannot be stored: {e}"),
        );
    }
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&result) {
        return failed(
            Category::TaskError,
            format!("task returned a result that is not valid JSON: {e}"),
        );
    }
    Verdict::Succeeded { result }
}

fn from_task_error(error: TaskError) -> Verdict {
    match error {
        TaskError::Retry(r) => Verdict::Retry {
            message: r.message,
            delay: r.delay_ms.map(Duration::from_millis),
        },
        TaskError::Fail(message) => failed(Category::TaskError, message),
        TaskError::Kind(k) if k.kind == KIND_BAD_PAYLOAD => failed(Category::BadPayload, k.message),
        TaskError::Kind(k) if k.kind == KIND_DENIED => failed(Category::Denied, k.message),
        TaskError::Kind(k) => Verdict::Failed {
            failure: Failure::new(Category::TaskError, format!("{}: {}", k.kind, k.message)),
            kind: Some(k.kind),
        },
    }
}
