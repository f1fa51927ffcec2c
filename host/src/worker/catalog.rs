//! What a job needs that changes rarely, read from Redis and kept for a
//! short while: deployed task records, tenant records (caps), and compiled
//! components.
//!
//! Records are trusted for [`RECORD_TTL`], so a redeploy or a changed cap
//! reaches workers within that time without a Redis read per job. A
//! component over its tenant's current size cap is refused on every job,
//! before it is fetched or compiled. Otherwise it is fetched by its content
//! hash, checked against it, and compiled once per process, off the
//! runtime and within the compile budget (`sandbox::compiler`); the
//! on-disk cache shares it with other processes of the same engine
//! settings.

use std::sync::Arc;
use std::time::Duration;

use crate::broker::{Broker, DeployedTask};
use crate::failure::{Category, Failure};
use crate::sandbox::{PreparedTask, Sandbox};
use crate::tenants::{component_refusal, Tenant};
use crate::ttl_cache::TtlCache;

/// How long a deployed task's or a tenant's record is trusted before it is
/// read again (a redeploy or a new cap reaches workers within this).
pub const RECORD_TTL: Duration = Duration::from_secs(1);

/// See the module docs.
pub struct Catalog {
    broker: Broker,
    sandbox: Arc<Sandbox>,
    /// Deployed tasks by (tenant, name).
    tasks: TtlCache<(String, String), Arc<DeployedTask>>,
    /// Tenant records (caps) by name; `None` for a tenant without one.
    tenants: TtlCache<String, Option<Arc<Tenant>>>,
}

impl Catalog {
    /// A catalog reading from `broker`, compiling into `sandbox`.
    pub fn new(broker: Broker, sandbox: Arc<Sandbox>) -> Self {
        Catalog {
            broker,
            sandbox,
            tasks: TtlCache::new(RECORD_TTL),
            tenants: TtlCache::new(RECORD_TTL),
        }
    }

    /// The sandbox components are compiled into.
    pub fn sandbox(&self) -> &Arc<Sandbox> {
        &self.sandbox
    }

    /// A tenant's record, if it has one.
    pub async fn tenant(&self, tenant: &str) -> anyhow::Result<Option<Arc<Tenant>>> {
        if let Some(record) = self.tenants.get(tenant) {
            return Ok(record);
        }
        let record = self.broker.tenant(tenant).await?.map(Arc::new);
        self.tenants.put(tenant.to_string(), record.clone());
        Ok(record)
    }

    /// A deployed task of `tenant`, if one of that name is deployed.
    pub async fn task(
        &self,
        tenant: &str,
        name: &str,
    ) -> anyhow::Result<Option<Arc<DeployedTask>>> {
        let key = (tenant.to_string(), name.to_string());
        if let Some(task) = self.tasks.get(&key) {
            return Ok(Some(task));
        }
        let task = self.broker.task(tenant, name).await?.map(Arc::new);
        if let Some(t) = &task {
            self.tasks.put(key, t.clone());
        }
        Ok(task)
    }

    /// The compiled task version: size-checked against the tenant's
    /// current cap, fetched by hash, verified, compiled once.
    pub async fn prepared(
        &self,
        tenant: &str,
        task: &DeployedTask,
    ) -> Result<PreparedTask, Failure> {
        let unavailable = |m: String| Failure::new(Category::TaskError, m);
        let record = self
            .tenant(tenant)
            .await
            .map_err(|e| unavailable(format!("reading the tenant's caps failed: {e:#}")))?;
        let fits = |size: u64| match component_refusal(
            tenant,
            record.as_ref().map(|r| &r.limits),
            size,
            self.sandbox.compile_settings().default_max_component_bytes,
        ) {
            Some(refusal) => Err(Failure::new(Category::InvalidComponent, refusal)),
            None => Ok(()),
        };
        if let Some(p) = self.sandbox.cached(&task.hash) {
            fits(p.component_bytes)?;
            return Ok(p);
        }
        let size = self
            .broker
            .component_size(tenant, &task.hash)
            .await
            .map_err(|e| {
                unavailable(format!(
                    "reading the size of component {}: {e:#}",
                    task.hash
                ))
            })?;
        if size == 0 {
            return Err(missing(task));
        }
        fits(size)?;
        let fetch = fetch_verified(self.broker.clone(), tenant.to_string(), task.clone());
        self.sandbox.prepare_once(&task.hash, fetch).await
    }
}

/// A component's bytes, checked against its hash (for the one job that
/// starts its compile: see `Sandbox::prepare_once`).
async fn fetch_verified(
    broker: Broker,
    tenant: String,
    task: DeployedTask,
) -> Result<Vec<u8>, Failure> {
    // A component can be megabytes: fetched on a connection of its own (a
    // compile happens once per version), so it does not queue in front of
    // the leases and outcomes on the shared one.
    let unavailable = |e: String| {
        Failure::new(
            Category::TaskError,
            format!("fetching component {}: {e}", task.hash),
        )
    };
    let conn = broker
        .new_connection()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let bytes = broker
        .on_connection(conn)
        .component(&tenant, &task.hash)
        .await
        .map_err(|e| {
            Failure::new(
                Category::TaskError,
                format!("fetching component {}: {e:#}", task.hash),
            )
        })?
        .ok_or_else(|| missing(&task))?;
    let actual = crate::component::content_hash(&bytes);
    if actual != task.hash {
        return Err(Failure::new(
            Category::InvalidComponent,
            format!("component of task {:?} does not match its hash (expected {}, got {actual}); redeploy it", task.name, task.hash),
        ));
    }
    Ok(bytes)
}

fn missing(task: &DeployedTask) -> Failure {
    Failure::new(
        Category::InvalidComponent,
        format!(
            "component {} of task {:?} is missing from Redis",
            task.hash, task.name
        ),
    )
}
