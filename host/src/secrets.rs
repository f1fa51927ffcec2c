//! Secrets: names, where a value is filed, and sealing values at rest.
//!
//! A secret belongs to a tenant, for all its tasks or for one task
//! (`wasmq secret set NAME [--task TASK]`), and is stored in the tenant's
//! `secrets` hash ([`crate::keys::Keys::secrets`]) under a *field*: `NAME`
//! for the tenant, `NAME/TASK` for one task (a name holds no `/`, so the
//! two never collide). A task reads a secret only when its policy grants
//! the name; a task-scoped value wins over the tenant's.
//!
//! Values are sealed with AES-256-GCM under the key the workers and the
//! operator's CLI hold ([`SecretsKey`]: `WASMQ_SECRETS_KEY` or the file
//! named by `WASMQ_SECRETS_KEY_FILE`); Redis only ever holds
//! `v1.KEYID.HEX(nonce || ciphertext || tag)`. The associated data binds a
//! sealed value to its tenant and field, so a ciphertext copied to another
//! tenant's hash, or to another name, does not open. The key id (the first
//! 8 hex digits of the key's SHA-256) lets an error say which key a value
//! was sealed with, never the key. See docs/security.md for what this
//! protects and what stays trusted.
//!
//! Nothing here logs; [`SecretsKey`]'s `Debug` shows its id only.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use sha2::{Digest, Sha256};

use crate::limits::{MAX_SECRET_BYTES, MAX_SECRET_NAME_BYTES};

/// Environment variable holding the key: 64 hex digits (32 bytes).
pub const KEY_ENV: &str = "WASMQ_SECRETS_KEY";
/// Environment variable naming a file that holds the key (64 hex digits;
/// surrounding whitespace ignored). Preferred over [`KEY_ENV`]: a file's
/// permissions can keep it from other users, an environment cannot.
pub const KEY_FILE_ENV: &str = "WASMQ_SECRETS_KEY_FILE";
/// Names starting with this are database URLs (`database:app` for the
/// database `app`): the `postgres` interface reads them, `config::get`
/// never hands them out.
pub const DATABASE_PREFIX: &str = "database:";
/// The sealed format's version tag.
const VERSION: &str = "v1";

/// Whether `name` may name a secret: 1 to [`MAX_SECRET_NAME_BYTES`] of
/// `[A-Za-z0-9_.:-]`. No `/` (it separates the task in a field), no braces
/// or `*` (nothing that could read as another tenant's key or a pattern).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SECRET_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "secret name {:?} is invalid: use 1-{MAX_SECRET_NAME_BYTES} characters of \
             A-Z, a-z, 0-9, '_', '.', ':' and '-'",
            truncated(name)
        ))
    }
}

/// The first 64 characters of `name`, for an error message.
fn truncated(name: &str) -> &str {
    let mut end = name.len().min(64);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// The hash field a secret is filed under: `NAME` (the tenant's) or
/// `NAME/TASK` (one task's).
pub fn field(name: &str, task: Option<&str>) -> String {
    match task {
        Some(task) => format!("{name}/{task}"),
        None => name.to_string(),
    }
}

/// The fields `task` reads secret `name` from, in order: its own value
/// wins over its tenant's. Every backend looks them up this way.
pub fn lookup_fields(name: &str, task: &str) -> [String; 2] {
    [field(name, Some(task)), field(name, None)]
}

/// A field split back into its name and task.
pub fn parse_field(field: &str) -> (&str, Option<&str>) {
    match field.split_once('/') {
        Some((name, task)) => (name, Some(task)),
        None => (field, None),
    }
}

/// The key id of a sealed value (`v1.KEYID.…`), if it has the shape.
pub fn sealed_key_id(sealed: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(sealed).ok()?;
    let mut parts = text.splitn(3, '.');
    (parts.next()? == VERSION).then_some(())?;
    parts.next()
}

/// The key secrets are sealed with. See the module docs.
pub struct SecretsKey {
    key: LessSafeKey,
    id: String,
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretsKey({})", self.id)
    }
}

impl SecretsKey {
    /// A key from 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let bytes = hex::decode(text.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| {
                "a secrets key is 64 hex digits (32 bytes); make one with `wasmq secret keygen`"
                    .to_string()
            })?;
        let id = hex::encode(&Sha256::digest(&bytes)[..4]);
        let key = UnboundKey::new(&AES_256_GCM, &bytes)
            .map_err(|_| "the secrets key was refused by AES-256-GCM".to_string())?;
        Ok(SecretsKey {
            key: LessSafeKey::new(key),
            id,
        })
    }

    /// A fresh random key, as 64 hex digits.
    pub fn generate_hex() -> String {
        hex::encode(rand::random::<[u8; 32]>())
    }

    /// The key from [`KEY_FILE_ENV`] (a file) or else [`KEY_ENV`]; `None`
    /// when neither is set. An error names the variable and the problem.
    pub fn from_env() -> Result<Option<Self>, String> {
        if let Some(path) = std::env::var_os(KEY_FILE_ENV).filter(|p| !p.is_empty()) {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                format!(
                    "{KEY_FILE_ENV}={}: cannot read the secrets key: {e}",
                    std::path::Path::new(&path).display()
                )
            })?;
            return Self::from_hex(&text)
                .map(Some)
                .map_err(|e| format!("{KEY_FILE_ENV}: {e}"));
        }
        match std::env::var(KEY_ENV) {
            Ok(text) if !text.is_empty() => Self::from_hex(&text)
                .map(Some)
                .map_err(|e| format!("{KEY_ENV}: {e}")),
            _ => Ok(None),
        }
    }

    /// The key's id: the first 8 hex digits of its SHA-256 (safe to show).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Seal `value` for `tenant`'s `field` (see [`field`]).
    pub fn seal(&self, tenant: &str, field: &str, value: &[u8]) -> Result<Vec<u8>, String> {
        crate::limits::check_len("secret value", value.len(), MAX_SECRET_BYTES)?;
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut in_out = value.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(aad(tenant, field)),
                &mut in_out,
            )
            .map_err(|_| "sealing the secret failed".to_string())?;
        let mut sealed = nonce_bytes.to_vec();
        sealed.extend_from_slice(&in_out);
        Ok(format!("{VERSION}.{}.{}", self.id, hex::encode(sealed)).into_bytes())
    }

    /// Open what [`SecretsKey::seal`] made for `tenant`'s `field`. Fails,
    /// naming the field and never the value, when it was sealed with
    /// another key, for another tenant or field, or was changed.
    pub fn open(&self, tenant: &str, field: &str, sealed: &[u8]) -> Result<Vec<u8>, String> {
        let bad =
            |why: &str| format!("secret {field:?} of tenant {tenant} cannot be opened: {why}");
        let text = std::str::from_utf8(sealed).map_err(|_| bad("not a sealed value"))?;
        let mut parts = text.splitn(3, '.');
        let (version, id, body) = match (parts.next(), parts.next(), parts.next()) {
            (Some(v), Some(id), Some(body)) => (v, id, body),
            _ => return Err(bad("not a sealed value")),
        };
        if version != VERSION {
            return Err(bad(&format!("unknown format {version:?}")));
        }
        if id != self.id {
            return Err(bad(&format!(
                "it was sealed with key {id}, this process holds key {}; set it again \
                 with the workers' key",
                self.id
            )));
        }
        let mut bytes = hex::decode(body).map_err(|_| bad("not a sealed value"))?;
        if bytes.len() < NONCE_LEN {
            return Err(bad("not a sealed value"));
        }
        let mut in_out = bytes.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&bytes).map_err(|_| bad("bad nonce"))?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad(tenant, field)), &mut in_out)
            .map_err(|_| {
                bad("it does not authenticate (sealed for another tenant or name, or changed)")
            })?;
        Ok(plain.to_vec())
    }
}

/// What a sealed value is bound to: its tenant and field.
fn aad(tenant: &str, field: &str) -> Vec<u8> {
    format!("wasmq-secret-{VERSION}\n{tenant}\n{field}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretsKey {
        SecretsKey::from_hex(&SecretsKey::generate_hex()).unwrap()
    }

    #[test]
    fn a_sealed_value_opens_only_where_it_was_sealed() {
        let k = key();
        let sealed = k.seal("acme", "mail_api_key", b"hunter2").unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("hunter2"));
        assert_eq!(sealed_key_id(&sealed), Some(k.id()));
        assert_eq!(k.open("acme", "mail_api_key", &sealed).unwrap(), b"hunter2");
        // Another tenant, another name, another task scope: refused.
        for (tenant, field) in [
            ("other", "mail_api_key"),
            ("acme", "other_key"),
            ("acme", "mail_api_key/onboard"),
        ] {
            let err = k.open(tenant, field, &sealed).unwrap_err();
            assert!(err.contains("does not authenticate"), "{err}");
            assert!(!err.contains("hunter2"));
        }
        // Another key: named by id.
        let err = key().open("acme", "mail_api_key", &sealed).unwrap_err();
        assert!(
            err.contains(&format!("sealed with key {}", k.id())),
            "{err}"
        );
        // Tampered.
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] = if bad[last] == b'0' { b'1' } else { b'0' };
        assert!(k.open("acme", "mail_api_key", &bad).is_err());
    }

    #[test]
    fn names_and_fields() {
        for ok in ["mail_api_key", "database:app", "A.b-c"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "a/b", "wasmq:{other}:secrets", "a b", "*", "é"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_field(&field("k", Some("t/x"))), ("k", Some("t/x")));
        assert_eq!(parse_field(&field("k", None)), ("k", None));
        assert!(SecretsKey::from_hex("abcd").is_err());
        assert!(format!("{:?}", key()).starts_with("SecretsKey("));
    }
}
