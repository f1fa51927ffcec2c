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
//! 3. the driver's statement cache is emptied and `DISCARD ALL` run: it
//!    is `CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL;
//!    DEALLOCATE ALL; UNLISTEN *; SELECT pg_advisory_unlock_all();
//!    DISCARD PLANS; DISCARD TEMP; DISCARD SEQUENCES`, and it refuses to
//!    run in a transaction block, so its success also proves none is open;
//! 4. the server must then report itself idle (`I`).
//!
//! Only then is the session marked clean and dropped back into the pool;
//! on any failure, after [`limits::DB_RESET_TIMEOUT`], where no runtime
//! is at hand, or for a session whose driver holds statements of its own
//! (see `Session::custom_types`), it is closed instead, which rolls back
//! and frees everything on the server. A reset that never finishes (the
//! worker stopping) leaves the session unclean, and the pool closes it
//! when next taken (see `pool`).

use futures_util::future::join;

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

async fn reset(session: &mut Pooled, in_tx: bool, busy: bool) -> Result<(), String> {
    if session.client.is_closed() {
        return Err("the connection is closed".into());
    }
    if let Some(why) = session.wire.tripped() {
        return Err(why.message());
    }
    if session.custom_types {
        return Err("the driver holds type lookups DISCARD ALL would drop".into());
    }
    if busy {
        session.cancel().await?;
    }
    session.client.statement_cache.clear();
    let client = &session.client;
    if in_tx || busy {
        // Sent back to back, answered in order: one round trip. ROLLBACK
        // outside a transaction is only a warning.
        let (rolled_back, discarded) = join(
            client.batch_execute("ROLLBACK"),
            client.batch_execute("DISCARD ALL"),
        )
        .await;
        rolled_back.map_err(|e| format!("ROLLBACK: {e}"))?;
        discarded.map_err(|e| format!("DISCARD ALL: {e}"))?;
    } else {
        client
            .batch_execute("DISCARD ALL")
            .await
            .map_err(|e| format!("DISCARD ALL: {e}"))?;
    }
    match session.wire.status() {
        b'I' => Ok(()),
        other => Err(format!(
            "the server reports status {:?} after DISCARD ALL",
            other as char
        )),
    }
}
