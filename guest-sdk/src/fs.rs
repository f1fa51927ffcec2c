//! Files in the directories granted to the task, with refusals that say so.
//!
//! A task sees only the directories its policy grants (`--dir`, or `dirs`
//! in the manifest). With plain `std::fs`, a path outside every grant fails
//! with a bare "not found", because WASI resolves it against no directory
//! at all and the host never sees the request. These wrappers check the path
//! against the grants first, so such a path fails as `denied` with a message
//! naming the path and the grants. Escapes through `..` or symlinks inside a
//! grant are refused by the host's capability handles (cap-std) and reported
//! as `denied` too.

use std::path::{Component, Path, PathBuf};

use crate::TaskError;

/// Read a granted file into a string.
pub fn read_to_string(path: impl AsRef<Path>) -> Result<String, TaskError> {
    let path = granted(path.as_ref())?;
    Ok(std::fs::read_to_string(path)?)
}

/// Read a granted file.
pub fn read(path: impl AsRef<Path>) -> Result<Vec<u8>, TaskError> {
    let path = granted(path.as_ref())?;
    Ok(std::fs::read(path)?)
}

/// Write a file in a granted, writable directory.
pub fn write(path: impl AsRef<Path>, contents: impl AsRef<[u8]>) -> Result<(), TaskError> {
    let path = granted(path.as_ref())?;
    Ok(std::fs::write(path, contents)?)
}

/// The directories granted to this task, as the guest sees them.
pub fn grants() -> Vec<String> {
    preopen_paths()
}

#[cfg(target_arch = "wasm32")]
fn preopen_paths() -> Vec<String> {
    wasip2::filesystem::preopens::get_directories()
        .into_iter()
        .map(|(_descriptor, path)| path)
        .collect()
}

#[cfg(not(target_arch = "wasm32"))]
fn preopen_paths() -> Vec<String> {
    Vec::new()
}

/// `path` with `.` and `..` resolved lexically, if it stays within a grant.
fn granted(path: &Path) -> Result<PathBuf, TaskError> {
    let grants = preopen_paths();
    match resolve(path) {
        Some(resolved)
            if grants
                .iter()
                .any(|g| resolved.starts_with(normalise_grant(g))) =>
        {
            Ok(resolved)
        }
        _ => Err(TaskError::kind(
            TaskError::DENIED,
            format!(
                "path {} is outside the directories granted to this task (granted: {})",
                path.display(),
                if grants.is_empty() {
                    "none".to_string()
                } else {
                    grants.join(", ")
                }
            ),
        )),
    }
}

fn normalise_grant(grant: &str) -> PathBuf {
    resolve(Path::new(grant)).unwrap_or_default()
}

/// Resolve `.` and `..` without touching the filesystem; `None` if `..`
/// climbs above the start. Relative paths resolve against `.` (the grant
/// named "." if there is one).
fn resolve(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    let mut depth = 0usize;
    for component in path.components() {
        match component {
            Component::RootDir => out.push("/"),
            Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                if depth == 0 {
                    return None;
                }
                out.pop();
                depth -= 1;
            }
            Component::Normal(part) => {
                out.push(part);
                depth += 1;
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_dot_cannot_climb_out() {
        assert_eq!(
            resolve(Path::new("/data/../etc/passwd")),
            Some(PathBuf::from("/etc/passwd"))
        );
        assert_eq!(
            resolve(Path::new("/data/a/./b")),
            Some(PathBuf::from("/data/a/b"))
        );
        assert_eq!(resolve(Path::new("../etc/passwd")), None);
        assert!(!resolve(Path::new("/etc/passwd"))
            .unwrap()
            .starts_with("/data"));
        assert!(!resolve(Path::new("/database/x"))
            .unwrap()
            .starts_with("/data"));
    }
}
