//! The Python SDK and the Python world's WIT, embedded in the `wasmq`
//! binary so `wasmq build` needs nothing but componentize-py: every file
//! under `guest-sdk/python/wasmq/` (the package tasks import) and
//! `guest-sdk/python/wit/` (the world they are built against; its
//! `deps/task-*` are links to the repository's `wit/`, so they are the
//! very files the host binds). A test below fails when a file there is
//! not listed here or differs, so the binary and the sources cannot drift.

use std::path::Path;

use anyhow::Context;

/// One embedded file: its path under `guest-sdk/python/` and its text.
pub struct Embedded {
    /// Path relative to `guest-sdk/python/` (`wasmq/kv.py`, `wit/python.wit`).
    pub path: &'static str,
    /// The file's contents.
    pub text: &'static str,
}

macro_rules! embed {
    ($path:literal) => {
        Embedded {
            path: $path,
            text: include_str!(concat!("../../../guest-sdk/python/", $path)),
        }
    };
}

/// Every file of the SDK package and the Python world.
pub const FILES: &[Embedded] = &[
    embed!("wasmq/__init__.py"),
    embed!("wasmq/config.py"),
    embed!("wasmq/counters.py"),
    embed!("wasmq/errors.py"),
    embed!("wasmq/flows.py"),
    embed!("wasmq/http.py"),
    embed!("wasmq/job.py"),
    embed!("wasmq/jobs.py"),
    embed!("wasmq/kv.py"),
    embed!("wasmq/lock.py"),
    embed!("wasmq/log.py"),
    embed!("wasmq/postgres.py"),
    embed!("wasmq/steps.py"),
    embed!("wasmq/task.py"),
    embed!("wit/deps/task-0.1.0/task.wit"),
    embed!("wit/deps/task-0.2.0/task.wit"),
    embed!("wit/deps/wasi-cli/cli.wit"),
    embed!("wit/deps/wasi-clocks/clocks.wit"),
    embed!("wit/deps/wasi-filesystem/filesystem.wit"),
    embed!("wit/deps/wasi-http/http.wit"),
    embed!("wit/deps/wasi-io/io.wit"),
    embed!("wit/deps/wasi-random/random.wit"),
    embed!("wit/deps/wasi-sockets/sockets.wit"),
    embed!("wit/python.wit"),
];

/// The world Python tasks are built against (in `wit/python.wit`).
pub const WORLD: &str = "task";

/// Writes the files whose path starts with `prefix` (`"wasmq/"` or
/// `"wit/"`) under `dir`, keeping their relative paths.
pub fn write_under(dir: &Path, prefix: &str) -> anyhow::Result<()> {
    for file in FILES.iter().filter(|f| f.path.starts_with(prefix)) {
        let path = dir.join(file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, file.text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    /// `.py` and `.wit` files under `dir` (links followed), by path relative to `root`.
    fn sources(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(root, &path, out);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("py" | "wit")
            ) {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.insert(rel, std::fs::read_to_string(&path).unwrap());
            }
        }
    }

    #[test]
    fn every_sdk_and_wit_file_is_embedded_as_it_is() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk/python");
        let mut on_disk = BTreeMap::new();
        sources(&root, &root.join("wasmq"), &mut on_disk);
        sources(&root, &root.join("wit"), &mut on_disk);
        let embedded: BTreeMap<String, String> = FILES
            .iter()
            .map(|f| (f.path.to_string(), f.text.to_string()))
            .collect();
        let missing: Vec<_> = on_disk
            .keys()
            .filter(|p| !embedded.contains_key(*p))
            .collect();
        assert!(
            missing.is_empty(),
            "not embedded in host/src/cli/py_sdk_files.rs: {missing:?}"
        );
        let gone: Vec<_> = embedded
            .keys()
            .filter(|p| !on_disk.contains_key(*p))
            .collect();
        assert!(gone.is_empty(), "embedded but no longer on disk: {gone:?}");
        for (path, text) in &on_disk {
            assert_eq!(
                &embedded[path], text,
                "{path} differs from what is embedded"
            );
        }
    }

    #[test]
    fn the_task_wit_is_the_repositorys() {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let get = |p: &str| FILES.iter().find(|f| f.path == p).unwrap().text;
        assert_eq!(
            get("wit/deps/task-0.2.0/task.wit"),
            std::fs::read_to_string(repo.join("wit/task.wit")).unwrap()
        );
        assert_eq!(
            get("wit/deps/task-0.1.0/task.wit"),
            std::fs::read_to_string(repo.join("wit/deps/task-0.1.0/task.wit")).unwrap()
        );
    }
}
