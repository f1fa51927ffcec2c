//! What an operator changes, and how workers make themselves known:
//! cancelling a job, pausing and resuming a queue, worker heartbeats and
//! the per-pool control lists that carry a cancel to the worker running
//! the job.
//!
//! Heartbeats and control lists live outside any tenant (a worker serves
//! many), under the `{workers}` hash tag (see [`crate::keys::workers`]).

use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::consumer::FINISHED_RETENTION;
use super::inspect::Paused;
use super::{scripts, Broker};
use crate::keys::{workers, Keys};

/// How long a control message waits for its worker (one that is gone
/// never reads it; its job's lease is gone anyway).
const CONTROL_TTL: Duration = Duration::from_secs(60);

/// What `wasmq cancel` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// Cancelled; the state it was in (`queued`, `scheduled`, `active`).
    Now {
        /// The state it left.
        was: String,
        /// For a running job: the worker told to stop it.
        worker: Option<String>,
    },
    /// It had ended already, in this state.
    AlreadyEnded(String),
    /// No such job (never existed, or its record expired).
    Unknown,
}

/// A message on a pool's control list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlMessage {
    /// Stop the run of this delivery now: the job was cancelled.
    Cancel {
        /// Tenant of the job.
        tenant: String,
        /// Job id.
        id: String,
        /// The delivery's lease token (a newer delivery is not stopped).
        token: String,
    },
}

/// One pool of a worker process, in its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolBeat {
    /// The pool's worker id (what job records name).
    pub id: String,
    /// `io` or `cpu`.
    pub kind: String,
    /// Queues it serves.
    pub queues: Vec<String>,
    /// Jobs it runs now.
    pub busy: usize,
    /// Jobs it can run at once.
    pub slots: usize,
}

/// A worker process's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerBeat {
    /// The process's id (pool ids start with it).
    pub id: String,
    /// Host name.
    pub host: String,
    /// OS process id.
    pub pid: u32,
    /// wasmq version.
    pub version: String,
    /// Tenants it serves.
    pub tenants: Vec<String>,
    /// Its pools.
    pub pools: Vec<PoolBeat>,
    /// When it started (ms, its own clock).
    pub started_at_ms: u64,
    /// Jobs that reached an outcome on it.
    pub jobs_done: u64,
    /// When Redis last heard from it (ms, Redis clock); filled in on read.
    #[serde(default)]
    pub last_beat_at_ms: u64,
}

impl Broker {
    /// Cancel a job: see [`scripts::CANCEL`]. A running job's worker is
    /// told at once on its control list.
    pub async fn cancel(&self, tenant: &str, id: &str, who: &str) -> anyhow::Result<Cancelled> {
        let keys = Keys::new(tenant);
        let mut conn = self.connection();
        let answer: Vec<String> = scripts::CANCEL
            .key(keys.job(id))
            .key(keys.history(id))
            .key(keys.done(id))
            .key(keys.idempotency_index())
            .key(keys.cancelled())
            .key(keys.inflight())
            .arg(keys.prefix())
            .arg(id)
            .arg(who)
            .arg(FINISHED_RETENTION.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        match answer.as_slice() {
            [] => Ok(Cancelled::Unknown),
            [finished, state] if finished == "finished" => {
                Ok(Cancelled::AlreadyEnded(state.clone()))
            }
            [_, was, worker, token] if was == "active" && !worker.is_empty() => {
                let message = ControlMessage::Cancel {
                    tenant: tenant.to_string(),
                    id: id.to_string(),
                    token: token.clone(),
                };
                let key = workers::control(worker);
                redis::pipe()
                    .rpush(&key, serde_json::to_string(&message)?)
                    .pexpire(&key, CONTROL_TTL.as_millis() as i64)
                    .query_async::<()>(&mut conn)
                    .await?;
                Ok(Cancelled::Now {
                    was: was.clone(),
                    worker: Some(worker.clone()),
                })
            }
            [_, was, ..] => Ok(Cancelled::Now {
                was: was.clone(),
                worker: None,
            }),
            other => anyhow::bail!("unexpected answer from the cancel script: {other:?}"),
        }
    }

    /// Pause `queue`: workers lease nothing from it until it is resumed
    /// (their next fetch sees it). Its jobs stay where they are. Returns
    /// false if it was paused already.
    pub async fn pause(&self, tenant: &str, queue: &str, who: &str) -> anyhow::Result<bool> {
        let keys = Keys::new(tenant);
        self.check_queue(tenant, queue).await?;
        let mut conn = self.connection();
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let record = Paused {
            by: who.to_string(),
            at_ms: secs * 1000 + micros / 1000,
        };
        let added: bool = conn
            .hset_nx(keys.paused(), queue, serde_json::to_string(&record)?)
            .await?;
        Ok(added)
    }

    /// Resume `queue`, waking idle workers. Returns false if it was not
    /// paused.
    pub async fn resume(&self, tenant: &str, queue: &str) -> anyhow::Result<bool> {
        let keys = Keys::new(tenant);
        self.check_queue(tenant, queue).await?;
        let (removed, _, _): (u64, u64, ()) = redis::pipe()
            .hdel(keys.paused(), queue)
            .lpush(keys.signal(queue), "1")
            .ltrim(keys.signal(queue), 0, 63)
            .query_async(&mut self.connection())
            .await?;
        Ok(removed == 1)
    }

    /// An error naming the queue when the tenant has no such queue.
    async fn check_queue(&self, tenant: &str, queue: &str) -> anyhow::Result<()> {
        let names = self.queue_names(tenant).await?;
        anyhow::ensure!(
            names.iter().any(|q| q == queue),
            "tenant {tenant:?} has no queue {queue:?} (its queues: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
        Ok(())
    }

    /// Publish a worker's heartbeat, alive for `ttl` unless renewed.
    pub async fn beat(&self, beat: &WorkerBeat, ttl: Duration) -> redis::RedisResult<()> {
        let json = serde_json::to_string(beat).unwrap_or_default();
        let _: u64 = scripts::BEAT
            .key(workers::beat(&beat.id))
            .key(workers::LIVE)
            .arg(&beat.id)
            .arg(json)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut self.connection())
            .await?;
        Ok(())
    }

    /// Take a stopping worker's heartbeat away (it leaves the list at
    /// once instead of when its heartbeat expires).
    pub async fn retire(&self, process: &str) -> redis::RedisResult<()> {
        redis::pipe()
            .del(workers::beat(process))
            .zrem(workers::LIVE, process)
            .query_async(&mut self.connection())
            .await
    }

    /// Live workers (those whose heartbeat has not expired), by id; the
    /// ids of expired ones are dropped from the live set on the way.
    pub async fn workers(&self) -> anyhow::Result<Vec<WorkerBeat>> {
        let mut conn = self.connection();
        let live: Vec<(String, u64)> = conn.zrange_withscores(workers::LIVE, 0, -1).await?;
        if live.is_empty() {
            return Ok(Vec::new());
        }
        let beat_keys: Vec<String> = live.iter().map(|(id, _)| workers::beat(id)).collect();
        let beats: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&beat_keys)
            .query_async(&mut conn)
            .await?;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for ((id, last), beat) in live.into_iter().zip(beats) {
            match beat.and_then(|b| serde_json::from_str::<WorkerBeat>(&b).ok()) {
                Some(mut beat) => {
                    beat.last_beat_at_ms = last;
                    out.push(beat);
                }
                None => gone.push(id),
            }
        }
        if !gone.is_empty() {
            let _: u64 = conn.zrem(workers::LIVE, &gone).await?;
        }
        Ok(out)
    }

    /// Wait up to `timeout` for the next control message to any of
    /// `pools`, on `conn` (a blocking connection of the caller's): the
    /// pool it is for and the message. `None` when none came; a message
    /// that cannot be read is skipped.
    pub async fn next_control(
        conn: &mut redis::aio::MultiplexedConnection,
        pools: &[String],
        timeout: Duration,
    ) -> redis::RedisResult<Option<(String, ControlMessage)>> {
        let keys: Vec<String> = pools.iter().map(|p| workers::control(p)).collect();
        let popped: Option<(String, String)> = redis::cmd("BLPOP")
            .arg(&keys)
            .arg(timeout.as_secs_f64())
            .query_async(conn)
            .await?;
        let Some((key, message)) = popped else {
            return Ok(None);
        };
        let pool = pools
            .iter()
            .zip(&keys)
            .find(|(_, k)| **k == key)
            .map(|(p, _)| p.clone())
            .unwrap_or_default();
        match serde_json::from_str(&message) {
            Ok(m) => Ok(Some((pool, m))),
            Err(e) => {
                tracing::warn!(error = %e, %message, "ignoring a control message that cannot be read");
                Ok(None)
            }
        }
    }
}
