//! Redis ACL users that confine a producer to its own tenant (`wasmq tenant
//! acl`). See docs/security.md for what they do and do not protect.
//!
//! A producer enqueues (the `ENQUEUE` script, and `FLOW_SUBMIT` for a
//! workflow), reads results (`HMGET`,
//! `GET`, `BLMOVE` on `done:ID`) and reads status (`HGETALL`, `LRANGE`).
//! The user gets exactly the commands those paths send, on exactly the key
//! kinds they touch, all under the tenant's prefix:
//!
//! - read only: `task:*` (the enqueue looks up the task), `tenant` (its
//!   quotas), `result:*`, `history:*`;
//! - read and write: `job:*` (the enqueue, and the `notify` mark of
//!   `result --wait`), `flow:*` and `flows-waiting` (a workflow's record,
//!   what its waiting steps wait for, and `flow --wait`), `idem:*`, `idem-index`, `done:*`,
//!   and the `ready`,
//!   `delayed`, `signal`, `seq` and `flow-waiting` keys of the queues of the tenant's
//!   deployed tasks only (named one by one when the ACL is made: a producer
//!   cannot put a job on a queue no task of its tenant is deployed to; a
//!   deploy to a new queue says to make the ACL again).
//!
//! Nothing else: not `component:*`, `tasks` or writes to `task:*` (a
//! producer cannot deploy, and so cannot grant itself directories or hosts),
//! not the guests' `kv`, `counter`, `lock`, `fence` and `step` keys, not
//! `dead` or `queue:*:leased`.
//!
//! Invariants this relies on (checked by tests/tenant_acl.rs against a real
//! Redis 7):
//! - Redis checks every key a script declares in `KEYS` against the key
//!   patterns, and (since Redis 7.0) every command and key a script runs
//!   through `redis.call`, as the calling user. So `EVAL` of any Lua is
//!   confined like the commands it runs.
//! - `ENQUEUE` declares every key it touches. Without an idempotency key its
//!   fifth key is the empty string, which no tenant pattern matches; one ACL
//!   selector allows declaring `""` to `EVAL`/`EVALSHA` only, so no command
//!   can read or write a key named `""` (it would be shared by all tenants).
//! - Tenant names are `[a-z0-9_-]` ([`valid_tenant`]), so the prefix holds no
//!   glob characters (`* ? [ ] \`); braces are literal in Redis patterns.

use redis::aio::ConnectionLike;
use sha2::{Digest, Sha256};

use crate::keys::{valid_tenant, Keys};

/// Prefix of producer user names; the tenant name follows.
pub const PRODUCER_USER_PREFIX: &str = "wasmq-producer-";

/// Commands a producer's connection sends while being set up.
const CONNECTION_COMMANDS: &[&str] = &["auth", "hello", "ping"];
/// Commands `Broker::task`, `Broker::result`, `Broker::status` and
/// `Broker::flow_state` send.
const READ_COMMANDS: &[&str] = &[
    "hget", "hmget", "hgetall", "get", "lrange", "blmove", "smembers",
];
/// How the enqueue script is run: redis-rs sends `EVALSHA` and, on
/// `NOSCRIPT`, `SCRIPT LOAD` then `EVALSHA`; producers in other languages
/// send `EVAL` (docs/redis-layout.md).
const SCRIPT_COMMANDS: &[&str] = &["eval", "evalsha", "script|load"];
/// The commands `ENQUEUE` and `WATCH_RESULT` run inside Redis; checked
/// against the calling user, so they must be granted (on the same key
/// patterns).
const ENQUEUE_COMMANDS: &[&str] = &[
    "set",
    "incr",
    "time",
    "hset",
    "zadd",
    "lpush",
    "ltrim",
    "exists",
    "zremrangebyscore",
    "zcard",
    // `FLOW_SUBMIT`: the set of what a waiting step waits for.
    "sadd",
];
/// The by-hand enqueue (MULTI/EXEC, docs/redis-layout.md) for producers
/// that do not run scripts; the queued commands are checked one by one.
const TRANSACTION_COMMANDS: &[&str] = &["multi", "exec", "discard"];

/// The Redis user name of tenant `tenant`'s producers.
pub fn producer_user(tenant: &str) -> String {
    format!("{PRODUCER_USER_PREFIX}{tenant}")
}

/// The ACL of one tenant's producer user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerAcl {
    /// Tenant it is confined to.
    pub tenant: String,
    /// Redis user name (`wasmq-producer-TENANT`).
    pub user: String,
    /// Key patterns the user may only read.
    pub read_keys: Vec<String>,
    /// Key patterns the user may read and write.
    pub write_keys: Vec<String>,
    /// Commands (and `command|subcommand`s) granted on top of `-@all`.
    pub commands: Vec<&'static str>,
    /// The queues it may put jobs on.
    pub queues: Vec<String>,
}

impl ProducerAcl {
    /// The producer ACL of `tenant`, whose tasks are deployed to `queues`;
    /// fails on an invalid tenant or queue name.
    pub fn new(tenant: &str, queues: &[String]) -> Result<Self, String> {
        valid_tenant(tenant)?;
        let keys = Keys::new(tenant);
        // Patterns are built by the key builder itself, with `*` for the
        // variable part, so they cannot drift from the keys the code uses.
        let read_keys = vec![
            keys.task("*"),
            keys.tenant(),
            keys.result("*"),
            keys.history("*"),
        ];
        let mut write_keys = vec![
            keys.job("*"),
            keys.flow("*"),
            keys.flows_waiting(),
            keys.idempotency_pattern(),
            keys.idempotency_index(),
            keys.done("*"),
        ];
        let mut queues: Vec<String> = queues.to_vec();
        queues.sort();
        queues.dedup();
        for queue in &queues {
            // Queue names go into patterns: no glob characters.
            if queue.is_empty() || queue.contains(['*', '?', '[', ']', '\\']) {
                return Err(format!(
                    "queue name {queue:?} cannot go into an ACL pattern (no * ? [ ] \\)"
                ));
            }
            write_keys.extend([
                keys.ready(queue),
                keys.delayed(queue),
                keys.signal(queue),
                keys.seq(queue),
                keys.flow_waiting(queue),
            ]);
        }
        let commands = [
            CONNECTION_COMMANDS,
            READ_COMMANDS,
            SCRIPT_COMMANDS,
            ENQUEUE_COMMANDS,
            TRANSACTION_COMMANDS,
        ]
        .concat();
        Ok(ProducerAcl {
            tenant: tenant.to_string(),
            user: producer_user(tenant),
            read_keys,
            write_keys,
            commands,
            queues,
        })
    }

    /// The rules after `ACL SETUSER USER`, with the password given as its
    /// SHA-256 (`#HEX`), so printed rules never hold the password itself.
    /// `reset` first: applying twice gives the same user, and nothing a
    /// previous version of the user had survives.
    pub fn rules(&self, password: &str) -> Vec<String> {
        let hash = hex::encode(Sha256::digest(password.as_bytes()));
        let mut rules = vec![
            "reset".to_string(),
            "on".to_string(),
            format!("#{hash}"),
            "resetchannels".to_string(),
            "-@all".to_string(),
        ];
        rules.extend(self.read_keys.iter().map(|p| format!("%R~{p}")));
        rules.extend(self.write_keys.iter().map(|p| format!("~{p}")));
        rules.extend(self.commands.iter().map(|c| format!("+{c}")));
        // The selector that lets a script declare the empty key (ENQUEUE's
        // "no idempotency key"): only EVAL/EVALSHA, so no command inside the
        // script may touch it.
        let mut selector: Vec<String> = self.write_keys.iter().map(|p| format!("~{p}")).collect();
        selector.push("~".to_string());
        selector.extend(["+eval", "+evalsha"].map(String::from));
        rules.push(format!("({})", selector.join(" ")));
        rules
    }

    /// The `redis-cli` command that installs the user, preceded by `#`
    /// comment lines saying what it allows and what it does not.
    pub fn script(&self, password: &str) -> String {
        let mut out = format!(
            "# Redis ACL user for producers of wasmq tenant {:?} (Redis 7.0 or later).\n\
             # Allows: enqueue (the ENQUEUE script or MULTI/EXEC), result, status, on keys\n\
             # under {:?} only, on the queues of its deployed tasks ({}); read-only on\n\
             # task:*, tenant, result:* and history:*. Deploying to a new queue: make it again.\n\
             # Denies: other tenants' keys, deploys (component:*, tasks, writing task:*),\n\
             # guest state (kv, counter, lock, fence, step), dead, queue:*:leased, and every\n\
             # other command (KEYS, SCAN, FLUSHALL, CONFIG, ACL, SCRIPT FLUSH/KILL, ...).\n\
             # Caveats (docs/security.md): EVAL runs any Lua; Redis 7 checks each command and\n\
             # key the script runs against this user, so it stays inside the patterns, but a\n\
             # script that loops blocks the whole Redis. Inside its tenant a producer can\n\
             # rewrite its own jobs' records and queues.\n\
             # Run the ACL SETUSER line in redis-cli as an admin, or use --apply.\n",
            self.tenant,
            Keys::new(&self.tenant).prefix(),
            if self.queues.is_empty() {
                "none yet".to_string()
            } else {
                self.queues.join(", ")
            },
        );
        out.push_str(&format!("ACL SETUSER {}", self.user));
        for rule in self.rules(password) {
            out.push(' ');
            if rule.contains(' ') {
                out.push_str(&format!("\"{rule}\""));
            } else {
                out.push_str(&rule);
            }
        }
        out.push('\n');
        out
    }

    /// Install (or replace) the user, over an admin connection.
    pub async fn apply<C: ConnectionLike>(
        &self,
        conn: &mut C,
        password: &str,
    ) -> anyhow::Result<()> {
        use anyhow::Context;
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&self.user)
            .arg(self.rules(password))
            .query_async::<()>(conn)
            .await
            .with_context(|| format!("ACL SETUSER {} (Redis 7.0 or later is needed)", self.user))
    }
}

/// A fresh random password: 32 hex characters (128 bits).
pub fn random_password() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_stay_in_the_tenant() {
        let acl = ProducerAcl::new("acme", &["default".into(), "email".into()]).unwrap();
        assert_eq!(acl.user, "wasmq-producer-acme");
        for p in acl.read_keys.iter().chain(&acl.write_keys) {
            assert!(p.starts_with("wasmq:{acme}:"), "{p}");
        }
        assert!(acl
            .write_keys
            .contains(&"wasmq:{acme}:queue:email:ready".to_string()));
        assert!(!acl.write_keys.iter().any(|p| p.contains("queue:*")));
        assert!(!acl.write_keys.iter().any(|p| p.contains("leased")));
        let rules = acl.rules("pw");
        assert_eq!(rules[0], "reset");
        assert!(!rules
            .iter()
            .any(|r| r.contains("pw") && !r.starts_with('#')));
        assert!(ProducerAcl::new("a*", &[]).is_err());
        assert!(ProducerAcl::new("a}b", &[]).is_err());
        assert!(ProducerAcl::new("a", &["q*".into()]).is_err());
    }
}
