//! `noop`: the smallest wasmq task. Ignores its payload and returns
//! `{"ok": true}`.
//!
//! It measures the host, not the task: `wasmq bench` drains a queue of noop
//! jobs to time fetching, instantiating and acknowledging.

use wasmq_guest::{Job, TaskError};

/// Accepts any payload (`serde_json::Value`), does nothing, reports success.
#[wasmq_guest::task]
fn run(_job: &Job, _args: serde_json::Value) -> Result<serde_json::Value, TaskError> {
    Ok(serde_json::json!({ "ok": true }))
}
