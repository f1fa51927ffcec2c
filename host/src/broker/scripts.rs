//! The Lua scripts that move jobs between states. Each is one atomic step
//! (Redis runs a script to completion before any other command), so a job is
//! always in exactly one of ready / delayed / leased / dead / finished.
//!
//! Keys are computed inside the scripts from the tenant prefix for per-job
//! keys; every key carries the tenant's hash tag, so they share a slot.
//!
//! The happy path (fetch, run, succeed) is what Redis spends its CPU on at
//! tens of thousands of jobs a second, so it writes as little as it can: per
//! job, one read and one write of the job hash when leased, and one read,
//! one write and one expiry when it succeeds; the lease set is updated once
//! per batch. The job's `history` list records only what went wrong
//! (retries, expired leases, releases, death), each with the `started`
//! event of the attempt it ended; `Broker::status` adds the enqueue, the
//! current attempt's start and the success from the job hash's timestamps.
//! `done:ID` is pushed only for jobs someone waits on (`notify`, set by
//! [`WATCH_RESULT`]).

use std::sync::LazyLock;

use redis::Script;

/// Lua shared by the scripts that record history: `history(job_key,
/// history_key, at_ms, event, detail)` appends one event and marks the job
/// as having a history list (so its success also expires that list), and
/// `started(job_key, history_key, fields)` records the start of the attempt
/// that is ending, from the job's `started_at_ms`, `attempt` and `worker`.
const HISTORY_LUA: &str = r#"
local function history(job_key, history_key, at_ms, event, detail)
  redis.call('RPUSH', history_key, cjson.encode({at_ms = at_ms, event = event, detail = detail}))
  redis.call('HSET', job_key, 'has_history', '1')
end
local function started(job_key, history_key, started_at_ms, attempt, worker)
  history(job_key, history_key, tonumber(started_at_ms) or 0, 'started',
    'attempt ' .. (attempt or '?') .. ' on ' .. (worker or '?'))
end
"#;

/// A script whose source is [`HISTORY_LUA`] followed by `body`.
fn with_history(body: &str) -> Script {
    Script::new(&format!("{HISTORY_LUA}{body}"))
}

/// Enqueue. KEYS: job, ready, delayed, signal, idem-or-empty, seq.
/// ARGV: id, envelope, priority (0-9), due_ms (0 = now), now_ms, idem_ttl_ms.
/// The ready-queue score is (9 - priority) * 2^44 + a per-queue sequence
/// number, so higher priorities run first and equal priorities in enqueue
/// order, whatever the producers' clocks say. Returns {id, "new"} or
/// {existing_id, "duplicate"}.
pub static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if KEYS[5] ~= '' then
  if not redis.call('SET', KEYS[5], ARGV[1], 'NX', 'PX', ARGV[6]) then
    return {redis.call('GET', KEYS[5]), 'duplicate'}
  end
end
local due = tonumber(ARGV[4])
local state = 'queued'
if due > tonumber(ARGV[5]) then state = 'scheduled' end
local score = (9 - tonumber(ARGV[3])) * 17592186044416 + redis.call('INCR', KEYS[6])
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'envelope', ARGV[2], 'state', state, 'attempt', 0,
  'deliveries', 0, 'score', string.format('%.0f', score), 'enqueued_at_ms', ARGV[5],
  'enqueued_at_us', t[1] .. string.format('%06d', t[2]))
if state == 'scheduled' then
  redis.call('ZADD', KEYS[3], due, ARGV[1])
else
  redis.call('ZADD', KEYS[2], score, ARGV[1])
end
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, 63)
return {ARGV[1], 'new'}
"#,
    )
});

/// Fetch up to n jobs. KEYS: ready, delayed, leased, dead, inflight.
/// ARGV: prefix, now_ms, n, lease_ms, worker, max_deliveries,
/// cluster_cap (0 = none), finished_ttl_ms.
/// First promotes due delayed jobs and reclaims expired leases (their
/// workers died), then pops by score and leases each popped job.
/// With a cluster cap, the tenant's `inflight` set (every job of the tenant
/// leased by any worker, scored by lease expiry) bounds n, and each leased
/// job joins it; the entries of dead workers count until their lease ends.
/// Returns a flat list: id, envelope, attempt, lease token, ...
/// A popped id without a job record is dropped.
pub static FETCH: LazyLock<Script> = LazyLock::new(|| {
    with_history(
        r#"
local prefix, now, n, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local worker, max_deliveries, cap = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local function job(id) return prefix .. 'job:' .. id end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', KEYS[2], id)
  local score = redis.call('HGET', job(id), 'score')
  if score then
    redis.call('ZADD', KEYS[1], score, id)
    redis.call('HSET', job(id), 'state', 'queued')
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZREM', KEYS[5], id)
  local f = redis.call('HMGET', job(id), 'score', 'deliveries', 'started_at_ms', 'attempt',
    'worker', 'notify')
  if f[1] then
    local h = prefix .. 'history:' .. id
    started(job(id), h, f[3], f[4], f[5])
    local deliveries = tonumber(f[2] or '0')
    if deliveries >= max_deliveries then
      local err = cjson.encode({category = 'trap', message = 'delivered ' .. deliveries ..
        ' times and never finished: its worker died each time (poison job?)'})
      redis.call('HSET', job(id), 'state', 'dead', 'last_error', err, 'lease', '')
      redis.call('ZADD', KEYS[4], now, id)
      history(job(id), h, now, 'dead', err)
      if f[6] == '1' then
        local done = prefix .. 'done:' .. id
        redis.call('RPUSH', done, 'dead')
        redis.call('PEXPIRE', done, ARGV[8])
      end
    else
      redis.call('ZADD', KEYS[1], f[1], id)
      redis.call('HSET', job(id), 'state', 'queued', 'lease', '')
      history(job(id), h, now, 'lease-expired', 'redelivered after its worker stopped renewing the lease')
    end
  end
end
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  n = math.min(n, cap - redis.call('ZCARD', KEYS[5]))
  if n <= 0 then return {} end
end
local popped = redis.call('ZPOPMIN', KEYS[1], n)
if #popped == 0 then return {} end
local t = redis.call('TIME')
local now_us = t[1] .. string.format('%06d', t[2])
local capped = ''
if cap > 0 then capped = '1' end
-- Numbers go to Redis as strings; Lua's own conversion formats them as
-- doubles, which costs more than the commands here, so format integers
-- once with %d.
local expiry = string.format('%d', now + lease)
local out, leases = {}, {}
for i = 1, #popped, 2 do
  local id = popped[i]
  local f = redis.call('HMGET', job(id), 'envelope', 'deliveries', 'attempt')
  if f[1] then
    local deliveries = string.format('%d', (tonumber(f[2]) or 0) + 1)
    local attempt = (tonumber(f[3]) or 0) + 1
    local token = worker .. ':' .. deliveries
    redis.call('HSET', job(id), 'state', 'active', 'lease', token, 'deliveries', deliveries,
      'attempt', string.format('%d', attempt), 'started_at_ms', ARGV[2],
      'started_at_us', now_us, 'worker', worker, 'capped', capped)
    leases[#leases + 1] = expiry
    leases[#leases + 1] = id
    out[#out + 1] = id
    out[#out + 1] = f[1]
    out[#out + 1] = attempt
    out[#out + 1] = token
  end
end
if #leases > 0 then
  redis.call('ZADD', KEYS[3], unpack(leases))
  if cap > 0 then redis.call('ZADD', KEYS[5], unpack(leases)) end
end
return out
"#,
    )
});

/// Extend leases. KEYS: leased, inflight. ARGV: prefix, expiry_ms, id1,
/// token1, ...
/// Only jobs whose lease token still matches are extended (a job whose lease
/// lapsed and was redelivered belongs to its new holder). Returns the count.
pub static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local renewed = 0
for i = 3, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  if redis.call('HGET', ARGV[1] .. 'job:' .. id, 'lease') == token then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[2], id)
    redis.call('ZADD', KEYS[2], 'XX', ARGV[2], id)
    renewed = renewed + 1
  end
end
return renewed
"#,
    )
});

/// Record outcomes of many deliveries in one call (the worker batches
/// whatever finished since its last call: fewer script invocations, which
/// cost more than the commands they run).
/// ARGV: prefix, now_ms, finished_ttl_ms, then the batch's usage totals
/// (runs, fuel, wall_time_us, memory_byte_seconds, net_out_bytes,
/// net_in_bytes, run_time_us) added to the tenant's `usage` hash, then per
/// job 10
/// fields: id, queue, token, outcome ('succeeded' | 'retry' | 'host-retry'
/// | 'dead' | 'release'), result, result_ttl_ms (0 = do not store),
/// retry_at_ms, error_json, usage_json, idempotency key name or ''.
/// Returns one 'ok' per job, or 'stale' when the caller no longer holds that
/// job's lease (its outcome is dropped: the job belongs to whoever holds it
/// now). Keys are derived from the prefix; all share the tenant's hash tag.
pub static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    with_history(
        r#"
local prefix, now, retention = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local t = redis.call('TIME')
local now_us = t[1] .. string.format('%06d', t[2])
-- The tenant's usage, summed over the batch by the worker: one write per
-- batch, not per job.
if tonumber(ARGV[4]) > 0 then
  local usage_key = prefix .. 'usage'
  redis.call('HINCRBY', usage_key, 'runs', ARGV[4])
  redis.call('HINCRBY', usage_key, 'fuel', ARGV[5])
  redis.call('HINCRBY', usage_key, 'wall_time_us', ARGV[6])
  redis.call('HINCRBY', usage_key, 'memory_byte_seconds', ARGV[7])
  redis.call('HINCRBY', usage_key, 'run_time_us', ARGV[10])
  if tonumber(ARGV[8]) > 0 or tonumber(ARGV[9]) > 0 then
    redis.call('HINCRBY', usage_key, 'net_out_bytes', ARGV[8])
    redis.call('HINCRBY', usage_key, 'net_in_bytes', ARGV[9])
  end
end
local out, unleased = {}, {}
for i = 11, #ARGV, 10 do
  local id, queue, token, outcome = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local result, result_ttl, retry_at = ARGV[i + 4], tonumber(ARGV[i + 5]), ARGV[i + 6]
  local err, usage, idem = ARGV[i + 7], ARGV[i + 8], ARGV[i + 9]
  local job = prefix .. 'job:' .. id
  local h = prefix .. 'history:' .. id
  local q = prefix .. 'queue:' .. queue .. ':'
  local f = redis.call('HMGET', job, 'lease', 'notify', 'capped', 'has_history',
    'started_at_ms', 'attempt', 'worker')
  if f[1] ~= token then
    out[#out + 1] = 'stale'
  else
    -- Off the lease set in one ZREM per queue after the loop.
    local ids = unleased[queue]
    if not ids then ids = {}; unleased[queue] = ids end
    ids[#ids + 1] = id
    -- A job counted against its tenant's cluster-wide cap frees its place:
    -- wake a worker that may have been turned away by the cap.
    if f[3] == '1' and redis.call('ZREM', prefix .. 'inflight', id) == 1 then
      redis.call('LPUSH', q .. 'signal', '1')
      redis.call('LTRIM', q .. 'signal', 0, 63)
    end
    if outcome ~= 'succeeded' then started(job, h, f[5], f[6], f[7]) end
    if outcome == 'release' then
      -- Shutdown before the job finished: back to the front of its queue.
      redis.call('HINCRBY', job, 'attempt', -1)
      redis.call('HSET', job, 'state', 'queued', 'lease', '')
      redis.call('ZADD', q .. 'ready', redis.call('HGET', job, 'score'), id)
      history(job, h, now, 'released')
    elseif outcome == 'retry' or outcome == 'host-retry' then
      -- A host-side failure does not use up one of the task's attempts.
      if outcome == 'host-retry' then redis.call('HINCRBY', job, 'attempt', -1) end
      redis.call('HSET', job, 'state', 'scheduled', 'last_error', err, 'lease', '', 'usage', usage)
      redis.call('ZADD', q .. 'delayed', retry_at, id)
      redis.call('RPUSH', h, cjson.encode({at_ms = now, event = outcome, detail = err,
        retry_at_ms = tonumber(retry_at)}))
    elseif outcome == 'succeeded' then
      if result_ttl > 0 then
        redis.call('SET', prefix .. 'result:' .. id, result, 'PX', result_ttl)
        redis.call('HSET', job, 'state', 'succeeded', 'lease', '', 'usage', usage,
          'finished_at_ms', ARGV[2], 'finished_at_us', now_us, 'result_stored', '1')
      else
        redis.call('HSET', job, 'state', 'succeeded', 'lease', '', 'usage', usage,
          'finished_at_ms', ARGV[2], 'finished_at_us', now_us)
      end
      redis.call('PEXPIRE', job, retention)
      if f[4] == '1' then redis.call('PEXPIRE', h, retention) end
    else
      redis.call('HSET', job, 'state', 'dead', 'last_error', err, 'lease', '', 'usage', usage,
        'finished_at_ms', now, 'finished_at_us', now_us)
      redis.call('ZADD', prefix .. 'dead', now, id)
      history(job, h, now, 'dead', err)
      -- A failed job does not hold its idempotency key: a new enqueue may run.
      if idem ~= '' then redis.call('DEL', idem) end
    end
    -- Wake `result --wait` callers, if any registered.
    if f[2] == '1' and (outcome == 'succeeded' or outcome == 'dead') then
      local done = prefix .. 'done:' .. id
      redis.call('RPUSH', done, outcome)
      redis.call('PEXPIRE', done, retention)
    end
    out[#out + 1] = 'ok'
  end
end
for queue, ids in pairs(unleased) do
  redis.call('ZREM', prefix .. 'queue:' .. queue .. ':leased', unpack(ids))
end
return out
"#,
    )
});

/// Ask to be woken when a job finishes. KEYS: job. Marks an existing job so
/// that its completion pushes `done:ID`; returns its state (nil when there
/// is no such job). Run *before* checking whether the job has finished:
/// Redis orders this script and the completion, so either the check sees
/// the job finished or the completion sees the mark.
pub static WATCH_RESULT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local state = redis.call('HGET', KEYS[1], 'state')
if state then redis.call('HSET', KEYS[1], 'notify', '1') end
return state
"#,
    )
});
