//! A task built against `wasmq:task@0.1.0`: echoes its job context and
//! payload, and counts its runs through a host counter (a 0.1.0 import).

// The generated export shim takes the flattened job context as arguments.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({
    world: "task",
    path: "../../../wit/deps/task-0.1.0",
});

use wasmq::task::counter;

struct Task;

impl Guest for Task {
    fn run(job: JobContext, payload: String) -> Result<String, TaskError> {
        let runs = counter::incr("v010-runs", 1)
            .map_err(|e| TaskError::Fail(format!("counter: {e:?}")))?;
        Ok(format!(
            r#"{{"world":"0.1.0","task":"{}","attempt":{},"runs":{runs},"payload":{payload}}}"#,
            job.task, job.attempt
        ))
    }
}

export!(Task);
