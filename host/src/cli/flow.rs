//! `wasmq flow`: start a workflow from a JSON file (chain, group, chord)
//! and, with `--wait`, print its result.

use std::io::Read;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::enqueue::into_cli;
use super::CliError;
use crate::broker::{Broker, FlowState};

/// Flags of `wasmq flow`.
#[derive(Debug, Args)]
pub struct FlowArgs {
    /// The flow definition (`-` for stdin): a step is `{"task": NAME,
    /// "payload": JSON}`; nodes combine as `{"chain": [...]}`, `{"group":
    /// [...]}` and `{"chord": {"group": [...], "then": NODE}}`; any node may
    /// add `"on_failure": "continue"`.
    #[arg(required_unless_present = "id", conflicts_with = "id")]
    pub file: Option<String>,
    /// Instead of starting one, look at the flow with this id.
    #[arg(long)]
    pub id: Option<String>,
    /// Wait up to this long for the flow to end and print its result (the
    /// last node's; a group's as a list).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub wait: Option<Duration>,
    /// The caller's W3C trace context: the flow's jobs join that trace.
    #[arg(long, env = "TRACEPARENT")]
    pub traceparent: Option<String>,
}

/// Start (or look at) a flow. Without `--wait`, prints the flow id, then
/// one line per step: its job id and task.
pub async fn flow(redis: &str, tenant: &str, args: FlowArgs) -> Result<(), CliError> {
    let broker = Broker::connect(redis).await?;
    let id = match (&args.file, &args.id) {
        (_, Some(id)) => id.clone(),
        (Some(file), None) => {
            let definition = read(file)?;
            let started = broker
                .start_flow(tenant, &definition, args.traceparent.clone())
                .await
                .map_err(into_cli)?;
            if args.wait.is_none() {
                println!("{}", started.flow_id);
                for job in &started.job_ids {
                    println!("{job}");
                }
                return Ok(());
            }
            started.flow_id
        }
        (None, None) => unreachable!("clap requires a file or --id"),
    };
    match broker.flow_state(tenant, &id, args.wait).await? {
        FlowState::Finished(Ok(value)) => {
            println!("{value}");
            Ok(())
        }
        FlowState::Finished(Err(failure)) => Err(CliError::Job(failure)),
        FlowState::Running => {
            Err(anyhow::anyhow!("pending: flow {id} has steps still to run").into())
        }
        FlowState::Unknown => Err(anyhow::anyhow!(
            "unknown flow {id} in tenant {tenant:?} (or its record expired)"
        )
        .into()),
    }
}

fn read(file: &str) -> anyhow::Result<String> {
    if file == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the flow definition from stdin")?;
        return Ok(text);
    }
    std::fs::read_to_string(file).with_context(|| format!("reading the flow definition {file:?}"))
}
