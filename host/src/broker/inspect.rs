//! What an operator reads: every queue's figures, jobs by state, and the
//! per-minute outcome counts. Each view reads indexes the scripts keep
//! (the per-queue sorted sets, the `succeeded` and `cancelled` indexes,
//! the dead-by-queue counts, the per-minute stats hashes), never a scan of
//! the keyspace: a million jobs cost a listing nothing more than ten.

use std::collections::{BTreeMap, BTreeSet};

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::envelope::{Envelope, PRIORITY_BAND};
use super::{scripts, Broker};
use crate::gates::MAX_LANES_LISTED;
use crate::keys::Keys;

/// Who paused a queue, and when (Redis clock, ms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paused {
    /// Who asked (`user@host`).
    pub by: String,
    /// When (ms).
    pub at_ms: u64,
}

/// One queue, as `wasmq queues` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct QueueView {
    /// Queue name.
    pub name: String,
    /// Jobs ready to run, those a rate limit or concurrency key holds
    /// back included.
    pub ready: u64,
    /// Of `ready`, the jobs set aside by a rate limit or a concurrency key
    /// (waiting in a lane, see `gates`).
    pub held_back: u64,
    /// Jobs not due yet (countdown, ETA, retry backoff).
    pub delayed: u64,
    /// Jobs leased to a worker now.
    pub running: u64,
    /// Jobs dead-lettered from this queue.
    pub dead: u64,
    /// Workflow steps of this queue that wait for other steps (on no
    /// queue yet: they go on this one when released).
    pub waiting: u64,
    /// Set while the queue is paused.
    pub paused: Option<Paused>,
    /// How long the oldest ready job has waited since its enqueue (ms).
    pub oldest_ready_age_ms: Option<u64>,
    /// Runs that succeeded in this clock minute and the one before.
    pub succeeded_last_minute: u64,
    /// Runs that failed (a retry or a death) in this clock minute and the
    /// one before.
    pub failed_last_minute: u64,
}

/// A job state `wasmq jobs` lists by, each read from its own index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Ready to run (`queue:Q:ready`).
    Queued,
    /// Waiting for its due time (`queue:Q:delayed`).
    Scheduled,
    /// Leased to a worker (`queue:Q:leased`).
    Running,
    /// Succeeded (the newest, from the `succeeded` list).
    Succeeded,
    /// Dead-lettered (`dead`).
    Dead,
    /// Cancelled (the newest, from the `cancelled` list).
    Cancelled,
    /// A step of a workflow waiting for other steps (`flows-waiting`).
    Waiting,
}

impl JobState {
    /// Every state, in a job's order of life.
    pub const ALL: [JobState; 7] = [
        JobState::Waiting,
        JobState::Queued,
        JobState::Scheduled,
        JobState::Running,
        JobState::Succeeded,
        JobState::Dead,
        JobState::Cancelled,
    ];

    /// The name users type and see.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Scheduled => "scheduled",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
            JobState::Waiting => "waiting",
        }
    }

    /// The state a job record's `state` field names (`active` is running).
    fn of_record(state: &str) -> Option<JobState> {
        Some(match state {
            "queued" => JobState::Queued,
            "scheduled" => JobState::Scheduled,
            "active" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "dead" => JobState::Dead,
            "cancelled" => JobState::Cancelled,
            "waiting" => JobState::Waiting,
            _ => return None,
        })
    }
}

impl std::str::FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown job state {s:?}: use one of waiting, queued, scheduled, running, succeeded, dead, cancelled"
                )
            })
    }
}

/// Which jobs `wasmq jobs` lists.
#[derive(Debug, Clone, Default)]
pub struct JobQuery {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this state (every state when `None`).
    pub state: Option<JobState>,
    /// Only this task.
    pub task: Option<String>,
    /// At most this many (newest first).
    pub limit: usize,
}

/// One job in a listing.
#[derive(Debug, Clone, Serialize)]
pub struct JobSummary {
    /// Job id.
    pub id: String,
    /// Its state.
    pub state: JobState,
    /// Task name.
    pub task: String,
    /// The queue it is (or was last) on.
    pub queue: String,
    /// Attempts that ended in a verdict.
    pub attempts: u64,
    /// The worker of its current (or last) delivery.
    pub worker: Option<String>,
    /// Times (ms, Redis clock).
    pub enqueued_at_ms: Option<u64>,
    /// When its current (or last) attempt started.
    pub started_at_ms: Option<u64>,
    /// When it finished.
    pub finished_at_ms: Option<u64>,
    /// When a scheduled job is due.
    pub due_at_ms: Option<u64>,
    /// The last error's category and message.
    pub last_error: Option<serde_json::Value>,
}

impl JobSummary {
    /// The time it is listed by: its newest event.
    fn at_ms(&self) -> u64 {
        self.finished_at_ms
            .or(self.started_at_ms)
            .or(self.enqueued_at_ms)
            .unwrap_or(0)
    }
}

/// When a succeeded job was enqueued, started its last attempt and
/// finished (ms, Redis clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RunTimes {
    /// Enqueued.
    pub enqueued_at_ms: u64,
    /// Its last attempt started.
    pub started_at_ms: u64,
    /// Finished.
    pub finished_at_ms: u64,
}

/// Index entries a filtered listing reads at most per (queue, state): a
/// filter that matches nothing costs a bounded read, not a full scan.
const MAX_SCANNED: usize = 10_000;

/// Where a listing reads ids, newest first.
enum Source {
    /// A list kept newest first.
    List(String),
    /// A sorted set whose highest scores are the newest.
    Sorted(String),
    /// The scores `low..=high` of a sorted set, highest first.
    Band(String, u64, u64),
}

/// Fields of a job record a listing reads.
const SUMMARY_FIELDS: [&str; 11] = [
    "state",
    "envelope",
    "queue",
    "dead_queue",
    "attempts",
    "worker",
    "enqueued_at_ms",
    "started_at_ms",
    "finished_at_ms",
    "due_at_ms",
    "last_error",
];

impl Broker {
    /// Every queue of the tenant: those its tasks were deployed to (and
    /// those its deployed tasks name now, for records older than the
    /// `queues` set).
    pub async fn queue_names(&self, tenant: &str) -> anyhow::Result<Vec<String>> {
        let keys = Keys::new(tenant);
        let mut names: BTreeSet<String> = self.connection().smembers(keys.queues()).await?;
        for task in self.tasks(tenant).await? {
            names.insert(task.policy.queue);
        }
        Ok(names.into_iter().collect())
    }

    /// Every queue's figures.
    pub async fn queues(&self, tenant: &str) -> anyhow::Result<Vec<QueueView>> {
        let mut out = Vec::new();
        for name in self.queue_names(tenant).await? {
            out.push(self.queue(tenant, &name).await?);
        }
        Ok(out)
    }

    /// One queue's figures, read in one script call.
    pub async fn queue(&self, tenant: &str, queue: &str) -> anyhow::Result<QueueView> {
        let keys = Keys::new(tenant);
        let (
            ready,
            delayed,
            running,
            dead,
            paused,
            oldest,
            now,
            succeeded,
            failed,
            held_back,
            waiting,
        ): (u64, u64, u64, u64, String, i64, u64, u64, u64, u64, u64) = scripts::QUEUE_VIEW
            .key(keys.ready(queue))
            .key(keys.delayed(queue))
            .key(keys.leased(queue))
            .key(keys.dead_by_queue())
            .key(keys.paused())
            .key(keys.lanes(queue))
            .key(keys.flow_waiting(queue))
            .arg(keys.prefix())
            .arg(queue)
            .invoke_async(&mut self.connection())
            .await?;
        Ok(QueueView {
            name: queue.to_string(),
            ready: ready + held_back,
            held_back,
            delayed,
            running,
            dead,
            waiting,
            paused: serde_json::from_str(&paused).ok(),
            oldest_ready_age_ms: u64::try_from(oldest).ok().map(|at| now.saturating_sub(at)),
            succeeded_last_minute: succeeded,
            failed_last_minute: failed,
        })
    }

    /// Jobs matching `query`, newest first.
    pub async fn jobs(&self, tenant: &str, query: &JobQuery) -> anyhow::Result<Vec<JobSummary>> {
        let limit = query.limit.max(1);
        let queues = match &query.queue {
            Some(q) => vec![q.clone()],
            None => self.queue_names(tenant).await?,
        };
        let states: Vec<JobState> = query.state.map_or(JobState::ALL.to_vec(), |s| vec![s]);
        let keys = Keys::new(tenant);
        // Queued jobs a rate limit or concurrency key set aside are queued
        // too: each lane's waiting set is listed like a ready queue.
        let mut queued_sets = Vec::new();
        for q in &queues {
            queued_sets.push(keys.ready(q));
            let lanes: Vec<String> = redis::cmd("ZRANGE")
                .arg(keys.lanes(q))
                .arg(0)
                .arg(MAX_LANES_LISTED - 1)
                .query_async(&mut self.connection())
                .await?;
            queued_sets.extend(lanes.iter().map(|lane| keys.waiting(q, lane)));
        }
        let mut found = Vec::new();
        for state in states {
            // The per-queue states have an index per queue; the others one
            // per tenant, filtered by queue.
            let sources: Vec<Source> = match state {
                // Newest first within each priority band (the score is the
                // band, then the enqueue sequence); merged by time below.
                JobState::Queued => queued_sets
                    .iter()
                    .flat_map(|ready| {
                        (0..10u64).map(move |band| {
                            let low = band * PRIORITY_BAND;
                            Source::Band(ready.clone(), low, low + PRIORITY_BAND - 1)
                        })
                    })
                    .collect(),
                JobState::Scheduled => queues
                    .iter()
                    .map(|q| Source::Sorted(keys.delayed(q)))
                    .collect(),
                JobState::Running => queues
                    .iter()
                    .map(|q| Source::Sorted(keys.leased(q)))
                    .collect(),
                JobState::Succeeded => vec![Source::List(keys.succeeded())],
                JobState::Dead => vec![Source::Sorted(keys.dead())],
                JobState::Cancelled => vec![Source::List(keys.cancelled())],
                JobState::Waiting => vec![Source::Sorted(keys.flows_waiting())],
            };
            for source in sources {
                found.extend(self.scan_index(&keys, &source, state, query, limit).await?);
            }
        }
        found.sort_by(|a, b| b.at_ms().cmp(&a.at_ms()).then_with(|| b.id.cmp(&a.id)));
        found.truncate(limit);
        Ok(found)
    }

    /// Up to `limit` jobs of one index that match `query`, newest first
    /// (the index's highest scores), reading at most [`MAX_SCANNED`]
    /// entries.
    async fn scan_index(
        &self,
        keys: &Keys,
        source: &Source,
        state: JobState,
        query: &JobQuery,
        limit: usize,
    ) -> anyhow::Result<Vec<JobSummary>> {
        let mut conn = self.connection();
        let mut out = Vec::new();
        let page = if query.task.is_some() || query.queue.is_some() {
            (limit * 4).max(100)
        } else {
            limit
        };
        let mut start = 0;
        while out.len() < limit && start < MAX_SCANNED {
            let (first, last) = (start as isize, (start + page - 1) as isize);
            let ids: Vec<String> = match source {
                Source::List(key) => conn.lrange(key, first, last).await?,
                Source::Sorted(key) => conn.zrevrange(key, first, last).await?,
                Source::Band(key, low, high) => {
                    conn.zrevrangebyscore_limit(key, *high, *low, first, page as isize)
                        .await?
                }
            };
            if ids.is_empty() {
                break;
            }
            start += ids.len();
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HMGET").arg(keys.job(id)).arg(&SUMMARY_FIELDS[..]);
            }
            let rows: Vec<Vec<Option<String>>> = pipe.query_async(&mut conn).await?;
            for (id, row) in ids.into_iter().zip(rows) {
                let Some(job) = summary(id, &row) else {
                    continue; // its record expired, or it moved on since
                };
                let wanted = job.state == state
                    && query.queue.as_ref().is_none_or(|q| &job.queue == q)
                    && query.task.as_ref().is_none_or(|t| &job.task == t);
                if wanted {
                    out.push(job);
                    if out.len() == limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// When each of the newest `n` succeeded jobs was enqueued, started
    /// and finished (ms), newest first: what the dashboard's latency chart
    /// is drawn from. One LRANGE and one pipelined HMGET per job of the
    /// `succeeded` index, so its cost is bounded by `n`, not by the jobs
    /// in Redis. Jobs whose record expired are left out.
    pub async fn recent_run_times(&self, tenant: &str, n: usize) -> anyhow::Result<Vec<RunTimes>> {
        let keys = Keys::new(tenant);
        let mut conn = self.connection();
        let ids: Vec<String> = conn
            .lrange(keys.succeeded(), 0, n.max(1) as isize - 1)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET")
                .arg(keys.job(id))
                .arg("enqueued_at_ms")
                .arg("started_at_ms")
                .arg("finished_at_ms");
        }
        let rows: Vec<(Option<u64>, Option<u64>, Option<u64>)> =
            pipe.query_async(&mut conn).await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| match row {
                (Some(enqueued_at_ms), Some(started_at_ms), Some(finished_at_ms)) => {
                    Some(RunTimes {
                        enqueued_at_ms,
                        started_at_ms,
                        finished_at_ms,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Outcome counts per minute (fields `queue:Q:OUTCOME`,
    /// `task:T:OUTCOME`) for the last `minutes` clock minutes that have
    /// any, oldest first: (unix minute, counts).
    pub async fn outcomes_by_minute(
        &self,
        tenant: &str,
        minutes: u64,
    ) -> anyhow::Result<Vec<(u64, BTreeMap<String, u64>)>> {
        let keys = Keys::new(tenant);
        let mut conn = self.connection();
        let (secs, _): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let now = secs / 60;
        let first = now.saturating_sub(minutes.saturating_sub(1));
        let mut pipe = redis::pipe();
        for m in first..=now {
            pipe.hgetall(keys.stats(m));
        }
        let rows: Vec<BTreeMap<String, u64>> = pipe.query_async(&mut conn).await?;
        Ok((first..=now)
            .zip(rows)
            .filter(|(_, counts)| !counts.is_empty())
            .collect())
    }
}

/// A listing row from a job record's fields ([`SUMMARY_FIELDS`]), or
/// `None` when the record is gone.
fn summary(id: String, row: &[Option<String>]) -> Option<JobSummary> {
    let get = |i: usize| row.get(i).cloned().flatten().filter(|v| !v.is_empty());
    let num = |i: usize| get(i).and_then(|v| v.parse::<u64>().ok());
    let state = JobState::of_record(&get(0)?)?;
    let envelope = get(1).and_then(|e| Envelope::parse(&e).ok());
    let queue = match state {
        JobState::Dead => get(3),
        _ => None,
    }
    .or_else(|| get(2))
    .or_else(|| envelope.as_ref().map(|e| e.queue.clone()))
    .unwrap_or_default();
    Some(JobSummary {
        id,
        state,
        task: envelope.map(|e| e.task).unwrap_or_default(),
        queue,
        attempts: num(4).unwrap_or(0),
        worker: get(5),
        enqueued_at_ms: num(6),
        started_at_ms: num(7),
        finished_at_ms: num(8),
        due_at_ms: num(9).filter(|_| state == JobState::Scheduled),
        last_error: get(10).and_then(|e| serde_json::from_str(&e).ok()),
    })
}
