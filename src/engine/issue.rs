//! Starting families: direct issue and authorization codes, with the subject cap.

use std::sync::Arc;

use crate::clock::Timestamp;
use crate::code::{self, CodeState, MAX_REDIRECT_URI_LEN};
use crate::decision::{AcceptKind, Accepted, Decision, DenyReason, Verdict};
use crate::dpop::Jkt;
use crate::error::Error;
use crate::event::{Event, EventKind};
use crate::family::{Family, RevokeReason, SubjectName};
use crate::policy::{ClientPolicy, PolicyVersion};
use crate::table::Loc;
use crate::token::{self, FamilyId, FamilySecret, Generation, KeyRing, KeyUid, TokenKind};

use super::revoke::Revocation;
use super::stats::outcome_slot;
use super::{
    AuthorizeRequest, Engine, IssueRequest, MAX_SCOPE_LEN, MAX_SUBJECT_LEN, cache_tag, deny,
};

impl Engine {
    /// Start a family: the first refresh token (generation 1).
    pub fn issue(&self, req: &IssueRequest<'_>) -> Result<Decision, Error> {
        self.at(self.now()).issue(req)
    }

    /// [`issue`](Self::issue) at `now`; see [`At`](super::At).
    pub(super) fn issue_at(
        &self,
        req: &IssueRequest<'_>,
        now: Timestamp,
    ) -> Result<Decision, Error> {
        check_identity(req.client, req.subject, req.scope)?;
        let policies = self.policies.load();
        if let Some(refused) = self.refuse_unlisted(&policies, req.client) {
            return Ok(refused);
        }
        let version = policies.version();
        let policy = policies.policy(req.client);
        // The allow-list applies at issuance in both `ip_check` modes.
        if !policy.ip_allowlist.admits(req.ip) {
            self.events.emit(&Event {
                kind: EventKind::IpNotAllowed,
                family: None,
                client: Some(self.interner.intern(req.client)),
                subject: Some(Arc::from(req.subject)),
                ip: req.ip,
                policy_version: version,
                at: now,
            });
            return Ok(deny(DenyReason::IpNotAllowed, None, version));
        }
        self.start_family(req, policy, version, None, None, now)
    }

    /// Create a family at generation 1 (a direct issue) or 0 (an
    /// authorization code carrying `code`), applying the subject cap, and
    /// return its first token.
    /// A new family's record, not yet placed anywhere: a code's (the
    /// code's generation) when `code` is given, else a refresh token's.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fresh_family(
        &self,
        id: FamilyId,
        secret: &[u8],
        req: &IssueRequest<'_>,
        code: Option<Box<CodeState>>,
        jkt: Option<&Jkt>,
        keys: &KeyRing,
        now: Timestamp,
    ) -> Family {
        Family {
            grant: self.interner.grant_for(&id, req.client, req.scope, jkt),
            id,
            secret: FamilySecret(secret.try_into().expect("16 bytes")),
            subject: SubjectName::new(req.subject),
            created: now,
            last_used: now,
            rotated_at: now,
            generation: if code.is_some() {
                Generation::CODE
            } else {
                Generation::FIRST
            },
            key: keys.active(),
            tag: [0; 16],
            tag_uid: KeyUid::NONE,
            grace_used: 0,
            rotation_ip: req.ip.map(|a| a.to_canonical()),
            revoked: None,
            code,
            lsn: 0,
        }
    }

    pub(super) fn start_family(
        &self,
        req: &IssueRequest<'_>,
        policy: &ClientPolicy,
        version: PolicyVersion,
        code: Option<Box<CodeState>>,
        jkt: Option<Jkt>,
        now: Timestamp,
    ) -> Result<Decision, Error> {
        #[cfg(feature = "redis")]
        if let Some(sh) = &self.shared {
            return super::shared::block_on(
                self.shared_start(sh, req, policy, version, code, jkt, now),
            );
        }
        let keys = self.keys.load();
        let (kind, token_kind, generation) = match code {
            Some(_) => (AcceptKind::CodeIssued, TokenKind::Code, Generation::CODE),
            None => (AcceptKind::Issued, TokenKind::Refresh, Generation::FIRST),
        };
        let cap = policy.max_families_per_subject;
        // Drawn before anything changes, so a failing CSPRNG refuses the
        // family with nothing evicted.
        let mut rnd = [0u8; 28];
        crate::random::fill(&mut rnd)?;
        let (random, secret) = rnd.split_at(12);
        let random: [u8; 12] = random.try_into().expect("12 bytes");
        // The random part picks the shard (and the grant's stripe); the id
        // then names the free slot it takes there, so it cannot collide.
        let placed = FamilyId::new(0, random);
        let mut f = self.fresh_family(placed, secret, req, code, jkt.as_ref(), &keys, now);
        let (grant, subject) = (f.grant.clone(), f.subject.clone());
        let (evicted, mut created) = {
            let mut subjects = self.subjects.lock(req.subject);
            let evicted = match cap {
                0 => Vec::new(),
                cap => self.revoke_in_subject(
                    &mut subjects,
                    req.subject,
                    Some(req.client),
                    RevokeReason::CapEviction,
                    now,
                    |live| oldest_over_cap(live, cap),
                ),
            };
            // A failed eviction write refuses the new family too: the
            // engine fails closed (README "Durability").
            let created = match evicted.iter().find_map(Revocation::error) {
                Some(e) => Err(e.clone()),
                None => (|| -> Result<_, Error> {
                    let mut shard = self.table.lock(&placed);
                    f.id = FamilyId::new(shard.vacant_slot(), random);
                    let tag = keys
                        .tag(token_kind, f.key, &f.id, generation, &f.secret)
                        .expect("the active key is always in the ring");
                    if token_kind == TokenKind::Refresh {
                        cache_tag(&mut f, &keys, tag);
                    }
                    let (id, secret) = (f.id, f.secret);
                    let lsn = self.persist(&mut f)?;
                    let (slot, collapse) = shard.insert(f);
                    shard.outcomes[outcome_slot(Verdict::Accept(kind))] += 1;
                    let loc = self.table.loc(&id, slot);
                    drop(shard);
                    subjects.push(loc);
                    Ok((id, tag, secret, collapse, lsn))
                })(),
            };
            (evicted, created)
        };
        if let Ok((_, _, _, collapse, _)) = &mut created
            && let Some(collapse) = collapse.take()
        {
            // Milliseconds of kernel work, so with no lock held (see `huge`).
            collapse.run();
        }
        let evicted = self.finish_all(evicted, req.ip, version, now, |w| {
            self.emit(
                EventKind::CapEviction { cap },
                Some(w),
                req.ip,
                version,
                now,
            )
        });
        let (id, tag, secret, _, lsn) = created?;
        let wait_lsn = lsn.max(evicted?);
        self.settle(wait_lsn)?;
        let token = token::assemble(token_kind, keys.active(), &id, generation, &tag);
        Ok(Decision::Accept(Accepted::of(
            token, id, generation, kind, version, &grant, &subject, secret,
        )))
    }

    /// Issue an authorization code (`rgc_…`, generation 0 of a new family)
    /// after the embedding server's login and consent. The client's `pkce`
    /// policy is enforced here already: with `s256`, a missing challenge or
    /// method `plain` is refused (`invalid_request`-class denials).
    pub fn authorize(&self, req: &AuthorizeRequest<'_>) -> Result<Decision, Error> {
        self.at(self.now()).authorize(req)
    }

    /// [`authorize`](Self::authorize) at `now`; see [`At`](super::At).
    pub(super) fn authorize_at(
        &self,
        req: &AuthorizeRequest<'_>,
        now: Timestamp,
    ) -> Result<Decision, Error> {
        check_identity(req.client, req.subject, req.scope)?;
        if req.redirect_uri.is_empty() || req.redirect_uri.len() > MAX_REDIRECT_URI_LEN {
            return Err(Error::InvalidArgument {
                name: "redirect_uri",
                expected: "1 to 2048 bytes",
            });
        }
        let policies = self.policies.load();
        if let Some(refused) = self.refuse_unlisted(&policies, req.client) {
            return Ok(refused);
        }
        let version = policies.version();
        let policy = policies.policy(req.client);
        let challenge =
            match code::challenge_for(policy, req.code_challenge, req.code_challenge_method) {
                Ok(c) => c,
                Err(reason) => return Ok(deny(reason, None, version)),
            };
        let state = Box::new(CodeState::new(now, req.redirect_uri, challenge));
        let issue = IssueRequest {
            client: req.client,
            subject: req.subject,
            scope: req.scope,
            ip: req.ip,
        };
        // RFC 9449 §10: a code requested with `dpop_jkt` is bound to that
        // key from birth, whatever the client's `dpop` knob: the client
        // asked for the binding, and the exchange must then present a
        // proof from the key (see `Engine::exchange`).
        self.start_family(&issue, policy, version, Some(state), req.dpop_jkt, now)
    }
}

fn check_identity(client: &str, subject: &str, scope: &str) -> Result<(), Error> {
    check_len("client", client, crate::policy::MAX_CLIENT_ID_LEN)?;
    check_len("subject", subject, MAX_SUBJECT_LEN)?;
    if scope.len() > MAX_SCOPE_LEN {
        return Err(Error::InvalidArgument {
            name: "scope",
            expected: "at most 4096 bytes",
        });
    }
    Ok(())
}

fn check_len(name: &'static str, v: &str, max: usize) -> Result<(), Error> {
    if v.is_empty() || v.len() > max {
        return Err(Error::InvalidArgument {
            name,
            expected: match name {
                "client" => "1 to 255 bytes",
                _ => "1 to 1024 bytes",
            },
        });
    }
    Ok(())
}

/// Narrow a subject's live families of one client, listed as (created, id,
/// location), to the oldest that must go for one more to fit under `cap`
/// (README "Policy knobs", `max_families_per_subject`).
fn oldest_over_cap(live: &mut Vec<(Timestamp, FamilyId, Loc)>, cap: u32) {
    let cap = cap as usize;
    if live.len() < cap {
        live.clear();
        return;
    }
    live.sort();
    let excess = live.len() + 1 - cap;
    live.truncate(excess);
}
