//! The `config` host interface: a job reads the secrets its policy grants.
//!
//! Owns the job's view of secrets ([`JobSecrets`]): which names it may
//! read, the worker's key to open them with, and the values it read. A
//! value is fetched from the job's own tenant on the first read in a run
//! and kept only for that run (a fresh store per job), so a secret set
//! again takes effect for the next job. A name the policy does not grant
//! is refused before anything is looked up, and the refusal is recorded
//! among the job's denials (a job that then fails ends `denied`). Whatever
//! a run read is blotted out of what the host records from it (its log,
//! result, error message and kind, denials; see `redact` for the forms
//! looked for), and a child job or flow it starts may not carry it
//! ([`JobSecrets::refuse_in`]): a value a task prints or passes on by
//! mistake does not reach `status`, the dashboard or a log. Nothing here
//! logs a value, and the span records no name.

use std::collections::HashMap;
use std::sync::Arc;

use super::bindings::v0_2::wasmq::task0_1_0::types::HostError;
use super::bindings::v0_2::wasmq::task0_2_0::config;
use super::redact::Redactor;
use super::state::HostState;
use crate::secrets::{self, SecretsKey};

/// One job's secrets. See the module docs.
pub(crate) struct JobSecrets {
    /// The worker's key; `None` on a worker started without one.
    key: Option<Arc<SecretsKey>>,
    /// Names the task's policy grants.
    granted: Vec<String>,
    /// The job's task (a task's own value wins over the tenant's).
    task: String,
    /// What this run read, by name (`None`: granted but not set).
    read: HashMap<String, Option<String>>,
}

impl JobSecrets {
    /// The secrets of a job of `task` granted `granted`.
    pub(crate) fn new(key: Option<Arc<SecretsKey>>, granted: &[String], task: &str) -> Self {
        JobSecrets {
            key,
            granted: granted.to_vec(),
            task: task.to_string(),
            read: HashMap::new(),
        }
    }

    /// What finds the values this run read (see `redact`).
    pub(crate) fn redactor(&self) -> Redactor<'_> {
        Redactor::new(
            self.read
                .iter()
                .filter_map(|(name, value)| Some((name.as_str(), value.as_deref()?))),
        )
    }

    /// Refuse to write `texts` (a child job's task, payload and key, or a
    /// flow's definition) when any holds a value this run read: the new
    /// job's record would show it in `status` and the dashboard. The
    /// refusal names the secret, never the value; the child task should
    /// be granted the secret and read it itself.
    pub(crate) fn refuse_in(&self, what: &str, texts: &[&str]) -> Result<(), String> {
        if !self.any_read() {
            return Ok(());
        }
        let redactor = self.redactor();
        match texts.iter().find_map(|t| redactor.find(t)) {
            Some(name) => Err(format!(
                "{what} holding the value of secret {name:?} (pass the name and grant the \
                 child task the secret instead)"
            )),
            None => Ok(()),
        }
    }

    /// The job's task.
    pub(crate) fn task(&self) -> &str {
        &self.task
    }

    /// The worker's key, if it holds one.
    pub(crate) fn key(&self) -> Option<Arc<SecretsKey>> {
        self.key.clone()
    }

    /// Whether the run read any secret (nothing to redact otherwise).
    pub(crate) fn any_read(&self) -> bool {
        self.read.values().any(Option::is_some)
    }
}

impl config::Host for HostState {
    #[tracing::instrument(level = "debug", name = "config.get", skip_all)]
    async fn get(&mut self, name: String) -> Result<Option<String>, HostError> {
        if let Some(value) = self.secrets.read.get(&name) {
            return Ok(value.clone());
        }
        if !self.secrets.granted.contains(&name) {
            // Checked before the name's shape: a refusal of any string
            // the guest passes, however it is spelled, is `denied`.
            let mut end = name.len().min(64);
            while !name.is_char_boundary(end) {
                end -= 1;
            }
            let shown = &name[..end];
            let what = format!("secret {shown:?} (not in the task's sandbox.secrets)");
            self.denials.record(what.clone());
            return Err(HostError::Denied(what));
        }
        secrets::check_name(&name).map_err(HostError::Invalid)?;
        let found = self
            .backend
            .secret_sealed(&self.scope.tenant, &self.secrets.task, &name)
            .await
            .map_err(|e| self.fault(e))?;
        let value = match found {
            None => None,
            Some((field, sealed)) => {
                let Some(key) = self.secrets.key.clone() else {
                    let m = format!(
                        "this worker holds no secrets key to open secret {name:?}; start it \
                         with {} or {}",
                        secrets::KEY_FILE_ENV,
                        secrets::KEY_ENV
                    );
                    let _ = self.host_fault.set(m.clone());
                    return Err(HostError::Unavailable(m));
                };
                let plain = key.open(&self.scope.tenant, &field, &sealed).map_err(|m| {
                    let _ = self.host_fault.set(m.clone());
                    HostError::Unavailable(m)
                })?;
                Some(String::from_utf8(plain).map_err(|_| {
                    HostError::Invalid(format!("secret {name:?} is not UTF-8 text"))
                })?)
            }
        };
        self.secrets.read.insert(name, value.clone());
        Ok(value)
    }
}
