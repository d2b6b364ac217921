//! Shadow evaluation of a candidate policy set beside the one in force.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::clock::Timestamp;
use crate::policy::{PolicySet, PolicyVersion};

use super::Engine;
use super::stats::slot_name;

/// A candidate policy set under evaluation.
pub(super) struct Shadow {
    pub(super) set: Arc<PolicySet>,
    pub(super) epoch: u64,
    pub(super) since: Timestamp,
}

/// How a shadow candidate would have decided, beside the set in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShadowReport {
    /// The version in force.
    pub active: PolicyVersion,
    /// The candidate's version.
    pub candidate: PolicyVersion,
    /// When the candidate was installed.
    pub since: Timestamp,
    /// One row per (client, active outcome, candidate outcome) seen.
    pub rows: Vec<ShadowRow>,
}

impl ShadowReport {
    /// Rows where the candidate decides differently.
    pub fn changed(&self) -> impl Iterator<Item = &ShadowRow> {
        self.rows.iter().filter(|r| r.active != r.candidate)
    }

    /// The count for one (client, active, candidate) triple.
    pub fn count(&self, client: &str, active: &str, candidate: &str) -> u64 {
        self.rows
            .iter()
            .filter(|r| &*r.client == client && r.active == active && r.candidate == candidate)
            .map(|r| r.count)
            .sum()
    }
}

/// One cell of a [`ShadowReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShadowRow {
    /// The family's client.
    pub client: Arc<str>,
    /// The outcome under the set in force (`rotated`, `expired_idle`, ...).
    pub active: &'static str,
    /// The outcome the candidate would have given.
    pub candidate: &'static str,
    /// How many redemptions.
    pub count: u64,
}

impl Engine {
    /// Evaluate `candidate` beside the set in force on live redemptions,
    /// with no effect but counting (active outcome, candidate outcome) pairs
    /// per client. Replaces any earlier candidate and its counts.
    pub fn set_shadow(&self, candidate: PolicySet) -> PolicyVersion {
        let version = candidate.version();
        let epoch = self.shadow_epoch.fetch_add(1, Ordering::Relaxed) + 1;
        self.shadow.store(Some(Arc::new(Shadow {
            set: Arc::new(candidate),
            epoch,
            since: self.clock.now(),
        })));
        version
    }

    /// What the candidate would have changed so far; `None` without one.
    pub fn shadow_report(&self) -> Option<ShadowReport> {
        let shadow = self.shadow.load_full()?;
        #[allow(unused_mut)]
        let mut counts = self.table.shadow_counts(shadow.epoch);
        // With a shared store: what this engine decided (each engine
        // reports its own traffic).
        #[cfg(feature = "redis")]
        if let Some(sh) = &self.shared {
            sh.shadow.lock().add_to(shadow.epoch, &mut counts);
        }
        let mut rows: Vec<ShadowRow> = counts
            .into_iter()
            .map(|((client, a, c), count)| ShadowRow {
                client,
                active: slot_name(usize::from(a)),
                candidate: slot_name(usize::from(c)),
                count,
            })
            .collect();
        rows.sort_by(|x, y| {
            (&x.client, x.active, x.candidate).cmp(&(&y.client, y.active, y.candidate))
        });
        Some(ShadowReport {
            active: self.policies.load().version(),
            candidate: shadow.set.version(),
            since: shadow.since,
            rows,
        })
    }

    /// Put the candidate in force (an atomic swap) and end the shadow.
    /// Returns the version now in force, `None` if there was no candidate.
    pub fn promote_shadow(&self) -> Option<PolicyVersion> {
        let shadow = self.shadow.swap(None)?;
        let set = Arc::unwrap_or_clone(shadow.set.clone());
        let version = set.version();
        self.swap_policies(set);
        Some(version)
    }

    /// Drop the candidate and its counts. Returns whether there was one.
    pub fn drop_shadow(&self) -> bool {
        self.shadow.swap(None).is_some()
    }
}
