//! What one run of a job cost: the figures a platform bills and an
//! operator reads in `wasmq status`. Plain data, shared by the sandbox
//! (which measures it) and the broker (which records and sums it).

use serde::{Deserialize, Serialize};

/// What a run cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Fuel consumed (deterministic for the same code and input).
    pub fuel: u64,
    /// Largest linear memory, in bytes.
    pub peak_memory_bytes: u64,
    /// Wall time from store creation to the end of the call, in microseconds.
    pub wall_time_us: u64,
    /// Time the run spent on a thread (the guest and the host's synchronous
    /// work for it), in microseconds: wall time minus its waits on HTTP,
    /// locks or sleeps. What a CPU-heavy job costs; under
    /// contention it also counts time the OS gave other threads.
    #[serde(default)]
    pub run_time_us: u64,
    /// Bytes the job's outbound HTTP connections wrote (headers, bodies and
    /// TLS included).
    #[serde(default)]
    pub net_out_bytes: u64,
    /// Bytes those connections read.
    #[serde(default)]
    pub net_in_bytes: u64,
    /// Capabilities the run was refused (outbound requests off its
    /// allow-list or to private addresses, quota refusals, ...), counted
    /// even when the guest swallowed the error and succeeded.
    #[serde(default)]
    pub denied: u64,
    /// Time the run spent in database calls (`postgres`: connecting,
    /// statements, transactions), in microseconds. Left out when zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub db_time_us: u64,
    /// Rows the run's queries returned. Left out when zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub db_rows: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
