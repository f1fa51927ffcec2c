//! The Redis [`Backend`]: what workers use for the guest's host interfaces.
//!
//! Owns the Redis commands and Lua scripts behind key-value, counters,
//! locks and step markers. Invariants:
//! - Every key comes from [`Keys`] for the job's tenant, so a guest's name
//!   can only land inside its own tenant's namespace and kind.
//! - Every method is one round trip: a single command, or one Lua script
//!   where a read decides a write (Redis runs a script atomically).
//! - Every write a guest makes is accounted in the tenant's store totals
//!   (bytes and keys, see [`Keys::store_totals`]) in the same script, and
//!   refused (`QUOTA`, so [`BackendError::Denied`]) when it would pass the
//!   tenant's quota. Entries with a TTL leave the totals when they lapse
//!   (purged a few at a time by the next write).
//! - A lock's fence key never expires and is never reset, so fencing tokens
//!   strictly increase per lock name.
//! - A step claim names the job and the delivery (its lease token): a later
//!   delivery of the same job takes it over, and a delivery whose lease
//!   was lost can neither begin nor complete a step.
//!
//! Semantics match [`super::memory`] (which has no quotas: embedded mode
//! has no tenant records). Child jobs are handed to a [`ChildEnqueuer`]
//! (the broker) if one was given.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{RedisError, Script};

use super::{
    Backend, BackendError, BackendResult, ChildJob, Claimant, FlowRequest, StartedFlow, StepState,
};
use crate::keys::Keys;
use crate::limits::MAX_VALUE_BYTES;

/// Puts a child job on a tenant's queue; implemented by the broker, which
/// owns the job format and the queue keys.
#[async_trait]
pub trait ChildEnqueuer: Send + Sync {
    /// Enqueue `child` in `tenant`; its job id.
    async fn enqueue_child(&self, tenant: &str, child: ChildJob) -> BackendResult<String>;
    /// Start (or find again) the flow `request` asks for in `tenant`.
    async fn start_flow(&self, tenant: &str, request: FlowRequest) -> BackendResult<StartedFlow>;
}

/// A tenant's quota on what its guests store; 0 means no cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreQuota {
    /// Most bytes (names plus values) stored at once.
    pub max_bytes: u64,
    /// Most entries stored at once.
    pub max_keys: u64,
}

/// See the module docs.
#[derive(Clone)]
pub struct RedisBackend {
    /// Multiplexed connection that reconnects on its own; cloned per call.
    conn: ConnectionManager,
    /// Where child jobs go; without one, `enqueue_child` is unavailable.
    enqueuer: Option<Arc<dyn ChildEnqueuer>>,
    /// The tenant's store quota.
    quota: StoreQuota,
}

/// Bytes a counter's or a fence's value is counted as.
const NUMBER_BYTES: usize = 8;

/// Lua shared by the writing scripts: the server clock and the store
/// accounting (see the module docs). `store_refusal` returns nil when a
/// change fits the quota, else the reason.
const STORE_LUA: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function store_purge(sizes, expiry, totals, now)
  local gone = redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, 64)
  for _, name in ipairs(gone) do
    local size = tonumber(redis.call('HGET', sizes, name))
    if size then
      redis.call('HDEL', sizes, name)
      redis.call('HINCRBY', totals, 'bytes', -size)
      redis.call('HINCRBY', totals, 'keys', -1)
    end
  end
  if #gone > 0 then redis.call('ZREM', expiry, unpack(gone)) end
end
local function store_delta(sizes, name, size)
  local old = tonumber(redis.call('HGET', sizes, name))
  if size == 0 then
    if old then return -old, -1 end
    return 0, 0
  end
  if old then return size - old, 0 end
  return size, 1
end
local function store_refusal(totals, d_bytes, d_keys, max_bytes, max_keys)
  if d_bytes <= 0 and d_keys <= 0 then return nil end
  local t = redis.call('HMGET', totals, 'bytes', 'keys')
  local bytes, keys = tonumber(t[1]) or 0, tonumber(t[2]) or 0
  if max_bytes > 0 and bytes + d_bytes > max_bytes then
    return 'the tenant stores ' .. bytes .. ' bytes; ' .. d_bytes .. ' more would pass its quota of ' ..
      max_bytes .. ' bytes (max_store_bytes)'
  end
  if max_keys > 0 and keys + d_keys > max_keys then
    return 'the tenant stores ' .. keys .. ' entries; one more would pass its quota of ' ..
      max_keys .. ' (max_store_keys)'
  end
  return nil
end
local function store_apply(sizes, expiry, totals, name, size, expires_at, d_bytes, d_keys)
  if size == 0 then redis.call('HDEL', sizes, name) else redis.call('HSET', sizes, name, size) end
  if expires_at and size > 0 then
    redis.call('ZADD', expiry, expires_at, name)
  else
    redis.call('ZREM', expiry, name)
  end
  if d_bytes ~= 0 then redis.call('HINCRBY', totals, 'bytes', d_bytes) end
  if d_keys ~= 0 then redis.call('HINCRBY', totals, 'keys', d_keys) end
end
"#;

/// A script whose source is [`STORE_LUA`] followed by `body`.
fn store_script(body: &str) -> Script {
    Script::new(&format!("{STORE_LUA}{body}"))
}

/// Set a key-value entry (`nx` = only if absent).
/// KEYS: entry, sizes, expiry, totals. ARGV: name, value, ttl ms (0 =
/// none), nx ('1' or '0'), max bytes, max keys. Returns 1 if stored.
static KV_SET: LazyLock<Script> = LazyLock::new(|| {
    store_script(
        r#"
local now = now_ms()
store_purge(KEYS[2], KEYS[3], KEYS[4], now)
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local size = #ARGV[1] + #ARGV[2]
local db, dk = store_delta(KEYS[2], ARGV[1], size)
local why = store_refusal(KEYS[4], db, dk, tonumber(ARGV[5]), tonumber(ARGV[6]))
if why then return redis.error_reply('QUOTA ' .. why) end
local ttl, expires = tonumber(ARGV[3]), nil
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
  expires = now + ttl
else
  redis.call('SET', KEYS[1], ARGV[2])
end
store_apply(KEYS[2], KEYS[3], KEYS[4], ARGV[1], size, expires, db, dk)
return 1
"#,
    )
});

/// Delete an entry. KEYS: entry, sizes, expiry, totals. ARGV: name.
/// Returns 1 if it existed.
static DELETE: LazyLock<Script> = LazyLock::new(|| {
    store_script(
        r#"
local removed = redis.call('DEL', KEYS[1])
local db, dk = store_delta(KEYS[2], ARGV[1], 0)
store_apply(KEYS[2], KEYS[3], KEYS[4], ARGV[1], 0, nil, db, dk)
return removed
"#,
    )
});

/// Add to a counter. KEYS: counter, sizes, expiry, totals. ARGV: name,
/// delta, max bytes, max keys. A counter that would overflow fails with
/// Redis's own error before anything is accounted.
static COUNTER_INCR: LazyLock<Script> = LazyLock::new(|| {
    store_script(&format!(
        r#"
store_purge(KEYS[2], KEYS[3], KEYS[4], now_ms())
local size = #ARGV[1] + {NUMBER_BYTES}
local db, dk = 0, 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  db, dk = store_delta(KEYS[2], ARGV[1], size)
  local why = store_refusal(KEYS[4], db, dk, tonumber(ARGV[3]), tonumber(ARGV[4]))
  if why then return redis.error_reply('QUOTA ' .. why) end
end
local value = redis.call('INCRBY', KEYS[1], ARGV[2])
if dk ~= 0 or db ~= 0 then store_apply(KEYS[2], KEYS[3], KEYS[4], ARGV[1], size, nil, db, dk) end
return value
"#
    ))
});

/// `incr-once`: a script because "was this key counted?", the increment and
/// recording the key must be one step, or a crash between them counts twice.
/// KEYS: counter, once-key, sizes, expiry, totals. ARGV: counter name,
/// once name, delta, max bytes, max keys.
static COUNTER_INCR_ONCE: LazyLock<Script> = LazyLock::new(|| {
    store_script(&format!(
        r#"
local seen = redis.call('GET', KEYS[2])
if seen then return tonumber(seen) end
store_purge(KEYS[3], KEYS[4], KEYS[5], now_ms())
local once_size = #ARGV[2] + {NUMBER_BYTES}
local db, dk = store_delta(KEYS[3], ARGV[2], once_size)
local counter_size = #ARGV[1] + {NUMBER_BYTES}
local cb, ck = 0, 0
if redis.call('EXISTS', KEYS[1]) == 0 then cb, ck = store_delta(KEYS[3], ARGV[1], counter_size) end
local why = store_refusal(KEYS[5], db + cb, dk + ck, tonumber(ARGV[4]), tonumber(ARGV[5]))
if why then return redis.error_reply('QUOTA ' .. why) end
local value = redis.call('INCRBY', KEYS[1], ARGV[3])
redis.call('SET', KEYS[2], value)
store_apply(KEYS[3], KEYS[4], KEYS[5], ARGV[2], once_size, nil, db, dk)
if ck ~= 0 then store_apply(KEYS[3], KEYS[4], KEYS[5], ARGV[1], counter_size, nil, cb, ck) end
return value
"#
    ))
});

/// Take a lock and hand out the next fencing token together. A script
/// because the INCR must happen exactly when the lock was taken: two
/// commands would let a crash between them (or a second client) skip or
/// reuse a token.
/// KEYS: lock, fence, sizes, expiry, totals. ARGV: lock name, fence name,
/// owner, ttl ms, max bytes, max keys. Returns the token or nil.
static LOCK_ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    store_script(&format!(
        r#"
local now = now_ms()
store_purge(KEYS[3], KEYS[4], KEYS[5], now)
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local lock_size = #ARGV[1] + #ARGV[3]
local lb, lk = store_delta(KEYS[3], ARGV[1], lock_size)
local fence_size = #ARGV[2] + {NUMBER_BYTES}
local fb, fk = 0, 0
if redis.call('EXISTS', KEYS[2]) == 0 then fb, fk = store_delta(KEYS[3], ARGV[2], fence_size) end
local why = store_refusal(KEYS[5], lb + fb, lk + fk, tonumber(ARGV[5]), tonumber(ARGV[6]))
if why then return redis.error_reply('QUOTA ' .. why) end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
local token = redis.call('INCR', KEYS[2])
store_apply(KEYS[3], KEYS[4], KEYS[5], ARGV[1], lock_size, now + tonumber(ARGV[4]), lb, lk)
if fk ~= 0 then store_apply(KEYS[3], KEYS[4], KEYS[5], ARGV[2], fence_size, nil, fb, fk) end
return token
"#
    ))
});

/// Extend a lease only if the caller still holds it. A script because the
/// owner check and the PEXPIRE must be atomic: otherwise an expired holder
/// could extend the lease of whoever took the lock in between.
/// KEYS: lock, expiry. ARGV: name, owner, ttl ms. Returns 1 if renewed.
static LOCK_RENEW: LazyLock<Script> = LazyLock::new(|| {
    store_script(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('ZADD', KEYS[2], 'XX', now_ms() + tonumber(ARGV[3]), ARGV[1])
  return 1
end
return 0
"#,
    )
});

/// Release a lock only if the caller still holds it: an expired holder must
/// not delete the new holder's lock.
/// KEYS: lock, sizes, expiry, totals. ARGV: name, owner. Returns 1 if
/// released.
static LOCK_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    store_script(
        r#"
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
local db, dk = store_delta(KEYS[2], ARGV[1], 0)
store_apply(KEYS[2], KEYS[3], KEYS[4], ARGV[1], 0, nil, db, dk)
return 1
"#,
    )
});

/// Lua shared by the step scripts: `fenced(job_key, token)` is false when
/// the job's lease names another delivery; `holder(claim)` is the job id a
/// claim value (`JOB TOKEN`) names.
const STEP_LUA: &str = r#"
local function fenced(job_key, token)
  return job_key == '' or redis.call('HGET', job_key, 'lease') == token
end
local function holder(claim)
  return string.match(claim, '^[^ ]*')
end
"#;

/// A step script: [`STORE_LUA`], [`STEP_LUA`], then `body`.
fn step_script(body: &str) -> Script {
    Script::new(&format!("{STORE_LUA}{STEP_LUA}{body}"))
}

/// Decide whether a delivery may run a step, and claim it if so. A script
/// because "not done and not claimed by another job, so claim it" is a
/// read-then-write that two runs must not interleave. Under a store quota
/// a claim reserves room for the step's output (`reserve` bytes, see
/// [`step_reserve`]), so completing the step, which is never refused, can
/// pass the quota by at most the part of one output past its reservation;
/// a claim that would pass the quota is refused: before the step's side
/// effect, never after it (see [`STEP_COMPLETE`]).
/// KEYS: step_done, step_claim, job (or '' when unfenced), sizes, expiry,
/// totals. ARGV: claim name, claim value (`JOB TOKEN`), job id, token,
/// lease ms, max bytes, max keys, reserve bytes.
/// Returns {'done', output}, {'busy'}, {'run'} or {'lost'}.
static STEP_BEGIN: LazyLock<Script> = LazyLock::new(|| {
    step_script(
        r#"
if not fenced(KEYS[3], ARGV[4]) then return {'lost'} end
local done = redis.call('GET', KEYS[1])
if done then return {'done', done} end
local claim = redis.call('GET', KEYS[2])
if claim and holder(claim) ~= ARGV[3] then return {'busy'} end
local now = now_ms()
store_purge(KEYS[4], KEYS[5], KEYS[6], now)
local size = #ARGV[1] + #ARGV[2] + tonumber(ARGV[8])
local db, dk = store_delta(KEYS[4], ARGV[1], size)
local why = store_refusal(KEYS[6], db, dk, tonumber(ARGV[6]), tonumber(ARGV[7]))
if why then return redis.error_reply('QUOTA ' .. why) end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[5])
store_apply(KEYS[4], KEYS[5], KEYS[6], ARGV[1], size, now + tonumber(ARGV[5]), db, dk)
return {'run'}
"#,
    )
});

/// Record a step's output and drop the caller's claim, unless the caller's
/// delivery lost its lease (then nothing is recorded: 'lost'). Never
/// refused by the quota: the step's side effect has happened, and losing
/// its marker would run it again; the quota stops new claims instead.
/// KEYS: step_done, step_claim, job (or ''), sizes, expiry, totals.
/// ARGV: done name, claim name, job id, token, output, ttl ms (0 = none).
static STEP_COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    step_script(
        r#"
if not fenced(KEYS[3], ARGV[4]) then return 'lost' end
local now = now_ms()
store_purge(KEYS[4], KEYS[5], KEYS[6], now)
local size = #ARGV[1] + #ARGV[5]
local db, dk = store_delta(KEYS[4], ARGV[1], size)
local ttl, expires = tonumber(ARGV[6]), nil
if ttl > 0 then
  redis.call('SET', KEYS[1], ARGV[5], 'PX', ttl)
  expires = now + ttl
else
  redis.call('SET', KEYS[1], ARGV[5])
end
store_apply(KEYS[4], KEYS[5], KEYS[6], ARGV[1], size, expires, db, dk)
local claim = redis.call('GET', KEYS[2])
if claim and holder(claim) == ARGV[3] then
  redis.call('DEL', KEYS[2])
  local cb, ck = store_delta(KEYS[4], ARGV[2], 0)
  store_apply(KEYS[4], KEYS[5], KEYS[6], ARGV[2], 0, nil, cb, ck)
end
return 'ok'
"#,
    )
});

/// Drop a step claim only if the caller's delivery holds it: not another
/// job's (the claim lapsed and was taken), and not a later delivery's of
/// the same job (which took it over from the caller, whose lease was lost).
/// KEYS: step_claim, job (or '' when unfenced), sizes, expiry, totals.
/// ARGV: claim name, claim value (`JOB TOKEN`), token.
static STEP_ABANDON: LazyLock<Script> = LazyLock::new(|| {
    step_script(
        r#"
if not fenced(KEYS[2], ARGV[3]) then return 0 end
local claim = redis.call('GET', KEYS[1])
if claim == ARGV[2] then
  redis.call('DEL', KEYS[1])
  local db, dk = store_delta(KEYS[3], ARGV[1], 0)
  store_apply(KEYS[3], KEYS[4], KEYS[5], ARGV[1], 0, nil, db, dk)
end
return 1
"#,
    )
});

/// The tenant's store totals, with lapsed entries purged first.
/// KEYS: sizes, expiry, totals. Returns {bytes, keys}.
pub static STORE_TOTALS: LazyLock<Script> = LazyLock::new(|| {
    store_script(
        r#"
local now = now_ms()
for _ = 1, 200 do
  if redis.call('ZCOUNT', KEYS[2], '-inf', now) == 0 then break end
  store_purge(KEYS[1], KEYS[2], KEYS[3], now)
end
local t = redis.call('HMGET', KEYS[3], 'bytes', 'keys')
return {tonumber(t[1]) or 0, tonumber(t[2]) or 0}
"#,
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

/// Whose problem a Redis error of operation `op` is (see [`BackendError`]):
/// a quota refusal is a denial; Redis refusing the request itself (a
/// counter that would overflow, an expiry out of range) is the guest's;
/// anything else (a lost connection, out of memory, an ACL, a read-only
/// replica, a script error) is the host's.
pub fn classify_redis(op: &str, e: &RedisError) -> BackendError {
    let detail = e.detail().unwrap_or_default();
    match e.code() {
        Some("QUOTA") => BackendError::Denied(detail.to_string()),
        Some("ERR")
            if [
                "overflow",
                "invalid expire",
                "not an integer",
                "out of range",
            ]
            .iter()
            .any(|m| detail.contains(m)) =>
        {
            BackendError::Invalid(format!("redis {op} refused it: {detail}"))
        }
        _ => BackendError::Unavailable(format!("redis {op}: {e}")),
    }
}

/// [`classify_redis`] for an error that may wrap a Redis error.
pub fn classify(op: &str, e: &anyhow::Error) -> BackendError {
    match e.downcast_ref::<RedisError>() {
        Some(redis) => classify_redis(op, redis),
        None => BackendError::Unavailable(format!("{op}: {e:#}")),
    }
}

/// Maps a Redis error of `op` with [`classify_redis`].
fn failed(op: &'static str) -> impl Fn(RedisError) -> BackendError {
    move |e| classify_redis(op, &e)
}

impl RedisBackend {
    /// A backend on `conn`, without a child-job enqueuer or a quota.
    pub fn new(conn: ConnectionManager) -> Self {
        RedisBackend {
            conn,
            enqueuer: None,
            quota: StoreQuota::default(),
        }
    }

    /// Hand child jobs to `e` (the broker).
    pub fn with_enqueuer(mut self, e: Arc<dyn ChildEnqueuer>) -> Self {
        self.enqueuer = Some(e);
        self
    }

    /// Refuse writes past `quota`.
    pub fn with_quota(mut self, quota: StoreQuota) -> Self {
        self.quota = quota;
        self
    }

    /// A handle for one call (the manager multiplexes clones on one
    /// connection).
    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The job key a claimant's step scripts check the lease in ('' when
    /// unfenced) and the claim's value.
    fn fence(keys: &Keys, claimant: &Claimant) -> (String, String, String) {
        match &claimant.token {
            Some(token) => (
                keys.job(&claimant.job),
                format!("{} {token}", claimant.job),
                token.clone(),
            ),
            None => (String::new(), claimant.job.clone(), String::new()),
        }
    }
}

/// A call of `script` on the `data` keys, with the store accounting keys
/// of `keys` after them.
fn accounted<'a>(script: &'a Script, keys: &Keys, data: &[&str]) -> redis::ScriptInvocation<'a> {
    let mut call = script.prepare_invoke();
    for k in data {
        call.key(*k);
    }
    call.key(keys.store_sizes())
        .key(keys.store_expiry())
        .key(keys.store_totals());
    call
}

/// The store totals of `tenant`: (bytes, entries).
pub async fn store_totals(
    conn: &mut ConnectionManager,
    tenant: &str,
) -> redis::RedisResult<(u64, u64)> {
    let keys = Keys::new(tenant);
    STORE_TOTALS
        .key(keys.store_sizes())
        .key(keys.store_expiry())
        .key(keys.store_totals())
        .invoke_async(conn)
        .await
}

#[async_trait]
impl Backend for RedisBackend {
    async fn kv_get(&self, tenant: &str, key: &str) -> BackendResult<Option<Vec<u8>>> {
        redis::cmd("GET")
            .arg(Keys::new(tenant).kv(key))
            .query_async(&mut self.conn())
            .await
            .map_err(failed("kv get"))
    }

    async fn kv_set(
        &self,
        tenant: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> BackendResult<()> {
        let keys = Keys::new(tenant);
        let entry = keys.kv(key);
        let _: i64 = accounted(&KV_SET, &keys, &[&entry])
            .arg(keys.relative(&entry))
            .arg(value)
            .arg(ttl.map_or(0, ms))
            .arg("0")
            .arg(self.quota.max_bytes)
            .arg(self.quota.max_keys)
            .invoke_async(&mut self.conn())
            .await
            .map_err(failed("kv set"))?;
        Ok(())
    }

    async fn kv_set_if_absent(
        &self,
        tenant: &str,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> BackendResult<bool> {
        let keys = Keys::new(tenant);
        let entry = keys.kv(key);
        let stored: i64 = accounted(&KV_SET, &keys, &[&entry])
            .arg(keys.relative(&entry))
            .arg(value)
            .arg(ttl.map_or(0, ms))
            .arg("1")
            .arg(self.quota.max_bytes)
            .arg(self.quota.max_keys)
            .invoke_async(&mut self.conn())
            .await
            .map_err(failed("kv set-if-absent"))?;
        Ok(stored == 1)
    }

    async fn kv_delete(&self, tenant: &str, key: &str) -> BackendResult<bool> {
        let keys = Keys::new(tenant);
        let entry = keys.kv(key);
        let removed: i64 = accounted(&DELETE, &keys, &[&entry])
            .arg(keys.relative(&entry))
            .invoke_async(&mut self.conn())
            .await
            .map_err(failed("kv delete"))?;
        Ok(removed > 0)
    }

    async fn counter_incr(&self, tenant: &str, name: &str, delta: i64) -> BackendResult<i64> {
        let keys = Keys::new(tenant);
        let counter = keys.counter(name);
        accounted(&COUNTER_INCR, &keys, &[&counter])
            .arg(keys.relative(&counter))
            .arg(delta)
            .arg(self.quota.max_bytes)
            .arg(self.quota.max_keys)
            .invoke_async(&mut self.conn())
            .await
            .map_err(failed("counter incr"))
    }

    async fn counter_incr_once(
        &self,
        tenant: &str,
        name: &str,
        delta: i64,
        once_key: &str,
    ) -> BackendResult<i64> {
        let keys = Keys::new(tenant);
        let (counter, once) = (keys.counter(name), keys.counted_once(once_key));
        accounted(&COUNTER_INCR_ONCE, &keys, &[&counter, &once])
            .arg(keys.relative(&counter))
            .arg(keys.relative(&once))
            .arg(delta)
            .arg(self.quota.max_bytes)
            .arg(self.quota.max_keys)
            .invoke_async(&mut self.conn())
            .await
            .map_err(failed("counter incr-once"))
    }

    async fn counter_get(&self, tenant: &str, name: &str) -> BackendResult<i64> {
        let value: Option<i64> = redis::cmd("GET")
            .arg(Keys::new(tenant).counter(name))
            .query_async(&mut self.conn())
            .await
            .map_err(failed("counter get"))?;
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
        let (lock, fence) = (keys.lock(name), keys.fence(name));
        accounted(&LOCK_ACQUIRE, &keys, &[&lock, &fence])
            .arg(keys.relative(&lock))
            .arg(keys.relative(&fence))
            .arg(owner)
            .arg(ms(ttl))
            .arg(self.quota.max_bytes)
            .arg(self.quota.max_keys)
            .invoke_async(&mut self.conn())
            .await
            .map_err(failed("lock acquire"))
    }

    async fn lock_renew(
        &self,
        tenant: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> BackendResult<bool> {
        let keys = Keys::new(tenant);
        let lock = keys.lock(name);
        LOCK_RENEW
            .key(&lock)
            .key(keys.store_expiry())
            .arg(keys.relative(&lock))
            .arg(owner)
            .arg(ms(ttl))
            .invoke_async(&mut self.conn())
            .await
            .map_err(failed("lock renew"))
    }

    async fn lock_release(&self, tenant: &str, name: &str, owner: &str) -> BackendResult<bool> {
        let keys = Keys::new(tenant);
        let lock = keys.lock(name);
        accounted(&LOCK_RELEASE, &keys, &[&lock])
            .arg(keys.relative(&lock))
            .arg(owner)
            .invoke_async(&mut self.conn())
            .await
            .map_err(failed("lock release"))
    }

    async fn step_begin(
        &self,
        tenant: &str,
        key: &str,
        claimant: &Claimant,
        lease: Duration,
    ) -> BackendResult<StepState> {
        let keys = Keys::new(tenant);
        let (done, claim) = (keys.step_done(key), keys.step_claim(key));
        let (job, value, token) = Self::fence(&keys, claimant);
        let reply: Vec<Vec<u8>> = idempotent(|| async {
            accounted(&STEP_BEGIN, &keys, &[&done, &claim, &job])
                .arg(keys.relative(&claim))
                .arg(&value)
                .arg(&claimant.job)
                .arg(&token)
                .arg(ms(lease))
                .arg(self.quota.max_bytes)
                .arg(self.quota.max_keys)
                .arg(step_reserve(self.quota))
                .invoke_async(&mut self.conn())
                .await
        })
        .await
        .map_err(failed("step begin"))?;
        let mut reply = reply.into_iter();
        match (reply.next().as_deref(), reply.next()) {
            (Some(b"done"), Some(output)) => Ok(StepState::Done(output)),
            (Some(b"busy"), None) => Ok(StepState::Busy),
            (Some(b"run"), None) => Ok(StepState::Run),
            (Some(b"lost"), None) => Err(lease_lost(key)),
            _ => Err(BackendError::Unavailable(
                "redis step begin: unexpected script reply".to_string(),
            )),
        }
    }

    async fn step_complete(
        &self,
        tenant: &str,
        key: &str,
        claimant: &Claimant,
        output: &[u8],
        ttl: Option<Duration>,
    ) -> BackendResult<()> {
        let keys = Keys::new(tenant);
        let (done, claim) = (keys.step_done(key), keys.step_claim(key));
        let (job, _, token) = Self::fence(&keys, claimant);
        let reply: String = idempotent(|| async {
            accounted(&STEP_COMPLETE, &keys, &[&done, &claim, &job])
                .arg(keys.relative(&done))
                .arg(keys.relative(&claim))
                .arg(&claimant.job)
                .arg(&token)
                .arg(output)
                .arg(ttl.map_or(0, ms))
                .invoke_async(&mut self.conn())
                .await
        })
        .await
        .map_err(failed("step complete"))?;
        match reply.as_str() {
            "ok" => Ok(()),
            _ => Err(lease_lost(key)),
        }
    }

    async fn step_abandon(
        &self,
        tenant: &str,
        key: &str,
        claimant: &Claimant,
    ) -> BackendResult<()> {
        let keys = Keys::new(tenant);
        let claim = keys.step_claim(key);
        let (job, value, token) = Self::fence(&keys, claimant);
        idempotent(|| async {
            accounted(&STEP_ABANDON, &keys, &[&claim, &job])
                .arg(keys.relative(&claim))
                .arg(&value)
                .arg(&token)
                .invoke_async::<()>(&mut self.conn())
                .await
        })
        .await
        .map_err(failed("step abandon"))
    }

    async fn enqueue_child(&self, tenant: &str, child: ChildJob) -> BackendResult<String> {
        match &self.enqueuer {
            Some(e) => e.enqueue_child(tenant, child).await,
            None => Err(BackendError::Unavailable(
                "child jobs need a broker".to_string(),
            )),
        }
    }

    async fn start_flow(&self, tenant: &str, request: FlowRequest) -> BackendResult<StartedFlow> {
        match &self.enqueuer {
            Some(e) => e.start_flow(tenant, request).await,
            None => Err(BackendError::Unavailable(
                "workflows need a broker".to_string(),
            )),
        }
    }
    async fn secret_sealed(
        &self,
        tenant: &str,
        task: &str,
        name: &str,
    ) -> BackendResult<Option<(String, Vec<u8>)>> {
        let fields = crate::secrets::lookup_fields(name, task);
        let values: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
            .arg(Keys::new(tenant).secrets())
            .arg(&fields[..])
            .query_async(&mut self.conn())
            .await
            .map_err(failed("secret get"))?;
        Ok(fields
            .into_iter()
            .zip(values)
            .find_map(|(field, value)| value.map(|v| (field, v))))
    }
}

/// Bytes a step claim reserves for the step's output under a store quota:
/// the largest output there is ([`MAX_VALUE_BYTES`]), or an eighth of a
/// smaller quota. Completing a step is never refused (its effect has
/// happened), so without a reservation a guest could open many small claims
/// under its quota and fill each with a megabyte; with it, at most eight
/// claims are open at once under a small quota, and each can pass its
/// reservation by less than one output.
pub fn step_reserve(quota: StoreQuota) -> u64 {
    match quota.max_bytes {
        0 => 0,
        max => (MAX_VALUE_BYTES as u64).min(max / 8),
    }
}

/// The error of a step call made by a delivery that lost its lease.
fn lease_lost(key: &str) -> BackendError {
    BackendError::LeaseLost(format!(
        "step {key:?}: this delivery lost the job's lease (another delivery owns the job now)"
    ))
}
