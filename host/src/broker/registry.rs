//! The records a worker reads to run a job: deployed tasks, tenants'
//! caps and component bytes. Read-only; written by [`super::admin`].
//! The producer reads a task record here too (to find its queue and caps).

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use super::Broker;
use crate::keys::Keys;
use crate::policy::TaskPolicy;
use crate::tenants::Tenant;

/// A deployed task version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployedTask {
    /// Task name.
    pub name: String,
    /// sha256 of the component (its version).
    pub hash: String,
    /// Its policy.
    pub policy: TaskPolicy,
    /// When it was deployed (unix ms).
    pub deployed_at_ms: u64,
}

impl Broker {
    /// A tenant's record, if one was created.
    pub async fn tenant(&self, tenant: &str) -> anyhow::Result<Option<Tenant>> {
        let spec: Option<String> = self
            .connection()
            .hget(Keys::new(tenant).tenant(), "spec")
            .await?;
        spec.map(|s| serde_json::from_str(&s).map_err(anyhow::Error::from))
            .transpose()
    }

    /// A deployed task, if any.
    pub async fn task(&self, tenant: &str, name: &str) -> anyhow::Result<Option<DeployedTask>> {
        let spec: Option<String> = self
            .connection()
            .hget(Keys::new(tenant).task(name), "spec")
            .await?;
        spec.map(|s| serde_json::from_str(&s).map_err(anyhow::Error::from))
            .transpose()
    }

    /// A component's size by hash, without fetching it; 0 if it is missing.
    pub async fn component_size(&self, tenant: &str, hash: &str) -> anyhow::Result<u64> {
        Ok(self
            .connection()
            .strlen(Keys::new(tenant).component(hash))
            .await?)
    }

    /// A component's bytes by hash.
    pub async fn component(&self, tenant: &str, hash: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self
            .connection()
            .get(Keys::new(tenant).component(hash))
            .await?)
    }

    /// A deployed task and its tenant's record, in one round trip (what an
    /// enqueue needs).
    pub async fn task_and_tenant(
        &self,
        tenant: &str,
        name: &str,
    ) -> anyhow::Result<(Option<DeployedTask>, Option<Tenant>)> {
        let keys = Keys::new(tenant);
        let (task, record): (Option<String>, Option<String>) = redis::pipe()
            .hget(keys.task(name), "spec")
            .hget(keys.tenant(), "spec")
            .query_async(&mut self.connection())
            .await?;
        Ok((
            task.map(|s| serde_json::from_str(&s)).transpose()?,
            record.map(|s| serde_json::from_str(&s)).transpose()?,
        ))
    }
}
