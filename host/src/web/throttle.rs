//! The per-client budget of credential checks that fail: a bearer token
//! or a login that is not valid spends one, and a client whose budget is
//! spent gets 429 with `Retry-After` before its token is even looked at.
//!
//! Invariants:
//! - **Counted before checking.** A check takes one unit of the budget
//!   *before* the token is compared ([`Throttle::attempt`]) and a valid
//!   token gives it back ([`Attempt::succeeded`]). So guesses sent in
//!   parallel cannot all slip through while the first ones are being
//!   checked: at most the budget (plus what refilled meanwhile) is ever
//!   checked. An attempt dropped without `succeeded` (wrong token, a
//!   Redis error) stays counted: failing closed.
//! - **A token bucket per client**: `failures` units, refilled evenly
//!   over `window` (one every `window / failures`). A client that stops
//!   failing gets its whole budget back after one window.
//! - **The client is its address**, by default the TCP peer's. IPv6
//!   clients are grouped by /64 (one host usually owns a whole /64, and
//!   would otherwise get a fresh budget per address). Behind a proxy every
//!   client has the proxy's address and they share one budget, unless the
//!   dashboard is told to take the address from `X-Forwarded-For`
//!   ([`client_address`]).
//! - **Bounded memory**: at most [`MAX_CLIENTS`] clients are remembered;
//!   past that, clients whose budget is whole are forgotten, and if none
//!   is, a new client is refused (429) until some are, rather than
//!   forgetting a client that is guessing.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Clients remembered at most (each a few dozen bytes).
const MAX_CLIENTS: usize = 10_000;

/// How many failed checks a client may make, and how fast its budget
/// comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Failed checks allowed in a row (the bucket's size).
    pub failures: u32,
    /// How long the whole budget takes to come back.
    pub window: Duration,
}

impl Default for ThrottleConfig {
    /// 10 failures a minute: plenty for a person mistyping a token, and
    /// against a 16-character (or 64-hex-digit) token, no guessing at all.
    fn default() -> Self {
        ThrottleConfig {
            failures: 10,
            window: Duration::from_secs(60),
        }
    }
}

/// One client's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Units left (fractional: it refills continuously).
    units: f64,
    /// When `units` was last brought up to date.
    at: Instant,
}

/// Every client's budget.
pub struct Throttle {
    config: ThrottleConfig,
    /// A std mutex, not tokio's: it is held for a few arithmetic
    /// operations, never across an `.await`.
    clients: Mutex<HashMap<IpAddr, Bucket>>,
}

/// A check under way: dropped, it counts as a failure; see
/// [`Attempt::succeeded`].
#[must_use = "an attempt counts as a failure unless `succeeded` is called"]
pub struct Attempt<'a> {
    throttle: &'a Throttle,
    client: IpAddr,
}

impl Attempt<'_> {
    /// The token was valid: give the unit back.
    pub fn succeeded(self) {
        let size = f64::from(self.throttle.config.failures);
        let mut clients = self.throttle.lock();
        if let Some(bucket) = clients.get_mut(&self.client) {
            bucket.units = (bucket.units + 1.0).min(size);
        }
    }
}

impl Throttle {
    /// A throttle with this budget (a budget of 0 failures is taken as 1:
    /// a dashboard nobody can log in to is of no use).
    pub fn new(config: ThrottleConfig) -> Self {
        Throttle {
            config: ThrottleConfig {
                failures: config.failures.max(1),
                window: config.window.max(Duration::from_millis(1)),
            },
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Bucket>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Units a bucket regains per second.
    fn rate(&self) -> f64 {
        f64::from(self.config.failures) / self.config.window.as_secs_f64()
    }

    /// Take one unit of `client`'s budget before checking its token; when
    /// none is left, how long until one is (for `Retry-After`).
    pub fn attempt(&self, client: IpAddr) -> Result<Attempt<'_>, Duration> {
        let client = group(client);
        let size = f64::from(self.config.failures);
        let rate = self.rate();
        let now = Instant::now();
        let mut clients = self.lock();
        if !clients.contains_key(&client) && clients.len() >= MAX_CLIENTS {
            clients.retain(|_, b| b.units + now.duration_since(b.at).as_secs_f64() * rate < size);
            if clients.len() >= MAX_CLIENTS {
                return Err(self.config.window);
            }
        }
        let bucket = clients.entry(client).or_insert(Bucket {
            units: size,
            at: now,
        });
        bucket.units =
            (bucket.units + now.duration_since(bucket.at).as_secs_f64() * rate).min(size);
        bucket.at = now;
        if bucket.units >= 1.0 {
            bucket.units -= 1.0;
            Ok(Attempt {
                throttle: self,
                client,
            })
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.units) / rate))
        }
    }
}

/// The unit a budget belongs to: an IPv4 address (an IPv4-mapped IPv6
/// one taken as IPv4), or an IPv6 /64.
fn group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

/// Who the client is: the TCP peer, or, when the dashboard trusts its
/// proxy (`--trust-forwarded-for`), the last address in
/// `X-Forwarded-For`: the one the nearest proxy appended, which a client
/// cannot choose (what a client writes itself comes before it). A
/// missing or unparsable header falls back to the peer.
pub fn client_address(peer: IpAddr, forwarded_for: Option<&str>, trust: bool) -> IpAddr {
    if !trust {
        return peer;
    }
    forwarded_for
        .and_then(|h| h.rsplit(',').next())
        .and_then(|last| last.trim().parse().ok())
        .unwrap_or(peer)
}

/// `Retry-After`'s value for a wait: whole seconds, rounded up, at
/// least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn failures_spend_the_budget_and_successes_give_it_back() {
        let throttle = Throttle::new(ThrottleConfig {
            failures: 3,
            window: Duration::from_secs(3600),
        });
        let me = ip("10.0.0.1");
        // Successes cost nothing, however many.
        for _ in 0..10 {
            throttle.attempt(me).unwrap().succeeded();
        }
        // Three attempts in flight at once spend the three units.
        let held: Vec<_> = (0..3).map(|_| throttle.attempt(me).unwrap()).collect();
        let wait = throttle.attempt(me).err().expect("the fourth is refused");
        assert!(wait > Duration::from_secs(1000), "{wait:?}");
        drop(held);
        assert!(
            throttle.attempt(me).is_err(),
            "dropped attempts stay counted"
        );
        assert!(throttle.attempt(ip("10.0.0.2")).is_ok(), "another client");
    }

    #[test]
    fn the_budget_refills_over_the_window() {
        let throttle = Throttle::new(ThrottleConfig {
            failures: 2,
            window: Duration::from_millis(200),
        });
        let me = ip("10.0.0.1");
        drop(throttle.attempt(me).unwrap());
        drop(throttle.attempt(me).unwrap());
        let wait = throttle.attempt(me).err().unwrap();
        std::thread::sleep(wait + Duration::from_millis(5));
        assert!(throttle.attempt(me).is_ok());
    }

    #[test]
    fn ipv6_clients_are_grouped_by_64_and_mapped_v4_is_v4() {
        assert_eq!(group(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(group(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(group(ip("10.1.2.3")), ip("10.1.2.3"));
    }

    #[test]
    fn forwarded_for_is_read_only_when_trusted_and_only_its_last_hop() {
        let peer = ip("127.0.0.1");
        let h = Some("6.6.6.6, 203.0.113.9");
        assert_eq!(client_address(peer, h, false), peer);
        assert_eq!(client_address(peer, h, true), ip("203.0.113.9"));
        assert_eq!(client_address(peer, Some("junk"), true), peer);
        assert_eq!(client_address(peer, None, true), peer);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(6)), 6);
        assert_eq!(retry_after_secs(Duration::from_millis(6001)), 7);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
