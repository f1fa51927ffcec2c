//! The scheduler: every worker process fires its tenants' due schedules,
//! so there is no beat process to run, to keep alive, or to run twice.
//!
//! Each round reads a tenant's due schedules on the Redis clock, plans
//! which ticks to fire ([`Schedule::plan`]: none early, missed ones per
//! the catch-up policy) and fires them one by one, each claimed by moving
//! the schedule's due score on from the value read (and only while its
//! definition is the one read). Several processes race for the same tick;
//! one enqueue wins and the others find the score moved and stop. Between
//! rounds it sleeps until the earliest next tick, but never longer than
//! [`MAX_SLEEP`], so a new or changed schedule is seen within it.

use std::future::Future;
use std::time::Duration;

use crate::broker::{Broker, DueSchedule, DueSchedules, LastFire, TickClaim};
use crate::failure::Failure;
use crate::schedule::Plan;

/// The longest a scheduler sleeps between rounds: how soon it sees a
/// schedule added (the first tick of an `--every` schedule is a whole
/// period away, so it is never late for it).
pub const MAX_SLEEP: Duration = Duration::from_millis(500);

/// The shortest: a round that found work, or a tick due right now,
/// still leaves Redis a breath.
const MIN_SLEEP: Duration = Duration::from_millis(10);

/// After a Redis error, the next round waits this long.
const ERROR_SLEEP: Duration = Duration::from_secs(1);

/// How long a schedule whose definition cannot be read is set aside
/// before it is looked at again (and logged again), unless it is fixed.
const UNREADABLE_PARK: Duration = Duration::from_secs(60);

/// Fires the due schedules of some tenants.
#[derive(Clone)]
pub struct Scheduler {
    broker: Broker,
    tenants: Vec<String>,
}

impl Scheduler {
    /// A scheduler for `tenants` over `broker`.
    pub fn new(broker: Broker, tenants: Vec<String>) -> Self {
        Scheduler { broker, tenants }
    }

    /// [`Scheduler::run`] until the future `shutdown()` makes resolves,
    /// started again (after a pause) should it ever panic: a worker that
    /// looks healthy must not have silently stopped firing.
    pub async fn run_supervised<F>(self, shutdown: impl Fn() -> F + Send + 'static)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        loop {
            let run = tokio::spawn(self.clone().run(shutdown()));
            match run.await {
                Ok(()) => return,
                Err(e) => {
                    tracing::error!("the scheduler stopped ({e}); starting it again");
                    tokio::time::sleep(ERROR_SLEEP).await;
                }
            }
        }
    }

    /// Fire due schedules until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let mut sleep = MAX_SLEEP;
            for tenant in &self.tenants {
                match self.round(tenant).await {
                    Ok(until_next) => sleep = sleep.min(until_next),
                    Err(e) => {
                        tracing::warn!("schedules of tenant {tenant:?}: {e:#}");
                        sleep = ERROR_SLEEP;
                    }
                }
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(sleep.max(MIN_SLEEP)) => {}
            }
        }
    }

    /// One tenant's round: fire what is due; how long until its next tick.
    async fn round(&self, tenant: &str) -> anyhow::Result<Duration> {
        let DueSchedules {
            now_ms,
            due,
            next_ms,
        } = self.broker.schedules_due(tenant).await?;
        let busy = !due.is_empty();
        for entry in due {
            self.fire(tenant, entry, now_ms).await?;
        }
        if busy {
            // Fired (or set aside) what was due: look again soon, for ticks
            // that fell due meanwhile.
            return Ok(MIN_SLEEP);
        }
        Ok(next_ms.map_or(MAX_SLEEP, |t| {
            Duration::from_millis(t.saturating_sub(now_ms))
        }))
    }

    /// Fire the ticks the plan picks for one due schedule, each claimed
    /// from the due score the one before it left.
    async fn fire(&self, tenant: &str, entry: DueSchedule, now_ms: u64) -> anyhow::Result<()> {
        let DueSchedule {
            name,
            due_ms,
            definition,
            schedule,
        } = entry;
        // Planning a long catch-up walks up to a thousand cron ticks: off
        // the runtime's threads.
        let planned = match schedule {
            Ok(schedule) => tokio::task::spawn_blocking(move || {
                let plan = schedule.plan(due_ms, now_ms);
                (schedule, plan)
            })
            .await
            .map(|(schedule, plan)| plan.map(|plan| (schedule, plan)))?,
            Err(e) => Err(e),
        };
        let mut claim = TickClaim {
            schedule: name.clone(),
            due_ms,
            next_ms: None,
            tick_ms: due_ms,
            definition,
        };
        let (schedule, plan) = match planned {
            Ok(planned) => planned,
            Err(e) => {
                // Set aside, not dropped: fixed (`schedule add` again), it
                // fires from its next tick.
                claim.next_ms = Some(now_ms + UNREADABLE_PARK.as_millis() as u64);
                let last = LastFire {
                    tick_ms: due_ms,
                    job: None,
                    fired_at_ms: now_ms,
                    error: Some(format!("not fired: {e}")),
                };
                if self
                    .broker
                    .schedule_advance(tenant, &claim, Some(&last))
                    .await?
                {
                    tracing::warn!(
                        "schedule {name:?} of tenant {tenant:?} is not fired: {e}; looked at again in {}",
                        humantime::format_duration(UNREADABLE_PARK)
                    );
                }
                return Ok(());
            }
        };
        let Plan {
            fire,
            next,
            dropped,
        } = plan;
        // Said by the worker that wins the first claim, not by every racer;
        // a warning, so the default log level (`WASMQ_LOG` unset) shows it:
        // ticks that never ran are what an operator looks for after an
        // outage.
        let tell_dropped = || {
            if dropped > 0 {
                tracing::warn!(
                    "schedule {name:?} of tenant {tenant:?}: {dropped} missed tick(s) not fired (catch-up {})",
                    schedule.catch_up.as_str()
                );
            }
        };
        if fire.is_empty() {
            // Every due tick was dropped: move on to the next one.
            claim.next_ms = next;
            if self.broker.schedule_advance(tenant, &claim, None).await? {
                tell_dropped();
            }
            return Ok(());
        }
        for (i, &tick) in fire.iter().enumerate() {
            claim.tick_ms = tick;
            claim.next_ms = fire.get(i + 1).copied().or(next);
            match self.broker.schedule_fire(tenant, &schedule, &claim).await {
                Ok(Some(job)) => {
                    if i == 0 {
                        tell_dropped();
                    }
                    tracing::info!(
                        "schedule {name:?} of tenant {tenant:?} fired tick {tick}: job {}",
                        job.id
                    );
                }
                // Another worker fired this tick (and moved the score on),
                // or the schedule changed.
                Ok(None) => return Ok(()),
                Err(e) => match e.downcast::<Failure>() {
                    // The job itself is refused (its payload over the cap of
                    // the task as redeployed, a quota): the tick is recorded
                    // as failed and the schedule moves on, rather than
                    // refiring the refusal every round.
                    Ok(failure) => {
                        tracing::warn!(
                            "schedule {name:?} of tenant {tenant:?}: tick {tick} not enqueued: {failure}"
                        );
                        let last = LastFire {
                            tick_ms: tick,
                            job: None,
                            fired_at_ms: now_ms,
                            error: Some(failure.to_string()),
                        };
                        if !self
                            .broker
                            .schedule_advance(tenant, &claim, Some(&last))
                            .await?
                        {
                            return Ok(());
                        }
                    }
                    Err(e) => return Err(e),
                },
            }
            match claim.next_ms {
                Some(t) => claim.due_ms = t,
                None => return Ok(()),
            }
        }
        Ok(())
    }
}
