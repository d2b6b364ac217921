//! Who may hold a listener's connections: a cap per source, so that one
//! host (or one IPv6 /64) cannot take the connections every client shares.
//! The README's "Server" section, "Connections", gives the defaults.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

use refresh_guard::AllowList;

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

impl SourceClaim {
    /// The source claimed; `None` when it is exempt from the cap.
    pub(crate) fn source(&self) -> Option<Source> {
        self.source
    }
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

/// Descriptors kept for everything but connections: the listeners, the
/// store's files, the runtime's own, signal and file-watch handles.
const RESERVED_FDS: u64 = 64;

/// The process's soft limit on open files, where it can be read without
/// `unsafe` (Linux: `/proc/self/limits`); `None` if unknown or unlimited.
pub(crate) fn open_file_limit() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|t| soft_open_files(&t))
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// The soft limit of the "Max open files" row of a `/proc/<pid>/limits`.
fn soft_open_files(limits: &str) -> Option<u64> {
    let row = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    row.split_whitespace().next()?.parse().ok()
}

/// The (public, admin) connection budgets that fit `limit` open files.
///
/// A budget above the limit is worse than a smaller one: accept then fails
/// for want of descriptors before the budget is spent, so no idle
/// connection ever gives way, and the admin listener cannot accept either.
/// The admin budget is kept (up to half of what there is room for); the
/// public one gets the rest. A limit too small for any connection is left
/// to fail at accept.
pub(crate) fn fit_open_files(limit: Option<u64>, public: usize, admin: usize) -> (usize, usize) {
    let Some(limit) = limit else {
        return (public, admin);
    };
    let room = usize::try_from(limit.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
    if public.saturating_add(admin) <= room || room < 2 {
        return (public, admin);
    }
    let admin = admin.min(room / 2);
    (public.min(room - admin), admin)
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

    #[test]
    fn budgets_fit_the_open_file_limit() {
        assert_eq!(fit_open_files(None, 1024, 64), (1024, 64));
        assert_eq!(fit_open_files(Some(20_000), 1024, 64), (1024, 64));
        assert_eq!(fit_open_files(Some(1024), 1024, 64), (896, 64));
        assert_eq!(fit_open_files(Some(256), 1024, 64), (128, 64));
        assert_eq!(fit_open_files(Some(128), 1024, 64), (32, 32));
        assert_eq!(fit_open_files(Some(164), 1, 1000), (1, 50));
        assert_eq!(fit_open_files(Some(65), 1024, 64), (1024, 64), "no room");
    }

    #[test]
    fn the_soft_open_file_limit_is_read_from_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             96365                96365                processes \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(soft_open_files(text), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(soft_open_files(unlimited), None);
        assert_eq!(soft_open_files(""), None);
    }
}
