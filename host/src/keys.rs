//! Every Redis key wasmq uses, in one place (see docs/redis-layout.md).
//!
//! All keys of a tenant start with `wasmq:{TENANT}:`. The braces are a Redis
//! Cluster hash tag: a tenant's queues, jobs, results and host-interface
//! state hash to one slot, so one Lua script can move a job between them
//! atomically. Names a guest passes (key-value keys, counters, locks, steps)
//! are appended after a fixed kind segment, so whatever string a guest
//! passes, it stays inside its own tenant's namespace and its own kind.

/// Key builder for one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys of `tenant`. The tenant name is validated by [`valid_tenant`]
    /// before it gets here (no braces, so the hash tag cannot be forged).
    pub fn new(tenant: &str) -> Self {
        Keys {
            prefix: format!("wasmq:{{{tenant}}}:"),
        }
    }

    /// `key` without the tenant prefix (how the store accounting names
    /// an entry).
    pub fn relative<'a>(&self, key: &'a str) -> &'a str {
        key.strip_prefix(self.prefix.as_str()).unwrap_or(key)
    }

    /// The common prefix (`wasmq:{TENANT}:`), e.g. for ACL key patterns.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        k.push_str(&parts.join(":"));
        k
    }

    /// HASH: the tenant's record (field `spec`: name and caps).
    pub fn tenant(&self) -> String {
        self.key(&["tenant"])
    }
    /// HASH: one deployed task's current version and policy.
    pub fn task(&self, name: &str) -> String {
        self.key(&["task", name])
    }
    /// SET: names of deployed tasks.
    pub fn tasks(&self) -> String {
        self.key(&["tasks"])
    }
    /// STRING: component bytes, content-addressed by sha256.
    pub fn component(&self, sha256: &str) -> String {
        self.key(&["component", sha256])
    }
    /// HASH: a job's envelope and state.
    pub fn job(&self, id: &str) -> String {
        self.key(&["job", id])
    }
    /// ZSET: jobs ready to run, by priority then enqueue order.
    pub fn ready(&self, queue: &str) -> String {
        self.key(&["queue", queue, "ready"])
    }
    /// ZSET: jobs not yet due, by due time (ms).
    pub fn delayed(&self, queue: &str) -> String {
        self.key(&["queue", queue, "delayed"])
    }
    /// ZSET: jobs handed to a worker, by lease expiry (ms).
    pub fn leased(&self, queue: &str) -> String {
        self.key(&["queue", queue, "leased"])
    }
    /// ZSET: the tenant's jobs leased by any worker, by lease expiry (ms);
    /// kept only while the tenant has a cluster-wide concurrency cap.
    pub fn inflight(&self) -> String {
        self.key(&["inflight"])
    }
    /// STRING (integer): the queue's enqueue sequence (FIFO within a priority).
    pub fn seq(&self, queue: &str) -> String {
        self.key(&["queue", queue, "seq"])
    }
    /// STRING: the pool kind (`io` or `cpu`) a queue serves, set by the
    /// first deploy to it.
    pub fn queue_pool(&self, queue: &str) -> String {
        self.key(&["queue", queue, "pool"])
    }
    /// SET: every queue the tenant's tasks were deployed to (what
    /// `wasmq queues` lists).
    pub fn queues(&self) -> String {
        self.key(&["queues"])
    }
    /// HASH: paused queues, queue → JSON {by, at_ms}; the fetch script
    /// leases nothing from a queue listed here.
    pub fn paused(&self) -> String {
        self.key(&["paused"])
    }
    /// HASH: dead-lettered jobs per queue, queue → count (the `dead` set
    /// is the tenant's; this splits it by the queue each job died on).
    pub fn dead_by_queue(&self) -> String {
        self.key(&["dead-by-queue"])
    }
    /// HASH: outcomes in one minute (unix minute on the Redis clock):
    /// fields `queue:Q:OUTCOME` and `task:T:OUTCOME` → count, expiring
    /// after [`STATS_RETENTION_MINUTES`].
    pub fn stats(&self, minute: u64) -> String {
        self.key(&["stats", &minute.to_string()])
    }
    /// LIST: the most recent succeeded jobs' ids, newest first, trimmed
    /// to [`FINISHED_INDEX_KEPT`] (a list, not a sorted set: a batch of
    /// successes costs one LPUSH and one LTRIM).
    pub fn succeeded(&self) -> String {
        self.key(&["recent", "succeeded"])
    }
    /// LIST: the most recent cancelled jobs' ids, newest first, trimmed
    /// like [`Keys::succeeded`].
    pub fn cancelled(&self) -> String {
        self.key(&["recent", "cancelled"])
    }
    /// LIST: wake-up tokens for idle workers of a queue.
    pub fn signal(&self, queue: &str) -> String {
        self.key(&["queue", queue, "signal"])
    }
    /// ZSET: dead-lettered jobs, by time of death (ms).
    pub fn dead(&self) -> String {
        self.key(&["dead"])
    }
    /// LIST: a job's attempt history (JSON events).
    pub fn history(&self, id: &str) -> String {
        self.key(&["history", id])
    }
    /// HASH: the tenant's summed usage (runs, fuel, wall_time_us, run_time_us,
    /// memory_byte_seconds, net_out_bytes, net_in_bytes, denied, db_time_us,
    /// db_rows), for billing.
    pub fn usage(&self) -> String {
        self.key(&["usage"])
    }
    /// HASH: the tenant's dashboard tokens (`wasmq web token create`):
    /// hex SHA-256 of a token → JSON {id, note, created_by, created_at_ms}.
    /// Only the digest is kept; the token itself is shown once.
    pub fn web_tokens(&self) -> String {
        self.key(&["web-tokens"])
    }
    /// HASH: the tenant's secrets, sealed (field `NAME`, or `NAME/TASK`
    /// for one task's; see [`crate::secrets`]). Workers read it; a
    /// producer's ACL user cannot.
    pub fn secrets(&self) -> String {
        self.key(&["secrets"])
    }
    /// HASH: the tenant's schedules: name → JSON definition (task,
    /// payload, timing, catch-up policy, paused).
    pub fn schedules(&self) -> String {
        self.key(&["schedules"])
    }
    /// ZSET: each active schedule's name, scored by its next tick (unix
    /// ms, Redis clock); a paused schedule is absent. A worker fires a tick
    /// only by moving this score on from the value it read.
    pub fn schedules_due(&self) -> String {
        self.key(&["schedules-due"])
    }
    /// HASH: each schedule's last fire: name → JSON {tick_ms, job,
    /// fired_at_ms} (or {tick_ms, error, ...} when the tick could not
    /// enqueue).
    pub fn schedule_runs(&self) -> String {
        self.key(&["schedule-runs"])
    }
    /// HASH: a workflow: `steps`, `settled` (steps that ended), `result`
    /// (the shape of its result, as JSON of job ids), `started_by`,
    /// `created_at_ms`, `finished_at_ms`. Expires with its last step.
    pub fn flow(&self, id: &str) -> String {
        self.key(&["flow", id])
    }
    /// HASH: how each step of a workflow ended: job id → JSON `{task, ok:
    /// RESULT}` or `{task, err: "CATEGORY: message"}`, written once.
    pub fn flow_results(&self, id: &str) -> String {
        self.key(&["flow", id, "results"])
    }
    /// HASH: the dependencies between a workflow's nodes, barrier `N` in
    /// fields `N:members` (the job ids it waits for, space-separated, in
    /// order: what each successor receives), `N:left` (members not yet
    /// ended), `N:successors` (the job ids that wait for it) and, once a
    /// member failed without `continue`, `N:cancelled_by` (that member).
    /// One key per flow, with at most two links per step. Expires with the
    /// flow.
    pub fn flow_barriers(&self, id: &str) -> String {
        self.key(&["flow", id, "barriers"])
    }
    /// SET: the steps a waiting job of a workflow still waits for, in
    /// flows submitted before barriers ([`Keys::flow_barriers`]): read and
    /// emptied, no longer written.
    pub fn flow_waits(&self, id: &str, job: &str) -> String {
        self.key(&["flow", id, "waits", job])
    }
    /// ZSET: the tenant's workflow steps that wait for others, by when
    /// their flow was submitted (ms): what `wasmq jobs --state waiting`
    /// lists.
    pub fn flows_waiting(&self) -> String {
        self.key(&["flows-waiting"])
    }
    /// ZSET: the workflow steps of `queue` that wait for others (they go
    /// on it when released), by when their flow was submitted (ms): what
    /// `wasmq queues` counts as `waiting`.
    pub fn flow_waiting(&self, queue: &str) -> String {
        self.key(&["queue", queue, "flow-waiting"])
    }
    /// LIST: pushed once when a workflow's last step ends, for `flow --wait`.
    pub fn flow_done(&self, id: &str) -> String {
        self.key(&["flow", id, "done"])
    }
    /// STRING: a job's stored result (JSON), with a TTL.
    pub fn result(&self, id: &str) -> String {
        self.key(&["result", id])
    }
    /// LIST: pushed once when a job finishes, for `result --wait`.
    pub fn done(&self, id: &str) -> String {
        self.key(&["done", id])
    }
    /// STRING: the job id that owns an idempotency key of a task. The task
    /// name is length-prefixed, so no (task, key) pair can spell another's
    /// key (`a:b` + `c` and `a` + `b:c` stay apart).
    pub fn idempotency(&self, task: &str, key: &str) -> String {
        self.key(&["idem", &task.len().to_string(), task, key])
    }
    /// Pattern matching every idempotency key of the tenant (for ACLs).
    pub fn idempotency_pattern(&self) -> String {
        self.key(&["idem", "*"])
    }
    /// ZSET: every idempotency key of the tenant, scored by when it
    /// expires (`inf` while its job is pending): counts them for the
    /// tenant's quota and usage.
    pub fn idempotency_index(&self) -> String {
        self.key(&["idem-index"])
    }
    /// HASH: guest child enqueues in the current minute (`minute`,
    /// `count`), for the tenant's `max_children_per_minute`.
    pub fn children_rate(&self) -> String {
        self.key(&["children-rate"])
    }
    /// HASH: rate limits and concurrency keys (see `gates`): config
    /// written at deploy, `rate:TASK` → `"COUNT PERIOD_MS"` and
    /// `per-key:TASK` → N; state written by the scripts, `tat:TASK` (and
    /// `tat` for the tenant's own `--rate-limit`) → the lane's GCRA
    /// theoretical arrival time (ms, Redis clock).
    pub fn gates(&self) -> String {
        self.key(&["gates"])
    }
    /// ZSET: a queue's lanes that have jobs set aside (`r:TASK` for a
    /// task's rate, `k:LEN:TASK:KEY` for a concurrency key), by when the
    /// lane may open again (ms); the fetch script moves their jobs back.
    pub fn lanes(&self, queue: &str) -> String {
        self.key(&["queue", queue, "lanes"])
    }
    /// ZSET: a lane's jobs set aside in a queue (built by the scripts from
    /// the prefix), by their ready-queue score, so they go back in order.
    pub fn waiting(&self, queue: &str, lane: &str) -> String {
        self.key(&["queue", queue, "waiting", lane])
    }
    /// ZSET: the jobs holding a concurrency key lane (`k:LEN:TASK:KEY`)
    /// across all queues and workers, by lease expiry (ms): a holder whose
    /// worker died ages out when its lease ends.
    pub fn holders(&self, lane: &str) -> String {
        self.key(&["holders", lane])
    }
    /// STRING: a guest's key-value entry.
    pub fn kv(&self, key: &str) -> String {
        self.key(&["kv", key])
    }
    /// STRING (integer): a guest's counter.
    pub fn counter(&self, name: &str) -> String {
        self.key(&["counter", name])
    }
    /// STRING (integer): the counter value recorded by `incr-once` for a key.
    pub fn counted_once(&self, once_key: &str) -> String {
        self.key(&["counter-once", once_key])
    }
    /// STRING: a lock's owner token, with the lease as TTL.
    pub fn lock(&self, name: &str) -> String {
        self.key(&["lock", name])
    }
    /// STRING (integer): a lock's last fencing token; never expires.
    pub fn fence(&self, name: &str) -> String {
        self.key(&["fence", name])
    }
    /// HASH: the size in bytes (name plus value) of every entry the
    /// tenant's guests store (key-value, counters, once-markers, locks,
    /// fences, step claims and outputs), by its key after the tenant prefix.
    pub fn store_sizes(&self) -> String {
        self.key(&["store", "sizes"])
    }
    /// ZSET: the entries of [`Keys::store_sizes`] that expire, by expiry
    /// (ms), so the totals drop when they lapse.
    pub fn store_expiry(&self) -> String {
        self.key(&["store", "expiry"])
    }
    /// HASH: `bytes` and `keys` the tenant's guests store now (the sums of
    /// [`Keys::store_sizes`]), checked against its quota.
    pub fn store_totals(&self) -> String {
        self.key(&["store", "totals"])
    }
    /// STRING: a completed step's recorded output.
    pub fn step_done(&self, key: &str) -> String {
        self.key(&["step", "done", key])
    }
    /// STRING: the run token holding a step, with the claim lease as TTL.
    pub fn step_claim(&self, key: &str) -> String {
        self.key(&["step", "claim", key])
    }
}

/// SET of tenant names with a record: the one key outside any tenant
/// (admin-only; producers' ACLs do not include it).
pub const TENANTS: &str = "wasmq:tenants";

/// Minutes a per-minute stats hash is kept: a day and an hour, so the
/// last 24 hours are always whole.
pub const STATS_RETENTION_MINUTES: u64 = 25 * 60;

/// Finished jobs each of the `succeeded` and `cancelled` indexes keeps
/// (the newest): enough for `wasmq jobs` and the dashboard to page
/// through, bounded however many jobs run. The job records themselves live
/// their own retention.
pub const FINISHED_INDEX_KEPT: usize = 10_000;

/// Keys of worker processes, outside any tenant: a worker serves many
/// tenants. They share the `{workers}` hash tag, so they live in one
/// Redis Cluster slot (one BLPOP can wait on every control list of a
/// process).
pub mod workers {
    /// ZSET: worker process id → its last heartbeat (ms, Redis clock).
    pub const LIVE: &str = "wasmq:{workers}:live";

    /// STRING: a worker process's heartbeat (JSON), expiring unless
    /// renewed.
    pub fn beat(process: &str) -> String {
        format!("wasmq:{{workers}}:beat:{process}")
    }

    /// LIST: control messages for one pool of a worker (cancel a running
    /// job), expiring when nobody reads them.
    pub fn control(pool: &str) -> String {
        format!("wasmq:{{workers}}:control:{pool}")
    }
}

/// Tenant names: 1–64 of `[a-z0-9_-]`. They end up inside a hash tag and
/// ACL patterns, so no braces, colons or glob characters.
pub fn valid_tenant(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tenant name {name:?} is invalid: use 1-64 characters of a-z, 0-9, '-' and '_'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_stay_in_their_tenant_and_kind() {
        let k = Keys::new("acme");
        assert_eq!(k.kv("x"), "wasmq:{acme}:kv:x");
        // A guest spelling out another tenant's prefix still lands in its own.
        assert_eq!(
            k.kv("wasmq:{other}:kv:x"),
            "wasmq:{acme}:kv:wasmq:{other}:kv:x"
        );
        // Length-prefixed task names: no two (task, key) pairs collide.
        assert_ne!(k.idempotency("a:b", "c"), k.idempotency("a", "b:c"));
        assert!(valid_tenant("acme-1").is_ok());
        assert!(valid_tenant("a}b").is_err());
        assert!(valid_tenant("").is_err());
    }
}
