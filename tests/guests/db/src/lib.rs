//! Test guest for the `postgres` interface.
//!
//! - `{"op": "query", "db": "app", "sql": S, "params": [JSON...]}`: runs S
//!   with the params (null, bool, integer, float, string) and returns the
//!   rows as JSON arrays;
//! - `{"op": "onboard", "user_id": N, "then": "commit" | "trap" | "spin" |
//!   "sleep" | "return"}`: in a transaction, locks the user's row, sets `onboarded`,
//!   then commits, traps, spins until the deadline, waits in `pg_sleep`
//!   past the deadline (`sleep`), or returns with the
//!   transaction open (the host must roll back all but `commit`);
//! - `{"op": "bench", "user_id": N}`: one indexed SELECT and one UPDATE;
//! - `{"op": "script", "steps": [STEP...]}`: on one connection, each step
//!   in turn, a step being `{"sql": S, "params": [...]}` (a query) or
//!   `{"call": "begin" | "commit" | "rollback"}`; returns one result per
//!   step, `{"rows": [...]}`, `{"ok": true}` or `{"error": TEXT}` (the
//!   script goes on after an error).

use serde_json::{json, Value as Json};
use wasmq_guest::postgres::{Connection, Value};
use wasmq_guest::{Job, TaskError};

#[derive(serde::Deserialize)]
struct Args {
    op: String,
    #[serde(default = "app")]
    db: String,
    #[serde(default)]
    sql: String,
    #[serde(default)]
    params: Vec<Json>,
    #[serde(default)]
    user_id: i64,
    #[serde(default)]
    then: String,
    #[serde(default)]
    steps: Vec<Step>,
}

#[derive(serde::Deserialize)]
struct Step {
    #[serde(default)]
    sql: String,
    #[serde(default)]
    params: Vec<Json>,
    #[serde(default)]
    call: String,
}

fn rows_json(rows: &wasmq_guest::postgres::Rows) -> Json {
    json!(rows
        .rows
        .iter()
        .map(|r| r.iter().map(json).collect::<Vec<_>>())
        .collect::<Vec<_>>())
}

fn app() -> String {
    "app".into()
}

fn param(v: &Json) -> Value {
    match v {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) if n.is_i64() => Value::Int64(n.as_i64().unwrap()),
        Json::Number(n) => Value::Float64(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Value::Text(s.clone()),
        other => Value::Json(other.to_string()),
    }
}

fn json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Boolean(b) => json!(b),
        Value::Int64(i) => json!(i),
        Value::Float64(x) => json!(x),
        Value::Text(s) => json!(s),
        Value::Bytes(b) => json!(b),
        Value::Json(s) => serde_json::from_str(s).unwrap_or(Json::Null),
    }
}

#[wasmq_guest::task]
fn run(_job: &Job, args: Args) -> Result<Json, TaskError> {
    let db = Connection::open(&args.db)?;
    match args.op.as_str() {
        "query" => {
            let params: Vec<Value> = args.params.iter().map(param).collect();
            let rows = db.query(&args.sql, &params)?;
            Ok(json!({
                "columns": rows.columns,
                "rows": rows.rows.iter().map(|r| r.iter().map(json).collect::<Vec<_>>()).collect::<Vec<_>>(),
            }))
        }
        "onboard" => {
            let id = [Value::Int64(args.user_id)];
            db.begin()?;
            db.query("SELECT onboarded FROM users WHERE id = $1 FOR UPDATE", &id)?;
            db.execute("UPDATE users SET onboarded = true WHERE id = $1", &id)?;
            match args.then.as_str() {
                "commit" => db.commit()?,
                "trap" => panic!("trapping with the transaction open"),
                "sleep" => {
                    db.query("SELECT pg_sleep(30)", &[])?;
                }
                "spin" => loop {
                    std::hint::black_box(0u64);
                },
                _ => {
                    std::mem::forget(db); // still open when the job ends
                }
            }
            Ok(json!("done"))
        }
        "script" => {
            let mut out = Vec::new();
            for step in &args.steps {
                let result = match step.call.as_str() {
                    "begin" => db.begin().map(|_| json!({"ok": true})),
                    "commit" => db.commit().map(|_| json!({"ok": true})),
                    "rollback" => db.rollback().map(|_| json!({"ok": true})),
                    _ => {
                        let params: Vec<Value> = step.params.iter().map(param).collect();
                        db.query(&step.sql, &params)
                            .map(|rows| json!({"rows": rows_json(&rows)}))
                    }
                };
                out.push(result.unwrap_or_else(|e| json!({"error": format!("{e}")})));
            }
            Ok(json!(out))
        }
        "bench" => {
            let id = [Value::Int64(args.user_id)];
            db.query("SELECT onboarded FROM users WHERE id = $1", &id)?;
            let n = db.execute("UPDATE users SET score = score + 1 WHERE id = $1", &id)?;
            Ok(json!(n))
        }
        other => Err(TaskError::fail(format!("unknown op {other}"))),
    }
}
