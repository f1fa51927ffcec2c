//! Test-only guest that misbehaves on request, to prove the sandbox holds.
//!
//! Not an example: it exists for the host's integration tests. The payload
//! `{"mode": "...", ...}` picks the behaviour:
//!
//! | mode | does | extra fields |
//! |---|---|---|
//! | `spin` | loops forever (fuel / timeout) | |
//! | `memory-bomb` | allocates and touches 1 MiB blocks forever (memory cap) | |
//! | `recurse` | recurses without bound (stack overflow trap) | |
//! | `panic` | panics (trap) | |
//! | `huge-result` | returns an 8 MiB JSON string (result size cap) | |
//! | `read-file` | returns the file's contents via `wasmq_guest::fs` (grants) | `path` |
//! | `read-file-raw` | the same with plain `std::fs` | `path` |
//! | `write-file` | writes that many bytes to the file with `std::fs::write`; returns `{"written"}` | `path`, `bytes` |
//! | `write-loop` | writes `chunk` bytes (default 65536) at a time through `via` until a call fails or `limit` bytes (default 1 GiB) are written, and returns `{"written", "error"}` (swallowing the error); `via`: `write` (descriptor.write), `stream` (write-via-stream), `append` (append-via-stream), `hole` (one chunk `limit` bytes past the start, once), `set-size`, `std` (`std::fs`), `create-files` (empty files in the directory `path`; `written` counts files) | `path`, `via`, `chunk`, `limit` |
//! | `symlink` | creates the symlink `link` pointing at `target`, taken as is (e.g. `..`); with `replace: true`, removes the empty directory or file at `link` first | `target`, `link`, `replace` |
//! | `http` | GETs the URL, returns `{"status"}` (HTTP allow-list) | `url` |
//! | `print` | prints lines forever (output caps, timeout) | |
//! | `enqueue-flood` | enqueues child jobs forever | `task` (default: this task) |
//! | `kv-get` | returns `{"value"}` under the key, or null | `key` |
//! | `kv-set` | stores `value` under the key; with `or_fail`, a failed store fails the job (`fail`) | `key`, `value`, `or_fail` |
//! | `locked-incr` | increments kv `key` under the lock `key`; returns value and fencing token | `key` |
//! | `counted-sleep` | bumps `counter` once (`incr_once`), then sleeps | `counter`, `ms` |
//! | `sleep` | `std::thread::sleep` (an async host wait, no fuel) | `ms` |
//! | `busy-ms` | spins on `Instant` for about that long (burns fuel) | `ms` |
//! | `echo` | returns the payload | |
//! | `not-json` | returns a result that is not JSON | |
//! | `fail` | fails with `kind` (or plain `fail` without one) | `message`, `kind` |
//! | `retry` | asks to be retried, after `ms` if given | `ms` |
//! | `step-post` | inside step `step`: sleeps, then POSTs `{"job"}` to the URL (the step's `Idempotency-Key` rides along) | `step`, `url`, `sleep_ms` |
//! | `tick` | POSTs `{"job", "i"}` to the URL `n` times, `ms` apart | `url`, `n`, `ms` |
//! | `kv-flood` | stores `bytes`-byte values under new keys until a call fails | `bytes`, `ttl_ms` |
//! | `counter-overflow` | adds `i64::MAX` to a counter, then 1 | `counter` |
//! | `lock-owner` | renews a lock with an owner token of `bytes` bytes | `bytes` |
//! | `child` | enqueues task `task` with an idempotency key of `key_bytes` bytes and a countdown of `countdown_ms` | `task`, `key_bytes`, `countdown_ms` |
//! | `deep-result` | returns `[[[...]]]` nested `depth` deep | `depth` |
//! | `step-token` | returns the idempotency token of step `step` | `step` |
//! | `http-swallow` | GETs the URL, ignores any error, succeeds | `url` |
//!
//! An unknown mode or a missing field fails with kind `bad-payload`. Errors
//! of host calls, files and HTTP go through `?` into the SDK's mapping
//! (`denied`, `network`, ...), which is what the tests check.
//!
//! `not-json` needs to return a raw string, which `#[wasmq_guest::task]`
//! never does (it always serializes), so this crate implements the export
//! by hand through the SDK's hidden `__private` API and delegates every other
//! mode to the SDK's normal dispatch.

// Natively (cargo check of the workspace) nothing uses the export.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use std::hint::black_box;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use wasmq_guest::__private::{dispatch, Guest, JobContext, WitTaskError};
use wasmq_guest::{http, kv, Job, TaskError};

mod files;

struct Hostile;

impl Guest for Hostile {
    fn run(job: JobContext, payload: String) -> Result<String, WitTaskError> {
        match mode_of(&payload).as_deref() {
            Some("not-json") => return Ok("this is {not JSON".to_string()),
            // Raw, so the guest never recurses through the nesting.
            Some("deep-result") => {
                let depth = serde_json::from_str::<Value>(&payload)
                    .ok()
                    .and_then(|v| v["depth"].as_u64())
                    .unwrap_or(1) as usize;
                return Ok("[".repeat(depth) + &"]".repeat(depth));
            }
            _ => {}
        }
        dispatch(job, payload, misbehave)
    }
}

#[cfg(target_arch = "wasm32")]
wasmq_guest::bindings::__export_task_world!(Hostile);

fn mode_of(payload: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Head {
        mode: String,
    }
    serde_json::from_str::<Head>(payload).ok().map(|h| h.mode)
}

/// Reads field `name` of the payload, or fails as a bad payload.
fn field<T: serde::de::DeserializeOwned>(args: &Value, name: &str) -> Result<T, TaskError> {
    serde_json::from_value(args.get(name).cloned().unwrap_or(Value::Null))
        .map_err(|e| TaskError::kind(TaskError::BAD_PAYLOAD, format!("field {name:?}: {e}")))
}

fn misbehave(job: &Job, args: Value) -> Result<Value, TaskError> {
    let mode: String = field(&args, "mode")?;
    match mode.as_str() {
        "spin" => spin(),
        "memory-bomb" => memory_bomb(),
        "recurse" => Ok(json!(recurse(0))),
        "panic" => panic!("hostile guest panics on purpose"),
        // 8 MiB of payload plus the two quotes.
        "huge-result" => Ok(Value::String("x".repeat(8 << 20))),
        "read-file" => {
            let path: String = field(&args, "path")?;
            Ok(Value::String(wasmq_guest::fs::read_to_string(path)?))
        }
        "read-file-raw" => {
            let path: String = field(&args, "path")?;
            Ok(Value::String(std::fs::read_to_string(path)?))
        }
        "write-file" => files::write_file(&field::<String>(&args, "path")?, field(&args, "bytes")?),
        "write-loop" => {
            let path: String = field(&args, "path")?;
            let via: String = field(&args, "via")?;
            let chunk: Option<usize> = field(&args, "chunk")?;
            let limit: Option<u64> = field(&args, "limit")?;
            files::write_loop(
                &path,
                &via,
                chunk.unwrap_or(64 << 10),
                limit.unwrap_or(1 << 30),
            )
        }
        "symlink" => {
            let target: String = field(&args, "target")?;
            let link: String = field(&args, "link")?;
            let replace: Option<bool> = field(&args, "replace")?;
            files::symlink(&target, &link, replace.unwrap_or(false))
        }
        "http" => {
            let url: String = field(&args, "url")?;
            let resp = http::get(&url)?;
            Ok(json!({ "status": resp.status, "bytes": resp.body.len() }))
        }
        "log" => {
            // A few lines on each channel, then success: what `status`
            // and the dashboard show as the job's log.
            let text: String = field(&args, "text")?;
            println!("stdout: {text}");
            eprintln!("stderr: {text}");
            wasmq_guest::log::info(format!("log: {text}"));
            Ok(json!({ "logged": text }))
        }
        "print" => {
            let mut i: u64 = 0;
            loop {
                println!("hostile guest line {i}");
                i = i.wrapping_add(1);
            }
        }
        "enqueue-flood" => {
            let task: Option<String> = field(&args, "task")?;
            let task = task.unwrap_or_else(|| job.task.clone());
            let mut n: u64 = 0;
            loop {
                wasmq_guest::enqueue(&task, &json!({ "mode": "echo", "n": n }))?;
                n += 1;
            }
        }
        "kv-get" => {
            let key: String = field(&args, "key")?;
            let value = kv::get(&key)?.map(|v| String::from_utf8_lossy(&v).into_owned());
            Ok(json!({ "key": key, "value": value }))
        }
        "kv-set" => {
            let key: String = field(&args, "key")?;
            let value: String = field(&args, "value")?;
            let or_fail = field::<Option<bool>>(&args, "or_fail")?.unwrap_or(false);
            match kv::set(&key, value.as_bytes(), None) {
                Err(e) if or_fail => return Err(TaskError::fail(format!("could not store: {e}"))),
                other => other?,
            }
            Ok(json!({ "key": key, "value": value }))
        }
        "locked-incr" => {
            // Read-modify-write of a shared value under the distributed
            // lock (the seed's memcached lock, done right): returns the value
            // written and the fencing token it was written under.
            let key: String = field(&args, "key")?;
            let Some(lock) = wasmq_guest::Lock::acquire_wait(
                &key,
                Duration::from_secs(10),
                Duration::from_secs(30),
            )?
            else {
                return Err(TaskError::retry("lock is busy"));
            };
            let value = kv::get_json::<i64>(&key)?.unwrap_or(0) + 1;
            kv::set_json(&key, &value, None)?;
            let token = lock.fencing_token();
            if !lock.release()? {
                return Err(TaskError::fail("lost the lock before releasing it"));
            }
            Ok(json!({ "value": value, "token": token }))
        }
        "counted-sleep" => {
            // A side effect that must happen once per job, however often the
            // job is delivered: bump a counter inside a step marker, then
            // take a while (so a killed worker dies mid-job).
            let name: String = field(&args, "counter")?;
            let ms: u64 = field(&args, "ms")?;
            let value = wasmq_guest::counter::incr_once(&name, 1, &format!("count:{name}"))?;
            std::thread::sleep(Duration::from_millis(ms));
            Ok(json!({ "counter": value }))
        }
        "sleep" => {
            let ms: u64 = field(&args, "ms")?;
            std::thread::sleep(Duration::from_millis(ms));
            Ok(json!({ "slept_ms": ms }))
        }
        "busy-ms" => {
            let ms: u64 = field(&args, "ms")?;
            let until = Instant::now() + Duration::from_millis(ms);
            let mut iterations: u64 = 0;
            while Instant::now() < until {
                iterations = black_box(iterations + 1);
            }
            Ok(json!({ "busy_ms": ms, "iterations": iterations }))
        }
        "echo" => Ok(args),
        "fail" => {
            let message: String = field(&args, "message")?;
            match field::<Option<String>>(&args, "kind")? {
                Some(kind) => Err(TaskError::kind(kind, message)),
                None => Err(TaskError::fail(message)),
            }
        }
        "retry" => match field::<Option<u64>>(&args, "ms")? {
            Some(ms) => Err(TaskError::retry_after(
                "asked to",
                Duration::from_millis(ms),
            )),
            None => Err(TaskError::retry("asked to")),
        },
        "step-post" => {
            let step: String = field(&args, "step")?;
            let url: String = field(&args, "url")?;
            let sleep_ms: u64 = field(&args, "sleep_ms")?;
            let status = wasmq_guest::once(&step, || {
                std::thread::sleep(Duration::from_millis(sleep_ms));
                let resp = http::post_json(&url, &json!({ "job": job.id }))?;
                Ok(resp.status)
            })?;
            Ok(json!({ "status": status }))
        }
        "tick" => {
            let url: String = field(&args, "url")?;
            let n: u64 = field(&args, "n")?;
            let ms: u64 = field(&args, "ms")?;
            for i in 0..n {
                http::post_json(&url, &json!({ "job": job.id, "i": i }))?;
                std::thread::sleep(Duration::from_millis(ms));
            }
            Ok(json!({ "ticks": n }))
        }
        "kv-flood" => {
            let bytes: usize = field(&args, "bytes")?;
            let ttl = field::<Option<u64>>(&args, "ttl_ms")?.map(Duration::from_millis);
            let value = vec![b'x'; bytes];
            let mut stored: u64 = 0;
            loop {
                kv::set(&format!("flood-{}-{stored}", job.id), &value, ttl)?;
                stored += 1;
            }
        }
        "counter-overflow" => {
            let name: String = field(&args, "counter")?;
            wasmq_guest::counter::incr(&name, i64::MAX)?;
            let value = wasmq_guest::counter::incr(&name, 1)?;
            Ok(json!({ "counter": value }))
        }
        "lock-owner" => {
            use wasmq_guest::bindings::wasmq::task0_1_0::lock as wit;
            let bytes: usize = field(&args, "bytes")?;
            let lease = wit::Lease {
                name: "owner-test".into(),
                owner: "o".repeat(bytes),
                fencing_token: 1,
            };
            let renewed = wit::renew(&lease, 1_000).map_err(wasmq_guest::HostError::from)?;
            Ok(json!({ "renewed": renewed }))
        }
        "child" => {
            let task: String = field(&args, "task")?;
            let key_bytes: usize = field::<Option<usize>>(&args, "key_bytes")?.unwrap_or(0);
            let countdown = field::<Option<u64>>(&args, "countdown_ms")?.map(Duration::from_millis);
            let options = wasmq_guest::EnqueueOptions {
                countdown,
                idempotency_key: (key_bytes > 0).then(|| "k".repeat(key_bytes)),
            };
            let id = wasmq_guest::enqueue_with(&task, &json!({ "mode": "echo" }), options)?;
            Ok(json!({ "child": id }))
        }
        "http-swallow" => {
            let url: String = field(&args, "url")?;
            let outcome = match http::get(&url) {
                Ok(resp) => format!("status {}", resp.status),
                Err(e) => format!("swallowed: {e}"),
            };
            Ok(json!({ "outcome": outcome }))
        }
        "step-token" => {
            let step: String = field(&args, "step")?;
            Ok(json!({ "token": wasmq_guest::step_token(&step) }))
        }
        other => Err(TaskError::kind(
            TaskError::BAD_PAYLOAD,
            format!("unknown mode {other:?}"),
        )),
    }
}

/// Loops forever; `black_box` keeps the optimizer from deleting the loop
/// (an empty infinite loop is otherwise allowed to vanish or become `unreachable`).
fn spin() -> ! {
    let mut i: u64 = 0;
    loop {
        i = black_box(i.wrapping_add(1));
    }
}

/// Allocates 1 MiB blocks forever, writing to every page so they are real.
fn memory_bomb() -> ! {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = vec![0u8; 1 << 20];
        for i in (0..block.len()).step_by(4096) {
            block[i] = 1;
        }
        blocks.push(black_box(block));
    }
}

/// Recurses until the stack runs out. The frame's buffer escapes through
/// `black_box` and the result is used after the call, so the compiler can
/// turn this into neither a loop nor a tail call.
fn recurse(depth: u64) -> u64 {
    let frame = black_box([depth; 16]);
    if black_box(depth) == u64::MAX {
        return 0;
    }
    black_box(recurse(depth + 1)).wrapping_add(frame[depth as usize % 16])
}
