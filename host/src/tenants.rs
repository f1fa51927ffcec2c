//! Tenants as first-class objects: their caps, and the rule that a task's
//! policy may ask for less than its tenant's caps, never more.
//!
//! A tenant record is optional: a Redis with no record for a tenant runs it
//! uncapped (single-team use). Once a platform creates the tenant, deploys
//! that exceed a cap are refused with a message naming each excess, and
//! workers clamp every job to the tenant's *current* caps, so lowering a cap
//! takes effect without redeploying.
//!
//! The component size cap applies to tenants without a record too: a tenant
//! without its own cap gets the engine's default (`engine.rs`), because
//! compiling a big component costs the workers, not the tenant.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::{SandboxPolicy, TaskPolicy};
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
    /// Host directories (and everything below them) a task may be granted;
    /// `None`: any.
    pub allow_dirs: Option<Vec<PathBuf>>,
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
        if let Some(allowed) = &self.allow_dirs {
            for dir in s
                .dirs
                .iter()
                .filter(|d| !allowed.iter().any(|a| d.host_path.starts_with(a)))
            {
                out.push(format!(
                    "directory {} is not under tenant {tenant:?}'s allowed directories {allowed:?}",
                    dir.host_path.display()
                ));
            }
        }
        if s.allow_private_networks && !self.allow_private_networks {
            out.push(format!(
                "allow_private_networks is not allowed for tenant {tenant:?}"
            ));
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

    /// `policy` cut down to these caps (what a worker runs a job with).
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
        if let Some(allowed) = &self.allow_dirs {
            policy
                .dirs
                .retain(|d| allowed.iter().any(|a| d.host_path.starts_with(a)));
        }
        policy.allow_private_networks &= self.allow_private_networks;
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
        let clamped = limits.clamp(policy.sandbox);
        assert_eq!(clamped.fuel, 1_000);
        assert_eq!(clamped.allow_http, vec!["api.example:443".to_string()]);
        assert_eq!(clamped.dirs.len(), 1);
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
