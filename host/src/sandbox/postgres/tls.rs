//! TLS from the worker to PostgreSQL, with libpq's `sslmode` semantics.
//!
//! Owns two things:
//! - [`split_ssl_params`]: taking `sslmode` and `sslrootcert` out of a
//!   database URL (`postgres://...?sslmode=verify-full&sslrootcert=/ca.pem`)
//!   or key=value conninfo (`host=db sslmode=verify-ca`) before
//!   tokio-postgres parses the rest: it knows only disable/prefer/require
//!   and refuses `sslrootcert`, while Django/psycopg users write libpq's;
//! - [`PgTls`]: a `tokio_postgres` TLS connector on rustls (the `ring`
//!   provider, named, never the process default), whose certificate check
//!   follows the mode (see [`PgTls::new`]).
//!
//! The modes, as libpq:
//!
//! | sslmode               | TLS                          | certificate checked           |
//! |-----------------------|------------------------------|-------------------------------|
//! | `disable`             | never                        | -                             |
//! | `prefer` (default)    | if the server offers it      | no (chain, if `sslrootcert`)  |
//! | `require`             | always, or fail              | no (chain, if `sslrootcert`)  |
//! | `verify-ca`           | always, or fail              | chain                         |
//! | `verify-full`         | always, or fail              | chain and host name           |
//!
//! Roots: the PEM file `sslrootcert` names (read on the worker), or, when
//! there is none or it is `system`, the Mozilla set (webpki-roots) where
//! libpq would read `~/.postgresql/root.crt`. As libpq, `sslrootcert=system`
//! makes `verify-full` the default and refuses weaker modes. Unlike libpq,
//! a `sslrootcert` file that is missing is an error in every mode but
//! `disable` (libpq silently skips it below `verify-ca`). Even when the
//! certificate is not checked, the handshake's signatures are (so the peer
//! holds the key of the certificate it sent): the encryption is real, only
//! who the peer is stays unproven, as with libpq's `require`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode as DriverMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// libpq's `sslmode` values that wasmq supports (`allow` is not: it
/// tries plaintext first, which tokio-postgres cannot do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                // The value is a mode, not a credential, but it is cut short
                // in case a URL was mangled into it.
                let shown: String = value.chars().take(32).collect();
                return Err(format!(
                    "sslmode {shown:?} is not one of disable, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }

    fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// What [`split_ssl_params`] took out of a URL.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SslParams {
    /// `sslmode`, when given (the last one, as libpq).
    pub mode: Option<SslMode>,
    /// `sslrootcert`, when given and not empty: a path, or `system`.
    pub rootcert: Option<String>,
}

/// `url` without its `sslmode` and `sslrootcert` parameters, and their
/// values. Both forms tokio-postgres parses are handled: a
/// `postgres://`/`postgresql://` URL (percent-decoded values, as
/// tokio-postgres decodes them) and key=value conninfo (quoted and
/// backslash-escaped values). Anything malformed is left in place for
/// tokio-postgres to refuse.
pub fn split_ssl_params(url: &str) -> Result<(String, SslParams), String> {
    let mut params = SslParams::default();
    let mut take = |key: &str, value: String| -> Result<bool, String> {
        match key {
            "sslmode" => params.mode = Some(SslMode::parse(&value)?),
            "sslrootcert" => params.rootcert = Some(value).filter(|v| !v.is_empty()),
            _ => return Ok(false),
        }
        Ok(true)
    };
    // Trimmed first: a URL with a leading space would otherwise be taken
    // for conninfo, lose nothing here, and have its `sslmode` overridden.
    let url = url.trim();
    let rest = match ["postgres://", "postgresql://"]
        .iter()
        .find(|p| url.starts_with(*p))
    {
        Some(prefix) => split_url(url, prefix.len(), &mut take)?,
        None => split_conninfo(url, &mut take)?,
    };
    Ok((rest, params))
}

type Take<'a> = dyn FnMut(&str, String) -> Result<bool, String> + 'a;

fn split_url(url: &str, prefix: usize, take: &mut Take<'_>) -> Result<String, String> {
    // As tokio-postgres: credentials end at the first '@', the query
    // starts at the first '?' after them.
    let hosts = url[prefix..].find('@').map_or(prefix, |i| prefix + i + 1);
    let Some(query) = url[hosts..].find('?').map(|i| hosts + i) else {
        return Ok(url.to_string());
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| "a parameter of the URL is not UTF-8 once decoded".to_string())
    };
    let mut kept = Vec::new();
    for pair in url[query + 1..].split('&') {
        let taken = match pair.split_once('=') {
            Some((key, value)) => take(&decode(key)?, decode(value)?)?,
            None => false,
        };
        if !taken {
            kept.push(pair);
        }
    }
    let mut rest = url[..query].to_string();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Ok(rest)
}

fn split_conninfo(s: &str, take: &mut Take<'_>) -> Result<String, String> {
    let mut kept: Vec<&str> = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        // keyword, '=', value: tokio-postgres's grammar (config.rs `Parser`).
        let key_end = rest
            .find(|c: char| c.is_whitespace() || c == '=')
            .unwrap_or(rest.len());
        let key = &rest[..key_end];
        let after_key = rest[key_end..].trim_start();
        let parsed = after_key
            .strip_prefix('=')
            .and_then(|v| conninfo_value(v.trim_start()));
        let Some((value, after)) = parsed.filter(|_| !key.is_empty()) else {
            kept.push(rest); // malformed: tokio-postgres will say so
            break;
        };
        let raw = &rest[..rest.len() - after.len()];
        if !take(key, value)? {
            kept.push(raw);
        }
        rest = after.trim_start();
    }
    Ok(kept.join(" "))
}

/// A conninfo value at the start of `s` (quoted or bare, `\` escaping the
/// next character) and what follows it; `None` if unterminated or empty.
fn conninfo_value(s: &str) -> Option<(String, &str)> {
    let (quoted, body) = match s.strip_prefix('\'') {
        Some(body) => (true, body),
        None => (false, s),
    };
    let mut value = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => value.extend(chars.next().map(|(_, c)| c)),
            '\'' if quoted => return Some((value, &body[i + 1..])),
            c if c.is_whitespace() && !quoted => return Some((value, &body[i..])),
            c => value.push(c),
        }
    }
    (!quoted && !value.is_empty()).then_some((value, ""))
}

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Nothing but the handshake signatures (libpq's `prefer`, `require`).
    Nothing,
    /// The chain to a root, not the host name (`verify-ca`).
    Chain,
    /// Chain and host name (`verify-full`).
    Full,
}

/// A tokio-postgres TLS connector on rustls. Cheap to clone (one `Arc`):
/// the pool and the cancel path of each connection share it.
#[derive(Clone)]
pub struct PgTls {
    config: Arc<rustls::ClientConfig>,
}

impl PgTls {
    /// The mode tokio-postgres is to use and the connector for `params`.
    /// Reads the `sslrootcert` file when the mode checks certificates;
    /// errors name the problem, never the file's contents.
    pub fn new(params: &SslParams) -> Result<(DriverMode, PgTls), String> {
        let system = params.rootcert.as_deref() == Some("system");
        let mode = params.mode.unwrap_or(if system {
            SslMode::VerifyFull
        } else {
            SslMode::Prefer
        });
        if system && mode != SslMode::VerifyFull {
            // libpq's rule: the public roots vouch for anyone's name, so
            // only a name check makes them mean something.
            return Err(format!(
                "sslmode={} may not be used with sslrootcert=system (use verify-full)",
                mode.name()
            ));
        }
        let file = params.rootcert.as_deref().filter(|_| !system);
        let (driver, check) = match mode {
            SslMode::Disable => (DriverMode::Disable, Check::Nothing),
            // As libpq: a root certificate given makes the chain checked.
            SslMode::Prefer | SslMode::Require => (
                if mode == SslMode::Prefer {
                    DriverMode::Prefer
                } else {
                    DriverMode::Require
                },
                if file.is_some() {
                    Check::Chain
                } else {
                    Check::Nothing
                },
            ),
            // Unlike require's optional chain check, verify-ca without a
            // root file would accept any public CA's certificate for any
            // name: refused, as libpq fails without its root.crt.
            SslMode::VerifyCa if file.is_none() => {
                return Err(
                    "sslmode=verify-ca needs sslrootcert=FILE (the CA to trust): with the \
                     public roots and no name check any public certificate would pass; \
                     use verify-full for a public CA"
                        .into(),
                )
            }
            SslMode::VerifyCa => (DriverMode::Require, Check::Chain),
            SslMode::VerifyFull => (DriverMode::Require, Check::Full),
        };
        // Named, not the process default: a second crypto backend elsewhere
        // in the build cannot make this panic or change it.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match check {
            Check::Nothing => Arc::new(AnyCertificate(provider.signature_verification_algorithms)),
            Check::Chain | Check::Full => {
                let roots = match file {
                    Some(path) => roots_from(path)?,
                    None => RootCertStore {
                        roots: webpki_roots::TLS_SERVER_ROOTS.into(),
                    },
                };
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| format!("sslrootcert: {e}"))?;
                if check == Check::Full {
                    webpki
                } else {
                    Arc::new(AnyName(webpki))
                }
            }
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        // What libpq 17 sends; PostgreSQL 17 requires it for direct TLS
        // (`sslnegotiation=direct`), older servers ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok((
            driver,
            PgTls {
                config: Arc::new(config),
            },
        ))
    }
}

/// Largest `sslrootcert` file read.
const MAX_ROOT_FILE_BYTES: u64 = 1 << 20;

/// The certificates of the PEM file at `path`. The path comes from a
/// tenant's URL: only a regular file of at most [`MAX_ROOT_FILE_BYTES`] is
/// read (never a device, pipe or directory, which could exhaust memory or
/// block), and every failure reads the same, so the message tells nothing
/// about which files exist on the worker or who may read them.
fn roots_from(path: &str) -> Result<RootCertStore, String> {
    let unusable = || {
        format!(
            "sslrootcert {path:?} is not a readable PEM file of CA certificates \
             (a regular file of at most 1 MiB on the worker)"
        )
    };
    let meta = std::fs::metadata(path).map_err(|_| unusable())?;
    if !meta.is_file() || meta.len() > MAX_ROOT_FILE_BYTES {
        return Err(unusable());
    }
    let mut pem = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(
            std::fs::File::open(path).map_err(|_| unusable())?,
            MAX_ROOT_FILE_BYTES,
        ),
        &mut pem,
    )
    .map_err(|_| unusable())?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        // PEM errors quote the offending line, and any other wording would
        // tell a readable non-certificate file from a missing one.
        let cert = cert.map_err(|_| unusable())?;
        roots.add(cert).map_err(|_| unusable())?;
    }
    if roots.is_empty() {
        return Err(unusable());
    }
    Ok(roots)
}

/// Accepts any certificate, but still checks the handshake's signatures
/// against it (libpq's `require` without a root certificate).
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// The WebPKI check with the host name left out (`verify-ca`). rustls
/// checks the name last, after the chain, validity and usage: a name
/// mismatch therefore means everything else passed.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = String;

    /// `domain` is the URL's host: what `verify-full` checks the
    /// certificate against, and the SNI (rustls sends none for an IP).
    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, String> {
        // tokio-postgres asks for a connector before it knows whether TLS
        // is wanted, with "" for a Unix socket or a bare `hostaddr`: fail
        // only if a handshake is then attempted.
        let name = ServerName::try_from(domain.to_string()).ok();
        Ok(PgTlsConnect {
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
            name,
        })
    }
}

/// One handshake to come, to the host it was made for.
pub struct PgTlsConnect {
    connector: tokio_rustls::TlsConnector,
    /// `None`: no host name (see `make_tls_connect`).
    name: Option<ServerName<'static>>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = self.name.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "TLS needs a host name to check (the URL names none)",
                )
            })?;
            let stream = self.connector.connect(name, stream).await?;
            Ok(PgTlsStream(stream))
        })
    }
}

/// A TLS session to PostgreSQL (a newtype: tokio-postgres's `TlsStream`
/// trait cannot be implemented on tokio-rustls's type here).
pub struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    /// None: SCRAM then authenticates without channel binding (the
    /// default `channel_binding=prefer` accepts that). tls-server-end-point
    /// needs the hash of the certificate's own signature algorithm, and a
    /// wrong guess would fail authentication.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(url: &str) -> (String, SslParams) {
        split_ssl_params(url).unwrap()
    }

    #[test]
    fn url_form_loses_only_the_ssl_parameters() {
        let (rest, p) = split(
            "postgres://u:p%3Fw@db.example:5432/app?application_name=x&sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fca%20dir%2Froot.pem&connect_timeout=3",
        );
        assert_eq!(
            rest,
            "postgres://u:p%3Fw@db.example:5432/app?application_name=x&connect_timeout=3"
        );
        assert_eq!(p.mode, Some(SslMode::VerifyFull));
        assert_eq!(p.rootcert.as_deref(), Some("/etc/ca dir/root.pem"));
        // Only ssl parameters: no '?' left; the last sslmode wins.
        let (rest, p) = split("postgresql://h/db?sslmode=require&sslmode=verify-ca");
        assert_eq!(rest, "postgresql://h/db");
        assert_eq!(p.mode, Some(SslMode::VerifyCa));
        assert_eq!(p.rootcert, None);
        // None at all: untouched.
        let (rest, p) = split("postgres://postgres@127.0.0.1:5/postgres");
        assert_eq!(rest, "postgres://postgres@127.0.0.1:5/postgres");
        assert_eq!(p, SslParams::default());
        // A '?' in the (unencoded) password is not the query.
        let (rest, p) = split("postgres://u:a?b@h/db?sslmode=disable");
        assert_eq!(rest, "postgres://u:a?b@h/db");
        assert_eq!(p.mode, Some(SslMode::Disable));
        assert!(rest.parse::<tokio_postgres::Config>().is_ok());
    }

    #[test]
    fn conninfo_form_loses_only_the_ssl_parameters() {
        let (rest, p) = split(
            "host=localhost  port=5 sslmode = verify-ca password='it\\'s' \
             sslrootcert='/a dir/ca.pem' user=a\\ b",
        );
        // Quoted and escaped values are kept as written.
        assert_eq!(rest, "host=localhost port=5 password='it\\'s' user=a\\ b");
        assert_eq!(p.mode, Some(SslMode::VerifyCa));
        assert_eq!(p.rootcert.as_deref(), Some("/a dir/ca.pem"));
        let (rest, p) = split("host=h sslrootcert=/x\\ y.pem sslmode=prefer");
        assert_eq!(rest, "host=h");
        assert_eq!(p.mode, Some(SslMode::Prefer));
        assert_eq!(p.rootcert.as_deref(), Some("/x y.pem"));
        let config: tokio_postgres::Config = "host=localhost port=5 user=a\\ b".parse().unwrap();
        assert_eq!(config.get_user(), Some("a b"));
        // Malformed: left for tokio-postgres to refuse.
        let (rest, _) = split("host=h password='open");
        assert_eq!(rest, "host=h password='open");
        assert!(rest.parse::<tokio_postgres::Config>().is_err());
    }

    #[test]
    fn an_unknown_sslmode_is_named() {
        for url in [
            "postgres://h/db?sslmode=verify_full",
            "host=h sslmode=verify_full",
        ] {
            let e = split_ssl_params(url).unwrap_err();
            assert!(e.contains("\"verify_full\""), "{e}");
            assert!(e.contains("verify-full"), "{e}");
        }
        let e = split_ssl_params("host=h sslmode=allow").unwrap_err();
        assert!(e.contains("\"allow\" is not one of"), "{e}");
    }

    #[test]
    fn a_unix_socket_or_bare_hostaddr_gets_a_connector_without_a_name() {
        // tokio-postgres asks with "" before it looks at the mode: a URL
        // with `sslmode=disable` over a Unix socket must still connect.
        let (_, mut tls) = PgTls::new(&SslParams::default()).unwrap();
        let connect =
            MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(&mut tls, "").unwrap();
        assert!(connect.name.is_none());
    }

    #[test]
    fn modes_map_to_the_driver_and_root_files_are_checked() {
        let params = |mode, rootcert: Option<&str>| SslParams {
            mode,
            rootcert: rootcert.map(String::from),
        };
        let driver = |p: SslParams| PgTls::new(&p).map(|(m, _)| m).map_err(|e| e.to_string());
        assert_eq!(driver(params(None, None)), Ok(DriverMode::Prefer));
        assert_eq!(
            driver(params(Some(SslMode::VerifyFull), None)),
            Ok(DriverMode::Require)
        );
        assert_eq!(
            driver(params(None, Some("system"))),
            Ok(DriverMode::Require)
        );
        let e = driver(params(Some(SslMode::Require), Some("system"))).unwrap_err();
        assert!(e.contains("sslmode=require may not be used with sslrootcert=system"));
        // Disable never reads the file.
        assert_eq!(
            driver(params(Some(SslMode::Disable), Some("/nonexistent/ca.pem"))),
            Ok(DriverMode::Disable)
        );
        let e = driver(params(Some(SslMode::Require), Some("/nonexistent/ca.pem"))).unwrap_err();
        assert!(
            e.contains("\"/nonexistent/ca.pem\" is not a readable PEM file"),
            "{e}"
        );
        // A device (endless), a directory: refused unread, and in the same
        // words as a missing file, so nothing is learnt about the worker.
        for path in ["/dev/zero", "/dev/urandom", "/tmp", "/etc/shadow"] {
            let e = driver(params(Some(SslMode::VerifyFull), Some(path))).unwrap_err();
            assert!(e.contains("is not a readable PEM file"), "{path}: {e}");
        }
        // verify-ca trusts no public root without a name check.
        let e = driver(params(Some(SslMode::VerifyCa), None)).unwrap_err();
        assert!(e.contains("verify-ca needs sslrootcert"), "{e}");
        let dir = std::env::temp_dir().join(format!("wasmq-pgtls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "SECRET-LOOKING TEXT\n").unwrap();
        let e = driver(params(Some(SslMode::VerifyCa), empty.to_str())).unwrap_err();
        assert!(e.contains("is not a readable PEM file"), "{e}");
        let broken = dir.join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nSECRET-LOOKING TEXT\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = driver(params(Some(SslMode::VerifyCa), broken.to_str())).unwrap_err();
        assert!(!e.contains("SECRET"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
