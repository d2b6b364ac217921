//! Shadow counts: how a candidate policy set would have decided, per
//! shard, beside the set in force (README "Policy files", shadow mode).

use std::collections::HashMap;
use std::sync::Arc;

use super::{Hasher, Table};

/// (active outcome, candidate outcome) counts per client for the shadow
/// policy set of one epoch; a new candidate starts a new epoch.
#[derive(Default)]
pub(crate) struct ShadowCounts {
    epoch: u64,
    by_client: HashMap<Arc<str>, Vec<(u8, u8, u64)>, Hasher>,
}

impl ShadowCounts {
    pub(crate) fn record(
        &mut self,
        epoch: u64,
        client: &Arc<str>,
        active: usize,
        candidate: usize,
    ) {
        if self.epoch != epoch {
            self.by_client.clear();
            self.epoch = epoch;
        }
        // Outcome slots are < OUTCOMES (32), so they fit a u8.
        let (a, c) = (active as u8, candidate as u8);
        if let Some(pairs) = self.by_client.get_mut(&**client) {
            match pairs.iter_mut().find(|p| p.0 == a && p.1 == c) {
                Some(p) => p.2 += 1,
                None => pairs.push((a, c, 1)),
            }
            return;
        }
        self.by_client.insert(client.clone(), vec![(a, c, 1)]);
    }
}

impl ShadowCounts {
    /// Add the counts of `epoch` to `total`.
    pub(crate) fn add_to(&self, epoch: u64, total: &mut HashMap<(Arc<str>, u8, u8), u64, Hasher>) {
        if self.epoch != epoch {
            return;
        }
        for (client, pairs) in &self.by_client {
            for &(a, c, n) in pairs {
                *total.entry((client.clone(), a, c)).or_default() += n;
            }
        }
    }
}

impl Table {
    /// Shadow counts of `epoch`, summed over shards: (client, active outcome
    /// slot, candidate outcome slot) → count.
    pub(crate) fn shadow_counts(&self, epoch: u64) -> HashMap<(Arc<str>, u8, u8), u64, Hasher> {
        let mut total: HashMap<(Arc<str>, u8, u8), u64, Hasher> = HashMap::default();
        for s in self.shards.iter() {
            s.0.lock().shadow.add_to(epoch, &mut total);
        }
        total
    }
}
