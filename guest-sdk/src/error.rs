//! Errors: [`TaskError`] (how a job failed, what the host should do about it)
//! and [`HostError`] (how a host call failed), plus the conversions that let
//! `?` turn host, I/O and HTTP failures into the right task error.
//!
//! The mapping is the policy users see: a refused capability becomes kind
//! `"denied"`, an unreachable backing store becomes a retry, a malformed
//! argument becomes a permanent failure.

use std::fmt;
use std::time::Duration;

use crate::bindings::wasmq::task0_1_0::types as wit;

/// How a task run failed, and what the host should do about it.
///
/// Build one with [`TaskError::retry`], [`TaskError::retry_after`],
/// [`TaskError::fail`] or [`TaskError::kind`], or let `?` convert a
/// [`HostError`], an [`http::HttpError`](crate::http::HttpError) or a
/// `std::io::Error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskError {
    /// A transient failure: run the job again (until the retry policy's
    /// attempts are used up).
    Retry {
        /// Why the task asks to be retried; kept in the attempt history.
        message: String,
        /// Wait at least this long before the next attempt; `None` uses the
        /// policy's backoff.
        delay: Option<Duration>,
    },
    /// A permanent failure: the job is dead-lettered without retrying.
    Fail(String),
    /// A failure of a named kind. The task's retry policy decides: kinds in
    /// its auto-retry list are retried with backoff, others fail the job.
    Kind {
        /// Error kind matched against the retry policy (`"network"`,
        /// `"rate-limited"`, `"denied"`, ...).
        kind: String,
        /// Human-readable description, kept in the attempt history.
        message: String,
    },
}

impl TaskError {
    /// Kind of a payload that does not deserialize into the task's
    /// arguments. Reserved: the host reports it as the `bad-payload` failure
    /// category.
    pub const BAD_PAYLOAD: &'static str = "bad-payload";
    /// Kind of a refused capability (host call, file, HTTP destination).
    pub const DENIED: &'static str = "denied";
    /// Kind of a connection failure or timeout; list it in a policy's
    /// auto-retry kinds to retry such failures with backoff.
    pub const NETWORK: &'static str = "network";

    /// A transient failure; the retry policy's backoff decides when to retry.
    pub fn retry(message: impl Into<String>) -> Self {
        TaskError::Retry {
            message: message.into(),
            delay: None,
        }
    }

    /// A transient failure; retry no sooner than `delay` from now.
    pub fn retry_after(message: impl Into<String>, delay: Duration) -> Self {
        TaskError::Retry {
            message: message.into(),
            delay: Some(delay),
        }
    }

    /// A permanent failure; the job is dead-lettered.
    pub fn fail(message: impl Into<String>) -> Self {
        TaskError::Fail(message.into())
    }

    /// A failure of a named kind, handled by the task's retry policy.
    pub fn kind(kind: impl Into<String>, message: impl Into<String>) -> Self {
        TaskError::Kind {
            kind: kind.into(),
            message: message.into(),
        }
    }

    /// The human-readable message, whatever the variant.
    pub fn message(&self) -> &str {
        match self {
            TaskError::Retry { message, .. } => message,
            TaskError::Fail(message) => message,
            TaskError::Kind { message, .. } => message,
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::Retry {
                message,
                delay: None,
            } => write!(f, "retry: {message}"),
            TaskError::Retry {
                message,
                delay: Some(d),
            } => write!(f, "retry after {} ms: {message}", crate::millis(*d)),
            TaskError::Fail(message) => write!(f, "fail: {message}"),
            TaskError::Kind { kind, message } => write!(f, "{kind}: {message}"),
        }
    }
}

impl std::error::Error for TaskError {}

impl From<TaskError> for wit::TaskError {
    fn from(e: TaskError) -> Self {
        match e {
            TaskError::Retry { message, delay } => wit::TaskError::Retry(wit::RetryRequest {
                message,
                delay_ms: delay.map(crate::millis),
            }),
            TaskError::Fail(message) => wit::TaskError::Fail(message),
            TaskError::Kind { kind, message } => {
                wit::TaskError::Kind(wit::KindedError { kind, message })
            }
        }
    }
}

/// Failure of a host call (key-value, counter, lock, step, enqueue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    /// The capability or name is not granted to this task, or the call
    /// would pass one of its tenant's quotas (stored bytes or entries, child
    /// jobs per minute, idempotency keys).
    Denied(String),
    /// An argument was malformed or out of range (empty name, oversized
    /// value, a counter that would overflow, ...): the same call fails the
    /// same way again.
    Invalid(String),
    /// The host could not serve the call (its store is unreachable, out of
    /// memory, ...): not the task's fault. A job that fails after this is
    /// retried without using one of its attempts.
    Unavailable(String),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::Denied(m) => write!(f, "denied: {m}"),
            HostError::Invalid(m) => write!(f, "invalid argument: {m}"),
            HostError::Unavailable(m) => write!(f, "host unavailable: {m}"),
        }
    }
}

impl std::error::Error for HostError {}

impl From<wit::HostError> for HostError {
    fn from(e: wit::HostError) -> Self {
        match e {
            wit::HostError::Denied(m) => HostError::Denied(m),
            wit::HostError::Invalid(m) => HostError::Invalid(m),
            wit::HostError::Unavailable(m) => HostError::Unavailable(m),
        }
    }
}

/// Denied → kind `"denied"`; unavailable → retry (the store may come back);
/// invalid → fail (the same call would be malformed again).
impl From<HostError> for TaskError {
    fn from(e: HostError) -> Self {
        match e {
            HostError::Denied(m) => TaskError::kind(TaskError::DENIED, m),
            HostError::Unavailable(m) => TaskError::retry(format!("host unavailable: {m}")),
            HostError::Invalid(m) => TaskError::fail(format!("invalid host call: {m}")),
        }
    }
}

/// A refused file access → kind `"denied"`; any other I/O error → fail.
///
/// "Refused" covers permission errors and std's refusal to open a path
/// outside every pre-opened directory (on WASI, a path the task was not
/// granted has no pre-opened file descriptor; std reports that as an
/// uncategorized error whose message says so).
impl From<std::io::Error> for TaskError {
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind;
        let refused = matches!(
            e.kind(),
            ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem
        ) || e.to_string().contains("pre-opened file descriptor");
        if refused {
            TaskError::kind(TaskError::DENIED, e.to_string())
        } else {
            TaskError::fail(format!("I/O error: {e}"))
        }
    }
}
