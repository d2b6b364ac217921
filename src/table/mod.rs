//! The in-process family table: lock-sharded, O(1) per operation.
//!
//! Each shard is a mutex around a slab of family records. A family id names
//! its own slot ([`FamilyId::slot`]): the engine mints a new family's id
//! from the free slot it is about to fill, so a lookup is one indexed load
//! and an id comparison, with no hash index (at a million families that
//! index cost two cache misses per redemption). Records whose slot was
//! taken when they were installed (restored from elsewhere) go to any free
//! slot and a small overflow index. One family lives in exactly one shard,
//! so holding its shard's lock makes redemption, revocation and sweeping of
//! that family atomic with respect to each other; no operation on one
//! family takes a lock that spans the table. The slab gives the sweeper a
//! stable cursor, so each sweep call does a bounded amount of work.
//!
//! Lock order: a subject-index shard may be held while taking a family shard,
//! never the reverse.

use std::collections::HashMap;

use parking_lot::{Mutex, MutexGuard};

use crate::family::Family;
use crate::huge::{Collapse, Collapsed};
use crate::token::FamilyId;

mod interner;
mod shadow;
mod subjects;

pub(crate) use interner::{Interner, stripe_of};
pub(crate) use shadow::ShadowCounts;
pub(crate) use subjects::{SubjectEntries, SubjectIndex};

type Hasher = ahash::RandomState;

/// Redemption outcomes counted per shard, under the lock already held, so
/// counting adds no shared cache line to the hot path.
pub(crate) const OUTCOMES: usize = 32;

/// A shard padded to its own cache lines so neighbouring locks do not
/// false-share.
#[repr(align(128))]
struct Shard(Mutex<ShardInner>);

pub(crate) struct ShardInner {
    slots: Vec<Option<Family>>,
    /// Slots a shard may hold: a [`Loc`] keeps the shard index in the
    /// high bits of 32 and the slot in the rest.
    slot_limit: usize,
    /// Free slots, newest last. May hold stale entries (a slot filled by a
    /// restore, or cut off the end): `vacant_slot` skips them.
    free: Vec<u32>,
    /// Families not in the slot their id names: restored records whose slot
    /// was taken or out of reach. Empty in normal operation.
    overflow: HashMap<FamilyId, u32, Hasher>,
    live: usize,
    /// How much of the slab is on huge pages (see `huge`).
    huge: Collapsed,
    pub(crate) outcomes: [u64; OUTCOMES],
    shadow: ShadowCounts,
}

/// A family together with its shard's counters, borrowed at once.
pub(crate) struct FamilySlot<'a> {
    /// Where in the shard.
    pub(crate) slot: usize,
    pub(crate) family: &'a mut Family,
    pub(crate) outcomes: &'a mut [u64; OUTCOMES],
    pub(crate) shadow: &'a mut ShadowCounts,
}

/// Slack over twice the live families up to which a restored record may
/// name its slot and still be put there (the gap becomes free slots);
/// beyond it, the record goes to a free slot and the overflow index. Keeps
/// the slab within about twice the live families whatever records name.
const SLOT_SLACK: usize = 1 << 10;

impl ShardInner {
    fn new(slot_limit: usize) -> ShardInner {
        ShardInner {
            slots: Vec::new(),
            slot_limit,
            free: Vec::new(),
            overflow: HashMap::default(),
            live: 0,
            huge: Collapsed::default(),
            outcomes: [0; OUTCOMES],
            shadow: ShadowCounts::default(),
        }
    }

    /// The slot holding family `id`, if it is here.
    pub(crate) fn find(&self, id: &FamilyId) -> Option<usize> {
        let natural = id.slot() as usize;
        if let Some(Some(f)) = self.slots.get(natural)
            && f.id == *id
        {
            return Some(natural);
        }
        if self.overflow.is_empty() {
            return None;
        }
        self.overflow.get(id).map(|&s| s as usize)
    }

    pub(crate) fn slot_mut(&mut self, id: &FamilyId) -> Option<FamilySlot<'_>> {
        let i = self.find(id)?;
        let family = self.slots[i].as_mut()?;
        Some(FamilySlot {
            slot: i,
            family,
            outcomes: &mut self.outcomes,
            shadow: &mut self.shadow,
        })
    }

    pub(crate) fn get(&self, id: &FamilyId) -> Option<&Family> {
        self.slots[self.find(id)?].as_ref()
    }

    pub(crate) fn get_mut(&mut self, id: &FamilyId) -> Option<&mut Family> {
        Some(self.locate_mut(id)?.1)
    }

    /// Family `id` and its slot, to change.
    pub(crate) fn locate_mut(&mut self, id: &FamilyId) -> Option<(usize, &mut Family)> {
        let i = self.find(id)?;
        Some((i, self.slots[i].as_mut()?))
    }

    /// The family in `slot`, whichever it is.
    pub(crate) fn at(&self, slot: usize) -> Option<&Family> {
        self.slots.get(slot)?.as_ref()
    }

    /// The family in `slot`, whichever it is, to change.
    pub(crate) fn at_mut(&mut self, slot: usize) -> Option<&mut Family> {
        self.slots.get_mut(slot)?.as_mut()
    }

    /// The slab length a record may make the shard grow to.
    fn reach(&self) -> usize {
        (self.slots.len().max(2 * self.live) + SLOT_SLACK).min(self.slot_limit)
    }

    /// Whether a record with this id would be put in the slot it names: the
    /// slot is free and within reach.
    pub(crate) fn own_slot_free(&self, id: &FamilyId) -> bool {
        let natural = id.slot() as usize;
        match self.slots.get(natural) {
            Some(slot) => slot.is_none(),
            None => natural < self.reach(),
        }
    }

    /// The slot the next new family should name in its id: a free one, or
    /// the end of the slab.
    pub(crate) fn vacant_slot(&mut self) -> u32 {
        while let Some(&s) = self.free.last() {
            if self.slots.get(s as usize).is_some_and(Option::is_none) {
                return s;
            }
            self.free.pop();
        }
        // 2^32 slots over all shards: refuse rather than alias.
        assert!(
            self.slots.len() < self.slot_limit,
            "fewer than {} families per shard",
            self.slot_limit
        );
        u32::try_from(self.slots.len()).expect("the slot limit is at most 2^32")
    }

    /// Insert a family whose id is not in this shard. Callers check that
    /// under the same lock first (or minted the id from `vacant_slot`); a
    /// taken id here is a bug, and overwriting would lose a family, so it
    /// panics instead. Returns the slot it took, and the huge-page collapse
    /// the slab now wants: the caller runs it once it holds no lock (it
    /// takes milliseconds, see `huge`).
    pub(crate) fn insert(&mut self, f: Family) -> (usize, Option<Collapse>) {
        assert!(
            self.find(&f.id).is_none(),
            "family id {} inserted twice",
            f.id
        );
        let natural = f.id.slot() as usize;
        let slot = if natural < self.slots.len() {
            if self.slots[natural].is_none() {
                natural
            } else {
                self.place_elsewhere(f.id)
            }
        } else if natural < self.reach() {
            // The gap in between becomes free slots.
            let gap = self.slots.len()..natural;
            self.free.extend(gap.clone().rev().map(|s| s as u32));
            self.slots.resize_with(natural + 1, || None);
            natural
        } else {
            self.place_elsewhere(f.id)
        };
        if self.free.last() == Some(&(slot as u32)) {
            self.free.pop();
        }
        if slot == self.slots.len() {
            self.slots.push(Some(f));
        } else {
            self.slots[slot] = Some(f);
        }
        self.live += 1;
        // One syscall per 2 MiB of slab filled (and per reallocation).
        (slot, self.huge.update(&self.slots))
    }

    /// A slot for a family whose own is taken, found by the overflow index.
    fn place_elsewhere(&mut self, id: FamilyId) -> usize {
        let slot = self.vacant_slot();
        self.overflow.insert(id, slot);
        slot as usize
    }

    fn remove_slot(&mut self, slot: usize) -> Option<Family> {
        let f = self.slots.get_mut(slot)?.take()?;
        if f.id.slot() as usize != slot {
            self.overflow.remove(&f.id);
        }
        // Slot numbers fit u32: vacant_slot refuses beyond that.
        self.free.push(slot as u32);
        self.live -= 1;
        Some(f)
    }

    /// Give back the free slots at the end of the slab, and memory a burst
    /// of churn left behind.
    fn trim(&mut self) {
        while matches!(self.slots.last(), Some(None)) {
            self.slots.pop();
        }
        if self.slots.capacity() > 64 && self.slots.len() < self.slots.capacity() / 4 {
            // No collapse asked for: with no spare capacity left, the next
            // insert moves the slab again (and asks for the new buffer), so
            // a collapse run after unlocking would most likely hit memory
            // already given back.
            self.slots.shrink_to_fit();
            self.free.retain(|&s| (s as usize) < self.slots.len());
            self.free.shrink_to_fit();
        }
        if self.overflow.capacity() > 64 && self.overflow.len() < self.overflow.capacity() / 4 {
            self.overflow.shrink_to_fit();
        }
        // Restores fill free slots without taking them off the list: rebuild
        // it when mostly stale (low slots on top, taken first).
        let free_slots = self.slots.len() - self.live;
        if self.free.len() > free_slots + 64 {
            self.free.clear();
            self.free.extend(
                (0..self.slots.len())
                    .rev()
                    .filter(|&s| self.slots[s].is_none())
                    .map(|s| s as u32),
            );
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.live
    }

    /// Families not in their own slot.
    #[cfg(test)]
    pub(crate) fn overflow_len(&self) -> usize {
        self.overflow.len()
    }

    /// Every family in the shard with its slot, for administrative scans.
    pub(crate) fn families_mut(&mut self) -> impl Iterator<Item = (usize, &mut Family)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(i, f)| Some((i, f.as_mut()?)))
    }
}

/// Where a record lies, in 32 bits: the shard index in the high
/// `log2(shards)` bits, the slot in the rest. The subject index keeps
/// these rather than 16-byte family ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Loc(u32);

impl Loc {
    /// No location: a family held in a shared store's cache, not the table.
    #[cfg(feature = "redis")]
    pub(crate) const DETACHED: Loc = Loc(u32::MAX);
}

/// Families by id, in shards.
pub(crate) struct Table {
    shards: Box<[Shard]>,
    mask: u64,
    /// Bits of a [`Loc`] that hold the slot: 32 - log2(shards).
    slot_bits: u32,
    cursor: Mutex<(usize, usize)>,
}

impl Table {
    /// `shards` is rounded up to a power of two.
    pub(crate) fn new(shards: usize) -> Table {
        let n = shards.clamp(1, 1 << 16).next_power_of_two();
        let slot_bits = 32 - n.trailing_zeros();
        let slot_limit = usize::try_from(1u64 << slot_bits).unwrap_or(usize::MAX);
        Table {
            shards: (0..n)
                .map(|_| Shard(Mutex::new(ShardInner::new(slot_limit))))
                .collect(),
            mask: (n - 1) as u64,
            slot_bits,
            cursor: Mutex::new((0, 0)),
        }
    }

    fn shard_of(&self, id: &FamilyId) -> usize {
        // Family ids are CSPRNG output, so their low bits spread evenly; an
        // attacker can choose ids only for lookups, which cannot skew shards.
        (id.shard_bits() & self.mask) as usize
    }

    /// Lock the shard that holds (or would hold) family `id`.
    pub(crate) fn lock(&self, id: &FamilyId) -> MutexGuard<'_, ShardInner> {
        self.shards[self.shard_of(id)].0.lock()
    }

    /// The location of `slot` in the shard of family `id`.
    pub(crate) fn loc(&self, id: &FamilyId, slot: usize) -> Loc {
        self.loc_in(self.shard_of(id), slot)
    }

    fn loc_in(&self, shard: usize, slot: usize) -> Loc {
        // Both fit: shards are at most 2^16 and slots below 2^slot_bits
        // (`ShardInner::slot_limit`), so the sum is below 2^32.
        Loc(((shard as u64) << self.slot_bits | slot as u64) as u32)
    }

    /// Lock the shard of `loc`; its slot there.
    pub(crate) fn lock_loc(&self, loc: Loc) -> (MutexGuard<'_, ShardInner>, usize) {
        let l = u64::from(loc.0);
        let shard = (l >> self.slot_bits) as usize;
        let slot = (l & ((1u64 << self.slot_bits) - 1)) as usize;
        (self.shards[shard].0.lock(), slot)
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

    /// Examine at most `budget` slots (an empty shard costs one), resuming
    /// where the last call stopped, and remove the families `dead` picks.
    /// Returns how many slots were examined and the removed families, each
    /// with where it was.
    pub(crate) fn sweep(&self, budget: usize, mut dead: impl FnMut(&Family) -> bool) -> Swept {
        let mut cursor = self.cursor.lock();
        let (mut shard, mut slot) = *cursor;
        let mut examined = 0;
        let mut removed = Vec::new();
        let mut wrapped = false;
        // At most one pass over the table, whatever the budget: a budget
        // larger than the table (`usize::MAX`, say) would otherwise go
        // round and round under the cursor lock forever. Finishing one
        // more shard than there are revisits at most the start of the
        // shard this call began in.
        let mut shards_left = self.shards.len() + 1;
        while examined < budget && shards_left > 0 {
            let mut g = self.shards[shard].0.lock();
            let end = g.slots.len().min(slot.saturating_add(budget - examined));
            examined += (end.saturating_sub(slot)).max(1);
            for i in slot..end {
                if g.slots[i].as_ref().is_some_and(&mut dead)
                    && let Some(f) = g.remove_slot(i)
                {
                    removed.push((self.loc_in(shard, i), f));
                }
            }
            if end >= g.slots.len() {
                // Shard done: give back memory a burst of churn left behind.
                g.trim();
                drop(g);
                shards_left -= 1;
                shard = (shard + 1) % self.shards.len();
                wrapped |= shard == 0;
                slot = 0;
            } else {
                slot = end;
            }
        }
        *cursor = (shard, slot);
        Swept {
            examined,
            removed,
            wrapped,
        }
    }
}

/// What one sweep call did.
pub(crate) struct Swept {
    /// Slots looked at.
    pub(crate) examined: usize,
    /// The families it took out, with where they were.
    pub(crate) removed: Vec<(Loc, Family)>,
    /// Whether it finished a pass over the whole table.
    pub(crate) wrapped: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fam(id: FamilyId) -> Family {
        Family::for_test(id)
    }

    fn id(slot: u32, r: u8) -> FamilyId {
        FamilyId::new(slot, [r; 12])
    }

    /// A shard of `n` new families, in slots 0..n.
    fn filled(n: u8) -> ShardInner {
        let mut s = ShardInner::new(1 << 32);
        for r in 0..n {
            let v = s.vacant_slot();
            s.insert(fam(id(v, r)));
        }
        s
    }

    /// New families take the slot their id names, reuse freed slots, and a
    /// stale id for a reused slot finds nothing.
    #[test]
    fn ids_name_their_slots() {
        let mut s = ShardInner::new(1 << 32);
        for r in 0..3u8 {
            let slot = s.vacant_slot();
            assert_eq!(slot, u32::from(r));
            s.insert(fam(id(slot, r)));
        }
        assert_eq!(s.len(), 3);
        assert_eq!(s.get(&id(1, 1)).unwrap().id, id(1, 1));
        assert!(s.get(&id(1, 9)).is_none(), "same slot, other id");
        assert!(s.get(&id(7, 1)).is_none(), "slot past the end");
        assert!(s.remove_slot(1).is_some());
        assert_eq!(s.len(), 2);
        assert_eq!(s.vacant_slot(), 1);
        s.insert(fam(id(1, 42)));
        assert!(s.get(&id(1, 1)).is_none(), "the old family's id is dead");
        assert!(s.get(&id(1, 42)).is_some());
        assert!(s.overflow.is_empty());
    }

    /// A record whose slot is taken, or far out of reach, is still found,
    /// through the overflow index, and leaves it when removed.
    #[test]
    fn records_from_elsewhere_overflow() {
        let mut s = ShardInner::new(1 << 32);
        s.insert(fam(id(0, 1)));
        s.insert(fam(id(0, 2)));
        let far = id(u32::MAX - 1, 3);
        s.insert(fam(far));
        assert_eq!(s.overflow.len(), 2);
        assert_eq!(s.slots.len(), 3, "no slab grown for the far id");
        for i in [id(0, 1), id(0, 2), far] {
            assert_eq!(s.get_mut(&i).unwrap().id, i);
        }
        let slot = s.find(&id(0, 2)).unwrap();
        assert_eq!(s.remove_slot(slot).unwrap().id, id(0, 2));
        assert!(s.get(&id(0, 2)).is_none());
        assert_eq!(s.overflow.len(), 1);
        // Its slot is free again, and a new family naming it lands there.
        let v = s.vacant_slot();
        s.insert(fam(id(v, 4)));
        assert_eq!(s.overflow.len(), 1);
        assert_eq!(s.len(), 3);
    }

    /// A restored record naming a slot past the end grows the slab, the
    /// gap becomes free slots, and filling one by restore leaves no stale
    /// free entry behind.
    #[test]
    fn gaps_become_free_slots() {
        let mut s = ShardInner::new(1 << 32);
        s.insert(fam(id(4, 1)));
        assert_eq!(s.slots.len(), 5);
        s.insert(fam(id(2, 2)));
        assert!(s.overflow.is_empty());
        let mut seen = Vec::new();
        for r in 10..13u8 {
            let v = s.vacant_slot();
            seen.push(v);
            s.insert(fam(id(v, r)));
        }
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 3]);
        assert_eq!(s.vacant_slot(), 5);
        assert!(s.overflow.is_empty());
    }

    /// Records naming far slots cannot grow the slab beyond about twice
    /// the live families.
    #[test]
    fn far_slots_do_not_grow_the_slab() {
        let mut s = ShardInner::new(1 << 32);
        for k in 1..=16u32 {
            s.insert(fam(id(k << 16, k as u8)));
        }
        assert_eq!(s.len(), 16);
        assert!(s.slots.len() < 2 * SLOT_SLACK, "{} slots", s.slots.len());
        for k in 1..=16u32 {
            assert!(s.get(&id(k << 16, k as u8)).is_some());
        }
    }

    /// Filling freed slots by restore leaves stale free-list entries; a
    /// trim drops them.
    #[test]
    fn trim_rebuilds_a_stale_free_list() {
        let mut s = filled(8);
        for _ in 0..1_000 {
            let a = s.remove_slot(5).unwrap();
            let b = s.remove_slot(6).unwrap();
            s.insert(a);
            s.insert(b);
        }
        assert!(s.free.len() >= 1_000);
        s.trim();
        assert!(s.free.is_empty());
        assert_eq!(s.vacant_slot(), 8);
        s.remove_slot(3);
        s.remove_slot(1);
        s.trim();
        assert_eq!(s.vacant_slot(), 1, "low slots first");
    }

    /// Sweeping to the end of a shard gives back trailing free slots.
    #[test]
    fn trim_drops_trailing_free_slots() {
        let mut s = filled(100);
        for slot in 10..100 {
            s.remove_slot(slot);
        }
        s.trim();
        assert_eq!(s.slots.len(), 10);
        assert_eq!(s.vacant_slot(), 10);
        assert_eq!(s.len(), 10);
    }

    /// Filling whole 2 MiB pages of slab under the lock only returns the
    /// collapses, for the caller to run after unlocking.
    #[test]
    fn slabs_collapse_only_after_the_lock_is_released() {
        use crate::huge::{HUGE, tests::RUN};
        let table = Table::new(1);
        let mut shard = table.lock_shard(0);
        let before = RUN.with(|n| n.get());
        // Enough records for two whole huge pages wherever the slab lies.
        let n = (3 * HUGE / size_of::<Option<Family>>()) as u32;
        let collapses: Vec<Collapse> = (0..n)
            .filter_map(|v| shard.insert(fam(id(v, 7))).1)
            .collect();
        assert_eq!(RUN.with(|n| n.get()), before, "nothing ran under the lock");
        assert!(!collapses.is_empty(), "collapses were asked for");
        drop(shard);
        let asked = collapses.len();
        collapses.into_iter().for_each(Collapse::run);
        assert_eq!(RUN.with(|n| n.get()), before + asked);
    }

    /// A location packs the shard index above the slot, for any shard
    /// count, and shards refuse slots a location cannot name.
    #[test]
    fn locations_name_shard_and_slot() {
        for shards in [1, 2, 256, 1 << 16] {
            let t = Table::new(shards);
            for shard in [0, shards - 1] {
                let limit = t.shards[shard].0.lock().slot_limit;
                assert_eq!(limit as u64 * shards as u64, 1u64 << 32, "{shards}");
                for slot in [0, 1, limit - 1] {
                    let (g, s) = t.lock_loc(t.loc_in(shard, slot));
                    assert_eq!(s, slot);
                    assert!(std::ptr::eq(&*g, t.shards[shard].0.data_ptr()));
                }
            }
        }
    }

    /// A record naming a slot beyond the shard's limit is placed in a free
    /// one (found by the overflow index), and a full shard refuses more.
    #[test]
    fn slots_stay_below_the_limit() {
        let mut s = ShardInner::new(4);
        s.insert(fam(id(100, 1)));
        assert_eq!(s.find(&id(100, 1)), Some(0));
        assert_eq!(s.overflow_len(), 1);
        for r in 2..5 {
            let v = s.vacant_slot();
            s.insert(fam(id(v, r)));
        }
        assert_eq!(s.len(), 4);
        let full = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.vacant_slot()));
        assert!(full.is_err(), "a fifth slot in a shard of four");
    }
}
