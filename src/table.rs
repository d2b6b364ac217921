//! The in-process family table: lock-sharded, O(1) per operation.
//!
//! Each shard is a mutex around a slab of family records plus a hash index
//! into it. One family lives in exactly one shard, so holding its shard's lock
//! makes redemption, revocation and sweeping of that family atomic with
//! respect to each other; no operation on one family takes a lock that spans
//! the table. The slab gives the sweeper a stable cursor, so each sweep call
//! does a bounded amount of work.
//!
//! Lock order: a subject-index shard may be held while taking a family shard,
//! never the reverse.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use crate::family::Family;
use crate::token::FamilyId;

type Hasher = ahash::RandomState;

/// Redemption outcomes counted per shard, under the lock already held, so
/// counting adds no shared cache line to the hot path.
pub(crate) const OUTCOMES: usize = 32;

/// A shard padded to its own cache lines so neighbouring locks do not
/// false-share.
#[repr(align(128))]
struct Shard(Mutex<ShardInner>);

pub(crate) struct ShardInner {
    index: HashMap<FamilyId, u32, Hasher>,
    slots: Vec<Option<Family>>,
    free: Vec<u32>,
    pub(crate) outcomes: [u64; OUTCOMES],
    shadow: ShadowCounts,
}

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

/// A family together with its shard's counters, borrowed at once.
pub(crate) struct FamilySlot<'a> {
    pub(crate) family: &'a mut Family,
    pub(crate) outcomes: &'a mut [u64; OUTCOMES],
    pub(crate) shadow: &'a mut ShadowCounts,
}

impl ShardInner {
    fn new() -> ShardInner {
        ShardInner {
            index: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            outcomes: [0; OUTCOMES],
            shadow: ShadowCounts::default(),
        }
    }

    pub(crate) fn slot_mut(&mut self, id: &FamilyId) -> Option<FamilySlot<'_>> {
        let i = *self.index.get(id)? as usize;
        let family = self.slots.get_mut(i)?.as_mut()?;
        Some(FamilySlot {
            family,
            outcomes: &mut self.outcomes,
            shadow: &mut self.shadow,
        })
    }

    pub(crate) fn get(&self, id: &FamilyId) -> Option<&Family> {
        let slot = *self.index.get(id)?;
        self.slots.get(slot as usize)?.as_ref()
    }

    pub(crate) fn get_mut(&mut self, id: &FamilyId) -> Option<&mut Family> {
        let slot = *self.index.get(id)?;
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    /// Insert a new family. Callers check the id is free under the same
    /// lock first; a taken id here is a bug, and overwriting would lose a
    /// family, so it panics instead.
    pub(crate) fn insert(&mut self, f: Family) {
        let slot = match self.free.last() {
            Some(&s) => s,
            // 4 billion families in one shard: refuse rather than alias.
            None => u32::try_from(self.slots.len()).expect("fewer than 2^32 families per shard"),
        };
        match self.index.entry(f.id) {
            Entry::Occupied(_) => panic!("family id {} inserted twice", f.id),
            Entry::Vacant(v) => {
                v.insert(slot);
                if self.free.pop().is_none() {
                    self.slots.push(Some(f));
                } else {
                    self.slots[slot as usize] = Some(f);
                }
            }
        }
    }

    fn remove_slot(&mut self, slot: usize) -> Option<Family> {
        let f = self.slots.get_mut(slot)?.take()?;
        self.index.remove(&f.id);
        // Slot numbers fit u32: insert refuses beyond that.
        self.free.push(slot as u32);
        Some(f)
    }

    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// Every family in the shard, for administrative scans.
    pub(crate) fn families_mut(&mut self) -> impl Iterator<Item = &mut Family> {
        self.slots.iter_mut().flatten()
    }
}

/// Families by id, in shards.
pub(crate) struct Table {
    shards: Box<[Shard]>,
    mask: u64,
    cursor: Mutex<(usize, usize)>,
}

impl Table {
    /// `shards` is rounded up to a power of two.
    pub(crate) fn new(shards: usize) -> Table {
        let n = shards.clamp(1, 1 << 16).next_power_of_two();
        Table {
            shards: (0..n)
                .map(|_| Shard(Mutex::new(ShardInner::new())))
                .collect(),
            mask: (n - 1) as u64,
            cursor: Mutex::new((0, 0)),
        }
    }

    /// Lock the shard that holds (or would hold) family `id`.
    pub(crate) fn lock(&self, id: &FamilyId) -> MutexGuard<'_, ShardInner> {
        // Family ids are CSPRNG output, so their low bits spread evenly; an
        // attacker can choose ids only for lookups, which cannot skew shards.
        let i = (id.shard_bits() & self.mask) as usize;
        self.shards[i].0.lock()
    }

    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    pub(crate) fn lock_shard(&self, i: usize) -> MutexGuard<'_, ShardInner> {
        self.shards[i].0.lock()
    }

    /// Live records (revoked but not yet swept included).
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().len()).sum()
    }

    /// Sum of the per-shard outcome counters.
    pub(crate) fn outcomes(&self) -> [u64; OUTCOMES] {
        let mut total = [0u64; OUTCOMES];
        for s in self.shards.iter() {
            let g = s.0.lock();
            for (t, n) in total.iter_mut().zip(g.outcomes.iter()) {
                *t += n;
            }
        }
        total
    }

    /// Shadow counts of `epoch`, summed over shards: (client, active outcome
    /// slot, candidate outcome slot) → count.
    pub(crate) fn shadow_counts(&self, epoch: u64) -> HashMap<(Arc<str>, u8, u8), u64, Hasher> {
        let mut total: HashMap<(Arc<str>, u8, u8), u64, Hasher> = HashMap::default();
        for s in self.shards.iter() {
            let g = s.0.lock();
            if g.shadow.epoch != epoch {
                continue;
            }
            for (client, pairs) in &g.shadow.by_client {
                for &(a, c, n) in pairs {
                    *total.entry((client.clone(), a, c)).or_default() += n;
                }
            }
        }
        total
    }

    /// Examine at most `budget` slots (an empty shard costs one), resuming
    /// where the last call stopped, and remove the families `dead` picks.
    /// Returns how many slots were examined and the removed families.
    pub(crate) fn sweep(
        &self,
        budget: usize,
        mut dead: impl FnMut(&Family) -> bool,
    ) -> (usize, Vec<Family>) {
        let mut cursor = self.cursor.lock();
        let (mut shard, mut slot) = *cursor;
        let mut examined = 0;
        let mut removed = Vec::new();
        while examined < budget {
            let mut g = self.shards[shard].0.lock();
            let end = g.slots.len().min(slot + (budget - examined));
            examined += (end.saturating_sub(slot)).max(1);
            for i in slot..end {
                if g.slots[i].as_ref().is_some_and(&mut dead)
                    && let Some(f) = g.remove_slot(i)
                {
                    removed.push(f);
                }
            }
            if end >= g.slots.len() {
                // Shard done: give back memory a burst of churn left behind.
                if g.index.capacity() > 64 && g.index.len() < g.index.capacity() / 4 {
                    g.index.shrink_to_fit();
                }
                drop(g);
                shard = (shard + 1) % self.shards.len();
                slot = 0;
            } else {
                slot = end;
            }
        }
        *cursor = (shard, slot);
        (examined, removed)
    }
}

/// Subject → ids of its families, for subject-wide revocation and the
/// per-subject cap. Holds only families that are not known revoked; swept
/// and revoked families are removed from it.
pub(crate) struct SubjectIndex {
    shards: Box<[Mutex<SubjectShard>]>,
    hasher: Hasher,
}

pub(crate) type SubjectShard = HashMap<Arc<str>, FamilyIds, Hasher>;

/// One subject's families. Almost every subject has one per client, so one
/// id is held inline: a `Vec` would cost a 64-byte allocation per subject.
#[derive(Default)]
pub(crate) enum FamilyIds {
    #[default]
    Empty,
    One(FamilyId),
    Many(Vec<FamilyId>),
}

impl FamilyIds {
    pub(crate) fn push(&mut self, id: FamilyId) {
        *self = match std::mem::take(self) {
            FamilyIds::Empty => FamilyIds::One(id),
            FamilyIds::One(a) => FamilyIds::Many(vec![a, id]),
            FamilyIds::Many(mut v) => {
                v.push(id);
                FamilyIds::Many(v)
            }
        };
    }

    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&FamilyId) -> bool) {
        *self = match std::mem::take(self) {
            FamilyIds::Empty => FamilyIds::Empty,
            FamilyIds::One(a) if keep(&a) => FamilyIds::One(a),
            FamilyIds::One(_) => FamilyIds::Empty,
            FamilyIds::Many(mut v) => {
                v.retain(|id| keep(id));
                match v.len() {
                    0 => FamilyIds::Empty,
                    1 => FamilyIds::One(v[0]),
                    _ => FamilyIds::Many(v),
                }
            }
        };
    }

    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, FamilyIds::Empty)
    }
}

impl SubjectIndex {
    pub(crate) fn new(shards: usize) -> SubjectIndex {
        let n = shards.clamp(1, 1 << 16).next_power_of_two();
        SubjectIndex {
            shards: (0..n).map(|_| Mutex::new(HashMap::default())).collect(),
            hasher: Hasher::new(),
        }
    }

    pub(crate) fn lock(&self, subject: &str) -> MutexGuard<'_, SubjectShard> {
        let h = self.hasher.hash_one(subject);
        self.shards[(h as usize) & (self.shards.len() - 1)].lock()
    }

    /// Forget one family of `subject`.
    pub(crate) fn remove(&self, subject: &str, id: &FamilyId) {
        let mut g = self.lock(subject);
        if let Some(v) = g.get_mut(subject) {
            v.retain(|f| f != id);
            if v.is_empty() {
                g.remove(subject);
            }
        }
    }
}

/// Shares one allocation per distinct client id and scope string.
///
/// Grows with the number of distinct values, which the embedder (not the
/// token holder) controls: client ids and granted scopes.
pub(crate) struct Interner {
    set: parking_lot::RwLock<std::collections::HashSet<Arc<str>, Hasher>>,
}

impl Interner {
    pub(crate) fn new() -> Interner {
        Interner {
            set: parking_lot::RwLock::new(Default::default()),
        }
    }

    pub(crate) fn intern(&self, s: &str) -> Arc<str> {
        if let Some(a) = self.set.read().get(s) {
            return a.clone();
        }
        let mut w = self.set.write();
        if let Some(a) = w.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        w.insert(a.clone());
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_ids_stay_inline_for_one_and_shrink_back() {
        let a = FamilyId::from_bytes([1; 16]);
        let b = FamilyId::from_bytes([2; 16]);
        let mut ids = FamilyIds::default();
        assert!(ids.is_empty());
        ids.push(a);
        assert!(matches!(ids, FamilyIds::One(x) if x == a));
        ids.push(b);
        assert!(matches!(&ids, FamilyIds::Many(v) if v == &[a, b]));
        ids.retain(|x| *x != a);
        assert!(matches!(ids, FamilyIds::One(x) if x == b));
        ids.retain(|_| false);
        assert!(ids.is_empty());
    }
}
