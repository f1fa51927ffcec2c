//! Which network addresses are public, and what an outbound-HTTP
//! allow-list entry names: the rules deploy-time caps (a tenant that may
//! not reach private networks) and connect-time checks (every address a
//! request would go to) share.
//!
//! Host strings are read the way the system resolver reads them, so an
//! entry cannot hide an address from the deploy check that the resolver
//! would later connect to: besides the usual forms, `getaddrinfo` accepts
//! the old `inet_aton` spellings (`127.1`, `0x7f.0.0.1`, `2130706433`,
//! `017700000001`), and those are IP literals here too.

use std::net::{IpAddr, Ipv4Addr};

/// One allow-list entry: a host, and a port or any port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    /// Host, lowercased, without brackets.
    pub host: String,
    /// Port, or `None` for any.
    pub port: Option<u16>,
}

/// Parse a `HOST[:PORT]` allow-list entry (hosts lowercased, brackets
/// dropped); the error names the entry.
pub fn parse_allow_entry(entry: &str) -> Result<AllowEntry, String> {
    let entry = entry.trim().to_ascii_lowercase();
    let (host, port) = match entry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => {
            let port = p
                .parse::<u16>()
                .map_err(|_| format!("allow-list entry {entry:?}: port {p:?} is not a number"))?;
            (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                Some(port),
            )
        }
        // No port: `host`, `[v6]` or a bare `v6`.
        _ => (
            entry
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            None,
        ),
    };
    if host.is_empty() {
        return Err(format!("allow-list entry {entry:?} has no host"));
    }
    Ok(AllowEntry { host, port })
}

/// The IP address `host` spells, if it is an IP literal in any form the
/// system resolver accepts (see the module docs); brackets are allowed.
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(ip);
    }
    inet_aton(host).map(IpAddr::V4)
}

/// `inet_aton`'s IPv4 forms: 1 to 4 parts, each decimal, `0x` hex or
/// `0` octal; the last part fills the remaining bytes.
fn inet_aton(text: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for part in &parts {
        let value = if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            u32::from_str_radix(hex, 16).ok()?
        } else if part.len() > 1 && part.starts_with('0') {
            u32::from_str_radix(&part[1..], 8).ok()?
        } else if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            part.parse().ok()?
        } else {
            return None;
        };
        values.push(value);
    }
    let (last, head) = values.split_last()?;
    let mut address: u32 = 0;
    for (i, v) in head.iter().enumerate() {
        if *v > 255 {
            return None;
        }
        address |= v << (24 - 8 * i);
    }
    let room = 32 - 8 * head.len() as u32;
    if room < 32 && *last >= 1 << room {
        return None;
    }
    Some(Ipv4Addr::from(address | last))
}

/// Why allow-list entry `entry` reaches a non-public address whatever DNS
/// says (an IP literal of a loopback, private, link-local, ... address, or
/// `localhost`), or `None`.
pub fn private_entry(entry: &str) -> Option<String> {
    let parsed = parse_allow_entry(entry).ok()?;
    let host = parsed.host.trim_end_matches('.');
    if host == "localhost" || host.ends_with(".localhost") {
        return Some("loopback (localhost)".into());
    }
    let ip = ip_literal(host)?;
    non_public(ip).map(|kind| format!("{kind} ({ip})"))
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
            } else if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
                // Local-use NAT64 (64:ff9b:1::/48): translated inside the
                // operator's own network.
                Some("local-use NAT64 (64:ff9b:1::/48)")
            } else if s[0] == 0x2002 {
                // 6to4 (2002:a.b.c.d::/48): judged by the IPv4 it carries.
                non_public_v4(embedded(s[1], s[2]))
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
    } else if a == 192 && b == 0 && ip.octets()[2] == 0 {
        Some("IETF protocol assignments (192.0.0.0/24)")
    } else if a == 198 && b & 0xfe == 18 {
        Some("benchmarking (198.18.0.0/15)")
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
            ("64:ff9b:1::1", "local-use NAT64"),
            ("2002:7f00:1::", "loopback"),
            ("2002:a9fe:a9fe::1", "link-local"),
            ("192.0.0.8", "IETF"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
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
    fn numeric_host_spellings_are_ip_literals() {
        for (text, ip) in [
            ("127.1", "127.0.0.1"),
            ("0x7f.0.0.1", "127.0.0.1"),
            ("2130706433", "127.0.0.1"),
            ("017700000001", "127.0.0.1"),
            ("10.1", "10.0.0.1"),
            ("169.254.43518", "169.254.169.254"),
            ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
        ] {
            assert_eq!(ip_literal(text), Some(ip.parse().unwrap()), "{text}");
        }
        for name in [
            "example.com",
            "1.2.3.4.5",
            "256.1.1.1",
            "0x",
            "08.1.1.1",
            "",
        ] {
            assert_eq!(ip_literal(name), None, "{name}");
        }
    }

    #[test]
    fn entries_that_reach_private_addresses_are_named() {
        for entry in [
            "127.0.0.1:8080",
            "[::1]",
            "[::ffff:169.254.169.254]:80",
            "169.254.169.254",
            "2130706433:80",
            "0.0.0.0",
            "localhost:3000",
            "db.localhost",
            "10.0.0.5:8025",
        ] {
            assert!(private_entry(entry).is_some(), "{entry}");
        }
        for entry in [
            "api.example.com:443",
            "93.184.216.34",
            "[2606:2800:220:1::1]:443",
        ] {
            assert_eq!(private_entry(entry), None, "{entry}");
        }
    }
}
