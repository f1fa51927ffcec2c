//! `wasmq enqueue`, `wasmq result` and `wasmq status`: the producer's view.

use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::CliError;
use crate::broker::{Broker, EnqueueRequest, ResultState};
use crate::failure::{Category, Failure};

/// Flags of `wasmq enqueue`.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// Deployed task name.
    pub name: String,
    /// JSON payload.
    #[arg(default_value = "{}")]
    pub payload: String,
    /// Do not start before this long from now, e.g. `90s`.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "eta")]
    pub countdown: Option<Duration>,
    /// Do not start before this time (RFC 3339).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    pub eta: Option<std::time::SystemTime>,
    /// Deduplicate: while a job with this key has succeeded (or is pending),
    /// enqueueing again returns that job.
    #[arg(long = "idempotency-key")]
    pub idempotency_key: Option<String>,
    /// Store the result (overrides the task's policy).
    #[arg(long = "store-result", conflicts_with = "ignore_result")]
    pub store_result: bool,
    /// Do not store the result (overrides the task's policy).
    #[arg(long = "ignore-result")]
    pub ignore_result: bool,
    /// Priority 0-9 within the queue, higher first.
    #[arg(long, default_value_t = 0)]
    pub priority: u8,
    /// Wait up to this long for the result and print it.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub wait: Option<Duration>,
}

/// Flags of `wasmq result`.
#[derive(Debug, Args)]
pub struct ResultArgs {
    /// Job id.
    pub id: String,
    /// Wait up to this long for the job to finish.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub wait: Option<Duration>,
}

/// Enqueue and print the job id (and with `--wait`, the result).
pub async fn enqueue(redis: &str, tenant: &str, args: EnqueueArgs) -> Result<(), CliError> {
    let payload: serde_json::Value = serde_json::from_str(&args.payload).map_err(|e| {
        Failure::new(
            Category::BadPayload,
            format!("payload is not valid JSON: {e}"),
        )
    })?;
    let not_before_ms = args
        .eta
        .map(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .context("--eta is before 1970")
        })
        .transpose()?;
    let store_result = if args.store_result || args.wait.is_some() {
        Some(true)
    } else if args.ignore_result {
        Some(false)
    } else {
        None
    };
    let broker = Broker::connect(redis).await?;
    let request = EnqueueRequest {
        tenant: tenant.to_string(),
        task: args.name,
        payload,
        countdown: args.countdown,
        not_before_ms,
        idempotency_key: args.idempotency_key,
        store_result,
        priority: args.priority,
        max_attempts: None,
    };
    let enqueued = broker.enqueue(request).await.map_err(into_cli)?;
    match args.wait {
        None => {
            println!("{}", enqueued.id);
            Ok(())
        }
        Some(wait) => print_result(&broker, tenant, &enqueued.id, Some(wait)).await,
    }
}

/// Print a job's result or where it stands.
pub async fn result(redis: &str, tenant: &str, args: ResultArgs) -> Result<(), CliError> {
    let broker = Broker::connect(redis).await?;
    print_result(&broker, tenant, &args.id, args.wait).await
}

async fn print_result(
    broker: &Broker,
    tenant: &str,
    id: &str,
    wait: Option<Duration>,
) -> Result<(), CliError> {
    match broker.result(tenant, id, wait).await? {
        ResultState::Ready(value) => {
            println!("{value}");
            Ok(())
        }
        ResultState::Failed(failure) => Err(CliError::Job(failure)),
        ResultState::Pending => Err(anyhow::anyhow!("pending: job {id} has not finished").into()),
        ResultState::Ignored => {
            Err(anyhow::anyhow!("ignored: job {id} succeeded but its result was not stored").into())
        }
        ResultState::Expired => Err(anyhow::anyhow!(
            "expired: job {id} succeeded but its stored result has expired"
        )
        .into()),
        ResultState::Unknown => Err(anyhow::anyhow!(
            "unknown job {id} in tenant {tenant:?} (or its record expired)"
        )
        .into()),
    }
}

/// Print a job's status as JSON.
pub async fn status(redis: &str, tenant: &str, id: &str) -> Result<(), CliError> {
    let broker = Broker::connect(redis).await?;
    match broker.status(tenant, id).await? {
        Some(status) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&status).map_err(anyhow::Error::from)?
            );
            Ok(())
        }
        None => Err(anyhow::anyhow!(
            "unknown job {id} in tenant {tenant:?} (or its record expired)"
        )
        .into()),
    }
}

/// Failures from the broker keep their category.
pub fn into_cli(e: anyhow::Error) -> CliError {
    match e.downcast::<Failure>() {
        Ok(f) => CliError::Job(f),
        Err(e) => CliError::Other(e),
    }
}
