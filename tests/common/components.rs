//! Components the tests run beside the Rust guests of `make guests`: the
//! Python twins of the example tasks (`make py-guests`), looked up so a
//! test runs each task in both languages; and components made in the test
//! instead of committed: a real task with a version of its own, and valid
//! components that take long to compile.

use std::path::PathBuf;

/// The language an example task is written in: the Rust task in
/// tasks/NAME (built by `make guests`) or its Python twin in tasks/NAME-py
/// (built by `make py-guests`). Tests shared by both run one body per
/// language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Rust,
    Python,
}

/// Path of a guest component built by `make guests` (the Rust tasks and
/// test guests); a missing one fails the test, naming the target.
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

/// Path of a Python component built by `make py-guests`
/// (target/guests/py/NAME.wasm), or None, printing why the test is
/// skipped, when it is not built (componentize-py needs a venv and PyPI:
/// `make test` builds them where PyPI answers, and says so where not).
pub fn python_guest(name: &str) -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/guests/py")
        .join(format!("{name}.wasm"));
    if path.exists() {
        return Some(path);
    }
    println!(
        "skipped: {} is not built; build it with `make py-guests` \
         (a .venv with componentize-py 0.25.1)",
        path.display()
    );
    None
}

/// Path of example task `task` ("onboard", "scrape") in `lang`: the Rust
/// one must be built (as `common::guest`); the Python twin ("onboard-py")
/// may not be, then None (the skip printed).
pub fn example_task(task: &str, lang: Lang) -> Option<PathBuf> {
    match lang {
        Lang::Rust => Some(guest(task)),
        Lang::Python => python_guest(&format!("{task}-py")),
    }
}

/// Bytes of [`example_task`]. A Python component is also compiled into
/// the disk cache the tests' workers share (`common::shared_cache_dir`) if
/// it is not there yet: compiling one takes about 20 s of CPU (40+ s of
/// wall time on a loaded 2-core machine), loading it well under one, so
/// the workers a test then starts (worker processes, or in-process ones
/// given the shared cache) load it at once instead of each compiling it
/// within the test's deadlines, or never finishing when a kill loop ends
/// them first.
pub fn example_task_bytes(task: &str, lang: Lang) -> Option<Vec<u8>> {
    let bytes = std::fs::read(example_task(task, lang)?).unwrap();
    if lang == Lang::Python {
        let started = std::time::Instant::now();
        python_sandbox()
            .prepare(&bytes)
            .expect("the Python task compiles");
        println!(
            "{task}-py ready in the shared compiled cache in {:?}",
            started.elapsed()
        );
    }
    Some(bytes)
}

/// A sandbox with the default engine and the compiled cache the tests'
/// `wasmq` processes share (`common::shared_cache_dir`; spelled out here
/// because benches include this file alone): a Python component (the
/// interpreter included, about 19 MB) is compiled once and then loaded.
pub fn python_sandbox() -> wasmq::sandbox::Sandbox {
    use wasmq::component::CompiledCache;
    use wasmq::engine::{build_engine, EngineLimits};
    let cache = std::env::temp_dir().join("wasmq-test-cache");
    wasmq::sandbox::Sandbox::new(
        build_engine(&EngineLimits::default()).unwrap(),
        CompiledCache::new(Some(cache)),
    )
    .unwrap()
}

/// `bytes` (a component) with a custom section naming `tag` appended: the
/// same task, a new content hash, so no cache of another test has it.
pub fn unique_version(bytes: &[u8], tag: &str) -> Vec<u8> {
    let name = b"wasmq-test-version";
    let mut payload = leb128(name.len() as u64);
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    payload.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    let mut out = bytes.to_vec();
    out.push(0); // custom section
    out.extend(leb128(payload.len() as u64));
    out.extend(payload);
    out
}

/// A valid component (not a task: it exports nothing) of one core module
/// with `functions` functions, each one long chain of arithmetic over 512
/// locals, which Cranelift's register allocator takes superlinear time
/// over: about 240 KiB and 1.8 s of one core per function (2-core VM,
/// `cargo bench --bench compile` measures it), where task code of that
/// size compiles in about 0.3 s. Small and slow: the hostile case a size
/// cap alone does not stop.
pub fn slow_to_compile(functions: usize, tag: &str) -> Vec<u8> {
    const LOCALS: usize = 512;
    const STEPS: usize = 20_000;
    let mut wat = String::from("(component (core module\n");
    for f in 0..functions {
        wat.push_str(&format!("(func $f{f} (param i64) (result i64)"));
        wat.push_str(&format!(" (local{})\n", " i64".repeat(LOCALS)));
        for step in 0..STEPS {
            // Indices that wander, so many values stay live at once.
            let (a, b, c) = (
                1 + (step * 7 + f) % LOCALS,
                1 + (step * 13 + 3) % LOCALS,
                1 + (step * 29 + 5) % LOCALS,
            );
            wat.push_str(&format!(
                "local.get {a} local.get {b} i64.mul local.get 0 i64.xor local.set {c}\n"
            ));
        }
        // Everything computed flows into the result, so none of it is
        // dead code for Cranelift to drop.
        wat.push_str("local.get 1\n");
        for l in 2..=LOCALS {
            wat.push_str(&format!("local.get {l} i64.add\n"));
        }
        wat.push_str(")\n");
    }
    wat.push_str("))");
    unique_version(&wat::parse_str(&wat).expect("generated wat parses"), tag)
}

fn leb128(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}
