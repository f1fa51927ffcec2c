//! The `postgres` host interface: a job reaches a PostgreSQL database by a
//! name its policy grants, over a pool the worker keeps.
//!
//! Owns the worker's pools ([`Databases`]: one per tenant and database
//! name, built from the URL in the tenant's secret `database:NAME` and
//! rebuilt when that URL changes) and a job's connections
//! ([`Connection`]). Invariants:
//! - a guest names a database, never a URL: `open` is `denied` unless the
//!   policy's `databases` lists the name, and the URL is looked up in the
//!   job's own tenant only;
//! - parameters travel apart from the SQL (extended protocol, one
//!   statement per call), so no value is ever parsed as SQL;
//! - transactions are the host's: `begin`/`commit`/`rollback`; SQL that
//!   would open or end one itself is refused, so the host always knows
//!   whether one is open;
//! - a connection handed back with a transaction open (the guest dropped
//!   it, trapped, timed out, was cancelled, or its worker stopped the run)
//!   is rolled back before it can serve another job; a statement still
//!   running is cancelled first. Where no runtime is at hand the
//!   connection is closed instead, which rolls back on the server, as
//!   does a worker that dies (the server checks for a vanished client
//!   every [`limits::DB_CLIENT_CHECK_INTERVAL`] even mid-statement);
//! - connections (and cancel requests) are encrypted as the URL's libpq
//!   `sslmode` says, certificates checked as it says (`postgres_tls`);
//!   a failure to connect names the database and the cause (a TLS
//!   error's text included), never the URL;
//! - every statement runs under [`limits::DB_STATEMENT_TIMEOUT`] on the
//!   server, and within the job's deadline (the run is dropped there);
//!   results are capped at [`limits::MAX_DB_ROWS`] rows and
//!   [`limits::MAX_DB_RESULT_BYTES`] bytes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use wasmtime::component::Resource;

use super::bindings::v0_2::wasmq::task0_1_0::types::HostError;
use super::bindings::v0_2::wasmq::task0_2_0::postgres::{self, Rows, Value};
use super::postgres_tls::{self, PgTls};
use super::state::HostState;
use crate::limits;
use crate::secrets::{self, SecretsKey};

/// The worker's pools, by (tenant, database): each with the URL it was
/// built from and its TLS connector (the cancel path needs it too).
pub struct Databases {
    pools: Mutex<HashMap<(String, String), Kept>>,
    /// Connections each pool keeps at most.
    pool_size: usize,
}

impl Default for Databases {
    fn default() -> Self {
        Databases::with_pool_size(limits::DB_POOL_SIZE)
    }
}

/// A pool, the URL it was built from, and its TLS connector.
struct Kept {
    url: String,
    pool: Pool,
    tls: PgTls,
}

impl Databases {
    /// No pools yet; each will keep at most `pool_size` connections (at
    /// least one).
    pub fn with_pool_size(pool_size: usize) -> Self {
        Databases {
            pools: Mutex::default(),
            pool_size: pool_size.max(1),
        }
    }

    /// The pool for `tenant`'s database `name` at `url`: the one kept, or a
    /// new one when there is none or the URL changed (a rotated password).
    /// An error says what is wrong with the URL (its `sslrootcert` file
    /// included, which the URL's author chose): the tenant's to fix.
    fn pool(&self, tenant: &str, name: &str, url: &str) -> Result<(Pool, PgTls), String> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let key = (tenant.to_string(), name.to_string());
        if let Some(kept) = pools.get(&key) {
            if kept.url == url {
                return Ok((kept.pool.clone(), kept.tls.clone()));
            }
        }
        let secret = format!(
            "the secret {}{name} of tenant {tenant}",
            secrets::DATABASE_PREFIX
        );
        // libpq's sslmode/sslrootcert, which tokio-postgres does not
        // know, are taken out first (see postgres_tls).
        let (rest, ssl) =
            postgres_tls::split_ssl_params(url).map_err(|e| format!("{secret}: {e}"))?;
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|_| format!("{secret} is not a PostgreSQL URL"))?;
        let (mode, tls) = PgTls::new(&ssl).map_err(|e| format!("{secret}: {e}"))?;
        config.ssl_mode(mode);
        config.options(format!(
            "-c statement_timeout={} -c client_connection_check_interval={}",
            limits::DB_STATEMENT_TIMEOUT.as_millis(),
            limits::DB_CLIENT_CHECK_INTERVAL.as_millis()
        ));
        config.connect_timeout(limits::DB_CONNECT_TIMEOUT);
        config.application_name("wasmq");
        let manager = Manager::from_config(
            config,
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(self.pool_size)
            .build()
            .map_err(|e| format!("building the pool of database {name}: {e}"))?;
        let kept = Kept {
            url: url.to_string(),
            pool: pool.clone(),
            tls: tls.clone(),
        };
        pools.insert(key, kept);
        Ok((pool, tls))
    }
}

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

/// A pooled connection held by a job. See the module docs.
pub struct Connection {
    client: Option<deadpool_postgres::Object>,
    /// The pool's TLS connector: a cancel request goes over a new
    /// connection, encrypted as the pool's are.
    tls: PgTls,
    in_tx: bool,
    /// A statement was sent and its answer not yet read.
    busy: bool,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        if !self.in_tx && !self.busy {
            return; // clean: straight back to the pool
        }
        let busy = self.busy;
        let tls = self.tls.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if busy {
                        let _ = client.cancel_token().cancel_query(tls).await;
                    }
                    if client.batch_execute("ROLLBACK").await.is_err() {
                        // Closing it rolls back on the server.
                        drop(deadpool_postgres::Object::take(client));
                    }
                });
            }
            Err(_) => drop(deadpool_postgres::Object::take(client)),
        }
    }
}

/// A guest value as a statement parameter, converted to the type the
/// server says the parameter has.
struct Param<'a>(&'a Value);

impl std::fmt::Debug for Param<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Param") // values are the guest's data: not logged
    }
}

type SqlResult = Result<IsNull, Box<dyn std::error::Error + Sync + Send>>;

impl ToSql for Param<'_> {
    fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> SqlResult {
        let mismatch = |what: &str| -> SqlResult {
            Err(format!("a {what} parameter cannot be passed as {ty}").into())
        };
        match self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Boolean(b) if *ty == Type::BOOL => b.to_sql(ty, out),
            Value::Int64(i) => match *ty {
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT8 => i.to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                _ => mismatch("int64"),
            },
            Value::Float64(x) => match *ty {
                Type::FLOAT4 => (*x as f32).to_sql(ty, out),
                Type::FLOAT8 => x.to_sql(ty, out),
                _ => mismatch("float64"),
            },
            Value::Text(s) if <&str as ToSql>::accepts(ty) => s.as_str().to_sql(ty, out),
            Value::Bytes(b) if *ty == Type::BYTEA => b.as_slice().to_sql(ty, out),
            Value::Json(s) if *ty == Type::JSON || *ty == Type::JSONB => {
                serde_json::from_str::<serde_json::Value>(s)?.to_sql(ty, out)
            }
            Value::Boolean(_) => mismatch("boolean"),
            Value::Text(_) => mismatch("text"),
            Value::Bytes(_) => mismatch("bytes"),
            Value::Json(_) => mismatch("json"),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A column value for the guest, and its size toward the byte cap.
fn column(row: &tokio_postgres::Row, i: usize) -> Result<(Value, usize), HostError> {
    let ty = row.columns()[i].type_().clone();
    let bad = |e: tokio_postgres::Error| HostError::Invalid(format!("column {i}: {e}"));
    let value = match ty {
        Type::BOOL => row
            .try_get::<_, Option<bool>>(i)
            .map_err(bad)?
            .map(Value::Boolean),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)
            .map_err(bad)?
            .map(|v| Value::Int64(v.into())),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)
            .map_err(bad)?
            .map(|v| Value::Int64(v.into())),
        Type::INT8 => row
            .try_get::<_, Option<i64>>(i)
            .map_err(bad)?
            .map(Value::Int64),
        Type::FLOAT4 => row
            .try_get::<_, Option<f32>>(i)
            .map_err(bad)?
            .map(|v| Value::Float64(v.into())),
        Type::FLOAT8 => row
            .try_get::<_, Option<f64>>(i)
            .map_err(bad)?
            .map(Value::Float64),
        Type::BYTEA => row
            .try_get::<_, Option<Vec<u8>>>(i)
            .map_err(bad)?
            .map(Value::Bytes),
        Type::JSON | Type::JSONB => row
            .try_get::<_, Option<serde_json::Value>>(i)
            .map_err(bad)?
            .map(|v| Value::Json(v.to_string())),
        ref t if <String as tokio_postgres::types::FromSql>::accepts(t) => row
            .try_get::<_, Option<String>>(i)
            .map_err(bad)?
            .map(Value::Text),
        t => {
            return Err(HostError::Invalid(format!(
                "column {:?} has type {t}, which the postgres interface does not carry; \
                 cast it in SQL (e.g. `::text`)",
                row.columns()[i].name()
            )))
        }
    };
    let value = value.unwrap_or(Value::Null);
    let size = match &value {
        Value::Text(s) | Value::Json(s) => s.len(),
        Value::Bytes(b) => b.len(),
        _ => 8,
    };
    Ok((value, size))
}

/// Refuse SQL that opens or ends a transaction itself (see module docs).
fn check_sql(sql: &str) -> Result<(), HostError> {
    limits::check_name("SQL statement", sql, limits::MAX_VALUE_BYTES)
        .map_err(HostError::Invalid)?;
    let first = sql
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("")
        .to_ascii_uppercase();
    if matches!(
        first.as_str(),
        "BEGIN" | "START" | "COMMIT" | "END" | "ROLLBACK" | "ABORT" | "PREPARE"
    ) {
        return Err(HostError::Invalid(format!(
            "{first} in SQL: use the connection's begin, commit and rollback"
        )));
    }
    Ok(())
}

fn db_error(e: tokio_postgres::Error) -> HostError {
    // The server's message (constraint, syntax, lock timeout, ...): the
    // guest's to handle. Values are not echoed by PostgreSQL errors for
    // parameters, and the URL is never part of them.
    let text = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        // The driver's own errors ("error serializing parameter 0")
        // say why only in their source.
        None => error_chain(&e),
    };
    HostError::Invalid(text)
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
        check_sql(sql)?;
        let started = Instant::now();
        let conn = self.conn(c)?;
        let client = conn
            .client
            .as_ref()
            .ok_or_else(|| HostError::Invalid("connection is closed".into()))?;
        conn.busy = true;
        let result: Result<(Option<Rows>, u64), HostError> = async {
            let statement = client.prepare_cached(sql).await.map_err(db_error)?;
            let params: Vec<Param<'_>> = params.iter().map(Param).collect();
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
            let (mut rows, mut bytes) = (Vec::new(), 0usize);
            while let Some(row) = stream.try_next().await.map_err(db_error)? {
                if rows.len() >= limits::MAX_DB_ROWS {
                    return Err(HostError::Invalid(format!(
                        "query returned more than {} rows; add a LIMIT",
                        limits::MAX_DB_ROWS
                    )));
                }
                let mut values = Vec::with_capacity(row.len());
                for i in 0..row.len() {
                    let (value, size) = column(&row, i)?;
                    bytes += size;
                    values.push(value);
                }
                if bytes > limits::MAX_DB_RESULT_BYTES {
                    return Err(HostError::Invalid(format!(
                        "query returned more than {} bytes; select less",
                        limits::MAX_DB_RESULT_BYTES
                    )));
                }
                rows.push(values);
            }
            let n = rows.len() as u64;
            Ok((Some(Rows { columns, rows }), n))
        }
        .await;
        // Reached only when the call finished: a run dropped mid-call
        // leaves `busy` set, and the drop cancels the statement.
        self.conn(c)?.busy = false;
        self.databases.time_us += started.elapsed().as_micros() as u64;
        if let Ok((Some(_), n)) = &result {
            self.databases.rows += n;
        }
        result
    }

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
        let client = conn
            .client
            .as_ref()
            .ok_or_else(|| HostError::Invalid("connection is closed".into()))?;
        // Marked open before BEGIN is sent: if the run is dropped while it
        // is in flight, the drop rolls back.
        conn.in_tx = true;
        conn.busy = true;
        let result = client.batch_execute(sql).await.map_err(db_error);
        let conn = self.conn(c)?;
        conn.busy = false;
        conn.in_tx = result.is_err() || open;
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
        let (pool, tls) = self
            .databases
            .pools
            .pool(&self.scope.tenant, &name, &url)
            .map_err(HostError::Invalid)?;
        let started = Instant::now();
        let client = pool.get().await.map_err(|e| {
            // The database refusing or unreachable, or its certificate
            // not passing: not the task's doing.
            unavailable(
                self,
                format!("connecting to database {name}: {}", error_chain(&e)),
            )
        })?;
        self.databases.time_us += started.elapsed().as_micros() as u64;
        self.databases.opened += 1;
        self.table
            .push(Connection {
                client: Some(client),
                tls,
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
