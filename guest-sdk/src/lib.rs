//! # wasmq-guest: write wasmq tasks in Rust
//!
//! A wasmq task is a WebAssembly component implementing the `task` world of
//! the `wasmq:task@0.2.0` WIT package (`wit/task.wit`; components built
//! against 0.1.0 keep running unchanged). This crate hides the
//! component bindings: a task crate writes one ordinary function, marks it
//! with [`#[task]`](macro@task), and gets typed arguments, typed results and
//! safe wrappers around the host's state (key-value, counters, locks, step
//! markers, child jobs, workflows, secrets, PostgreSQL, logging, outbound HTTP).
//!
//! Every job runs in a fresh instance, so globals do not survive between
//! jobs. Whatever must survive a retry, a duplicate delivery or another
//! worker goes through the host: [`kv`], [`counter`], [`Lock`], [`once`].
//!
//! ## A complete task
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "welcome"
//! version = "0.1.0"
//! edition = "2021"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! wasmq-guest = { path = "../../guest-sdk" }
//! serde = { version = "1", features = ["derive"] }
//! serde_json = "1"
//! ```
//!
//! `src/lib.rs`:
//!
//! ```no_run
//! use std::time::Duration;
//! use wasmq_guest::{counter, http, log, once, Job, TaskError};
//!
//! /// The job's JSON payload.
//! #[derive(serde::Deserialize)]
//! struct Args {
//!     user_id: u64,
//!     mail_api: String,
//! }
//!
//! /// The job's JSON result.
//! #[derive(serde::Serialize)]
//! struct Out {
//!     user_id: u64,
//!     /// Users welcomed so far, this one included.
//!     welcomed: u64,
//! }
//!
//! #[wasmq_guest::task]
//! fn run(job: &Job, args: Args) -> Result<Out, TaskError> {
//!     log::info(format!("attempt {} of {}", job.attempt, job.max_attempts));
//!
//!     // Runs to success at most once per user, across retries and duplicate
//!     // deliveries of this job and any other job naming the same user. On a
//!     // repeat, the closure is skipped and its recorded output returned.
//!     let welcomed = once(&format!("welcome:{}", args.user_id), || {
//!         let body = serde_json::json!({ "to_user": args.user_id });
//!         let resp = http::post_json(&args.mail_api, &body)?; // "network" on timeouts
//!         match resp.status {
//!             200..=299 => Ok(counter::incr("users-welcomed", 1)?),
//!             429 => Err(TaskError::retry_after("mail API is busy", Duration::from_secs(30))),
//!             s => Err(TaskError::kind("mail-api", format!("mail API answered {s}"))),
//!         }
//!     })?;
//!
//!     Ok(Out { user_id: args.user_id, welcomed: welcomed as u64 })
//! }
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`; the
//! component is `target/wasm32-wasip2/release/welcome.wasm`.
//!
//! ## Errors
//!
//! A task returns [`TaskError`]: [`TaskError::retry`] (transient, run again),
//! [`TaskError::fail`] (permanent, dead-letter now) or [`TaskError::kind`]
//! (named kind; the task's retry policy decides). Host calls fail with
//! [`HostError`], HTTP calls with [`http::HttpError`], file access with
//! `std::io::Error`; all convert into `TaskError` with `?`.
//!
//! A payload that does not deserialize into the task's argument type never
//! reaches the function: the job fails with kind `"bad-payload"`.
//!
//! ## Native builds
//!
//! The crate also compiles for the host target so a task crate can be an
//! `rlib` too (benchmarks call pure task code natively). There, every host
//! call panics: only pure code is meant to run natively.

#![deny(missing_docs)]

// The bindings below name this crate by its absolute path
// (`::wasmq_guest::...`) so that the export macro expands correctly inside
// task crates; this alias makes the same path resolve inside the SDK itself.
extern crate self as wasmq_guest;

mod children;
pub mod config;
pub mod counter;
mod error;
pub mod flow;
pub mod fs;
pub mod http;
mod job;
pub mod kv;
mod lock;
pub mod log;
pub mod postgres;
mod step;

pub use children::{enqueue, enqueue_with, EnqueueOptions};
pub use error::{HostError, TaskError};
pub use job::{Dependency, Job};
pub use lock::Lock;
pub use step::{once, once_with, step_token, StepOptions};

/// Marks the function that runs a job, and exports it from the component.
///
/// The function takes `&Job` and an argument type that implements
/// `serde::Deserialize`, and returns `Result<T, TaskError>` where `T`
/// implements `serde::Serialize`:
///
/// ```no_run
/// # use wasmq_guest::{Job, TaskError};
/// #[derive(serde::Deserialize)]
/// struct Args { n: u32 }
///
/// #[wasmq_guest::task]
/// fn run(_job: &Job, args: Args) -> Result<u32, TaskError> {
///     Ok(args.n * 2)
/// }
/// ```
///
/// The payload JSON is deserialized into the argument type (an empty payload
/// counts as `null`, or `{}` if the type does not accept `null`); if that
/// fails, the job fails with kind `"bad-payload"` naming the serde error. The
/// result is serialized to JSON. Exactly one function per component may carry
/// this attribute.
pub use wasmq_guest_macros::task;

/// The generated component bindings of the `task` world. Not public API:
/// task crates go through the wrappers of this crate.
#[doc(hidden)]
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "wasmq:task/task@0.2.0",
        path: "../wit",
        // Task crates do not depend on wit-bindgen themselves: the macro
        // expansion and the generated code reach it through this crate.
        runtime_path: "::wasmq_guest::__private::wit_bindgen::rt",
        // The export macro is expanded by `#[task]` in the task crate, so it
        // must be exported and must find the bindings here, not in the
        // caller's module.
        pub_export_macro: true,
        export_macro_name: "__export_task_world",
        default_bindings_module: "::wasmq_guest::bindings",
        // The 0.1.0 interfaces the 0.2.0 world imports are ours to bind too.
        generate_all,
    });
}

/// What the `#[task]` expansion needs. Not public API; may change in any
/// release.
#[doc(hidden)]
pub mod __private {
    pub use crate::bindings::wasmq::task0_1_0::types::TaskError as WitTaskError;
    pub use crate::bindings::wasmq::task0_2_0::types::JobContext;
    pub use crate::bindings::Guest;
    pub use wit_bindgen;

    use serde::de::DeserializeOwned;
    use serde::Serialize;

    use crate::{Job, TaskError};

    /// Runs one job: payload JSON → `A`, call `f`, `O` → result JSON.
    pub fn dispatch<A, O, F>(ctx: JobContext, payload: String, f: F) -> Result<String, WitTaskError>
    where
        A: DeserializeOwned,
        O: Serialize,
        F: FnOnce(&Job, A) -> Result<O, TaskError>,
    {
        let job = Job::from(ctx);
        let args = parse_payload::<A>(&payload).map_err(WitTaskError::from)?;
        let out = f(&job, args).map_err(WitTaskError::from)?;
        serde_json::to_string(&out).map_err(|e| {
            WitTaskError::from(TaskError::fail(format!(
                "task result does not serialize to JSON: {e}"
            )))
        })
    }

    /// Deserializes the payload, or explains why not as a `bad-payload` error.
    pub fn parse_payload<A: DeserializeOwned>(payload: &str) -> Result<A, TaskError> {
        let bad = |e: serde_json::Error| {
            TaskError::kind(
                TaskError::BAD_PAYLOAD,
                format!("payload does not match the task's arguments: {e}"),
            )
        };
        if payload.trim().is_empty() {
            // No payload at all: accept argument types that take `null`
            // (`()`, `Option`, `Value`) or `{}` (structs whose fields all
            // have defaults).
            return serde_json::from_str("null")
                .or_else(|_| serde_json::from_str("{}"))
                .map_err(bad);
        }
        serde_json::from_str(payload).map_err(bad)
    }
}

/// Milliseconds in `d` for the WIT interfaces, rounded up so that a short
/// non-zero duration never becomes 0 ("expire now" / "do not wait").
pub(crate) fn millis(d: std::time::Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::__private::{dispatch, parse_payload, JobContext, WitTaskError};
    use super::*;

    fn ctx() -> JobContext {
        JobContext {
            id: "j1".into(),
            task: "t".into(),
            tenant: "default".into(),
            attempt: 1,
            max_attempts: 3,
            idempotency_key: None,
            flow_id: None,
        }
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Strict {
        n: u32,
    }

    fn double(job: &Job, a: Strict) -> Result<serde_json::Value, TaskError> {
        Ok(serde_json::json!({ "double": a.n * 2, "job": job.id }))
    }

    #[test]
    fn dispatch_round_trips_json() {
        let out = dispatch(ctx(), r#"{"n": 21}"#.into(), double).unwrap();
        assert_eq!(out, r#"{"double":42,"job":"j1"}"#);
    }

    #[test]
    fn bad_payload_is_the_reserved_kind() {
        for payload in [r#"{"n": "x"}"#, r#"{"n": 1, "m": 2}"#, "not json", ""] {
            match dispatch(ctx(), payload.into(), double) {
                Err(WitTaskError::Kind(k)) => {
                    assert_eq!(k.kind, "bad-payload");
                    assert!(k.message.contains("payload"), "{}", k.message);
                }
                other => panic!("{payload}: {other:?}"),
            }
        }
    }

    #[test]
    fn empty_payload_means_null_or_empty_object() {
        #[derive(serde::Deserialize, Default)]
        #[serde(default)]
        struct AllDefault {
            n: u32,
        }
        assert_eq!(parse_payload::<Option<u32>>("").unwrap(), None);
        assert_eq!(parse_payload::<AllDefault>(" ").unwrap().n, 0);
    }

    #[test]
    fn task_errors_map_to_wit() {
        let e = WitTaskError::from(TaskError::retry_after(
            "x",
            std::time::Duration::from_micros(1),
        ));
        match e {
            WitTaskError::Retry(r) => assert_eq!(r.delay_ms, Some(1)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            WitTaskError::from(TaskError::fail("x")),
            WitTaskError::Fail(m) if m == "x"
        ));
    }

    #[test]
    fn host_and_io_errors_map_to_task_errors() {
        let denied = TaskError::from(HostError::Denied("no".into()));
        assert!(matches!(denied, TaskError::Kind { ref kind, .. } if kind == "denied"));
        assert!(matches!(
            TaskError::from(HostError::Unavailable("redis".into())),
            TaskError::Retry { .. }
        ));
        assert!(matches!(
            TaskError::from(HostError::Invalid("empty key".into())),
            TaskError::Fail(_)
        ));

        use std::io::{Error, ErrorKind};
        let refused = Error::other(
            "failed to find a pre-opened file descriptor through which \"/etc/passwd\" could be opened",
        );
        assert!(
            matches!(TaskError::from(refused), TaskError::Kind { ref kind, .. } if kind == "denied")
        );
        assert!(matches!(
            TaskError::from(Error::from(ErrorKind::PermissionDenied)),
            TaskError::Kind { .. }
        ));
        assert!(matches!(
            TaskError::from(Error::from(ErrorKind::NotFound)),
            TaskError::Fail(_)
        ));
    }
}
