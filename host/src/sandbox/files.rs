//! The files a job can reach: its directory grants, opened beneath its
//! tenant's caps.
//!
//! Grants ([`open_grants`]): each is checked against the tenant's current
//! record (`TenantLimits::grant_refusal`: absolute, no `..`, beneath an
//! allowed directory) and opened beneath its cap through cap-std
//! ([`crate::dir_caps`]). That open handle is exactly the directory the
//! guest gets: `wasi:filesystem/preopens.get-directories` is ours and hands
//! out wasmtime-wasi directory descriptors built from the handles, so no
//! path is resolved a second time (wasmtime-wasi's
//! `WasiCtxBuilder::preopened_dir` would reopen it by path, leaving a window
//! for a symlink swap). Any refusal fails the job `denied`, naming the
//! grant and the cap; a grant is never dropped silently.

use wasmtime::component::{HasData, Linker, Resource};
use wasmtime_wasi::filesystem::{Descriptor, Dir as WasiDir};
use wasmtime_wasi::p2::bindings::filesystem::preopens;
use wasmtime_wasi::{FsPerms, OpenMode};

use super::state::HostState;
use crate::dir_caps::{self, OpenError};
use crate::policy::DirGrant;
use crate::tenants::TenantLimits;

/// A job's grants, opened: what the guest's preopens are.
#[derive(Default)]
pub(crate) struct JobFiles {
    /// The preopened directories and the path the guest sees each at.
    pub(crate) preopens: Vec<(WasiDir, String)>,
}

/// Open `dirs` for a job of `tenant`, whose current record is `limits`
/// (`None`: no record, or `wasmq run`: grants are opened as the worker may,
/// but never with `..`). The error names the grant, the cap and the fix.
/// Blocking: a few `openat` calls per grant.
pub(crate) fn open_grants(
    tenant: &str,
    limits: Option<&TenantLimits>,
    dirs: &[DirGrant],
) -> Result<Vec<(WasiDir, String)>, String> {
    let mut preopens = Vec::with_capacity(dirs.len());
    for grant in dirs {
        let dir = open_grant(tenant, limits, grant)?;
        let (perms, mode) = if grant.read_only {
            (FsPerms::ReadOnly, OpenMode::READ)
        } else {
            (FsPerms::ReadWrite, OpenMode::READ | OpenMode::WRITE)
        };
        let dir = WasiDir::new(dir.into_std_file(), perms, mode, false);
        preopens.push((dir, grant.guest_path.clone()));
    }
    Ok(preopens)
}

fn open_grant(
    tenant: &str,
    limits: Option<&TenantLimits>,
    grant: &DirGrant,
) -> Result<cap_std::fs::Dir, String> {
    let path = &grant.host_path;
    grant.check()?;
    if let Some(refusal) = limits.and_then(|l| l.grant_refusal(tenant, grant)) {
        return Err(refusal);
    }
    let caps = limits.and_then(|l| l.allow_dirs.as_deref());
    let Some(caps) = caps else {
        return dir_caps::open_uncapped(path).map_err(|e| {
            format!(
                "directory grant {} could not be opened: {e}",
                path.display()
            )
        });
    };
    // grant_refusal found it under a cap; this cannot miss.
    let cap = dir_caps::outermost_cap(path, caps).ok_or_else(|| {
        format!(
            "directory grant {} is not beneath tenant {tenant:?}'s allowed directories",
            path.display()
        )
    })?;
    dir_caps::open_beneath(cap, path).map_err(|e| match e {
        OpenError::Escapes(_) => format!(
            "directory grant {} escapes tenant {tenant:?}'s allowed directory {}: {e}",
            path.display(),
            cap.display()
        ),
        OpenError::Missing(_) | OpenError::Failed(_) => format!(
            "directory grant {} could not be opened beneath tenant {tenant:?}'s allowed directory {}: {e}",
            path.display(),
            cap.display()
        ),
    })
}

/// Link our `wasi:filesystem/preopens` over wasmtime-wasi's (already in
/// `linker`).
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    preopens::add_to_linker::<HostState, GrantedFilesystem>(linker, granted_fs)?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The [`HasData`] of our filesystem interface.
struct GrantedFilesystem;

impl HasData for GrantedFilesystem {
    type Data<'a> = GrantedFs<'a>;
}

fn granted_fs(state: &mut HostState) -> GrantedFs<'_> {
    GrantedFs {
        table: &mut state.table,
        files: &state.files,
    }
}

/// The job's resource table, with its grants.
pub(crate) struct GrantedFs<'a> {
    table: &'a mut wasmtime::component::ResourceTable,
    files: &'a JobFiles,
}

impl preopens::Host for GrantedFs<'_> {
    fn get_directories(&mut self) -> wasmtime::Result<Vec<(Resource<Descriptor>, String)>> {
        let mut out = Vec::with_capacity(self.files.preopens.len());
        for (dir, guest_path) in &self.files.preopens {
            let fd = self.table.push(Descriptor::Dir(dir.clone()))?;
            out.push((fd, guest_path.clone()));
        }
        Ok(out)
    }
}
