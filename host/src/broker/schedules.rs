//! Schedules in Redis (`wasmq schedule ...`): a tenant's definitions, the
//! due time of each, the last fire of each, and firing a tick.
//!
//! Three keys under the tenant's hash tag (see [`crate::keys::Keys`]):
//! `schedules` (name → definition), `schedules-due` (name → next tick, on
//! the Redis clock; absent while paused) and `schedule-runs` (name → last
//! fire). A tick is fired by the enqueue script itself, guarded by the due
//! score the firing worker read: the job is enqueued and the score moves
//! on in one atomic step, or nothing happens because another worker did
//! it first. The tick's idempotency key (`schedule:NAME:TICK`) is a second
//! guard, and names the tick in the job's record. When to tick and which
//! missed ticks to fire is [`crate::schedule`]'s; the loop that fires is
//! the worker's scheduler.

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::producer::Origin;
use super::{scripts, Broker, EnqueueRequest, Enqueued};
use crate::failure::{Category, Failure};
use crate::keys::{valid_tenant, Keys};
use crate::schedule::{check_name, run_key, tick_key, Schedule, Timing};

/// The most due schedules one scheduler round fires per tenant (the rest
/// wait for the next round, a moment later).
pub const DUE_PER_ROUND: usize = 100;

/// A tick being fired: the schedule, the due score the firing worker
/// read, where the score goes next, and the tick.
#[derive(Debug, Clone)]
pub struct TickClaim {
    /// Schedule name.
    pub schedule: String,
    /// The due score read (the claim holds only if it still reads so).
    pub due_ms: u64,
    /// The next due score (`None`: the schedule has no more ticks).
    pub next_ms: Option<u64>,
    /// The tick fired.
    pub tick_ms: u64,
    /// The definition read (the claim holds only if it still reads so: a
    /// replaced schedule never fires its old definition).
    pub definition: String,
}

/// A schedule's last fire, as `schedule-runs` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastFire {
    /// The tick (ms).
    pub tick_ms: u64,
    /// The job it enqueued (absent when it could not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// When it fired (ms, Redis clock).
    #[serde(default)]
    pub fired_at_ms: u64,
    /// Why the tick enqueued no job (its payload over the task's cap, a quota).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One schedule as `schedule list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScheduleView {
    /// Name.
    pub name: String,
    /// Its definition (`Err`: why it cannot be read; it is not fired).
    pub schedule: Result<Schedule, String>,
    /// Its next tick (ms); `None` while paused or when it has no more.
    pub next_ms: Option<u64>,
    /// Its last fire.
    pub last: Option<LastFire>,
    /// The state of the last fire's job (`queued`, `succeeded`, ...;
    /// `expired` when its record is gone).
    pub last_job_state: Option<String>,
}

/// What a scheduler round found for one tenant.
#[derive(Debug, Clone)]
pub struct DueSchedules {
    /// The Redis clock when it looked (ms).
    pub now_ms: u64,
    /// Due schedules.
    pub due: Vec<DueSchedule>,
    /// The earliest tick after now.
    pub next_ms: Option<u64>,
}

/// One due schedule.
#[derive(Debug, Clone)]
pub struct DueSchedule {
    /// Its name.
    pub name: String,
    /// Its due score (ms).
    pub due_ms: u64,
    /// Its definition as stored (claims compare it).
    pub definition: String,
    /// The definition read (`Err`: why it cannot be).
    pub schedule: Result<Schedule, String>,
}

/// A stored definition, read and checked: it parses, and its timing can
/// compute ticks.
pub fn read_definition(text: &str) -> Result<Schedule, String> {
    let schedule: Schedule =
        serde_json::from_str(text).map_err(|e| format!("unreadable definition: {e}"))?;
    schedule.timing.ticker()?;
    Ok(schedule)
}

impl Broker {
    /// The Redis server's clock (ms): the clock every due time is read on.
    pub async fn redis_now_ms(&self) -> anyhow::Result<u64> {
        let (secs, micros): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut self.connection())
            .await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Create or replace a schedule; its next tick (`None` while paused).
    /// The task must be deployed. An `--every` schedule's ticks are anchored
    /// now (Redis clock); replacing one keeps its last-fire record.
    pub async fn schedule_put(
        &self,
        tenant: &str,
        name: &str,
        mut schedule: Schedule,
    ) -> anyhow::Result<Option<u64>> {
        valid_tenant(tenant).map_err(anyhow::Error::msg)?;
        check_name(name).map_err(anyhow::Error::msg)?;
        if self.task(tenant, &schedule.task).await?.is_none() {
            return Err(Failure::new(
                Category::UnknownTask,
                format!(
                    "no task {:?} is deployed in tenant {tenant:?}",
                    schedule.task
                ),
            )
            .into());
        }
        let now = self.redis_now_ms().await?;
        if let Timing::Every { anchor_ms, .. } = &mut schedule.timing {
            *anchor_ms = now;
        }
        let next = if schedule.paused {
            None
        } else {
            Some(next_tick(&schedule.timing, now, name)?)
        };
        self.store(tenant, name, "", &schedule, next).await?;
        Ok(next)
    }

    /// Write a definition and its due score (removed when `next` is none),
    /// if the stored definition still reads `expected` ('' = whatever is
    /// there); false if it did not.
    async fn store(
        &self,
        tenant: &str,
        name: &str,
        expected: &str,
        schedule: &Schedule,
        next: Option<u64>,
    ) -> anyhow::Result<bool> {
        let keys = Keys::new(tenant);
        let stored: u32 = scripts::SCHEDULE_STORE
            .key(keys.schedules())
            .key(keys.schedules_due())
            .arg(name)
            .arg(expected)
            .arg(serde_json::to_string(schedule)?)
            .arg(next.map(|t| t.to_string()).unwrap_or_default())
            .invoke_async(&mut self.connection())
            .await?;
        Ok(stored == 1)
    }

    /// A schedule's stored definition, as text and read, if it exists.
    async fn schedule_text(
        &self,
        tenant: &str,
        name: &str,
    ) -> anyhow::Result<Option<(String, Schedule)>> {
        let text: Option<String> = self
            .connection()
            .hget(Keys::new(tenant).schedules(), name)
            .await?;
        let Some(text) = text else {
            return Ok(None);
        };
        let schedule = read_definition(&text)
            .map_err(|e| anyhow::anyhow!("schedule {name:?} cannot be read: {e}"))?;
        Ok(Some((text, schedule)))
    }

    /// A schedule's definition, if it exists.
    pub async fn schedule_get(&self, tenant: &str, name: &str) -> anyhow::Result<Option<Schedule>> {
        Ok(self.schedule_text(tenant, name).await?.map(|(_, s)| s))
    }

    /// Pause (`true`) or resume a schedule; false if there is none. A
    /// paused schedule fires nothing; on resume it ticks from now, without
    /// catching up what fell due while it was paused. A change made
    /// meanwhile (`schedule add` replacing it) is read again, not lost.
    pub async fn schedule_pause(
        &self,
        tenant: &str,
        name: &str,
        paused: bool,
    ) -> anyhow::Result<bool> {
        for _ in 0..10 {
            let Some((text, mut schedule)) = self.schedule_text(tenant, name).await? else {
                return Ok(false);
            };
            schedule.paused = paused;
            let next = if paused {
                None
            } else {
                let now = self.redis_now_ms().await?;
                Some(next_tick(&schedule.timing, now, name)?)
            };
            if self.store(tenant, name, &text, &schedule, next).await? {
                return Ok(true);
            }
        }
        anyhow::bail!(
            "schedule {name:?} kept changing while it was being paused or resumed; try again"
        )
    }

    /// Remove a schedule (its jobs already enqueued stay); false if there
    /// was none.
    pub async fn schedule_remove(&self, tenant: &str, name: &str) -> anyhow::Result<bool> {
        let keys = Keys::new(tenant);
        let (removed, _, _): (u32, u32, u32) = redis::pipe()
            .atomic()
            .hdel(keys.schedules(), name)
            .zrem(keys.schedules_due(), name)
            .hdel(keys.schedule_runs(), name)
            .query_async(&mut self.connection())
            .await?;
        Ok(removed > 0)
    }

    /// Every schedule of the tenant, by name, with its next tick, last fire
    /// and the last job's state.
    pub async fn schedule_list(&self, tenant: &str) -> anyhow::Result<Vec<ScheduleView>> {
        valid_tenant(tenant).map_err(anyhow::Error::msg)?;
        let keys = Keys::new(tenant);
        let mut conn = self.connection();
        type Named<T> = Vec<(String, T)>;
        let (definitions, due, runs): (Named<String>, Named<u64>, Named<String>) = redis::pipe()
            .hgetall(keys.schedules())
            .zrange_withscores(keys.schedules_due(), 0, -1)
            .hgetall(keys.schedule_runs())
            .query_async(&mut conn)
            .await?;
        let due: std::collections::HashMap<_, _> = due.into_iter().collect();
        let runs: std::collections::HashMap<_, _> = runs.into_iter().collect();
        let mut views = Vec::new();
        for (name, text) in definitions {
            let schedule = read_definition(&text);
            let last: Option<LastFire> = runs.get(&name).and_then(|r| serde_json::from_str(r).ok());
            let last_job_state = match last.as_ref().and_then(|l| l.job.as_deref()) {
                Some(job) => {
                    let state: Option<String> = conn.hget(keys.job(job), "state").await?;
                    Some(state.unwrap_or_else(|| "expired".into()))
                }
                None => None,
            };
            views.push(ScheduleView {
                next_ms: due.get(&name).copied(),
                name,
                schedule,
                last,
                last_job_state,
            });
        }
        views.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(views)
    }

    /// Fire a schedule once now (`schedule run`), outside its timing: its
    /// due time does not move. The job's idempotency key names the schedule
    /// and the Redis clock's instant (`schedule:NAME:run:MS`).
    pub async fn schedule_run_now(&self, tenant: &str, name: &str) -> anyhow::Result<Enqueued> {
        let schedule = self
            .schedule_get(tenant, name)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no schedule {name:?} in tenant {tenant:?}"))?;
        let now = self.redis_now_ms().await?;
        let mut request = tick_request(tenant, name, &schedule, now);
        request.idempotency_key = Some(run_key(name, now));
        let enqueued = self
            .enqueue_claiming(request, Origin::Schedule, None)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the enqueue script answered 'stale' without a tick"))?;
        let last = LastFire {
            tick_ms: now,
            job: Some(enqueued.id.clone()),
            fired_at_ms: now,
            error: None,
        };
        let _: () = self
            .connection()
            .hset(
                Keys::new(tenant).schedule_runs(),
                name,
                serde_json::to_string(&last)?,
            )
            .await?;
        Ok(enqueued)
    }

    /// The tenant's due schedules, read on the Redis clock.
    pub async fn schedules_due(&self, tenant: &str) -> anyhow::Result<DueSchedules> {
        let keys = Keys::new(tenant);
        let reply: Vec<String> = scripts::SCHEDULES_DUE
            .key(keys.schedules_due())
            .key(keys.schedules())
            .arg(DUE_PER_ROUND)
            .invoke_async(&mut self.connection())
            .await?;
        let number = |text: &str| -> anyhow::Result<u64> {
            // Scores come back as Redis formats doubles; ticks are whole ms.
            let value: f64 = text.parse()?;
            Ok(value as u64)
        };
        let [now, next, rest @ ..] = reply.as_slice() else {
            anyhow::bail!("the due-schedules script answered {reply:?}");
        };
        let mut due = Vec::new();
        for entry in rest.chunks(3) {
            let [name, score, definition] = entry else {
                anyhow::bail!("the due-schedules script answered {reply:?}");
            };
            due.push(DueSchedule {
                name: name.clone(),
                due_ms: number(score)?,
                schedule: read_definition(definition),
                definition: definition.clone(),
            });
        }
        Ok(DueSchedules {
            now_ms: number(now)?,
            due,
            next_ms: if next.is_empty() {
                None
            } else {
                Some(number(next)?)
            },
        })
    }

    /// Fire one tick: enqueue its job and move the schedule's due score on,
    /// if the score still reads `claim.due_ms`. `Ok(None)` when another
    /// worker fired it first. Fails (writing nothing) when the job cannot
    /// be enqueued: the caller then moves the schedule on with
    /// [`Broker::schedule_advance`].
    pub async fn schedule_fire(
        &self,
        tenant: &str,
        schedule: &Schedule,
        claim: &TickClaim,
    ) -> anyhow::Result<Option<Enqueued>> {
        let request = tick_request(tenant, &claim.schedule, schedule, claim.tick_ms);
        self.enqueue_claiming(request, Origin::Schedule, Some(claim))
            .await
    }

    /// Move a schedule's due score from `claim.due_ms` to `claim.next_ms`
    /// without a job, recording `last` as its last fire when given; false
    /// when the score or the definition no longer reads as in the claim
    /// (another worker moved it, or the schedule was changed).
    pub async fn schedule_advance(
        &self,
        tenant: &str,
        claim: &TickClaim,
        last: Option<&LastFire>,
    ) -> anyhow::Result<bool> {
        let keys = Keys::new(tenant);
        let record = last
            .map(serde_json::to_string)
            .transpose()?
            .unwrap_or_default();
        let moved: u32 = scripts::SCHEDULE_ADVANCE
            .key(keys.schedules_due())
            .key(keys.schedule_runs())
            .key(keys.schedules())
            .arg(&claim.schedule)
            .arg(claim.due_ms)
            .arg(claim.next_ms.map(|t| t.to_string()).unwrap_or_default())
            .arg(record)
            .arg(&claim.definition)
            .invoke_async(&mut self.connection())
            .await?;
        Ok(moved == 1)
    }
}

/// The first tick after `now`, or an error naming the schedule when its
/// timing has none.
fn next_tick(timing: &Timing, now: u64, name: &str) -> anyhow::Result<u64> {
    timing
        .ticker()
        .map_err(anyhow::Error::msg)?
        .next_after(now)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "schedule {name:?} ({}) never ticks again",
                timing.describe()
            )
        })
}

/// The job of a schedule's tick.
fn tick_request(tenant: &str, name: &str, schedule: &Schedule, tick_ms: u64) -> EnqueueRequest {
    EnqueueRequest {
        tenant: tenant.to_string(),
        task: schedule.task.clone(),
        payload: schedule.payload.clone(),
        idempotency_key: Some(tick_key(name, tick_ms)),
        ..EnqueueRequest::default()
    }
}
