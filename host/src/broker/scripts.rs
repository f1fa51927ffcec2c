//! The Lua scripts that move jobs between states. Each is one atomic step
//! (Redis runs a script to completion before any other command), so a job is
//! always in exactly one of ready / delayed / leased / dead / finished.
//!
//! Every time that decides delivery (enqueue, due times, lease expiry,
//! retries) is read from the Redis server's clock (`TIME`) inside the
//! script: workers and producers whose clocks disagree cannot redeliver a
//! live job or start a delayed one early. Callers pass durations, not
//! instants (an `--eta` is the one instant, and it is the user's).
//!
//! Keys: the scripts name the queue-level keys in `KEYS`; per-job keys
//! (`job:ID`, `history:ID`, ...) are built inside from the tenant prefix.
//! Every key carries the tenant's hash tag, so all of them share a slot.
//!
//! Under `maxmemory` Redis refuses a script at its first command that
//! needs memory unless the script has already written (see
//! docs/redis-layout.md), so a script either changes nothing or runs to
//! the end: an OOM never leaves a job half moved.
//!
//! The happy path (fetch, run, succeed) is what Redis spends its CPU on at
//! tens of thousands of jobs a second, so it writes as little as it can: per
//! job, one read and one write of the job hash when leased, and one read,
//! one write and one expiry when it succeeds; the lease set is updated once
//! per batch. The job's `history` list records only what went wrong
//! (retries, expired leases, releases, death), each with the `started`
//! event of the attempt it ended, and keeps the last [`MAX_HISTORY`]
//! events; `Broker::status` adds the enqueue, the current attempt's start
//! and the success from the job hash's timestamps. `done:ID` is pushed only
//! for jobs someone waits on (`notify`, set by [`WATCH_RESULT`]).

use std::sync::LazyLock;

use redis::Script;

use super::envelope::PRIORITY_BAND;
use crate::gates::{
    KEY_LANE_RECHECK, LANES_PER_FETCH, LANE_RELEASE_BATCH, MAX_LANES_LISTED,
    MAX_SET_ASIDE_PER_FETCH, RATE_BURST_DIVISOR,
};
use crate::keys::{FINISHED_INDEX_KEPT, STATS_RETENTION_MINUTES};

/// Events a job's history keeps (the oldest are dropped): a job retried
/// or redelivered without end must not grow Redis without end.
pub const MAX_HISTORY: usize = 100;

/// Workers a job's record names as having lost its lease (the most recent
/// ones), so a dead-lettered poison job says who died with it.
pub const MAX_LOST_WORKERS: usize = 10;

/// Lua shared by the scripts that record history:
/// - `history(job_key, history_key, at_ms, event, detail)` appends one
///   event, trims the list to the last [`MAX_HISTORY`], and marks the job
///   as having a history list (so its success also expires that list);
/// - `started(job_key, history_key, started_at_ms, attempt, worker)`
///   records the start of the attempt that is ending;
/// - `release_idempotency(job_key, id, index_key)` frees the job's
///   idempotency key, only if it still names this job (a newer job may
///   hold it by now);
/// - `wake(prefix, id, notify, what, retention)` pushes `done:ID` for
///   `result --wait` callers, if any registered.
fn shared_lua() -> String {
    let stats_ms = STATS_RETENTION_MINUTES * 60_000;
    format!(
        r#"
local MAX_HISTORY = {MAX_HISTORY}
local STATS_RETENTION_MS = {stats_ms}
local FINISHED_INDEX_KEPT = {FINISHED_INDEX_KEPT}
local function history(job_key, history_key, at_ms, event, detail)
  redis.call('RPUSH', history_key, cjson.encode({{at_ms = at_ms, event = event, detail = detail}}))
  redis.call('LTRIM', history_key, -MAX_HISTORY, -1)
  redis.call('HSET', job_key, 'has_history', '1')
end
local function started(job_key, history_key, started_at_ms, attempt, worker)
  history(job_key, history_key, tonumber(started_at_ms) or 0, 'started',
    'attempt ' .. (attempt or '?') .. ' on ' .. (worker or '?'))
end
local function release_idempotency(job_key, id, index_key)
  local idem = redis.call('HGET', job_key, 'idem')
  if idem and idem ~= '' and redis.call('GET', idem) == id then
    redis.call('DEL', idem)
    redis.call('ZREM', index_key, idem)
  end
end
-- Per-minute outcome counts (see `keys::Keys::stats`): `tally` adds to a
-- table, `flush_tallies` writes it once per script call.
local function tally(tallies, queue, task, outcome)
  local q = 'queue:' .. queue .. ':' .. outcome
  tallies[q] = (tallies[q] or 0) + 1
  if task and task ~= '' then
    local t = 'task:' .. task .. ':' .. outcome
    tallies[t] = (tallies[t] or 0) + 1
  end
end
local function flush_tallies(prefix, now, tallies)
  local key = prefix .. 'stats:' .. string.format('%d', math.floor(now / 60000))
  local any = false
  for field, count in pairs(tallies) do
    redis.call('HINCRBY', key, field, count)
    any = true
  end
  if any then redis.call('PEXPIRE', key, STATS_RETENTION_MS) end
end
-- The task of a job, from its envelope ('' when it cannot be read).
local function task_of(envelope)
  if not envelope then return '' end
  local ok, decoded = pcall(cjson.decode, envelope)
  if ok and type(decoded) == 'table' and type(decoded.task) == 'string' then return decoded.task end
  return ''
end
local function wake(prefix, id, notify, what, retention)
  if notify == '1' then
    local done = prefix .. 'done:' .. id
    redis.call('RPUSH', done, what)
    redis.call('PEXPIRE', done, retention)
  end
end
"#
    )
}

/// `clock()`: the server's time as (ms, "seconds+micros" string).
const CLOCK_LUA: &str = r#"
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), t[1] .. string.format('%06d', t[2])
end
"#;

/// Lua shared by the scripts that pass jobs through gates (see `gates`):
/// - `gate_of(gate)` reads a job's `gate` field: its task, whether the
///   task is rate limited, and its concurrency key's lane ('' for none);
/// - `rate_cfg(text)` reads a `rate:TASK` config: the emission interval
///   and the burst tolerance (ms), or nil;
/// - `release_key(prefix, lane, id, lanes_key, signal_key, now)` frees
///   the job's place under its key and, if the key has jobs waiting,
///   opens its lane now and wakes a worker.
fn gate_lua() -> String {
    format!(
        r#"
local RATE_BURST_DIVISOR = {RATE_BURST_DIVISOR}
local function gate_of(gate)
  local flags, len, rest = string.match(gate or '', '^(%a+):(%d+):(.*)$')
  if not flags then return nil end
  len = tonumber(len)
  local task = string.sub(rest, 1, len)
  local key_lane = ''
  if string.find(flags, 'k', 1, true) then
    key_lane = 'k:' .. len .. ':' .. task .. ':' .. string.sub(rest, len + 2)
  end
  return task, string.find(flags, 'r', 1, true) ~= nil, key_lane
end
local function rate_cfg(text)
  local count, per = string.match(text or '', '^(%d+) (%d+)$')
  if not count or tonumber(count) < 1 then return nil end
  count = tonumber(count)
  local t = tonumber(per) / count
  return t, t * (math.max(1, math.floor(count / RATE_BURST_DIVISOR)) - 1)
end
local function release_key(prefix, lane, id, lanes_key, signal_key, now)
  if redis.call('ZREM', prefix .. 'holders:' .. lane, id) == 1 and
    redis.call('ZADD', lanes_key, 'XX', 'LT', 'CH', now, lane) == 1 then
    redis.call('LPUSH', signal_key, '1')
    redis.call('LTRIM', signal_key, 0, 63)
  end
end
"#
    )
}

/// Lua shared by the scripts that end jobs (see `broker::flows`):
/// `flow_settle(prefix, id, flow, task, ok, text, now, retention)` records
/// how a step of a workflow ended (`flow` is its job's `flow` field; `ok`
/// with its JSON result as `text`, else the failure) and moves on what
/// waits on it, through the barrier its end counts toward (`feeds`, in
/// `flow:FID:barriers`): when the barrier's last member ends, its
/// successors go on their queues; when a member fails and its
/// `on_failure` is not `continue`, its successors end `cancelled`, naming
/// it, and the same applies to what waits on them in turn. A step settles
/// once (its entry in the results hash is written with HSETNX) and a
/// barrier opens or is cancelled once (its `left` reaches 0 once, its
/// `cancelled_by` is written with HSETNX), so a second delivery's outcome,
/// or an operator's cancel after the end, moves nothing on again, and the
/// work a flow's settles do is linear in its steps.
fn flow_lua() -> String {
    format!(
        r#"
local PRIORITY_BAND_FLOW = {PRIORITY_BAND}
local function flow_release(prefix, dep, job_key, fl, now)
  local q = prefix .. 'queue:' .. fl.queue .. ':'
  local score = (9 - (tonumber(fl.priority) or 0)) * PRIORITY_BAND_FLOW + redis.call('INCR', q .. 'seq')
  local score_text = string.format('%.0f', score)
  local _, now_us = clock()
  redis.call('HSET', job_key, 'state', 'queued', 'score', score_text, 'enqueued_at_ms',
    string.format('%d', now), 'enqueued_at_us', now_us)
  redis.call('ZADD', q .. 'ready', score, dep)
  redis.call('ZREM', prefix .. 'flows-waiting', dep)
  redis.call('ZREM', q .. 'flow-waiting', dep)
  redis.call('LPUSH', q .. 'signal', '1')
  redis.call('LTRIM', q .. 'signal', 0, 63)
end
local function flow_cancel(prefix, dep, job_key, fl, task, reason, now, retention)
  local err = cjson.encode({{category = 'cancelled', message = reason}})
  local _, now_us = clock()
  redis.call('HSET', job_key, 'state', 'cancelled', 'last_error', err,
    'finished_at_ms', string.format('%d', now), 'finished_at_us', now_us, 'cancelled_by', 'flow')
  redis.call('ZREM', prefix .. 'flows-waiting', dep)
  if type(fl.queue) == 'string' then redis.call('ZREM', prefix .. 'queue:' .. fl.queue .. ':flow-waiting', dep) end
  history(job_key, prefix .. 'history:' .. dep, now, 'cancelled', reason)
  redis.call('PEXPIRE', job_key, retention)
  redis.call('PEXPIRE', prefix .. 'history:' .. dep, retention)
  wake(prefix, dep, redis.call('HGET', job_key, 'notify'), 'cancelled', retention)
  redis.call('LPUSH', prefix .. 'recent:cancelled', dep)
  redis.call('LTRIM', prefix .. 'recent:cancelled', 0, FINISHED_INDEX_KEPT - 1)
  local tallies = {{}}
  tally(tallies, fl.queue or '', task, 'cancelled')
  flush_tallies(prefix, now, tallies)
end
-- Move on step `dep`, which waited for the step `w` that just ended: onto
-- its queue (`release`), or cancelled naming `w`, with its own settling
-- queued on `work`. Only a step still `waiting` moves (one an operator
-- cancelled stays as it is).
local function flow_onward(prefix, dep, release, w, work, now, retention)
  local job_key = prefix .. 'job:' .. dep
  local d = redis.call('HMGET', job_key, 'state', 'flow')
  if d[1] ~= 'waiting' then return end
  local ok_dep, dfl = pcall(cjson.decode, d[2] or '')
  if not ok_dep or type(dfl) ~= 'table' then dfl = {{}} end
  if release then
    flow_release(prefix, dep, job_key, dfl, now)
  else
    local dep_task = task_of(redis.call('HGET', job_key, 'envelope'))
    local reason = 'it waited for step ' .. w[1] .. ' (' .. w[3] .. '), which ended ' .. w[5]
    flow_cancel(prefix, dep, job_key, dfl, dep_task, reason, now, retention)
    work[#work + 1] = {{dep, d[2], dep_task, false, 'cancelled: ' .. reason}}
  end
end
local function flow_settle(prefix, id, flow, task, ok, text, now, retention)
  local work = {{{{id, flow, task, ok, text}}}}
  local i = 1
  while i <= #work do
    local w = work[i]
    i = i + 1
    local decoded, fl = pcall(cjson.decode, w[2] or '')
    if decoded and type(fl) == 'table' and type(fl.id) == 'string' then
      local fk = prefix .. 'flow:' .. fl.id
      local entry
      if w[4] then
        entry = '{{"task":' .. cjson.encode(w[3]) .. ',"ok":' .. w[5] .. '}}'
      else
        entry = cjson.encode({{task = w[3], err = w[5]}})
      end
      if redis.call('HSETNX', fk .. ':results', w[1], entry) == 1 then
        local goes_on = w[4] or fl.continue == true
        local bk = fk .. ':barriers'
        local b = fl.feeds ~= nil and string.format('%d', tonumber(fl.feeds) or -1) or nil
        -- (A barrier whose flow expired is not written again.)
        if b and redis.call('HEXISTS', bk, b .. ':left') == 1 then
          local left = redis.call('HINCRBY', bk, b .. ':left', -1)
          local open = goes_on and left == 0
          local cancel = not goes_on and redis.call('HSETNX', bk, b .. ':cancelled_by', w[1]) == 1
          if open or cancel then
            for dep in string.gmatch(redis.call('HGET', bk, b .. ':successors') or '', '[^ ]+') do
              flow_onward(prefix, dep, open, w, work, now, retention)
            end
          end
        end
        -- A flow submitted before barriers lists each dependent, and what
        -- each still waits for in a set of its own.
        for _, dep in ipairs(fl.dependents or {{}}) do
          local waits = fk .. ':waits:' .. dep
          if not goes_on then
            redis.call('DEL', waits)
            flow_onward(prefix, dep, false, w, work, now, retention)
          elseif redis.call('SREM', waits, w[1]) == 1 and redis.call('SCARD', waits) == 0 then
            flow_onward(prefix, dep, true, w, work, now, retention)
          end
        end
        local settled = redis.call('HINCRBY', fk, 'settled', 1)
        if settled >= (tonumber(redis.call('HGET', fk, 'steps')) or 0) then
          redis.call('HSET', fk, 'finished_at_ms', string.format('%d', now))
          redis.call('PEXPIRE', fk, retention)
          redis.call('PEXPIRE', fk .. ':results', retention)
          redis.call('PEXPIRE', bk, retention)
          redis.call('RPUSH', fk .. ':done', '1')
          redis.call('PEXPIRE', fk .. ':done', retention)
        end
      end
    end
  end
end
-- A waiting step that ends some other way (cancelled) waits no more: it
-- leaves the waiting indexes (and, in a flow submitted before barriers,
-- its waits set goes). Its barrier is its siblings' too and stays: when it
-- opens, this step, no longer `waiting`, is not moved.
local function flow_forget_waits(prefix, id, flow)
  local decoded, fl = pcall(cjson.decode, flow or '')
  if decoded and type(fl) == 'table' and type(fl.id) == 'string' then
    redis.call('DEL', prefix .. 'flow:' .. fl.id .. ':waits:' .. id)
    if type(fl.queue) == 'string' then
      redis.call('ZREM', prefix .. 'queue:' .. fl.queue .. ':flow-waiting', id)
    end
  end
  redis.call('ZREM', prefix .. 'flows-waiting', id)
end
-- How a dead job's error field reads in a dependent's context.
local function failure_text(err)
  local decoded, e = pcall(cjson.decode, err or '')
  if decoded and type(e) == 'table' and e.category then
    return tostring(e.category) .. ': ' .. tostring(e.message or '')
  end
  return tostring(err)
end
"#
    )
}

/// A script whose source is [`CLOCK_LUA`], [`shared_lua`], then `body`.
fn with_shared(body: &str) -> Script {
    Script::new(&format!(
        "{CLOCK_LUA}{}{}{}{body}",
        shared_lua(),
        gate_lua(),
        flow_lua()
    ))
}

/// [`with_clock`], with `PRIORITY_BAND` defined (the ready-queue scores
/// of one priority, [`PRIORITY_BAND`]).
fn with_priority_band(body: &str) -> Script {
    with_clock(&format!("local PRIORITY_BAND = {PRIORITY_BAND}\n{body}"))
}

/// [`with_priority_band`], with `take_children` ([`CHILDREN_RATE_LUA`]):
/// the scripts that put a guest's jobs on queues (enqueue, flow submit).
fn with_children_rate(body: &str) -> Script {
    with_priority_band(&format!("{CHILDREN_RATE_LUA}{body}"))
}

/// The tenant's children rate (`max_children_per_minute`), one window per
/// Redis-clock minute: `take_children(key, rate, n, now)` takes `n` child
/// jobs if all fit under `rate` and returns nil, else returns the refusal
/// and how many remain, taking none. `key` '' or `rate` 0: no cap.
const CHILDREN_RATE_LUA: &str = r#"
local function take_children(key, rate, n, now)
  if key == '' or rate <= 0 then return nil end
  local minute = tostring(math.floor(now / 60000))
  local window = redis.call('HMGET', key, 'minute', 'count')
  local count = 0
  if window[1] == minute then count = tonumber(window[2]) or 0 end
  if count + n > rate then
    return 'the tenant may enqueue ' .. rate .. ' child jobs per minute (max_children_per_minute)',
      math.max(0, rate - count)
  end
  redis.call('HSET', key, 'minute', minute, 'count', count + n)
  redis.call('PEXPIRE', key, 120000)
  return nil
end
"#;

/// A script whose source is [`CLOCK_LUA`] followed by `body` (scripts that
/// write no history define nothing else on every call).
fn with_clock(body: &str) -> Script {
    Script::new(&format!("{CLOCK_LUA}{body}"))
}

/// Enqueue.
/// KEYS: job, ready, delayed, signal, idempotency key or '', seq,
/// idempotency index, children-rate or '' (guest enqueues only).
/// ARGV: id, envelope, priority (0-9), delay_ms (from the server's now),
/// eta_ms (unix ms; 0 = none, wins over the delay), max_deliveries (''
/// = the default, 20), the tenant's `max_idempotency_keys` and (for
/// guest enqueues) `max_children_per_minute` (0 = none), and the job's
/// gate ('' for none; see `gates::gate_field`).
///
/// The ready-queue score is (9 - priority) * 2^44 + a per-queue sequence
/// number, so higher priorities run first and equal priorities in enqueue
/// order, whatever the producers' clocks say. An idempotency key is held
/// while its job is pending (no expiry), gets the result TTL when the job
/// succeeds and is freed when it dies; a key whose job record is gone is
/// taken over. Returns {id, 'new'}, {existing_id, 'duplicate'}, or
/// {'', 'refused', reason} when a quota says no.
///
/// A schedule's tick adds KEYS 9-11 (the tenant's schedules-due zset,
/// schedule-runs hash and schedules hash) and ARGV 10-14 (schedule name,
/// the due score the worker read, the next due score or '' for none, the
/// tick, the definition the worker read): the job is enqueued only if the
/// schedule's due score and definition still read as the worker saw them,
/// and the score moves on in the same step, so however many workers fire
/// a tick, one job comes of it, and never one of a replaced definition.
/// Otherwise it returns {'', 'stale'} and writes nothing.
pub static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    with_children_rate(
        r#"
local id, priority = ARGV[1], tonumber(ARGV[3])
local delay, eta = tonumber(ARGV[4]), tonumber(ARGV[5])
local idem_quota, child_rate = tonumber(ARGV[7]), tonumber(ARGV[8])
local now, now_us = clock()
local tick = KEYS[9]
if tick then
  local due = redis.call('ZSCORE', KEYS[9], ARGV[10])
  if not due or tonumber(due) ~= tonumber(ARGV[11]) then return {'', 'stale'} end
  if redis.call('HGET', KEYS[11], ARGV[10]) ~= ARGV[14] then return {'', 'stale'} end
end
-- A tick's job is enqueued (or found): the schedule moves on to its next
-- tick and records this one.
local function fired(job_id)
  if not tick then return end
  if ARGV[12] == '' then
    redis.call('ZREM', KEYS[9], ARGV[10])
  else
    redis.call('ZADD', KEYS[9], ARGV[12], ARGV[10])
  end
  redis.call('HSET', KEYS[10], ARGV[10],
    cjson.encode({tick_ms = tonumber(ARGV[13]), job = job_id, fired_at_ms = now}))
end
local holder = nil
if KEYS[5] ~= '' then
  holder = redis.call('GET', KEYS[5])
  local prefix = string.sub(KEYS[1], 1, #KEYS[1] - #('job:' .. id))
  if holder and redis.call('EXISTS', prefix .. 'job:' .. holder) == 1 then
    fired(holder)
    return {holder, 'duplicate'}
  end
end
-- Every refusal before any write: a refused enqueue leaves nothing behind.
if KEYS[5] ~= '' and not holder and idem_quota > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now)
  if redis.call('ZCARD', KEYS[7]) >= idem_quota then
    return {'', 'refused', 'the tenant holds ' .. idem_quota .. ' idempotency keys, its quota (max_idempotency_keys)'}
  end
end
local refused = take_children(KEYS[8], child_rate, 1, now)
if refused then return {'', 'refused', refused} end
if KEYS[5] ~= '' then
  redis.call('SET', KEYS[5], id)
  redis.call('ZADD', KEYS[7], 'inf', KEYS[5])
end
local due = now
if eta > 0 then due = eta elseif delay > 0 then due = now + delay end
local state = 'queued'
if due > now then state = 'scheduled' end
local score = (9 - priority) * PRIORITY_BAND + redis.call('INCR', KEYS[6])
-- One HSET, whatever the options: the enqueue is on every job's path.
local score_text = string.format('%.0f', score)
if KEYS[5] == '' and ARGV[6] == '' and ARGV[9] == '' and state == 'queued' then
  redis.call('HSET', KEYS[1], 'envelope', ARGV[2], 'state', state, 'attempts', 0,
    'deliveries', 0, 'score', score_text, 'enqueued_at_ms', now, 'enqueued_at_us', now_us)
else
  local fields = {'envelope', ARGV[2], 'state', state, 'attempts', 0, 'deliveries', 0,
    'score', score_text, 'enqueued_at_ms', now, 'enqueued_at_us', now_us}
  if KEYS[5] ~= '' then fields[#fields + 1] = 'idem'; fields[#fields + 1] = KEYS[5] end
  if ARGV[6] ~= '' then fields[#fields + 1] = 'max_deliveries'; fields[#fields + 1] = ARGV[6] end
  if ARGV[9] ~= '' then fields[#fields + 1] = 'gate'; fields[#fields + 1] = ARGV[9] end
  if state == 'scheduled' then
    fields[#fields + 1] = 'due_at_ms'; fields[#fields + 1] = string.format('%d', due)
  end
  redis.call('HSET', KEYS[1], unpack(fields))
end
if state == 'scheduled' then
  redis.call('ZADD', KEYS[3], due, id)
else
  redis.call('ZADD', KEYS[2], score, id)
end
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, 63)
fired(id)
return {id, 'new'}
"#,
    )
});

/// Fetch up to n jobs. KEYS: ready, delayed, leased, dead, inflight,
/// idempotency index, paused, dead-by-queue, gates, lanes.
/// ARGV: prefix, n, lease_ms, worker, max_deliveries (default for jobs
/// without their own), cluster_cap (0 = none), finished_ttl_ms, queue,
/// the tenant's rate limit ('COUNT PERIOD_MS', '' = none).
///
/// First promotes due delayed jobs and reclaims expired leases (their
/// workers died, froze or lost Redis): each reclaim counts one lost
/// delivery and names the worker, and frees the job's concurrency key; a
/// job whose lease was lost `max_deliveries` times is dead-lettered as
/// poison. Then moves jobs set aside back from lanes whose time has come
/// (as many as each lane may start now), pops by score and leases each
/// popped job. A delivery is not an attempt: the attempt a delivery runs
/// is the number of runs that ended in a verdict, plus one.
/// With a cluster cap, the tenant's `inflight` set (every job of the tenant
/// leased by any worker, scored by lease expiry) bounds n, and each leased
/// job joins it; the entries of dead workers count until their lease ends.
/// A tenant rate limit bounds n by what its lane admits now.
/// A paused queue (listed in `paused`) still promotes and reclaims, but
/// leases nothing.
///
/// Gates (see `gates`): a popped job with a `gate` field passes its
/// concurrency key (fewer than `per-key:TASK` holders whose lease has not
/// lapsed) and its task's rate (GCRA on `tat:TASK`), and no older job of
/// either lane may be waiting; otherwise it is set aside in the lane's
/// waiting set and the lane is noted in `lanes` with when it may open, and
/// popping goes on, so other tasks' jobs are never held behind it.
/// Ungated jobs cost one more field in the read of their record.
///
/// Returns a flat list: id, envelope, attempt, lease token, host retries,
/// gate ('' for none; the worker checks it against the task's policy) ...
/// per leased job, then the task of each job dead-lettered as poison
/// (P names), then P, and last the ms until a lane (or the tenant's rate)
/// opens again (-1: none waits), so an idle worker looks again then.
/// A popped id without a job record is dropped.
pub static FETCH: LazyLock<Script> = LazyLock::new(|| {
    with_shared(&format!(
        r#"
local MAX_LOST_WORKERS = {MAX_LOST_WORKERS}
local LANE_RELEASE_BATCH, LANES_PER_FETCH = {LANE_RELEASE_BATCH}, {LANES_PER_FETCH}
local MAX_SET_ASIDE, KEY_LANE_RECHECK = {MAX_SET_ASIDE_PER_FETCH}, {key_lane_recheck_ms}
local prefix, n, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local worker, default_max, cap = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local now, now_us = clock()
local function job(id) return prefix .. 'job:' .. id end
local q = prefix .. 'queue:' .. ARGV[8] .. ':'
local poisoned = {{}}
local wake_in = -1
local function answer(out)
  -- Only a worker that got nothing waits: only it needs to know.
  local idle = #out == 0
  for _, task in ipairs(poisoned) do out[#out + 1] = task end
  out[#out + 1] = #poisoned
  if wake_in == -1 and idle then
    local first = redis.call('ZRANGE', KEYS[10], 0, 0, 'WITHSCORES')
    if first[2] then wake_in = math.max(0, math.ceil(tonumber(first[2]) - now)) end
  end
  out[#out + 1] = string.format('%d', math.max(wake_in, -1))
  return out
end
-- A job that has ended (cancelled while its record named another queue,
-- say) is dropped wherever it is found, never run or requeued.
local function ended(state)
  return state == 'cancelled' or state == 'succeeded' or state == 'dead'
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', KEYS[2], id)
  local g = redis.call('HMGET', job(id), 'score', 'state')
  local score = g[1]
  if score and not ended(g[2]) then
    redis.call('ZADD', KEYS[1], score, id)
    redis.call('HSET', job(id), 'state', 'queued')
    redis.call('HDEL', job(id), 'due_at_ms')
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZREM', KEYS[5], id)
  local f = redis.call('HMGET', job(id), 'score', 'lost', 'started_at_ms', 'attempt',
    'worker', 'notify', 'max_deliveries', 'lost_workers', 'envelope', 'state', 'gate', 'flow')
  if f[11] then
    local _, _, key_lane = gate_of(f[11])
    if key_lane and key_lane ~= '' then
      release_key(prefix, key_lane, id, KEYS[10], q .. 'signal', now)
    end
  end
  if f[1] and not ended(f[10]) then
    local h = prefix .. 'history:' .. id
    started(job(id), h, f[3], f[4], f[5])
    local lost = (tonumber(f[2]) or 0) + 1
    local workers = {{}}
    for w in string.gmatch(f[8] or '', '[^ ]+') do workers[#workers + 1] = w end
    workers[#workers + 1] = f[5] or '?'
    while #workers > MAX_LOST_WORKERS do table.remove(workers, 1) end
    local named = table.concat(workers, ' ')
    local limit = tonumber(f[7]) or default_max
    if lost >= limit then
      local err = cjson.encode({{category = 'trap', message = 'its lease lapsed on ' .. lost ..
        ' deliveries without an outcome (max_deliveries ' .. limit .. '): each time its worker died, ' ..
        'froze or lost Redis while running it (a poison job, or a bad night: workers ' .. named ..
        '); `wasmq dead retry` runs it again'}})
      redis.call('HSET', job(id), 'state', 'dead', 'last_error', err, 'lease', '', 'lost', lost,
        'lost_workers', named, 'finished_at_ms', now, 'finished_at_us', now_us, 'dead_queue', ARGV[8])
      redis.call('ZADD', KEYS[4], now, id)
      redis.call('HINCRBY', KEYS[8], ARGV[8], 1)
      local tallies = {{}}
      local task = task_of(f[9])
      poisoned[#poisoned + 1] = task
      tally(tallies, ARGV[8], task, 'failed')
      tally(tallies, ARGV[8], task, 'dead')
      flush_tallies(prefix, now, tallies)
      history(job(id), h, now, 'dead', err)
      release_idempotency(job(id), id, KEYS[6])
      wake(prefix, id, f[6], 'dead', ARGV[7])
      if f[12] then flow_settle(prefix, id, f[12], task, false, failure_text(err), now, ARGV[7]) end
    else
      redis.call('ZADD', KEYS[1], f[1], id)
      redis.call('HSET', job(id), 'state', 'queued', 'lease', '', 'lost', lost, 'lost_workers', named)
      history(job(id), h, now, 'lease-expired', 'worker ' .. (f[5] or '?') ..
        ' stopped renewing the lease (it died, froze or lost Redis); redelivered')
    end
  end
end
-- Paused or at its cap, a queue has nothing to wake a worker for.
if redis.call('HEXISTS', KEYS[7], ARGV[8]) == 1 then wake_in = -2; return answer({{}}) end
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  n = math.min(n, cap - redis.call('ZCARD', KEYS[5]))
  if n <= 0 then wake_in = -2; return answer({{}}) end
end
-- Rate lanes, read once per call and written back at the end: `rates`
-- by task ('' is the tenant's own), false for a task without a limit.
local rates, keyed, per_key, firsts, noted = {{}}, {{}}, {{}}, {{}}, {{}}
local function rate(field, cfg)
  local t, tau = rate_cfg(cfg)
  if not t then return false end
  return {{t = t, tau = tau, field = field,
    tat = tonumber(redis.call('HGET', KEYS[9], field)) or 0, dirty = false}}
end
local function task_rate(task)
  local r = rates[task]
  if r == nil then
    r = rate('tat:' .. task, redis.call('HGET', KEYS[9], 'rate:' .. task))
    rates[task] = r
  end
  return r
end
-- How many jobs a rate lane admits now.
local function room(r)
  local tat = math.max(r.tat, now)
  if tat - r.tau > now then return 0 end
  return math.floor((now + r.tau - tat) / r.t) + 1
end
local function take(r)
  r.tat = math.max(r.tat, now) + r.t
  r.dirty = true
end
local tenant_rate = false
if ARGV[9] ~= '' then
  tenant_rate = rate('tat', ARGV[9])
  if tenant_rate then
    rates[''] = tenant_rate
    n = math.min(n, room(tenant_rate))
    if n <= 0 then
      wake_in = math.max(0, math.ceil(math.max(tenant_rate.tat, now) - tenant_rate.tau - now))
      return answer({{}})
    end
  end
end
-- A key lane's state: its limit and live holders (lapsed ones dropped).
local function key_state(lane, task)
  local s = keyed[lane]
  if s == nil then
    local max = per_key[task]
    if max == nil then
      max = tonumber(redis.call('HGET', KEYS[9], 'per-key:' .. task)) or false
      per_key[task] = max
    end
    s = false
    if max then
      local h = prefix .. 'holders:' .. lane
      redis.call('ZREMRANGEBYSCORE', h, '-inf', now)
      s = {{max = max, held = redis.call('ZCARD', h), key = h}}
    end
    keyed[lane] = s
  end
  return s
end
-- When a closed key lane may open: its first holder's lease expiry.
local function key_opens(s)
  local first = redis.call('ZRANGE', s.key, 0, 0, 'WITHSCORES')
  if first[2] then return tonumber(first[2]) end
  return now + KEY_LANE_RECHECK
end
-- Lanes whose time has come: move back as many jobs as each may start.
for _, lane in ipairs(redis.call('ZRANGEBYSCORE', KEYS[10], '-inf', now, 'LIMIT', 0, LANES_PER_FETCH)) do
  local free, opens = LANE_RELEASE_BATCH, now + KEY_LANE_RECHECK
  if string.sub(lane, 1, 2) == 'r:' then
    local r = task_rate(string.sub(lane, 3))
    if r then
      free = room(r)
      opens = math.max(r.tat, now) + free * r.t - r.tau
    end
  else
    local task = gate_of(lane)
    local s = task and key_state(lane, task)
    if s then
      free = s.max - s.held
      if free <= 0 then opens = key_opens(s) end
    end
  end
  local w = q .. 'waiting:' .. lane
  if free > 0 then
    local back = redis.call('ZPOPMIN', w, math.min(free, LANE_RELEASE_BATCH))
    for i = 1, #back, 2 do redis.call('ZADD', KEYS[1], back[i + 1], back[i]) end
  end
  if redis.call('EXISTS', w) == 0 then
    redis.call('ZREM', KEYS[10], lane)
  else
    redis.call('ZADD', KEYS[10], opens, lane)
  end
end
-- The score of a lane's oldest waiting job (false: none): a job behind
-- it waits too, so a lane keeps its order.
local function first_waiting(lane)
  local v = firsts[lane]
  if v == nil then
    local first = redis.call('ZRANGE', q .. 'waiting:' .. lane, 0, 0, 'WITHSCORES')
    v = first[2] and tonumber(first[2]) or false
    firsts[lane] = v
  end
  return v
end
local aside = 0
local function set_aside(lane, id, score, opens)
  redis.call('ZADD', q .. 'waiting:' .. lane, score, id)
  local first = firsts[lane]
  if not first or tonumber(score) < first then firsts[lane] = tonumber(score) end
  if not noted[lane] then
    redis.call('ZADD', KEYS[10], 'LT', opens, lane)
    noted[lane] = true
  end
  aside = aside + 1
end
-- Whether a gated job may start now; if not, it is set aside. A job
-- that may start takes its place under its key (scored by its lease
-- expiry) and its slot of its task's rate.
local function admit(gate, id, score, expiry)
  local task, rated, key_lane = gate_of(gate)
  if not task then return true end
  local s = key_lane ~= '' and key_state(key_lane, task)
  if s then
    local first = first_waiting(key_lane)
    if s.held >= s.max or (first and first < tonumber(score)) then
      local opens = now
      if s.held >= s.max then opens = key_opens(s) end
      set_aside(key_lane, id, score, opens)
      return false
    end
  end
  local r = rated and task_rate(task)
  if r then
    local lane = 'r:' .. task
    local first = first_waiting(lane)
    if room(r) < 1 or (first and first < tonumber(score)) then
      set_aside(lane, id, score, math.max(math.max(r.tat, now) - r.tau, now))
      return false
    end
    take(r)
  end
  if s then
    redis.call('ZADD', s.key, expiry, id)
    s.held = s.held + 1
  end
  return true
end
local capped = ''
if cap > 0 then capped = '1' end
-- Numbers go to Redis as strings; Lua's own conversion formats them as
-- doubles, which costs more than the commands here, so format integers
-- once with %d.
local expiry = string.format('%d', now + lease)
local now_ms = string.format('%d', now)
local out, leases = {{}}, {{}}
local leased = 0
-- Pop until n are leased or the queue is empty: jobs set aside make room
-- for the next ones (bounded, so one call never runs long).
while leased < n and aside < MAX_SET_ASIDE do
  local want = n - leased
  local popped = redis.call('ZPOPMIN', KEYS[1], want)
  for i = 1, #popped, 2 do
    local id = popped[i]
    local f = redis.call('HMGET', job(id), 'envelope', 'deliveries', 'attempts', 'host_retries', 'state',
      'gate')
    if f[1] and not ended(f[5]) and (not f[6] or admit(f[6], id, popped[i + 1], expiry)) then
      local deliveries = string.format('%d', (tonumber(f[2]) or 0) + 1)
      local attempt = string.format('%d', (tonumber(f[3]) or 0) + 1)
      -- The worker, the delivery and the server's clock: no two deliveries
      -- share a token, even after `dead retry` starts `deliveries` again.
      local token = worker .. ':' .. deliveries .. '@' .. now_us
      redis.call('HSET', job(id), 'state', 'active', 'lease', token, 'deliveries', deliveries,
        'attempt', attempt, 'started_at_ms', now_ms, 'started_at_us', now_us, 'worker', worker,
        'capped', capped)
      if tenant_rate then take(tenant_rate) end
      leases[#leases + 1] = expiry
      leases[#leases + 1] = id
      out[#out + 1] = id
      out[#out + 1] = f[1]
      out[#out + 1] = attempt
      out[#out + 1] = token
      out[#out + 1] = f[4] or '0'
      out[#out + 1] = f[6] or ''
      leased = leased + 1
    end
  end
  if #popped < 2 * want then break end
end
if #leases > 0 then
  redis.call('ZADD', KEYS[3], unpack(leases))
  if cap > 0 then redis.call('ZADD', KEYS[5], unpack(leases)) end
end
for _, r in pairs(rates) do
  if r and r.dirty then redis.call('HSET', KEYS[9], r.field, string.format('%.3f', r.tat)) end
end
-- Stopped by the set-aside bound: there may be jobs to lease behind.
if aside >= MAX_SET_ASIDE then wake_in = 0 end
if tenant_rate and leased == n and room(tenant_rate) < 1 then
  wake_in = math.max(0, math.ceil(math.max(tenant_rate.tat, now) - tenant_rate.tau - now))
end
return answer(out)
"#,
        key_lane_recheck_ms = KEY_LANE_RECHECK.as_millis()
    ))
});

/// Extend leases. KEYS: leased, inflight. ARGV: prefix, lease_ms, id1,
/// token1, ...
/// A keyed job's place under its key is extended with it.
/// Only jobs whose lease token still matches and whose lease has not
/// lapsed by the Redis clock are extended: a job whose lease lapsed
/// belongs to whoever fetches it next (the next fetch reclaims it), even
/// while no one has yet. Returns the ids this delivery no longer owns:
/// another delivery's now, or lapsed (not those whose outcome this caller
/// has just recorded: their lease ended with it).
pub static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{CLOCK_LUA}{}{}",
        gate_lua(),
        r#"
local now = clock()
local expiry = string.format('%d', now + tonumber(ARGV[2]))
local lost = {}
for i = 3, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local f = redis.call('HMGET', ARGV[1] .. 'job:' .. id, 'lease', 'recorded', 'gate')
  local ends = f[1] == token and tonumber(redis.call('ZSCORE', KEYS[1], id))
  if f[1] == token and not (ends and ends >= now) then
    lost[#lost + 1] = id
  elseif f[1] == token then
    redis.call('ZADD', KEYS[1], 'XX', expiry, id)
    redis.call('ZADD', KEYS[2], 'XX', expiry, id)
    -- A key's holder stays one as long as its lease.
    if f[3] then
      local _, _, key_lane = gate_of(f[3])
      if key_lane and key_lane ~= '' then
        redis.call('ZADD', ARGV[1] .. 'holders:' .. key_lane, 'XX', expiry, id)
      end
    end
  elseif f[2] ~= token then
    lost[#lost + 1] = id
  end
end
return lost
"#
    ))
});

/// Fields per job in [`COMPLETE`]'s ARGV.
pub const COMPLETE_FIELDS: usize = 14;

/// Record outcomes of many deliveries in one call (the worker batches
/// whatever finished since its last call: fewer script invocations, which
/// cost more than the commands they run).
/// KEYS: usage, dead, idempotency index, succeeded index, dead-by-queue,
/// gates.
/// ARGV: prefix, finished_ttl_ms, the batch's usage totals over the runs
/// that ran a sandbox (runs, fuel, wall_time_us, run_time_us,
/// memory_byte_seconds, net_out_bytes, net_in_bytes, denied, db_time_us,
/// db_rows), the number
/// of (queue, task) groups in the batch and each group's queue and task,
/// then per job [`COMPLETE_FIELDS`] fields: id, queue, token, outcome ('succeeded' |
/// 'retry' | 'rate-limited' | 'host-retry' | 'wait' | 'dead' | 'release' |
/// 'regate'), result (for 'regate': the gate field to write, '' for none),
/// result_ttl_ms (0 = do not store), idempotency key or '',
/// idempotency_ttl_ms, delay_ms (retries), error_json, usage_json, and the
/// run's refusals as a JSON list ('' for none; kept as the job's
/// `denials`), its (queue, task) group's number (1-based), and the tail
/// of the run's log ('' for none: a previous run's is removed).
///
/// A keyed job leaves its key's holders (its lane opens if jobs wait on
/// it). 'rate-limited' is a retry that also holds the task's rate lane
/// shut for the delay (its GCRA time moves past it).
///
/// Besides the job, a recorded outcome adds to the minute's counts per
/// queue and task (`succeeded`; `failed` for a retry or a death, and
/// `dead`), one HINCRBY per distinct field per batch (a success costs one
/// table increment per job: its group was named once), and a success joins
/// the `succeeded` list (one LPUSH and one LTRIM per batch).
///
/// Returns per job 'ok' (recorded now), 'recorded' (this delivery's
/// outcome was recorded before: a batch retried after its reply was lost),
/// or 'stale' (the caller no longer holds the lease: the job belongs to
/// whoever holds it now; its outcome is dropped). The batch's usage is
/// added to the tenant's totals once, less the runs of jobs not recorded
/// now (rare: a retried batch, a lost lease), so usage counts each
/// recorded outcome once; a stale delivery's run goes to the `wasted_*`
/// totals instead (work done for nothing).
pub static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    with_shared(&format!(
        r#"
local FIELDS = {COMPLETE_FIELDS}
local prefix, retention = ARGV[1], ARGV[2]
local now, now_us = clock()
local now_ms = string.format('%d', now)
local names = {{'runs', 'fuel', 'wall_time_us', 'run_time_us', 'memory_byte_seconds',
  'net_out_bytes', 'net_in_bytes', 'denied', 'db_time_us', 'db_rows'}}
local used = {{}}
for n, name in ipairs(names) do used[name] = tonumber(ARGV[2 + n]) end
local wasted = {{wasted_runs = 0, wasted_fuel = 0, wasted_wall_time_us = 0, wasted_run_time_us = 0}}
-- A run not recorded now leaves the batch's totals (decoded only then).
local function not_counted(usage, stale)
  local u = cjson.decode(usage)
  local wall = tonumber(u.wall_time_us) or 0
  if wall == 0 then return end
  local fuel, run = tonumber(u.fuel) or 0, tonumber(u.run_time_us) or 0
  used.runs = used.runs - 1
  used.fuel = used.fuel - fuel
  used.wall_time_us = used.wall_time_us - wall
  used.run_time_us = used.run_time_us - run
  used.memory_byte_seconds = used.memory_byte_seconds -
    math.floor((tonumber(u.peak_memory_bytes) or 0) * wall / 1000000)
  used.net_out_bytes = used.net_out_bytes - (tonumber(u.net_out_bytes) or 0)
  used.net_in_bytes = used.net_in_bytes - (tonumber(u.net_in_bytes) or 0)
  used.denied = used.denied - (tonumber(u.denied) or 0)
  used.db_time_us = used.db_time_us - (tonumber(u.db_time_us) or 0)
  used.db_rows = used.db_rows - (tonumber(u.db_rows) or 0)
  if stale then
    wasted.wasted_runs = wasted.wasted_runs + 1
    wasted.wasted_fuel = wasted.wasted_fuel + fuel
    wasted.wasted_wall_time_us = wasted.wasted_wall_time_us + wall
    wasted.wasted_run_time_us = wasted.wasted_run_time_us + run
  end
end
local out, unleased, tallies, succeeded, ok = {{}}, {{}}, {{}}, {{}}, {{}}
local groups = tonumber(ARGV[3 + #names])
local group_queue, group_task = {{}}, {{}}
for g = 1, groups do
  group_queue[g] = ARGV[2 + #names + 2 * g]
  group_task[g] = ARGV[3 + #names + 2 * g]
end
for i = 4 + #names + 2 * groups, #ARGV, FIELDS do
  local id, queue, token, outcome = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local result, result_ttl = ARGV[i + 4], tonumber(ARGV[i + 5])
  local idem, idem_ttl, delay, err = ARGV[i + 6], ARGV[i + 7], ARGV[i + 8], ARGV[i + 9]
  local usage, denials, group = ARGV[i + 10], ARGV[i + 11], tonumber(ARGV[i + 12])
  local log = ARGV[i + 13]
  local task = group_task[group]
  local job = prefix .. 'job:' .. id
  local h = prefix .. 'history:' .. id
  local q = prefix .. 'queue:' .. queue .. ':'
  local f = redis.call('HMGET', job, 'lease', 'notify', 'capped', 'has_history',
    'started_at_ms', 'attempt', 'worker', 'has_log', 'gate', 'flow')
  if f[1] ~= token or token == '' then
    if token ~= '' and redis.call('HGET', job, 'recorded') == token then
      out[#out + 1] = 'recorded'
      not_counted(usage, false)
    else
      out[#out + 1] = 'stale'
      not_counted(usage, true)
    end
  else
    -- Off the lease set in one ZREM per queue after the loop.
    local ids = unleased[queue]
    if not ids then ids = {{}}; unleased[queue] = ids end
    ids[#ids + 1] = id
    -- A job counted against its tenant's cluster-wide cap frees its place:
    -- wake a worker that may have been turned away by the cap.
    if f[3] == '1' and redis.call('ZREM', prefix .. 'inflight', id) == 1 then
      redis.call('LPUSH', q .. 'signal', '1')
      redis.call('LTRIM', q .. 'signal', 0, 63)
    end
    -- A keyed job frees its place under its key, whatever the outcome:
    -- a retry takes a place again when it is fetched again.
    if f[9] then
      local _, _, key_lane = gate_of(f[9])
      if key_lane and key_lane ~= '' then
        release_key(prefix, key_lane, id, q .. 'lanes', q .. 'signal', now)
      end
    end
    -- A guest told it was rate limited upstream: its task's whole lane
    -- waits out the delay (the next job of the task starts no sooner).
    if outcome == 'rate-limited' then
      local cfg = redis.call('HMGET', KEYS[6], 'rate:' .. task, 'tat:' .. task)
      local t, tau = rate_cfg(cfg[1])
      if t then
        local until_ms = now + tonumber(delay) + tau
        if until_ms > (tonumber(cfg[2]) or 0) then
          redis.call('HSET', KEYS[6], 'tat:' .. task, string.format('%.3f', until_ms))
        end
      end
      outcome = 'retry'
    end
    if denials ~= '' then redis.call('HSET', job, 'denials', denials) end
    -- The run's log replaces the last run's (most jobs log nothing: no
    -- write for them unless an earlier run left one).
    if log ~= '' then
      redis.call('HSET', job, 'log', log, 'has_log', '1')
    elseif f[8] then
      redis.call('HDEL', job, 'log', 'has_log')
    end
    if outcome ~= 'succeeded' then started(job, h, f[5], f[6], f[7]) end
    -- A verdict ends attempt f[6] (the fetch set it to attempts + 1):
    -- `attempts` becomes it, in the same HSET as the rest (one write per
    -- job on the happy path).
    local attempt = f[6] or '1'
    if outcome == 'release' or outcome == 'regate' then
      -- Back to its place in its queue: shutdown before the job finished,
      -- or (regate) not run because its gate, now the one its task's
      -- policy requires (the result field), would have skipped the policy;
      -- the next fetch passes it through the right lanes, and this
      -- delivery does not count.
      if outcome == 'regate' then
        if result == '' then redis.call('HDEL', job, 'gate') else redis.call('HSET', job, 'gate', result) end
        redis.call('HINCRBY', job, 'deliveries', -1)
        redis.call('LPUSH', q .. 'signal', '1')
        redis.call('LTRIM', q .. 'signal', 0, 63)
      end
      redis.call('HSET', job, 'state', 'queued', 'lease', '', 'recorded', token)
      redis.call('ZADD', q .. 'ready', redis.call('HGET', job, 'score'), id)
      if outcome == 'release' then
        history(job, h, now, 'released')
      else
        history(job, h, now, 'regated', 'its record did not carry its task\'s rate limit or named ' ..
          'another task; queued again under the deployed policy')
      end
    elseif outcome == 'retry' or outcome == 'host-retry' or outcome == 'wait' then
      -- A host-side failure does not use up one of the task's attempts
      -- (it counts as a host retry); waiting for a step uses neither.
      if outcome == 'retry' then
        tally(tallies, queue, task, 'failed')
        redis.call('HSET', job, 'attempts', attempt)
      elseif outcome == 'host-retry' then
        redis.call('HINCRBY', job, 'host_retries', 1)
      end
      local due = string.format('%d', now + tonumber(delay))
      redis.call('HSET', job, 'state', 'scheduled', 'last_error', err, 'usage', usage, 'due_at_ms', due,
        'lease', '', 'recorded', token)
      redis.call('ZADD', q .. 'delayed', due, id)
      redis.call('RPUSH', h, cjson.encode({{at_ms = now, event = outcome, detail = err,
        retry_at_ms = tonumber(due)}}))
      redis.call('LTRIM', h, -MAX_HISTORY, -1)
      redis.call('HSET', job, 'has_history', '1')
    elseif outcome == 'succeeded' then
      if result_ttl > 0 then
        redis.call('SET', prefix .. 'result:' .. id, result, 'PX', result_ttl)
        redis.call('HSET', job, 'state', 'succeeded', 'lease', '', 'recorded', token,
          'attempts', attempt, 'usage', usage, 'finished_at_ms', now_ms, 'finished_at_us', now_us,
          'result_stored', '1')
      else
        redis.call('HSET', job, 'state', 'succeeded', 'lease', '', 'recorded', token,
          'attempts', attempt, 'usage', usage, 'finished_at_ms', now_ms, 'finished_at_us', now_us)
      end
      redis.call('PEXPIRE', job, retention)
      if f[4] == '1' then redis.call('PEXPIRE', h, retention) end
      ok[group] = (ok[group] or 0) + 1
      succeeded[#succeeded + 1] = id
      -- The idempotency key now dedups for its TTL from the success.
      if idem ~= '' and redis.call('GET', idem) == id then
        redis.call('PEXPIRE', idem, idem_ttl)
        redis.call('ZADD', KEYS[3], now + tonumber(idem_ttl), idem)
      end
      -- A step of a workflow hands its result on to what waits on it.
      if f[10] then
        if result == '' then result = 'null' end
        flow_settle(prefix, id, f[10], task, true, result, now, retention)
      end
    else
      redis.call('HSET', job, 'state', 'dead', 'last_error', err, 'usage', usage,
        'finished_at_ms', now_ms, 'finished_at_us', now_us, 'lease', '', 'recorded', token,
        'attempts', attempt, 'dead_queue', queue)
      redis.call('ZADD', KEYS[2], now, id)
      redis.call('HINCRBY', KEYS[5], queue, 1)
      tally(tallies, queue, task, 'failed')
      tally(tallies, queue, task, 'dead')
      history(job, h, now, 'dead', err)
      -- A failed job does not hold its idempotency key: a new enqueue may run.
      release_idempotency(job, id, KEYS[3])
      if f[10] then flow_settle(prefix, id, f[10], task, false, failure_text(err), now, retention) end
    end
    if outcome == 'succeeded' or outcome == 'dead' then wake(prefix, id, f[2], outcome, retention) end
    out[#out + 1] = 'ok'
  end
end
for queue, ids in pairs(unleased) do
  redis.call('ZREM', prefix .. 'queue:' .. queue .. ':leased', unpack(ids))
end
if #succeeded > 0 then
  redis.call('LPUSH', KEYS[4], unpack(succeeded))
  redis.call('LTRIM', KEYS[4], 0, FINISHED_INDEX_KEPT - 1)
end
for g, n in pairs(ok) do
  local q, t = 'queue:' .. group_queue[g] .. ':succeeded', 'task:' .. group_task[g] .. ':succeeded'
  tallies[q] = (tallies[q] or 0) + n
  tallies[t] = (tallies[t] or 0) + n
end
flush_tallies(prefix, now, tallies)
-- The tenant's usage: one write per field per batch, not per job.
for _, totals in ipairs({{used, wasted}}) do
  for field, value in pairs(totals) do
    if value > 0 then redis.call('HINCRBY', KEYS[1], field, string.format('%d', value)) end
  end
end
return out
"#
    ))
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

/// Run a dead job again with fresh attempts and deliveries, in one step.
/// KEYS: job, dead, history, done, idempotency index, dead-by-queue.
/// ARGV: prefix, id.
/// Returns 0 when the job is not in the dead-letter queue. The job goes on
/// its task's current queue (a task moved to another queue since takes its
/// dead jobs with it; a deleted task's go back where they were). It takes
/// its idempotency key back if nobody holds it; if a newer job holds it,
/// the retried job runs without it (and its history says so).
pub static DEAD_RETRY: LazyLock<Script> = LazyLock::new(|| {
    with_shared(
        r#"
local prefix, id = ARGV[1], ARGV[2]
local f = redis.call('HMGET', KEYS[1], 'score', 'idem', 'envelope', 'dead_queue')
if not f[1] or not f[3] then return 0 end
local ok, envelope = pcall(cjson.decode, f[3])
if not ok or type(envelope) ~= 'table' or type(envelope.queue) ~= 'string' then return 0 end
if redis.call('ZREM', KEYS[2], id) == 0 then return 0 end
if f[4] and redis.call('HINCRBY', KEYS[6], f[4], -1) <= 0 then redis.call('HDEL', KEYS[6], f[4]) end
local now = clock()
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempts', 0, 'deliveries', 0, 'lost', 0,
  'host_retries', 0, 'lease', '')
redis.call('HDEL', KEYS[1], 'finished_at_ms', 'finished_at_us', 'lost_workers', 'recorded',
  'due_at_ms', 'attempt', 'dead_queue')
redis.call('DEL', KEYS[4])
history(KEYS[1], KEYS[3], now, 'dead-retry')
if f[2] and f[2] ~= '' then
  local holder = redis.call('GET', f[2])
  if not holder then
    redis.call('SET', f[2], id)
    redis.call('ZADD', KEYS[5], 'inf', f[2])
  elseif holder ~= id then
    redis.call('HSET', KEYS[1], 'idem', '')
    history(KEYS[1], KEYS[3], now, 'note', 'its idempotency key is held by job ' .. holder ..
      ' now; this job runs without it')
  end
end
local queue = envelope.queue
if type(envelope.task) == 'string' then
  local spec = redis.call('HGET', prefix .. 'task:' .. envelope.task, 'spec')
  local decoded, task = false, nil
  if spec then decoded, task = pcall(cjson.decode, spec) end
  if decoded and type(task) == 'table' and type(task.policy) == 'table'
    and type(task.policy.queue) == 'string' then
    queue = task.policy.queue
  end
end
local q = prefix .. 'queue:' .. queue .. ':'
-- The queue it is on now, if it moved with its task (`wasmq cancel` looks
-- there).
if queue ~= envelope.queue then
  redis.call('HSET', KEYS[1], 'queue', queue)
else
  redis.call('HDEL', KEYS[1], 'queue')
end
redis.call('ZADD', q .. 'ready', f[1], id)
redis.call('LPUSH', q .. 'signal', '1')
redis.call('LTRIM', q .. 'signal', 0, 63)
return 1
"#,
    )
});

/// Cancel a job. KEYS: job, history, done, idempotency index, cancelled
/// index, inflight. ARGV: prefix, id, who, finished_ttl_ms.
///
/// A gated job set aside in a lane leaves it; a running keyed job frees
/// its place under its key.
///
/// A queued or scheduled job leaves its queue and never runs; an active
/// one leaves the lease set, so its worker's lease is gone: the worker's
/// renewal or outcome finds another owner (none) and stops the run, and
/// the caller also tells the worker at once (its control list). Either
/// way the job ends `cancelled` with the reason as its last error, keeps
/// its record for the finished retention, frees its idempotency key and
/// wakes result waiters. Returns {'cancelled', state before, worker,
/// lease token}, or {'finished', state} for a job that had already ended,
/// or {} when there is no such job.
pub static CANCEL: LazyLock<Script> = LazyLock::new(|| {
    with_shared(
        r#"
local prefix, id, who, retention = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local f = redis.call('HMGET', KEYS[1], 'state', 'envelope', 'queue', 'worker', 'lease', 'notify',
  'started_at_ms', 'attempt', 'gate', 'flow')
if not f[1] then return {} end
local state = f[1]
if state ~= 'queued' and state ~= 'scheduled' and state ~= 'active' and state ~= 'waiting' then
  return {'finished', state}
end
local ok, envelope = pcall(cjson.decode, f[2] or '')
if not ok or type(envelope) ~= 'table' then envelope = {} end
local task = type(envelope.task) == 'string' and envelope.task or ''
-- The queues it can be on: the one `dead retry` moved it to, and the
-- envelope's. (Should it be anywhere else, the fetch script drops it
-- there: it never runs a job that has ended.)
local queues = {}
if f[3] and f[3] ~= '' then queues[#queues + 1] = f[3] end
if type(envelope.queue) == 'string' and envelope.queue ~= f[3] then
  queues[#queues + 1] = envelope.queue
end
local queue = queues[1] or ''
for _, name in ipairs(queues) do
  local q = prefix .. 'queue:' .. name .. ':'
  redis.call('ZREM', q .. 'ready', id)
  redis.call('ZREM', q .. 'delayed', id)
  redis.call('ZREM', q .. 'leased', id)
end
-- A gated job may be set aside in a lane, or hold a place under its key.
if f[9] then
  local gate_task, rated, key_lane = gate_of(f[9])
  for _, name in ipairs(queues) do
    local q = prefix .. 'queue:' .. name .. ':'
    if rated then redis.call('ZREM', q .. 'waiting:r:' .. gate_task, id) end
    if key_lane and key_lane ~= '' then
      redis.call('ZREM', q .. 'waiting:' .. key_lane, id)
      release_key(prefix, key_lane, id, q .. 'lanes', q .. 'signal', clock())
    end
  end
end
if redis.call('ZREM', KEYS[6], id) == 1 then
  -- A place under the tenant's cluster cap is free: wake a worker.
  local q = prefix .. 'queue:' .. queue .. ':'
  redis.call('LPUSH', q .. 'signal', '1')
  redis.call('LTRIM', q .. 'signal', 0, 63)
end
local now, now_us = clock()
local reason = 'cancelled by ' .. who .. ' while ' .. state
local err = cjson.encode({category = 'cancelled', message = reason})
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'last_error', err, 'lease', '',
  'finished_at_ms', string.format('%d', now), 'finished_at_us', now_us, 'cancelled_by', who)
redis.call('HDEL', KEYS[1], 'due_at_ms')
if state == 'active' then started(KEYS[1], KEYS[2], f[7], f[8], f[4]) end
history(KEYS[1], KEYS[2], now, 'cancelled', reason)
redis.call('PEXPIRE', KEYS[1], retention)
redis.call('PEXPIRE', KEYS[2], retention)
release_idempotency(KEYS[1], id, KEYS[4])
wake(prefix, id, f[6], 'cancelled', retention)
redis.call('LPUSH', KEYS[5], id)
redis.call('LTRIM', KEYS[5], 0, FINISHED_INDEX_KEPT - 1)
local tallies = {}
tally(tallies, queue, task, 'cancelled')
flush_tallies(prefix, now, tallies)
-- A step of a workflow: what waits on it is cancelled in turn (or goes on,
-- as its flow says); a waiting step stops waiting.
if f[10] then
  flow_forget_waits(prefix, id, f[10])
  flow_settle(prefix, id, f[10], task, false, 'cancelled: ' .. reason, now, retention)
end
return {'cancelled', state, f[4] or '', f[5] or ''}
"#,
    )
});

/// Delete up to n of the oldest dead-lettered jobs. KEYS: dead,
/// dead-by-queue. ARGV: prefix, n. Returns how many it deleted (called
/// until 0: a million dead jobs never block Redis in one call).
pub static PURGE_DEAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local prefix, n = ARGV[1], tonumber(ARGV[2])
local ids = redis.call('ZRANGE', KEYS[1], 0, n - 1)
for _, id in ipairs(ids) do
  local job = prefix .. 'job:' .. id
  local queue = redis.call('HGET', job, 'dead_queue')
  if queue and redis.call('HINCRBY', KEYS[2], queue, -1) <= 0 then redis.call('HDEL', KEYS[2], queue) end
  redis.call('DEL', job, prefix .. 'history:' .. id, prefix .. 'done:' .. id)
  redis.call('ZREM', KEYS[1], id)
end
return #ids
"#,
    )
});

/// A worker process's heartbeat. KEYS: its beat key, the live set.
/// ARGV: process id, heartbeat JSON, ttl_ms. The live set scores it
/// with the Redis clock, so every worker's "last seen" is on one clock.
pub static BEAT: LazyLock<Script> = LazyLock::new(|| {
    with_clock(
        r#"
local now = clock()
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now, ARGV[1])
return now
"#,
    )
});

/// One queue's figures for `wasmq queues`, read at one instant.
/// KEYS: ready, delayed, leased, dead-by-queue, paused, lanes, flow-waiting. ARGV:
/// prefix, queue.
///
/// Returns {ready, delayed, running, dead, paused (JSON or ''), enqueue
/// time of the oldest ready job (ms, -1 for none), now (ms), succeeded
/// and failed in this clock minute and the one before, jobs set aside in
/// the queue's lanes (counted over its first [`MAX_LANES_LISTED`]), its
/// workflow steps waiting for others (KEYS[7])}. The oldest ready
/// job is the first of some priority band (within a band, jobs are in
/// enqueue order), so ten lookups find it however long the queue is.
pub static QUEUE_VIEW: LazyLock<Script> = LazyLock::new(|| {
    with_priority_band(&format!(
        "local MAX_LANES_LISTED = {MAX_LANES_LISTED}\n{}",
        r#"
local prefix, queue = ARGV[1], ARGV[2]
local now = clock()
local ready = redis.call('ZCARD', KEYS[1])
local oldest = -1
if ready > 0 then
  for p = 0, 9 do
    local first = redis.call('ZRANGEBYSCORE', KEYS[1], p * PRIORITY_BAND, (p + 1) * PRIORITY_BAND - 1,
      'LIMIT', 0, 1)
    if first[1] then
      local at = tonumber(redis.call('HGET', prefix .. 'job:' .. first[1], 'enqueued_at_ms'))
      if at and (oldest < 0 or at < oldest) then oldest = at end
    end
  end
end
local minute = math.floor(now / 60000)
local succeeded, failed = 0, 0
for m = minute - 1, minute do
  local f = redis.call('HMGET', prefix .. 'stats:' .. string.format('%d', m),
    'queue:' .. queue .. ':succeeded', 'queue:' .. queue .. ':failed')
  succeeded = succeeded + (tonumber(f[1]) or 0)
  failed = failed + (tonumber(f[2]) or 0)
end
local held = 0
for _, lane in ipairs(redis.call('ZRANGE', KEYS[6], 0, MAX_LANES_LISTED - 1)) do
  held = held + redis.call('ZCARD', prefix .. 'queue:' .. queue .. ':waiting:' .. lane)
end
return {ready, redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3]),
  tonumber(redis.call('HGET', KEYS[4], queue)) or 0, redis.call('HGET', KEYS[5], queue) or '',
  oldest, now, succeeded, failed, held, redis.call('ZCARD', KEYS[7])}
"#,
    ))
});

/// The tenant's due schedules. KEYS: schedules-due, schedules. ARGV: the
/// most to return.
/// Returns {now_ms, next_ms or '', name, due_ms, definition, ...}: each
/// schedule due by the Redis clock with its definition, and the earliest
/// tick after now (how long the scheduler may sleep). A due entry without
/// a definition (removed meanwhile) is dropped.
pub static SCHEDULES_DUE: LazyLock<Script> = LazyLock::new(|| {
    with_clock(
        r#"
local now = clock()
local now_ms = string.format('%d', now)
local out = {now_ms, ''}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
for i = 1, #due, 2 do
  local definition = redis.call('HGET', KEYS[2], due[i])
  if definition then
    out[#out + 1] = due[i]
    out[#out + 1] = due[i + 1]
    out[#out + 1] = definition
  else
    redis.call('ZREM', KEYS[1], due[i])
  end
end
local later = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now_ms, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if #later > 0 then out[2] = later[2] end
return out
"#,
    )
});

/// Move a schedule on without a job (its tick was dropped by the catch-up
/// policy, could not enqueue, or its definition is unreadable). KEYS:
/// schedules-due, schedule-runs, schedules. ARGV: name, the due score the
/// worker read, the next due score ('' = none), the record for
/// `schedule-runs` ('' = keep the last one), the definition the worker
/// read. Only if the due score and the definition still read as the
/// worker saw them; returns 1 if it moved.
pub static SCHEDULE_ADVANCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) ~= tonumber(ARGV[2]) then return 0 end
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[5] then return 0 end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], ARGV[1], ARGV[4]) end
return 1
"#,
    )
});

/// Write a schedule's definition and due score. KEYS: schedules,
/// schedules-due. ARGV: name, the definition it must replace ('' = create
/// or replace whatever is there), the new definition, its next tick (''
/// = none: paused, or no more ticks). Returns 1, or 0 (writing nothing)
/// when the definition is no longer the expected one (a concurrent
/// change; the caller reads again).
pub static SCHEDULE_STORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if ARGV[4] == '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
end
return 1
"#,
    )
});

/// Fields per barrier in [`FLOW_SUBMIT`]'s ARGV.
pub const FLOW_BARRIER_FIELDS: usize = 3;

/// Fields per step in [`FLOW_SUBMIT`]'s ARGV.
pub const FLOW_STEP_FIELDS: usize = 8;

/// Submit a workflow, all its steps in one step.
/// KEYS: the flow's hash, the job that starts it ('' for none: that
/// job's `flows` field counts the flows it started, for `wasmq status`),
/// the tenant's children-rate hash ('' unless a guest starts it), and the
/// flow's barriers hash.
/// ARGV: prefix, flow id, result shape (JSON of job ids), who started it,
/// the tenant's `max_children_per_minute` (0 = none; a guest's steps count
/// against it as its child jobs do, all or none), the number of barriers,
/// then per barrier [`FLOW_BARRIER_FIELDS`] fields: how many members, the
/// members' job ids and the successors' (space-separated); then per step
/// [`FLOW_STEP_FIELDS`] fields: job id, queue, envelope, priority,
/// max_deliveries ('' = the default), gate ('' for none), the job's
/// `flow` field (JSON: flow id, queue, priority, continue, and `feeds`,
/// the barrier its end counts toward) and the barrier it waits for ('' for
/// none).
///
/// A step that waits for nothing goes on its queue as an enqueue would;
/// the others are `waiting`, outside every queue, until their barrier
/// opens (see `flow_settle`). Every id is written at most twice (as a
/// member and as a successor), so the script is linear in the flow's
/// steps. Returns 'new', or 'existing' when the flow was submitted before
/// (a guest's start run again): nothing is written then; or {'refused',
/// reason} when the tenant's children rate has no room for all its steps
/// (nothing written).
pub static FLOW_SUBMIT: LazyLock<Script> = LazyLock::new(|| {
    with_children_rate(&format!(
        r#"
local BARRIER_FIELDS, FIELDS = {FLOW_BARRIER_FIELDS}, {FLOW_STEP_FIELDS}
local prefix, flow_id = ARGV[1], ARGV[2]
if redis.call('EXISTS', KEYS[1]) == 1 then return 'existing' end
local now, now_us = clock()
local now_ms = string.format('%d', now)
local barriers = tonumber(ARGV[6])
local first_step = 7 + barriers * BARRIER_FIELDS
local steps = (#ARGV - first_step + 1) / FIELDS
local child_rate = tonumber(ARGV[5])
local refused, left = take_children(KEYS[3], child_rate, steps, now)
if refused then
  return {{'refused', refused .. '; this flow has ' .. steps .. ' steps and ' .. left .. ' remain this minute'}}
end
redis.call('HSET', KEYS[1], 'steps', steps, 'settled', 0, 'result', ARGV[3], 'started_by', ARGV[4],
  'created_at_ms', now_ms)
if KEYS[2] ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then redis.call('HINCRBY', KEYS[2], 'flows', 1) end
for b = 0, barriers - 1 do
  local at = 7 + b * BARRIER_FIELDS
  redis.call('HSET', KEYS[4], b .. ':left', ARGV[at], b .. ':members', ARGV[at + 1],
    b .. ':successors', ARGV[at + 2])
end
local signalled = {{}}
for i = first_step, #ARGV, FIELDS do
  local id, queue, envelope, priority = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local max_deliveries, gate, flow, after = ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7]
  local job = prefix .. 'job:' .. id
  local fields = {{'envelope', envelope, 'attempts', 0, 'deliveries', 0, 'flow', flow,
    'enqueued_at_ms', now_ms, 'enqueued_at_us', now_us}}
  if max_deliveries ~= '' then fields[#fields + 1] = 'max_deliveries'; fields[#fields + 1] = max_deliveries end
  if gate ~= '' then fields[#fields + 1] = 'gate'; fields[#fields + 1] = gate end
  if after == '' then
    local q = prefix .. 'queue:' .. queue .. ':'
    local score = (9 - priority) * PRIORITY_BAND + redis.call('INCR', q .. 'seq')
    fields[#fields + 1] = 'state'; fields[#fields + 1] = 'queued'
    fields[#fields + 1] = 'score'; fields[#fields + 1] = string.format('%.0f', score)
    redis.call('HSET', job, unpack(fields))
    redis.call('ZADD', q .. 'ready', score, id)
    signalled[queue] = true
  else
    fields[#fields + 1] = 'state'; fields[#fields + 1] = 'waiting'
    redis.call('HSET', job, unpack(fields))
    redis.call('ZADD', prefix .. 'flows-waiting', now, id)
    redis.call('ZADD', prefix .. 'queue:' .. queue .. ':flow-waiting', now, id)
  end
end
for queue in pairs(signalled) do
  local signal = prefix .. 'queue:' .. queue .. ':signal'
  redis.call('LPUSH', signal, '1')
  redis.call('LTRIM', signal, 0, 63)
end
return 'new'
"#
    ))
});
