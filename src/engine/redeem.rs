//! Refresh-token redemption, in the order of checks of docs/design.md ("The
//! refresh decision") and the README: the shell around `decide`, which
//! carries out the plan it returns.

use crate::clock::Timestamp;
use crate::decision::{self, Accepted, Bind, Change, Decision, DenyReason, Request, Verdict};
use crate::error::Error;
use crate::store::Lsn;
use crate::token::{self, TokenKind};

use super::stats::outcome_slot;
use super::{Durable, Engine, RedeemRequest, deny, mint_current, refuse_unmintable};

impl Engine {
    /// Redeem a refresh token: `req` names the token, the presenting
    /// client and its address (`None` when the caller's address could not
    /// be determined: no non-empty allow-list admits it).
    ///
    /// With a store in [`Durability::Sync`] this blocks until the change is
    /// durable (group commit: typically one fsync shared with concurrent
    /// callers). From an async runtime use [`redeem_async`](Self::redeem_async).
    /// An `Err` is a store failure: the engine then refuses every change
    /// until restarted (fail closed); nothing was acknowledged. With a
    /// shared store (README "Several instances") this blocks for one round
    /// trip, and an `Err` (Redis unreachable, or no answer within the
    /// command timeout) fails this call only: the next one tries again.
    ///
    /// [`Durability::Sync`]: crate::Durability::Sync
    #[inline]
    pub fn redeem(&self, req: &RedeemRequest<'_>) -> Result<Decision, Error> {
        self.at(self.now()).redeem(req)
    }

    /// [`redeem`](Self::redeem) without blocking: the decision is made at
    /// once, and the returned future completes when it is durable. With a
    /// shared store the future makes the decision, awaiting the store's
    /// answer; any executor can poll it (the store's own thread wakes it).
    pub fn redeem_async(&self, req: &RedeemRequest<'_>) -> Result<Durable<'_>, Error> {
        self.at(self.now()).redeem_async(req)
    }

    /// [`redeem`](Self::redeem) at `now`; see [`At`](super::At).
    #[inline]
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
        #[cfg(feature = "redis")]
        if let Some(sh) = &self.shared {
            // The future owns what it decides on: it may outlive `req`.
            let (token, client) = (req.token.to_owned(), req.client.to_owned());
            let (ip, dpop) = (req.ip, req.dpop);
            return Ok(Durable::shared(
                self,
                Box::pin(async move {
                    let req = RedeemRequest::new(&token, &client).ip(ip).dpop(dpop);
                    self.shared_redeem(sh, req, now).await
                }),
            ));
        }
        Ok(Durable::pending(self, self.redeem_inner(req, now)?))
    }

    pub(super) fn redeem_inner(
        &self,
        req: &RedeemRequest<'_>,
        now: Timestamp,
    ) -> Result<(Decision, Option<Lsn>), Error> {
        // The one branch between one engine and several (README "Several
        // instances"); the in-process path below is unchanged.
        #[cfg(feature = "redis")]
        if let Some(sh) = &self.shared {
            return super::shared::block_on(self.shared_redeem(sh, *req, now)).map(|d| (d, None));
        }
        let (token, client, ip) = (req.token, req.client, req.ip);
        let policies = self.policies.load();
        if let Some(refused) = self.refuse_unlisted(&policies, client) {
            return Ok((refused, None));
        }
        let version = policies.version();
        let invalid = || Ok((self.invalid_token(version), None));
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
            jkt: req.dpop.as_ref(),
            now,
        };
        let mut plan = decision::decide(f, &req, policy);
        refuse_unmintable(&mut plan, f, &keys);
        slot.outcomes[outcome_slot(plan.verdict)] += 1;
        // Shadow: the same pure decision on the same state under the
        // candidate set, counted and otherwise discarded.
        if let Some(shadow) = &*self.shadow.load() {
            // A candidate that would refuse the client counts as such.
            let candidate = match shadow.set.admits_client(client) {
                true => decision::decide(f, &req, shadow.set.policy(f.client())).verdict,
                false => Verdict::Deny(DenyReason::UnknownClient),
            };
            slot.shadow.record(
                shadow.epoch,
                f.client(),
                outcome_slot(plan.verdict),
                outcome_slot(candidate),
            );
        }
        decision::apply(f, plan.change, now, ip, keys.active());
        self.rebind(f, plan.bind, req.jkt);
        match plan.verdict {
            Verdict::Accept(kind) => {
                // Inline copies (or a count of the family's own), not
                // allocations, nor a count shared with other families.
                let accepted = mint_current(f, &keys).map(|token| {
                    Accepted::of(
                        token,
                        f.id,
                        f.generation,
                        kind,
                        version,
                        &f.grant,
                        &f.subject,
                        f.secret,
                    )
                });
                let lsn = self.persist(f)?;
                drop(shard);
                // A `reuse`-rotation acceptance only moves last use: losing
                // it to a crash makes the family look idle sooner, which is
                // the safe direction, so it is not waited for.
                // A first binding is waited for: lost, it would leave the
                // family for the next proof's key to claim.
                let wait = if plan.change == Change::Keep && plan.bind == Bind::Keep {
                    None
                } else {
                    lsn
                };
                match accepted {
                    Some(accepted) => Ok((Decision::Accept(accepted), wait)),
                    // Checked just above, under the same ring snapshot.
                    None => invalid(),
                }
            }
            Verdict::Deny(reason) => {
                let family = f.id;
                let loc = self.table.loc(&parsed.family, slot.slot);
                let done = self.revoke_planned(f, loc, &plan, now);
                drop(shard);
                let lsn = self.carry_out(&plan, done, client, ip, version, now)?;
                Ok((deny(reason, Some(family), version), lsn))
            }
        }
    }
}
