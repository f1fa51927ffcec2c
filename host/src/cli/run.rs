//! `wasmq run`: one job, locally, in embedded mode (no Redis).
//!
//! The host interfaces are served by the in-memory backend; with `--state
//! FILE` it is loaded before and saved after the run, so consecutive runs
//! share step markers, counters and locks the way jobs on a broker do.
//! With `--secrets FILE` the job reads the file's secrets and databases as
//! a deployed task reads its tenant's (sealed in memory under a key made
//! up for the run, granted by being in the file).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use super::engine_limits::ComponentLimitArgs;
use super::CliError;
use crate::backend::memory::MemoryBackend;
use crate::component::CompiledCache;
use crate::engine::{build_engine, EngineLimits};
use crate::policy::{parse_size, DirGrant, SandboxPolicy};
use crate::sandbox::{JobInput, Sandbox, Verdict};
use crate::secrets::{self, SecretsKey};

/// Flags of `wasmq run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The task component (`.wasm`).
    pub task: PathBuf,
    /// The JSON payload.
    #[arg(default_value = "{}")]
    pub payload: String,
    /// Fuel budget (deterministic CPU limit).
    #[arg(long)]
    pub fuel: Option<u64>,
    /// Linear-memory cap, e.g. `64MiB`.
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Wall-clock timeout, e.g. `10s`, `500ms`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// Allow outbound HTTP to HOST or HOST:PORT (repeatable).
    #[arg(long = "allow-http", value_name = "HOST[:PORT]")]
    pub allow_http: Vec<String>,
    /// Let allowed host names resolve to loopback or private addresses
    /// (refused by default; an IP-literal --allow-http entry is enough for
    /// that one address).
    #[arg(long = "allow-private-networks")]
    pub allow_private_networks: bool,
    /// Grant a directory: HOST_PATH::GUEST_PATH, with `:ro` for read-only
    /// (repeatable). HOST_PATH may not contain `..`; a relative one is
    /// taken from the current directory.
    // Parsed in `policy`, not by clap, so a refusal is one stderr line.
    #[arg(long = "dir", value_name = "HOST::GUEST[:ro]")]
    pub dirs: Vec<String>,
    /// Largest result accepted, e.g. `1MiB`.
    #[arg(long = "max-result", value_parser = parse_size)]
    pub max_result: Option<u64>,
    /// Keep embedded state (steps, counters, locks, key-value) in this file
    /// across runs.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Print `{"result", "usage", "log", "children"}` instead of the bare result.
    #[arg(long)]
    pub meta: bool,
    /// Job id to report to the task (default: a fresh one).
    #[arg(long)]
    pub id: Option<String>,
    /// Idempotency key to report to the task.
    #[arg(long = "idempotency-key")]
    pub idempotency_key: Option<String>,
    /// Secrets for this run, one `NAME=VALUE` per line (`#` starts a
    /// comment line): each is granted to the task (`config::get`), and
    /// `database:NAME=URL` grants database NAME. Values stay in the file,
    /// never on the command line; nothing of them is saved to `--state`.
    #[arg(long, value_name = "FILE")]
    pub secrets: Option<PathBuf>,
    /// What the component may contain, as on `wasmq worker`.
    #[command(flatten)]
    pub component_limits: ComponentLimitArgs,
}

/// The `NAME=VALUE` lines of a `--secrets` file, checked: valid names,
/// none twice. Errors name the line, never a value.
fn parse_secrets(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            return Err(format!("line {}: expected NAME=VALUE", i + 1));
        };
        let name = name.trim();
        // The check's message quotes the name, which on a mangled line may
        // be part of a value: only the line number is said.
        secrets::check_name(name).map_err(|_| {
            format!(
                "line {}: not a secret name before `=` (letters, digits, _ . : -)",
                i + 1
            )
        })?;
        if out.iter().any(|(n, _)| n == name) {
            return Err(format!("line {}: secret {name} is given twice", i + 1));
        }
        out.push((name.to_string(), value.trim().to_string()));
    }
    Ok(out)
}

/// Seal the `--secrets` file's values into `backend` with a key made up
/// for this run, and grant them in `policy`; the key, for the sandbox.
fn load_secrets(
    path: &std::path::Path,
    tenant: &str,
    backend: &MemoryBackend,
    policy: &mut SandboxPolicy,
) -> anyhow::Result<Arc<SecretsKey>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --secrets {}", path.display()))?;
    let entries =
        parse_secrets(&text).map_err(|e| anyhow::anyhow!("--secrets {}: {e}", path.display()))?;
    let key = SecretsKey::from_hex(&SecretsKey::generate_hex()).map_err(anyhow::Error::msg)?;
    for (name, value) in entries {
        let field = secrets::field(&name, None);
        let sealed = key
            .seal(tenant, &field, value.as_bytes())
            .map_err(anyhow::Error::msg)?;
        backend.put_secret(tenant, &field, sealed);
        match name.strip_prefix(secrets::DATABASE_PREFIX) {
            Some(database) => policy.databases.push(database.to_string()),
            None => policy.secrets.push(name),
        }
    }
    policy
        .check_secret_grants()
        .map_err(|e| anyhow::anyhow!("--secrets {}: {e}", path.display()))?;
    Ok(Arc::new(key))
}

impl RunArgs {
    fn policy(&self) -> anyhow::Result<SandboxPolicy> {
        let defaults = SandboxPolicy::default();
        let mut dirs = Vec::with_capacity(self.dirs.len());
        for spec in &self.dirs {
            let mut grant = DirGrant::parse(spec).map_err(anyhow::Error::msg)?;
            // The sandbox opens only absolute grants; `--dir data::/data`
            // means ./data (lexically: parsing refused `..` already).
            grant.host_path = std::path::absolute(&grant.host_path)
                .with_context(|| format!("--dir {spec:?}: making the host path absolute"))?;
            dirs.push(grant);
        }
        Ok(SandboxPolicy {
            fuel: self.fuel.unwrap_or(defaults.fuel),
            memory_bytes: self.memory.unwrap_or(defaults.memory_bytes),
            timeout: self.timeout.unwrap_or(defaults.timeout),
            max_result_bytes: self
                .max_result
                .map_or(defaults.max_result_bytes, |m| m as usize),
            allow_http: self.allow_http.clone(),
            allow_private_networks: self.allow_private_networks,
            dirs,
            ..defaults
        })
    }
}

/// Run the job and print its result.
pub async fn run(tenant: &str, args: RunArgs) -> Result<(), CliError> {
    let bytes =
        std::fs::read(&args.task).with_context(|| format!("reading {}", args.task.display()))?;
    let mut policy = args.policy()?;
    let limits = EngineLimits {
        instance_slots: 1,
        max_memory_bytes: policy
            .memory_bytes
            .max(EngineLimits::default().max_memory_bytes),
        component: args.component_limits.limits(),
        ..EngineLimits::default()
    };
    let engine = build_engine(&limits).map_err(anyhow::Error::from)?;
    let backend = Arc::new(match &args.state {
        Some(path) => MemoryBackend::load(path)?,
        None => MemoryBackend::new(),
    });
    let secrets_key = match &args.secrets {
        Some(path) => Some(load_secrets(path, tenant, &backend, &mut policy)?),
        None => None,
    };
    let cache = CompiledCache::new(CompiledCache::default_dir()).with_limits(limits.component);
    let sandbox = Sandbox::new(engine, cache)?.with_secrets_key(secrets_key);
    let task = sandbox.prepare(&bytes)?;
    let name = args
        .task
        .file_stem()
        .map_or("task".into(), |s| s.to_string_lossy().into_owned());
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut job = JobInput::new(&id, &name, tenant, &args.payload);
    job.idempotency_key = args.idempotency_key.clone();
    let outcome = sandbox.run(&task, &job, &policy, backend.clone()).await;
    if let Some(path) = &args.state {
        backend.save(path)?;
    }

    let (result, error) = match &outcome.verdict {
        Verdict::Succeeded { result } => (Some(result.clone()), None),
        Verdict::Retry { message, delay } => {
            let delay = delay.map_or(String::new(), |d| {
                format!(" after {}", humantime::format_duration(d))
            });
            (
                None,
                Some(crate::failure::Failure::new(
                    crate::failure::Category::TaskError,
                    format!("task asked to be retried{delay}: {message}"),
                )),
            )
        }
        Verdict::Failed { failure, .. } => (None, Some(failure.clone())),
    };
    if args.meta {
        let result: Option<serde_json::Value> = result
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(anyhow::Error::from)?;
        let children: Vec<_> = backend.children().into_iter().map(|(_, c)| c).collect();
        let meta = json!({
            "result": result,
            "error": error,
            "usage": outcome.usage,
            "log": outcome.log,
            "children": children,
        });
        println!("{meta}");
    } else if let Some(result) = &result {
        println!("{result}");
    }
    match error {
        Some(failure) => Err(CliError::Job(failure)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_secrets;

    #[test]
    fn secrets_files_name_bad_lines_never_values() {
        let text =
            "# mail\nmail_api_key=s3cret=with=equals\n\n database:app = postgres://u:p@db/app\r\n";
        let parsed = parse_secrets(text).unwrap();
        assert_eq!(
            parsed[0],
            ("mail_api_key".into(), "s3cret=with=equals".into())
        );
        assert_eq!(parsed[1].0, "database:app");
        assert_eq!(parsed[1].1, "postgres://u:p@db/app");
        let err = parse_secrets("postgres://app:hunter2@db/app?sslmode=require\n").unwrap_err();
        assert!(
            err.starts_with("line 1") && !err.contains("hunter2"),
            "{err}"
        );
        let err = parse_secrets("a=1\nhunter2\n").unwrap_err();
        assert_eq!(err, "line 2: expected NAME=VALUE");
        let err = parse_secrets("a=1\na=hunter2\n").unwrap_err();
        assert!(err.contains("line 2") && !err.contains("hunter2"), "{err}");
        let err = parse_secrets("a/b=hunter2\n").unwrap_err();
        assert!(
            err.starts_with("line 1") && !err.contains("hunter2"),
            "{err}"
        );
    }
}
