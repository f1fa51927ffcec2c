//! An in-process sandbox for tests, a job for it, and the two ways a run
//! can end, unwrapped with the guest's log in the panic message.

use std::sync::Arc;

use serde_json::Value;
use wasmq::backend::memory::MemoryBackend;
use wasmq::component::CompiledCache;
use wasmq::engine::{build_engine, EngineLimits};
use wasmq::failure::Category;
use wasmq::policy::SandboxPolicy;
use wasmq::sandbox::{JobInput, JobOutcome, PreparedTask, Sandbox, Verdict};

/// A sandbox with a few instance slots and no disk cache.
pub fn sandbox() -> Sandbox {
    sandbox_with_slots(8)
}

/// A sandbox sized for `jobs` instances at once, with no disk cache.
pub fn sandbox_with_slots(jobs: u32) -> Sandbox {
    let limits = EngineLimits {
        instance_slots: jobs,
        ..EngineLimits::default()
    };
    Sandbox::new(build_engine(&limits).unwrap(), CompiledCache::new(None)).unwrap()
}

/// A sandbox for `lang`'s components: Rust ones as [`sandbox`]; Python
/// ones (the interpreter included, about 19 MB) with the disk cache the
/// tests' `wasmq` processes share, so each is compiled once (about 20 s of
/// CPU) and then loaded from disk (well under a second).
pub fn sandbox_for(lang: super::components::Lang) -> Sandbox {
    match lang {
        super::components::Lang::Rust => sandbox(),
        super::components::Lang::Python => super::components::python_sandbox(),
    }
}

/// A first-attempt job of tenant `t1` with a fresh id.
pub fn job(payload: &str) -> JobInput {
    JobInput::new(&uuid::Uuid::new_v4().to_string(), "test", "t1", payload)
}

/// Run `payload` in `task` with a fresh in-memory backend.
pub async fn run(
    sb: &Sandbox,
    task: &PreparedTask,
    payload: &str,
    policy: &SandboxPolicy,
) -> JobOutcome {
    sb.run(task, &job(payload), policy, Arc::new(MemoryBackend::new()))
        .await
}

/// The result of a run that must have succeeded.
pub fn success(outcome: &JobOutcome) -> Value {
    match &outcome.verdict {
        Verdict::Succeeded { result } => serde_json::from_str(result).unwrap(),
        other => panic!("expected success, got {other:?}\nlog:\n{}", outcome.log),
    }
}

/// The category and message of a run that must have failed.
pub fn failure(outcome: &JobOutcome) -> (Category, String) {
    match &outcome.verdict {
        Verdict::Failed { failure, .. } => (failure.category, failure.message.clone()),
        other => panic!("expected a failure, got {other:?}\nlog:\n{}", outcome.log),
    }
}
