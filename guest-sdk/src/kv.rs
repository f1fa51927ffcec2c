//! The tenant-scoped key-value store.
//!
//! Keys are resolved inside the job's tenant: the same key names different
//! entries in different tenants, and no key reaches another tenant's data.
//! Values are bytes; [`get_json`] and [`set_json`] store serde values as
//! JSON.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bindings::wasmq::task0_1_0::kv as wit;
use crate::{millis, HostError, TaskError};

/// The value stored under `key`, or `None`.
pub fn get(key: &str) -> Result<Option<Vec<u8>>, HostError> {
    Ok(wit::get(key)?)
}

/// Stores `value` under `key`, replacing any value. With `ttl` the entry
/// expires after that long; without, it persists.
pub fn set(key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), HostError> {
    Ok(wit::set(key, value, ttl.map(millis))?)
}

/// Stores `value` under `key` only if `key` holds nothing. Returns true if
/// it was stored. Atomic: of concurrent callers, exactly one gets true.
pub fn set_if_absent(key: &str, value: &[u8], ttl: Option<Duration>) -> Result<bool, HostError> {
    Ok(wit::set_if_absent(key, value, ttl.map(millis))?)
}

/// Removes `key`. Returns true if it existed.
pub fn delete(key: &str) -> Result<bool, HostError> {
    Ok(wit::delete(key)?)
}

/// The JSON value stored under `key`, deserialized into `T`, or `None`.
///
/// A stored value that is not valid JSON for `T` is a permanent failure
/// ([`TaskError::Fail`]): retrying would read the same bytes.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, TaskError> {
    match get(key)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            TaskError::fail(format!(
                "kv value under {key:?} is not the expected JSON: {e}"
            ))
        }),
    }
}

/// Stores `value` as JSON under `key` (see [`set`]).
pub fn set_json<T: Serialize + ?Sized>(
    key: &str,
    value: &T,
    ttl: Option<Duration>,
) -> Result<(), TaskError> {
    let bytes = serde_json::to_vec(value).map_err(|e| {
        TaskError::fail(format!("value for kv key {key:?} does not serialize: {e}"))
    })?;
    Ok(set(key, &bytes, ttl)?)
}
