//! The files a job can reach: its directory grants, opened beneath its
//! tenant's caps, and `wasi:filesystem` as the guest sees it, with growth
//! under writable grants charged to the tenant's disk quota.
//!
//! Grants ([`open_grants`]): each is checked against the tenant's current
//! record (`TenantLimits::grant_refusal`: absolute, no `..`, beneath an
//! allowed directory, a quota for writable ones) and opened beneath its cap
//! through cap-std ([`crate::dir_caps`]). That open handle is exactly the
//! directory the guest gets: `wasi:filesystem/preopens.get-directories` is
//! ours and hands out wasmtime-wasi directory descriptors built from the
//! handles, so no path is resolved a second time (wasmtime-wasi's
//! `WasiCtxBuilder::preopened_dir` would reopen it by path, leaving a window
//! for a symlink swap). Any refusal fails the job `denied`, naming the
//! grant and the cap; a grant is never dropped silently.
//!
//! `wasi:filesystem/types` ([`GrantedFs`]) is wasmtime-wasi's own, wrapped:
//! every function delegates to it, linked over it with shadowing so the
//! compiler sees every function of the interface. Before delegating, the
//! calls that take disk through a writable descriptor are charged to the
//! job's [`JobDisk`]: `write` and `set-size` by the bytes they make the file
//! longer by (its length read with `fstat`), `write-via-stream` and
//! `append-via-stream` by wrapping the stream they return ([`MeteredOutput`])
//! so every stream write is charged the same way, and `open-at` with
//! `create`, `create-directory-at`, `symlink-at` and `link-at` one entry
//! each. A refused charge fails the call with `insufficient-space` (the
//! stream with `last-operation-failed` carrying that code) and records the
//! refusal (see `sandbox::disk`). Read-only grants and uncapped tenants
//! are not metered.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use wasmtime::component::{HasData, Linker, Resource};
use wasmtime_wasi::filesystem::{Descriptor, Dir as WasiDir, WasiFilesystemCtxView};
use wasmtime_wasi::p2::bindings::filesystem::{preopens, types};
use wasmtime_wasi::p2::{
    DynInputStream, DynOutputStream, FsError, FsResult, OutputStream, Pollable, StreamError,
    StreamResult,
};
use wasmtime_wasi::{FsPerms, OpenMode};

use super::disk::{JobDisk, ENTRY_BYTES};
use super::state::HostState;
use crate::dir_caps::{self, OpenError};
use crate::policy::DirGrant;
use crate::tenants::TenantLimits;

/// A job's grants, opened: what the guest's preopens are, and what its
/// disk quota is charged against.
#[derive(Default)]
pub(crate) struct JobFiles {
    /// The preopened directories and the path the guest sees each at.
    pub(crate) preopens: Vec<(WasiDir, String)>,
    /// The tenant's disk account, for a job with writable grants and a quota.
    pub(crate) disk: Option<JobDisk>,
}

impl JobFiles {
    /// The first write refused for the disk quota, if any.
    pub(crate) fn quota_refusal(&self) -> Option<&str> {
        self.disk.as_ref()?.refusal()
    }
}

/// Grants opened by [`open_grants`].
pub(crate) struct OpenedGrants {
    /// For the guest's preopens.
    pub(crate) preopens: Vec<(WasiDir, String)>,
    /// Writable grants: host path and a handle of their own, to measure.
    pub(crate) writable: Vec<(PathBuf, cap_std::fs::Dir)>,
}

/// Open `dirs` for a job of `tenant`, whose current record is `limits`
/// (`None`: no record, or `wasmq run`: grants are opened as the worker may,
/// but never with `..`). The error names the grant, the cap and the fix.
/// Blocking: a few `openat` calls per grant.
pub(crate) fn open_grants(
    tenant: &str,
    limits: Option<&TenantLimits>,
    dirs: &[DirGrant],
) -> Result<OpenedGrants, String> {
    let mut opened = OpenedGrants {
        preopens: Vec::with_capacity(dirs.len()),
        writable: Vec::new(),
    };
    for grant in dirs {
        let dir = open_grant(tenant, limits, grant)?;
        let (perms, mode) = if grant.read_only {
            (FsPerms::ReadOnly, OpenMode::READ)
        } else {
            let own = dir.try_clone().map_err(|e| {
                format!(
                    "directory grant {} could not be opened twice: {e}",
                    grant.host_path.display()
                )
            })?;
            opened.writable.push((grant.host_path.clone(), own));
            (FsPerms::ReadWrite, OpenMode::READ | OpenMode::WRITE)
        };
        let dir = WasiDir::new(dir.into_std_file(), perms, mode, false);
        opened.preopens.push((dir, grant.guest_path.clone()));
    }
    Ok(opened)
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

/// Link our `wasi:filesystem` over wasmtime-wasi's (already in `linker`).
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    types::add_to_linker::<HostState, GrantedFilesystem>(linker, granted_fs)?;
    preopens::add_to_linker::<HostState, GrantedFilesystem>(linker, granted_fs)?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The [`HasData`] of our filesystem interfaces.
struct GrantedFilesystem;

impl HasData for GrantedFilesystem {
    type Data<'a> = GrantedFs<'a>;
}

fn granted_fs(state: &mut HostState) -> GrantedFs<'_> {
    GrantedFs {
        fs: WasiFilesystemCtxView {
            ctx: state.wasi.filesystem(),
            table: &mut state.table,
        },
        files: &state.files,
    }
}

/// wasmtime-wasi's filesystem view, with the job's grants and disk account.
pub(crate) struct GrantedFs<'a> {
    fs: WasiFilesystemCtxView<'a>,
    files: &'a JobFiles,
}

/// The same descriptor again (methods take their handle by value).
fn again(fd: &Resource<types::Descriptor>) -> Resource<types::Descriptor> {
    Resource::new_borrow(fd.rep())
}

/// The error a write refused for the quota fails with: ENOSPC, which
/// wasmtime-wasi reports to the guest as `insufficient-space`.
fn no_space() -> std::io::Error {
    #[cfg(unix)]
    return std::io::Error::from_raw_os_error(libc::ENOSPC);
    #[cfg(not(unix))]
    return std::io::Error::from(std::io::ErrorKind::StorageFull);
}

/// Bytes a write of `len` at `offset` makes a file of `current` bytes
/// longer by.
fn growth(current: u64, offset: u64, len: u64) -> u64 {
    offset.saturating_add(len).saturating_sub(current)
}

/// A file's length now; unknown counts as empty (charging more, not less).
fn length(file: &std::fs::File) -> u64 {
    // fstat: no disk I/O, so not worth a trip to a blocking thread.
    file.metadata().map_or(0, |m| m.len())
}

impl<'a> GrantedFs<'a> {
    /// The disk account and the open file, when `fd` is a file the guest
    /// may write and the job is metered.
    fn metered_file(
        &self,
        fd: &Resource<types::Descriptor>,
    ) -> Option<(&'a JobDisk, Arc<std::fs::File>)> {
        let files: &'a JobFiles = self.files;
        let disk = files.disk.as_ref()?;
        match self.fs.table.get(fd).ok()? {
            Descriptor::File(f) if !f.perms.write_not_permitted() => Some((disk, f.file.clone())),
            _ => None,
        }
    }

    /// The disk account, when `fd` is a directory the guest may change and
    /// the job is metered.
    fn metered_dir(&self, fd: &Resource<types::Descriptor>) -> Option<&'a JobDisk> {
        let files: &'a JobFiles = self.files;
        let disk = files.disk.as_ref()?;
        match self.fs.table.get(fd).ok()? {
            Descriptor::Dir(d) if !d.perms.write_not_permitted() => Some(disk),
            _ => None,
        }
    }

    /// Charge one new entry under `fd`, or fail with `insufficient-space`.
    fn charge_entry(&self, fd: &Resource<types::Descriptor>) -> FsResult<Option<&'a JobDisk>> {
        match self.metered_dir(fd) {
            Some(disk) if !disk.charge(ENTRY_BYTES) => Err(no_space().into()),
            metered => Ok(metered),
        }
    }

    /// Replace `stream` in the table by one that charges `disk` first.
    fn meter(
        &mut self,
        stream: Resource<DynOutputStream>,
        disk: &JobDisk,
        extends: Extends,
    ) -> FsResult<Resource<DynOutputStream>> {
        let inner: DynOutputStream = self.fs.table.delete(stream)?;
        let metered: DynOutputStream = Box::new(MeteredOutput {
            inner,
            disk: disk.clone(),
            extends,
            refused: false,
        });
        Ok(self.fs.table.push(metered)?)
    }
}

/// Give back `charged` on `disk` if `result` failed: the change did not happen.
fn settle<T>(result: FsResult<T>, disk: Option<&JobDisk>, charged: u64) -> FsResult<T> {
    if let (Err(_), Some(disk)) = (&result, disk) {
        disk.refund(charged);
    }
    result
}

impl types::Host for GrantedFs<'_> {
    fn convert_error_code(&mut self, err: FsError) -> wasmtime::Result<types::ErrorCode> {
        types::Host::convert_error_code(&mut self.fs, err)
    }

    fn filesystem_error_code(
        &mut self,
        err: Resource<wasmtime::Error>,
    ) -> wasmtime::Result<Option<types::ErrorCode>> {
        types::Host::filesystem_error_code(&mut self.fs, err)
    }
}

impl preopens::Host for GrantedFs<'_> {
    fn get_directories(&mut self) -> wasmtime::Result<Vec<(Resource<Descriptor>, String)>> {
        let mut out = Vec::with_capacity(self.files.preopens.len());
        for (dir, guest_path) in &self.files.preopens {
            let fd = self.fs.table.push(Descriptor::Dir(dir.clone()))?;
            out.push((fd, guest_path.clone()));
        }
        Ok(out)
    }
}

use types::HostDescriptor as Wasi;

impl types::HostDescriptor for GrantedFs<'_> {
    async fn write(
        &mut self,
        fd: Resource<types::Descriptor>,
        buf: Vec<u8>,
        offset: types::Filesize,
    ) -> FsResult<types::Filesize> {
        let Some((disk, file)) = self.metered_file(&fd) else {
            return Wasi::write(&mut self.fs, fd, buf, offset).await;
        };
        let charged = growth(length(&file), offset, buf.len() as u64);
        if !disk.charge(charged) {
            return Err(no_space().into());
        }
        settle(
            Wasi::write(&mut self.fs, fd, buf, offset).await,
            Some(disk),
            charged,
        )
    }

    async fn set_size(
        &mut self,
        fd: Resource<types::Descriptor>,
        size: types::Filesize,
    ) -> FsResult<()> {
        let Some((disk, file)) = self.metered_file(&fd) else {
            return Wasi::set_size(&mut self.fs, fd, size).await;
        };
        let charged = growth(length(&file), size, 0);
        if !disk.charge(charged) {
            return Err(no_space().into());
        }
        settle(
            Wasi::set_size(&mut self.fs, fd, size).await,
            Some(disk),
            charged,
        )
    }

    fn write_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynOutputStream>> {
        let metered = self.metered_file(&fd);
        let stream = Wasi::write_via_stream(&mut self.fs, fd, offset)?;
        match metered {
            Some((disk, file)) => {
                let extends = Extends::At {
                    position: offset,
                    known_length: length(&file),
                };
                self.meter(stream, disk, extends)
            }
            None => Ok(stream),
        }
    }

    fn append_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<Resource<DynOutputStream>> {
        let metered = self.metered_file(&fd);
        let stream = Wasi::append_via_stream(&mut self.fs, fd)?;
        match metered {
            Some((disk, _)) => self.meter(stream, disk, Extends::Always),
            None => Ok(stream),
        }
    }

    async fn open_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        oflags: types::OpenFlags,
        flags: types::DescriptorFlags,
    ) -> FsResult<Resource<types::Descriptor>> {
        let metered = match self.metered_dir(&fd) {
            Some(disk) if oflags.contains(types::OpenFlags::CREATE) => Some(disk),
            _ => None,
        };
        let Some(disk) = metered else {
            return Wasi::open_at(&mut self.fs, fd, path_flags, path, oflags, flags).await;
        };
        // Only a file that does not exist yet costs an entry. (Another job
        // creating it between the two calls costs one entry uncounted.)
        let creates = oflags.contains(types::OpenFlags::EXCLUSIVE)
            || Wasi::stat_at(&mut self.fs, again(&fd), path_flags, path.clone())
                .await
                .is_err();
        let charged = if creates { ENTRY_BYTES } else { 0 };
        if !disk.charge(charged) {
            return Err(no_space().into());
        }
        settle(
            Wasi::open_at(&mut self.fs, fd, path_flags, path, oflags, flags).await,
            Some(disk),
            charged,
        )
    }

    async fn create_directory_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        let disk = self.charge_entry(&fd)?;
        let result = Wasi::create_directory_at(&mut self.fs, fd, path).await;
        settle(result, disk, ENTRY_BYTES)
    }

    async fn symlink_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        src_path: String,
        dest_path: String,
    ) -> FsResult<()> {
        let disk = self.charge_entry(&fd)?;
        let result = Wasi::symlink_at(&mut self.fs, fd, src_path, dest_path).await;
        settle(result, disk, ENTRY_BYTES)
    }

    async fn link_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        old_path_flags: types::PathFlags,
        old_path: String,
        new_descriptor: Resource<types::Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        let disk = self.charge_entry(&new_descriptor)?;
        let result = Wasi::link_at(
            &mut self.fs,
            fd,
            old_path_flags,
            old_path,
            new_descriptor,
            new_path,
        )
        .await;
        settle(result, disk, ENTRY_BYTES)
    }

    // Everything below changes no length and adds no entry: wasmtime-wasi's,
    // as it is.

    async fn advise(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
        len: types::Filesize,
        advice: types::Advice,
    ) -> FsResult<()> {
        Wasi::advise(&mut self.fs, fd, offset, len, advice).await
    }

    async fn sync_data(&mut self, fd: Resource<types::Descriptor>) -> FsResult<()> {
        Wasi::sync_data(&mut self.fs, fd).await
    }

    async fn get_flags(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<types::DescriptorFlags> {
        Wasi::get_flags(&mut self.fs, fd).await
    }

    async fn get_type(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<types::DescriptorType> {
        Wasi::get_type(&mut self.fs, fd).await
    }

    async fn set_times(
        &mut self,
        fd: Resource<types::Descriptor>,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        Wasi::set_times(&mut self.fs, fd, atim, mtim).await
    }

    async fn read(
        &mut self,
        fd: Resource<types::Descriptor>,
        len: types::Filesize,
        offset: types::Filesize,
    ) -> FsResult<(Vec<u8>, bool)> {
        Wasi::read(&mut self.fs, fd, len, offset).await
    }

    async fn read_directory(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<Resource<types::DirectoryEntryStream>> {
        Wasi::read_directory(&mut self.fs, fd).await
    }

    async fn sync(&mut self, fd: Resource<types::Descriptor>) -> FsResult<()> {
        Wasi::sync(&mut self.fs, fd).await
    }

    async fn stat(&mut self, fd: Resource<types::Descriptor>) -> FsResult<types::DescriptorStat> {
        Wasi::stat(&mut self.fs, fd).await
    }

    async fn stat_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::DescriptorStat> {
        Wasi::stat_at(&mut self.fs, fd, path_flags, path).await
    }

    async fn set_times_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        Wasi::set_times_at(&mut self.fs, fd, path_flags, path, atim, mtim).await
    }

    fn drop(&mut self, fd: Resource<types::Descriptor>) -> wasmtime::Result<()> {
        Wasi::drop(&mut self.fs, fd)
    }

    async fn readlink_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<String> {
        Wasi::readlink_at(&mut self.fs, fd, path).await
    }

    async fn remove_directory_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        Wasi::remove_directory_at(&mut self.fs, fd, path).await
    }

    async fn rename_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        old_path: String,
        new_fd: Resource<types::Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        Wasi::rename_at(&mut self.fs, fd, old_path, new_fd, new_path).await
    }

    async fn unlink_file_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        Wasi::unlink_file_at(&mut self.fs, fd, path).await
    }

    fn read_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynInputStream>> {
        Wasi::read_via_stream(&mut self.fs, fd, offset)
    }

    async fn is_same_object(
        &mut self,
        a: Resource<types::Descriptor>,
        b: Resource<types::Descriptor>,
    ) -> wasmtime::Result<bool> {
        Wasi::is_same_object(&mut self.fs, a, b).await
    }

    async fn metadata_hash(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<types::MetadataHashValue> {
        Wasi::metadata_hash(&mut self.fs, fd).await
    }

    async fn metadata_hash_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::MetadataHashValue> {
        Wasi::metadata_hash_at(&mut self.fs, fd, path_flags, path).await
    }
}

impl types::HostDirectoryEntryStream for GrantedFs<'_> {
    async fn read_directory_entry(
        &mut self,
        stream: Resource<types::DirectoryEntryStream>,
    ) -> FsResult<Option<types::DirectoryEntry>> {
        types::HostDirectoryEntryStream::read_directory_entry(&mut self.fs, stream).await
    }

    fn drop(&mut self, stream: Resource<types::DirectoryEntryStream>) -> wasmtime::Result<()> {
        types::HostDirectoryEntryStream::drop(&mut self.fs, stream)
    }
}

/// Which bytes written to a stream make its file longer.
#[derive(Debug, Clone, Copy)]
enum Extends {
    /// `append-via-stream`: every byte.
    Always,
    /// `write-via-stream`: bytes written past the file's known length.
    At {
        /// Where the next write lands.
        position: u64,
        /// The file's length as far as this stream knows (its length when
        /// the stream was opened, grown by this stream's writes; another
        /// writer growing the file makes this charge more, never less).
        known_length: u64,
    },
}

/// A file output stream whose writes are charged to the disk quota first.
struct MeteredOutput {
    inner: DynOutputStream,
    disk: JobDisk,
    extends: Extends,
    /// A charge was refused: the stream is closed, as after any failed write.
    refused: bool,
}

impl MeteredOutput {
    /// Charge a write of `len` bytes, or fail it with `insufficient-space`.
    fn charge(&mut self, len: usize) -> StreamResult<()> {
        if self.refused {
            return Err(StreamError::Closed);
        }
        let len = len as u64;
        let charged = match &mut self.extends {
            Extends::Always => len,
            Extends::At {
                position,
                known_length,
            } => {
                let end = position.saturating_add(len);
                let more = end.saturating_sub(*known_length);
                *position = end;
                *known_length = (*known_length).max(end);
                more
            }
        };
        if self.disk.charge(charged) {
            return Ok(());
        }
        self.refused = true;
        Err(StreamError::LastOperationFailed(wasmtime::Error::new(
            no_space(),
        )))
    }
}

#[async_trait::async_trait]
impl OutputStream for MeteredOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.charge(bytes.len())?;
        self.inner.write(bytes)
    }

    async fn blocking_write_and_flush(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.charge(bytes.len())?;
        self.inner.blocking_write_and_flush(bytes).await
    }

    fn write_zeroes(&mut self, nelem: usize) -> StreamResult<()> {
        self.charge(nelem)?;
        self.inner.write_zeroes(nelem)
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        if self.refused {
            return Err(StreamError::Closed);
        }
        self.inner.check_write()
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await
    }
}

#[async_trait::async_trait]
impl Pollable for MeteredOutput {
    async fn ready(&mut self) {
        self.inner.ready().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bytes_past_the_end_make_a_file_longer() {
        assert_eq!(growth(100, 0, 50), 0, "an overwrite is free");
        assert_eq!(growth(100, 90, 50), 40);
        assert_eq!(
            growth(0, 1 << 40, 1),
            (1 << 40) + 1,
            "a hole counts in full"
        );
        assert_eq!(growth(10, u64::MAX, 10), u64::MAX - 10, "no overflow");
    }
}
