//! `wasmq enqueue`, `wasmq result` and `wasmq status`: the producer's view.

use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::format;
use super::CliError;
use crate::broker::{Broker, EnqueueRequest, JobStatus, ResultState};
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
    /// The caller's W3C trace context (`00-<trace>-<span>-<flags>`; env
    /// `TRACEPARENT`, as tracing-aware CLIs pass it): the job's run joins
    /// that trace, and its HTTP requests carry it.
    #[arg(long, env = "TRACEPARENT")]
    pub traceparent: Option<String>,
    /// Store the result (overrides the task's policy).
    #[arg(long = "store-result", conflicts_with = "ignore_result")]
    pub store_result: bool,
    /// Do not store the result (overrides the task's policy).
    #[arg(long = "ignore-result")]
    pub ignore_result: bool,
    /// Priority 0-9 within the queue, higher first.
    #[arg(long, default_value_t = 0)]
    pub priority: u8,
    /// Concurrency key (one customer, one account): with the task's
    /// `max_per_key = N`, at most N jobs with this key run at once across
    /// all workers; the others wait in order. Refused for a task without
    /// `max_per_key`.
    #[arg(long)]
    pub key: Option<String>,
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
        traceparent: args.traceparent,
        key: args.key,
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
            // Not a failure: the job did what it was asked to.
            super::format::notice(&format!(
                "ignored: job {id} succeeded; its result was not stored"
            ));
            Ok(())
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

/// Print a job's status: for people (times as RFC 3339), or as JSON with
/// `--json` (times in ms and as RFC 3339).
pub async fn status(redis: &str, tenant: &str, id: &str, json: bool) -> Result<(), CliError> {
    let broker = Broker::connect(redis).await?;
    let Some(status) = broker.status(tenant, id).await? else {
        return Err(anyhow::anyhow!(
            "unknown job {id} in tenant {tenant:?} (or its record expired)"
        )
        .into());
    };
    if json {
        let value = serde_json::to_value(&status).map_err(anyhow::Error::from)?;
        println!("{}", format::with_rfc3339(value));
        return Ok(());
    }
    print!("{}", describe(&status));
    Ok(())
}

/// A job's status as lines for people.
fn describe(s: &JobStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let at = |ms: Option<u64>| ms.map_or_else(|| "-".to_string(), format::rfc3339);
    let _ = writeln!(
        out,
        "job        {} (task {})",
        s.id,
        s.task.as_deref().unwrap_or("?")
    );
    match (s.state.as_str(), s.due_at_ms) {
        ("scheduled", Some(due)) => {
            let _ = writeln!(out, "state      scheduled, due {}", format::rfc3339(due));
        }
        (state, _) => {
            let _ = writeln!(out, "state      {state}");
        }
    }
    let _ = writeln!(
        out,
        "attempts   {} ({} deliveries, {} lost to workers that died or froze, {} host retries)",
        s.attempts, s.deliveries, s.lost_deliveries, s.host_retries
    );
    if !s.lost_workers.is_empty() {
        let _ = writeln!(out, "lost on    {}", s.lost_workers.join(", "));
    }
    let _ = writeln!(out, "enqueued   {}", at(s.enqueued_at_ms));
    let _ = writeln!(out, "started    {}", at(s.started_at_ms));
    let _ = writeln!(out, "finished   {}", at(s.finished_at_ms));
    if let Some(error) = &s.last_error {
        let failure = serde_json::from_value::<Failure>(error.clone())
            .map_or_else(|_| error.to_string(), |f| f.to_string());
        let _ = writeln!(out, "last error {failure}");
    }
    if let Some(usage) = &s.usage {
        let n = |k: &str| usage[k].as_u64().unwrap_or(0);
        let _ = writeln!(
            out,
            "usage      fuel {}, peak memory {} bytes, wall {} us, run {} us, net out {} / in {} bytes, {} denied",
            n("fuel"),
            n("peak_memory_bytes"),
            n("wall_time_us"),
            n("run_time_us"),
            n("net_out_bytes"),
            n("net_in_bytes"),
            n("denied")
        );
        if n("db_time_us") > 0 || n("db_rows") > 0 {
            let _ = writeln!(
                out,
                "database   {} us, {} rows returned",
                n("db_time_us"),
                n("db_rows")
            );
        }
    }
    if let Some(flow) = &s.flow {
        let list = |ids: &[String]| match ids {
            [] => "-".to_string(),
            ids => ids.join(", "),
        };
        let _ = writeln!(
            out,
            "flow       {} ({} of {} steps ended{})",
            flow.flow_id,
            flow.settled,
            flow.steps,
            flow.started_by
                .as_deref()
                .map_or(String::new(), |p| format!("; started by job {p}"))
        );
        let _ = writeln!(out, "waits for  {}", list(&flow.waits_on));
        if s.state == "waiting" {
            let _ = writeln!(out, "still for  {}", list(&flow.still_waiting_on));
        }
        let _ = writeln!(out, "then       {}", list(&flow.dependents));
    }
    for flow in &s.flows_started {
        let _ = writeln!(out, "started    flow {flow}");
    }
    for denial in &s.denials {
        let _ = writeln!(out, "denied     {denial}");
    }
    if let Some(log) = &s.log {
        let _ = writeln!(out, "log (last run)");
        for line in log.lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    let _ = writeln!(out, "history");
    for event in &s.history {
        let when = event["at_ms"]
            .as_u64()
            .map_or_else(|| "?".into(), format::rfc3339);
        let name = event["event"].as_str().unwrap_or("?");
        let detail = match &event["detail"] {
            serde_json::Value::Null => String::new(),
            serde_json::Value::String(d) => format!("  {d}"),
            other => format!("  {other}"),
        };
        let _ = writeln!(out, "  {when}  {name}{detail}");
    }
    out
}

/// Failures from the broker keep their category.
pub fn into_cli(e: anyhow::Error) -> CliError {
    match e.downcast::<Failure>() {
        Ok(f) => CliError::Job(f),
        Err(e) => CliError::Other(e),
    }
}
