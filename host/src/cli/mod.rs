//! The `wasmq` command line: flag definitions (each documented where it is
//! defined) and dispatch. Commands live one per file.
//!
//! Exit codes: 0 on success; 1 with one stderr line `error: CATEGORY: cause`
//! when a job or component fails (SPEC.md failure categories); 2 for usage
//! and operational errors (bad flags, unreadable files, Redis unreachable).

mod bench;
mod bench_redis;
mod build;
mod dead;
mod deploy;
mod engine_limits;
mod enqueue;
mod flow;
mod format;
mod operate;
mod py_sdk_files;
mod run;
mod schedule;
mod secret;
mod tenant;
mod web;
mod worker;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::failure::Failure;

/// A serverless-style task host: WebAssembly tasks, Redis queues.
#[derive(Debug, Parser)]
#[command(name = "wasmq", version, about)]
pub struct Cli {
    /// Redis URL of the broker.
    #[arg(
        long,
        global = true,
        env = "WASMQ_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis: String,
    /// Tenant whose tasks, queues and state the command works on.
    #[arg(long, global = true, env = "WASMQ_TENANT", default_value = "default")]
    pub tenant: String,
    /// How logs (and a failed command's error line) are written to
    /// stderr: `text` for people, `json` (one object per line) for
    /// machines.
    #[arg(long = "log-format", global = true, env = "WASMQ_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one job locally in the sandbox, without Redis (embedded mode), and
    /// print its result JSON.
    Run(run::RunArgs),
    /// Build a Python task (`@task` from the `wasmq` SDK) into a component
    /// with componentize-py, bundling its pure-Python requirements.
    Build(build::BuildArgs),
    /// Validate a component and deploy it under a name with its policy.
    Deploy(deploy::DeployArgs),
    /// List deployed tasks.
    Tasks,
    /// Enqueue a job; prints its id (with --wait, its result).
    Enqueue(enqueue::EnqueueArgs),
    /// A job's stored result, or where it stands.
    Result(enqueue::ResultArgs),
    /// Start a workflow (chain, group, chord) from a JSON file; prints its
    /// id and its jobs (with --wait, its result).
    Flow(flow::FlowArgs),
    /// A job's state, attempts, errors, timings and usage.
    Status {
        /// Job id.
        id: String,
        /// Print JSON (times in ms, and as RFC 3339).
        #[arg(long)]
        json: bool,
    },
    /// Run a worker until SIGTERM (drains) or a second signal (stops now).
    Worker(worker::WorkerArgs),
    /// The dead-letter queue.
    #[command(subcommand)]
    Dead(dead::DeadCommand),
    /// Measure fresh-instance-per-job cost and throughput.
    Bench(bench::BenchArgs),
    /// Tenants: the Redis ACL user that confines a tenant's producers.
    #[command(subcommand)]
    Tenant(tenant::TenantCommand),
    /// Every queue of the tenant: ready, delayed, running, dead, paused,
    /// age of the oldest ready job, runs succeeded and failed lately.
    Queues {
        /// Print JSON (times in ms, and as RFC 3339).
        #[arg(long)]
        json: bool,
    },
    /// Live workers (from their heartbeats) serving the tenant.
    Workers {
        /// Every live worker, whatever tenants it serves.
        #[arg(long)]
        all: bool,
        /// Print JSON (times in ms, and as RFC 3339).
        #[arg(long)]
        json: bool,
    },
    /// Jobs by state, newest first.
    Jobs(operate::JobsArgs),
    /// Cancel a job: a queued or delayed job never runs; a running one is
    /// stopped. It ends `cancelled` and result waiters wake.
    Cancel {
        /// Job id.
        id: String,
    },
    /// Pause or resume a queue.
    #[command(subcommand)]
    Queue(operate::QueueCommand),
    /// Periodic jobs: `schedule add|list|remove|pause|resume|run`. Every
    /// running worker fires them; there is no beat process.
    #[command(subcommand)]
    Schedule(schedule::ScheduleCommand),
    /// Secrets of the tenant or one task: `secret set|list|remove|keygen`
    /// (values from stdin or a file, sealed; never printed).
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// The web dashboard (`--listen ADDR`), or its tenant tokens
    /// (`web token create|list|revoke`).
    Web(web::WebArgs),
}

/// Why a command failed.
#[derive(Debug)]
pub enum CliError {
    /// A job or component failed: reported with its category.
    Job(Failure),
    /// Anything else: bad input, I/O, Redis.
    Other(anyhow::Error),
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError::Other(e)
    }
}

impl From<Failure> for CliError {
    fn from(f: Failure) -> Self {
        CliError::Job(f)
    }
}

/// Run the parsed command line; the process exit code.
pub async fn main(cli: Cli) -> ExitCode {
    // Every tenant-scoped command names keys with it: refuse a name that
    // could break out of its hash tag before anything touches Redis.
    if let Err(e) = crate::keys::valid_tenant(&cli.tenant) {
        eprintln!("error: --tenant: {e}");
        return ExitCode::from(2);
    }
    let json_errors = cli.log_format == LogFormat::Json;
    format::set_json_stderr(json_errors);
    let result = match cli.command {
        Command::Run(args) => run::run(&cli.tenant, args).await,
        Command::Build(args) => build::build(args).await,
        Command::Deploy(args) => deploy::deploy(&cli.redis, &cli.tenant, args).await,
        Command::Tasks => deploy::tasks(&cli.redis, &cli.tenant).await,
        Command::Enqueue(args) => enqueue::enqueue(&cli.redis, &cli.tenant, args).await,
        Command::Flow(args) => flow::flow(&cli.redis, &cli.tenant, args).await,
        Command::Result(args) => enqueue::result(&cli.redis, &cli.tenant, args).await,
        Command::Status { id, json } => enqueue::status(&cli.redis, &cli.tenant, &id, json).await,
        Command::Worker(args) => worker::worker(&cli.redis, &cli.tenant, args).await,
        Command::Dead(command) => dead::dead(&cli.redis, &cli.tenant, command).await,
        Command::Bench(args) => bench::bench(&cli.redis, args).await,
        Command::Tenant(command) => tenant::tenant(&cli.redis, command).await,
        Command::Queues { json } => operate::queues(&cli.redis, &cli.tenant, json).await,
        Command::Workers { all, json } => {
            operate::workers(&cli.redis, &cli.tenant, all, json).await
        }
        Command::Jobs(args) => operate::jobs(&cli.redis, &cli.tenant, args).await,
        Command::Cancel { id } => operate::cancel(&cli.redis, &cli.tenant, &id).await,
        Command::Queue(command) => operate::queue(&cli.redis, &cli.tenant, command).await,
        Command::Schedule(command) => schedule::schedule(&cli.redis, &cli.tenant, command).await,
        Command::Web(args) => web::web(&cli.redis, &cli.tenant, args).await,
        Command::Secret(command) => secret::secret(&cli.redis, &cli.tenant, command).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Job(failure)) => {
            if json_errors {
                let line = serde_json::json!({"level": "ERROR", "category": failure.category.as_str(), "message": failure.message});
                eprintln!("{line}");
            } else {
                // One line, whatever the message holds.
                eprintln!("error: {}", failure.to_string().replace('\n', " "));
            }
            ExitCode::from(1)
        }
        Err(CliError::Other(e)) => {
            if json_errors {
                let line =
                    serde_json::json!({"level": "ERROR", "message": format::error_chain(&e)});
                eprintln!("{line}");
            } else {
                eprintln!("error: {}", format::error_chain(&e));
            }
            ExitCode::from(2)
        }
    }
}
