//! The Redis [`Backend`]: what workers use for the guest's host interfaces.
//!
//! Owns the Redis commands and Lua scripts behind key-value, counters,
//! locks and step markers. Invariants:
//! - Every key comes from [`Keys`] for the job's tenant, so a guest's name
//!   can only land inside its own tenant's namespace and kind.
//! - Every method is one round trip: a single command, or one Lua script
//!   where a read decides a write (Redis runs a script atomically).
//! - A lock's fence key never expires and is never reset, so fencing tokens
//!   strictly increase per lock name.
//!
//! Semantics match [`super::memory`]. Child jobs are handed to a
//! [`ChildEnqueuer`] (the broker) if one was given.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{RedisError, Script};

use super::{Backend, BackendError, BackendResult, ChildJob, StepState};
use crate::keys::Keys;

/// Puts a child job on a tenant's queue; implemented by the broker, which
/// owns the job format and the queue keys.
#[async_trait]
pub trait ChildEnqueuer: Send + Sync {
    /// Enqueue `child` in `tenant`; its job id.
    async fn enqueue_child(&self, tenant: &str, child: ChildJob) -> BackendResult<String>;
}

/// See the module docs.
#[derive(Clone)]
pub struct RedisBackend {
    /// Multiplexed connection that reconnects on its own; cloned per call.
    conn: ConnectionManager,
    /// Where child jobs go; without one, `enqueue_child` is unavailable.
    enqueuer: Option<Arc<dyn ChildEnqueuer>>,
}

/// `incr-once`: a script because "was this key counted?", the increment and
/// recording the key must be one step, or a crash between them counts twice.
/// KEYS: counter, once-key. ARGV: delta.
static COUNTER_INCR_ONCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local seen = redis.call('GET', KEYS[2])
if seen then return tonumber(seen) end
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], value)
return value
"#,
    )
});

/// Take a lock and hand out the next fencing token together. A script
/// because the INCR must happen exactly when the SET NX succeeded: two
/// commands would let a crash between them (or a second client) skip or
/// reuse a token.
/// KEYS: lock, fence. ARGV: owner, ttl ms. Returns the token or nil.
static LOCK_ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return false
",
    )
});

/// Extend a lease only if the caller still holds it. A script because the
/// owner check and the PEXPIRE must be atomic: otherwise an expired holder
/// could extend the lease of whoever took the lock in between.
/// KEYS: lock. ARGV: owner, ttl ms. Returns 1 if renewed, else 0.
static LOCK_RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
",
    )
});

/// Release a lock only if the caller still holds it. A script for the same
/// reason as [`LOCK_RENEW`]: an expired holder must not delete the new
/// holder's lock.
/// KEYS: lock. ARGV: owner. Returns 1 if released, else 0.
static LOCK_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// Decide whether a run may execute a step, and claim it if so. A script
/// because "not done and not claimed by someone else, so claim it" is a
/// read-then-write that two runs must not interleave.
/// KEYS: step_done, step_claim. ARGV: claimant, lease ms.
/// Returns {'done', output}, {'busy'} or {'run'}.
static STEP_BEGIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local done = redis.call('GET', KEYS[1])
if done then
  return {'done', done}
end
local claim = redis.call('GET', KEYS[2])
if claim and claim ~= ARGV[1] then
  return {'busy'}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {'run'}
",
    )
});

/// Record a step's output and drop the caller's claim. A script so the
/// done marker and the claim change together, and so the claim is dropped
/// only if it is the caller's: another run's claim is left to lapse (it
/// will see the done marker first anyway).
/// KEYS: step_done, step_claim. ARGV: claimant, output, ttl ms (0 = none).
static STEP_COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if ARGV[3] == '0' then
  redis.call('SET', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
return 1
",
    )
});

/// Drop a step claim only if the caller holds it. A script because the
/// owner check and the DEL must be atomic (the claim may have lapsed and
/// been taken by another run).
/// KEYS: step_claim. ARGV: claimant.
static STEP_ABANDON: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
",
    )
});

/// A duration as Redis milliseconds. Redis refuses an expiry of 0, so the
/// shortest is 1 ms (the key is gone almost at once, as in the memory
/// backend).
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Runs an idempotent call (`call` builds it afresh each time) again while
/// Redis is unreachable or loading, for up to about two seconds.
///
/// Why: a step marker's bookkeeping failing on a dropped connection (a
/// Redis restart) made the guest retry the whole job after its side effect
/// had already happened, so the step ran twice. The step scripts are safe
/// to repeat for the same claimant, so they ride out a short outage here
/// instead. Non-idempotent calls (INCRBY, lock acquire) are never retried.
async fn idempotent<T, F, Fut>(mut call: F) -> Result<T, RedisError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RedisError>>,
{
    let mut delay = Duration::from_millis(20);
    loop {
        match call().await {
            Err(e)
                if delay < Duration::from_secs(1)
                    && (e.is_io_error()
                        || e.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)) =>
            {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
}

/// Maps a Redis error to [`BackendError::Unavailable`] naming `op`.
fn unavailable(op: &'static str) -> impl FnOnce(RedisError) -> BackendError {
    move |e| BackendError::Unavailable(format!("redis {op}: {e}"))
}

impl RedisBackend {
    /// A backend on `conn`, without a child-job enqueuer.
    pub fn new(conn: ConnectionManager) -> Self {
        RedisBackend {
            conn,
            enqueuer: None,
        }
    }

    /// Hand child jobs to `e` (the broker).
    pub fn with_enqueuer(mut self, e: Arc<dyn ChildEnqueuer>) -> Self {
        self.enqueuer = Some(e);
        self
    }

    /// A handle for one call (the manager multiplexes clones on one
    /// connection).
    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }
}

#[async_trait]
impl Backend for RedisBackend {
    async fn kv_get(&self, tenant: &str, key: &str) -> BackendResult<Option<Vec<u8>>> {
        redis::cmd("GET")
            .arg(Keys::new(tenant).kv(key))
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable("kv get"))
    }

    async fn kv_set(
        &self,
        tenant: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> BackendResult<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(Keys::new(tenant).kv(key)).arg(value);
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(ms(ttl));
        }
        cmd.query_async::<()>(&mut self.conn())
            .await
            .map_err(unavailable("kv set"))
    }

    async fn kv_set_if_absent(
        &self,
        tenant: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> BackendResult<bool> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(Keys::new(tenant).kv(key)).arg(value).arg("NX");
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(ms(ttl));
        }
        // OK if stored, nil if the key already held a value.
        let stored: Option<String> = cmd
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable("kv set-if-absent"))?;
        Ok(stored.is_some())
    }

    async fn kv_delete(&self, tenant: &str, key: &str) -> BackendResult<bool> {
        let removed: i64 = redis::cmd("DEL")
            .arg(Keys::new(tenant).kv(key))
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable("kv delete"))?;
        Ok(removed > 0)
    }

    async fn counter_incr(&self, tenant: &str, name: &str, delta: i64) -> BackendResult<i64> {
        redis::cmd("INCRBY")
            .arg(Keys::new(tenant).counter(name))
            .arg(delta)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable("counter incr"))
    }

    async fn counter_incr_once(
        &self,
        tenant: &str,
        name: &str,
        delta: i64,
        once_key: &str,
    ) -> BackendResult<i64> {
        let keys = Keys::new(tenant);
        COUNTER_INCR_ONCE
            .key(keys.counter(name))
            .key(keys.counted_once(once_key))
            .arg(delta)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable("counter incr-once"))
    }

    async fn counter_get(&self, tenant: &str, name: &str) -> BackendResult<i64> {
        let value: Option<i64> = redis::cmd("GET")
            .arg(Keys::new(tenant).counter(name))
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable("counter get"))?;
        Ok(value.unwrap_or(0))
    }

    async fn lock_acquire(
        &self,
        tenant: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> BackendResult<Option<u64>> {
        let keys = Keys::new(tenant);
        LOCK_ACQUIRE
            .key(keys.lock(name))
            .key(keys.fence(name))
            .arg(owner)
            .arg(ms(ttl))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable("lock acquire"))
    }

    async fn lock_renew(
        &self,
        tenant: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> BackendResult<bool> {
        LOCK_RENEW
            .key(Keys::new(tenant).lock(name))
            .arg(owner)
            .arg(ms(ttl))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable("lock renew"))
    }

    async fn lock_release(&self, tenant: &str, name: &str, owner: &str) -> BackendResult<bool> {
        LOCK_RELEASE
            .key(Keys::new(tenant).lock(name))
            .arg(owner)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable("lock release"))
    }

    async fn step_begin(
        &self,
        tenant: &str,
        key: &str,
        claimant: &str,
        lease: Duration,
    ) -> BackendResult<StepState> {
        let keys = Keys::new(tenant);
        let reply: Vec<Vec<u8>> = idempotent(|| async {
            STEP_BEGIN
                .key(keys.step_done(key))
                .key(keys.step_claim(key))
                .arg(claimant)
                .arg(ms(lease))
                .invoke_async(&mut self.conn())
                .await
        })
        .await
        .map_err(unavailable("step begin"))?;
        let mut reply = reply.into_iter();
        match (reply.next().as_deref(), reply.next()) {
            (Some(b"done"), Some(output)) => Ok(StepState::Done(output)),
            (Some(b"busy"), None) => Ok(StepState::Busy),
            (Some(b"run"), None) => Ok(StepState::Run),
            _ => Err(BackendError::Unavailable(
                "redis step begin: unexpected script reply".to_string(),
            )),
        }
    }

    async fn step_complete(
        &self,
        tenant: &str,
        key: &str,
        claimant: &str,
        output: &[u8],
        ttl: Option<Duration>,
    ) -> BackendResult<()> {
        let keys = Keys::new(tenant);
        idempotent(|| async {
            STEP_COMPLETE
                .key(keys.step_done(key))
                .key(keys.step_claim(key))
                .arg(claimant)
                .arg(output)
                .arg(ttl.map_or(0, ms))
                .invoke_async::<()>(&mut self.conn())
                .await
        })
        .await
        .map_err(unavailable("step complete"))
    }

    async fn step_abandon(&self, tenant: &str, key: &str, claimant: &str) -> BackendResult<()> {
        let claim = Keys::new(tenant).step_claim(key);
        idempotent(|| async {
            STEP_ABANDON
                .key(&claim)
                .arg(claimant)
                .invoke_async::<()>(&mut self.conn())
                .await
        })
        .await
        .map_err(unavailable("step abandon"))
    }

    async fn enqueue_child(&self, tenant: &str, child: ChildJob) -> BackendResult<String> {
        match &self.enqueuer {
            Some(e) => e.enqueue_child(tenant, child).await,
            None => Err(BackendError::Unavailable(
                "child jobs need a broker".to_string(),
            )),
        }
    }
}
