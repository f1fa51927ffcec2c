//! Test guest with strict arguments, for the bad-payload tests.
//!
//! `{"n": 21}` → `{"double": 42}`. Any other shape (a missing `n`, a
//! string, an unknown field) fails with the reserved kind `bad-payload`
//! before the function runs.

use wasmq_guest::{Job, TaskError};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    n: u32,
}

#[derive(serde::Serialize)]
struct Out {
    double: u64,
}

#[wasmq_guest::task]
fn run(_job: &Job, args: Args) -> Result<Out, TaskError> {
    Ok(Out {
        double: u64::from(args.n) * 2,
    })
}
