//! Refresh-token redemption, in the order of checks of docs/design.md ("The
//! refresh decision") and the README, and what a denial sets off.

use crate::clock::Timestamp;
use crate::decision::{self, AcceptKind, Accepted, Decision, DenyReason, Request, Verdict};
use crate::error::Error;
use crate::event::EventKind;
use crate::family::RevokeReason;
use crate::policy::{OnReuse, PolicyVersion};
use crate::store::Lsn;
use crate::token::{self, Generation, TokenKind};

use super::revoke::Revocation;
use super::stats::outcome_slot;
use super::{Durable, Engine, RedeemRequest, Who, deny, mint_current};

impl Engine {
    /// Redeem a refresh token: `req` names the token, the presenting
    /// client and its address (`None` when the caller's address could not
    /// be determined: no non-empty allow-list admits it).
    ///
    /// With a store in [`Durability::Sync`] this blocks until the change is
    /// durable (group commit: typically one fsync shared with concurrent
    /// callers). From an async runtime use [`redeem_async`](Self::redeem_async).
    /// An `Err` is a store failure: the engine then refuses every change
    /// until restarted (fail closed); nothing was acknowledged.
    ///
    /// [`Durability::Sync`]: crate::Durability::Sync
    pub fn redeem(&self, req: &RedeemRequest<'_>) -> Result<Decision, Error> {
        self.at(self.now()).redeem(req)
    }

    /// [`redeem`](Self::redeem) without blocking: the decision is made at
    /// once, and the returned future completes when it is durable.
    pub fn redeem_async(&self, req: &RedeemRequest<'_>) -> Result<Durable<'_>, Error> {
        self.at(self.now()).redeem_async(req)
    }

    /// [`redeem`](Self::redeem) at `now`; see [`At`](super::At).
    pub(super) fn redeem_at(
        &self,
        req: &RedeemRequest<'_>,
        now: Timestamp,
    ) -> Result<Decision, Error> {
        let (decision, lsn) = self.redeem_inner(req, now)?;
        self.settle(lsn)?;
        Ok(decision)
    }

    /// [`redeem_async`](Self::redeem_async) at `now`.
    pub(super) fn redeem_async_at(
        &self,
        req: &RedeemRequest<'_>,
        now: Timestamp,
    ) -> Result<Durable<'_>, Error> {
        let (decision, lsn) = self.redeem_inner(req, now)?;
        Ok(Durable {
            engine: self,
            decision: Some(decision),
            lsn,
        })
    }

    pub(super) fn redeem_inner(
        &self,
        req: &RedeemRequest<'_>,
        now: Timestamp,
    ) -> Result<(Decision, Option<Lsn>), Error> {
        let (token, client, ip) = (req.token, req.client, req.ip);
        let policies = self.policies.load();
        if let Some(refused) = self.refuse_unlisted(&policies, client) {
            return Ok((refused, None));
        }
        let version = policies.version();
        let invalid = || {
            self.unsharded_outcomes
                .add(outcome_slot(Verdict::Deny(DenyReason::InvalidToken)));
            Ok((deny(DenyReason::InvalidToken, None, version), None))
        };
        // 1. Parse; unknown key ids are malformed too.
        let Some(parsed) = token::parse(token, TokenKind::Refresh) else {
            return invalid();
        };
        let keys = self.keys.load();
        if !keys.contains(parsed.key) {
            return invalid();
        }
        // 2. Look up; 3. verify the tag. A forgery touches nothing.
        let mut shard = self.table.lock(&parsed.family);
        let Some(slot) = shard.slot_mut(&parsed.family) else {
            drop(shard);
            return invalid();
        };
        let f = slot.family;
        // The current generation verifies against the cached tag, older ones
        // by HMAC. Timing can thus tell whether a presented generation is the
        // current one, never anything about the tag.
        let cached = parsed.generation == f.generation
            && parsed.key == f.key
            && keys.uid(f.key) == Some(f.tag_uid);
        let valid = if cached {
            parsed.tag_is(&f.tag)
        } else {
            keys.verify(&parsed, &f.secret)
        };
        if !valid {
            drop(shard);
            return invalid();
        }
        let policy = policies.policy(f.client());
        let req = Request {
            generation: parsed.generation,
            client,
            ip,
            now,
        };
        let mut verdict = decision::decide(f, &req, policy);
        if let Verdict::Accept(kind) = verdict {
            // The token to return is minted with the active key on rotation,
            // else with the key of the current generation. If that key was
            // removed, the current token is dead; refuse rather than fork.
            let mint_key = if kind == AcceptKind::Rotated {
                keys.active()
            } else {
                f.key
            };
            if !keys.contains(mint_key) {
                verdict = Verdict::Deny(DenyReason::InvalidToken);
            }
        }
        slot.outcomes[outcome_slot(verdict)] += 1;
        // Shadow: the same pure decision on the same state under the
        // candidate set, counted and otherwise discarded.
        if let Some(shadow) = &*self.shadow.load() {
            // A candidate that would refuse the client counts as such.
            let candidate = match shadow.set.admits_client(client) {
                true => decision::decide(f, &req, shadow.set.policy(f.client())),
                false => Verdict::Deny(DenyReason::UnknownClient),
            };
            slot.shadow.record(
                shadow.epoch,
                f.client(),
                outcome_slot(verdict),
                outcome_slot(candidate),
            );
        }
        match verdict {
            Verdict::Accept(kind) => {
                decision::apply_accept(f, kind, &req, keys.active());
                let token = mint_current(f, &keys);
                let (family, generation) = (f.id, f.generation);
                // Refcount bumps (or an inline copy), not allocations.
                let (grant, subject) = (f.grant.clone(), f.subject.clone());
                let lsn = self.persist(f)?;
                drop(shard);
                // A `reuse`-rotation acceptance only moves last use: losing
                // it to a crash makes the family look idle sooner, which is
                // the safe direction, so it is not waited for.
                let wait = if kind == AcceptKind::Kept { None } else { lsn };
                match token {
                    Some(token) => Ok((
                        Decision::Accept(Accepted {
                            token,
                            family,
                            generation,
                            kind,
                            policy_version: version,
                            grant,
                            subject,
                        }),
                        wait,
                    )),
                    // Checked just above, under the same ring snapshot.
                    None => invalid(),
                }
            }
            Verdict::Deny(reason) => {
                let (current, family) = (f.generation, f.id);
                // Copying the client bumps a count shared by all of a
                // client's families, and the subject is copied into a new
                // allocation: only for a sink, or for reuse, whose response
                // needs the subject.
                let loc = self.table.loc(&parsed.family, slot.slot);
                let on_reuse = policy.on_reuse;
                let revocation = match reason {
                    DenyReason::ReuseDetected if on_reuse != OnReuse::ReportOnly => {
                        Revocation::under_lock(self, f, loc, RevokeReason::ReuseDetected, now)
                    }
                    _ => None,
                };
                let who = match &revocation {
                    Some(r) => Some(r.who().clone()),
                    None => (reason == DenyReason::ReuseDetected || self.events.delivers())
                        .then(|| Who::of(f, loc)),
                };
                drop(shard);
                let lsn = self.after_denial(
                    reason,
                    &req,
                    who.as_ref(),
                    current,
                    on_reuse,
                    revocation,
                    version,
                )?;
                Ok((deny(reason, Some(family), version), lsn))
            }
        }
    }

    /// Events and cross-family follow-ups of a denial, outside every lock.
    /// `revocation` is the family's own, made under its lock: only reuse
    /// revokes, so for any other denial it is `None`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn after_denial(
        &self,
        reason: DenyReason,
        req: &Request<'_>,
        who: Option<&Who>,
        current: Generation,
        on_reuse: OnReuse,
        revocation: Option<Revocation>,
        version: PolicyVersion,
    ) -> Result<Option<Lsn>, Error> {
        let (ip, now) = (req.ip, req.now);
        let mut lsn = None;
        match reason {
            DenyReason::ReuseDetected => {
                self.emit(
                    EventKind::ReuseDetected {
                        presented: req.generation,
                        current,
                        response: on_reuse,
                    },
                    who,
                    ip,
                    version,
                    now,
                );
                // Revoked by this call, so its index entry is this call's to
                // remove (see `SubjectIndex`), even if the store failed.
                if let Some(r) = revocation {
                    lsn = r.finish(self, ip, version, now)?;
                }
                // The caller copies client and subject for every reuse.
                let Some(who) = who else {
                    return Ok(lsn);
                };
                match on_reuse {
                    OnReuse::RevokeSubjectClient => {
                        lsn = lsn.max(
                            self.revoke_subject_with(
                                &who.subject,
                                Some(&who.client),
                                RevokeReason::SubjectReuse,
                                ip,
                                now,
                            )?
                            .1,
                        );
                    }
                    OnReuse::RevokeSubject => {
                        lsn = lsn.max(
                            self.revoke_subject_with(
                                &who.subject,
                                None,
                                RevokeReason::SubjectReuse,
                                ip,
                                now,
                            )?
                            .1,
                        );
                    }
                    OnReuse::RevokeFamily | OnReuse::ReportOnly => {}
                }
            }
            DenyReason::ClientMismatch => self.emit(
                EventKind::ClientMismatch {
                    presented_client: req.client.into(),
                },
                who,
                ip,
                version,
                now,
            ),
            DenyReason::StateRollback => self.emit(
                EventKind::StateRollback {
                    presented: req.generation,
                    current,
                },
                who,
                ip,
                version,
                now,
            ),
            DenyReason::IpNotAllowed => self.emit(EventKind::IpNotAllowed, who, ip, version, now),
            _ => {}
        }
        Ok(lsn)
    }
}
