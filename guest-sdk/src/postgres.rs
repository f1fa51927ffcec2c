//! PostgreSQL, by a database name the task's policy grants
//! (`databases = ["app"]` under `[sandbox]`; the URL is the tenant's
//! secret `database:app` and never reaches the task).
//!
//! Parameters are passed apart from the SQL (`$1`, `$2`, ...): no value is
//! ever spliced into a statement. A transaction still open when the
//! connection is dropped or the job ends (returns, traps, times out, is
//! cancelled) is rolled back by the host.
//!
//! ```no_run
//! use wasmq_guest::postgres::{Connection, Value};
//! use wasmq_guest::{Job, TaskError};
//!
//! #[wasmq_guest::task]
//! fn run(_job: &Job, user_id: i64) -> Result<bool, TaskError> {
//!     let db = Connection::open("app")?;
//!     db.begin()?;
//!     let rows = db.query("SELECT onboarded FROM users WHERE id = $1 FOR UPDATE", &[Value::Int64(user_id)])?;
//!     // No such user, or already onboarded: nothing to do.
//!     if !matches!(rows.rows.first().map(|r| &r[0]), Some(Value::Boolean(false))) {
//!         return Ok(false); // dropped: rolled back
//!     }
//!     db.execute("UPDATE users SET onboarded = true WHERE id = $1", &[Value::Int64(user_id)])?;
//!     db.commit()?;
//!     Ok(true)
//! }
//! ```

use crate::bindings::wasmq::task0_2_0::postgres as wit;
use crate::HostError;

pub use wit::{Rows, Value};

/// A connection from the worker's pool, for this job.
pub struct Connection(wit::Connection);

impl Connection {
    /// Open database `name`; `Denied` unless the policy grants it.
    pub fn open(name: &str) -> Result<Connection, HostError> {
        Ok(Connection(wit::Connection::open(name)?))
    }

    /// Run one statement; its rows.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows, HostError> {
        Ok(self.0.query(sql, params)?)
    }

    /// Run one statement; the number of rows it changed.
    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, HostError> {
        Ok(self.0.execute(sql, params)?)
    }

    /// Start a transaction.
    pub fn begin(&self) -> Result<(), HostError> {
        Ok(self.0.begin()?)
    }

    /// Commit the transaction.
    pub fn commit(&self) -> Result<(), HostError> {
        Ok(self.0.commit()?)
    }

    /// Roll the transaction back.
    pub fn rollback(&self) -> Result<(), HostError> {
        Ok(self.0.rollback()?)
    }
}
