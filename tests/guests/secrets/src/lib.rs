//! Test guest for secrets: reads each name of `{"names": [...]}` with
//! `config::get` and returns, per name, the value reversed (so the host's
//! redaction of values does not touch it), `null` when unset, or the
//! error. With `"leak": true` it also prints, logs and returns each value
//! as is, which the host must blot out. Other ways a value can leave a run,
//! each of which the host must catch, per value read:
//! - `"as_names": true`: passes it as a secret name and as a database
//!   name (both refused, so the value lands among the job's denials);
//! - `"child": true`: enqueues a child job (of this task, `names` empty)
//!   with the value in its payload, and starts a flow with it; the
//!   results (`child`, `flow`: an id or the error) are returned;
//! - `"fail": true`: after everything else, fails with the value as the
//!   error's kind and, JSON-escaped inside a JSON document, in its message.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use wasmq_guest::{config, log, postgres, Job, TaskError};

#[derive(serde::Deserialize)]
struct Args {
    names: Vec<String>,
    #[serde(default)]
    leak: bool,
    #[serde(default)]
    as_names: bool,
    #[serde(default)]
    child: bool,
    #[serde(default)]
    fail: bool,
}

fn outcome<T: std::fmt::Display>(r: Result<T, wasmq_guest::HostError>) -> Value {
    match r {
        Ok(v) => json!({ "ok": v.to_string() }),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

#[wasmq_guest::task]
fn run(_job: &Job, args: Args) -> Result<BTreeMap<String, Value>, TaskError> {
    let mut out = BTreeMap::new();
    let mut last = None;
    for name in args.names {
        let entry = match config::get(&name) {
            Ok(Some(value)) => {
                if args.leak {
                    println!("stdout has {value}");
                    log::info(format!("log has {value}"));
                    out.insert(format!("{name}.plain"), json!(value));
                }
                if args.as_names {
                    let _ = config::get(&value);
                    let _ = postgres::Connection::open(&value);
                }
                if args.child {
                    let payload = json!({ "names": [], "token": value });
                    out.insert(
                        format!("{name}.child"),
                        outcome(wasmq_guest::enqueue("reader", &payload)),
                    );
                    let flow = wasmq_guest::flow::chain([wasmq_guest::flow::step(
                        "reader",
                        &json!({ "names": [], "t": value }),
                    )]);
                    out.insert(
                        format!("{name}.flow"),
                        outcome(wasmq_guest::flow::start(&flow).map(|s| s.flow_id)),
                    );
                }
                let reversed = json!({"reversed": value.chars().rev().collect::<String>()});
                last = Some(value);
                reversed
            }
            Ok(None) => Value::Null,
            Err(e) => json!({"error": e.to_string()}),
        };
        out.insert(name, entry);
    }
    if let (true, Some(value)) = (args.fail, last) {
        let message = json!({ "upstream said": { "key": value } }).to_string();
        return Err(TaskError::kind(value, message));
    }
    Ok(out)
}
