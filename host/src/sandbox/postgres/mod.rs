//! The `postgres` host interface: a job reaches a PostgreSQL database by a
//! name its policy grants, over a pool the worker keeps.
//!
//! The parts, one concern each:
//! - `pool`: the worker's pools ([`Databases`]: one per tenant and
//!   database name, built from the URL in the tenant's secret
//!   `database:NAME`, rebuilt when that URL changes) and how a session is
//!   connected and cancelled;
//! - `wire`: the tap under the driver that reads the server's transaction
//!   status and counts each answer's bytes before they are in memory;
//! - `statement`: what SQL and parameters may be, and the checks after
//!   each statement;
//! - `checkin`: the reset that makes a session belong to one job;
//! - `values`: guest values to and from SQL types;
//! - `tls`: libpq's `sslmode` on rustls.
//!
//! Invariants:
//! - a guest names a database, never a URL: `open` is `denied` unless the
//!   policy's `databases` lists the name, and the URL is looked up in the
//!   job's own tenant only;
//! - parameters travel apart from the SQL (extended protocol, one
//!   statement per call), so no value is ever parsed as SQL;
//! - transactions are the host's: `begin`/`commit`/`rollback`. The host
//!   knows whether one is open from the server's ReadyForQuery status
//!   after every statement, not from the SQL; a statement that opened or
//!   ended one closes the connection (which rolls back);
//! - a session belongs to one job: when the job lets go of a connection
//!   (drops it, returns, traps, times out, is cancelled, or its worker
//!   stops the run) a statement still running is cancelled, a transaction
//!   rolled back and the session reset (`DISCARD ALL` but the driver's
//!   prepared statements, see `checkin`) before another job
//!   can have it, or it is closed; a worker that dies leaves nothing
//!   either (the server checks for a vanished client every
//!   [`limits::DB_CLIENT_CHECK_INTERVAL`] even mid-statement);
//! - connections (and cancel requests) are encrypted as the URL's libpq
//!   `sslmode` says, certificates checked as it says (`tls`); a failure
//!   to connect names the database and the cause (a TLS error's text
//!   included), never the URL;
//! - every statement runs under [`limits::DB_STATEMENT_TIMEOUT`] on the
//!   server, which the guest cannot lift past its statement, and within
//!   the job's deadline (the run is dropped there); a result is capped at
//!   [`limits::MAX_DB_ROWS`] rows and [`limits::MAX_DB_RESULT_BYTES`]
//!   bytes as the server sends it, counted before it is in the worker's
//!   memory.

mod checkin;
mod pool;
mod statement;
pub(crate) mod tls;
mod values;
mod wire;

use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::Resource;

use super::bindings::v0_2::wasmq::task0_1_0::types::HostError;
use super::bindings::v0_2::wasmq::task0_2_0::postgres::{self, Rows, Value};
use super::state::HostState;
use crate::limits;
use crate::secrets::{self, SecretsKey};
pub use pool::Databases;
use pool::Pooled;
use statement::Failure;

/// One job's databases: what it may open and what it used.
pub(crate) struct JobDatabases {
    pools: Arc<Databases>,
    granted: Vec<String>,
    opened: u32,
    /// Time spent in database calls, and rows returned (for usage).
    pub(crate) time_us: u64,
    pub(crate) rows: u64,
}

impl JobDatabases {
    pub(crate) fn new(pools: Arc<Databases>, granted: &[String]) -> Self {
        JobDatabases {
            pools,
            granted: granted.to_vec(),
            opened: 0,
            time_us: 0,
            rows: 0,
        }
    }
}

/// A pooled session held by a job. See the module docs.
pub struct Connection {
    /// `None` once closed.
    session: Option<Pooled>,
    /// The host opened a transaction and has not ended it.
    in_tx: bool,
    /// A statement was sent and its answer not yet read.
    busy: bool,
}

impl Connection {
    /// Close the connection now (the server rolls back); later calls say
    /// it is closed.
    fn close(&mut self) {
        if let Some(session) = self.session.take() {
            checkin::close(session);
        }
        self.in_tx = false;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            checkin::check_in(session, self.in_tx, self.busy);
        }
    }
}

/// `e` and its sources, each once: tokio-postgres and deadpool errors
/// say what failed ("error performing TLS handshake") and leave why
/// ("invalid peer certificate: UnknownIssuer") to their source.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        // Some errors repeat their source's text in their own.
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

const CLOSED: &str = "the connection is closed; open another";

impl HostState {
    fn conn(&mut self, c: &Resource<Connection>) -> Result<&mut Connection, HostError> {
        self.table
            .get_mut(c)
            .map_err(|e| HostError::Invalid(format!("connection handle: {e}")))
    }

    /// Run `sql` on `c`, timing it; the rows (capped) or the count.
    async fn run_sql(
        &mut self,
        c: &Resource<Connection>,
        sql: &str,
        params: &[Value],
        want_rows: bool,
    ) -> Result<(Option<Rows>, u64), HostError> {
        statement::check(sql, params)?;
        let started = Instant::now();
        let conn = self.conn(c)?;
        let in_tx = conn.in_tx;
        let Some(session) = conn.session.as_mut() else {
            return Err(HostError::Invalid(CLOSED.into()));
        };
        conn.busy = true;
        let result = statement::run(session, sql, params, want_rows, in_tx).await;
        // Reached only when the call finished: a run dropped mid-call
        // leaves `busy` set, and the check-in cancels the statement.
        let conn = self.conn(c)?;
        conn.busy = false;
        self.databases.time_us += started.elapsed().as_micros() as u64;
        match result {
            Ok((rows, n)) => {
                if rows.is_some() {
                    self.databases.rows += n;
                }
                Ok((rows, n))
            }
            Err(Failure { error, close }) => {
                if close {
                    self.conn(c)?.close();
                }
                Err(error)
            }
        }
    }

    /// The host's BEGIN, COMMIT or ROLLBACK (`sql`); `open`: whether it
    /// opens a transaction. The server's status after it decides.
    async fn tx(
        &mut self,
        c: &Resource<Connection>,
        sql: &str,
        open: bool,
    ) -> Result<(), HostError> {
        let conn = self.conn(c)?;
        if conn.in_tx == open {
            return Err(HostError::Invalid(if open {
                "a transaction is already open on this connection".into()
            } else {
                "no transaction is open on this connection".into()
            }));
        }
        let session = conn
            .session
            .as_ref()
            .ok_or_else(|| HostError::Invalid(CLOSED.into()))?;
        // A COMMIT of a failed transaction is a rollback (PostgreSQL says
        // so only in the command tag): the guest is told.
        let failed = !open && sql == "COMMIT" && session.wire.status() == b'E';
        // Marked open before BEGIN is sent: if the run is dropped while it
        // is in flight, the check-in rolls back.
        conn.in_tx = true;
        conn.busy = true;
        let result = session.client.batch_execute(sql).await;
        // An error returns before the server's ReadyForQuery: an empty
        // query (which cannot fail) is answered after it.
        let settled = match &result {
            Ok(()) => Ok(()),
            Err(_) => session.client.batch_execute("").await,
        };
        let status = session.wire.status();
        let broken = statement::broken(session);
        let conn = self.conn(c)?;
        conn.busy = false;
        if let Some(Failure { error, .. }) = broken {
            conn.close();
            return Err(error);
        }
        match (settled, status) {
            (Ok(()), b'I') => conn.in_tx = false,
            (Ok(()), b'T' | b'E') => conn.in_tx = true,
            _ => {
                conn.close();
                return Err(HostError::Invalid(format!(
                    "{sql} left the connection in an unknown state (the connection is closed)"
                )));
            }
        }
        // A failed BEGIN, COMMIT or ROLLBACK is told as the server said
        // it; the state is the server's (a COMMIT that failed on a
        // deferred constraint has rolled back).
        let result = result.map_err(statement::db_error);
        if result.is_ok() && conn.in_tx != open {
            conn.close();
            return Err(HostError::Invalid(format!(
                "{sql} left the connection in the wrong state (the connection is closed)"
            )));
        }
        if failed {
            return Err(HostError::Invalid(
                "the transaction had failed (an earlier statement's error), so COMMIT rolled \
                 it back"
                    .into(),
            ));
        }
        result
    }
}

impl postgres::Host for HostState {}

impl postgres::HostConnection for HostState {
    #[tracing::instrument(level = "debug", name = "postgres.open", skip_all)]
    async fn open(&mut self, name: String) -> Result<Resource<Connection>, HostError> {
        if !self.databases.granted.contains(&name) {
            let mut end = name.len().min(64);
            while !name.is_char_boundary(end) {
                end -= 1;
            }
            let what = format!(
                "database {:?} (not in the task's sandbox.databases)",
                &name[..end]
            );
            self.denials.record(what.clone());
            return Err(HostError::Denied(what));
        }
        if self.databases.opened >= limits::MAX_DB_CONNECTIONS_PER_JOB {
            return Err(HostError::Invalid(format!(
                "a job may open at most {} connections",
                limits::MAX_DB_CONNECTIONS_PER_JOB
            )));
        }
        let secret = format!("{}{name}", secrets::DATABASE_PREFIX);
        let found = self
            .backend
            .secret_sealed(&self.scope.tenant, self.secrets.task(), &secret)
            .await
            .map_err(|e| self.fault(e))?;
        let Some((field, sealed)) = found else {
            return Err(HostError::Invalid(format!(
                "database {name} has no URL: set it with `wasmq secret set {secret}`"
            )));
        };
        let unavailable = |state: &HostState, m: String| {
            let _ = state.host_fault.set(m.clone());
            HostError::Unavailable(m)
        };
        let key: Arc<SecretsKey> = match self.secrets.key() {
            Some(key) => key,
            None => {
                return Err(unavailable(
                    self,
                    format!("this worker holds no secrets key to open database {name}'s URL"),
                ))
            }
        };
        let url = key
            .open(&self.scope.tenant, &field, &sealed)
            .map_err(|m| unavailable(self, m))?;
        let url = String::from_utf8(url)
            .map_err(|_| HostError::Invalid(format!("database {name}'s URL is not text")))?;
        let pool = self
            .databases
            .pools
            .pool(&self.scope.tenant, &name, &url)
            .map_err(HostError::Invalid)?;
        let started = Instant::now();
        let mut session = pool.get().await.map_err(|e| {
            // The database refusing or unreachable, or its certificate
            // not passing: not the task's doing.
            unavailable(
                self,
                format!("connecting to database {name}: {}", error_chain(&e)),
            )
        })?;
        // Unclean until its check-in resets it (see `checkin`).
        session.clean = false;
        self.databases.time_us += started.elapsed().as_micros() as u64;
        self.databases.opened += 1;
        self.table
            .push(Connection {
                session: Some(session),
                in_tx: false,
                busy: false,
            })
            .map_err(|e| HostError::Invalid(format!("too many handles: {e}")))
    }

    #[tracing::instrument(level = "debug", name = "postgres.query", skip_all)]
    async fn query(
        &mut self,
        c: Resource<Connection>,
        sql: String,
        params: Vec<Value>,
    ) -> Result<Rows, HostError> {
        let (rows, _) = self.run_sql(&c, &sql, &params, true).await?;
        Ok(rows.unwrap_or(Rows {
            columns: Vec::new(),
            rows: Vec::new(),
        }))
    }

    #[tracing::instrument(level = "debug", name = "postgres.execute", skip_all)]
    async fn execute(
        &mut self,
        c: Resource<Connection>,
        sql: String,
        params: Vec<Value>,
    ) -> Result<u64, HostError> {
        Ok(self.run_sql(&c, &sql, &params, false).await?.1)
    }

    #[tracing::instrument(level = "debug", name = "postgres.begin", skip_all)]
    async fn begin(&mut self, c: Resource<Connection>) -> Result<(), HostError> {
        self.tx(&c, "BEGIN", true).await
    }

    #[tracing::instrument(level = "debug", name = "postgres.commit", skip_all)]
    async fn commit(&mut self, c: Resource<Connection>) -> Result<(), HostError> {
        self.tx(&c, "COMMIT", false).await
    }

    #[tracing::instrument(level = "debug", name = "postgres.rollback", skip_all)]
    async fn rollback(&mut self, c: Resource<Connection>) -> Result<(), HostError> {
        self.tx(&c, "ROLLBACK", false).await
    }

    async fn drop(&mut self, c: Resource<Connection>) -> wasmtime::Result<()> {
        // Dropping the entry hands the connection back (see `Drop`).
        self.table.delete(c)?;
        Ok(())
    }
}
