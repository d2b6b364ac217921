//! Revocation: by token (RFC 7009), family, subject and client, and the one
//! door every revocation made under a lock leaves through.

use std::net::IpAddr;

use crate::clock::Timestamp;
use crate::error::Error;
use crate::event::EventKind;
use crate::family::{Family, RevokeReason};
use crate::policy::PolicyVersion;
use crate::store::Lsn;
use crate::table::{Loc, SubjectEntries};
use crate::token::{self, FamilyId, TokenKind};

use super::{Engine, Who};

/// A family this call revoked under its shard lock, with the store write
/// made there too. What must follow once the lock is released — its
/// subject-index entry goes, the `family_revoked` event fires, the store's
/// answer is reported — follows in [`finish`](Self::finish), whether or not
/// the store took the write: the family is revoked in memory either way, and
/// the engine fails closed on the error (README "Durability").
#[must_use = "a revocation is finished once the lock is released"]
pub(super) struct Revocation {
    who: Who,
    reason: RevokeReason,
    /// Whether its subject-index entry is still there for `finish` to
    /// remove; a subject walk removes it under the index lock it holds.
    indexed: bool,
    persisted: Result<Option<Lsn>, Error>,
}

impl Revocation {
    /// Revoke `f`, found at `loc`, and write it to the store, under its
    /// shard lock. `None` if it was revoked already (not this call's).
    pub(super) fn under_lock(
        engine: &Engine,
        f: &mut Family,
        loc: Loc,
        reason: RevokeReason,
        now: Timestamp,
    ) -> Option<Revocation> {
        if !f.revoke(reason, now) {
            return None;
        }
        let persisted = engine.persist(f);
        Some(Revocation {
            who: Who::of(f, loc),
            reason,
            indexed: true,
            persisted,
        })
    }

    /// The revoked family.
    pub(super) fn who(&self) -> &Who {
        &self.who
    }

    /// The store's refusal of the write, if it refused.
    pub(super) fn error(&self) -> Option<&Error> {
        self.persisted.as_ref().err()
    }

    /// Outside every lock: unindex, emit, and return the LSN to settle or
    /// the store's error.
    pub(super) fn finish(
        self,
        engine: &Engine,
        ip: Option<IpAddr>,
        version: PolicyVersion,
        now: Timestamp,
    ) -> Result<Option<Lsn>, Error> {
        if self.indexed {
            engine.subjects.remove(&self.who.subject, self.who.loc);
        }
        engine.emit(
            EventKind::FamilyRevoked {
                reason: self.reason,
            },
            Some(&self.who),
            ip,
            version,
            now,
        );
        self.persisted
    }
}

impl Engine {
    /// Revoke the family of a refresh token. With `client`, a token of
    /// another client is left alone (RFC 7009 §2.1). Returns whether this
    /// call revoked it; an invalid or already-revoked token is `false`.
    pub fn revoke_token(&self, token: &str, client: Option<&str>) -> Result<bool, Error> {
        self.at(self.now()).revoke_token(token, client)
    }

    /// [`revoke_token`](Self::revoke_token) at `now`; see [`At`](super::At).
    pub(super) fn revoke_token_at(
        &self,
        token: &str,
        client: Option<&str>,
        now: Timestamp,
    ) -> Result<bool, Error> {
        #[cfg(feature = "redis")]
        if let Some(sh) = &self.shared {
            return self.shared_revoke_token(sh, token, client, now);
        }
        let Some(parsed) = token::parse(token, TokenKind::Refresh) else {
            return Ok(false);
        };
        let keys = self.keys.load();
        let mut shard = self.table.lock(&parsed.family);
        let Some((slot, f)) = shard.locate_mut(&parsed.family) else {
            return Ok(false);
        };
        if !keys.verify(&parsed, &f.secret) || client.is_some_and(|c| **f.client() != *c) {
            return Ok(false);
        }
        let loc = self.table.loc(&parsed.family, slot);
        let Some(revocation) = Revocation::under_lock(self, f, loc, RevokeReason::Requested, now)
        else {
            return Ok(false);
        };
        drop(shard);
        self.finish_requested(revocation, now)
    }

    /// Revoke one family by id. Returns whether this call revoked it.
    pub fn revoke_family(&self, id: FamilyId) -> Result<bool, Error> {
        self.at(self.now()).revoke_family(id)
    }

    /// [`revoke_family`](Self::revoke_family) at `now`; see [`At`](super::At).
    pub(super) fn revoke_family_at(&self, id: FamilyId, now: Timestamp) -> Result<bool, Error> {
        #[cfg(feature = "redis")]
        if let Some(sh) = &self.shared {
            return super::shared::block_on(self.shared_revoke(sh, id, |_| true, now));
        }
        let mut shard = self.table.lock(&id);
        let Some((slot, f)) = shard.locate_mut(&id) else {
            return Ok(false);
        };
        let loc = self.table.loc(&id, slot);
        let Some(revocation) = Revocation::under_lock(self, f, loc, RevokeReason::Requested, now)
        else {
            return Ok(false);
        };
        drop(shard);
        self.finish_requested(revocation, now)
    }

    /// Finish a revocation an operator or client asked for (the shard lock
    /// already dropped) and wait until it is durable: `true`, this call
    /// revoked.
    fn finish_requested(&self, revocation: Revocation, now: Timestamp) -> Result<bool, Error> {
        let version = self.policies.load().version();
        self.settle(revocation.finish(self, None, version, now)?)?;
        Ok(true)
    }

    /// Revoke every family of `subject`, or only those of `client`.
    /// Returns how many this call revoked.
    pub fn revoke_subject(&self, subject: &str, client: Option<&str>) -> Result<usize, Error> {
        self.at(self.now()).revoke_subject(subject, client)
    }

    /// [`revoke_subject`](Self::revoke_subject) at `now`; see [`At`](super::At).
    pub(super) fn revoke_subject_at(
        &self,
        subject: &str,
        client: Option<&str>,
        now: Timestamp,
    ) -> Result<usize, Error> {
        #[cfg(feature = "redis")]
        if let Some(sh) = &self.shared {
            let reason = RevokeReason::SubjectRevoked;
            return super::shared::block_on(
                self.shared_revoke_subject(sh, subject, client, reason, None, now),
            );
        }
        let (n, lsn) =
            self.revoke_subject_with(subject, client, RevokeReason::SubjectRevoked, None, now)?;
        self.settle(lsn)?;
        Ok(n)
    }

    /// Revoke and unindex the subject's families (of `client` only, if
    /// given); returns how many, and the LSN to settle.
    pub(super) fn revoke_subject_with(
        &self,
        subject: &str,
        client: Option<&str>,
        reason: RevokeReason,
        ip: Option<IpAddr>,
        now: Timestamp,
    ) -> Result<(usize, Option<Lsn>), Error> {
        let version = self.policies.load().version();
        let revocations = {
            let mut entries = self.subjects.lock(subject);
            self.revoke_in_subject(&mut entries, subject, client, reason, now, |_| {})
        };
        let n = revocations.len();
        let lsn = self.finish_all(revocations, ip, version, now, |_| {})?;
        Ok((n, lsn))
    }

    /// The one walk over a subject's families, for subject revocation and
    /// the per-subject cap: list the live families of `subject` (of
    /// `client` only, if given) in `entries`, let `pick` narrow the list of
    /// (created, id, location), then revoke each picked family that is
    /// still the same, still active and still the subject's (a restore may
    /// have replaced the record since it was listed), removing its entry
    /// under the index lock held. The first store failure stops the walk:
    /// the engine refuses every later change anyway (README "Durability").
    pub(super) fn revoke_in_subject(
        &self,
        entries: &mut SubjectEntries<'_>,
        subject: &str,
        client: Option<&str>,
        reason: RevokeReason,
        now: Timestamp,
        pick: impl FnOnce(&mut Vec<(Timestamp, FamilyId, Loc)>),
    ) -> Vec<Revocation> {
        let mine = |f: &Family| {
            f.is_active()
                && f.subject.as_str() == subject
                && client.is_none_or(|c| **f.client() == *c)
        };
        let mut live = Vec::new();
        for loc in entries.candidates() {
            let (shard, slot) = self.table.lock_loc(loc);
            match shard.at(slot) {
                Some(f) if mine(f) => live.push((f.created, f.id, loc)),
                // Another client's or subject's, or an entry whose family
                // left and whose removal is pending: not this walk's to
                // remove.
                _ => {}
            }
        }
        pick(&mut live);
        let mut revocations = Vec::with_capacity(live.len());
        for (_, id, loc) in live {
            let (mut shard, slot) = self.table.lock_loc(loc);
            let Some(f) = shard.at_mut(slot).filter(|f| f.id == id && mine(f)) else {
                continue;
            };
            let Some(mut revocation) = Revocation::under_lock(self, f, loc, reason, now) else {
                continue;
            };
            drop(shard);
            // Revoked by this call, so its entry is this call's, even if
            // the store failed.
            entries.remove(loc);
            revocation.indexed = false;
            let failed = revocation.error().is_some();
            revocations.push(revocation);
            if failed {
                break;
            }
        }
        revocations
    }

    /// [`Revocation::finish`] each of `revocations`, calling `before` with
    /// each family ahead of its `family_revoked` event; every one is
    /// finished even when one failed. Returns the LSN to settle, or the
    /// first store error.
    pub(super) fn finish_all(
        &self,
        revocations: Vec<Revocation>,
        ip: Option<IpAddr>,
        version: PolicyVersion,
        now: Timestamp,
        mut before: impl FnMut(&Who),
    ) -> Result<Option<Lsn>, Error> {
        let mut lsn = Ok(None);
        for revocation in revocations {
            before(revocation.who());
            let finished = revocation.finish(self, ip, version, now);
            lsn = match (lsn, finished) {
                (Ok(a), Ok(b)) => Ok(a.max(b)),
                (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            };
        }
        lsn
    }

    /// Revoke every family of `client`. This scans the whole table, one
    /// shard lock at a time: an administrative operation, not a hot path.
    pub fn revoke_client(&self, client: &str) -> Result<usize, Error> {
        self.at(self.now()).revoke_client(client)
    }

    /// [`revoke_client`](Self::revoke_client) at `now`; see [`At`](super::At).
    pub(super) fn revoke_client_at(&self, client: &str, now: Timestamp) -> Result<usize, Error> {
        #[cfg(feature = "redis")]
        if let Some(sh) = &self.shared {
            return self.shared_revoke_client(sh, client, now);
        }
        let mut revocations = Vec::new();
        'shards: for i in 0..self.table.shard_count() {
            let mut shard = self.table.lock_shard(i);
            for (slot, f) in shard.families_mut() {
                if **f.client() != *client {
                    continue;
                }
                let loc = self.table.loc(&f.id, slot);
                if let Some(r) =
                    Revocation::under_lock(self, f, loc, RevokeReason::ClientRevoked, now)
                {
                    let failed = r.error().is_some();
                    revocations.push(r);
                    if failed {
                        break 'shards;
                    }
                }
            }
        }
        let n = revocations.len();
        let version = self.policies.load().version();
        // Everything revoked is unindexed, also when the store failed.
        let lsn = self.finish_all(revocations, None, version, now, |_| {})?;
        self.settle(lsn)?;
        Ok(n)
    }
}
