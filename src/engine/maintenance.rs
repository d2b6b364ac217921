//! Sweeping, persistence, restore and compaction.

use crate::clock::Timestamp;
use crate::code::{self};
use crate::decision::{self};
use crate::error::Error;
use crate::family::{Family, Status};
use crate::store::Lsn;
use crate::store::{Durability, RecordRef};
use crate::token::{FamilyId, Generation, KeyUid};

use super::{Engine, FamilyRecord};

/// What one [`Engine::sweep`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Slots looked at (bounded by the budget).
    pub examined: usize,
    /// Families removed.
    pub removed: usize,
}

impl Engine {
    /// Remove expired families, and revoked ones past their retention,
    /// examining at most `budget` slots, and at most one pass over the
    /// table (so `usize::MAX` means "everything, once"). Call it
    /// periodically; memory then stays bounded by the live families under
    /// churn.
    pub fn sweep(&self, budget: usize) -> Result<SweepReport, Error> {
        self.at(self.now()).sweep(budget)
    }

    /// [`sweep`](Self::sweep) at `now`; see [`At`](super::At).
    pub(super) fn sweep_at(&self, budget: usize, now: Timestamp) -> Result<SweepReport, Error> {
        #[cfg(feature = "redis")]
        if let Some(sh) = &self.shared {
            return Ok(self.shared_sweep(sh, now));
        }
        let policies = self.policies.load();
        let retention = self.revoked_retention;
        let mut retired = Vec::new();
        let swept = self.table.sweep(budget, |f| {
            let dead = match f.status() {
                Status::Revoked { at, .. } => now >= at.saturating_add(retention),
                Status::Active => {
                    let policy = policies.policy(f.client());
                    match f.code.as_deref() {
                        // An unused code lives `code_ttl`, then its family goes.
                        Some(c) if f.generation == Generation::CODE => c.expired(policy, now),
                        _ => decision::expiry(f, policy, now).is_some(),
                    }
                }
            };
            if !dead && code::state_retired(f, now) {
                retired.push(f.id);
            }
            dead
        });
        // Code state kept to judge replays goes once it can judge none, so
        // it costs memory only for the codes of the last `MAX_CODE_TTL`.
        // Not written to the store: a record recovered with it is retired
        // again by the next pass.
        for id in retired {
            let mut shard = self.table.lock(&id);
            if let Some(f) = shard.get_mut(&id)
                && code::state_retired(f, now)
            {
                f.code = None;
            }
        }
        let removed = swept.removed;
        // Active families leave the index here (revoked ones did when they
        // were revoked), all of them before any store error can return.
        for (loc, f) in &removed {
            if f.is_active() {
                self.subjects.remove(f.subject.as_str(), *loc);
            }
        }
        let stored = match &self.store {
            // Not waited for: a removal lost to a crash is swept again.
            Some(store) => removed
                .iter()
                .try_for_each(|(_, f)| store.remove(f.id, f.lsn).map(drop)),
            None => Ok(()),
        };
        let report = SweepReport {
            examined: swept.examined,
            removed: removed.len(),
        };
        // The removed families' grants are released first, so that a pass
        // forgets the pairs only they used.
        drop(removed);
        if swept.wrapped {
            self.interner.prune();
        }
        stored.map(|()| report)
    }

    /// A copy of one family's record, for stores and backups.
    pub fn family_record(&self, id: FamilyId) -> Option<FamilyRecord> {
        #[cfg(feature = "redis")]
        let shared = self.shared.as_ref().map(|sh| self.shared_record(sh, id));
        #[cfg(not(feature = "redis"))]
        let shared: Option<Option<Family>> = None;
        let mut f = match shared {
            Some(record) => record?,
            None => self.table.lock(&id).get(&id).cloned()?,
        };
        // The tag cache is a redeemable token: it never leaves the table.
        f.tag = [0; 16];
        f.tag_uid = KeyUid::NONE;
        Some(FamilyRecord(f))
    }

    /// Put a family record in place, replacing any record with its id, and
    /// persist it. Restoring an older record is a rollback: tokens newer
    /// than it are then denied `state_rollback`.
    pub fn restore_family(&self, record: FamilyRecord) -> Result<(), Error> {
        #[cfg(feature = "redis")]
        if let Some(sh) = &self.shared {
            return self.shared_restore(sh, record.0);
        }
        let id = record.0.id;
        self.install(record.0);
        let lsn = {
            let mut shard = self.table.lock(&id);
            match shard.get_mut(&id) {
                Some(f) => self.persist(f)?,
                None => None,
            }
        };
        self.settle(lsn)
    }

    /// Put `f` in the table and, if active, the subject index.
    pub(super) fn install(&self, mut f: Family) {
        f.tag_uid = KeyUid::NONE;
        f.grant = self
            .interner
            .grant_for(&f.id, f.client(), f.scope(), f.jkt());
        let (id, active) = (f.id, f.is_active());
        let mut entries = self.subjects.lock(f.subject.as_str());
        let mut shard = self.table.lock(&id);
        let (slot, replaced, collapse) = match shard.locate_mut(&id) {
            Some((slot, record)) => (slot, Some(std::mem::replace(record, f)), None),
            None => {
                let (slot, collapse) = shard.insert(f);
                (slot, None, collapse)
            }
        };
        drop(shard);
        let loc = self.table.loc(&id, slot);
        if active {
            entries.push(loc);
        }
        drop(entries);
        // Milliseconds of kernel work, so with no lock held (see `huge`).
        if let Some(c) = collapse {
            c.run();
        }
        // The replaced record was indexed if it was active when replaced
        // (under the lock, so no revoker took it out first): this call took
        // it out of the table, so its entry is this call's to remove. Under
        // the same subject, or one sharing its hash, that is one of two
        // equal entries, and either serves the new record.
        if let Some(old) = replaced.filter(Family::is_active) {
            self.subjects.remove(old.subject.as_str(), loc);
        }
    }

    /// Append `f`'s new state to the store, under its lock. Returns the LSN
    /// to settle (`None` without a store).
    pub(super) fn persist(&self, f: &mut Family) -> Result<Option<Lsn>, Error> {
        match &self.store {
            None => Ok(None),
            Some(store) => {
                let lsn = store.put(RecordRef(f))?;
                f.lsn = lsn;
                Ok(Lsn::new(lsn))
            }
        }
    }

    /// In `Sync` durability, wait until `lsn` is durable.
    pub(super) fn settle(&self, lsn: Option<Lsn>) -> Result<(), Error> {
        match (&self.store, lsn) {
            (Some(store), Some(lsn)) if self.sync => store.wait_durable(lsn.get()),
            _ => Ok(()),
        }
    }

    /// Make every change so far durable (call before shutdown).
    pub fn flush(&self) -> Result<(), Error> {
        match &self.store {
            Some(store) => store.flush(),
            None => Ok(()),
        }
    }

    /// Rewrite the store's history as one snapshot of the table, so the log
    /// stays proportional to the live families. Safe while redemptions run.
    pub fn compact(&self) -> Result<(), Error> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        store.compact(&mut |emit| {
            for i in 0..self.table.shard_count() {
                let mut shard = self.table.lock_shard(i);
                for (_, f) in shard.families_mut() {
                    emit(RecordRef(f));
                }
            }
        })
    }

    /// The store's durability, or `None` without a store.
    pub fn durability(&self) -> Durability {
        self.store
            .as_ref()
            .map_or(Durability::None, |s| s.durability())
    }

    /// The store's error once it has failed closed (the engine then refuses
    /// every change until a restart); `None` while it works, or without a
    /// store. Writes nothing: a health check calls it.
    ///
    /// With a shared store: the error while its last command failed
    /// (Redis unreachable or silent); it clears by itself when Redis
    /// answers again, and nothing latches.
    pub fn store_failure(&self) -> Option<Error> {
        #[cfg(feature = "redis")]
        if let Some(sh) = &self.shared {
            return (!sh.store.is_healthy())
                .then(|| Error::store("redis: the last command failed; reconnecting"));
        }
        self.store.as_ref().and_then(|s| s.failure())
    }
}
