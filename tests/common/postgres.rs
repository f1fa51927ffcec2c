//! A private PostgreSQL per test: `initdb` and `postgres` from
//! /usr/lib/postgresql/*/bin in a scratch directory, on a free loopback
//! port (never 5432: the machine's own server is not ours), trust
//! authentication for the `postgres` user, fsync off. Killed on drop.
//!
//! PostgreSQL refuses to run as root; under root both run as the system
//! user `postgres` (which Debian's package creates), through `setpriv`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis::free_port;
use super::TempDir;

/// A running `postgres` child process.
pub struct PostgresServer {
    /// The loopback port it listens on.
    pub port: u16,
    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub url: String,
    child: Child,
    _dir: TempDir,
}

/// The newest /usr/lib/postgresql/VERSION/bin.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: run `make setup` (apt-get install postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no /usr/lib/postgresql/*/bin/postgres")
}

fn as_postgres_user(program: &Path) -> Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // setpriv execs (no forking wrapper), so the child is postgres
        // itself and signals reach it.
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--reset-env",
        ])
        .arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

impl PostgresServer {
    /// Start a fresh server; panics with its log if it does not come up.
    pub fn start() -> Self {
        let dir = TempDir::new("postgres");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success());
        }
        let bin = bin_dir();
        let out = as_postgres_user(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for _ in 0..5 {
            let port = free_port();
            assert_ne!(port, 5432);
            let log = std::fs::File::create(dir.path().join("postgres.log")).unwrap();
            let mut child = as_postgres_user(&bin.join("postgres"))
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
                .arg("-k")
                .arg(dir.path())
                .args(["-c", "fsync=off", "-c", "max_connections=200"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    // Accepting TCP is not yet accepting logins: ask it.
                    let ready = Command::new(bin.join("pg_isready"))
                        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                        .output()
                        .map(|o| o.status.success())
                        .unwrap_or(false);
                    if ready {
                        return PostgresServer {
                            port,
                            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
                            child,
                            _dir: dir,
                        };
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "postgres did not start; log:\n{}",
            std::fs::read_to_string(dir.path().join("postgres.log")).unwrap_or_default()
        );
    }

    /// A plain client connection (tests check rows and `pg_stat_activity`).
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown (its children go too).
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGQUIT);
        }
        let _ = self.child.wait();
    }
}
