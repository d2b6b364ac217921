//! Interned client ids, scopes and grants, shared by the families that
//! hold them.

use std::sync::Arc;

use hashbrown::HashTable;

use crate::dpop::Jkt;
use crate::family::Grant;
use crate::token::FamilyId;

use super::Hasher;

/// Shares one allocation per distinct client id and scope string, and one
/// [`Grant`] per distinct pair and stripe.
///
/// Grants are striped by family id ([`GRANT_STRIPES`] copies of each pair
/// at most) because an acceptance hands the family's grant out by cloning
/// its `Arc` (README "API": no allocation on redemption). Were one grant
/// shared by every family of a client, every redemption for that client,
/// on every core, would write the same reference count: one cache line
/// bounced between all cores on the hot path. Striped like the table's
/// shards, a count is written mostly by the thread already holding the
/// shard lock of a family in that stripe.
///
/// Grows with the number of distinct values: client ids and granted
/// scopes. Scopes come from authorization requests, so the sweeper calls
/// [`prune`](Interner::prune) once per pass over the table: what no
/// family (nor anything else) holds any more is forgotten, and the
/// interner stays bounded by the live families' pairs.
/// How many copies of one (client, scope) grant families are spread over.
/// Bounded so that memory stays about one grant per distinct pair times
/// this at most (a grant is under 100 bytes).
pub(crate) const GRANT_STRIPES: u64 = 64;

/// The grant stripe of family `id`: the low bits the table's shard is
/// chosen by, so one shard's families share one stripe.
pub(crate) fn stripe_of(id: &FamilyId) -> u8 {
    (id.shard_bits() % GRANT_STRIPES) as u8
}

pub(crate) struct Interner {
    strings: parking_lot::RwLock<std::collections::HashSet<Arc<str>, Hasher>>,
    grants: parking_lot::RwLock<HashTable<(u8, Arc<Grant>)>>,
    hasher: Hasher,
}

impl Interner {
    pub(crate) fn new() -> Interner {
        Interner {
            strings: Default::default(),
            grants: Default::default(),
            hasher: Hasher::new(),
        }
    }

    pub(crate) fn intern(&self, s: &str) -> Arc<str> {
        if let Some(a) = self.strings.read().get(s) {
            return a.clone();
        }
        let mut w = self.strings.write();
        if let Some(a) = w.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        w.insert(a.clone());
        a
    }

    /// Forget the pairs and strings that nothing but the interner holds.
    /// Returns how many pairs went. Under the write lock nobody can take a
    /// new reference, so a count of one (the interner's own) stays one
    /// until the entry is gone; a pair dropped here releases its strings
    /// before they are looked at.
    pub(crate) fn prune(&self) -> usize {
        let hash = |g: &(u8, Arc<Grant>)| self.hasher.hash_one((g.0, &*g.1.client, &*g.1.scope));
        let mut grants = self.grants.write();
        let before = grants.len();
        grants.retain(|g| Arc::strong_count(&g.1) > 1);
        let pruned = before - grants.len();
        if grants.capacity() > 64 && grants.len() < grants.capacity() / 4 {
            grants.shrink_to_fit(hash);
        }
        drop(grants);
        let mut strings = self.strings.write();
        strings.retain(|s| Arc::strong_count(s) > 1);
        if strings.capacity() > 64 && strings.len() < strings.capacity() / 4 {
            strings.shrink_to_fit();
        }
        pruned
    }

    /// Pairs and strings held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> (usize, usize) {
        (self.grants.read().len(), self.strings.read().len())
    }

    /// The grant of `client` with `scope` for family `id`, bound to the
    /// DPoP key `jkt` when there is one: then a grant of the family's own
    /// (not kept here), with the interned strings.
    pub(crate) fn grant_for(
        &self,
        id: &FamilyId,
        client: &str,
        scope: &str,
        jkt: Option<&Jkt>,
    ) -> Arc<Grant> {
        match jkt {
            None => self.grant(stripe_of(id), client, scope),
            Some(&jkt) => Arc::new(Grant {
                client: self.intern(client),
                scope: self.intern(scope),
                jkt: Some(jkt),
            }),
        }
    }

    /// The shared grant of `client` with `scope` in `stripe`.
    pub(crate) fn grant(&self, stripe: u8, client: &str, scope: &str) -> Arc<Grant> {
        let hash = |st: u8, c: &str, s: &str| self.hasher.hash_one((st, c, s));
        let h = hash(stripe, client, scope);
        let same =
            |g: &(u8, Arc<Grant>)| g.0 == stripe && *g.1.client == *client && *g.1.scope == *scope;
        if let Some(g) = self.grants.read().find(h, same) {
            return g.1.clone();
        }
        let g = Arc::new(Grant {
            client: self.intern(client),
            scope: self.intern(scope),
            jkt: None,
        });
        let mut w = self.grants.write();
        if let Some(g) = w.find(h, same) {
            return g.1.clone();
        }
        w.insert_unique(h, (stripe, g.clone()), |g| {
            hash(g.0, &g.1.client, &g.1.scope)
        });
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One grant per distinct pair, sharing the interned strings.
    #[test]
    fn grants_are_shared_per_pair() {
        let i = Interner::new();
        let a = i.grant(0, "app", "openid");
        assert!(Arc::ptr_eq(&a, &i.grant(0, "app", "openid")));
        let b = i.grant(0, "app", "email");
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&a.client, &b.client));
        assert_eq!((&*b.client, &*b.scope), ("app", "email"));
    }

    /// Pruning forgets exactly what nothing else holds: a pair in use keeps
    /// its identity and its strings; a dropped one goes with the strings
    /// only it used.
    #[test]
    fn pruning_keeps_what_is_held() {
        let i = Interner::new();
        let kept = i.grant(0, "app", "openid");
        let gone = i.grant(0, "app", "email");
        let event_client = i.intern("other");
        assert_eq!(i.len(), (2, 4));
        assert_eq!(i.prune(), 0, "all held");
        drop(gone);
        assert_eq!(i.prune(), 1);
        assert_eq!(i.len(), (1, 3), "\"email\" went with its pair");
        assert!(Arc::ptr_eq(&kept, &i.grant(0, "app", "openid")));
        drop((kept, event_client));
        i.prune();
        assert_eq!(i.len(), (0, 0));
    }

    /// Raced on real threads: a pair held by one thread is never forgotten
    /// by another's prune (it would come back as a second, distinct pair),
    /// while pairs nobody holds come and go.
    #[test]
    fn pruning_never_forgets_a_held_pair() {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        let i = Interner::new();
        let prunes = AtomicUsize::new(0);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let mut forgotten = None;
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Relaxed) {
                    i.prune();
                    prunes.fetch_add(1, Relaxed);
                }
            });
            let mut round = 0u64;
            // Until the pruner has run many times during the rounds.
            while round < 20_000 || prunes.load(Relaxed) < 20_000 {
                let held = i.grant(0, "app", "openid");
                // A pair only this round uses, dropped at once.
                drop(i.grant(0, "app", if round.is_multiple_of(2) { "a" } else { "b" }));
                let again = i.grant(0, "app", "openid");
                if !Arc::ptr_eq(&held, &again) || !Arc::ptr_eq(&held.scope, &i.intern("openid")) {
                    forgotten = Some(round);
                    break;
                }
                round += 1;
            }
            stop.store(true, Relaxed);
        });
        assert_eq!(forgotten, None, "a held pair was forgotten in this round");
        i.prune();
        assert_eq!(i.len(), (0, 0));
    }
}
