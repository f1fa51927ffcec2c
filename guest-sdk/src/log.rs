//! Structured log lines, kept by the host with the job's log (bounded).
//!
//! Use these rather than `println!`: stdout and stderr may be discarded or
//! capped by the host, while these lines are stored with the job's attempts.

use crate::bindings::wasmq::task0_1_0::log::{write, Level};

/// Appends a debug line to the job's log.
pub fn debug(message: impl AsRef<str>) {
    write(Level::Debug, message.as_ref());
}

/// Appends an info line to the job's log.
pub fn info(message: impl AsRef<str>) {
    write(Level::Info, message.as_ref());
}

/// Appends a warning line to the job's log.
pub fn warn(message: impl AsRef<str>) {
    write(Level::Warn, message.as_ref());
}

/// Appends an error line to the job's log.
pub fn error(message: impl AsRef<str>) {
    write(Level::Error, message.as_ref());
}
