//! `onboard`: the seed case. Sends a user's welcome email exactly once, however
//! often the job runs.
//!
//! The email goes out inside a step marker keyed by the user
//! (`welcome-email:<user_id>`). If the job is retried, redelivered after a
//! worker crash, or enqueued twice for the same user, the step is already
//! done: the mail API is not called again and the recorded output is
//! returned. One window is left: a worker killed after the POST but before
//! the step was recorded. For that, the POST carries the step's
//! idempotency token (the same on every delivery) as its `Idempotency-Key`
//! header, which the host adds to every request made inside a step, and in
//! the body for APIs that read it there: a mail API that honours it sends
//! the email once. A retry policy listing `"network"` in its auto-retry kinds
//! retries connection failures; a mail API that answers with an error
//! status fails the job with kind `"mail-api"`.
//!
//! With `"db": "app"` in the payload it is the article's task: in one
//! transaction it locks the user's row (`SELECT ... FOR UPDATE`), returns
//! if `onboarded` is already true, sends the email inside the step, sets
//! `onboarded = true` and commits. The row lock makes concurrent jobs for
//! one user wait for each other; the step marker is still needed because
//! the transaction can roll back *after* the email went out (the commit
//! fails, the worker dies, the job times out): the next run finds the row
//! not onboarded, but the step done, and does not send again.

use serde::{Deserialize, Serialize};
use wasmq_guest::postgres::{Connection, Value};
use wasmq_guest::{http, log, once, Job, TaskError};

/// Payload: `{"user_id": 42, "mail_api": "http://mail.internal/send"}`.
#[derive(Deserialize)]
struct Args {
    user_id: u64,
    /// URL the welcome email is POSTed to.
    mail_api: String,
    /// Database (granted in the task's policy) whose `users` table has the
    /// user's `onboarded` flag; without one, the email alone.
    #[serde(default)]
    db: Option<String>,
}

/// What the step records when the email is sent; returned as-is later.
#[derive(Serialize, Deserialize)]
struct Sent {
    /// Status the mail API answered with.
    status: u16,
    /// Id of the job that sent the email.
    by_job: String,
}

/// Result: `{"user_id": 42, "email": "sent", "already_sent": false, ...}`.
#[derive(Serialize)]
struct Out {
    user_id: u64,
    email: &'static str,
    /// True if an earlier run (this job's or another's) sent the email and
    /// this run skipped it.
    already_sent: bool,
    /// Job that actually sent the email.
    sent_by_job: String,
    /// The mail API's status for the send.
    mail_api_status: u16,
}

#[wasmq_guest::task]
fn run(job: &Job, args: Args) -> Result<Out, TaskError> {
    let Some(db) = &args.db else {
        return welcome(job, &args);
    };
    let db = Connection::open(db)?;
    let user = [Value::Int64(args.user_id as i64)];
    db.begin()?;
    let rows = db.query(
        "SELECT onboarded FROM users WHERE id = $1 FOR UPDATE",
        &user,
    )?;
    match rows.rows.first().map(|row| &row[0]) {
        None => {
            return Err(TaskError::fail(format!("no user {}", args.user_id)));
        }
        Some(Value::Boolean(true)) => {
            // Dropping the connection rolls the transaction back.
            log::info(format!("user {} is already onboarded", args.user_id));
            return Ok(Out {
                user_id: args.user_id,
                email: "sent",
                already_sent: true,
                sent_by_job: String::new(),
                mail_api_status: 0,
            });
        }
        Some(_) => {}
    }
    let out = welcome(job, &args)?;
    db.execute("UPDATE users SET onboarded = true WHERE id = $1", &user)?;
    db.commit()?;
    Ok(out)
}

/// Send the welcome email once per user (the step marker).
fn welcome(job: &Job, args: &Args) -> Result<Out, TaskError> {
    let mut ran_here = false;
    let step = format!("welcome-email:{}", args.user_id);
    let sent = once(&step, || {
        ran_here = true;
        let body = serde_json::json!({
            "to_user": args.user_id,
            "template": "welcome",
            "idempotency_key": wasmq_guest::step_token(&step),
        });
        // `?` maps connection failures and timeouts to kind "network".
        let resp = http::post_json(&args.mail_api, &body)?;
        if !resp.is_success() {
            return Err(TaskError::kind(
                "mail-api",
                format!("mail API answered {}: {}", resp.status, resp.text()),
            ));
        }
        log::info(format!("welcome email sent to user {}", args.user_id));
        Ok(Sent {
            status: resp.status,
            by_job: job.id.clone(),
        })
    })?;
    if !ran_here {
        log::info(format!(
            "welcome email to user {} was already sent by job {}; skipped",
            args.user_id, sent.by_job
        ));
    }
    Ok(Out {
        user_id: args.user_id,
        email: "sent",
        already_sent: !ran_here,
        sent_by_job: sent.by_job,
        mail_api_status: sent.status,
    })
}
