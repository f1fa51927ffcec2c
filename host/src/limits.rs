//! Every bound on what crosses into the host, in one table: the arguments
//! of guest host calls (the WIT boundary), what a producer puts in a job,
//! and the durations either may ask for.
//!
//! Why bound everything: a value the host forwards to Redis travels over a
//! connection other jobs share, and one that is stored stays in a Redis
//! other tenants share. An unbounded string (a 100 MiB lock owner) stalled
//! a worker's Redis connection for seconds, so other tenants' leases
//! lapsed; an unbounded delay wrapped around and ran at once.
//!
//! | what | limit |
//! |---|---|
//! | key, counter, lock, step, once-key or task name | [`MAX_NAME_BYTES`] |
//! | key-value value, step output, child payload | [`MAX_VALUE_BYTES`] |
//! | lock owner token | [`MAX_OWNER_BYTES`] |
//! | idempotency key (producer or child) | [`MAX_IDEMPOTENCY_KEY_BYTES`] |
//! | lock lease, step claim lease | [`MAX_LEASE`] |
//! | lock wait | the job's own timeout |
//! | key-value / step TTL | [`MAX_TTL`] (and the tenant's `max_value_ttl`) |
//! | countdown, ETA, retry delay | [`MAX_DELAY`] |
//! | nesting of a result (of a payload: one less) | [`MAX_JSON_DEPTH`] ([`MAX_PAYLOAD_DEPTH`]) |
//! | child jobs per job | [`MAX_CHILDREN_PER_JOB`] |
//! | flows a job starts, and a flow's definition and steps | [`MAX_FLOWS_PER_JOB`], [`MAX_FLOW_DEFINITION_BYTES`], [`MAX_FLOW_STEPS`] |
//! | log line | [`MAX_LOG_LINE_BYTES`] (the whole log: the policy's `max_log_bytes`) |
//! | log kept in the job record | [`MAX_STORED_LOG_BYTES`] (the tail) |
//! | outbound HTTP request headers | [`MAX_REQUEST_HEADER_BYTES`] |
//! | database statements, rows, bytes, connections | [`DB_STATEMENT_TIMEOUT`], [`MAX_DB_ROWS`], [`MAX_DB_RESULT_BYTES`], [`DB_POOL_SIZE`] |
//! | SQL parameters | each [`MAX_VALUE_BYTES`], all [`MAX_DB_PARAMS_BYTES`] |
//! | secret names and values | [`MAX_SECRET_NAME_BYTES`], [`MAX_SECRET_BYTES`] |

use std::time::Duration;

/// Longest key, counter, lock, step, once-key or task name a guest may use.
pub const MAX_NAME_BYTES: usize = 512;
/// Largest key-value entry, step output or child payload.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Longest lock owner token a guest may hand back (the host makes them 32
/// characters; anything much longer is not one of ours).
pub const MAX_OWNER_BYTES: usize = 128;
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 512;
/// Longest lease a guest may ask for (locks, step claims).
pub const MAX_LEASE: Duration = Duration::from_secs(3600);
/// Longest time to live of a guest's key-value entry or step marker: a
/// year. Longer asks are refused (Redis itself refuses expiries past about
/// 292 million years, which a u64 of milliseconds can spell).
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// Longest delay before a job may run (countdown, ETA from now, or a retry
/// delay): ten years. Past that a number is a mistake, not a schedule.
pub const MAX_DELAY: Duration = Duration::from_secs(10 * 366 * 24 * 3600);
/// Deepest nesting of arrays and objects in a result: the deepest
/// `serde_json` reads back (its recursion limit stops at 128 levels), so a
/// result stored is a result that can be read.
pub const MAX_JSON_DEPTH: usize = 127;
/// Deepest nesting of a payload: one level less than [`MAX_JSON_DEPTH`],
/// because the worker parses the payload inside its envelope, one level
/// deeper.
pub const MAX_PAYLOAD_DEPTH: usize = MAX_JSON_DEPTH - 1;
/// Child jobs one job may enqueue: a guest that enqueues in a loop is a
/// fork bomb for the whole queue.
pub const MAX_CHILDREN_PER_JOB: u32 = 1_000;
/// Flows one job may start (each is one atomic submission of its steps).
pub const MAX_FLOWS_PER_JOB: u32 = 100;
/// Largest flow definition (its JSON, payloads included).
pub const MAX_FLOW_DEFINITION_BYTES: usize = 4 << 20;
/// Most steps (jobs) in one flow: a flow is submitted in one Redis script,
/// which must stay short.
pub const MAX_FLOW_STEPS: usize = 1_000;
/// Longest log line a guest may write in one call (longer ones are cut).
pub const MAX_LOG_LINE_BYTES: usize = 16 << 10;
/// The tail of a run's log kept in its job record (`wasmq status`, the
/// dashboard): enough to see why a run failed, small enough that a
/// million finished jobs that all log stay a few GB at most.
pub const MAX_STORED_LOG_BYTES: usize = 4 << 10;
/// Largest total of an outbound HTTP request's header names and values.
pub const MAX_REQUEST_HEADER_BYTES: usize = 64 << 10;
/// Longest secret name (`wasmq secret set NAME`, `config::get`).
pub const MAX_SECRET_NAME_BYTES: usize = 128;
/// Longest a database statement may run, on the server
/// (`statement_timeout`); the job's own deadline bounds it too.
pub const DB_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the database server checks, while a statement runs, that
/// the worker is still connected (`client_connection_check_interval`,
/// PostgreSQL 14 and later): a worker killed mid-statement has its
/// statement stopped and its transaction rolled back within this, instead
/// of holding row locks until the statement ends.
pub const DB_CLIENT_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait to open a new database connection.
pub const DB_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections a worker keeps per tenant and database unless told
/// otherwise (`wasmq worker --db-pool-size`): jobs wait for one when all
/// are in use (bounded by their deadline), so a busy worker cannot exhaust
/// the server's `max_connections`.
pub const DB_POOL_SIZE: usize = 16;
/// Connections one job may open.
pub const MAX_DB_CONNECTIONS_PER_JOB: u32 = 4;
/// Most rows one query may return.
pub const MAX_DB_ROWS: usize = 10_000;
/// Most bytes the server may send in answer to one statement, as sent
/// (each value with its 4-byte length, 7 bytes a row, notices and errors
/// too): counted as they arrive, before they are in the worker's memory,
/// and the connection is closed once they pass it.
pub const MAX_DB_RESULT_BYTES: usize = 4 << 20;
/// Most bytes of one statement's parameters together.
pub const MAX_DB_PARAMS_BYTES: usize = 4 << 20;
/// Longest a session's reset may take when a job lets go of it (cancel,
/// rollback, reset); past it the session is closed instead.
pub const DB_RESET_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest secret value: API keys, tokens, connection URLs, a PEM
/// certificate; configuration files belong elsewhere.
pub const MAX_SECRET_BYTES: usize = 64 << 10;

/// `Err` naming `what` when `text` is empty or longer than `max` bytes.
pub fn check_name(what: &str, text: &str, max: usize) -> Result<(), String> {
    if text.is_empty() {
        return Err(format!("{what} is empty"));
    }
    check_len(what, text.len(), max)
}

/// `Err` naming `what` when `len` bytes are more than `max`.
pub fn check_len(what: &str, len: usize, max: usize) -> Result<(), String> {
    if len > max {
        return Err(format!("{what} is {len} bytes, over the limit of {max}"));
    }
    Ok(())
}

/// `Err` naming `what` when `delay` is longer than [`MAX_DELAY`].
pub fn check_delay(what: &str, delay: Duration) -> Result<(), String> {
    if delay > MAX_DELAY {
        return Err(format!(
            "{what} of {} is over the limit of {}",
            humantime::format_duration(delay),
            humantime::format_duration(MAX_DELAY)
        ));
    }
    Ok(())
}

/// How deeply `json` nests arrays and objects, stopping at `stop`: a
/// byte scan (strings and escapes skipped), so a 400,000-deep document is
/// measured without recursion.
pub fn json_depth(json: &str, stop: usize) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for b in json.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
                if deepest > stop {
                    return deepest;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// `Err` naming `what` when `json` nests deeper than `max`.
pub fn check_json_depth(what: &str, json: &str, max: usize) -> Result<(), String> {
    if json_depth(json, max) > max {
        return Err(format!(
            "{what} nests arrays and objects more than {max} deep"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_is_measured_without_recursion_and_ignores_strings() {
        assert_eq!(json_depth(r#"{"a":[1,{"b":"[[[{{"}]}"#, 100), 3);
        assert_eq!(json_depth(r#""\"[""#, 100), 0);
        let deep = "[".repeat(400_000) + &"]".repeat(400_000);
        assert!(check_json_depth("result", &deep, MAX_JSON_DEPTH).is_err());
        let ok = "[".repeat(MAX_JSON_DEPTH) + &"]".repeat(MAX_JSON_DEPTH);
        assert!(check_json_depth("result", &ok, MAX_JSON_DEPTH).is_ok());
        assert!(check_json_depth("payload", &ok, MAX_PAYLOAD_DEPTH).is_err());
    }

    #[test]
    fn lengths_and_delays_are_named() {
        assert_eq!(check_name("lock", "", 10).unwrap_err(), "lock is empty");
        assert!(check_name("lock", "abc", 2)
            .unwrap_err()
            .contains("over the limit of 2"));
        assert!(check_delay("countdown", Duration::from_millis(u64::MAX)).is_err());
        assert!(check_delay("countdown", Duration::from_secs(60)).is_ok());
    }
}
