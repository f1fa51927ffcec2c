//! The scheduler: every worker process fires its tenants' due schedules,
//! so there is no beat process to run, to keep alive, or to run twice.
//!
//! Each round reads a tenant's due schedules on the Redis clock, plans
//! which ticks to fire ([`Schedule::plan`]: none early, missed ones per
//! the catch-up policy) and fires them one by one, each claimed by moving
//! the schedule's due score on from the value read. Several processes
//! race for the same tick; one enqueue wins and the others find the score
//! moved and stop. Between rounds it sleeps until the earliest next tick,
//! but never longer than [`MAX_SLEEP`], so a new or changed schedule is
//! seen within it.

use std::future::Future;
use std::time::Duration;

use crate::broker::{Broker, DueSchedules, LastFire, TickClaim};
use crate::failure::Failure;
use crate::schedule::Schedule;

/// The longest a scheduler sleeps between rounds: how soon it sees a
/// schedule added (the first tick of an `--every` schedule is a whole
/// period away, so it is never late for it).
pub const MAX_SLEEP: Duration = Duration::from_millis(500);

/// The shortest: a round that found work, or a tick due right now,
/// still leaves Redis a breath.
const MIN_SLEEP: Duration = Duration::from_millis(10);

/// After a Redis error, the next round waits this long.
const ERROR_SLEEP: Duration = Duration::from_secs(1);

/// Fires the due schedules of some tenants.
pub struct Scheduler {
    broker: Broker,
    tenants: Vec<String>,
}

impl Scheduler {
    /// A scheduler for `tenants` over `broker`.
    pub fn new(broker: Broker, tenants: Vec<String>) -> Self {
        Scheduler { broker, tenants }
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
        for (name, due_ms, schedule) in due {
            match schedule {
                Ok(schedule) => self.fire(tenant, &name, due_ms, now_ms, &schedule).await?,
                Err(e) => {
                    // Not fired and not moved on: a fixed definition
                    // (`schedule add` again) fires it.
                    tracing::warn!("schedule {name:?} of tenant {tenant:?} is unreadable: {e}");
                }
            }
        }
        if busy {
            return Ok(MIN_SLEEP);
        }
        Ok(next_ms.map_or(MAX_SLEEP, |t| {
            Duration::from_millis(t.saturating_sub(now_ms))
        }))
    }

    /// Fire the ticks the plan picks for one due schedule, each claimed
    /// from the due score the one before it left.
    async fn fire(
        &self,
        tenant: &str,
        name: &str,
        due_ms: u64,
        now_ms: u64,
        schedule: &Schedule,
    ) -> anyhow::Result<()> {
        let plan = schedule.plan(due_ms, now_ms);
        // Said by the worker that wins the first claim, not by every racer.
        let tell_dropped = || {
            if plan.dropped > 0 {
                tracing::info!(
                    "schedule {name:?} of tenant {tenant:?}: {} missed tick(s) not fired (catch-up {})",
                    plan.dropped,
                    schedule.catch_up.as_str()
                );
            }
        };
        let mut claimed = due_ms;
        for (i, &tick) in plan.fire.iter().enumerate() {
            let next = plan.fire.get(i + 1).copied().or(plan.next);
            let claim = TickClaim {
                schedule: name.to_string(),
                due_ms: claimed,
                next_ms: next,
                tick_ms: tick,
            };
            match self.broker.schedule_fire(tenant, schedule, &claim).await {
                Ok(Some(job)) => {
                    if i == 0 {
                        tell_dropped();
                    }
                    tracing::info!(
                        "schedule {name:?} of tenant {tenant:?} fired tick {tick}: job {}",
                        job.id
                    );
                }
                // Another worker fired this tick (and moved the score on).
                Ok(None) => return Ok(()),
                Err(e) => match e.downcast::<Failure>() {
                    // The job itself is refused (its payload over the cap of the task as redeployed, a quota):
                    // the tick is recorded as failed and the schedule moves
                    // on, rather than refiring the refusal every round.
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
                        let moved = self
                            .broker
                            .schedule_advance(tenant, name, claimed, next, Some(&last))
                            .await?;
                        if !moved {
                            return Ok(());
                        }
                    }
                    Err(e) => return Err(e),
                },
            }
            match next {
                Some(t) => claimed = t,
                None => return Ok(()),
            }
        }
        if plan.fire.is_empty() {
            // Every due tick was dropped: move on to the next one.
            if self
                .broker
                .schedule_advance(tenant, name, due_ms, plan.next, None)
                .await?
            {
                tell_dropped();
            }
        }
        Ok(())
    }
}
