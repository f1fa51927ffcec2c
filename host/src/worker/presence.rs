//! A worker process's presence in Redis: a heartbeat every
//! [`HEARTBEAT_EVERY`] (its id, host, pid, version, tenants, pools with
//! busy and total slots, jobs done) that expires after [`HEARTBEAT_TTL`]
//! unless renewed, so `wasmq workers` drops a dead process within that;
//! and, between beats, a blocking wait on its pools' control lists, so an
//! operator's `wasmq cancel` stops a running job within milliseconds,
//! from any machine.
//!
//! One task per process (not per pool) and one blocking connection: the
//! cost is a script call every two seconds, whatever the job rate.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::broker::{Broker, ControlMessage, PoolBeat, WorkerBeat};
use crate::pools::PoolKind;

use super::manager::Worker;

/// How often a worker process publishes its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// How long a heartbeat stays without renewal: a process that died leaves
/// `wasmq workers` within this.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(10);
/// The pause after a failed heartbeat or control wait (Redis is away).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Who a worker process is, for its heartbeat.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The process's id (its pools' ids start with it).
    pub id: String,
    /// Host name.
    pub host: String,
    /// Tenants it serves.
    pub tenants: Vec<String>,
    /// When it started (ms).
    pub started_at_ms: u64,
}

/// See the module docs.
pub struct Presence {
    broker: Broker,
    identity: Identity,
    pools: Vec<(Arc<Worker>, PoolKind)>,
}

impl Presence {
    /// The presence of a process running `pools`.
    pub fn new(broker: Broker, identity: Identity, pools: Vec<(Arc<Worker>, PoolKind)>) -> Self {
        Presence {
            broker,
            identity,
            pools,
        }
    }

    /// The heartbeat as of now.
    fn beat(&self) -> WorkerBeat {
        WorkerBeat {
            id: self.identity.id.clone(),
            host: self.identity.host.clone(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            tenants: self.identity.tenants.clone(),
            pools: self
                .pools
                .iter()
                .map(|(pool, kind)| PoolBeat {
                    id: pool.id().to_string(),
                    kind: kind.as_str().to_string(),
                    queues: pool.config().queues.clone(),
                    busy: pool.busy(),
                    slots: pool.config().concurrency,
                })
                .collect(),
            started_at_ms: self.identity.started_at_ms,
            jobs_done: self.pools.iter().map(|(pool, _)| pool.completed()).sum(),
            last_beat_at_ms: 0,
        }
    }

    /// Beat and listen until `stop` resolves; then take the heartbeat
    /// away.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        tokio::select! {
            biased;
            _ = &mut stop => {}
            _ = self.beat_and_listen() => {}
        }
        if let Err(e) = self.broker.retire(&self.identity.id).await {
            tracing::debug!(error = %e, "could not remove the heartbeat; it expires by itself");
        }
    }

    async fn beat_and_listen(&self) {
        let pool_ids: Vec<String> = self.pools.iter().map(|(p, _)| p.id().to_string()).collect();
        let mut blocking = None;
        loop {
            if let Err(e) = self.broker.beat(&self.beat(), HEARTBEAT_TTL).await {
                tracing::warn!(error = %e, "publishing the worker's heartbeat failed; retrying");
            }
            let next_beat = Instant::now() + HEARTBEAT_EVERY;
            while let Some(left) = next_beat.checked_duration_since(Instant::now()) {
                if left < Duration::from_millis(10) {
                    break;
                }
                let conn = match blocking.as_mut() {
                    Some(conn) => conn,
                    None => match self.broker.blocking_connection(HEARTBEAT_EVERY).await {
                        Ok(conn) => blocking.insert(conn),
                        Err(e) => {
                            tracing::warn!(error = %e, "no connection for control messages; retrying");
                            tokio::time::sleep(RETRY_AFTER.min(left)).await;
                            continue;
                        }
                    },
                };
                match Broker::next_control(conn, &pool_ids, left).await {
                    Ok(Some((pool, message))) => self.obey(&pool, message),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "waiting for control messages failed; retrying");
                        blocking = None;
                        tokio::time::sleep(RETRY_AFTER.min(left)).await;
                    }
                }
            }
        }
    }

    /// Carry out one control message for pool `to`.
    fn obey(&self, to: &str, message: ControlMessage) {
        match message {
            ControlMessage::Cancel { tenant, id, token } => {
                let stopped = self
                    .pools
                    .iter()
                    .filter(|(pool, _)| pool.id() == to)
                    .any(|(pool, _)| pool.stop_run(&tenant, &id, &token));
                if stopped {
                    tracing::info!(%tenant, job = %id, "job cancelled by an operator; its run is stopped");
                } else {
                    tracing::debug!(%tenant, job = %id, "cancelled job is not running here (any more)");
                }
            }
        }
    }
}
