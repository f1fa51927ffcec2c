//! Secrets and configuration the task's policy grants.
//!
//! A task names what it may read in `task.toml` (`secrets = [...]` under
//! `[sandbox]`); an operator stores values with `wasmq secret set NAME`.
//! Values live on the host, sealed; a job reads one through the host, in
//! its own tenant only, and gets the value current when the job runs. The
//! host blots values out of the job's log, result and error message, but
//! a task should still never print one.
//!
//! ```no_run
//! use wasmq_guest::{config, Job, TaskError};
//!
//! #[wasmq_guest::task]
//! fn run(_job: &Job, _args: ()) -> Result<(), TaskError> {
//!     let api_key = config::require("mail_api_key")?;
//!     // ... send with `api_key` ...
//!     # let _ = api_key;
//!     Ok(())
//! }
//! ```

use crate::bindings::wasmq::task0_2_0::config as wit;
use crate::{HostError, TaskError};

/// The value of secret `name`, or `None` when it is granted but not set.
/// `Denied` when the task's policy does not grant `name` (passed on with
/// `?`, the job ends `denied`).
pub fn get(name: &str) -> Result<Option<String>, HostError> {
    Ok(wit::get(name)?)
}

/// The value of secret `name`; a permanent `"config"` failure naming it
/// when it is not set.
pub fn require(name: &str) -> Result<String, TaskError> {
    get(name)?.ok_or_else(|| {
        TaskError::kind(
            "config",
            format!("secret {name:?} is not set; set it with `wasmq secret set {name}`"),
        )
    })
}
