//! Which addresses a guest may reach: public ones, plus the non-public ones
//! its policy grants explicitly.
//!
//! A name on the allow-list is resolved here, by the host, and every address
//! it resolves to is checked; one non-public address refuses the request, so
//! a name that answers "public and 127.0.0.1" cannot get through by luck of
//! ordering. The addresses returned are the ones the client connects to.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use wasmtime_wasi_http::Error as HttpError;

use crate::addresses::{ip_literal, non_public};

/// Why a destination yielded no address to connect to.
#[derive(Debug)]
pub enum Unreachable {
    /// Policy refused it; the message names host, port and address.
    Denied(String),
    /// Name resolution failed (worth retrying, not a policy matter).
    Failed(HttpError),
}

/// The non-public addresses a job may reach, and how.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// IP-literal allow-list entries: each grants exactly that address (and
    /// port, if given), even when it is loopback or private.
    pub explicit: Vec<(IpAddr, Option<u16>)>,
    /// Names may resolve to any non-public address.
    pub allow_private_networks: bool,
    /// IP-literal entries may grant a non-public address: true unless the
    /// tenant's caps forbid private networks (then no entry reaches one).
    pub literal_grants: bool,
}

impl AddressPolicy {
    /// The addresses `host:port` may be reached at, every one checked.
    /// An IP-literal host is used as is; a name is resolved once, here.
    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, Unreachable> {
        let addrs = match ip_literal(host) {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None => lookup(host, port, timeout).await?,
        };
        for addr in &addrs {
            self.check(host, *addr).map_err(Unreachable::Denied)?;
        }
        Ok(addrs)
    }

    /// `Err(message)` when `addr` (an address of `host`) is non-public and
    /// not granted.
    pub fn check(&self, host: &str, addr: SocketAddr) -> Result<(), String> {
        let Some(kind) = non_public(addr.ip()) else {
            return Ok(());
        };
        let ip = addr.ip().to_canonical();
        let port = addr.port();
        if !self.literal_grants && !self.allow_private_networks {
            return Err(format!(
                "outbound HTTP to {host}:{port} (it is {}, a {kind} address, and this task's tenant \
                 may not reach private networks)",
                addr.ip()
            ));
        }
        let listed = self
            .explicit
            .iter()
            .any(|(e, p)| e.to_canonical() == ip && p.is_none_or(|p| p == addr.port()));
        if self.allow_private_networks || listed {
            return Ok(());
        }
        Err(format!(
            "outbound HTTP to {host}:{port} (it resolves to {}, a {kind} address; \
             list \"{addr}\" in allow_http or set allow_private_networks to reach it)",
            addr.ip()
        ))
    }
}

/// Resolve `host` with the system resolver, bounded by `timeout`.
async fn lookup(host: &str, port: u16, timeout: Duration) -> Result<Vec<SocketAddr>, Unreachable> {
    let found = tokio::time::timeout(timeout, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| Unreachable::Failed(HttpError::DnsTimeout))?;
    let addrs: Vec<SocketAddr> = found
        .map_err(|e| {
            // wasi:http's DNS error has no free-text field; the resolver's
            // message in `rcode` is what the guest can show its user.
            Unreachable::Failed(HttpError::DnsError {
                rcode: Some(format!("{host}: {e}")),
                info_code: None,
            })
        })?
        .collect();
    if addrs.is_empty() {
        return Err(Unreachable::Failed(HttpError::DestinationNotFound));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_entries_grant_exactly_their_address() {
        let sock = |s: &str| s.parse::<SocketAddr>().unwrap();
        let policy = AddressPolicy {
            explicit: vec![("127.0.0.1".parse().unwrap(), Some(8080))],
            allow_private_networks: false,
            literal_grants: true,
        };
        assert!(policy.check("127.0.0.1", sock("127.0.0.1:8080")).is_ok());
        assert!(policy.check("x", sock("[::ffff:127.0.0.1]:8080")).is_ok());
        let err = policy
            .check("localhost", sock("127.0.0.1:8081"))
            .unwrap_err();
        assert!(err.contains("localhost:8081"), "{err}");
        assert!(err.contains("127.0.0.1, a loopback address"), "{err}");
        assert!(policy.check("x", sock("10.0.0.1:8080")).is_err());
        assert!(policy.check("x", sock("8.8.8.8:53")).is_ok());
        let open = AddressPolicy {
            allow_private_networks: true,
            ..AddressPolicy::default()
        };
        assert!(open.check("x", sock("10.0.0.1:8080")).is_ok());
        let capped = AddressPolicy {
            literal_grants: false,
            ..policy
        };
        let err = capped
            .check("127.0.0.1", sock("127.0.0.1:8080"))
            .unwrap_err();
        assert!(err.contains("may not reach private networks"), "{err}");
    }

    #[tokio::test]
    async fn names_are_resolved_and_every_address_checked() {
        let policy = AddressPolicy::default();
        match policy
            .resolve("localhost", 80, Duration::from_secs(5))
            .await
        {
            Err(Unreachable::Denied(m)) => assert!(m.contains("localhost:80"), "{m}"),
            other => panic!("localhost must be refused, got {other:?}"),
        }
        let open = AddressPolicy {
            allow_private_networks: true,
            ..AddressPolicy::default()
        };
        let addrs = open
            .resolve("localhost", 80, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }
}
