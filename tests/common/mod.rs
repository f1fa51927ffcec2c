//! Fixtures shared by the integration tests: compiled guest components (and
//! generated ones), a real local HTTP server, and (for broker tests) a
//! private redis-server.
//!
//! Every integration test file does `mod common;`; not every file uses every
//! helper.
#![allow(dead_code)]

pub mod browser;
pub mod components;
pub mod http;
pub mod jobs;
pub mod postgres;
pub mod redis;
pub mod sandbox;
mod temp_dir;
pub mod web;
pub mod workers;

pub use temp_dir::TempDir;

use std::path::PathBuf;

pub use components::guest;

/// Bytes of a guest component.
pub fn guest_bytes(name: &str) -> Vec<u8> {
    std::fs::read(guest(name)).unwrap()
}

/// The `wasmq` binary under test.
pub fn wasmq_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wasmq"))
}

/// The compiled-code cache the `wasmq` processes of tests share.
pub fn shared_cache_dir() -> PathBuf {
    std::env::temp_dir().join("wasmq-test-cache")
}

/// `wasmq --redis REDIS --tenant TENANT ARGS...`, compiling into the
/// shared test cache.
pub fn wasmq(redis: &str, tenant: &str, args: &[&str]) -> std::process::Output {
    wasmq_cached(redis, tenant, args, &shared_cache_dir())
}

/// [`wasmq`] with its compiled-code cache in `cache`.
pub fn wasmq_cached(
    redis: &str,
    tenant: &str,
    args: &[&str],
    cache: &std::path::Path,
) -> std::process::Output {
    std::process::Command::new(wasmq_bin())
        .args(["--redis", redis, "--tenant", tenant])
        .args(args)
        .env("WASMQ_CACHE_DIR", cache)
        .output()
        .unwrap()
}

/// [`wasmq`] with extra environment variables and `stdin` piped in.
pub fn wasmq_with(
    redis: &str,
    tenant: &str,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: &str,
) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = std::process::Command::new(wasmq_bin())
        .args(["--redis", redis, "--tenant", tenant])
        .args(args)
        .env("WASMQ_CACHE_DIR", shared_cache_dir())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A command's stdout or stderr, trimmed.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

/// `wasmq tenant create NAME FLAGS...`, which must succeed.
pub fn create_tenant(redis: &str, name: &str, flags: &[&str]) {
    let args = [&["tenant", "create", name][..], flags].concat();
    let created = wasmq(redis, "default", &args);
    assert!(
        created.status.success(),
        "tenant create {name}: {}",
        String::from_utf8_lossy(&created.stderr)
    );
}

/// Bytes under `dir` as a tenant's disk quota counts them: every file,
/// directory and link one entry (`DISK_ENTRY_BYTES`), a file its length on
/// top.
pub fn disk_use(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        total += wasmq::sandbox::DISK_ENTRY_BYTES;
        let meta = entry.path().symlink_metadata().unwrap();
        if meta.is_dir() {
            total += disk_use(&entry.path());
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    total
}
