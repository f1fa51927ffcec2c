//! A worker pool: pulls jobs from Redis and runs each in a fresh sandbox.
//!
//! One file per concern, in the order of a job's life:
//! - [`fetch`]: how jobs come out of Redis: batches no larger than the free
//!   slots, rotating over every (tenant, queue) pair, per-tenant caps, and
//!   the idle wait for a producer's wake-up;
//! - [`lease`]: the jobs this pool holds, and the renewal that keeps their
//!   leases alive while they run (a dead worker's jobs come back when their
//!   leases lapse);
//! - [`processor`]: one job's life: envelope, catalog lookup, sandbox run,
//!   verdict, and the outcome to record;
//! - [`recorder`]: outcomes recorded in batches, each exactly once;
//! - [`catalog`]: what a job needs that is read from Redis rarely: deployed
//!   tasks, tenant records, compiled components;
//! - [`manager`]: the pool's loop: slots, dispatching fetched jobs to
//!   processors, and drain on shutdown;
//! - [`presence`]: the process's heartbeat, and the control list through
//!   which an operator's cancel reaches the pool running the job;
//! - [`exporter`]: `GET /metrics` for the process's pools;
//! - [`scheduler`]: the process's firing of its tenants' due schedules
//!   (every worker fires them; there is no beat process).
//!
//! The launcher ([`crate::launcher`]) builds pools from flags and runs
//! them; nothing here reads flags or signals.

mod catalog;
pub mod exporter;
mod fetch;
mod lease;
mod manager;
mod presence;
mod processor;
mod recorder;
mod scheduler;

pub use catalog::Catalog;
pub use lease::DEFAULT_LEASE;
pub use manager::{Worker, WorkerConfig, WorkerStats};
pub use presence::{Identity, Presence, HEARTBEAT_EVERY, HEARTBEAT_TTL};
pub use processor::{HostRetries, MAX_HOST_RETRIES};
pub use scheduler::Scheduler;
