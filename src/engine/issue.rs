//! Starting families: direct issue and authorization codes, with the subject cap.

use std::sync::Arc;

use crate::clock::Timestamp;
use crate::code::{self, CodeState, MAX_REDIRECT_URI_LEN};
use crate::decision::{AcceptKind, Accepted, Decision, DenyReason, Verdict};
use crate::error::Error;
use crate::event::{Event, EventKind};
use crate::family::{Family, RevokeReason, SubjectName};
use crate::policy::{ClientPolicy, PolicyVersion};
use crate::table::{Loc, SubjectEntries};
use crate::token::{self, FamilyId, FamilySecret, Generation, KeyUid, TokenKind};

use super::stats::outcome_slot;
use super::{
    AuthorizeRequest, Engine, IssueRequest, MAX_SCOPE_LEN, MAX_SUBJECT_LEN, Who, cache_tag, deny,
};

impl Engine {
    /// Start a family: the first refresh token (generation 1).
    pub fn issue(&self, req: &IssueRequest<'_>) -> Result<Decision, Error> {
        self.issue_at(req, self.clock.now())
    }

    /// [`issue`](Self::issue) at a given time.
    pub fn issue_at(&self, req: &IssueRequest<'_>, now: Timestamp) -> Result<Decision, Error> {
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
        self.start_family(req, policy, version, None, now)
    }

    /// Create a family at generation 1 (a direct issue) or 0 (an
    /// authorization code carrying `code`), applying the subject cap, and
    /// return its first token.
    pub(super) fn start_family(
        &self,
        req: &IssueRequest<'_>,
        policy: &ClientPolicy,
        version: PolicyVersion,
        code: Option<Box<CodeState>>,
        now: Timestamp,
    ) -> Result<Decision, Error> {
        let keys = self.keys.load();
        let (kind, token_kind, generation) = match code {
            Some(_) => (AcceptKind::CodeIssued, TokenKind::Code, Generation::CODE),
            None => (AcceptKind::Issued, TokenKind::Refresh, Generation::FIRST),
        };
        let cap = policy.max_families_per_subject;
        let mut evicted = Vec::new();
        let mut wait_lsn = 0;
        let mut f = Family {
            id: FamilyId::from_bytes([0; 16]),
            secret: FamilySecret([0; 16]),
            grant: self.interner.grant(req.client, req.scope),
            subject: SubjectName::new(req.subject),
            created: now,
            last_used: now,
            rotated_at: now,
            generation,
            key: keys.active(),
            tag: [0; 16],
            tag_uid: KeyUid::NONE,
            grace_used: 0,
            rotation_ip: req.ip.map(|a| a.to_canonical()),
            revoked: None,
            code,
            lsn: 0,
        };
        let (id, tag, collapse) = {
            let mut subjects = self.subjects.lock(req.subject);
            if cap > 0 {
                wait_lsn = self.evict_over_cap(
                    &mut subjects,
                    req.subject,
                    f.client(),
                    cap,
                    now,
                    &mut evicted,
                )?;
            }
            let (id, tag, loc, collapse) = {
                let mut rnd = [0u8; 28];
                crate::random::fill(&mut rnd)?;
                let (random, secret) = rnd.split_at(12);
                let random: [u8; 12] = random.try_into().expect("12 bytes");
                f.secret = FamilySecret(secret.try_into().expect("16 bytes"));
                // The random part picks the shard; the id then names the
                // free slot it takes there, so it cannot collide.
                let mut shard = self.table.lock(&FamilyId::new(0, random));
                f.id = FamilyId::new(shard.vacant_slot(), random);
                let tag = keys
                    .tag(token_kind, f.key, &f.id, generation, &f.secret)
                    .expect("the active key is always in the ring");
                if token_kind == TokenKind::Refresh {
                    cache_tag(&mut f, &keys, tag);
                }
                let id = f.id;
                wait_lsn = wait_lsn.max(self.persist(&mut f)?);
                let (slot, collapse) = shard.insert(f);
                shard.outcomes[outcome_slot(Verdict::Accept(kind))] += 1;
                (id, tag, self.table.loc(&id, slot), collapse)
            };
            subjects.push(loc);
            (id, tag, collapse)
        };
        // Milliseconds of kernel work, so with no lock held (see `huge`).
        if let Some(c) = collapse {
            c.run();
        }
        for w in &evicted {
            self.emit(
                EventKind::CapEviction { cap },
                Some(w),
                req.ip,
                version,
                now,
            );
            self.emit(
                EventKind::FamilyRevoked {
                    reason: RevokeReason::CapEviction,
                },
                Some(w),
                req.ip,
                version,
                now,
            );
        }
        self.settle(wait_lsn)?;
        let token = token::assemble(token_kind, keys.active(), &id, generation, &tag);
        Ok(Decision::Accept(Accepted {
            token,
            family: id,
            generation,
            kind,
            policy_version: version,
        }))
    }

    /// Issue an authorization code (`rgc_…`, generation 0 of a new family)
    /// after the embedding server's login and consent. The client's `pkce`
    /// policy is enforced here already: with `s256`, a missing challenge or
    /// method `plain` is refused (`invalid_request`-class denials).
    pub fn authorize(&self, req: &AuthorizeRequest<'_>) -> Result<Decision, Error> {
        self.authorize_at(req, self.clock.now())
    }

    /// [`authorize`](Self::authorize) at a given time.
    pub fn authorize_at(
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
        self.start_family(&issue, policy, version, Some(state), now)
    }

    /// Revoke the oldest families of `client` in `subject`'s `entries` until
    /// one more fits under `cap`.
    pub(super) fn evict_over_cap(
        &self,
        entries: &mut SubjectEntries<'_>,
        subject: &str,
        client: &Arc<str>,
        cap: u32,
        now: Timestamp,
        evicted: &mut Vec<Who>,
    ) -> Result<u64, Error> {
        let mut mine: Vec<(Timestamp, FamilyId, Loc)> = Vec::new();
        for loc in entries.candidates() {
            let (shard, slot) = self.table.lock_loc(loc);
            match shard.at(slot) {
                Some(f)
                    if f.is_active() && f.subject.as_str() == subject && f.client() == client =>
                {
                    mine.push((f.created, f.id, loc));
                }
                // Another client's or subject's, or an entry whose family
                // left and whose removal is pending: not this walk's to
                // remove.
                _ => {}
            }
        }
        let cap = cap as usize;
        let mut lsn = 0;
        if mine.len() < cap {
            return Ok(lsn);
        }
        mine.sort();
        let excess = mine.len() + 1 - cap;
        for (_, id, loc) in mine.into_iter().take(excess) {
            // The same family, still this subject's and client's: a restore
            // may have replaced the record since it was listed.
            let (mut shard, slot) = self.table.lock_loc(loc);
            if let Some(f) = shard.at_mut(slot)
                && f.id == id
                && f.subject.as_str() == subject
                && f.client() == client
                && f.revoke(RevokeReason::CapEviction, now)
            {
                let persisted = self.persist(f);
                evicted.push(Who::of(f, loc));
                drop(shard);
                // Revoked by this call, so its entry is this call's, even if
                // the store failed.
                entries.remove(loc);
                lsn = lsn.max(persisted?);
            }
        }
        Ok(lsn)
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
