//! The authorization-code exchange (RFC 6749 §4.1.3, RFC 7636 §4.6).

use crate::clock::Timestamp;
use crate::code::{self, ExchangeCheck};
use crate::decision::{AcceptKind, Accepted, Decision, DenyReason, Verdict};
use crate::error::Error;
use crate::event::EventKind;
use crate::family::RevokeReason;
use crate::store::Lsn;
use crate::token::{self, Generation, KeyUid, TokenKind};

use super::revoke::Revocation;
use super::stats::outcome_slot;
use super::{Durable, Engine, ExchangeRequest, Who, deny, mint_current};

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
        let (decision, lsn) = self.exchange_inner(req, now)?;
        Ok(Durable {
            engine: self,
            decision: Some(decision),
            lsn,
        })
    }

    pub(super) fn exchange_inner(
        &self,
        req: &ExchangeRequest<'_>,
        now: Timestamp,
    ) -> Result<(Decision, Option<Lsn>), Error> {
        let policies = self.policies.load();
        if let Some(refused) = self.refuse_unlisted(&policies, req.client) {
            return Ok((refused, None));
        }
        let version = policies.version();
        let invalid = || {
            self.unsharded_outcomes
                .add(outcome_slot(Verdict::Deny(DenyReason::InvalidToken)));
            Ok((deny(DenyReason::InvalidToken, None, version), None))
        };
        let Some(parsed) = token::parse(req.code, TokenKind::Code) else {
            return invalid();
        };
        let keys = self.keys.load();
        let mut shard = self.table.lock(&parsed.family);
        let Some((slot, f)) = shard.locate_mut(&parsed.family) else {
            drop(shard);
            return invalid();
        };
        // Only generation 0 is a code; a tag that verifies for any other
        // generation under the code domain was never minted.
        if parsed.generation != Generation::CODE || !keys.verify(&parsed, &f.secret) {
            drop(shard);
            return invalid();
        }
        let policy = policies.policy(f.client());
        let check = ExchangeCheck {
            client: req.client,
            redirect_uri: req.redirect_uri,
            verifier: req.code_verifier,
            ip: req.ip,
            now,
        };
        match code::decide_exchange(f, &check, policy) {
            Ok(()) => {
                // `f.code` stays until the code's lifetime ends (the sweeper
                // drops it then): a replay is judged against it.
                f.generation = Generation::FIRST;
                f.created = now;
                f.last_used = now;
                f.rotated_at = now;
                f.rotation_ip = req.ip.map(|a| a.to_canonical());
                f.key = keys.active();
                f.tag_uid = KeyUid::NONE;
                let token = mint_current(f, &keys).expect("the active key is always in the ring");
                let id = f.id;
                let (grant, subject) = (f.grant.clone(), f.subject.clone());
                let lsn = self.persist(f)?;
                shard.outcomes[outcome_slot(Verdict::Accept(AcceptKind::Exchanged))] += 1;
                drop(shard);
                Ok((
                    Decision::Accept(Accepted {
                        token,
                        family: id,
                        generation: Generation::FIRST,
                        kind: AcceptKind::Exchanged,
                        policy_version: version,
                        grant,
                        subject,
                    }),
                    lsn,
                ))
            }
            Err(reason) => {
                let loc = self.table.loc(&parsed.family, slot);
                let revocation = match reason {
                    DenyReason::CodeReused => {
                        Revocation::under_lock(self, f, loc, RevokeReason::CodeReplay, now)
                    }
                    _ => None,
                };
                let who = match &revocation {
                    Some(r) => r.who().clone(),
                    None => Who::of(f, loc),
                };
                shard.outcomes[outcome_slot(Verdict::Deny(reason))] += 1;
                drop(shard);
                let ip = req.ip;
                let mut lsn = None;
                match reason {
                    DenyReason::CodeReused | DenyReason::CodeSpent => {
                        let replay = EventKind::CodeReplay {
                            revoked: revocation.is_some(),
                        };
                        self.emit(replay, Some(&who), ip, version, now);
                    }
                    DenyReason::ClientMismatch => self.emit(
                        EventKind::ClientMismatch {
                            presented_client: req.client.into(),
                        },
                        Some(&who),
                        ip,
                        version,
                        now,
                    ),
                    DenyReason::IpNotAllowed => {
                        self.emit(EventKind::IpNotAllowed, Some(&who), ip, version, now)
                    }
                    _ => {}
                }
                if let Some(r) = revocation {
                    let version = self.policies.load().version();
                    lsn = r.finish(self, ip, version, now)?;
                }
                Ok((deny(reason, Some(who.family), version), lsn))
            }
        }
    }
}
