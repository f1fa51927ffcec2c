//! Workflows from inside a task: start a chain, group or chord of jobs and
//! return at once; the steps run as what they wait for finishes, and a
//! step that waited reads the results through
//! [`Job::dependencies`](crate::Job::dependencies) and
//! [`Job::results`](crate::Job::results).
//!
//! ```no_run
//! use wasmq_guest::{flow, Job, TaskError};
//!
//! #[derive(serde::Deserialize)]
//! struct Site { pages: Vec<String> }
//!
//! #[wasmq_guest::task]
//! fn run(_job: &Job, site: Site) -> Result<String, TaskError> {
//!     // One `scrape` per page, then one `summarize` that receives every
//!     // page's result. A retry of this job starts nothing new: the same
//!     // flow is found again.
//!     let pages = site.pages.iter().map(|url| flow::step("scrape", &serde_json::json!({"url": url})));
//!     let started = flow::start(&flow::chord(pages, flow::step("summarize", &())))?;
//!     Ok(started.flow_id)
//! }
//! ```

use serde::Serialize;
use serde_json::{json, Value};

use crate::bindings::wasmq::task0_2_0::flow as wit;
use crate::HostError;

/// A node of a workflow: build with [`step`], [`chain`], [`group`] and
/// [`chord`]; it is the JSON a `wasmq flow FLOW.json` file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Node(Value);

impl Node {
    /// When a step of this node fails, what waits on it runs anyway (and
    /// sees the failure among its dependencies) instead of being
    /// cancelled.
    pub fn continue_on_failure(mut self) -> Node {
        self.0["on_failure"] = json!("continue");
        self
    }

    /// The node as JSON.
    pub fn to_json(&self) -> &Value {
        &self.0
    }
}

/// One job of task `task` with `payload`.
pub fn step(task: &str, payload: &impl Serialize) -> Node {
    let payload = serde_json::to_value(payload).unwrap_or(Value::Null);
    Node(json!({"task": task, "payload": payload}))
}

/// Nodes one after another: each waits for the one before.
pub fn chain(nodes: impl IntoIterator<Item = Node>) -> Node {
    Node(json!({"chain": nodes.into_iter().map(|n| n.0).collect::<Vec<_>>()}))
}

/// Nodes side by side.
pub fn group(nodes: impl IntoIterator<Item = Node>) -> Node {
    Node(json!({"group": nodes.into_iter().map(|n| n.0).collect::<Vec<_>>()}))
}

/// A group, then `then`, which receives every member's result.
pub fn chord(members: impl IntoIterator<Item = Node>, then: Node) -> Node {
    let members: Vec<Value> = members.into_iter().map(|n| n.0).collect();
    Node(json!({"chord": {"group": members, "then": then.0}}))
}

/// A started workflow (serializes as `{"flow_id", "job_ids"}`, so a
/// task may return it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Started {
    /// The workflow's id.
    pub flow_id: String,
    /// Its jobs, in the order their steps appear in the definition.
    pub job_ids: Vec<String>,
}

/// Start `node` as a workflow of this job's tenant. Idempotent per job:
/// the n-th `start` of a job returns the same flow on every delivery.
pub fn start(node: &Node) -> Result<Started, HostError> {
    let started = wit::start(&node.0.to_string())?;
    Ok(Started {
        flow_id: started.flow_id,
        job_ids: started.job_ids,
    })
}
