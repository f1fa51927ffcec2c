//! Fixtures shared by the integration tests: compiled guest components, a
//! real local HTTP server, and (for broker tests) a private redis-server.
//!
//! Every integration test file does `mod common;`; not every file uses every
//! helper.
#![allow(dead_code)]

pub mod cli;
pub mod http;
pub mod redis;
pub mod sandbox;
pub mod workers;

use std::path::PathBuf;

/// Path of a guest component built by `make guests`.
pub fn guest(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/guests/wasm32-wasip2/release")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the guests first with `make guests` (or run `make test`)",
        path.display()
    );
    path
}

/// Bytes of a guest component.
pub fn guest_bytes(name: &str) -> Vec<u8> {
    std::fs::read(guest(name)).unwrap()
}

/// The `wasmq` binary under test.
pub fn wasmq_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wasmq"))
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "wasmq-test-{tag}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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
