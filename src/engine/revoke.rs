//! Revocation on request: by token (RFC 7009), family, subject and client.

use std::net::IpAddr;

use crate::clock::Timestamp;
use crate::error::Error;
use crate::event::EventKind;
use crate::family::RevokeReason;
use crate::token::{self, FamilyId, TokenKind};

use super::{Engine, Who};

impl Engine {
    /// Revoke the family of a refresh token. With `client`, a token of
    /// another client is left alone (RFC 7009 §2.1). Returns whether this
    /// call revoked it; an invalid or already-revoked token is `false`.
    pub fn revoke_token(&self, token: &str, client: Option<&str>) -> Result<bool, Error> {
        self.revoke_token_at(token, client, self.clock.now())
    }

    /// [`revoke_token`](Self::revoke_token) at a given time.
    pub fn revoke_token_at(
        &self,
        token: &str,
        client: Option<&str>,
        now: Timestamp,
    ) -> Result<bool, Error> {
        let Some(parsed) = token::parse(token, TokenKind::Refresh) else {
            return Ok(false);
        };
        let keys = self.keys.load();
        let mut shard = self.table.lock(&parsed.family);
        let Some((slot, f)) = shard.locate_mut(&parsed.family) else {
            return Ok(false);
        };
        if !keys.verify(&parsed, &f.secret)
            || client.is_some_and(|c| **f.client() != *c)
            || !f.revoke(RevokeReason::Requested, now)
        {
            return Ok(false);
        }
        let persisted = self.persist(f);
        let who = Who::of(f, self.table.loc(&parsed.family, slot));
        drop(shard);
        // Unindexed (and reported) even if the store failed: it is revoked.
        self.after_revoke(&who, RevokeReason::Requested, None, now);
        self.settle(persisted?)?;
        Ok(true)
    }

    /// Revoke one family by id. Returns whether this call revoked it.
    pub fn revoke_family(&self, id: FamilyId) -> Result<bool, Error> {
        self.revoke_family_at(id, self.clock.now())
    }

    /// [`revoke_family`](Self::revoke_family) at a given time.
    pub fn revoke_family_at(&self, id: FamilyId, now: Timestamp) -> Result<bool, Error> {
        let mut shard = self.table.lock(&id);
        let Some((slot, f)) = shard.locate_mut(&id) else {
            return Ok(false);
        };
        if !f.revoke(RevokeReason::Requested, now) {
            return Ok(false);
        }
        let persisted = self.persist(f);
        let who = Who::of(f, self.table.loc(&id, slot));
        drop(shard);
        // Unindexed (and reported) even if the store failed: it is revoked.
        self.after_revoke(&who, RevokeReason::Requested, None, now);
        self.settle(persisted?)?;
        Ok(true)
    }

    /// What follows a revocation made by this call, outside the family's
    /// lock: its index entry goes, and the event.
    pub(super) fn after_revoke(
        &self,
        who: &Who,
        reason: RevokeReason,
        ip: Option<IpAddr>,
        now: Timestamp,
    ) {
        self.subjects.remove(&who.subject, who.loc);
        self.report_revoked(who, reason, ip, now);
    }

    pub(super) fn report_revoked(
        &self,
        who: &Who,
        reason: RevokeReason,
        ip: Option<IpAddr>,
        now: Timestamp,
    ) {
        let version = self.policies.load().version();
        self.emit(
            EventKind::FamilyRevoked { reason },
            Some(who),
            ip,
            version,
            now,
        );
    }

    /// Revoke every family of `subject`, or only those of `client`.
    /// Returns how many this call revoked.
    pub fn revoke_subject(&self, subject: &str, client: Option<&str>) -> Result<usize, Error> {
        self.revoke_subject_at(subject, client, self.clock.now())
    }

    /// [`revoke_subject`](Self::revoke_subject) at a given time.
    pub fn revoke_subject_at(
        &self,
        subject: &str,
        client: Option<&str>,
        now: Timestamp,
    ) -> Result<usize, Error> {
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
    ) -> Result<(usize, u64), Error> {
        let version = self.policies.load().version();
        let mut revoked = Vec::new();
        let mut lsn = 0;
        let mut failure = None;
        {
            let mut entries = self.subjects.lock(subject);
            for loc in entries.candidates() {
                let (mut shard, slot) = self.table.lock_loc(loc);
                let mine = match shard.at_mut(slot) {
                    Some(f)
                        if f.is_active()
                            && f.subject.as_str() == subject
                            && client.is_none_or(|c| **f.client() == *c)
                            && failure.is_none() =>
                    {
                        f.revoke(reason, now);
                        match self.persist(f) {
                            Ok(l) => lsn = lsn.max(l),
                            Err(e) => failure = Some(e),
                        }
                        revoked.push(Who::of(f, loc));
                        true
                    }
                    // Another client's or subject's, or an entry whose
                    // family left and whose removal is pending: not this
                    // call's to remove.
                    _ => false,
                };
                drop(shard);
                if mine {
                    entries.remove(loc);
                }
            }
        }
        for w in &revoked {
            self.emit(
                EventKind::FamilyRevoked { reason },
                Some(w),
                ip,
                version,
                now,
            );
        }
        match failure {
            Some(e) => Err(e),
            None => Ok((revoked.len(), lsn)),
        }
    }

    /// Revoke every family of `client`. This scans the whole table, one
    /// shard lock at a time: an administrative operation, not a hot path.
    pub fn revoke_client(&self, client: &str) -> Result<usize, Error> {
        self.revoke_client_at(client, self.clock.now())
    }

    /// [`revoke_client`](Self::revoke_client) at a given time.
    pub fn revoke_client_at(&self, client: &str, now: Timestamp) -> Result<usize, Error> {
        let mut revoked = Vec::new();
        let mut lsn = 0;
        let mut failure = None;
        'shards: for i in 0..self.table.shard_count() {
            let mut shard = self.table.lock_shard(i);
            for (slot, f) in shard.families_mut() {
                if **f.client() == *client && f.revoke(RevokeReason::ClientRevoked, now) {
                    let persisted = self.persist(f);
                    revoked.push(Who::of(f, self.table.loc(&f.id, slot)));
                    match persisted {
                        Ok(l) => lsn = lsn.max(l),
                        Err(e) => {
                            failure = Some(e);
                            break 'shards;
                        }
                    }
                }
            }
        }
        // Everything revoked is unindexed, also when the store failed.
        for w in &revoked {
            self.after_revoke(w, RevokeReason::ClientRevoked, None, now);
        }
        if let Some(e) = failure {
            return Err(e);
        }
        self.settle(lsn)?;
        Ok(revoked.len())
    }
}
