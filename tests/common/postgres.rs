//! A private PostgreSQL per test: `initdb` and `postgres` from
//! /usr/lib/postgresql/*/bin in a scratch directory, on a free loopback
//! port (never 5432: the machine's own server is not ours), trust
//! authentication for the `postgres` user, fsync off. Killed on drop.
//!
//! PostgreSQL refuses to run as root; under root both run as the system
//! user `postgres` (which Debian's package creates), through `setpriv`.
//!
//! [`PostgresServer::start_with_tls`] starts one that speaks only TLS on
//! TCP: a CA and a certificate for `localhost` (not 127.0.0.1) made with
//! the `openssl` command, and a pg_hba.conf of `hostssl` lines only.

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
    /// For a server started with TLS: its certificates.
    pub tls: Option<TlsFiles>,
    child: Child,
    _dir: TempDir,
}

/// The PEM files of a TLS server's certificate authorities.
pub struct TlsFiles {
    /// The CA that signed the server's certificate (for `localhost` only).
    pub ca: PathBuf,
    /// A CA that signed nothing the server holds.
    pub other_ca: PathBuf,
}

/// Run `openssl ARGS` (split at spaces) in `dir`; panics with its
/// stderr if it fails.
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args.split_whitespace())
        .output()
        .expect("the openssl command is needed for TLS tests (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new P-256 key (no passphrase) and its certificate request or
/// certificate: the part of `openssl req` every certificate here shares.
const NEW_KEY: &str = "req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";

/// A self-signed CA `NAME.crt` (key `NAME.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &format!(
            "{NEW_KEY} -x509 -days 2 -subj /CN=wasmq-test-{name} -keyout {name}.key -out {name}.crt \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
        ),
    );
}

/// `ca.crt`, `other-ca.crt`, and `server.crt`/`server.key` (signed by
/// `ca`, valid for DNS name `localhost` only) in `dir`.
fn make_certificates(dir: &Path) -> TlsFiles {
    make_ca(dir, "ca");
    make_ca(dir, "other-ca");
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &format!("{NEW_KEY} -new -subj /CN=localhost -keyout server.key -out server.csr"),
    );
    openssl(
        dir,
        "x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
         -extfile server.ext -out server.crt",
    );
    TlsFiles {
        ca: dir.join("ca.crt"),
        other_ca: dir.join("other-ca.crt"),
    }
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
        Self::start_as(false)
    }

    /// [`start`](Self::start), accepting only TLS on TCP (see the module
    /// docs); the CAs in [`tls`](Self::tls).
    pub fn start_with_tls() -> Self {
        Self::start_as(true)
    }

    fn start_as(tls: bool) -> Self {
        let dir = TempDir::new("postgres");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let files = tls.then(|| make_certificates(dir.path()));
        let root = unsafe { libc::geteuid() } == 0;
        if tls {
            // The server refuses a key others can read.
            let key = dir.path().join("server.key");
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
        }
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
        let mut tls_args: Vec<String> = Vec::new();
        if tls {
            // Only TLS over TCP: a plaintext login finds no pg_hba.conf
            // entry (pg_isready, on TCP too, needs no login). The Unix
            // socket is for `client`.
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .unwrap();
            let file = |name: &str| dir.path().join(name).display().to_string();
            tls_args = vec![
                "-c".into(),
                "ssl=on".into(),
                "-c".into(),
                format!("ssl_cert_file={}", file("server.crt")),
                "-c".into(),
                format!("ssl_key_file={}", file("server.key")),
            ];
        }
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
                .args(&tls_args)
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
                            tls: files,
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

    /// A plain client connection (tests check rows and `pg_stat_activity`):
    /// over TCP, or for a TLS server over its Unix socket (`local` lines
    /// trust it), so tests need no TLS of their own.
    pub async fn client(&self) -> tokio_postgres::Client {
        let mut config: tokio_postgres::Config = self.url.parse().unwrap();
        if self.tls.is_some() {
            config = tokio_postgres::Config::new();
            config
                .host_path(self._dir.path())
                .port(self.port)
                .user("postgres")
                .dbname("postgres");
        }
        let (client, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
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
