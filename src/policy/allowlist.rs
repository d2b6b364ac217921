//! IP allow-lists for refresh-token redemption.
//!
//! Operators write CIDRs, `a-b` ranges and single addresses. They are parsed
//! into [`IpRange`]s, then compiled into an [`AllowList`]: ranges are merged,
//! each merged range is cut into aligned prefixes, and the prefixes are kept
//! in one hash set per prefix length. A lookup masks the address once per
//! length present and probes that set, so its cost is bounded by the address
//! width (at most 33 probes for IPv4, 129 for IPv6), never by the list length,
//! and it does not allocate.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are IPv4 everywhere: a
//! looked-up address is canonicalised first, and an entry whose both ends are
//! mapped is stored as its IPv4 range. IPv6 entries therefore never match a
//! mapped address.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ahash::RandomState;
use ipnet::IpNet;

/// What an entry may look like, for error messages.
const FORMS: &str =
    "use a cidr (10.0.0.0/8, 2001:db8::/32), a range (192.0.2.10-192.0.2.20) or an address";

/// One allow-list entry as written by an operator, normalised to an inclusive range.
///
/// Ranges are the common form every entry syntax reduces to, so merging and
/// comparing policies does not depend on how an operator spelled them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct IpRange {
    start: IpAddr,
    end: IpAddr,
}

impl IpRange {
    /// Build a range from its ends, refusing ones that cannot be meant.
    ///
    /// Both ends must be the same family and `start <= end`. If both ends are
    /// IPv4-mapped IPv6 addresses the range is stored as IPv4, because lookups
    /// treat mapped addresses as IPv4.
    pub fn new(start: IpAddr, end: IpAddr) -> Result<IpRange, AllowListError> {
        IpRange::checked(start, end, || format!("{start}-{end}"))
    }

    /// The lowest address, so callers can display or compare entries.
    pub fn start(&self) -> IpAddr {
        self.start
    }

    /// The highest address (inclusive), so callers can display or compare entries.
    pub fn end(&self) -> IpAddr {
        self.end
    }

    /// Naive membership test; the reference the compiled [`AllowList`] must agree with.
    ///
    /// Like [`AllowList::contains`], an IPv4-mapped address is treated as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.start.is_ipv4()
            && bits(self.start) <= bits(ip)
            && bits(ip) <= bits(self.end)
    }

    fn checked(
        start: IpAddr,
        end: IpAddr,
        entry: impl FnOnce() -> String,
    ) -> Result<IpRange, AllowListError> {
        let (start, end) = match (start, end) {
            (IpAddr::V6(s), IpAddr::V6(e)) => match (s.to_ipv4_mapped(), e.to_ipv4_mapped()) {
                (Some(s), Some(e)) => (IpAddr::V4(s), IpAddr::V4(e)),
                _ => (start, end),
            },
            _ => (start, end),
        };
        if start.is_ipv4() != end.is_ipv4() {
            return Err(AllowListError::MixedFamilies { entry: entry() });
        }
        if bits(start) > bits(end) {
            return Err(AllowListError::Reversed { entry: entry() });
        }
        Ok(IpRange { start, end })
    }

    /// The prefix length if the range is exactly one aligned prefix.
    fn prefix_len(&self) -> Option<u32> {
        let (start, end) = (bits(self.start), bits(self.end));
        let host = end - start;
        let is_prefix = host & host.wrapping_add(1) == 0 && start & host == 0;
        is_prefix.then(|| width(self.start) - host.count_ones())
    }
}

impl FromStr for IpRange {
    type Err = AllowListError;

    /// Parse a CIDR (`10.0.0.0/8`), a range (`192.0.2.10 - 192.0.2.20`) or an
    /// address (`192.0.2.7`); surrounding whitespace is ignored.
    fn from_str(s: &str) -> Result<IpRange, AllowListError> {
        let text = s.trim();
        let entry = || text.to_owned();
        let syntax = || AllowListError::Syntax { entry: entry() };
        if let Some((addr, len)) = text.split_once('/') {
            let Ok(net) = text.parse::<IpNet>() else {
                // A good address with a numeric but too long prefix deserves a precise message.
                return Err(match (addr.parse::<IpAddr>(), len.parse::<u32>()) {
                    (Ok(a), Ok(_)) => AllowListError::PrefixLength {
                        entry: entry(),
                        max: width(a) as u8,
                    },
                    _ => syntax(),
                });
            };
            if net.trunc() != net {
                return Err(AllowListError::HostBitsSet {
                    entry: entry(),
                    suggestion: net.trunc().to_string(),
                });
            }
            return IpRange::checked(net.network(), net.broadcast(), entry);
        }
        let addr = |s: &str| s.trim().parse::<IpAddr>().map_err(|_| syntax());
        match text.split_once('-') {
            Some((a, b)) => IpRange::checked(addr(a)?, addr(b)?, entry),
            None => {
                let a = addr(text)?;
                IpRange::checked(a, a, entry)
            }
        }
    }
}

impl fmt::Display for IpRange {
    /// Canonical text: a CIDR when the range is one prefix, else `a-b`, so
    /// equal ranges always print the same way and re-parse to themselves.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix_len() {
            Some(len) => write!(f, "{}/{}", self.start, len),
            None => write!(f, "{}-{}", self.start, self.end),
        }
    }
}

/// Why an allow-list entry was refused; Display is short, lowercase, names the entry text and says what is allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AllowListError {
    /// The text is not an address, CIDR or range at all.
    Syntax {
        /// The entry as written.
        entry: String,
    },
    /// A CIDR's prefix length is longer than its family's address.
    PrefixLength {
        /// The entry as written.
        entry: String,
        /// The longest prefix the family allows (32 or 128).
        max: u8,
    },
    /// A CIDR has bits set after its prefix, which usually means a typo.
    HostBitsSet {
        /// The entry as written.
        entry: String,
        /// The network the operator probably meant.
        suggestion: String,
    },
    /// A range's ends are of different families.
    MixedFamilies {
        /// The entry as written.
        entry: String,
    },
    /// A range's start is above its end.
    Reversed {
        /// The entry as written.
        entry: String,
    },
}

impl fmt::Display for AllowListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowListError::Syntax { entry } => {
                write!(f, "allow-list entry {entry:?} is not understood; {FORMS}")
            }
            AllowListError::PrefixLength { entry, max } => write!(
                f,
                "allow-list entry {entry:?}: prefix length must be at most {max}"
            ),
            AllowListError::HostBitsSet { entry, suggestion } => write!(
                f,
                "allow-list entry {entry:?}: host bits set; did you mean {suggestion}?"
            ),
            AllowListError::MixedFamilies { entry } => write!(
                f,
                "allow-list entry {entry:?}: range mixes ipv4 and ipv6; both ends must be the same family"
            ),
            AllowListError::Reversed { entry } => write!(
                f,
                "allow-list entry {entry:?}: range start is above its end; write the lower address first"
            ),
        }
    }
}

impl std::error::Error for AllowListError {}

/// Prefix tables of one family: (prefix length, masked networks of that length).
type Tables<T> = Vec<(u8, HashSet<T, RandomState>)>;

/// A compiled allow-list. Empty = any address allowed.
///
/// Compiled once per policy and looked up on every refresh, so lookup cost is
/// bounded by the address width rather than the number of entries.
#[derive(Clone)]
pub struct AllowList {
    /// Merged, sorted, IPv4 before IPv6; empty means any.
    ranges: Vec<IpRange>,
    v4: Tables<u32>,
    v6: Tables<u128>,
}

impl AllowList {
    /// The list that allows every address, the default when no list is configured.
    pub fn any() -> AllowList {
        AllowList {
            ranges: Vec::new(),
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }

    /// Compile entries for fast lookup; an empty slice gives [`AllowList::any`].
    pub fn new(entries: &[IpRange]) -> AllowList {
        let mut list = AllowList::any();
        for v6 in [false, true] {
            let spans: Vec<(u128, u128)> = entries
                .iter()
                .filter(|r| r.start.is_ipv6() == v6)
                .map(|r| (bits(r.start), bits(r.end)))
                .collect();
            let width = if v6 { 128 } else { 32 };
            let mut prefixes = BTreeMap::new();
            for (start, end) in merge(spans) {
                decompose(start, end, width, &mut prefixes);
                list.ranges.push(IpRange {
                    start: addr(v6, start),
                    end: addr(v6, end),
                });
            }
            if v6 {
                list.v6 = tables(prefixes, |n| n);
            } else {
                // Every v4 network fits in 32 bits: it came from a u32.
                list.v4 = tables(prefixes, |n| n as u32);
            }
        }
        list
    }

    /// Whether a caller at `ip` may pass: an address that could not be
    /// determined (`None`, e.g. an unreadable forwarding chain) is outside
    /// every non-empty list, so the check fails closed (README "The order of
    /// checks").
    pub fn admits(&self, ip: Option<IpAddr>) -> bool {
        self.is_any() || ip.is_some_and(|ip| self.contains(ip))
    }

    /// Whether a refresh from `ip` is allowed; IPv4-mapped IPv6 counts as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        if self.is_any() {
            return true;
        }
        match ip.to_canonical() {
            IpAddr::V4(a) => {
                let x = u32::from(a);
                self.v4.iter().any(|(len, set)| {
                    let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
                    set.contains(&(x & mask))
                })
            }
            IpAddr::V6(a) => {
                let x = u128::from(a);
                self.v6.iter().any(|(len, set)| {
                    let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
                    set.contains(&(x & mask))
                })
            }
        }
    }

    /// Whether no restriction applies, so callers can skip or label the check.
    pub fn is_any(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The normalised entries (merged, sorted, IPv4 first), a stable form for
    /// display and for hashing the policy content.
    pub fn ranges(&self) -> &[IpRange] {
        &self.ranges
    }
}

impl Default for AllowList {
    /// No list configured means no restriction.
    fn default() -> AllowList {
        AllowList::any()
    }
}

impl PartialEq for AllowList {
    /// Lists are equal when they allow the same addresses.
    fn eq(&self, other: &AllowList) -> bool {
        self.ranges == other.ranges
    }
}

impl Eq for AllowList {}

impl fmt::Debug for AllowList {
    /// The normalised ranges; the lookup tables are noise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Shown<'a>(&'a IpRange);
        impl fmt::Debug for Shown<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self.0, f)
            }
        }
        if self.is_any() {
            return f.write_str("AllowList(any)");
        }
        f.write_str("AllowList")?;
        f.debug_list()
            .entries(self.ranges.iter().map(Shown))
            .finish()
    }
}

/// The address as an integer (IPv4 in the low 32 bits).
fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address width of `ip`'s family in bits.
fn width(ip: IpAddr) -> u32 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// The inverse of [`bits`] for the given family.
fn addr(v6: bool, n: u128) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(n))
    } else {
        // v4 values come from u32 addresses, so the cast keeps every bit.
        IpAddr::V4(Ipv4Addr::from(n as u32))
    }
}

/// Sort and merge overlapping or adjacent inclusive spans.
fn merge(mut spans: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    spans.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match out.last_mut() {
            // saturating: a span ending at u128::MAX absorbs everything after it.
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

/// Cut `start..=end` into the minimal aligned prefixes (at most `2 * width`),
/// adding each network to `out` under its prefix length.
fn decompose(mut start: u128, end: u128, width: u32, out: &mut BTreeMap<u8, Vec<u128>>) {
    loop {
        // The largest block aligned at `start` that does not pass `end`.
        let align = start.trailing_zeros().min(width);
        let fit = (end - start).checked_add(1).map_or(128, u128::ilog2);
        let host_bits = align.min(fit);
        // host_bits <= width <= 128, so the length fits in a u8.
        out.entry((width - host_bits) as u8)
            .or_default()
            .push(start);
        let last = start + u128::MAX.checked_shr(128 - host_bits).unwrap_or(0);
        if last >= end {
            return;
        }
        start = last + 1;
    }
}

/// Turn per-length network lists into the lookup tables, shortest prefix first.
fn tables<T: Eq + std::hash::Hash>(
    prefixes: BTreeMap<u8, Vec<u128>>,
    convert: impl Fn(u128) -> T,
) -> Tables<T> {
    prefixes
        .into_iter()
        .map(|(len, nets)| {
            let mut set = HashSet::with_capacity_and_hasher(nets.len(), RandomState::new());
            set.extend(nets.into_iter().map(&convert));
            (len, set)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(s: &str) -> IpRange {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn list(entries: &[&str]) -> AllowList {
        AllowList::new(&entries.iter().map(|s| r(s)).collect::<Vec<_>>())
    }

    fn shown(l: &AllowList) -> Vec<String> {
        l.ranges().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn parses_each_form() {
        let cases = [
            ("10.0.0.0/8", "10.0.0.0", "10.255.255.255", "10.0.0.0/8"),
            (
                "2001:db8::/32",
                "2001:db8::",
                "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
                "2001:db8::/32",
            ),
            (
                "192.0.2.10-192.0.2.20",
                "192.0.2.10",
                "192.0.2.20",
                "192.0.2.10-192.0.2.20",
            ),
            (
                " 192.0.2.10 -  192.0.2.20 ",
                "192.0.2.10",
                "192.0.2.20",
                "192.0.2.10-192.0.2.20",
            ),
            (
                "2001:db8::1-2001:db8::ff",
                "2001:db8::1",
                "2001:db8::ff",
                "2001:db8::1-2001:db8::ff",
            ),
            ("192.0.2.7", "192.0.2.7", "192.0.2.7", "192.0.2.7/32"),
            (
                "2001:db8::7",
                "2001:db8::7",
                "2001:db8::7",
                "2001:db8::7/128",
            ),
            (
                "10.0.0.0-10.255.255.255",
                "10.0.0.0",
                "10.255.255.255",
                "10.0.0.0/8",
            ),
            (
                "::ffff:10.0.0.0/104",
                "10.0.0.0",
                "10.255.255.255",
                "10.0.0.0/8",
            ),
            ("::ffff:192.0.2.7", "192.0.2.7", "192.0.2.7", "192.0.2.7/32"),
        ];
        for (text, start, end, canonical) in cases {
            let range = r(text);
            assert_eq!((range.start(), range.end()), (ip(start), ip(end)), "{text}");
            assert_eq!(range.to_string(), canonical, "{text}");
            assert_eq!(r(canonical), range, "{text}");
        }
    }

    #[test]
    fn refuses_each_error_kind_naming_the_entry() {
        type Kind = fn(&AllowListError) -> bool;
        let cases: &[(&str, Kind)] = &[
            ("", |e| matches!(e, AllowListError::Syntax { .. })),
            ("localhost", |e| matches!(e, AllowListError::Syntax { .. })),
            ("10.0.0.0/", |e| matches!(e, AllowListError::Syntax { .. })),
            ("10.0.0/8", |e| matches!(e, AllowListError::Syntax { .. })),
            ("10.0.0.1-", |e| matches!(e, AllowListError::Syntax { .. })),
            ("10.0.0.1-10.0.0.2-10.0.0.3", |e| {
                matches!(e, AllowListError::Syntax { .. })
            }),
            ("10.0.0.0/33", |e| {
                matches!(e, AllowListError::PrefixLength { max: 32, .. })
            }),
            ("2001:db8::/129", |e| {
                matches!(e, AllowListError::PrefixLength { max: 128, .. })
            }),
            ("10.0.0.0/300", |e| {
                matches!(e, AllowListError::PrefixLength { max: 32, .. })
            }),
            ("10.0.0.1/8", |e| {
                matches!(e, AllowListError::HostBitsSet { .. })
            }),
            ("10.0.0.1 - 2001:db8::1", |e| {
                matches!(e, AllowListError::MixedFamilies { .. })
            }),
            ("192.0.2.20-192.0.2.10", |e| {
                matches!(e, AllowListError::Reversed { .. })
            }),
        ];
        for &(text, kind) in cases {
            let err = text.parse::<IpRange>().unwrap_err();
            assert!(kind(&err), "{text}: {err:?}");
            let msg = err.to_string();
            assert!(msg.contains(&format!("{:?}", text.trim())), "{msg}");
            assert_eq!(msg, msg.to_lowercase(), "{msg}");
        }
        let syntax = "nope".parse::<IpRange>().unwrap_err().to_string();
        assert!(syntax.contains("10.0.0.0/8") && syntax.contains("192.0.2.10-192.0.2.20"));
    }

    #[test]
    fn host_bits_set_suggests_the_network() {
        let err = "10.0.0.1/8".parse::<IpRange>().unwrap_err();
        assert_eq!(
            err,
            AllowListError::HostBitsSet {
                entry: "10.0.0.1/8".into(),
                suggestion: "10.0.0.0/8".into()
            }
        );
        assert!(
            err.to_string()
                .contains("host bits set; did you mean 10.0.0.0/8?")
        );
        let err = "2001:db8::1/32".parse::<IpRange>().unwrap_err();
        assert!(
            err.to_string().contains("did you mean 2001:db8::/32?"),
            "{err}"
        );
    }

    #[test]
    fn new_checks_families_and_order() {
        let err = IpRange::new(ip("10.0.0.1"), ip("::1")).unwrap_err();
        assert_eq!(
            err,
            AllowListError::MixedFamilies {
                entry: "10.0.0.1-::1".into()
            }
        );
        let err = IpRange::new(ip("::2"), ip("::1")).unwrap_err();
        assert_eq!(
            err,
            AllowListError::Reversed {
                entry: "::2-::1".into()
            }
        );
        let one = IpRange::new(ip("192.0.2.7"), ip("192.0.2.7")).unwrap();
        assert_eq!(one, r("192.0.2.7"));
        // Mapped ends become IPv4, so they pair with IPv4 ends.
        let mapped = IpRange::new(ip("::ffff:10.0.0.1"), ip("::ffff:10.0.0.9")).unwrap();
        assert_eq!(mapped, r("10.0.0.1-10.0.0.9"));
    }

    #[test]
    fn whole_family_prefixes() {
        let v4 = list(&["0.0.0.0/0"]);
        for a in ["0.0.0.0", "255.255.255.255", "10.1.2.3", "::ffff:1.2.3.4"] {
            assert!(v4.contains(ip(a)), "{a}");
        }
        assert!(!v4.contains(ip("::")) && !v4.contains(ip("2001:db8::1")));
        assert_eq!(shown(&list(&["0.0.0.0-255.255.255.255"])), ["0.0.0.0/0"]);

        let v6 = list(&["::/0"]);
        for a in [
            "::",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "2001:db8::1",
            "::1",
        ] {
            assert!(v6.contains(ip(a)), "{a}");
        }
        // A mapped address is IPv4, which an IPv6-only list does not allow.
        assert!(!v6.contains(ip("1.2.3.4")) && !v6.contains(ip("::ffff:1.2.3.4")));
        assert_eq!(
            shown(&list(&["::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"])),
            ["::/0"]
        );
    }

    #[test]
    fn single_addresses() {
        let l = list(&["192.0.2.7/32", "2001:db8::7/128"]);
        assert!(l.contains(ip("192.0.2.7")) && l.contains(ip("2001:db8::7")));
        for a in ["192.0.2.6", "192.0.2.8", "2001:db8::6", "2001:db8::8"] {
            assert!(!l.contains(ip(a)), "{a}");
        }
    }

    #[test]
    fn ranges_at_the_edges_of_the_address_space() {
        let l = list(&[
            "0.0.0.0-0.0.0.5",
            "255.255.255.250-255.255.255.255",
            "::-::5",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffa-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ]);
        let yes = [
            "0.0.0.0",
            "0.0.0.5",
            "255.255.255.250",
            "255.255.255.255",
            "::",
            "::5",
        ];
        let no = [
            "0.0.0.6",
            "255.255.255.249",
            "::6",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fff9",
        ];
        for a in yes {
            assert!(l.contains(ip(a)), "{a}");
        }
        assert!(l.contains(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        for a in no {
            assert!(!l.contains(ip(a)), "{a}");
        }
    }

    #[test]
    fn overlapping_and_adjacent_ranges_merge() {
        let l = list(&[
            "2001:db8::/33",
            "10.0.0.128/25",
            "10.0.0.0/25",
            "2001:db8:8000::/33",
            "10.0.1.0-10.0.1.9",
            "10.0.1.5",
            "10.0.1.10-10.0.1.20",
            "192.0.2.1",
            "10.0.1.0/28",
        ]);
        assert_eq!(
            shown(&l),
            ["10.0.0.0-10.0.1.20", "192.0.2.1/32", "2001:db8::/32"]
        );
        let same = list(&["192.0.2.1", "10.0.0.0-10.0.1.20", "2001:db8::/32"]);
        assert_eq!(l, same);
        assert_ne!(l, list(&["10.0.0.0/24"]));
        assert_eq!(
            format!("{l:?}"),
            "AllowList[10.0.0.0-10.0.1.20, 192.0.2.1/32, 2001:db8::/32]"
        );
    }

    #[test]
    fn v4_mapped_v6_is_looked_up_as_v4() {
        let l = list(&["10.0.0.0/8"]);
        assert!(l.contains(ip("::ffff:10.1.2.3")));
        assert!(!l.contains(ip("::ffff:11.0.0.1")));
        // IPv4-compatible (deprecated) addresses are plain IPv6.
        assert!(!l.contains(ip("::10.1.2.3")));
        let mapped_entry = list(&["::ffff:10.0.0.0/104"]);
        assert_eq!(mapped_entry, l);
        assert!(mapped_entry.contains(ip("10.9.9.9")));
    }

    #[test]
    fn any_allows_everything() {
        for l in [AllowList::any(), AllowList::new(&[]), AllowList::default()] {
            assert!(l.is_any() && l.ranges().is_empty());
            assert!(l.contains(ip("1.2.3.4")) && l.contains(ip("::1")));
            assert_eq!(l, AllowList::any());
            assert_eq!(format!("{l:?}"), "AllowList(any)");
        }
        assert!(!list(&["10.0.0.0/8"]).is_any());
    }

    #[test]
    fn decomposition_is_minimal() {
        let count = |l: &AllowList| -> Vec<(u8, usize)> {
            let v4 = l.v4.iter().map(|(len, s)| (*len, s.len()));
            v4.chain(l.v6.iter().map(|(len, s)| (*len, s.len())))
                .collect()
        };
        assert_eq!(count(&list(&["0.0.0.0/0"])), [(0, 1)]);
        assert_eq!(count(&list(&["::/0"])), [(0, 1)]);
        // .1 .2-.3 .4-.7 .8-.11 .12-.13 .14
        let l = list(&["10.0.0.1-10.0.0.14"]);
        assert_eq!(count(&l), [(30, 2), (31, 2), (32, 2)]);
        let l = list(&["0.0.0.1-255.255.255.254"]);
        assert_eq!(count(&l).iter().map(|c| c.1).sum::<usize>(), 62);
    }

    /// An address of `width` bits, clustered so random ranges and probes meet.
    fn value(width: u32) -> impl Strategy<Value = u128> {
        let max = u128::MAX >> (128 - width);
        let base = (max >> 2) & !0xffff;
        prop_oneof![
            4 => (0u128..0x2000).prop_map(move |x| base + x),
            2 => any::<u128>().prop_map(move |x| x & max),
            1 => prop::sample::select(vec![0, 1, 2, max - 2, max - 1, max]),
        ]
    }

    /// An inclusive span: mostly small, some aligned prefixes, a few wide.
    fn span(width: u32) -> impl Strategy<Value = (u128, u128)> {
        let max = u128::MAX >> (128 - width);
        let lens = prop_oneof![
            prop::sample::select(vec![
                0,
                1,
                width - 20,
                width - 8,
                width - 4,
                width - 1,
                width
            ]),
            0..=width,
        ];
        prop_oneof![
            4 => (value(width), 0u128..40).prop_map(move |(s, n)| (s, s.saturating_add(n).min(max))),
            3 => (value(width), lens).prop_map(move |(s, len)| {
                let host = u128::MAX.checked_shr(128 - (width - len)).unwrap_or(0);
                (s & !host, s | host)
            }),
            1 => (value(width), value(width)).prop_map(|(a, b)| (a.min(b), a.max(b))),
        ]
    }

    fn entry(v6: bool) -> impl Strategy<Value = IpRange> {
        span(if v6 { 128 } else { 32 })
            .prop_map(move |(s, e)| IpRange::new(addr(v6, s), addr(v6, e)).unwrap())
    }

    /// Addresses next to every range end, plus `extra`, in both families.
    fn probes(entries: &[IpRange], extra: &[(bool, u128)]) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for e in entries {
            let v6 = e.start.is_ipv6();
            let max = if v6 { u128::MAX } else { u128::from(u32::MAX) };
            let (s, t) = (bits(e.start), bits(e.end));
            for p in [Some(s), Some(t), s.checked_sub(1), (t < max).then(|| t + 1)] {
                out.extend(p.map(|p| addr(v6, p)));
            }
        }
        out.extend(extra.iter().map(|&(v6, x)| addr(v6, x)));
        let mapped: Vec<IpAddr> = out
            .iter()
            .filter_map(|a| match a {
                IpAddr::V4(a) => Some(IpAddr::V6(a.to_ipv6_mapped())),
                IpAddr::V6(_) => None,
            })
            .collect();
        out.extend(mapped);
        out
    }

    fn check(entries: &[IpRange], extra: &[(bool, u128)]) -> Result<(), TestCaseError> {
        let list = AllowList::new(entries);
        for p in probes(entries, extra) {
            let naive = entries.iter().any(|r| r.contains(p));
            prop_assert_eq!(list.contains(p), naive, "{} in {:?}", p, list);
            prop_assert_eq!(list.ranges().iter().any(|r| r.contains(p)), naive);
        }
        let rs = list.ranges();
        prop_assert!(!rs.is_empty());
        for w in rs.windows(2) {
            let (a, b) = (w[0], w[1]);
            if a.start.is_ipv4() == b.start.is_ipv4() {
                // Sorted, with a gap of at least one address between.
                prop_assert!(bits(a.end).saturating_add(1) < bits(b.start), "{} {}", a, b);
            } else {
                prop_assert!(a.start.is_ipv4() && b.start.is_ipv6(), "{} {}", a, b);
            }
        }
        for r in rs {
            prop_assert_eq!(r.to_string().parse::<IpRange>(), Ok(*r));
        }
        prop_assert_eq!(&AllowList::new(rs), &list);
        // The decomposition is minimal enough: at most 2 * width prefixes per range.
        let prefixes: usize = list.v4.iter().map(|(_, s)| s.len()).sum::<usize>()
            + list.v6.iter().map(|(_, s)| s.len()).sum::<usize>();
        let bound: usize = rs.iter().map(|r| 2 * width(r.start) as usize).sum();
        prop_assert!(prefixes <= bound);
        Ok(())
    }

    fn extra(width_v6: bool) -> impl Strategy<Value = Vec<(bool, u128)>> {
        let w = if width_v6 { 128 } else { 32 };
        prop::collection::vec((Just(width_v6), value(w)), 0..24)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn v4_matches_naive(
            entries in prop::collection::vec(entry(false), 1..24),
            xs in extra(false),
            ys in extra(true),
        ) {
            check(&entries, &[xs, ys].concat())?;
        }

        #[test]
        fn v6_matches_naive(
            entries in prop::collection::vec(entry(true), 1..24),
            xs in extra(false),
            ys in extra(true),
        ) {
            check(&entries, &[xs, ys].concat())?;
        }

        #[test]
        fn mixed_matches_naive(
            entries in prop::collection::vec(prop_oneof![entry(false), entry(true)], 1..24),
            xs in extra(false),
            ys in extra(true),
        ) {
            check(&entries, &[xs, ys].concat())?;
        }
    }
}
