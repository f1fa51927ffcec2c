//! The statement guard: what a guest's SQL may be, and what the host
//! checks after each statement, from the server's own word.
//!
//! Owns [`check`] (the arguments, before anything is sent) and [`run`]
//! (one statement and its checks). Invariants:
//! - SQL text and every parameter are bounded like other host-call
//!   arguments ([`limits::MAX_VALUE_BYTES`] each, [`limits::MAX_DB_PARAMS_BYTES`]
//!   in all);
//! - transaction control written as SQL (`BEGIN`, `COMMIT`, ..., behind
//!   comments too) and SQL prepared statements (`PREPARE`, `EXECUTE`,
//!   `DEALLOCATE`) are refused with a friendly error; that check reads
//!   text, so it is not the guarantee;
//! - the guarantee: after every statement the host reads the transaction
//!   status the server reported (see `wire`) and compares it with its
//!   own: idle (`I`) outside the host's transaction, in one (`T`, or `E`
//!   once a statement failed) inside. Any mismatch (SQL, a `DO` block, a
//!   procedure or function that opened, ended or committed a transaction,
//!   however written) closes the connection, which rolls back, and the
//!   guest is told why;
//! - the settings the host enforces on the server (`statement_timeout`,
//!   `client_connection_check_interval`) are set again after every
//!   statement, in the same round trip, so `SET statement_timeout = 0`
//!   lasts until its statement's end: the next statement (or COMMIT,
//!   which runs deferred triggers) runs under the host's limits. If they
//!   cannot be set (outside a failed transaction, where nothing runs
//!   until a rollback that undoes the change), the connection is closed.

use futures_util::future::join3;
use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::types::Type;

use super::pool::Session;
use super::values::{column, Param};
use crate::limits;
use crate::sandbox::bindings::v0_2::wasmq::task0_1_0::types::HostError;
use crate::sandbox::bindings::v0_2::wasmq::task0_2_0::postgres::{Rows, Value};

/// A failed statement: what the guest is told, and whether the
/// connection must be closed (its state is not what the host expects).
pub(super) struct Failure {
    pub(super) error: HostError,
    pub(super) close: bool,
}

impl Failure {
    fn keep(error: HostError) -> Failure {
        Failure {
            error,
            close: false,
        }
    }

    fn close(text: String) -> Failure {
        Failure {
            error: HostError::Invalid(text),
            close: true,
        }
    }
}

/// First words of SQL that is transaction control (or COPY, which the
/// interface does not carry): refused before it is sent.
const REFUSED: &[&str] = &[
    "BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "COPY",
];

/// First words of SQL prepared statements (`PREPARE TRANSACTION` too):
/// the host prepares and caches each statement itself, and a statement
/// of the guest's under one of the driver's names would be run by the
/// next job. Refused here as a friendly error; the check-in's count of
/// prepared statements is the guarantee (see `checkin`).
const PREPARED: &[&str] = &["PREPARE", "EXECUTE", "DEALLOCATE"];

/// Refuse arguments over their bounds, and SQL whose first word (past
/// whitespace and comments) is in [`REFUSED`] or [`PREPARED`].
pub(super) fn check(sql: &str, params: &[Value]) -> Result<(), HostError> {
    limits::check_name("SQL statement", sql, limits::MAX_VALUE_BYTES)
        .map_err(HostError::Invalid)?;
    let mut total = 0usize;
    for (i, p) in params.iter().enumerate() {
        let len = match p {
            Value::Text(s) | Value::Json(s) => s.len(),
            Value::Bytes(b) => b.len(),
            _ => 8,
        };
        limits::check_len(
            &format!("parameter {}", i + 1),
            len,
            limits::MAX_VALUE_BYTES,
        )
        .map_err(HostError::Invalid)?;
        total += len;
    }
    limits::check_len("the parameters", total, limits::MAX_DB_PARAMS_BYTES)
        .map_err(HostError::Invalid)?;
    let first = first_word(sql).to_ascii_uppercase();
    if first == "COPY" {
        return Err(HostError::Invalid(
            "COPY is not carried by the postgres interface; use INSERT and SELECT".into(),
        ));
    }
    if PREPARED.contains(&first.as_str()) {
        return Err(HostError::Invalid(format!(
            "{first} in SQL: the host prepares each statement itself; send the statement \
             with $1, $2, ... parameters (and use the connection's begin, commit and rollback)"
        )));
    }
    if REFUSED.contains(&first.as_str()) {
        return Err(HostError::Invalid(format!(
            "{first} in SQL: use the connection's begin, commit and rollback"
        )));
    }
    Ok(())
}

/// The first word of `sql` past whitespace, empty statements, `-- line`
/// comments and `/* block */` comments (which nest in PostgreSQL).
fn first_word(sql: &str) -> &str {
    let b = sql.as_bytes();
    let mut i = 0;
    loop {
        // PostgreSQL's whitespace (space, \t, \n, \r, \f, \v), and `;`:
        // its parser drops empty statements, so `;COMMIT` is COMMIT.
        while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c | b';') {
            i += 1;
        }
        if b[i..].starts_with(b"--") {
            while i < b.len() && b[i] != b'\n' && b[i] != b'\r' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0usize;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else {
            break;
        }
    }
    let rest = &sql[i..];
    let end = rest
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(rest.len());
    &rest[..end]
}

/// What the host sets again after every statement (see the module docs).
fn restore_sql() -> String {
    format!(
        "SET statement_timeout = {}; SET client_connection_check_interval = {}",
        limits::DB_STATEMENT_TIMEOUT.as_millis(),
        limits::DB_CLIENT_CHECK_INTERVAL.as_millis()
    )
}

/// Run `sql` on `session` (the rows, capped, or the count), then check the
/// server's transaction status against `in_tx` (see the module docs).
pub(super) async fn run(
    session: &mut Session,
    sql: &str,
    params: &[Value],
    want_rows: bool,
    in_tx: bool,
) -> Result<(Option<Rows>, u64), Failure> {
    let client = &session.client;
    // Prepared first, alone: the statement, the restore and the barrier
    // below must reach the server in that order.
    let statement = match client.prepare_cached(sql).await {
        Ok(statement) => statement,
        // A Parse changes no transaction state but T to E, which the
        // host's state allows; a broken connection is closed.
        Err(e) => return Err(broken(session).unwrap_or_else(|| Failure::keep(db_error(e)))),
    };
    let builtin = |t: &Type| Type::from_oid(t.oid()).is_some();
    if !statement.params().iter().all(builtin)
        || !statement.columns().iter().all(|c| builtin(c.type_()))
    {
        session.custom_types = true;
    }
    let client = &session.client;
    let params: Vec<Param<'_>> = params.iter().map(Param).collect();
    let body = async {
        if !want_rows {
            let n = client
                .execute_raw(&statement, params.iter())
                .await
                .map_err(db_error)?;
            return Ok((None, n));
        }
        let columns = statement
            .columns()
            .iter()
            .map(|c| c.name().to_string())
            .collect();
        let stream = client
            .query_raw(&statement, params.iter())
            .await
            .map_err(db_error)?;
        pin_mut!(stream);
        let mut rows = Vec::new();
        while let Some(row) = stream.try_next().await.map_err(db_error)? {
            if rows.len() >= limits::MAX_DB_ROWS {
                return Err(HostError::Invalid(format!(
                    "query returned more than {} rows; add a LIMIT",
                    limits::MAX_DB_ROWS
                )));
            }
            let values = (0..row.len())
                .map(|i| column(&row, i))
                .collect::<Result<Vec<_>, _>>()?;
            rows.push(values);
        }
        let n = rows.len() as u64;
        Ok((Some(Rows { columns, rows }), n))
    };
    let restore_text = restore_sql();
    // Each future sends its messages when first polled, and join3 polls
    // in order: statement, restore, then an empty query, which never
    // fails (even in a failed transaction) and whose ReadyForQuery is the
    // last: once it is read, the status is that of after the statement.
    let (result, restored, barrier) = join3(
        body,
        client.batch_execute(&restore_text),
        client.batch_execute(""),
    )
    .await;
    if let Some(failure) = broken(session) {
        return Err(failure);
    }
    if let Err(e) = barrier {
        return Err(Failure::close(format!(
            "the database connection failed: {e} (the connection is closed)"
        )));
    }
    let status = session.wire.status();
    match (in_tx, status) {
        (false, b'T' | b'E') => {
            return Err(Failure::close(
                "the statement opened a transaction: use the connection's begin, commit and \
                 rollback (the connection is closed, its transaction rolled back)"
                    .into(),
            ))
        }
        (true, b'I') => {
            return Err(Failure::close(
                "the statement ended the connection's transaction: use the connection's \
                 commit and rollback (the connection is closed)"
                    .into(),
            ))
        }
        (false, b'I') | (true, b'T' | b'E') => {}
        (_, other) => {
            return Err(Failure::close(format!(
                "the database reported transaction status {:?} (the connection is closed)",
                other as char
            )))
        }
    }
    if restored.is_err() && status != b'E' {
        return Err(Failure::close(
            "the session's statement_timeout could not be set again after the statement \
             (the connection is closed)"
                .into(),
        ));
    }
    result.map_err(Failure::keep)
}

/// A failure that closes the connection, when it is broken: the wire
/// tripped (the guest is told which limit) or the connection ended.
pub(super) fn broken(session: &Session) -> Option<Failure> {
    if let Some(why) = session.wire.tripped() {
        return Some(Failure::close(why.message()));
    }
    session
        .client
        .is_closed()
        .then(|| Failure::close("the database connection ended (the connection is closed)".into()))
}

pub(super) fn db_error(e: tokio_postgres::Error) -> HostError {
    // The server's message (constraint, syntax, lock timeout, ...): the
    // guest's to handle. Values are not echoed by PostgreSQL errors for
    // parameters, and the URL is never part of them.
    let text = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        // The driver's own errors ("error serializing parameter 0")
        // say why only in their source.
        None => super::error_chain(&e),
    };
    HostError::Invalid(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_word_is_found_past_comments_however_nested() {
        assert_eq!(first_word(" begin"), "begin");
        assert_eq!(first_word("/* x */ BEGIN"), "BEGIN");
        assert_eq!(first_word("-- x\nCOMMIT"), "COMMIT");
        assert_eq!(first_word("-- x\r\n\t/* a /* b */ c */\x0bEND;"), "END");
        assert_eq!(first_word("/* unterminated"), "");
        assert_eq!(first_word("SELECT 1 -- BEGIN"), "SELECT");
        assert_eq!(first_word(" ;; -- x\n;COMMIT"), "COMMIT");
        for sql in [
            "/**/commit and chain",
            "--\nROLLBACK",
            "/* /* */ */ start transaction",
        ] {
            assert!(check(sql, &[]).is_err(), "{sql}");
        }
        assert!(check("SELECT 'BEGIN'", &[]).is_ok());
        assert!(check("/* c */ copy t to stdout", &[]).is_err());
        for sql in [
            "prepare s1 AS SELECT 1",
            "EXECUTE s1",
            "-- x\nDEALLOCATE ALL",
        ] {
            assert!(check(sql, &[]).is_err(), "{sql}");
        }
    }

    #[test]
    fn parameters_are_bounded_each_and_in_all() {
        let big = Value::Text("x".repeat(limits::MAX_VALUE_BYTES + 1));
        assert!(check("SELECT $1", &[big]).is_err());
        let one = Value::Bytes(vec![0; limits::MAX_VALUE_BYTES]);
        let many = vec![one; limits::MAX_DB_PARAMS_BYTES / limits::MAX_VALUE_BYTES + 1];
        let e = check("SELECT 1", &many).unwrap_err();
        assert!(format!("{e:?}").contains("the parameters"), "{e:?}");
    }
}
