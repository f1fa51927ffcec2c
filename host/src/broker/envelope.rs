//! The job envelope: the versioned JSON a producer writes, in any language.
//!
//! ```json
//! {"v": 1, "id": "0b6f…", "tenant": "default", "task": "onboard",
//!  "queue": "default", "payload": {"user_id": 7}, "priority": 0,
//!  "enqueued_at_ms": 1767225600000, "idempotency_key": null,
//!  "store_result": null, "max_attempts": null}
//! ```
//!
//! `payload` is any JSON value. `priority` 0–9, higher runs first within a
//! queue. `traceparent` (optional, absent when unset) is the producer's W3C
//! trace context. `store_result` and `max_attempts` override the task's policy when
//! not null. Unknown fields are ignored so newer producers can add fields.

use serde::{Deserialize, Serialize};

/// The envelope version this build writes and reads.
pub const ENVELOPE_VERSION: u32 = 1;
/// Highest priority.
pub const MAX_PRIORITY: u8 = 9;
/// The ready-queue scores of one priority: a job's score is
/// `(MAX_PRIORITY - priority) * PRIORITY_BAND` plus its queue's enqueue
/// sequence (see docs/redis-layout.md).
pub const PRIORITY_BAND: u64 = 1 << 44;

/// See the module docs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Envelope format version; must be [`ENVELOPE_VERSION`].
    pub v: u32,
    /// Job id (unique within the tenant).
    pub id: String,
    /// Tenant that owns the job.
    pub tenant: String,
    /// Deployed task name.
    pub task: String,
    /// Queue the job was put on.
    pub queue: String,
    /// JSON payload.
    pub payload: serde_json::Value,
    /// 0–9; higher first.
    #[serde(default)]
    pub priority: u8,
    /// When the producer enqueued it (unix ms).
    #[serde(default)]
    pub enqueued_at_ms: u64,
    /// Deduplication key.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Override of the task's result policy.
    #[serde(default)]
    pub store_result: Option<bool>,
    /// Override of the task's max attempts.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// The producer's W3C trace context (`00-<trace>-<span>-<flags>`):
    /// the job's run joins that trace. Optional; written only when set, so
    /// envelopes without it are byte-for-byte what older producers wrote,
    /// and older workers ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Set on a step of a workflow: its flow and the steps it waits for
    /// (whose results its run receives). Written only when set, like
    /// `traceparent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<FlowRef>,
}

/// A job's place in a workflow, as its envelope records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRef {
    /// The flow's id.
    pub id: String,
    /// The steps (job ids) this one waits for, in order, as flows
    /// submitted before barriers wrote them (one list per step: quadratic
    /// for a group after a group). Read, no longer written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waits_on: Vec<String>,
    /// The barrier of its flow this step waits for (`N` in
    /// `flow:FID:barriers`, whose `N:members` are the steps it waits for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<usize>,
}

impl Envelope {
    /// Parse and check an envelope read from Redis; the error names the problem.
    pub fn parse(text: &str) -> Result<Self, String> {
        let env: Envelope =
            serde_json::from_str(text).map_err(|e| format!("job envelope is not valid: {e}"))?;
        if env.v != ENVELOPE_VERSION {
            return Err(format!("job envelope version {} is not supported (this worker reads version {ENVELOPE_VERSION})", env.v));
        }
        if env.priority > MAX_PRIORITY {
            return Err(format!(
                "job priority {} is out of range 0-{MAX_PRIORITY}",
                env.priority
            ));
        }
        if env.task.is_empty() || env.queue.is_empty() || env.id.is_empty() {
            return Err("job envelope has an empty id, task or queue".into());
        }
        Ok(env)
    }

    /// The lowest ready-queue score of this job's priority band; the
    /// enqueue script adds a per-queue sequence number to it (see
    /// docs/redis-layout.md).
    pub fn priority_base(&self) -> f64 {
        ((MAX_PRIORITY - self.priority) as u64 * PRIORITY_BAND) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_envelopes_are_named() {
        assert!(Envelope::parse("nope").unwrap_err().contains("not valid"));
        let v2 = r#"{"v":2,"id":"a","tenant":"t","task":"x","queue":"q","payload":{}}"#;
        assert!(Envelope::parse(v2).unwrap_err().contains("version 2"));
        let ok = r#"{"v":1,"id":"a","tenant":"t","task":"x","queue":"q","payload":{},"extra":1}"#;
        assert_eq!(Envelope::parse(ok).unwrap().task, "x");
    }

    #[test]
    fn a_payload_as_deep_as_a_producer_may_send_parses_inside_its_envelope() {
        let depth = crate::limits::MAX_PAYLOAD_DEPTH;
        let payload = "[".repeat(depth) + &"]".repeat(depth);
        assert!(crate::limits::check_json_depth("payload", &payload, depth).is_ok());
        let env = format!(
            r#"{{"v":1,"id":"a","tenant":"t","task":"x","queue":"q","payload":{payload}}}"#
        );
        assert!(Envelope::parse(&env).is_ok(), "{:?}", Envelope::parse(&env));
    }

    #[test]
    fn higher_priority_bands_come_first() {
        let mut e =
            Envelope::parse(r#"{"v":1,"id":"a","tenant":"t","task":"x","queue":"q","payload":{}}"#)
                .unwrap();
        let low = e.priority_base();
        e.priority = 9;
        assert_eq!(e.priority_base(), 0.0);
        assert!(e.priority_base() < low);
    }
}
