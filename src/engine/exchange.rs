//! The authorization-code exchange (RFC 6749 §4.1.3, RFC 7636 §4.6).

use crate::clock::Timestamp;
use crate::code::{self, ExchangeCheck};
use crate::decision::{self, Accepted, Decision, Plan, Verdict};
use crate::error::Error;
use crate::family::Family;
use crate::policy::PolicySet;
use crate::store::Lsn;
use crate::token::{self, Generation, KeyRing, ParsedToken, TokenKind};

use super::stats::outcome_slot;
use super::{Durable, Engine, ExchangeRequest, deny, mint_current};

impl Engine {
    /// Exchange an authorization code for the family's first refresh token
    /// (generation 1). A replay of an exchanged code that passes the same
    /// checks within the code's lifetime is `code_reused` and revokes the
    /// family born from it; any other replay is `code_spent`.
    pub fn exchange(&self, req: &ExchangeRequest<'_>) -> Result<Decision, Error> {
        self.at(self.now()).exchange(req)
    }

    /// [`exchange`](Self::exchange) at `now`; see [`At`](super::At).
    pub(super) fn exchange_at(
        &self,
        req: &ExchangeRequest<'_>,
        now: Timestamp,
    ) -> Result<Decision, Error> {
        let (decision, lsn) = self.exchange_inner(req, now)?;
        self.settle(lsn)?;
        Ok(decision)
    }

    /// [`exchange`](Self::exchange) without blocking: the future completes
    /// when the new family is durable.
    pub fn exchange_async(&self, req: &ExchangeRequest<'_>) -> Result<Durable<'_>, Error> {
        self.at(self.now()).exchange_async(req)
    }

    /// [`exchange_async`](Self::exchange_async) at `now`.
    pub(super) fn exchange_async_at(
        &self,
        req: &ExchangeRequest<'_>,
        now: Timestamp,
    ) -> Result<Durable<'_>, Error> {
        #[cfg(feature = "redis")]
        if let Some(sh) = &self.shared {
            // The future owns what it decides on: it may outlive `req`.
            let code = req.code.to_owned();
            let verifier = req.code_verifier.map(str::to_owned);
            let (client, redirect_uri) = (req.client.to_owned(), req.redirect_uri.to_owned());
            let (ip, dpop) = (req.ip, req.dpop);
            return Ok(Durable::shared(
                self,
                Box::pin(async move {
                    let req = ExchangeRequest {
                        code: &code,
                        code_verifier: verifier.as_deref(),
                        client: &client,
                        redirect_uri: &redirect_uri,
                        ip,
                        dpop,
                    };
                    self.shared_exchange(sh, req, now).await
                }),
            ));
        }
        Ok(Durable::pending(self, self.exchange_inner(req, now)?))
    }

    /// The exchange's checks and change on the code's record (under its
    /// shard lock, or in the shared store's transaction): `None` when the
    /// token is not a code this record minted, else the plan, applied and
    /// its binding made.
    pub(super) fn exchange_on(
        &self,
        f: &mut Family,
        parsed: &ParsedToken,
        req: &ExchangeRequest<'_>,
        policies: &PolicySet,
        keys: &KeyRing,
        now: Timestamp,
    ) -> Option<Plan> {
        // Only generation 0 is a code; a tag that verifies for any other
        // generation under the code domain was never minted.
        if parsed.generation != Generation::CODE || !keys.verify(parsed, &f.secret) {
            return None;
        }
        let policy = policies.policy(f.client());
        let check = ExchangeCheck {
            client: req.client,
            redirect_uri: req.redirect_uri,
            verifier: req.code_verifier,
            ip: req.ip,
            jkt: req.dpop.as_ref(),
            now,
        };
        let plan = code::decide_exchange(f, &check, policy);
        decision::apply(f, plan.change, now, req.ip, keys.active());
        self.rebind(f, plan.bind, req.dpop.as_ref());
        Some(plan)
    }

    pub(super) fn exchange_inner(
        &self,
        req: &ExchangeRequest<'_>,
        now: Timestamp,
    ) -> Result<(Decision, Option<Lsn>), Error> {
        #[cfg(feature = "redis")]
        if let Some(sh) = &self.shared {
            return super::shared::block_on(self.shared_exchange(sh, *req, now)).map(|d| (d, None));
        }
        let policies = self.policies.load();
        if let Some(refused) = self.refuse_unlisted(&policies, req.client) {
            return Ok((refused, None));
        }
        let version = policies.version();
        let invalid = || Ok((self.invalid_token(version), None));
        let Some(parsed) = token::parse(req.code, TokenKind::Code) else {
            return invalid();
        };
        let keys = self.keys.load();
        let mut shard = self.table.lock(&parsed.family);
        let Some((slot, f)) = shard.locate_mut(&parsed.family) else {
            drop(shard);
            return invalid();
        };
        let Some(plan) = self.exchange_on(f, &parsed, req, &policies, &keys, now) else {
            drop(shard);
            return invalid();
        };
        match plan.verdict {
            Verdict::Accept(kind) => {
                let token = mint_current(f, &keys).expect("the active key is always in the ring");
                let accepted = Accepted::of(
                    token,
                    f.id,
                    Generation::FIRST,
                    kind,
                    version,
                    &f.grant,
                    &f.subject,
                    f.secret,
                );
                let lsn = self.persist(f)?;
                shard.outcomes[outcome_slot(plan.verdict)] += 1;
                drop(shard);
                Ok((Decision::Accept(accepted), lsn))
            }
            Verdict::Deny(reason) => {
                let family = f.id;
                let loc = self.table.loc(&parsed.family, slot);
                let done = self.revoke_planned(f, loc, &plan, now);
                shard.outcomes[outcome_slot(plan.verdict)] += 1;
                drop(shard);
                let lsn = self.carry_out(&plan, done, req.client, req.ip, version, now)?;
                Ok((deny(reason, Some(family), version), lsn))
            }
        }
    }
}
