//! Test guest for secrets: reads each name of `{"names": [...]}` with
//! `config::get` and returns, per name, the value reversed (so the host's
//! redaction of values does not touch it), `null` when unset, or the
//! error. With `"leak": true` it also prints, logs and returns each value
//! as is, which the host must blot out.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use wasmq_guest::{config, log, Job, TaskError};

#[derive(serde::Deserialize)]
struct Args {
    names: Vec<String>,
    #[serde(default)]
    leak: bool,
}

#[wasmq_guest::task]
fn run(_job: &Job, args: Args) -> Result<BTreeMap<String, Value>, TaskError> {
    let mut out = BTreeMap::new();
    for name in args.names {
        let entry = match config::get(&name) {
            Ok(Some(value)) => {
                if args.leak {
                    println!("stdout has {value}");
                    log::info(format!("log has {value}"));
                    out.insert(format!("{name}.plain"), json!(value));
                }
                json!({"reversed": value.chars().rev().collect::<String>()})
            }
            Ok(None) => Value::Null,
            Err(e) => json!({"error": e.to_string()}),
        };
        out.insert(name, entry);
    }
    Ok(out)
}
