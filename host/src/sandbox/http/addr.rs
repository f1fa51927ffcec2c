//! Which addresses a guest may reach: public ones, plus the non-public ones
//! its policy grants explicitly.
//!
//! A name on the allow-list is resolved here, by the host, and every address
//! it resolves to is checked; one non-public address refuses the request, so
//! a name that answers "public and 127.0.0.1" cannot get through by luck of
//! ordering. The addresses returned are the ones the client connects to.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use wasmtime_wasi_http::Error as HttpError;

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
        let addrs = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => lookup(host, port, timeout).await?,
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
        let listed = self
            .explicit
            .iter()
            .any(|(e, p)| e.to_canonical() == ip && p.is_none_or(|p| p == addr.port()));
        if self.allow_private_networks || listed {
            return Ok(());
        }
        let port = addr.port();
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

/// What kind of non-public address `ip` is, or `None` for a public one.
/// IPv6 forms that carry an IPv4 address (mapped, compatible, NAT64) are
/// judged by that IPv4 address, since that is where the packets go.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |a: u16, b: u16| Ipv4Addr::from((u32::from(a) << 16) | u32::from(b));
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if let Some(v4) = v6.to_ipv4_mapped() {
                non_public_v4(v4)
            } else if s[..6] == [0; 6] || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                // IPv4-compatible (::a.b.c.d) or NAT64 (64:ff9b::a.b.c.d).
                non_public_v4(embedded(s[6], s[7]))
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("unique-local (fc00::/7)")
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if s[0] & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_unspecified() {
        Some("unspecified")
    } else if a == 0 {
        // 0.0.0.0/8: Linux connects 0.x.y.z to the local host.
        Some("this-network (0.0.0.0/8)")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private (RFC 1918)")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if a == 100 && b & 0xc0 == 64 {
        Some("carrier-grade NAT (100.64.0.0/10)")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if ip.is_multicast() {
        Some("multicast")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(ip: &str) -> Option<&'static str> {
        non_public(ip.parse().unwrap())
    }

    #[test]
    fn non_public_ranges_are_named() {
        for (ip, k) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("100.127.255.255", "carrier-grade NAT"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "this-network"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fc00::1", "unique-local"),
            ("fdab::1", "unique-local"),
            ("fe80::1", "link-local"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:100.64.0.1", "carrier-grade NAT"),
            ("64:ff9b::a00:1", "private"),
        ] {
            let got = kind(ip).unwrap_or_else(|| panic!("{ip} must be non-public"));
            assert!(got.starts_with(k), "{ip}: {got}");
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "100.128.0.1",
            "172.32.0.1",
            "2606:2800:220:1::1",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(kind(ip), None, "{ip} is public");
        }
    }

    #[test]
    fn explicit_entries_grant_exactly_their_address() {
        let sock = |s: &str| s.parse::<SocketAddr>().unwrap();
        let policy = AddressPolicy {
            explicit: vec![("127.0.0.1".parse().unwrap(), Some(8080))],
            allow_private_networks: false,
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
