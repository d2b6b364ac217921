//! The reference model: the order of checks and the policies of the README
//! and docs/design.md ("The refresh decision", "Authorization codes"), in
//! plain data.

use super::*;

/// RFC 7636 §4.1: 43 to 128 characters of `[A-Za-z0-9-._~]`.
pub(crate) fn is_verifier(v: &str) -> bool {
    (43..=128).contains(&v.len()) && v.bytes().all(|b| VERIFIER_CHARS.contains(&b))
}

/// An S256 challenge is BASE64URL (no padding) of 32 bytes: 43 characters
/// of the alphabet, the last one carrying 4 bits and two zero bits (the
/// canonical encoding; anything else does not decode to 32 bytes).
pub(crate) fn is_s256_challenge(c: &str) -> bool {
    let b = c.as_bytes();
    b.len() == 43
        && b.iter().all(|x| BASE64URL.contains(x))
        && BASE64URL
            .iter()
            .position(|x| *x == b[42])
            .is_some_and(|i| i % 4 == 0)
}

/// BASE64URL(SHA-256(verifier)), RFC 7636 §4.2.
pub(crate) fn s256_of(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// The challenge a code was issued with, as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum MChallenge {
    S256(String),
    Plain(String),
}

/// What a code is checked against, at its exchange and at replays.
#[derive(Clone, Debug)]
pub(crate) struct MCode {
    pub(crate) challenge: Option<MChallenge>,
    pub(crate) redirect: usize,
    /// When it was issued: its lifetime counts from here.
    pub(crate) issued: u64,
}

/// The authorize-time PKCE rules: `s256` refuses a missing challenge and
/// `plain`; an absent method means `plain` (RFC 7636 §4.3); a method without
/// a challenge, or a challenge of the wrong shape, is malformed.
pub(crate) fn authorize_pkce(
    pkce: Pkce,
    challenge: Option<&str>,
    method: Option<&str>,
) -> Result<Option<MChallenge>, DenyReason> {
    let Some(c) = challenge else {
        if method.is_some() {
            return Err(DenyReason::PkceChallengeInvalid);
        }
        return match pkce {
            Pkce::Optional => Ok(None),
            Pkce::S256 | Pkce::S256OrPlain => Err(DenyReason::PkceRequired),
        };
    };
    match method.unwrap_or("plain") {
        "S256" if is_s256_challenge(c) => Ok(Some(MChallenge::S256(c.to_owned()))),
        "S256" => Err(DenyReason::PkceChallengeInvalid),
        "plain" if pkce == Pkce::S256 => Err(DenyReason::PkceMethodNotAllowed),
        "plain" if is_verifier(c) => Ok(Some(MChallenge::Plain(c.to_owned()))),
        "plain" => Err(DenyReason::PkceChallengeInvalid),
        _ => Err(DenyReason::PkceMethodNotAllowed),
    }
}

/// The exchange-time PKCE rules under the policy in force then: a code
/// issued with a challenge always needs a well-formed, matching verifier; a
/// code without one passes only under `optional`, and never with a verifier
/// (a downgrade, RFC 9700 §2.1.1); a `plain` code no longer passes once the
/// policy is `s256`.
pub(crate) fn exchange_pkce(
    challenge: Option<&MChallenge>,
    verifier: Option<&str>,
    pkce: Pkce,
) -> Result<(), DenyReason> {
    match (challenge, verifier) {
        (None, None) if pkce == Pkce::Optional => Ok(()),
        (None, None) | (Some(_), None) => Err(DenyReason::PkceRequired),
        (None, Some(_)) => Err(DenyReason::PkceVerifierUnexpected),
        (Some(_), Some(v)) if !is_verifier(v) => Err(DenyReason::PkceVerifierInvalid),
        (Some(MChallenge::S256(c)), Some(v)) if s256_of(v) == *c => Ok(()),
        (Some(MChallenge::Plain(_)), Some(_)) if pkce == Pkce::S256 => {
            Err(DenyReason::PkceMethodNotAllowed)
        }
        (Some(MChallenge::Plain(c)), Some(v)) if c == v => Ok(()),
        (Some(_), Some(_)) => Err(DenyReason::PkceMismatch),
    }
}

/// One family as the model sees it.
#[derive(Clone, Debug)]
pub(crate) struct MFamily {
    pub(crate) client: usize,
    pub(crate) subject: usize,
    pub(crate) created: u64,
    pub(crate) last_used: u64,
    /// When the current generation was minted (issuance counts).
    pub(crate) rotated_at: u64,
    /// The IP of the last rotation (or of issuance).
    pub(crate) rotation_ip: usize,
    pub(crate) current: u32,
    /// Grace replays served since the last rotation.
    pub(crate) grace_used: u8,
    pub(crate) revoked: Option<(RevokeReason, u64)>,
    /// Removed by a sweep: its tokens name an unknown family.
    pub(crate) swept: bool,
    /// An authorization code not yet exchanged: the family is at generation
    /// 0 and has no refresh token.
    pub(crate) code: Option<MCode>,
    /// The code the family was born from, once exchanged: what a replay is
    /// judged against. The model keeps it for good; the engine drops it once
    /// no replay can pass, which changes no decision.
    pub(crate) spent: Option<MCode>,
}

impl MFamily {
    /// In the table and not revoked (possibly expired).
    pub(crate) fn live(&self) -> bool {
        !self.swept && self.revoked.is_none()
    }
}

/// What a redemption or issuance should return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Expect {
    /// Accepted; `generation` is the returned token's. `Rotated` and
    /// `Issued` mean a fresh token, `Kept` and `GraceReplay` the one already
    /// handed out for `generation`.
    Accept {
        kind: AcceptKind,
        generation: u32,
    },
    Deny(DenyReason),
}

#[derive(Clone, Debug)]
pub(crate) struct Model {
    pub(crate) now: u64,
    pub(crate) set: SetSpec,
    pub(crate) families: Vec<MFamily>,
}

impl Model {
    pub(crate) fn new(set: SetSpec) -> Model {
        Model {
            now: START_MS,
            set,
            families: Vec::new(),
        }
    }

    pub(crate) fn policy_of(&self, fam: usize) -> &PolicySpec {
        self.set.policy(self.families[fam].client)
    }

    /// Step 5's lifetimes under the policy in force now: the absolute one
    /// first, then idle. A lifetime that ends at `t` is over at `t`.
    pub(crate) fn expiry(&self, fam: usize) -> Option<DenyReason> {
        let f = &self.families[fam];
        let p = self.policy_of(fam);
        if p.absolute_ms()
            .is_some_and(|ttl| self.now >= f.created + ttl)
        {
            return Some(DenyReason::ExpiredAbsolute);
        }
        if p.idle_ms().is_some_and(|ttl| self.now >= f.last_used + ttl) {
            return Some(DenyReason::ExpiredIdle);
        }
        None
    }

    /// Start a family at generation 1; the allow-list applies at issuance in
    /// both `ip_check` modes.
    pub(crate) fn issue(&mut self, client: usize, subject: usize, ip: usize) -> Expect {
        if !self.set.policy(client).allows(ip) {
            return Expect::Deny(DenyReason::IpNotAllowed);
        }
        self.families.push(MFamily {
            client,
            subject,
            created: self.now,
            last_used: self.now,
            rotated_at: self.now,
            rotation_ip: ip,
            current: 1,
            grace_used: 0,
            revoked: None,
            swept: false,
            code: None,
            spent: None,
        });
        Expect::Accept {
            kind: AcceptKind::Issued,
            generation: 1,
        }
    }

    /// Start a family at generation 0: an authorization code bound to the
    /// challenge and redirect URI. The address is only recorded.
    pub(crate) fn authorize(
        &mut self,
        client: usize,
        subject: usize,
        challenge: Option<&str>,
        method: Option<&str>,
        redirect: usize,
        ip: usize,
    ) -> Expect {
        let pkce = self.set.policy(client).pkce;
        let challenge = match authorize_pkce(pkce, challenge, method) {
            Ok(c) => c,
            Err(reason) => return Expect::Deny(reason),
        };
        self.families.push(MFamily {
            client,
            subject,
            created: self.now,
            last_used: self.now,
            rotated_at: self.now,
            rotation_ip: ip,
            current: 0,
            grace_used: 0,
            revoked: None,
            swept: false,
            code: Some(MCode {
                challenge,
                redirect,
                issued: self.now,
            }),
            spent: None,
        });
        Expect::Accept {
            kind: AcceptKind::CodeIssued,
            generation: 0,
        }
    }

    /// Whether a code's lifetime is over under the policy in force.
    pub(crate) fn code_expired(&self, code: &MCode, fam: usize) -> bool {
        self.now >= code.issued + self.policy_of(fam).code_ttl_ms
    }

    /// Exchange the genuine code of `fam`. Returns the outcome and whether
    /// it revoked the family (a replay of an exchanged code).
    pub(crate) fn exchange(
        &mut self,
        fam: usize,
        client: &str,
        redirect: usize,
        verifier: Option<&str>,
        ip: usize,
    ) -> (Expect, bool) {
        let now = self.now;
        let p = *self.policy_of(fam);
        let f = &self.families[fam];
        let expired = f
            .code
            .as_ref()
            .or(f.spent.as_ref())
            .is_some_and(|c| self.code_expired(c, fam));
        let f = &mut self.families[fam];
        if f.swept {
            return (Expect::Deny(DenyReason::InvalidToken), false);
        }
        if CLIENTS[f.client] != client {
            return (Expect::Deny(DenyReason::ClientMismatch), false);
        }
        if f.revoked.is_some() {
            return (Expect::Deny(DenyReason::Revoked), false);
        }
        let Some(code) = &f.code else {
            // Exchanged before (RFC 6749 §4.1.2): the family born from the
            // code is revoked, whatever its state otherwise, if the replay
            // passes the exchange's checks but the allow-list; else a plain
            // denial, whichever check failed.
            let spent = f.spent.as_ref().expect("a family born from a code");
            let proven = spent.redirect == redirect
                && !expired
                && exchange_pkce(spent.challenge.as_ref(), verifier, p.pkce).is_ok();
            if !proven {
                return (Expect::Deny(DenyReason::CodeSpent), false);
            }
            f.revoked = Some((RevokeReason::CodeReplay, now));
            return (Expect::Deny(DenyReason::CodeReused), true);
        };
        if code.redirect != redirect {
            return (Expect::Deny(DenyReason::RedirectUriMismatch), false);
        }
        if expired {
            return (Expect::Deny(DenyReason::CodeExpired), false);
        }
        if let Err(reason) = exchange_pkce(code.challenge.as_ref(), verifier, p.pkce) {
            return (Expect::Deny(reason), false);
        }
        // The exchange is where the family is issued: the allow-list applies
        // in both `ip_check` modes.
        if !p.allows(ip) {
            return (Expect::Deny(DenyReason::IpNotAllowed), false);
        }
        f.spent = f.code.take();
        f.current = 1;
        f.created = now;
        f.last_used = now;
        f.rotated_at = now;
        f.rotation_ip = ip;
        f.grace_used = 0;
        let expect = Expect::Accept {
            kind: AcceptKind::Exchanged,
            generation: 1,
        };
        (expect, false)
    }

    /// Redeem a genuine token of `fam` at `generation`, presented by
    /// `client` from `ip`. Returns the expected outcome and the families
    /// this redemption revoked (in order).
    pub(crate) fn redeem(
        &mut self,
        fam: usize,
        generation: u32,
        client: &str,
        ip: usize,
    ) -> (Expect, Vec<usize>) {
        let now = self.now;
        let f = &self.families[fam];
        // 2. Unknown family (swept).
        if f.swept {
            return (Expect::Deny(DenyReason::InvalidToken), vec![]);
        }
        // 4. Client binding.
        if CLIENTS[f.client] != client {
            return (Expect::Deny(DenyReason::ClientMismatch), vec![]);
        }
        // 5. Revoked, absolute, idle.
        if f.revoked.is_some() {
            return (Expect::Deny(DenyReason::Revoked), vec![]);
        }
        if let Some(reason) = self.expiry(fam) {
            return (Expect::Deny(reason), vec![]);
        }
        let p = *self.policy_of(fam);
        let f = &mut self.families[fam];
        let c = f.current;
        // 6. Classify the generation.
        if generation > c {
            return (Expect::Deny(DenyReason::StateRollback), vec![]);
        }
        if generation < c {
            let grace = generation + 1 == c
                && c >= 2
                && now < f.rotated_at + p.grace_ms()
                && f.grace_used < p.grace_max_replays
                && (!p.grace_same_ip || same_ip(f.rotation_ip, ip));
            if grace {
                // A grace replay is a redemption, so the allow-list guards
                // it (README "The order of checks", step 6): from outside,
                // `ip_not_allowed` with no revocation and no change.
                if p.every_refresh && !p.allows(ip) {
                    return (Expect::Deny(DenyReason::IpNotAllowed), vec![]);
                }
                // A retry of the rotation: the same successor, no new
                // generation; it counts as a use of the family.
                f.grace_used += 1;
                f.last_used = now;
                let expect = Expect::Accept {
                    kind: AcceptKind::GraceReplay,
                    generation: c,
                };
                return (expect, vec![]);
            }
            let (client, subject) = (f.client, f.subject);
            let mut revoked = Vec::new();
            if p.on_reuse != OnReuse::ReportOnly {
                self.families[fam].revoked = Some((RevokeReason::ReuseDetected, now));
                revoked.push(fam);
            }
            let reach = |g: &MFamily| match p.on_reuse {
                OnReuse::RevokeSubjectClient => g.subject == subject && g.client == client,
                OnReuse::RevokeSubject => g.subject == subject,
                OnReuse::RevokeFamily | OnReuse::ReportOnly => false,
            };
            for (i, g) in self.families.iter_mut().enumerate() {
                if g.live() && reach(g) {
                    g.revoked = Some((RevokeReason::SubjectReuse, now));
                    revoked.push(i);
                }
            }
            return (Expect::Deny(DenyReason::ReuseDetected), revoked);
        }
        // 7. Allow-list on every refresh.
        if p.every_refresh && !p.allows(ip) {
            return (Expect::Deny(DenyReason::IpNotAllowed), vec![]);
        }
        // 8. Accept.
        f.last_used = now;
        if p.rotate {
            f.current += 1;
            f.rotated_at = now;
            f.rotation_ip = ip;
            f.grace_used = 0;
            let expect = Expect::Accept {
                kind: AcceptKind::Rotated,
                generation: f.current,
            };
            (expect, vec![])
        } else {
            let expect = Expect::Accept {
                kind: AcceptKind::Kept,
                generation: c,
            };
            (expect, vec![])
        }
    }

    pub(crate) fn revoke_all(
        &mut self,
        pick: impl Fn(&MFamily) -> bool,
        why: RevokeReason,
    ) -> Vec<usize> {
        let now = self.now;
        let mut out = Vec::new();
        for (i, f) in self.families.iter_mut().enumerate() {
            if f.live() && pick(f) {
                f.revoked = Some((why, now));
                out.push(i);
            }
        }
        out
    }

    /// RFC 7009 revocation with a genuine token (any generation): revokes
    /// the family unless it is gone, already revoked, or `client` is given
    /// and is not the family's.
    pub(crate) fn revoke_token(&mut self, fam: usize, client: Option<&str>) -> bool {
        let f = &self.families[fam];
        if !f.live() || client.is_some_and(|c| c != CLIENTS[f.client]) {
            return false;
        }
        self.families[fam].revoked = Some((RevokeReason::Requested, self.now));
        true
    }

    pub(crate) fn revoke_family(&mut self, fam: usize) -> bool {
        self.revoke_token(fam, None)
    }

    pub(crate) fn revoke_subject(&mut self, subject: usize, client: Option<usize>) -> Vec<usize> {
        self.revoke_all(
            |f| f.subject == subject && client.is_none_or(|c| f.client == c),
            RevokeReason::SubjectRevoked,
        )
    }

    pub(crate) fn revoke_client(&mut self, client: usize) -> Vec<usize> {
        self.revoke_all(|f| f.client == client, RevokeReason::ClientRevoked)
    }

    /// Whether a sweep now may remove `fam`: active and expired under the
    /// policy in force (an unused code after `code_ttl`), or revoked longer
    /// than the retention ago.
    pub(crate) fn sweepable(&self, fam: usize) -> bool {
        let f = &self.families[fam];
        match f.revoked {
            _ if f.swept => false,
            Some((_, at)) => self.now >= at + RETENTION_MS,
            None => match &f.code {
                Some(code) => self.code_expired(code, fam),
                None => self.expiry(fam).is_some(),
            },
        }
    }

    pub(crate) fn in_table(&self) -> usize {
        self.families.iter().filter(|f| !f.swept).count()
    }
}
