//! Tenants as first-class objects: their caps, and the rule that a task's
//! policy may ask for less than its tenant's caps, never more.
//!
//! A tenant record is optional: a Redis with no record for a tenant runs it
//! uncapped (single-team use). Once a platform creates the tenant, deploys
//! that exceed a cap are refused with a message naming each excess, and
//! workers clamp every job to the tenant's *current* caps, so lowering a cap
//! takes effect without redeploying.
//!
//! Directory grants are refused, never dropped: a grant outside the
//! tenant's directories (`..`, not beneath an `--allow-dir`, a symlink out
//! of one) or a writable grant without a disk quota fails the deploy, and
//! fails a job `denied` if the record changed (or the task record was
//! written by hand) since ([`TenantLimits::grant_refusal`]; the worker opens
//! grants beneath the caps, see [`crate::dir_caps`]).
//!
//! The component size cap applies to tenants without a record too: a tenant
//! without its own cap gets the engine's default (`engine.rs`), because
//! compiling a big component costs the workers, not the tenant.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::dir_caps::{self, OpenError};
use crate::policy::{DirGrant, SandboxPolicy, TaskPolicy};
use crate::pools::PoolKind;

/// A tenant's caps. `None` means "no cap" for that limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantLimits {
    /// Most fuel one job may get.
    pub max_fuel: Option<u64>,
    /// Largest linear memory one job may get.
    pub max_memory_bytes: Option<u64>,
    /// Longest wall-clock timeout.
    #[serde(with = "opt_duration")]
    pub max_timeout: Option<Duration>,
    /// Largest result.
    pub max_result_bytes: Option<usize>,
    /// Largest payload.
    pub max_payload_bytes: Option<usize>,
    /// Largest component (`.wasm`) a task may have; `None`: the engine's
    /// default ([`crate::engine::DEFAULT_MAX_COMPONENT_BYTES`] unless a
    /// worker is configured otherwise). Checked at deploy and, against the
    /// current cap, before a worker compiles or runs the component. Left
    /// out of records when unset: workers before this field refuse records
    /// with fields they do not know.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_component_bytes: Option<u64>,
    /// Outbound HTTP entries a task may be granted (exact `host` or
    /// `host:port` strings); `None`: any.
    pub allow_http: Option<Vec<String>>,
    /// Secret names a task may be granted (`sandbox.secrets`); `None`: any
    /// of the tenant's own. (Another tenant's are never reachable: a name
    /// is looked up in the job's tenant.) Left out of records when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_secrets: Option<Vec<String>>,
    /// Database names a task may be granted (`sandbox.databases`); `None`:
    /// any of the tenant's own. Left out of records when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_databases: Option<Vec<String>>,
    /// Host directories (and everything below them) a task may be granted;
    /// `None`: any. Grants are opened beneath them (see [`crate::dir_caps`]).
    pub allow_dirs: Option<Vec<PathBuf>>,
    /// Most bytes the tenant's writable directory grants may hold on a
    /// worker host (every file, directory and link counts 4 KiB, a file its
    /// length on top; see `sandbox::disk`). A tenant with a record needs one
    /// for any writable grant; `None`: writable grants are refused.
    pub max_disk_bytes: Option<u64>,
    /// Whether a task may set `allow_private_networks`.
    pub allow_private_networks: bool,
    /// Pools the tenant's tasks may run on; `None`: any. A platform puts
    /// untrusted or CPU-heavy tenants on `cpu` pools, whose threads the OS
    /// runs after the io pools' (see `pools`).
    pub allow_pools: Option<Vec<PoolKind>>,
    /// Jobs of this tenant running at once on one worker.
    pub max_concurrency: Option<u32>,
    /// Jobs of this tenant running at once on all workers together
    /// (enforced in Redis, by the fetch script).
    pub max_cluster_concurrency: Option<u32>,
    /// Most bytes (names plus values) the tenant's guests may store at once
    /// in key-value entries, counters, once-markers, locks and step
    /// markers (enforced in Redis, by the script that writes).
    pub max_store_bytes: Option<u64>,
    /// Most entries the tenant's guests may store at once (same scope).
    pub max_store_keys: Option<u64>,
    /// Longest time to live of an entry a guest stores; one asked to live
    /// longer, or forever, lives this long.
    #[serde(with = "opt_duration")]
    pub max_value_ttl: Option<Duration>,
    /// Child jobs the tenant's guests may enqueue per minute, across all
    /// workers (enforced by the enqueue script).
    pub max_children_per_minute: Option<u32>,
    /// Idempotency keys the tenant may hold at once (pending jobs' keys and
    /// succeeded jobs' keys within their TTL), from producers and guests.
    pub max_idempotency_keys: Option<u32>,
    /// Most jobs of this tenant started per second, minute or hour, all
    /// its tasks together, across all workers (enforced by the fetch
    /// script, see `gates`). Left out of records when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<crate::gates::RateLimit>,
}

/// A tenant: its name and caps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    /// Name (validated by `keys::valid_tenant`).
    pub name: String,
    /// Caps.
    pub limits: TenantLimits,
}

impl TenantLimits {
    /// Every way `policy` asks for more than these caps, in words; empty
    /// when it fits.
    pub fn excesses(&self, tenant: &str, policy: &TaskPolicy) -> Vec<String> {
        let mut out = Vec::new();
        let s = &policy.sandbox;
        let mut over = |what: &str, asked: String, cap: String| {
            out.push(format!(
                "{what} {asked} exceeds tenant {tenant:?}'s cap of {cap}"
            ));
        };
        if let Some(cap) = self.max_fuel.filter(|&c| s.fuel > c) {
            over("fuel", s.fuel.to_string(), cap.to_string());
        }
        if let Some(cap) = self.max_memory_bytes.filter(|&c| s.memory_bytes > c) {
            over(
                "memory",
                format!("{} bytes", s.memory_bytes),
                format!("{cap} bytes"),
            );
        }
        if let Some(cap) = self.max_timeout.filter(|&c| s.timeout > c) {
            over(
                "timeout",
                humantime::format_duration(s.timeout).to_string(),
                humantime::format_duration(cap).to_string(),
            );
        }
        if let Some(cap) = self.max_result_bytes.filter(|&c| s.max_result_bytes > c) {
            over(
                "max_result_bytes",
                s.max_result_bytes.to_string(),
                cap.to_string(),
            );
        }
        if let Some(cap) = self
            .max_payload_bytes
            .filter(|&c| policy.max_payload_bytes > c)
        {
            over(
                "max_payload_bytes",
                policy.max_payload_bytes.to_string(),
                cap.to_string(),
            );
        }
        if let Some(allowed) = &self.allow_http {
            for entry in s.allow_http.iter().filter(|e| !allowed.contains(e)) {
                out.push(format!("outbound HTTP to {entry:?} is not in tenant {tenant:?}'s allowed hosts {allowed:?}"));
            }
        }
        if let Some(allowed) = &self.allow_secrets {
            for name in s.secrets.iter().filter(|e| !allowed.contains(e)) {
                out.push(format!(
                    "secret {name:?} is not in tenant {tenant:?}'s allowed secrets {allowed:?}"
                ));
            }
        }
        if let Some(allowed) = &self.allow_databases {
            for name in s.databases.iter().filter(|e| !allowed.contains(e)) {
                out.push(format!(
                    "database {name:?} is not in tenant {tenant:?}'s allowed databases {allowed:?}"
                ));
            }
        }
        for grant in &s.dirs {
            if let Some(refusal) = self
                .grant_refusal(tenant, grant)
                .or_else(|| self.escape_on_this_host(tenant, grant))
            {
                out.push(refusal);
            }
        }
        if s.allow_private_networks && !self.allow_private_networks {
            out.push(format!(
                "allow_private_networks is not allowed for tenant {tenant:?}"
            ));
        }
        if !self.allow_private_networks {
            for entry in &s.allow_http {
                if let Some(kind) = crate::addresses::private_entry(entry) {
                    out.push(format!(
                        "outbound HTTP entry {entry:?} reaches a {kind} address, and tenant {tenant:?} \
                         may not reach private networks"
                    ));
                }
            }
        }
        if let Some(refusal) = self.pool_refusal(tenant, policy.pool) {
            out.push(refusal);
        }
        out
    }

    /// Why a task on `pool` may not run for this tenant, if it may not.
    pub fn pool_refusal(&self, tenant: &str, pool: PoolKind) -> Option<String> {
        let allowed = self.allow_pools.as_ref()?;
        (!allowed.contains(&pool)).then(|| {
            let names: Vec<&str> = allowed.iter().map(|p| p.as_str()).collect();
            format!(
                "pool {} is not allowed for tenant {tenant:?} (allowed: {})",
                pool.as_str(),
                names.join(", ")
            )
        })
    }

    /// The store quota a worker's guests write under.
    pub fn store_quota(&self) -> crate::backend::redis::StoreQuota {
        crate::backend::redis::StoreQuota {
            max_bytes: self.max_store_bytes.unwrap_or(0),
            max_keys: self.max_store_keys.unwrap_or(0),
        }
    }

    /// Why `grant` may not be given to a job of this tenant, judged from
    /// the paths alone: its host path is relative or has `..`, it is not
    /// under one of the tenant's allowed directories, or it is writable
    /// while the tenant has no disk quota. Deploys check this, and workers
    /// again before every job against the tenant's current record; the
    /// worker then opens the grant beneath its cap, which refuses symlinks
    /// out of it.
    pub fn grant_refusal(&self, tenant: &str, grant: &DirGrant) -> Option<String> {
        if let Err(problem) = grant.check() {
            return Some(problem);
        }
        if let Some(allowed) = &self.allow_dirs {
            if dir_caps::outermost_cap(&grant.host_path, allowed).is_none() {
                let names: Vec<String> = allowed.iter().map(|a| a.display().to_string()).collect();
                return Some(format!(
                    "directory grant {} is not beneath tenant {tenant:?}'s allowed directories ({})",
                    grant.host_path.display(),
                    if names.is_empty() { "none".into() } else { names.join(", ") }
                ));
            }
        }
        if !grant.read_only && self.max_disk_bytes.is_none() {
            return Some(format!(
                "writable directory grant {} needs a disk quota, and tenant {tenant:?} has none: \
                 set one with `wasmq tenant set-limits {tenant} --max-disk SIZE`, or grant it read-only (`:ro`)",
                grant.host_path.display()
            ));
        }
        None
    }

    /// At deploy, where the grant's cap and path exist on this machine: why
    /// opening it beneath its cap fails because a symlink leads out of the
    /// cap. A path missing here, or unreadable by the deployer, is left to
    /// the worker, which opens every grant beneath its cap anyway.
    fn escape_on_this_host(&self, tenant: &str, grant: &DirGrant) -> Option<String> {
        let cap = dir_caps::outermost_cap(&grant.host_path, self.allow_dirs.as_ref()?)?;
        match dir_caps::open_beneath(cap, &grant.host_path) {
            Err(escape @ OpenError::Escapes(_)) => Some(format!(
                "directory grant {} escapes tenant {tenant:?}'s allowed directory {}: {escape}",
                grant.host_path.display(),
                cap.display()
            )),
            Ok(_) | Err(OpenError::Missing(_) | OpenError::Failed(_)) => None,
        }
    }

    /// `policy` cut down to these caps (what a worker runs a job with).
    /// Directory grants are left as they are: one that does not fit is
    /// refused when the job's sandbox opens it ([`Self::grant_refusal`]),
    /// never silently dropped.
    pub fn clamp(&self, mut policy: SandboxPolicy) -> SandboxPolicy {
        if let Some(c) = self.max_fuel {
            policy.fuel = policy.fuel.min(c);
        }
        if let Some(c) = self.max_memory_bytes {
            policy.memory_bytes = policy.memory_bytes.min(c);
        }
        if let Some(c) = self.max_timeout {
            policy.timeout = policy.timeout.min(c);
        }
        if let Some(c) = self.max_result_bytes {
            policy.max_result_bytes = policy.max_result_bytes.min(c);
        }
        if let Some(allowed) = &self.allow_http {
            policy.allow_http.retain(|e| allowed.contains(e));
        }
        if let Some(allowed) = &self.allow_secrets {
            policy.secrets.retain(|e| allowed.contains(e));
        }
        if let Some(allowed) = &self.allow_databases {
            policy.databases.retain(|e| allowed.contains(e));
        }
        policy.allow_private_networks &= self.allow_private_networks;
        policy.literal_private_grants &= self.allow_private_networks;
        policy
    }
}

/// Why a component of `size` bytes may not be deployed or run for
/// `tenant` (`None`: it fits). `limits` is the tenant's record, if it has
/// one; `engine_default` the cap of tenants without a cap of their own.
pub fn component_refusal(
    tenant: &str,
    limits: Option<&TenantLimits>,
    size: u64,
    engine_default: u64,
) -> Option<String> {
    let own = limits.and_then(|l| l.max_component_bytes);
    let cap = own.unwrap_or(engine_default);
    if size <= cap {
        return None;
    }
    let cap_text = format!("{} ({cap} bytes)", mib(cap));
    let (over, fix) = match (own, limits) {
        (Some(_), _) => (
            format!("tenant {tenant:?}'s cap of {cap_text}"),
            "set-limits",
        ),
        (None, Some(_)) => (default_cap(&cap_text), "set-limits"),
        (None, None) => (default_cap(&cap_text), "create"),
    };
    Some(format!(
        "component is {} ({size} bytes), over {over}; build it smaller (release profile, \
         no debug info) or raise the cap with `wasmq tenant {fix} {tenant} --max-component SIZE`",
        mib(size),
    ))
}

fn default_cap(cap: &str) -> String {
    format!("the engine's default cap of {cap} for tenants without a cap of their own")
}

/// `bytes` in MiB with one decimal, for messages.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// `Option<Duration>` as "30s" or null.
mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|t| humantime::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::DirGrant;

    #[test]
    fn a_policy_may_ask_for_less_never_more() {
        let limits = TenantLimits {
            max_fuel: Some(1_000),
            max_timeout: Some(Duration::from_secs(5)),
            allow_http: Some(vec!["api.example:443".into()]),
            allow_dirs: Some(vec![PathBuf::from("/srv/acme")]),
            ..TenantLimits::default()
        };
        let mut policy = TaskPolicy::default();
        policy.sandbox.fuel = 500;
        policy.sandbox.timeout = Duration::from_secs(1);
        policy.sandbox.allow_http = vec!["api.example:443".into()];
        policy.sandbox.dirs = vec![DirGrant::parse("/srv/acme/in::/in:ro").unwrap()];
        assert!(limits.excesses("acme", &policy).is_empty());
        policy.sandbox.fuel = 5_000;
        policy.sandbox.allow_http.push("evil.example".into());
        policy
            .sandbox
            .dirs
            .push(DirGrant::parse("/etc::/etc:ro").unwrap());
        let excesses = limits.excesses("acme", &policy);
        assert_eq!(excesses.len(), 3, "{excesses:?}");
        assert!(excesses[0].contains("fuel 5000 exceeds tenant \"acme\"'s cap of 1000"));
        assert!(
            excesses[2].contains("directory grant /etc is not beneath tenant \"acme\"'s allowed directories (/srv/acme)"),
            "{excesses:?}"
        );
        let clamped = limits.clamp(policy.sandbox);
        assert_eq!(clamped.fuel, 1_000);
        assert_eq!(clamped.allow_http, vec!["api.example:443".to_string()]);
        assert_eq!(
            clamped.dirs.len(),
            2,
            "grants are refused at run time, not dropped"
        );
    }

    #[test]
    fn secret_and_database_grants_stay_within_the_tenants_caps() {
        let limits = TenantLimits {
            allow_secrets: Some(vec!["mail_api_key".into()]),
            allow_databases: Some(vec!["app".into()]),
            ..TenantLimits::default()
        };
        let mut policy = TaskPolicy::default();
        policy.sandbox.secrets = vec!["mail_api_key".into(), "payroll_key".into()];
        policy.sandbox.databases = vec!["app".into(), "billing".into()];
        let excesses = limits.excesses("acme", &policy);
        assert_eq!(excesses.len(), 2, "{excesses:?}");
        assert!(excesses[0]
            .contains("secret \"payroll_key\" is not in tenant \"acme\"'s allowed secrets"));
        assert!(excesses[1]
            .contains("database \"billing\" is not in tenant \"acme\"'s allowed databases"));
        // Caps lowered after a deploy: the job loses the grants.
        let clamped = limits.clamp(policy.sandbox);
        assert_eq!(clamped.secrets, ["mail_api_key"]);
        assert_eq!(clamped.databases, ["app"]);
        // Unset caps are left out of records (older workers read them).
        let json = serde_json::to_string(&TenantLimits::default()).unwrap();
        assert!(!json.contains("allow_secrets") && !json.contains("allow_databases"));
    }

    #[test]
    fn grants_that_climb_or_write_without_a_quota_are_refused() {
        let limits = TenantLimits {
            allow_dirs: Some(vec![PathBuf::from("/srv/acme")]),
            ..TenantLimits::default()
        };
        let grant = |path: &str, read_only| DirGrant {
            host_path: PathBuf::from(path),
            guest_path: "/data".into(),
            read_only,
        };
        let refusal = |g: DirGrant| limits.grant_refusal("acme", &g).unwrap_or_default();
        assert!(refusal(grant("/srv/acme/../../../etc", true)).contains("contains `..`"));
        assert!(refusal(grant("srv/acme/in", true)).contains("not an absolute path"));
        assert!(refusal(grant("/srv/acme2", true)).contains("not beneath"));
        let writable = refusal(grant("/srv/acme/out", false));
        assert!(
            writable.contains("needs a disk quota") && writable.contains("--max-disk"),
            "{writable}"
        );
        assert_eq!(refusal(grant("/srv/acme/in", true)), "");
        let with_quota = TenantLimits {
            max_disk_bytes: Some(1 << 20),
            ..limits.clone()
        };
        assert!(with_quota
            .grant_refusal("acme", &grant("/srv/acme/out", false))
            .is_none());
        // Without a record's dir caps, `..` is still refused.
        assert!(TenantLimits::default()
            .grant_refusal("acme", &grant("/tmp/../etc", true))
            .is_some());
    }

    #[test]
    fn components_fit_the_tenants_cap_or_else_the_engines_default() {
        let default = 16 << 20;
        let capped = TenantLimits {
            max_component_bytes: Some(1 << 20),
            ..TenantLimits::default()
        };
        let uncapped = TenantLimits::default();
        assert_eq!(
            component_refusal("acme", Some(&capped), 1 << 20, default),
            None
        );
        let over = component_refusal("acme", Some(&capped), 3 << 20, default).unwrap();
        assert!(
            over.starts_with("component is 3.0 MiB (3145728 bytes), over tenant \"acme\"'s cap of 1.0 MiB (1048576 bytes)"),
            "{over}"
        );
        assert!(
            over.contains("wasmq tenant set-limits acme --max-component"),
            "{over}"
        );
        // A cap of its own may be above the engine's default.
        let generous = TenantLimits {
            max_component_bytes: Some(64 << 20),
            ..TenantLimits::default()
        };
        assert_eq!(
            component_refusal("acme", Some(&generous), 32 << 20, default),
            None
        );
        // Without a cap, with or without a record: the engine's default.
        for (limits, fix) in [(Some(&uncapped), "set-limits"), (None, "create")] {
            assert_eq!(component_refusal("acme", limits, default, default), None);
            let over = component_refusal("acme", limits, default + 1, default).unwrap();
            assert!(
                over.contains("over the engine's default cap of 16.0 MiB (16777216 bytes)"),
                "{over}"
            );
            assert!(over.contains(fix), "{over}");
        }
    }
}
