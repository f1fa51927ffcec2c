//! A tenant's directory caps on the host (`--allow-dir`): which cap a
//! directory grant falls under, and opening the grant *beneath* that cap.
//!
//! A lexical check is not enough. `/srv/acme/../../etc` starts with
//! `/srv/acme`, and `/srv/acme/esc` may be a symlink to `..` that the
//! tenant's own guest created through a writable grant. So a grant is
//! opened the way a guest's own paths are: the cap directory is opened,
//! then the grant's path relative to it is opened through cap-std, which
//! refuses `..` and every symlink that leads out of the cap (on Linux with
//! `openat2(RESOLVE_BENEATH)` where the kernel has it; elsewhere, and on
//! older kernels, by resolving one component at a time without following
//! symlinks out). The handle that comes back is the directory the guest
//! gets: nothing resolves the path again later, so a symlink swapped in
//! after the check changes nothing.
//!
//! Cap directories are the operator's: their own paths are opened as given,
//! symlinks and all. A grant under several caps is opened beneath the
//! outermost one, so a cap nested inside another tenant-writable cap cannot
//! be redirected by a symlink. Do not put one tenant's cap inside a
//! directory another tenant may write.

use std::io;
use std::path::{Component, Path, PathBuf};

use cap_std::ambient_authority;
use cap_std::fs::Dir;

/// Whether `path` is absolute and has no `..` component: the only paths a
/// grant or a cap may name.
pub fn clean_absolute(path: &Path) -> bool {
    path.is_absolute() && !path.components().any(|c| c == Component::ParentDir)
}

/// The outermost of `caps` that `path` lies under, by path components
/// (`/srv/acme2` is not under `/srv/acme`). Caps that are not
/// [`clean_absolute`] never match.
pub fn outermost_cap<'a>(path: &Path, caps: &'a [PathBuf]) -> Option<&'a Path> {
    if !clean_absolute(path) {
        return None;
    }
    caps.iter()
        .filter(|cap| clean_absolute(cap) && path.starts_with(cap))
        .min_by_key(|cap| cap.components().count())
        .map(PathBuf::as_path)
}

/// Why a directory could not be opened.
#[derive(Debug)]
pub enum OpenError {
    /// The cap or the grant does not exist, or is not a directory.
    Missing(io::Error),
    /// Resolving the grant beneath its cap led out of the cap (a symlink
    /// pointing up or to an absolute path).
    Escapes(io::Error),
    /// Anything else: permissions, I/O.
    Failed(io::Error),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Missing(e) => write!(f, "it does not exist or is not a directory ({e})"),
            OpenError::Escapes(e) => write!(f, "a symlink in it leads outside ({e})"),
            OpenError::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// Open `path` beneath the directory `cap` (`path` must lie under `cap`;
/// see [`outermost_cap`]). Blocking: a few `openat` calls.
pub fn open_beneath(cap: &Path, path: &Path) -> Result<Dir, OpenError> {
    let root = Dir::open_ambient_dir(cap, ambient_authority()).map_err(classify)?;
    let relative = path.strip_prefix(cap).map_err(|_| {
        OpenError::Escapes(io::Error::other(format!(
            "{} is not under {}",
            path.display(),
            cap.display()
        )))
    })?;
    if relative.as_os_str().is_empty() {
        return Ok(root);
    }
    root.open_dir(relative).map_err(classify)
}

/// Open `path` for a job with no directory caps (a tenant without a record
/// or without `--allow-dir`, or `wasmq run`): as the worker process may.
pub fn open_uncapped(path: &Path) -> Result<Dir, OpenError> {
    Dir::open_ambient_dir(path, ambient_authority()).map_err(classify)
}

fn classify(e: io::Error) -> OpenError {
    if matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    ) {
        return OpenError::Missing(e);
    }
    // cap-std reports an escape as PermissionDenied without an OS error
    // code ("a path led outside of the filesystem"); it maps openat2's
    // EXDEV to the same, but a raw EXDEV is an escape too.
    let escape =
        (e.kind() == io::ErrorKind::PermissionDenied && e.raw_os_error().is_none()) || is_exdev(&e);
    if escape {
        OpenError::Escapes(e)
    } else {
        OpenError::Failed(e)
    }
}

#[cfg(unix)]
fn is_exdev(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EXDEV)
}

#[cfg(not(unix))]
fn is_exdev(_: &io::Error) -> bool {
    false
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "wasmq-dircaps-{tag}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(dir.join("cap/inner")).unwrap();
        std::fs::create_dir_all(dir.join("outside")).unwrap();
        dir
    }

    #[test]
    fn caps_match_by_component_and_the_outermost_wins() {
        let caps = vec![
            PathBuf::from("/srv/acme/data"),
            PathBuf::from("/srv/acme"),
            PathBuf::from("/srv/../etc"),
            PathBuf::from("relative"),
        ];
        assert_eq!(
            outermost_cap(Path::new("/srv/acme/data/x"), &caps),
            Some(Path::new("/srv/acme"))
        );
        assert_eq!(outermost_cap(Path::new("/srv/acme2"), &caps), None);
        assert_eq!(outermost_cap(Path::new("/srv/acme/../x"), &caps), None);
        assert_eq!(outermost_cap(Path::new("/etc/passwd"), &caps), None);
        assert_eq!(outermost_cap(Path::new("relative/x"), &caps), None);
    }

    #[test]
    fn a_symlink_out_of_the_cap_is_refused_and_one_inside_is_not() {
        let dir = scratch("open");
        let cap = dir.join("cap");
        std::os::unix::fs::symlink("..", cap.join("up")).unwrap();
        std::os::unix::fs::symlink(dir.join("outside"), cap.join("abs")).unwrap();
        std::os::unix::fs::symlink("inner", cap.join("alias")).unwrap();
        for escape in ["up", "abs", "up/outside", "inner/../../outside"] {
            match open_beneath(&cap, &cap.join(escape)) {
                Err(OpenError::Escapes(_)) => {}
                other => panic!("{escape}: expected an escape, got {other:?}"),
            }
        }
        assert!(open_beneath(&cap, &cap.join("alias")).is_ok());
        assert!(open_beneath(&cap, &cap).is_ok());
        assert!(matches!(
            open_beneath(&cap, &cap.join("missing")),
            Err(OpenError::Missing(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
