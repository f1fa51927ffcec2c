//! `wasmq build TASK.py -o TASK.wasm`: a Python task made a component.
//!
//! componentize-py does the work; this command finds it (and says how to
//! install it when it is missing), lays out a build directory with the
//! Python world's WIT and the `wasmq` SDK package (both embedded in the
//! binary, see `py_sdk_files`) and a generated entry module, bundles the
//! task's pure-Python requirements, and turns componentize-py's failures
//! into errors that name the task's file and line.
//!
//! componentize-py sees three Python path entries, in order: the build
//! directory (`wasmq/`, the entry module), the task's directory (its
//! module and anything beside it it imports) and, with requirements, the
//! directory pip installed them into.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use clap::Args;

use super::py_sdk_files;
use super::{format, CliError};

/// The componentize-py release the SDK and the engine's limits are tested
/// with (the Makefile's `COMPONENTIZE_PY_VERSION`).
pub const PINNED_COMPONENTIZE_PY: &str = "0.25.1";

/// Environment variable naming the componentize-py executable to use.
pub const COMPONENTIZE_PY_ENV: &str = "WASMQ_COMPONENTIZE_PY";

/// The module componentize-py loads; generated, never the user's.
const ENTRY_MODULE: &str = "wasmq_entry";

/// Module names a task file may not take: they would shadow the SDK, the
/// generated bindings or the entry module.
const RESERVED_MODULES: [&str; 6] = [
    "wasmq",
    ENTRY_MODULE,
    "wit_world",
    "componentize_py_types",
    "componentize_py_runtime",
    "componentize_py_async_support",
];

/// File endings of native extensions, which a WebAssembly task cannot load.
const NATIVE_EXTENSIONS: [&str; 3] = ["so", "pyd", "dylib"];

/// Flags of `wasmq build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The task's Python file: one function in it is marked `@task`
    /// (`from wasmq import task`).
    pub task: PathBuf,
    /// Where to write the component (default: TASK with `.wasm`).
    #[arg(short, long, value_name = "TASK.wasm")]
    pub output: Option<PathBuf>,
    /// Pure-Python packages to bundle, a pip requirements file (default:
    /// `requirements.txt` beside TASK, when there is one). Installed with
    /// the pip of componentize-py's virtualenv; a package with native
    /// extensions is refused.
    #[arg(short = 'r', long, value_name = "FILE")]
    pub requirements: Option<PathBuf>,
}

/// Run `wasmq build`.
pub async fn build(args: BuildArgs) -> Result<(), CliError> {
    // Minutes of blocking child processes: keep them off the async runtime.
    tokio::task::spawn_blocking(move || build_blocking(&args))
        .await
        .map_err(|e| anyhow!("the build thread failed: {e}"))??;
    Ok(())
}

fn build_blocking(args: &BuildArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let task = std::fs::canonicalize(&args.task)
        .with_context(|| format!("reading the task {}", args.task.display()))?;
    let module = module_name(&task)?;
    let task_dir = task.parent().context("the task file has no directory")?;
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| args.task.with_extension("wasm"));

    let componentize_py = find_componentize_py()?;
    check_version(&componentize_py);

    let build = BuildDir::new()?;
    let wit = build.path().join("wit");
    std::fs::create_dir_all(&wit)?;
    py_sdk_files::write_under(build.path(), "wit/")?;
    let python_dir = build.path().join("python");
    py_sdk_files::write_under(&python_dir, "wasmq/")?;

    let mut python_path = vec![python_dir.clone(), task_dir.to_path_buf()];
    let requirements = match &args.requirements {
        Some(file) => Some(file.clone()),
        None => Some(task_dir.join("requirements.txt")).filter(|f| f.is_file()),
    };
    let mut bundled = Vec::new();
    if let Some(requirements) = requirements {
        let deps = build.path().join("deps");
        install_requirements(&componentize_py, &requirements, &deps)?;
        refuse_native_extensions(&deps)?;
        bundled = top_level_modules(&deps)?;
        python_path.push(deps);
    }

    std::fs::write(
        python_dir.join(format!("{ENTRY_MODULE}.py")),
        entry_module(&module, &task, &bundled),
    )?;

    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut cmd = Command::new(&componentize_py);
    cmd.arg("-d")
        .arg(&wit)
        .args(["-w", py_sdk_files::WORLD, "componentize"]);
    for dir in &python_path {
        cmd.arg("-p").arg(dir);
    }
    cmd.arg(ENTRY_MODULE).arg("-o").arg(&output);
    // Its Rust backtraces say nothing about the task.
    cmd.env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0");
    let out = cmd
        .output()
        .with_context(|| format!("running {}", componentize_py.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let traceback = readable_failure(&stderr, &python_path);
        // The traceback as it is (the error line below is one line).
        format::notice(&traceback);
        bail!(
            "componentize-py could not build {}: {}",
            args.task.display(),
            traceback.lines().last().unwrap_or("no output")
        );
    }
    let size = std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
    format::notice(&format!(
        "wrote {} ({:.1} MB) in {:.1} s",
        output.display(),
        size as f64 / 1e6,
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The module name of `task`: its file stem, which must be a Python
/// identifier and not one of [`RESERVED_MODULES`].
fn module_name(task: &Path) -> anyhow::Result<String> {
    if task.extension().and_then(|e| e.to_str()) != Some("py") {
        bail!("{}: the task must be a .py file", task.display());
    }
    let stem = task
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    let identifier = stem
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && stem.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !identifier {
        bail!(
            "{}: the file name must be a Python module name (letters, digits, _; e.g. app.py)",
            task.display()
        );
    }
    if RESERVED_MODULES.contains(&stem.as_str()) {
        bail!(
            "{}: {stem}.py would shadow a module the build provides; rename it (e.g. app.py)",
            task.display()
        );
    }
    Ok(stem)
}

/// The generated module componentize-py loads: imports the bundled
/// requirements' top-level modules and the task's module (running its
/// `@task`), and hands over the SDK's export.
///
/// The component holds what is imported here: componentize-py snapshots
/// the interpreter after this import, and the files on its Python path are
/// not in the component. So a requirement the task imports only inside a
/// function is imported here first.
fn entry_module(module: &str, task: &Path, bundled: &[String]) -> String {
    let requirements: String = bundled
        .iter()
        .map(|m| format!("import {m}  # noqa: F401  (a bundled requirement)\n"))
        .collect();
    format!(
        r#""""Generated by `wasmq build` for {task}: the module componentize-py loads."""

{requirements}
import {module}  # noqa: F401  (registers the function marked @task)

from wasmq.task import WitWorld, registered  # noqa: F401  (WitWorld: the export)

if registered() is None:
    raise RuntimeError("no function in {module}.py is marked @task (from wasmq import task)")
"#,
        task = task.display()
    )
}

/// componentize-py: `$WASMQ_COMPONENTIZE_PY`, else `.venv/bin/componentize-py`
/// in the current directory or a parent, else on `PATH`.
fn find_componentize_py() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(COMPONENTIZE_PY_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!(
                "{COMPONENTIZE_PY_ENV}={} is not a file; {}",
                path.display(),
                install_hint()
            );
        }
        return Ok(path);
    }
    let cwd = std::env::current_dir().context("reading the current directory")?;
    for dir in cwd.ancestors() {
        let candidate = dir.join(".venv/bin/componentize-py");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    for dir in on_path {
        let candidate = dir.join("componentize-py");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("componentize-py not found; {}", install_hint())
}

fn install_hint() -> String {
    format!(
        "install it with `make py-tools` in a wasmq checkout, or with \
         `python3 -m venv .venv && .venv/bin/pip install componentize-py=={PINNED_COMPONENTIZE_PY}` \
         (wasmq build looks in .venv/bin of the current directory and its parents, then on PATH; \
         {COMPONENTIZE_PY_ENV} names it explicitly)"
    )
}

/// Warns (on stderr) when componentize-py is not the pinned release.
fn check_version(componentize_py: &Path) {
    let version = Command::new(componentize_py)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match version {
        Some(v) if v.split_whitespace().last() == Some(PINNED_COMPONENTIZE_PY) => {}
        other => format::notice(&format!(
            "warning: {} is {}, not the pinned componentize-py {PINNED_COMPONENTIZE_PY}; \
             the build may fail or the component may not run (`make py-tools` installs the pinned one)",
            componentize_py.display(),
            other.as_deref().unwrap_or("of an unknown version"),
        )),
    }
}

/// The Python of componentize-py's virtualenv (its sibling), else `python3`.
fn python_beside(componentize_py: &Path) -> OsString {
    let canonical =
        std::fs::canonicalize(componentize_py).unwrap_or_else(|_| componentize_py.into());
    for dir in [componentize_py.parent(), canonical.parent()]
        .into_iter()
        .flatten()
    {
        let python = dir.join("python");
        if python.is_file() {
            return python.into_os_string();
        }
    }
    "python3".into()
}

/// `python -m pip install --target deps -r requirements`.
fn install_requirements(
    componentize_py: &Path,
    requirements: &Path,
    deps: &Path,
) -> anyhow::Result<()> {
    if !requirements.is_file() {
        bail!("requirements file {} not found", requirements.display());
    }
    let python = python_beside(componentize_py);
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-input", "--target"])
        .arg(deps)
        .arg("-r")
        .arg(requirements)
        .output()
        .with_context(|| format!("running {} -m pip", python.to_string_lossy()))?;
    if !out.status.success() {
        bail!(
            "pip could not install the requirements in {}:\n{}",
            requirements.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Fails naming the distribution and the file when pip installed a native
/// extension: only pure-Python packages run in a WebAssembly task.
fn refuse_native_extensions(deps: &Path) -> anyhow::Result<()> {
    let mut native = Vec::new();
    walk(deps, &mut |path| {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if NATIVE_EXTENSIONS.contains(&ext) {
            native.push(path.to_path_buf());
        }
    })?;
    let Some(file) = native.first() else {
        return Ok(());
    };
    let rel = file.strip_prefix(deps).unwrap_or(file);
    let rel_text = rel.to_string_lossy().replace('\\', "/");
    let owner =
        distribution_of(deps, &rel_text)?.unwrap_or_else(|| "an unknown distribution".into());
    bail!(
        "{owner} has a native extension ({rel_text}{more}): only pure-Python packages can be \
         bundled into a wasmq task (a WebAssembly component cannot load native code); \
         drop it from the requirements or use a pure-Python alternative",
        more = match native.len() {
            1 => String::new(),
            n => format!(" and {} more", n - 1),
        }
    )
}

/// The importable top-level modules pip installed into `deps`: packages
/// (directories with `__init__.py`) and `.py` modules.
fn top_level_modules(deps: &Path) -> anyhow::Result<Vec<String>> {
    let mut modules = Vec::new();
    for entry in std::fs::read_dir(deps).with_context(|| format!("reading {}", deps.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let module = if path.is_dir() && path.join("__init__.py").is_file() {
            name
        } else if let Some(stem) = name.strip_suffix(".py").filter(|_| path.is_file()) {
            stem
        } else {
            continue;
        };
        let identifier = module
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !module.starts_with(|c: char| c.is_ascii_digit());
        if identifier && !module.is_empty() {
            modules.push(module.to_string());
        }
    }
    modules.sort();
    Ok(modules)
}

/// `NAME VERSION` of the distribution whose RECORD lists `rel`.
fn distribution_of(deps: &Path, rel: &str) -> anyhow::Result<Option<String>> {
    for entry in std::fs::read_dir(deps)? {
        let dir = entry?.path();
        let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(dist) = name.strip_suffix(".dist-info") else {
            continue;
        };
        let record = std::fs::read_to_string(dir.join("RECORD")).unwrap_or_default();
        if record
            .lines()
            .any(|line| line.split(',').next() == Some(rel))
        {
            // `NAME-VERSION.dist-info`: names never contain '-' there.
            return Ok(Some(match dist.rsplit_once('-') {
                Some((name, version)) => format!("the distribution {name} {version}"),
                None => format!("the distribution {dist}"),
            }));
        }
    }
    Ok(None)
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, f)?;
        } else {
            f(&path);
        }
    }
    Ok(())
}

/// componentize-py's failure, shortened to what concerns the task: the
/// Python traceback of the import it ran (its own traceback and Rust
/// context dropped), with its `/N/` paths (the N-th `-p` entry) put back
/// as the real directories (the build directory as `<wasmq build>`).
fn readable_failure(stderr: &str, python_path: &[PathBuf]) -> String {
    let mut text = match stderr.split_once("AssertionError: ") {
        Some((_, rest)) => rest.to_string(),
        None => stderr.to_string(),
    };
    for marker in ["\n\nCaused by:", "\nStack backtrace:"] {
        if let Some(at) = text.find(marker) {
            text.truncate(at);
        }
    }
    for (i, dir) in python_path.iter().enumerate() {
        // The first entry is the build directory, gone once the build ends.
        let shown = match i {
            0 => "<wasmq build>".to_string(),
            _ => dir.display().to_string(),
        };
        text = text.replace(&format!("\"/{i}/"), &format!("\"{shown}/"));
    }
    text.trim().to_string()
}

/// A temporary directory removed when dropped.
struct BuildDir(PathBuf);

impl BuildDir {
    fn new() -> anyhow::Result<BuildDir> {
        let path = std::env::temp_dir().join(format!(
            "wasmq-build-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(BuildDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_are_python_identifiers_and_not_reserved() {
        assert_eq!(module_name(Path::new("/t/app.py")).unwrap(), "app");
        assert_eq!(module_name(Path::new("/t/_x9.py")).unwrap(), "_x9");
        for bad in [
            "/t/my-task.py",
            "/t/9a.py",
            "/t/app.txt",
            "/t/wasmq.py",
            "/t/wit_world.py",
        ] {
            assert!(module_name(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn failures_keep_the_tasks_traceback_with_real_paths() {
        let stderr = "Traceback (most recent call last):\n  File \"/venv/bin/componentize-py\", line 8\nAssertionError: Traceback (most recent call last):\n  File \"/0/wasmq_entry.py\", line 3, in <module>\n  File \"/1/app.py\", line 4\n    def run(job, payload)\nSyntaxError: expected ':'\n\n\nCaused by:\n    SyntaxError\n\nStack backtrace:\n   0: x";
        let text = readable_failure(stderr, &[PathBuf::from("/b"), PathBuf::from("/tasks/x")]);
        assert!(text.starts_with("Traceback"), "{text}");
        assert!(text.contains("\"/tasks/x/app.py\", line 4"), "{text}");
        assert!(text.contains("\"<wasmq build>/wasmq_entry.py\""), "{text}");
        assert!(text.ends_with("SyntaxError: expected ':'"), "{text}");
        assert!(
            !text.contains("Caused by") && !text.contains("componentize-py\""),
            "{text}"
        );
    }
}
