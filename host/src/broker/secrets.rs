//! A tenant's sealed secrets in Redis (`wasmq secret set|list|remove`).
//!
//! The broker stores and lists what it is given and never sees a value:
//! the CLI seals it first with the secrets key ([`crate::secrets`]), and
//! only workers open it. Every secret of a tenant is a field of its one
//! `secrets` hash, under its hash tag.

use redis::AsyncCommands;

use super::Broker;
use crate::keys::Keys;
use crate::secrets;

/// A stored secret as `secret list` shows it: never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretEntry {
    /// The secret's name.
    pub name: String,
    /// The task it is for; `None`: every task of the tenant.
    pub task: Option<String>,
    /// Id of the key it was sealed with.
    pub key_id: Option<String>,
}

impl Broker {
    /// Store `sealed` as secret `name` of `tenant` (for `task` only, if
    /// given), replacing any value it had.
    pub async fn secret_put(
        &self,
        tenant: &str,
        name: &str,
        task: Option<&str>,
        sealed: &[u8],
    ) -> anyhow::Result<()> {
        let _: i64 = self
            .connection()
            .hset(
                Keys::new(tenant).secrets(),
                secrets::field(name, task),
                sealed,
            )
            .await?;
        Ok(())
    }

    /// Remove secret `name` of `tenant` (for `task` only, if given); false
    /// when it was not set.
    pub async fn secret_remove(
        &self,
        tenant: &str,
        name: &str,
        task: Option<&str>,
    ) -> anyhow::Result<bool> {
        let removed: i64 = self
            .connection()
            .hdel(Keys::new(tenant).secrets(), secrets::field(name, task))
            .await?;
        Ok(removed > 0)
    }

    /// Every secret of `tenant`, by name then task (tenant-wide first).
    pub async fn secret_list(&self, tenant: &str) -> anyhow::Result<Vec<SecretEntry>> {
        let all: Vec<(String, Vec<u8>)> = self
            .connection()
            .hgetall(Keys::new(tenant).secrets())
            .await?;
        let mut entries: Vec<SecretEntry> = all
            .into_iter()
            .map(|(field, sealed)| {
                let (name, task) = secrets::parse_field(&field);
                SecretEntry {
                    name: name.to_string(),
                    task: task.map(str::to_string),
                    key_id: secrets::sealed_key_id(&sealed).map(str::to_string),
                }
            })
            .collect();
        entries.sort_by(|a, b| (&a.name, &a.task).cmp(&(&b.name, &b.task)));
        Ok(entries)
    }
}
