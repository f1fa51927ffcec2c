//! Task components: identify them by content, reject what is not a task
//! component with a message naming the problem, and keep what compiling
//! them produced on disk.
//!
//! Compiled code is cached on disk under a key made of the component's
//! sha256, the engine's compatibility hash (wasmtime version and every
//! setting that affects code) and the [`ComponentLimits`] the engine's pool
//! checks components against, so a restarted worker deserialises instead of
//! recompiling, a worker with other settings never loads stale code, and an
//! artifact is only ever loaded by an engine whose limits accepted it. Only
//! an artifact the engine accepted is written.
//! When and where a compile runs (once per process, on a thread of its
//! own, within a budget) is `sandbox::compiler`'s business.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

use crate::engine::ComponentLimits;
use crate::failure::{Category, Failure};

/// The first 8 bytes of a component binary (magic, then layer 1, version 0xd).
const COMPONENT_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
/// The first 8 bytes of a core wasm module (magic, then version 1).
const CORE_MODULE_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];

/// Lowercase hex sha256 of `bytes`: a component's version and storage key.
pub fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure::new(Category::InvalidComponent, message)
}

/// Reject files that cannot be a component before handing them to the
/// compiler, so the error says what the file is rather than a parser error.
pub fn check_header(bytes: &[u8]) -> Result<(), Failure> {
    if bytes.len() < 8 || bytes[..4] != COMPONENT_HEADER[..4] {
        return Err(invalid(
            "not a WebAssembly file (no \\0asm magic); build the task with \
             `cargo build --target wasm32-wasip2`",
        ));
    }
    if bytes[..8] == CORE_MODULE_HEADER {
        return Err(invalid(
            "this is a core WebAssembly module, not a component; build for \
             `wasm32-wasip2` (or wrap it with `wasm-tools component new`)",
        ));
    }
    if bytes[..8] != COMPONENT_HEADER {
        return Err(invalid(format!(
            "unsupported WebAssembly binary version/layer {:02x?}; expected a component \
             (version 0x0d, layer 1)",
            &bytes[4..8]
        )));
    }
    Ok(())
}

/// Why wasmtime's pool refused a component, as it words it, and the flag
/// that raises that limit. Matched on wasmtime's messages (a test in
/// `tests/compile.rs` pins them, so an upgrade that rewords one fails it).
const LIMIT_REFUSALS: [(&str, &str); 4] = [
    (
        "core module instances, which exceeds",
        "--max-core-instances",
    ),
    ("linear memories, which exceeds", "--max-memories"),
    ("tables, which exceeds", "--max-tables"),
    ("minimum element size of", "--max-table-elements"),
];

/// The refusal of a component that does not compile or load: an
/// `invalid-component` failure, which for a component over the engine's
/// [`ComponentLimits`] names the limit and the flag that raises it.
fn refused(error: &wasmtime::Error, limits: &ComponentLimits) -> Failure {
    let text = format!("{error:#}");
    match LIMIT_REFUSALS.iter().find(|(said, _)| text.contains(said)) {
        Some((_, flag)) => invalid(format!(
            "component is over the engine's limits: {text}; this engine allows {limits}. \
             Run workers with a higher {flag} (`wasmq worker {flag} N`) and deploy \
             with the same flag, or make the component smaller"
        )),
        None => invalid(format!("component does not compile: {text}")),
    }
}

/// The on-disk cache of compiled components.
#[derive(Debug, Clone)]
pub struct CompiledCache {
    /// Where compiled artifacts live; `None` disables the disk cache.
    dir: Option<PathBuf>,
    /// The limits of the engine whose artifacts these are: part of the key.
    limits: ComponentLimits,
}

impl CompiledCache {
    /// A cache in `dir`, or no disk cache with `None`, for an engine with
    /// the default [`ComponentLimits`].
    pub fn new(dir: Option<PathBuf>) -> Self {
        CompiledCache {
            dir,
            limits: ComponentLimits::default(),
        }
    }

    /// The same cache, for an engine built with `limits` (as
    /// `engine::build_engine` was given them).
    pub fn with_limits(self, limits: ComponentLimits) -> Self {
        CompiledCache { limits, ..self }
    }

    /// The default location: `$WASMQ_CACHE_DIR`, else `$XDG_CACHE_HOME/wasmq`,
    /// else `~/.cache/wasmq`.
    pub fn default_dir() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("WASMQ_CACHE_DIR") {
            return Some(PathBuf::from(dir));
        }
        if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
            return Some(PathBuf::from(dir).join("wasmq"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("wasmq"))
    }

    /// The compiled artifact a previous run left on disk for the component
    /// whose sha256 is `hash`, if there is a usable one.
    pub fn load(&self, engine: &Engine, hash: &str) -> Option<Component> {
        let path = self.artifact_path(engine, hash)?;
        if !path.exists() {
            return None;
        }
        // Mapped from the file, not read into memory: wasmtime then maps
        // each memory's initial image straight from the page cache, shared
        // by every worker process of the machine, instead of copying it
        // into a sealed memfd per process (tens of MB for a Python
        // component, and sealing a freshly written memfd can fail with
        // EBUSY on a loaded machine). Artifacts are only ever replaced by
        // rename (`write_atomically`), never rewritten in place, so the
        // mapping stays valid.
        // SAFETY: the artifact was written by `precompile_component` of an
        // engine with the same compatibility hash (it is in the file name)
        // into our own cache directory; wasmtime also checks the header and
        // rejects an incompatible file, which we then recompile.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e,
                    "compiled cache entry unusable; recompiling");
                None
            }
        }
    }

    /// Compile `bytes` (whose sha256 is `hash`, header already checked) and
    /// store the artifact on disk, unless `abandoned` is set by the time
    /// the compile ends: a compile its caller gave up on (past its budget)
    /// leaves nothing behind that a restarted worker would load.
    pub fn compile(
        &self,
        engine: &Engine,
        bytes: &[u8],
        hash: &str,
        abandoned: &AtomicBool,
    ) -> Result<Component, Failure> {
        let Some(path) = self.artifact_path(engine, hash) else {
            return Component::new(engine, bytes).map_err(|e| refused(&e, &self.limits));
        };
        let artifact = engine
            .precompile_component(bytes)
            .map_err(|e| refused(&e, &self.limits))?;
        if abandoned.load(Ordering::Relaxed) {
            return Err(invalid("compile abandoned past its budget"));
        }
        // Loading is where the pool checks the component against its
        // limits: only what loads is worth keeping.
        // SAFETY: `artifact` was just produced by this engine.
        let component = unsafe { Component::deserialize(engine, &artifact) }
            .map_err(|e| refused(&e, &self.limits))?;
        if let Err(e) = write_atomically(&path, &artifact) {
            tracing::warn!(path = %path.display(), error = %e, "could not write compiled cache");
            return Ok(component);
        }
        // Use the file just written, as `load` would (see there why).
        Ok(self.load(engine, hash).unwrap_or(component))
    }

    fn artifact_path(&self, engine: &Engine, hash: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        self.limits.hash(&mut hasher);
        Some(
            dir.join("compiled")
                .join(format!("{hash}-{:016x}.cwasm", hasher.finish())),
        )
    }
}

/// Make `component`'s initial memory images now, when it is prepared,
/// rather than in the first job's instantiation: the first job does not pay
/// for it, and the one failure seen here is dealt with where it cannot
/// fail a job. Without a file to map (no disk cache) an image is a sealed
/// memfd, and sealing one just written can fail with EBUSY while the
/// kernel still holds its pages (seen on a loaded machine with a 12 MB
/// Python heap): a few tries, then the lazy path at instantiation is left
/// to try again.
pub fn initialize_memory_images(component: &Component) {
    const TRIES: u32 = 4;
    for attempt in 1..=TRIES {
        match component.initialize_copy_on_write_image() {
            Ok(()) => return,
            Err(e) if attempt == TRIES => {
                tracing::warn!(error = %format!("{e:#}"),
                    "could not make the component's memory images; the first instance will try again");
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20 << attempt)),
        }
    }
}

/// Write to a temporary file and rename, so a concurrent reader never sees a
/// half-written artifact.
fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("artifact path has a parent");
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4()
    ));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_told_apart() {
        assert!(check_header(b"hello world")
            .unwrap_err()
            .message
            .contains("not a WebAssembly file"));
        assert!(check_header(&CORE_MODULE_HEADER)
            .unwrap_err()
            .message
            .contains("core WebAssembly module"));
        assert!(check_header(&COMPONENT_HEADER).is_ok());
    }
}
