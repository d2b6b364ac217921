//! Outcome counters.

use crate::decision::{AcceptKind, DenyReason, Verdict};
use crate::event::EventCounts;
use crate::table::OUTCOMES;

use super::Engine;

/// Counters since the engine started.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Family records held (revoked ones until swept); with a shared
    /// store, the records this engine has cached.
    pub families: usize,
    /// Redemptions by outcome name (`rotated`, `reuse_detected`, ...).
    pub outcomes: Vec<(&'static str, u64)>,
    /// Events by kind.
    pub events: EventCounts,
}

impl Stats {
    /// The count of one outcome by name.
    pub fn outcome(&self, name: &str) -> u64 {
        self.outcomes
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, c)| *c)
    }
}

pub(super) const ACCEPT_KINDS: [AcceptKind; 6] = [
    AcceptKind::Rotated,
    AcceptKind::Kept,
    AcceptKind::GraceReplay,
    AcceptKind::Issued,
    AcceptKind::CodeIssued,
    AcceptKind::Exchanged,
];

pub(super) fn slot_name(slot: usize) -> &'static str {
    match slot.checked_sub(ACCEPT_KINDS.len()) {
        None => ACCEPT_KINDS[slot].as_str(),
        Some(i) => DenyReason::ALL.get(i).map_or("unknown", |r| r.as_str()),
    }
}

pub(super) fn outcome_slot(v: Verdict) -> usize {
    match v {
        Verdict::Accept(k) => k as usize,
        Verdict::Deny(r) => ACCEPT_KINDS.len() + r as usize,
    }
}

const _: () = assert!(ACCEPT_KINDS.len() + DenyReason::ALL.len() <= OUTCOMES);

impl Engine {
    /// Counters since start: a snapshot of the engine's lock-free counters
    /// (counting costs a redemption no lock and no allocation), to pull into
    /// whatever metrics system the embedder uses (README "Metrics").
    pub fn stats(&self) -> Stats {
        let mut counts = self.table.outcomes();
        for (i, c) in counts.iter_mut().enumerate() {
            *c += self.unsharded_outcomes.get(i);
        }
        let slots = ACCEPT_KINDS.len() + DenyReason::ALL.len();
        let outcomes = (0..slots).map(|i| (slot_name(i), counts[i])).collect();
        #[cfg(feature = "redis")]
        let families = self
            .shared
            .as_ref()
            .map_or(self.table.len(), |sh| sh.cached());
        #[cfg(not(feature = "redis"))]
        let families = self.table.len();
        Stats {
            families,
            outcomes,
            events: self.events.counts(),
        }
    }
}
