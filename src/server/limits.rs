//! Who may hold a listener's connections: a cap per source, so that one
//! host (or one IPv6 /64) cannot take the connections every client shares.
//! The README's "Server" section, "Connections", gives the defaults.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::policy::AllowList;

/// What a per-source cap counts: one IPv4 address, or one IPv6 /64. A host
/// owns the 64-bit interface identifier of its addresses (RFC 4291 §2.5.1)
/// and can draw a fresh address from its /64 per connection, so counting
/// single IPv6 addresses would cap nothing. IPv4-mapped IPv6 counts as the
/// IPv4 address it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    V4(u32),
    V6(u64),
}

impl Source {
    pub(crate) fn of(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(a) => Source::V4(u32::from(a)),
            // The upper half of the address: its /64 prefix.
            IpAddr::V6(a) => Source::V6((u128::from(a) >> 64) as u64),
        }
    }
}

/// The connections each source holds on one listener.
pub(crate) struct Sources {
    cap: usize,
    /// Trusted proxies carry many clients on their connections: uncapped.
    exempt: Option<AllowList>,
    /// Only sources with open connections have an entry, so the map is
    /// bounded by the listener's connection budget.
    open: Mutex<HashMap<Source, usize>>,
}

impl Sources {
    pub(crate) fn new(cap: usize, exempt: Option<AllowList>) -> Arc<Sources> {
        Arc::new(Sources {
            cap,
            exempt,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// One more connection from `ip`, or `None` when its source already
    /// holds the cap.
    pub(crate) fn claim(self: &Arc<Self>, ip: IpAddr) -> Option<SourceClaim> {
        if self.exempt.as_ref().is_some_and(|t| t.contains(ip)) {
            return Some(SourceClaim {
                sources: self.clone(),
                source: None,
            });
        }
        let source = Source::of(ip);
        let mut open = self.open.lock();
        let n = open.entry(source).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(SourceClaim {
            sources: self.clone(),
            source: Some(source),
        })
    }

    #[cfg(test)]
    fn held(&self, ip: IpAddr) -> usize {
        self.open.lock().get(&Source::of(ip)).copied().unwrap_or(0)
    }
}

/// A source's claim on one connection, returned when dropped.
pub(crate) struct SourceClaim {
    sources: Arc<Sources>,
    /// `None` for an exempt source.
    source: Option<Source>,
}

impl Drop for SourceClaim {
    fn drop(&mut self) {
        let Some(source) = self.source else {
            return;
        };
        let mut open = self.sources.open.lock();
        if let Some(n) = open.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                open.remove(&source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_groups_by_64_and_mapped_ipv4_is_ipv4() {
        assert_eq!(
            Source::of(ip("2001:db8:1:2::1")),
            Source::of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(
            Source::of(ip("2001:db8:1:2::1")),
            Source::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            Source::of(ip("::ffff:192.0.2.7")),
            Source::of(ip("192.0.2.7"))
        );
        assert_ne!(Source::of(ip("192.0.2.7")), Source::of(ip("192.0.2.8")));
    }

    #[test]
    fn the_cap_counts_open_claims_per_source() {
        let s = Sources::new(2, None);
        let a = s.claim(ip("2001:db8::1")).unwrap();
        let b = s.claim(ip("2001:db8::2")).unwrap();
        assert!(s.claim(ip("2001:db8::3")).is_none(), "same /64");
        let other = s.claim(ip("2001:db8:0:1::1")).unwrap();
        drop(a);
        let c = s.claim(ip("2001:db8::3")).unwrap();
        assert_eq!(s.held(ip("2001:db8::")), 2);
        drop((b, c, other));
        assert!(s.open.lock().is_empty(), "no entry outlives its claims");
    }

    #[test]
    fn trusted_proxies_are_not_capped() {
        let s = Sources::new(1, Some(AllowList::new(&["10.0.0.0/8".parse().unwrap()])));
        let claims: Vec<_> = (0..5).map(|_| s.claim(ip("10.1.1.1")).unwrap()).collect();
        assert_eq!(s.held(ip("10.1.1.1")), 0);
        let _one = s.claim(ip("192.0.2.1")).unwrap();
        assert!(s.claim(ip("::ffff:192.0.2.1")).is_none());
        drop(claims);
    }
}
