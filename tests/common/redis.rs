//! A private `redis-server` per test, on a free loopback port (never 6379),
//! with its data in a scratch directory removed on drop.
//!
//! Tests never depend on any other Redis running on the machine.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TempDir;

/// How long a freshly spawned server gets to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `redis-server` child process. Killed on drop.
pub struct RedisServer {
    /// The loopback port it listens on.
    pub port: u16,
    /// `redis://127.0.0.1:PORT`.
    pub url: String,
    /// Working directory (AOF files, log); removed on drop.
    dir: TempDir,
    /// Append-only file on (`start_persistent`), so data survives `restart`.
    persistent: bool,
    child: Child,
}

impl RedisServer {
    /// A throwaway server: no snapshots, no AOF.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A server that fsyncs every write to its AOF, so `restart` (even after
    /// a kill -9) keeps everything acknowledged.
    pub fn start_persistent() -> Self {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> Self {
        let dir = TempDir::new("redis");
        // Another process may grab the port between our probe and the
        // server's bind; then the server exits and we try another port.
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = spawn(port, dir.path(), persistent) {
                return RedisServer {
                    port,
                    url: format!("redis://127.0.0.1:{port}"),
                    dir,
                    persistent,
                    child,
                };
            }
        }
        panic!(
            "redis-server did not start on a free port; log:\n{}",
            log(dir.path())
        );
    }

    /// Kill the server (SIGKILL) and start it again on the same port and
    /// directory. With `start_persistent`, data survives.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn(self.port, self.dir.path(), self.persistent).unwrap_or_else(|| {
            panic!(
                "redis-server did not restart on port {}; log:\n{}",
                self.port,
                log(self.dir.path())
            )
        });
    }

    /// Kill the server (SIGKILL) and wait for it to exit. Calls to it fail
    /// until `restart`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A reconnecting connection to this server. Reconnect attempts are few
    /// and short so calls during an outage fail fast instead of hanging.
    pub async fn connect(&self) -> ::redis::aio::ConnectionManager {
        let client = ::redis::Client::open(self.url.as_str()).unwrap();
        let config = ::redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(200));
        ::redis::aio::ConnectionManager::new_with_config(client, config)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.url))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        // `dir` is removed by its own drop, after the server has exited.
    }
}

/// A port nothing listens on right now (the OS picks it).
pub fn free_port() -> u16 {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert_ne!(port, 6379, "never touch a default Redis");
    port
}

/// Spawn `redis-server` on `port` and wait until it answers `PING`; `None`
/// if it exited first (port taken).
fn spawn(port: u16, dir: &std::path::Path, persistent: bool) -> Option<Child> {
    assert_ne!(port, 6379, "never touch a default Redis");
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
    ])
    .arg("--dir")
    .arg(dir)
    .args(["--logfile", "redis.log"]);
    if persistent {
        cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
    } else {
        cmd.args(["--appendonly", "no"]);
    }
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("redis-server not found: run `make setup`")
        }
        Err(e) => panic!("starting redis-server: {e}"),
    };
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        if ping(port) {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "redis-server on port {port} did not answer PING within {START_TIMEOUT:?}; log:\n{}",
        log(dir)
    );
}

/// True if a server on `port` answers `PING` with `PONG` (not `LOADING`).
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

fn log(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default()
}
