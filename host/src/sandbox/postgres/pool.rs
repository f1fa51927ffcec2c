//! The worker's connections to tenants' databases: one pool per tenant and
//! database name ([`Databases`]), of [`Session`]s this module connects
//! itself.
//!
//! Why not tokio-postgres's own `connect`: its socket cannot be wrapped, and
//! the [`Tap`] must sit under the driver to see the server's messages (see
//! `wire`). So the socket is opened here, as tokio-postgres would (each
//! host and `hostaddr` of the URL in turn, the URL's port(s), Unix sockets,
//! `connect_timeout`, keepalives) and handed to `Config::connect_raw`,
//! which does TLS and authentication. A cancel request goes to the same
//! address over a new socket, encrypted as the session is.
//!
//! Invariants:
//! - a pooled session is handed to a job only if the last job's check-in
//!   reset it ([`Session::clean`], checked by the pool's recycle step): a
//!   session whose reset did not finish (an error, a timeout, a worker
//!   stopping mid-reset) is closed when next taken, never reused;
//! - a session whose connection is closed or whose wire tripped is never
//!   reused;
//! - `target_session_attrs` other than `any` is refused (it needs a probe
//!   of each server this module does not make).

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use deadpool_postgres::ClientWrapper;
use rand::seq::SliceRandom;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::{Host, LoadBalanceHosts, SslMode, SslNegotiation, TargetSessionAttrs};
use tokio_postgres::tls::MakeTlsConnect;

use super::tls::{self, PgTls};
use super::wire::{Phase, Tap, Wire};
use crate::limits;
use crate::secrets;

/// A pool of one tenant's database.
pub(super) type Pool = managed::Pool<Sessions>;
/// A session taken from a [`Pool`]; back to it when dropped.
pub(super) type Pooled = managed::Object<Sessions>;

/// The worker's pools, by (tenant, database): each with the URL it was
/// built from.
pub struct Databases {
    pools: Mutex<HashMap<(String, String), Kept>>,
    /// Connections each pool keeps at most.
    pool_size: usize,
}

impl Default for Databases {
    fn default() -> Self {
        Databases::with_pool_size(limits::DB_POOL_SIZE)
    }
}

/// A pool and the URL it was built from.
struct Kept {
    url: String,
    pool: Pool,
}

impl Databases {
    /// No pools yet; each will keep at most `pool_size` connections (at
    /// least one).
    pub fn with_pool_size(pool_size: usize) -> Self {
        Databases {
            pools: Mutex::default(),
            pool_size: pool_size.max(1),
        }
    }

    /// The pool for `tenant`'s database `name` at `url`: the one kept, or a
    /// new one when there is none or the URL changed (a rotated password).
    /// An error says what is wrong with the URL (its `sslrootcert` file
    /// included, which the URL's author chose): the tenant's to fix.
    pub(super) fn pool(&self, tenant: &str, name: &str, url: &str) -> Result<Pool, String> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let key = (tenant.to_string(), name.to_string());
        if let Some(kept) = pools.get(&key) {
            if kept.url == url {
                return Ok(kept.pool.clone());
            }
        }
        let secret = format!(
            "the secret {}{name} of tenant {tenant}",
            secrets::DATABASE_PREFIX
        );
        // libpq's sslmode/sslrootcert, which tokio-postgres does not
        // know, are taken out first (see tls.rs).
        let (rest, ssl) = tls::split_ssl_params(url).map_err(|e| format!("{secret}: {e}"))?;
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|_| format!("{secret} is not a PostgreSQL URL"))?;
        if config.get_target_session_attrs() != TargetSessionAttrs::Any {
            return Err(format!(
                "{secret}: target_session_attrs is not supported; point the URL at the server to use"
            ));
        }
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            return Err(format!("{secret} names no host"));
        }
        let (mode, tls) = PgTls::new(&ssl).map_err(|e| format!("{secret}: {e}"))?;
        config.ssl_mode(mode);
        // The session's defaults: what the check-in's `RESET ALL` returns to and what
        // the statement guard restores after each statement.
        config.options(format!(
            "-c statement_timeout={} -c client_connection_check_interval={}",
            limits::DB_STATEMENT_TIMEOUT.as_millis(),
            limits::DB_CLIENT_CHECK_INTERVAL.as_millis()
        ));
        config.connect_timeout(limits::DB_CONNECT_TIMEOUT);
        config.application_name("wasmq");
        let pool = Pool::builder(Sessions { config, tls })
            .max_size(self.pool_size)
            .build()
            .map_err(|e| format!("building the pool of database {name}: {e}"))?;
        let kept = Kept {
            url: url.to_string(),
            pool: pool.clone(),
        };
        pools.insert(key, kept);
        Ok(pool)
    }
}

/// One connection to a database and what the host knows about it.
pub(super) struct Session {
    pub(super) client: ClientWrapper,
    /// What the server sent: transaction status, trips (see `wire`).
    pub(super) wire: Arc<Wire>,
    /// Where a cancel request for this session goes.
    target: Target,
    /// Its TLS connector (a cancel request is encrypted as the session).
    tls: PgTls,
    /// Reset since a job last used it (see the module docs).
    pub(super) clean: bool,
    /// The driver looked up a type that is not built in: it then holds
    /// prepared statements of its own that its statement cache does not
    /// count (see `checkin`), so the session is closed at check-in
    /// instead of reset.
    pub(super) custom_types: bool,
}

impl Session {
    /// Ask the server to cancel what this session is running (over a new
    /// connection, as the protocol wants).
    pub(super) async fn cancel(&self) -> Result<(), String> {
        let socket = open_socket(&self.target.addr, self.target.port, None)
            .await
            .map_err(|e| format!("cancelling: {e}"))?;
        let mut tls = self.tls.clone();
        let connect = MakeTlsConnect::<Socket>::make_tls_connect(
            &mut tls,
            self.target.hostname.as_deref().unwrap_or(""),
        )?;
        self.client
            .cancel_token()
            .cancel_query_raw(socket, connect)
            .await
            .map_err(|e| format!("cancelling: {e}"))
    }
}

/// The deadpool manager of one database's sessions.
pub(super) struct Sessions {
    config: tokio_postgres::Config,
    tls: PgTls,
}

impl managed::Manager for Sessions {
    type Type = Session;
    type Error = ConnectError;

    async fn create(&self) -> Result<Session, ConnectError> {
        connect(&self.config, &self.tls).await
    }

    async fn recycle(&self, session: &mut Session, _: &Metrics) -> RecycleResult<ConnectError> {
        if !session.clean || session.client.is_closed() || session.wire.tripped().is_some() {
            return Err(RecycleError::message(
                "the session was not reset after its last job",
            ));
        }
        Ok(())
    }
}

/// A failure to connect: tokio-postgres's error or a socket's, with their
/// sources (a TLS error's text is in its source).
#[derive(Debug)]
pub(super) struct ConnectError(Box<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// A socket to the server, TCP or Unix.
enum Socket {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[derive(Clone)]
enum Addr {
    Tcp(IpAddr),
    Unix(PathBuf),
}

/// The address a session reached.
#[derive(Clone)]
struct Target {
    addr: Addr,
    port: u16,
    /// The URL's host name (TLS checks the certificate against it).
    hostname: Option<String>,
}

/// Connect as tokio-postgres's `connect` does (its connect.rs), the
/// socket under a [`Tap`]; the last error if no host answers.
async fn connect(config: &tokio_postgres::Config, tls: &PgTls) -> Result<Session, ConnectError> {
    let hosts = config.get_hosts();
    let hostaddrs = config.get_hostaddrs();
    let ports = config.get_ports();
    let count = hosts.len().max(hostaddrs.len());
    if !hostaddrs.is_empty() && !hosts.is_empty() && hosts.len() != hostaddrs.len() {
        return Err(error(
            "the URL has a different number of hosts and hostaddrs",
        ));
    }
    if ports.len() > 1 && ports.len() != count {
        return Err(error("the URL has a different number of hosts and ports"));
    }
    let mut order: Vec<usize> = (0..count).collect();
    if config.get_load_balance_hosts() == LoadBalanceHosts::Random {
        order.shuffle(&mut rand::rng());
    }
    let mut last = error("the URL names no host");
    for i in order {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let hostname = match hosts.get(i) {
            Some(Host::Tcp(name)) => Some(name.clone()),
            _ => None,
        };
        let addrs = match (hostaddrs.get(i), hosts.get(i)) {
            (Some(ip), _) => vec![Addr::Tcp(*ip)],
            (None, Some(Host::Unix(path))) => vec![Addr::Unix(path.clone())],
            (None, Some(Host::Tcp(name))) => {
                match tokio::net::lookup_host((name.as_str(), port)).await {
                    Ok(found) => found.map(|a| Addr::Tcp(a.ip())).collect(),
                    Err(e) => {
                        last = ConnectError(Box::new(e));
                        continue;
                    }
                }
            }
            (None, None) => continue,
        };
        for addr in addrs {
            let target = Target {
                addr,
                port,
                hostname: hostname.clone(),
            };
            match connect_to(config, tls, target).await {
                Ok(session) => return Ok(session),
                Err(e) => last = e,
            }
        }
    }
    Err(last)
}

fn error(text: &str) -> ConnectError {
    ConnectError(text.into())
}

async fn connect_to(
    config: &tokio_postgres::Config,
    tls: &PgTls,
    target: Target,
) -> Result<Session, ConnectError> {
    let socket = open_socket(&target.addr, target.port, Some(config))
        .await
        .map_err(|e| ConnectError(Box::new(e)))?;
    let wire = Wire::new();
    // Which tap reads the messages (see `wire`): this one, unless the
    // server's bytes are TLS records.
    let phase = match (config.get_ssl_mode(), config.get_ssl_negotiation()) {
        (SslMode::Disable, _) => Phase::Framed,
        (_, SslNegotiation::Direct) => Phase::Opaque,
        _ => Phase::SslReply,
    };
    let stream = Tap::new(socket, phase, wire.clone());
    let mut make = tls.clone();
    let connect = MakeTlsConnect::<Tap<Socket>>::make_tls_connect(
        &mut make,
        target.hostname.as_deref().unwrap_or(""),
    )
    .map_err(|e| ConnectError(e.into()))?;
    let tapped = TapTls {
        inner: connect,
        wire: wire.clone(),
    };
    let (client, connection) = config
        .connect_raw(stream, tapped)
        .await
        .map_err(|e| ConnectError(Box::new(e)))?;
    // Drive the connection; notices and notifications are dropped, not
    // logged: they are the guest's text, and the worker's log is not its.
    let task = tokio::spawn(async move {
        let mut connection = connection;
        let _ = std::future::poll_fn(|cx| loop {
            match connection.poll_message(cx) {
                std::task::Poll::Ready(Some(Ok(_))) => continue,
                std::task::Poll::Ready(Some(Err(e))) => return std::task::Poll::Ready(Err(e)),
                std::task::Poll::Ready(None) => return std::task::Poll::Ready(Ok(())),
                std::task::Poll::Pending => return std::task::Poll::Pending,
            }
        })
        .await;
    });
    Ok(Session {
        client: ClientWrapper::new(client, task),
        wire,
        target,
        tls: tls.clone(),
        clean: true,
        custom_types: false,
    })
}

/// A socket to `addr`, within the URL's `connect_timeout`, with its
/// keepalives (tokio-postgres's defaults when `config` is `None`).
async fn open_socket(
    addr: &Addr,
    port: u16,
    config: Option<&tokio_postgres::Config>,
) -> io::Result<Socket> {
    let timeout = config
        .and_then(|c| c.get_connect_timeout().copied())
        .unwrap_or(limits::DB_CONNECT_TIMEOUT);
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connection timed out");
    match addr {
        Addr::Tcp(ip) => {
            let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect((*ip, port)))
                .await
                .map_err(|_| timed_out())??;
            stream.set_nodelay(true)?;
            if config.is_none_or(|c| c.get_keepalives()) {
                let mut keepalive = socket2::TcpKeepalive::new().with_time(
                    config.map_or(std::time::Duration::from_secs(7200), |c| {
                        c.get_keepalives_idle()
                    }),
                );
                if let Some(interval) = config.and_then(|c| c.get_keepalives_interval()) {
                    keepalive = keepalive.with_interval(interval);
                }
                if let Some(retries) = config.and_then(|c| c.get_keepalives_retries()) {
                    keepalive = keepalive.with_retries(retries);
                }
                socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
            }
            Ok(Socket::Tcp(stream))
        }
        Addr::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            let stream = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(path))
                .await
                .map_err(|_| timed_out())??;
            Ok(Socket::Unix(stream))
        }
    }
}

/// The TLS handshake of [`PgTls`], with a [`Tap`] above it: the tap that
/// sees the session's messages in plaintext.
struct TapTls {
    inner: tls::PgTlsConnect,
    wire: Arc<Wire>,
}

type TlsOverTap = tls::PgTlsStream<Tap<Socket>>;

impl tokio_postgres::tls::TlsConnect<Tap<Socket>> for TapTls {
    type Stream = Tap<TlsOverTap>;
    type Error = io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<Tap<TlsOverTap>>> + Send>>;

    fn connect(self, stream: Tap<Socket>) -> Self::Future {
        let wire = self.wire;
        let handshake = tokio_postgres::tls::TlsConnect::connect(self.inner, stream);
        Box::pin(async move {
            let stream = handshake.await?;
            Ok(Tap::new(stream, Phase::Framed, wire))
        })
    }
}
