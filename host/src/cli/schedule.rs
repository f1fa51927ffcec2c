//! `wasmq schedule add|list|remove|pause|resume|run`: periodic jobs,
//! fired by the running workers (no beat process).

use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand};

use super::enqueue::into_cli;
use super::{format, CliError};
use crate::broker::{Broker, ScheduleView};
use crate::failure::{Category, Failure};
use crate::schedule::{CatchUp, Schedule, Timing};

/// Schedule commands.
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Create or replace a schedule: each tick enqueues one job of TASK.
    Add(AddArgs),
    /// Every schedule: timing, next tick, last tick and its job's state.
    List {
        /// One JSON object per line (times in ms and as RFC 3339).
        #[arg(long)]
        json: bool,
    },
    /// Remove a schedule (jobs it already enqueued stay).
    Remove {
        /// Schedule name.
        name: String,
    },
    /// Stop firing a schedule; ticks meanwhile are dropped.
    Pause {
        /// Schedule name.
        name: String,
    },
    /// Fire a paused schedule again, from its next tick after now.
    Resume {
        /// Schedule name.
        name: String,
    },
    /// Fire a schedule once now (its timing does not change); prints the
    /// job id.
    Run {
        /// Schedule name.
        name: String,
    },
}

/// `schedule add`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("timing").required(true).args(["cron", "every"])))]
pub struct AddArgs {
    /// Schedule name (unique in the tenant; `add` again replaces it).
    pub name: String,
    /// Deployed task each tick enqueues.
    pub task: String,
    /// JSON payload of each tick's job.
    #[arg(default_value = "{}")]
    pub payload: String,
    /// Cron expression: 5 fields (minute hour day-of-month month
    /// day-of-week), or 6 with seconds first; `@daily` and friends too.
    #[arg(long)]
    pub cron: Option<String>,
    /// Time zone of `--cron` (IANA name, e.g. `Europe/Paris`; default
    /// UTC). Ticks follow its DST changes.
    #[arg(long, requires = "cron")]
    pub tz: Option<String>,
    /// Tick every DUR (whole seconds, at least 1s), from now.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub every: Option<Duration>,
    /// Ticks that fell due while no worker ran: `skip` them, fire the
    /// latest `one`, or fire `all` (the latest 100).
    #[arg(long = "catch-up", value_enum, default_value_t = CatchUp::One)]
    pub catch_up: CatchUp,
    /// Create it paused (`schedule resume` starts it).
    #[arg(long)]
    pub paused: bool,
}

/// Run a schedule command.
pub async fn schedule(redis: &str, tenant: &str, command: ScheduleCommand) -> Result<(), CliError> {
    let broker = Broker::connect(redis).await?;
    match command {
        ScheduleCommand::Add(args) => add(&broker, tenant, args).await?,
        ScheduleCommand::List { json } => {
            let views = broker.schedule_list(tenant).await?;
            if views.is_empty() && !json {
                println!("none");
            }
            for view in views {
                if json {
                    println!("{}", format::with_rfc3339(view_json(&view)));
                } else {
                    println!("{}", view_line(&view));
                }
            }
        }
        ScheduleCommand::Remove { name } => {
            if !broker.schedule_remove(tenant, &name).await? {
                return Err(no_such(tenant, &name));
            }
            println!("removed schedule {name}");
        }
        ScheduleCommand::Pause { name } => {
            if !broker.schedule_pause(tenant, &name, true).await? {
                return Err(no_such(tenant, &name));
            }
            println!("paused schedule {name}");
        }
        ScheduleCommand::Resume { name } => {
            if !broker.schedule_pause(tenant, &name, false).await? {
                return Err(no_such(tenant, &name));
            }
            println!("resumed schedule {name}");
        }
        ScheduleCommand::Run { name } => {
            let job = broker
                .schedule_run_now(tenant, &name)
                .await
                .map_err(into_cli)?;
            println!("{}", job.id);
        }
    }
    Ok(())
}

async fn add(broker: &Broker, tenant: &str, args: AddArgs) -> Result<(), CliError> {
    let payload: serde_json::Value = serde_json::from_str(&args.payload).map_err(|e| {
        Failure::new(
            Category::BadPayload,
            format!("payload is not valid JSON: {e}"),
        )
    })?;
    let timing = match (&args.cron, args.every) {
        (Some(expr), _) => Timing::cron(expr, args.tz.as_deref()),
        (None, Some(every)) => Timing::every(every, 0),
        (None, None) => Err("give --cron EXPR or --every DUR".to_string()),
    }
    .map_err(anyhow::Error::msg)?;
    let schedule = Schedule {
        task: args.task,
        payload,
        timing,
        catch_up: args.catch_up,
        paused: args.paused,
    };
    let description = schedule.timing.describe();
    let next = broker
        .schedule_put(tenant, &args.name, schedule)
        .await
        .map_err(into_cli)?;
    match next {
        Some(t) => println!(
            "schedule {}: {description}, next tick {}",
            args.name,
            format::rfc3339(t)
        ),
        None => println!("schedule {}: {description}, paused", args.name),
    }
    Ok(())
}

fn no_such(tenant: &str, name: &str) -> CliError {
    anyhow::anyhow!("no schedule {name:?} in tenant {tenant:?}").into()
}

/// One line of `schedule list`.
fn view_line(view: &ScheduleView) -> String {
    let s = match &view.schedule {
        Ok(s) => s,
        Err(e) => return format!("{}  cannot be read, not fired: {e}", view.name),
    };
    let next = match (s.paused, view.next_ms) {
        (true, _) => "paused".to_string(),
        (false, Some(t)) => format!("next {}", format::rfc3339(t)),
        (false, None) => "no more ticks".to_string(),
    };
    let last = match &view.last {
        None => "never fired".to_string(),
        Some(last) => match (&last.job, &last.error) {
            (Some(job), _) => format!(
                "last {} job {job} ({})",
                format::rfc3339(last.tick_ms),
                view.last_job_state.as_deref().unwrap_or("?")
            ),
            (None, error) => format!(
                "last {} not enqueued: {}",
                format::rfc3339(last.tick_ms),
                error.as_deref().unwrap_or("?")
            ),
        },
    };
    format!(
        "{}  task {}  {}  catch-up {}  {next}  {last}",
        view.name,
        s.task,
        s.timing.describe(),
        s.catch_up.as_str()
    )
}

/// One JSON object of `schedule list --json`.
fn view_json(view: &ScheduleView) -> serde_json::Value {
    let s = match &view.schedule {
        Ok(s) => s,
        Err(e) => return serde_json::json!({"name": view.name, "error": e}),
    };
    let mut line = serde_json::json!({
        "name": view.name,
        "task": s.task,
        "payload": s.payload,
        "timing": s.timing,
        "catch_up": s.catch_up,
        "paused": s.paused,
        "next_at_ms": view.next_ms,
    });
    if let Some(last) = &view.last {
        line["last"] = serde_json::json!({
            "tick_at_ms": last.tick_ms,
            "fired_at_ms": last.fired_at_ms,
            "job": last.job,
            "job_state": view.last_job_state,
            "error": last.error,
        });
    }
    line
}
