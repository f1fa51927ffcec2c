//! wasmq: a background-job host that runs every job in a fresh, sandboxed
//! WebAssembly component instance.
//!
//! The crate is laid out one module per concern:
//! - [`engine`]: the one wasmtime `Engine` per process and its epoch ticker.
//! - [`component`]: loading, validating and caching compiled task components.
//! - [`sandbox`]: one job's run in a fresh instance, with limits and capabilities.
//! - [`backend`]: the host-side state behind the guest's host interfaces
//!   (key-value, counters, locks, step markers, child jobs).
//! - [`policy`]: the limits and grants a job runs under.
//! - [`dir_caps`]: opening a directory grant beneath its tenant's cap.
//! - [`failure`]: the failure categories users see.
//! - [`schedule`]: periodic jobs: timings, ticks and catch-up plans.
//! - [`keys`]: every Redis key name, built in one place.
//! - [`secrets`]: secret names, and sealing their values at rest.
//! - [`limits`]: every bound on what crosses into the host, in one table.
//! - [`addresses`]: which network addresses are public.
//! - [`fence`]: whether a delivery still holds its job's lease.
//! - [`usage`]: what a run cost.
//! - [`broker`]: jobs in Redis: enqueue, fetch with leases, outcomes,
//!   deploys, status, the dead-letter queue.
//! - [`worker`]: one pool's parts: fetch, lease, processor, recorder,
//!   catalog, manager.
//! - [`launcher`]: a worker process's pools, runtimes and shutdown
//!   (`run(config, shutdown)`).
//! - [`telemetry`]: logs and OpenTelemetry spans (OTLP export).
//! - [`trace_context`]: W3C `traceparent` values and the spans they join.
//! - [`tls`]: the process's TLS client configuration.
//! - [`web`]: the web dashboard (`wasmq web`), over the broker.
//! - [`cli`]: the `wasmq` command line.

pub mod addresses;
pub mod backend;
pub mod broker;
pub mod cli;
pub mod component;
pub mod dir_caps;
pub mod engine;
pub mod failure;
pub mod fence;
pub mod flow;
pub mod gates;
pub mod keys;
pub mod launcher;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod pools;
pub mod retry;
pub mod sandbox;
pub mod schedule;
pub mod secrets;
pub mod telemetry;
pub mod tenants;
pub mod tls;
pub mod trace_context;
pub mod ttl_cache;
pub mod usage;
pub mod web;
pub mod worker;
