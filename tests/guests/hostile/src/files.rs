//! The hostile guest's file modes: writing as much as it can through every
//! `wasi:filesystem` call that takes disk, and planting symlinks, to prove
//! the host's directory caps and disk quotas hold.
//!
//! These call `wasi:filesystem` directly (the `wasip2` bindings), not only
//! through `std::fs`, so each host path is exercised on its own.

use std::path::Path;

use serde_json::{json, Value};
use wasip2::filesystem::preopens::get_directories;
use wasip2::filesystem::types::{
    filesystem_error_code, Descriptor, DescriptorFlags, ErrorCode, OpenFlags, PathFlags,
};
use wasip2::io::streams::{OutputStream, StreamError};
use wasmq_guest::TaskError;

/// Largest chunk `blocking-write-and-flush` takes.
const BLOCKING_WRITE_MAX: usize = 4096;

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

/// Open (creating) the file at `path` for writing.
fn open_for_writing(path: &str) -> Result<Descriptor, TaskError> {
    let (dir, rest) = in_grant(path)?;
    dir.open_at(
        PathFlags::empty(),
        &rest,
        OpenFlags::CREATE,
        DescriptorFlags::READ | DescriptorFlags::WRITE,
    )
    .map_err(failed)
}

/// `write-file`: `bytes` bytes into `path` with plain `std::fs::write`.
pub fn write_file(path: &str, bytes: usize) -> Result<Value, TaskError> {
    std::fs::write(path, vec![b'x'; bytes])?;
    Ok(json!({ "written": bytes }))
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

/// `write-loop`: write `chunk` bytes at a time through `via` until a call
/// fails (or `limit` is reached), and report how far it got instead of
/// failing: the host must stop the job even when the guest swallows the
/// error.
pub fn write_loop(path: &str, via: &str, chunk: usize, limit: u64) -> Result<Value, TaskError> {
    let buf = vec![b'x'; chunk.max(1)];
    let step = buf.len() as u64;
    let mut written: u64 = 0;
    let error = match via {
        // descriptor.write at the end of what was written.
        "write" => {
            let file = open_for_writing(path)?;
            loop {
                if written >= limit {
                    break "limit reached".to_string();
                }
                match file.write(&buf, written) {
                    Ok(n) => written += n,
                    Err(e) => break e.name().to_string(),
                }
            }
        }
        // write-via-stream, with check-write and write.
        "stream" => {
            let file = open_for_writing(path)?;
            let out = file.write_via_stream(0).map_err(failed)?;
            stream_writes(&out, &buf, &mut written, limit)
        }
        // append-via-stream, with blocking-write-and-flush.
        "append" => {
            let file = open_for_writing(path)?;
            let out = file.append_via_stream().map_err(failed)?;
            loop {
                if written >= limit {
                    break "limit reached".to_string();
                }
                let n = buf.len().min(BLOCKING_WRITE_MAX);
                match out.blocking_write_and_flush(&buf[..n]) {
                    Ok(()) => written += n as u64,
                    Err(e) => break stream_error(e),
                }
            }
        }
        // One chunk far past the end (`limit` bytes in), leaving a hole.
        "hole" => {
            let file = open_for_writing(path)?;
            match file.write(&buf, limit) {
                Ok(n) => {
                    written = n;
                    "none".to_string()
                }
                Err(e) => e.name().to_string(),
            }
        }
        // set-size, growing the file by a chunk each time.
        "set-size" => {
            let file = open_for_writing(path)?;
            loop {
                if written >= limit {
                    break "limit reached".to_string();
                }
                match file.set_size(written + step) {
                    Ok(()) => written += step,
                    Err(e) => break e.name().to_string(),
                }
            }
        }
        // Plain std::fs, as most guests write.
        "std" => {
            use std::io::Write;
            let mut file = std::fs::File::create(path)?;
            loop {
                if written >= limit {
                    break "limit reached".to_string();
                }
                match file.write_all(&buf) {
                    Ok(()) => written += step,
                    Err(e) => break e.to_string(),
                }
            }
        }
        // Empty files, one after another, in the directory `path`:
        // `written` counts files.
        "create-files" => {
            let (dir, rest) = in_grant(path)?;
            loop {
                if written >= limit {
                    break "limit reached".to_string();
                }
                let name = Path::new(&rest).join(format!("f{written}"));
                let name = name.to_string_lossy();
                let flags = OpenFlags::CREATE | OpenFlags::EXCLUSIVE;
                match dir.open_at(PathFlags::empty(), &name, flags, DescriptorFlags::WRITE) {
                    Ok(_) => written += 1,
                    Err(e) => break e.name().to_string(),
                }
            }
        }
        other => {
            let known = "write, stream, append, hole, set-size, std, create-files";
            let message = format!("unknown via {other:?} ({known})");
            return Err(TaskError::kind(TaskError::BAD_PAYLOAD, message));
        }
    };
    Ok(json!({ "written": written, "error": error }))
}

/// Write `buf` to `out` with check-write and write until a write fails.
fn stream_writes(out: &OutputStream, buf: &[u8], written: &mut u64, limit: u64) -> String {
    loop {
        if *written >= limit {
            return "limit reached".to_string();
        }
        let permit = match out.check_write() {
            Ok(0) => {
                out.subscribe().block();
                continue;
            }
            Ok(n) => n as usize,
            Err(e) => return stream_error(e),
        };
        let n = buf.len().min(permit);
        if let Err(e) = out.write(&buf[..n]) {
            return stream_error(e);
        }
        *written += n as u64;
    }
}

fn stream_error(e: StreamError) -> String {
    match e {
        StreamError::LastOperationFailed(err) => filesystem_error_code(&err)
            .map_or_else(|| err.to_debug_string(), |code| code.name().to_string()),
        StreamError::Closed => "closed".to_string(),
    }
}
