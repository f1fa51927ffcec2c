//! The limits and grants one job runs under: its sandbox policy.
//!
//! Defaults deny everything that reaches outside the guest (no HTTP hosts,
//! no directories, no environment) and bound everything inside it (fuel,
//! memory, wall time, result and log size). A task's policy may only tighten
//! what the worker's engine can support ([`crate::engine::EngineLimits`]).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default fuel: about a second or two of busy CPU for typical Rust code
/// (one unit of fuel is roughly one wasm instruction).
pub const DEFAULT_FUEL: u64 = 2_000_000_000;
/// Default linear-memory cap per instance: enough for image work on a few
/// megapixels, small enough that a thousand jobs fit in a worker.
pub const DEFAULT_MEMORY_BYTES: u64 = 128 << 20;
/// Default wall-clock timeout: I/O tasks wait on the network, so this is
/// generous; CPU is bounded separately by fuel.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default cap on a result's JSON size (Celery users learn to keep results
/// small; a large result belongs in object storage).
pub const DEFAULT_MAX_RESULT_BYTES: usize = 1 << 20;
/// Default cap on captured stdout+stderr and log lines per job.
pub const DEFAULT_MAX_LOG_BYTES: usize = 64 << 10;
/// Default cap on table elements (function pointers) per table: what the
/// workers' engines hold by default (`engine::DEFAULT_COMPONENT_LIMITS`).
/// Python and JavaScript runtimes start with 5,700-7,700 and a native
/// extension adds its functions; 100,000 is 800 KB of table at most.
pub const DEFAULT_MAX_TABLE_ELEMENTS: usize = 100_000;
/// Default cap on one outbound HTTP response body: the SDK reads bodies
/// into guest memory, so this stays well under [`DEFAULT_MEMORY_BYTES`].
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 16 << 20;
/// Default cap on one job's outbound HTTP requests in flight at once:
/// enough for a task fanning out to a handful of APIs, not enough to turn a
/// worker into a flood.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 32;

/// A directory the guest may open, granted as a capability handle.
///
/// Its host path must be absolute and free of `..` ([`DirGrant::check`]):
/// a grant names a directory, it never climbs out of one. Deploys check
/// that, and workers check it again before every job (a task record in
/// Redis may have been written by hand); where the grant must lie beneath
/// a tenant's directories, see [`crate::tenants::TenantLimits::grant_refusal`]
/// and [`crate::dir_caps`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirGrant {
    /// Directory on the host.
    pub host_path: PathBuf,
    /// Path the guest sees it at.
    pub guest_path: String,
    /// Whether the guest may only read.
    pub read_only: bool,
}

impl DirGrant {
    /// Parse `HOST_PATH::GUEST_PATH[:ro]` (the `--dir` flag).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (host, guest) = spec
            .split_once("::")
            .ok_or_else(|| format!("--dir {spec:?}: expected HOST_PATH::GUEST_PATH[:ro]"))?;
        let (guest, read_only) = match guest.strip_suffix(":ro") {
            Some(g) => (g, true),
            None => (guest, false),
        };
        if host.is_empty() || guest.is_empty() {
            return Err(format!("--dir {spec:?}: both paths must be non-empty"));
        }
        let grant = DirGrant {
            host_path: PathBuf::from(host),
            guest_path: guest.to_string(),
            read_only,
        };
        // A relative path is fine here: `wasmq run` makes it absolute
        // against its working directory. `..` is not.
        if let Some(problem) = grant.parent_dir_problem() {
            return Err(format!("--dir {spec:?}: {problem}"));
        }
        Ok(grant)
    }

    /// Whether the host path may be opened as it stands: absolute (a grant
    /// never depends on a worker's working directory) and without `..`
    /// (which could climb out of the directory a tenant is confined to).
    /// The error names the grant and the fix.
    pub fn check(&self) -> Result<(), String> {
        if let Some(problem) = self.parent_dir_problem() {
            return Err(problem);
        }
        if !self.host_path.is_absolute() {
            return Err(format!(
                "directory grant {} is not an absolute path; name the host directory from the root (e.g. /srv/data)",
                self.host_path.display()
            ));
        }
        Ok(())
    }

    /// Why the host path is refused for naming a parent directory, if it does.
    fn parent_dir_problem(&self) -> Option<String> {
        self.host_path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
            .then(|| {
                format!(
                    "directory grant {} contains `..`; name the directory itself \
                     (a grant may not climb out of a directory)",
                    self.host_path.display()
                )
            })
    }
}

/// Everything that bounds and grants one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxPolicy {
    /// Fuel (deterministic instruction budget).
    pub fuel: u64,
    /// Linear-memory cap in bytes, summed over the instance's memories.
    pub memory_bytes: u64,
    /// Wall-clock deadline for the whole run.
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Largest result (JSON bytes) accepted.
    pub max_result_bytes: usize,
    /// Largest captured log (stdout, stderr, log lines) kept.
    pub max_log_bytes: usize,
    /// Largest table, in elements.
    pub max_table_elements: usize,
    /// Outbound HTTP allow-list: `host` or `host:port` entries. An entry
    /// that is an IP literal (`127.0.0.1:8080`, `[::1]:9000`) also grants
    /// that address when it is loopback or private; see
    /// `allow_private_networks`.
    pub allow_http: Vec<String>,
    /// Let allowed host *names* resolve to loopback, private (RFC 1918,
    /// fc00::/7), link-local, CGNAT or unspecified addresses. Off by default:
    /// a name on the allow-list whose DNS points inside the worker's network
    /// is refused (`denied`), so a task cannot reach internal services
    /// through a name it controls.
    pub allow_private_networks: bool,
    /// Largest outbound HTTP response body, in bytes; a larger one fails the
    /// request and the job ends `denied`.
    pub max_response_bytes: u64,
    /// Most outbound HTTP requests one job may have in flight at once; one
    /// more fails with `denied`.
    pub max_concurrent_requests: usize,
    /// Directories granted to the guest.
    pub dirs: Vec<DirGrant>,
    /// Secrets the guest may read with `config::get`, by name (see
    /// [`crate::secrets`]); none by default. Left out of records when
    /// empty, so workers that predate it still read the policy.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// PostgreSQL databases the guest may open through `postgres`, by
    /// name; each one's URL is the secret `database:NAME`. None by default.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub databases: Vec<String>,
    /// Whether an IP-literal `allow_http` entry may grant a non-public
    /// address (see `allow_http`). Not part of a task's manifest: true,
    /// unless the job's tenant may not reach private networks (its caps
    /// clear it when a worker runs the job).
    #[serde(skip, default = "granted")]
    pub literal_private_grants: bool,
}

/// Serde's default for [`SandboxPolicy::literal_private_grants`].
fn granted() -> bool {
    true
}

impl Default for SandboxPolicy {
    fn default() -> Self {
        SandboxPolicy {
            fuel: DEFAULT_FUEL,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            timeout: DEFAULT_TIMEOUT,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            max_table_elements: DEFAULT_MAX_TABLE_ELEMENTS,
            allow_http: Vec::new(),
            allow_private_networks: false,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
            dirs: Vec::new(),
            secrets: Vec::new(),
            databases: Vec::new(),
            literal_private_grants: true,
        }
    }
}

/// Durations in policies are written the way people write them: "30s", "5m".
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// Parse a size such as `64MiB`, `512k`, `1G` or a plain byte count.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| {
        format!("size {text:?}: expected a number with an optional unit (KiB, MiB, GiB)")
    })?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(format!(
                "size {text:?}: unknown unit {other:?} (use KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn example_manifests_parse() {
        for text in [
            include_str!("../../tasks/thumbnail/task.toml"),
            include_str!("../../tasks/onboard/task.toml"),
            include_str!("../../tasks/scrape/task.toml"),
        ] {
            TaskPolicy::from_toml(text).unwrap();
        }
        let cpu = TaskPolicy::from_toml(include_str!("../../tasks/thumbnail/task.toml")).unwrap();
        assert_eq!(cpu.pool, crate::pools::PoolKind::Cpu);
    }

    #[test]
    fn secret_grants_name_secrets_never_database_urls() {
        let p = TaskPolicy::from_toml("[sandbox]\nsecrets = [\"mail_api_key\"]\n").unwrap();
        assert_eq!(p.sandbox.secrets, ["mail_api_key"]);
        let err = TaskPolicy::from_toml("[sandbox]\nsecrets = [\"database:app\"]\n").unwrap_err();
        assert!(
            err.contains("sandbox.secrets[0]") && err.contains("database URL"),
            "{err}"
        );
        let err = TaskPolicy::from_toml("[sandbox]\nsecrets = [\"a/b\"]\n").unwrap_err();
        assert!(err.contains("is invalid"), "{err}");
        // Left out of a record when empty, so older workers read it.
        let json = serde_json::to_string(&SandboxPolicy::default()).unwrap();
        assert!(!json.contains("secrets"), "{json}");
    }

    #[test]
    fn database_and_secret_grants_may_be_written_at_the_top() {
        let top = TaskPolicy::from_toml(
            "queue = \"email\"\ndatabases = [\"app\"]\nsecrets = [\"mail_api_key\"]\n[sandbox]\nfuel = 5\n",
        )
        .unwrap();
        assert_eq!(top.sandbox.databases, ["app"]);
        assert_eq!(top.sandbox.secrets, ["mail_api_key"]);
        assert_eq!(top.sandbox.fuel, 5);
        let err = TaskPolicy::from_toml("databases = [\"a\"]\n[sandbox]\ndatabases = [\"b\"]\n")
            .unwrap_err();
        assert!(err.contains("both at the top and under [sandbox]"), "{err}");
        let err = TaskPolicy::from_toml("secrets = [\"database:app\"]\n").unwrap_err();
        assert!(err.contains("sandbox.secrets[0]"), "{err}");
        let err = TaskPolicy::from_toml("databse = [\"app\"]\n").unwrap_err();
        assert!(err.contains("unknown field `databse`"), "{err}");
    }

    #[test]
    fn dir_grants_parse() {
        let g = DirGrant::parse("/srv/data::/data:ro").unwrap();
        assert_eq!(g.host_path, PathBuf::from("/srv/data"));
        assert_eq!(g.guest_path, "/data");
        assert!(g.read_only);
        assert!(!DirGrant::parse("/tmp::/tmp").unwrap().read_only);
        assert!(DirGrant::parse("/tmp").is_err());
    }

    #[test]
    fn dir_grants_never_climb_with_dotdot() {
        for spec in [
            "/srv/acme/../../../etc::/etc",
            "../data::/data",
            "/srv/acme/..::/up:ro",
            "data/../../x::/x",
        ] {
            let err = DirGrant::parse(spec).unwrap_err();
            assert!(err.contains("contains `..`"), "{spec}: {err}");
            assert!(err.contains("--dir"), "{spec}: {err}");
        }
        // A `..` inside a name is just a name.
        assert!(DirGrant::parse("/srv/a..b::/x").is_ok());
        // Relative paths parse (`wasmq run` makes them absolute) but a
        // deployed grant must be absolute.
        let relative = DirGrant::parse("data::/data").unwrap();
        assert!(relative
            .check()
            .unwrap_err()
            .contains("not an absolute path"));
        let manifest = "[sandbox]\ndirs = [{ host_path = \"/srv/acme/../../etc\", guest_path = \"/etc\", read_only = true }]\n";
        let err = TaskPolicy::from_toml(manifest).unwrap_err();
        assert!(
            err.starts_with(
                "task manifest: sandbox.dirs[0]: directory grant /srv/acme/../../etc contains `..`"
            ),
            "{err}"
        );
    }
}

/// Default attempts per job (the first run plus two retries).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Default lost deliveries before a job is dead-lettered as poison: 20.
/// A job that kills its worker costs a worker crash per delivery, so the
/// limit bounds that; a healthy job only loses a delivery when its worker
/// dies for another reason while running it. In a chaos run that kills one
/// of two workers every 2 s (a few-second lease, jobs of up to 2.7 s), a
/// job loses about half of its deliveries, so 20 in a row is about one in
/// a million (0.5^20), while a real poison job is caught after 20 crashes
/// instead of running forever.
pub const DEFAULT_MAX_DELIVERIES: u32 = 20;
/// Default first backoff delay; doubles per attempt (Celery's `retry_backoff`).
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Default cap on one backoff delay (Celery's `retry_backoff_max`).
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(600);
/// Default time a stored result is kept.
pub const DEFAULT_RESULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// When and how a failed job is tried again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// First backoff delay.
    #[serde(with = "humantime_serde_compat")]
    pub backoff_base: Duration,
    /// Largest backoff delay.
    #[serde(with = "humantime_serde_compat")]
    pub backoff_max: Duration,
    /// Full jitter: wait a uniformly random time up to the backoff, so
    /// failed jobs do not retry in lockstep.
    pub jitter: bool,
    /// Task error kinds that are retried (others fail the job at once).
    pub auto_retry_kinds: Vec<String>,
    /// Deliveries that may end with the worker's lease lapsing (it died,
    /// froze or lost Redis while running the job) before the job is
    /// dead-lettered as poison. These never use an attempt.
    pub max_deliveries: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            jitter: true,
            auto_retry_kinds: vec!["network".into()],
            max_deliveries: DEFAULT_MAX_DELIVERIES,
        }
    }
}

/// A deployed task's whole policy: where it runs, its sandbox, its retries
/// and what happens to its results. Written as `task.toml` (see the GUIDE).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskPolicy {
    /// Queue the task's jobs go to.
    pub queue: String,
    /// Pool kind that runs it (`io` or `cpu`); a queue serves one kind.
    pub pool: crate::pools::PoolKind,
    /// Sandbox limits and grants.
    pub sandbox: SandboxPolicy,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Store results unless the enqueue says otherwise (Celery's
    /// `ignore_result`, inverted; off by default).
    pub store_result: bool,
    /// How long stored results are kept.
    #[serde(with = "humantime_serde_compat")]
    pub result_ttl: Duration,
    /// Largest payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// Most jobs of this task started per second, minute or hour across
    /// all workers (`"100/s"`, see `gates`); `None`: no limit. Left out of
    /// records when unset, like every field added since workers refuse
    /// fields they do not know.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<crate::gates::RateLimit>,
    /// Most jobs with one concurrency key (`wasmq enqueue --key`) running
    /// at once across all workers; `None`: keys are ignored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_per_key: Option<u32>,
}

/// Default largest payload: payloads carry references, not data.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 512 << 10;

impl Default for TaskPolicy {
    fn default() -> Self {
        TaskPolicy {
            queue: "default".into(),
            pool: crate::pools::PoolKind::Io,
            sandbox: SandboxPolicy::default(),
            retry: RetryPolicy::default(),
            store_result: false,
            result_ttl: DEFAULT_RESULT_TTL,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            rate_limit: None,
            max_per_key: None,
        }
    }
}

impl TaskPolicy {
    /// Parse a `task.toml` manifest; unknown fields are errors that name them.
    /// The grants `databases` and `secrets` may also be written at the top
    /// (`databases = ["app"]`, as the SPEC shows them) instead of under
    /// `[sandbox]`; not in both places.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let mut table: toml::Table = text.parse().map_err(|e| format!("task manifest: {e}"))?;
        for grant in ["databases", "secrets"] {
            let Some(value) = table.remove(grant) else {
                continue;
            };
            let sandbox = table
                .entry("sandbox")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(sandbox) = sandbox.as_table_mut() else {
                return Err("task manifest: `sandbox` must be a table".into());
            };
            if sandbox.contains_key(grant) {
                return Err(format!(
                    "task manifest: `{grant}` is given both at the top and under [sandbox]: keep one"
                ));
            }
            sandbox.insert(grant.into(), value);
        }
        let policy: TaskPolicy = table
            .try_into()
            .map_err(|e| format!("task manifest: {e}"))?;
        policy
            .check_grants()
            .map_err(|e| format!("task manifest: {e}"))?;
        if policy.max_per_key == Some(0) {
            return Err(
                "task manifest: max_per_key = 0 would never run a keyed job: use at least 1".into(),
            );
        }
        Ok(policy)
    }

    /// Whether every directory grant names an absolute path without `..`
    /// ([`DirGrant::check`]); the first one that does not, named. A deploy
    /// refuses a policy that fails this.
    pub fn check_grants(&self) -> Result<(), String> {
        for (i, grant) in self.sandbox.dirs.iter().enumerate() {
            grant
                .check()
                .map_err(|e| format!("sandbox.dirs[{i}]: {e}"))?;
        }
        self.sandbox.check_secret_grants()
    }
}

impl SandboxPolicy {
    /// Whether every granted secret has a valid name, none of them a
    /// database URL (those are reached through `databases`, never read).
    pub fn check_secret_grants(&self) -> Result<(), String> {
        for (i, name) in self.secrets.iter().enumerate() {
            crate::secrets::check_name(name).map_err(|e| format!("sandbox.secrets[{i}]: {e}"))?;
            if name.starts_with(crate::secrets::DATABASE_PREFIX) {
                return Err(format!(
                    "sandbox.secrets[{i}]: {name:?} is a database URL; grant the database \
                     in sandbox.databases instead (a task never reads a database URL)"
                ));
            }
        }
        for (i, name) in self.databases.iter().enumerate() {
            crate::secrets::check_name(&format!("{}{name}", crate::secrets::DATABASE_PREFIX))
                .map_err(|e| format!("sandbox.databases[{i}]: {e}"))?;
        }
        Ok(())
    }
}
