//! Tenant-scoped atomic counters.
//!
//! The seed's `PAGES_SCRAPED` global done right: every job of the tenant, on
//! every worker, sees and updates the same value. A job may run more than
//! once (retries, at-least-once delivery), so count an event that must be
//! counted once with [`incr_once`], which is atomic on the host (a step
//! marker around [`incr`] can count twice if the worker dies between the
//! two).

use crate::bindings::wasmq::task0_1_0::counter as wit;
use crate::HostError;

/// Adds `delta` (may be negative) to counter `name` and returns the new
/// value. A counter that does not exist starts at 0.
pub fn incr(name: &str, delta: i64) -> Result<i64, HostError> {
    Ok(wit::incr(name, delta)?)
}

/// Adds `delta` to counter `name` once per `once_key`: the first call with
/// a key adds and returns the new value; later calls with that key, from
/// this job or any other, add nothing and return the value recorded then.
///
/// ```no_run
/// # fn f(url: &str) -> Result<(), wasmq_guest::HostError> {
/// let pages = wasmq_guest::counter::incr_once("pages-scraped", 1, &format!("scraped:{url}"))?;
/// # Ok(()) }
/// ```
pub fn incr_once(name: &str, delta: i64, once_key: &str) -> Result<i64, HostError> {
    Ok(wit::incr_once(name, delta, once_key)?)
}

/// The current value of counter `name` (0 if it does not exist).
pub fn get(name: &str) -> Result<i64, HostError> {
    Ok(wit::get(name)?)
}
