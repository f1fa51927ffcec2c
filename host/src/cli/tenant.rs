//! `wasmq tenant ...`: managing tenants: `create`, `set-limits`, `show`,
//! `list` (their caps, see `crate::tenants`), `usage` (what their jobs
//! consumed) and `acl` (the Redis ACL user that confines a tenant's
//! producers; see `broker::acl` and docs/security.md).

use clap::{Args, Subcommand};

use super::CliError;
use crate::broker::acl::{random_password, ProducerAcl};
use crate::broker::Broker;
use crate::tenants::{Tenant, TenantLimits};

/// Tenant commands.
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Print the Redis ACL user (`wasmq-producer-NAME`) that lets a producer
    /// enqueue (on the queues of NAME's deployed tasks) and read results in
    /// tenant NAME only; with --apply, install it. Run it again after a
    /// deploy to a new queue.
    Acl(AclArgs),
    /// Create tenant NAME with these caps (replacing any record).
    Create(LimitArgs),
    /// Change some caps of tenant NAME, keeping the others.
    SetLimits(LimitArgs),
    /// Print tenant NAME's record.
    Show {
        /// Tenant.
        name: String,
    },
    /// List tenants: `default` and every tenant with a record.
    List,
    /// What tenant NAME's jobs consumed (runs, fuel, wall and run time,
    /// memory byte-seconds, network bytes, denied capabilities; runs whose
    /// outcome was refused as `wasted_*`) and what it holds now (stored
    /// bytes and entries, idempotency keys, child jobs this minute).
    Usage {
        /// Tenant.
        name: String,
    },
}

/// Caps, for `create` and `set-limits`.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Tenant.
    pub name: String,
    /// Most fuel per job.
    #[arg(long = "max-fuel")]
    pub max_fuel: Option<u64>,
    /// Largest memory per job, e.g. `256MiB`.
    #[arg(long = "max-memory", value_parser = crate::policy::parse_size)]
    pub max_memory: Option<u64>,
    /// Longest timeout per job, e.g. `60s`.
    #[arg(long = "max-timeout", value_parser = humantime::parse_duration)]
    pub max_timeout: Option<std::time::Duration>,
    /// Largest result, e.g. `1MiB`.
    #[arg(long = "max-result", value_parser = crate::policy::parse_size)]
    pub max_result: Option<u64>,
    /// Largest payload, e.g. `256KiB`.
    #[arg(long = "max-payload", value_parser = crate::policy::parse_size)]
    pub max_payload: Option<u64>,
    /// Largest component (`.wasm`) a task may have, e.g. `16MiB`: deploys
    /// of bigger ones are refused, and workers refuse to compile or run a
    /// deployed one over the current cap (`invalid-component`). Without it,
    /// the engine's default (64MiB) applies.
    #[arg(long = "max-component", value_parser = crate::policy::parse_size)]
    pub max_component: Option<u64>,
    /// An outbound HTTP entry tasks may be granted (repeatable); without
    /// any, hosts are not capped.
    #[arg(long = "allow-http")]
    pub allow_http: Vec<String>,
    /// A secret name tasks may be granted (repeatable); without any, any
    /// of the tenant's own secrets.
    #[arg(long = "allow-secret")]
    pub allow_secret: Vec<String>,
    /// A database name tasks may be granted (repeatable); without any, any
    /// of the tenant's own databases.
    #[arg(long = "allow-database")]
    pub allow_database: Vec<String>,
    /// A host directory tasks may be granted, with what is below it
    /// (repeatable; an absolute path without `..`); without any,
    /// directories are not capped. Workers open every grant beneath it: a
    /// symlink out of it is refused.
    #[arg(long = "allow-dir", value_name = "DIR", value_parser = parse_allowed_dir)]
    pub allow_dir: Vec<std::path::PathBuf>,
    /// Disk quota of the tasks' writable directory grants, e.g. `64MiB`:
    /// what the tenant may keep under them on a worker host (4 KiB per
    /// file, directory or link, plus file lengths). Writes past it fail and
    /// the job ends `denied`; without a quota, writable grants are refused.
    #[arg(long = "max-disk", value_name = "SIZE", value_parser = crate::policy::parse_size)]
    pub max_disk: Option<u64>,
    /// Tasks may reach private networks.
    #[arg(long = "allow-private-networks")]
    pub allow_private_networks: bool,
    /// A pool kind (io or cpu) tasks may run on (repeatable); without any,
    /// pools are not capped.
    #[arg(long = "allow-pool", value_parser = crate::pools::PoolKind::parse)]
    pub allow_pool: Vec<crate::pools::PoolKind>,
    /// Jobs at once per worker.
    #[arg(long = "max-concurrency")]
    pub max_concurrency: Option<u32>,
    /// Jobs at once on all workers together.
    #[arg(long = "max-cluster-concurrency")]
    pub max_cluster_concurrency: Option<u32>,
    /// Most bytes the tenant's guests may store at once (key-value entries,
    /// counters, locks, step markers; names plus values), e.g. `64MiB`.
    #[arg(long = "max-store", value_parser = crate::policy::parse_size)]
    pub max_store: Option<u64>,
    /// Most entries the tenant's guests may store at once.
    #[arg(long = "max-store-keys")]
    pub max_store_keys: Option<u64>,
    /// Longest time to live of a stored entry, e.g. `7d`; entries asked to
    /// live longer (or forever) live this long.
    #[arg(long = "max-value-ttl", value_parser = humantime::parse_duration)]
    pub max_value_ttl: Option<std::time::Duration>,
    /// Child jobs the tenant's guests may enqueue per minute (all workers).
    #[arg(long = "max-children-per-minute")]
    pub max_children_per_minute: Option<u32>,
    /// Idempotency keys the tenant may hold at once.
    #[arg(long = "max-idempotency-keys")]
    pub max_idempotency_keys: Option<u32>,
    /// Most jobs started per second, minute or hour, all the tenant's
    /// tasks together, across all workers, e.g. `100/s`, `20/m`, `500/h`.
    #[arg(long = "rate-limit", value_parser = crate::gates::RateLimit::parse)]
    pub rate_limit: Option<crate::gates::RateLimit>,
}

impl LimitArgs {
    /// Apply the given flags over `limits`.
    fn apply(&self, limits: &mut TenantLimits) {
        limits.max_fuel = self.max_fuel.or(limits.max_fuel);
        limits.max_memory_bytes = self.max_memory.or(limits.max_memory_bytes);
        limits.max_timeout = self.max_timeout.or(limits.max_timeout);
        limits.max_result_bytes = self
            .max_result
            .map(|b| b as usize)
            .or(limits.max_result_bytes);
        limits.max_payload_bytes = self
            .max_payload
            .map(|b| b as usize)
            .or(limits.max_payload_bytes);
        limits.max_component_bytes = self.max_component.or(limits.max_component_bytes);
        if !self.allow_http.is_empty() {
            limits.allow_http = Some(self.allow_http.clone());
        }
        if !self.allow_secret.is_empty() {
            limits.allow_secrets = Some(self.allow_secret.clone());
        }
        if !self.allow_database.is_empty() {
            limits.allow_databases = Some(self.allow_database.clone());
        }
        if !self.allow_dir.is_empty() {
            limits.allow_dirs = Some(self.allow_dir.clone());
        }
        limits.max_disk_bytes = self.max_disk.or(limits.max_disk_bytes);
        limits.allow_private_networks |= self.allow_private_networks;
        if !self.allow_pool.is_empty() {
            limits.allow_pools = Some(self.allow_pool.clone());
        }
        limits.max_concurrency = self.max_concurrency.or(limits.max_concurrency);
        limits.max_cluster_concurrency = self
            .max_cluster_concurrency
            .or(limits.max_cluster_concurrency);
        limits.max_store_bytes = self.max_store.or(limits.max_store_bytes);
        limits.max_store_keys = self.max_store_keys.or(limits.max_store_keys);
        limits.max_value_ttl = self.max_value_ttl.or(limits.max_value_ttl);
        limits.max_children_per_minute = self
            .max_children_per_minute
            .or(limits.max_children_per_minute);
        limits.max_idempotency_keys = self.max_idempotency_keys.or(limits.max_idempotency_keys);
        limits.rate_limit = self.rate_limit.or(limits.rate_limit);
    }
}

/// An `--allow-dir`: grants are judged by path components under it, so it
/// must be absolute and must not climb.
fn parse_allowed_dir(text: &str) -> Result<std::path::PathBuf, String> {
    let path = std::path::PathBuf::from(text);
    if crate::dir_caps::clean_absolute(&path) {
        Ok(path)
    } else {
        Err(format!(
            "{text:?} must be an absolute path without `..` (e.g. /srv/tenants/acme)"
        ))
    }
}

/// Flags of `wasmq tenant acl`.
#[derive(Debug, Args)]
pub struct AclArgs {
    /// Tenant the producer is confined to.
    pub name: String,
    /// Install the user on the Redis of `--redis` (needs an admin
    /// connection) instead of only printing it.
    #[arg(long)]
    pub apply: bool,
    /// The producer's password. Without it a random one is generated and
    /// printed once. Only its SHA-256 goes into the printed ACL rules.
    #[arg(long, env = "WASMQ_PRODUCER_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

/// Run a tenant command.
pub async fn tenant(redis: &str, command: TenantCommand) -> Result<(), CliError> {
    match command {
        TenantCommand::Acl(args) => acl(redis, args).await,
        TenantCommand::Usage { name } => usage(redis, &name).await,
        TenantCommand::Create(args) => put(redis, args, false).await,
        TenantCommand::SetLimits(args) => put(redis, args, true).await,
        TenantCommand::Show { name } => {
            let broker = Broker::connect(redis).await?;
            let record = broker.tenant(&name).await?.ok_or_else(|| {
                anyhow::anyhow!("no tenant {name:?} (create it with `wasmq tenant create`)")
            })?;
            println!(
                "{}",
                serde_json::to_string_pretty(&record).map_err(anyhow::Error::from)?
            );
            Ok(())
        }
        TenantCommand::List => {
            // `default` is a tenant whether or not it has a record.
            let broker = Broker::connect(redis).await?;
            let mut names = broker.tenant_names().await?;
            if !names.iter().any(|n| n == "default") {
                println!("default (no record: uncapped)");
            }
            names.sort();
            for name in names {
                println!("{name}");
            }
            Ok(())
        }
    }
}

/// Create (or, with `merge`, update) a tenant's record.
async fn put(redis: &str, args: LimitArgs, merge: bool) -> Result<(), CliError> {
    crate::keys::valid_tenant(&args.name).map_err(anyhow::Error::msg)?;
    let broker = Broker::connect(redis).await?;
    let mut record = match broker.tenant(&args.name).await? {
        Some(existing) if merge => existing,
        None if merge => {
            return Err(anyhow::anyhow!("no tenant {:?} (create it first)", args.name).into())
        }
        _ => Tenant {
            name: args.name.clone(),
            limits: TenantLimits::default(),
        },
    };
    args.apply(&mut record.limits);
    broker.put_tenant(&record).await?;
    println!(
        "{}",
        serde_json::to_string(&record).map_err(anyhow::Error::from)?
    );
    Ok(())
}

async fn usage(redis: &str, tenant: &str) -> Result<(), CliError> {
    crate::keys::valid_tenant(tenant).map_err(anyhow::Error::msg)?;
    let broker = Broker::connect(redis).await?;
    let mut usage = serde_json::Map::new();
    usage.insert("tenant".into(), tenant.into());
    for field in [
        "runs",
        "fuel",
        "wall_time_us",
        "run_time_us",
        "memory_byte_seconds",
        "net_out_bytes",
        "net_in_bytes",
        "denied",
        "db_time_us",
        "db_rows",
        "wasted_runs",
        "wasted_fuel",
        "wasted_wall_time_us",
        "wasted_run_time_us",
        "store_bytes",
        "store_keys",
        "idempotency_keys",
        "children_this_minute",
    ] {
        usage.insert(field.into(), 0.into());
    }
    for (field, value) in broker.usage(tenant).await? {
        usage.insert(field, value.into());
    }
    println!("{}", serde_json::Value::Object(usage));
    Ok(())
}

async fn acl(redis: &str, args: AclArgs) -> Result<(), CliError> {
    crate::keys::valid_tenant(&args.name).map_err(anyhow::Error::msg)?;
    // The producer may put jobs on the queues of the tenant's deployed
    // tasks, and on no other.
    let broker = Broker::connect(redis).await?;
    let queues: Vec<String> = broker
        .tasks(&args.name)
        .await?
        .into_iter()
        .map(|t| t.policy.queue)
        .collect();
    let acl = ProducerAcl::new(&args.name, &queues).map_err(anyhow::Error::msg)?;
    let generated = args.password.is_none();
    let password = args.password.unwrap_or_else(random_password);
    print!("{}", acl.script(&password));
    if generated {
        println!("# password of {} (shown once): {password}", acl.user);
    }
    if args.apply {
        acl.apply(&mut broker.connection(), &password).await?;
        println!(
            "# applied: producers connect as redis://{}:PASSWORD@HOST:PORT with --tenant {}",
            acl.user, acl.tenant
        );
    }
    Ok(())
}
