//! Check-in: a job's session goes back to the pool only in the state a
//! new connection has, or it is closed.
//!
//! A session's state outlives its statements: `SET ROLE`, `SET
//! search_path`, timeouts, `default_transaction_read_only`, temporary
//! tables, session advisory locks, `LISTEN`, prepared statements, an open
//! transaction. When a job lets go of a connection (it dropped it,
//! returned, trapped, timed out, was cancelled, or its worker stopped the
//! run) the session is reset here, at once (so an advisory lock is freed
//! when the job ends, not when the connection is next used):
//! 1. a statement still running is cancelled;
//! 2. a transaction that may be open is rolled back;
//! 3. `DISCARD ALL` less its `DEALLOCATE ALL`, in one round trip
//!    ([`RESET_SQL`]): `CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT;
//!    RESET ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD
//!    PLANS; DISCARD TEMP; DISCARD SEQUENCES` (PostgreSQL 15's list), so
//!    the driver's prepared statements, and its statement cache, outlive
//!    the job: the next job does not prepare them again;
//! 4. the same round trip ends by counting the session's prepared
//!    statements. Only the host sends Parse, and the driver never reuses
//!    a name, so a protocol-level statement named in the cache means what
//!    the cache thinks; a statement made by SQL `PREPARE` (refused by the
//!    statement check, but a `DO` block can `EXECUTE` one, after a
//!    `DEALLOCATE` of a driver's name) could mean anything. So if any
//!    statement is SQL's, or the protocol-level ones are not as many as
//!    the cache holds (one deallocated, or a Parse whose job was dropped
//!    mid-prepare), `DEALLOCATE ALL` is run and the cache emptied: no
//!    session is handed on with a name that may not mean what the cache
//!    says;
//! 5. the server must then report itself idle (`I`).
//!
//! Only then is the session marked clean and dropped back into the pool;
//! on any failure, after [`limits::DB_RESET_TIMEOUT`], where no runtime
//! is at hand, or for a session whose driver holds statements of its own
//! (its type lookups, not in the cache, would miscount; see
//! `Session::custom_types`), it is closed instead, which rolls back
//! and frees everything on the server. A reset that never finishes (the
//! worker stopping) leaves the session unclean, and the pool closes it
//! when next taken (see `pool`).

use futures_util::future::join;
use tokio_postgres::SimpleQueryMessage;

use super::pool::Pooled;
use crate::limits;

/// Hand `session` back (see the module docs). `in_tx`: the host opened a
/// transaction that is not closed; `busy`: a statement was sent and its
/// answer not read.
pub(super) fn check_in(session: Pooled, in_tx: bool, busy: bool) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return close(session);
    };
    runtime.spawn(async move {
        let mut session = session;
        let reset =
            tokio::time::timeout(limits::DB_RESET_TIMEOUT, reset(&mut session, in_tx, busy)).await;
        match reset {
            Ok(Ok(())) => session.clean = true, // dropped: back to the pool
            Ok(Err(why)) => {
                tracing::debug!(%why, "closing a database session instead of reusing it");
                close(session)
            }
            Err(_) => close(session),
        }
    });
}

/// Close `session`'s connection: the server rolls back and frees what it
/// held.
pub(super) fn close(session: Pooled) {
    drop(deadpool::managed::Object::take(session));
}

/// The reset (see the module docs): `DISCARD ALL` but `DEALLOCATE ALL`,
/// then the session's prepared statements counted, last, so that
/// whatever ran before (a cursor's cleanup) is counted too. Qualified
/// with `pg_catalog`: a role's `search_path` may put a schema the tenant
/// writes to first.
const RESET_SQL: &str = "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; \
     SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD PLANS; DISCARD TEMP; DISCARD SEQUENCES; \
     SELECT pg_catalog.count(*) FILTER (WHERE from_sql), \
     pg_catalog.count(*) FILTER (WHERE NOT from_sql) FROM pg_catalog.pg_prepared_statements";

async fn reset(session: &mut Pooled, in_tx: bool, busy: bool) -> Result<(), String> {
    if session.client.is_closed() {
        return Err("the connection is closed".into());
    }
    if let Some(why) = session.wire.tripped() {
        return Err(why.message());
    }
    if session.custom_types {
        return Err("the driver holds type lookups its statement cache does not count".into());
    }
    if busy {
        session.cancel().await?;
    }
    let client = &session.client;
    let answer = if in_tx || busy {
        // Sent back to back, answered in order: one round trip. ROLLBACK
        // outside a transaction is only a warning.
        let (rolled_back, answer) = join(
            client.batch_execute("ROLLBACK"),
            client.simple_query(RESET_SQL),
        )
        .await;
        rolled_back.map_err(|e| format!("ROLLBACK: {e}"))?;
        answer
    } else {
        client.simple_query(RESET_SQL).await
    };
    let answer = answer.map_err(|e| format!("the reset: {e}"))?;
    let (from_sql, from_driver) = statement_counts(&answer)?;
    if from_sql != 0 || from_driver != client.statement_cache.size() {
        client
            .batch_execute("DEALLOCATE ALL")
            .await
            .map_err(|e| format!("DEALLOCATE ALL: {e}"))?;
        // Dropping the cached statements sends a Close for each: harmless
        // (closing a statement that does not exist is no error), and no
        // name is reused by the driver.
        client.statement_cache.clear();
    }
    // The reset ran as one implicit transaction: had one been open, it
    // would still be, and this says so.
    match session.wire.status() {
        b'I' => Ok(()),
        other => Err(format!(
            "the server reports status {:?} after the reset",
            other as char
        )),
    }
}

/// The reset's last row: prepared statements made by SQL, and by the
/// protocol (the driver's).
fn statement_counts(answer: &[SimpleQueryMessage]) -> Result<(u64, usize), String> {
    let row = answer
        .iter()
        .rev()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .ok_or("the reset returned no count of prepared statements")?;
    let count = |i: usize| -> Result<u64, String> {
        row.get(i)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("the reset's count of prepared statements: {:?}", row.get(i)))
    };
    Ok((count(0)?, count(1)? as usize))
}
