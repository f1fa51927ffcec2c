//! A tenant's dashboard tokens (`wasmq web token ...`): a token lets its
//! holder see and act on one tenant in `wasmq web`, and nothing else.
//!
//! A token reads `wqt-TENANT.SECRET`: the tenant it belongs to, then 32
//! random bytes in hex. Only the SHA-256 of the whole token is stored,
//! in the tenant's own `web-tokens` hash (under its hash tag, see
//! [`crate::keys::Keys::web_tokens`]), so a check is one HGET and a leaked
//! Redis dump holds no usable token. The token is shown once, at creation.

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{now_ms, Broker};
use crate::keys::{valid_tenant, Keys};

/// What a token starts with.
const PREFIX: &str = "wqt-";

/// A stored token, as `wasmq web token list` shows it (never the token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebToken {
    /// Short id: the first 12 hex digits of the digest (what `revoke`
    /// takes).
    pub id: String,
    /// What the creator said it is for.
    pub note: String,
    /// Who created it (`user@host`).
    pub created_by: String,
    /// When (ms).
    pub created_at_ms: u64,
}

/// Hex SHA-256 of a token.
pub fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The tenant a token names, if it has the token shape (says nothing of
/// whether it is valid).
pub fn token_tenant(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(PREFIX)?;
    let (tenant, secret) = rest.split_once('.')?;
    (valid_tenant(tenant).is_ok() && secret.len() == 64).then_some(tenant)
}

impl Broker {
    /// Create a dashboard token for `tenant`; returns the token (to show
    /// once) and its stored record.
    pub async fn web_token_create(
        &self,
        tenant: &str,
        note: &str,
        who: &str,
    ) -> anyhow::Result<(String, WebToken)> {
        valid_tenant(tenant).map_err(anyhow::Error::msg)?;
        let token = format!(
            "{PREFIX}{tenant}.{}",
            hex::encode(rand::random::<[u8; 32]>())
        );
        let digest = token_digest(&token);
        let record = WebToken {
            id: digest[..12].to_string(),
            note: note.to_string(),
            created_by: who.to_string(),
            created_at_ms: now_ms(),
        };
        let _: i64 = self
            .connection()
            .hset(
                Keys::new(tenant).web_tokens(),
                &digest,
                serde_json::to_string(&record)?,
            )
            .await?;
        Ok((token, record))
    }

    /// The tenant's dashboard tokens, oldest first.
    pub async fn web_token_list(&self, tenant: &str) -> anyhow::Result<Vec<WebToken>> {
        let stored: std::collections::HashMap<String, String> = self
            .connection()
            .hgetall(Keys::new(tenant).web_tokens())
            .await?;
        let mut out: Vec<WebToken> = stored
            .values()
            .filter_map(|v| serde_json::from_str(v).ok())
            .collect();
        out.sort_by(|a, b| a.created_at_ms.cmp(&b.created_at_ms).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Revoke the tenant's token whose id is `id`; false if it has none.
    pub async fn web_token_revoke(&self, tenant: &str, id: &str) -> anyhow::Result<bool> {
        let key = Keys::new(tenant).web_tokens();
        let mut conn = self.connection();
        let digests: Vec<String> = conn.hkeys(&key).await?;
        let Some(digest) = digests.iter().find(|d| d.get(..12) == Some(id)) else {
            return Ok(false);
        };
        let removed: i64 = conn.hdel(&key, digest).await?;
        Ok(removed == 1)
    }

    /// Whether the tenant's token with SHA-256 `digest` (hex) is still
    /// stored, i.e. not revoked.
    pub async fn web_token_digest_live(&self, tenant: &str, digest: &str) -> anyhow::Result<bool> {
        Ok(self
            .connection()
            .hexists(Keys::new(tenant).web_tokens(), digest)
            .await?)
    }

    /// The tenant `token` lets its holder see, if it is a live token.
    pub async fn web_token_tenant(&self, token: &str) -> anyhow::Result<Option<String>> {
        let Some(tenant) = token_tenant(token) else {
            return Ok(None);
        };
        let known = self
            .web_token_digest_live(tenant, &token_digest(token))
            .await?;
        Ok(known.then(|| tenant.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_tenant() {
        let secret = "ab".repeat(32);
        assert_eq!(token_tenant(&format!("wqt-acme.{secret}")), Some("acme"));
        assert_eq!(token_tenant(&format!("wqt-a{{b}}.{secret}")), None);
        assert_eq!(token_tenant("wqt-acme.short"), None);
        assert_eq!(token_tenant("acme"), None);
    }
}
