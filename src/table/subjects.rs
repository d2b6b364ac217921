//! The subject index: which families a subject holds, for subject-wide
//! revocation and the per-subject cap.

use hashbrown::HashTable;
use parking_lot::{Mutex, MutexGuard};

use super::{Hasher, Loc};

/// Subject → locations of its families, for subject-wide revocation and
/// the per-subject cap. Holds only families that are not known revoked;
/// swept and revoked families are removed from it.
///
/// It keeps no subject strings and no ids: an entry is a family's [`Loc`]
/// and 32 bits of the subject's keyed hash (8 bytes), and a subject's
/// entries are those under its hash. The record at a location says whose
/// it is, so callers check each candidate's subject: another subject may
/// share the hash.
///
/// An entry is removed exactly once, by the call that took its family
/// out: the one whose `revoke` succeeded, the sweep that removed it while
/// active, or the restore that replaced it while active. That removal
/// comes after the family's lock is dropped (the lock order), so for a
/// moment the entry outlives its family, and the slot may already hold a
/// new family, even of the same subject, with an equal entry of its own.
/// Walks therefore skip what is not theirs (empty slots, revoked families,
/// other subjects) and never remove it: a second removal of an equal entry
/// would take the new family's. Entries are a multiset; `candidates` lists
/// each location once.
pub(crate) struct SubjectIndex {
    shards: Box<[Mutex<SubjectShard>]>,
    hasher: Hasher,
    /// Every subject gets the same hash, so tests can check that callers
    /// tell colliding subjects apart.
    #[cfg(test)]
    collide: bool,
}

#[derive(Default)]
pub(crate) struct SubjectShard {
    entries: HashTable<SubjectEntry>,
}

#[derive(Clone, Copy)]
struct SubjectEntry {
    tag: u32,
    loc: Loc,
}

/// The table hash of an entry, rebuilt from its 32 stored bits (the shard
/// was picked by other bits of the same hash).
fn entry_hash(tag: u32) -> u64 {
    (u64::from(tag) << 32) | u64::from(tag)
}

/// One subject's entries, under its shard's lock.
pub(crate) struct SubjectEntries<'a> {
    shard: MutexGuard<'a, SubjectShard>,
    tag: u32,
}

impl SubjectEntries<'_> {
    /// Locations indexed under this subject's hash, each once: its
    /// families, and possibly some of another subject.
    pub(crate) fn candidates(&self) -> Vec<Loc> {
        let tag = self.tag;
        let mut locs: Vec<Loc> = self
            .shard
            .entries
            .iter_hash(entry_hash(tag))
            .filter(|e| e.tag == tag)
            .map(|e| e.loc)
            .collect();
        // A location can be listed twice for a moment: a family's entry is
        // removed after its lock is dropped, and its slot may be reused by
        // then.
        locs.sort_unstable();
        locs.dedup();
        locs
    }

    /// Index the family at `loc` under this subject.
    pub(crate) fn push(&mut self, loc: Loc) {
        let tag = self.tag;
        self.shard
            .entries
            .insert_unique(entry_hash(tag), SubjectEntry { tag, loc }, |e| {
                entry_hash(e.tag)
            });
    }

    /// Forget one entry for `loc`; `false` if there was none under this
    /// subject's hash.
    pub(crate) fn remove(&mut self, loc: Loc) -> bool {
        let tag = self.tag;
        let entries = &mut self.shard.entries;
        match entries.find_entry(entry_hash(tag), |e| e.tag == tag && e.loc == loc) {
            Ok(e) => {
                e.remove();
                // Give back what a burst of revocations left behind.
                if entries.capacity() > 64 && entries.len() < entries.capacity() / 4 {
                    entries.shrink_to_fit(|e| entry_hash(e.tag));
                }
                true
            }
            Err(_) => false,
        }
    }
}

impl SubjectIndex {
    pub(crate) fn new(shards: usize) -> SubjectIndex {
        let n = shards.clamp(1, 1 << 16).next_power_of_two();
        SubjectIndex {
            shards: (0..n).map(|_| Mutex::default()).collect(),
            hasher: Hasher::new(),
            #[cfg(test)]
            collide: false,
        }
    }

    /// An index in which all subjects collide.
    #[cfg(test)]
    pub(crate) fn colliding(shards: usize) -> SubjectIndex {
        SubjectIndex {
            collide: true,
            ..SubjectIndex::new(shards)
        }
    }

    fn hash(&self, subject: &str) -> u64 {
        #[cfg(test)]
        if self.collide {
            return 0;
        }
        self.hasher.hash_one(subject)
    }

    /// Lock the entries of `subject` (and of subjects sharing its shard).
    pub(crate) fn lock(&self, subject: &str) -> SubjectEntries<'_> {
        let h = self.hash(subject);
        SubjectEntries {
            shard: self.shards[(h as usize) & (self.shards.len() - 1)].lock(),
            // The high half: the shard used the low bits.
            tag: (h >> 32) as u32,
        }
    }

    /// Forget the family of `subject` at `loc`.
    pub(crate) fn remove(&self, subject: &str, loc: Loc) {
        self.lock(subject).remove(loc);
    }

    /// The shard `subject`'s entries are in.
    #[cfg(test)]
    pub(crate) fn shard_of(&self, subject: &str) -> usize {
        (self.hash(subject) as usize) & (self.shards.len() - 1)
    }

    /// Entries in all shards.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().entries.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(l: u32) -> Loc {
        Loc(l)
    }

    /// A subject's entries are found under its hash, removed one by one,
    /// and other subjects' entries stay.
    #[test]
    fn subject_index_is_a_multimap_by_subject() {
        let index = SubjectIndex::new(4);
        index.lock("alice").push(loc(2));
        index.lock("alice").push(loc(1));
        index.lock("bob").push(loc(3));
        assert_eq!(index.lock("alice").candidates(), [loc(1), loc(2)]);
        assert_eq!(index.lock("bob").candidates(), [loc(3)]);
        assert!(index.lock("carol").candidates().is_empty());
        assert!(!index.lock("bob").remove(loc(1)), "not bob's");
        index.remove("alice", loc(1));
        assert_eq!(index.lock("alice").candidates(), [loc(2)]);
        assert_eq!(index.len(), 2);
    }

    /// A location entered twice (a slot reused before the old entry's
    /// removal) is one candidate, and each removal takes one entry.
    #[test]
    fn subject_index_lists_a_location_once() {
        let index = SubjectIndex::new(1);
        index.lock("alice").push(loc(5));
        index.lock("alice").push(loc(5));
        assert_eq!(index.lock("alice").candidates(), [loc(5)]);
        assert!(index.lock("alice").remove(loc(5)));
        assert_eq!(index.lock("alice").candidates(), [loc(5)]);
        assert!(index.lock("alice").remove(loc(5)));
        assert!(index.lock("alice").candidates().is_empty());
    }

    /// Entries of subjects that share a shard and a hash tag are told apart
    /// by the caller; the index returns both and removes only the one asked.
    #[test]
    fn subject_index_keeps_colliding_entries_apart() {
        let index = SubjectIndex::colliding(4);
        index.lock("x").push(loc(1));
        index.lock("y").push(loc(2));
        assert_eq!(index.lock("x").candidates(), [loc(1), loc(2)]);
        let mut e = index.lock("y");
        assert!(e.remove(loc(1)));
        assert!(!e.remove(loc(1)));
        assert_eq!(e.candidates(), [loc(2)]);
    }

    /// Mass removal gives memory back.
    #[test]
    fn subject_index_shrinks_after_removals() {
        let index = SubjectIndex::new(1);
        for i in 0..10_000u32 {
            index.lock(&format!("user-{i}")).push(loc(i));
        }
        let grown = index.shards[0].lock().entries.capacity();
        for i in 100..10_000u32 {
            index.remove(&format!("user-{i}"), loc(i));
        }
        assert_eq!(index.len(), 100);
        assert!(index.shards[0].lock().entries.capacity() < grown / 8);
    }
}
