//! A scratch directory removed on drop: the fixtures' working directories
//! (redis-server's, PostgreSQL's) and tests' own files.
//!
//! Plain `std` plus `uuid`, so `make demo` can share the server fixtures
//! (`host/examples/demo/fixture.rs`).

use std::path::PathBuf;

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
