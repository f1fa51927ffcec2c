//! The hostile guest's file modes: planting symlinks, to prove the host's
//! directory caps hold.
//!
//! These call `wasi:filesystem` directly (the `wasip2` bindings), not only
//! through `std::fs`, so each host path is exercised on its own.

use std::path::Path;

use serde_json::{json, Value};
use wasip2::filesystem::preopens::get_directories;
use wasip2::filesystem::types::{Descriptor, ErrorCode};
use wasmq_guest::TaskError;

/// The granted directory holding `path` (the deepest one), and `path`
/// relative to it.
fn in_grant(path: &str) -> Result<(Descriptor, String), TaskError> {
    let mut best: Option<(Descriptor, String, usize)> = None;
    for (dir, guest) in get_directories() {
        if let Ok(rest) = Path::new(path).strip_prefix(&guest) {
            let depth = Path::new(&guest).components().count();
            if best.as_ref().is_none_or(|b| depth > b.2) {
                best = Some((dir, rest.to_string_lossy().into_owned(), depth));
            }
        }
    }
    best.map(|(dir, rest, _)| (dir, rest)).ok_or_else(|| {
        TaskError::kind(
            TaskError::DENIED,
            format!("{path} is in no granted directory"),
        )
    })
}

fn failed(e: ErrorCode) -> TaskError {
    TaskError::fail(format!("filesystem error: {}", e.name()))
}

/// `symlink`: the symlink `link` pointing at `target`, taken as is; with
/// `replace`, whatever is at `link` (an empty directory or a file) goes
/// first.
pub fn symlink(target: &str, link: &str, replace: bool) -> Result<Value, TaskError> {
    let (dir, rest) = in_grant(link)?;
    if replace && dir.remove_directory_at(&rest).is_err() {
        let _ = dir.unlink_file_at(&rest);
    }
    dir.symlink_at(target, &rest).map_err(failed)?;
    Ok(json!({ "link": link, "target": target }))
}
