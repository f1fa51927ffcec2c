//! The failure categories users see in `status`, `result`, logs and exit
//! codes (SPEC.md, "Failures"), and the error type that carries them.
//!
//! Every way a job can end badly maps to exactly one [`Category`]; the
//! category decides whether a retry can help ([`Category::is_permanent`]).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A failure category from the product contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    /// The task returned an error.
    TaskError,
    /// The task asked for retries (or failed with a retryable kind) and ran
    /// out of attempts.
    RetryExhausted,
    /// The guest trapped: panic, `unreachable`, stack overflow, bad memory access.
    Trap,
    /// The guest used up its fuel (deterministic CPU budget).
    FuelExhausted,
    /// The job ran past its wall-clock deadline.
    Timeout,
    /// The guest tried to grow memory (or tables) past its cap.
    MemoryLimit,
    /// The guest's result is larger than the result size cap.
    OutputTooLarge,
    /// The guest used a capability it was not granted.
    Denied,
    /// The file is not a component for the wasmq task world.
    InvalidComponent,
    /// The payload is not valid JSON or does not match the task's arguments.
    BadPayload,
    /// No task of that name is deployed.
    UnknownTask,
    /// The host, not the task, could not run the job (Redis unreachable or
    /// refusing writes, a component it could not fetch) through every host
    /// retry the job gets.
    HostError,
    /// An operator cancelled the job (`wasmq cancel`): a queued or delayed
    /// job never ran, a running one was stopped. Or the job was a step of
    /// a workflow that waited for a step that failed (the message names
    /// it).
    Cancelled,
}

impl Category {
    /// The name users see (`fuel-exhausted`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Category::TaskError => "task-error",
            Category::RetryExhausted => "retry-exhausted",
            Category::Trap => "trap",
            Category::FuelExhausted => "fuel-exhausted",
            Category::Timeout => "timeout",
            Category::MemoryLimit => "memory-limit",
            Category::OutputTooLarge => "output-too-large",
            Category::Denied => "denied",
            Category::InvalidComponent => "invalid-component",
            Category::BadPayload => "bad-payload",
            Category::UnknownTask => "unknown-task",
            Category::HostError => "host-error",
            Category::Cancelled => "cancelled",
        }
    }

    /// Failures that a retry cannot fix by default: the same input, code and
    /// limits would fail the same way (fuel metering is deterministic).
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            Category::FuelExhausted
                | Category::MemoryLimit
                | Category::InvalidComponent
                | Category::BadPayload
                | Category::UnknownTask
                | Category::OutputTooLarge
                | Category::Denied
                | Category::RetryExhausted
                | Category::HostError
                | Category::Cancelled
        )
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job failure: its category and a message that names the cause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// What kind of failure this is.
    pub category: Category,
    /// What happened, in words an operator can act on.
    pub message: String,
}

impl Failure {
    /// A failure of `category` with `message`.
    pub fn new(category: Category, message: impl Into<String>) -> Self {
        Failure {
            category,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.category, self.message)
    }
}

impl std::error::Error for Failure {}
