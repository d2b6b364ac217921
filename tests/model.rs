//! Model-based property test: random sequences of operations run against a
//! real [`Engine`] and against a plain reference model written from DESIGN §3
//! (the order of checks) and §4 (policies evaluated at redemption time, keyed
//! by the family's client). Every decision, revocation count, sweep result,
//! event and introspection must agree with the model.
//!
//! Families are born two ways: issued directly (generation 1), or as an
//! authorization code (generation 0) that an exchange turns into generation
//! 1 (issue 4). The model holds the PKCE rules of RFC 7636 as the crate
//! documents them (challenge checked at authorize, then at the exchange in
//! the order client, revoked, already exchanged, redirect URI, code TTL,
//! PKCE, allow-list), code replay (RFC 6749 §4.1.2: the family born from
//! the code is revoked only by a replay that passes the redirect URI, code
//! TTL and PKCE checks under the policy in force; any other replay is a
//! plain `code_spent` denial), and the sweeping of unused codes.
//!
//! A family's record can be backed up and restored (`Engine::family_record`,
//! `Engine::restore_family`): the family is then as it was at the backup,
//! and tokens minted since are newer than it, denied `state_rollback` with
//! an event (README "The order of checks", `g > c`).
//!
//! The file has five sections: fixtures, the reference model, the strategy,
//! the check loop, and the tests.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{
    Config, FileFailurePersistence, TestCaseError, TestCaseResult, TestError, TestRunner,
};
use refresh_guard::RedeemRequest;
use refresh_guard::{
    AcceptKind, AuthorizeRequest, Decision, DenyReason, Engine, EventKind, ExchangeRequest,
    FamilyId, FamilyRecord, Generation, Introspection, IpCheck, IpRange, IssueRequest, ManualClock,
    MemorySink, OnReuse, Pkce, PolicyOverrides, PolicySet, PolicyVersion, RevokeReason, Rotation,
    Status, TOKEN_LEN, Timestamp,
};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

const CLIENTS: [&str; 3] = ["app-a", "app-b", "app-c"];
/// A client that owns no family: presenting anything with it is a mismatch.
const INTRUDER: &str = "intruder";
const SUBJECTS: [&str; 3] = ["alice", "bob", "carol"];
const SCOPE: &str = "openid offline_access";

/// Test addresses, and whether [`ALLOWLIST`] admits each. The last is the
/// first written IPv4-mapped: the same client IP in another spelling.
const IPS: [(&str, bool); 9] = [
    ("10.0.0.1", true),
    ("10.20.30.40", true),
    ("192.0.2.15", true),
    ("2001:db8::7", true),
    ("::ffff:10.9.9.9", true),
    ("203.0.113.7", false),
    ("192.0.2.21", false),
    ("2001:db9::1", false),
    ("::ffff:10.0.0.1", true),
];
/// The restricted allow-list some policies carry.
const ALLOWLIST: [&str; 3] = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.10-192.0.2.20"];

const START_MS: u64 = 1_700_000_000_000;
const GRACE_MS: u64 = 10_000;
const IDLE_MS: u64 = 3_600_000;
const ABSOLUTE_MS: u64 = 86_400_000;
/// The engine's `revoked_retention`, set explicitly so sweeps are exact.
const RETENTION_MS: u64 = 2 * 3_600_000;
/// Few shards, so that [`FULL_SWEEP`] covers the whole table cheaply.
const SHARDS: usize = 4;
/// A sweep budget larger than every slot of every shard a case can create
/// (at most one slot per family ever issued, plus one per empty shard).
const FULL_SWEEP: usize = 4096;
const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
/// RFC 7636 §4.1: the characters of a code verifier.
const VERIFIER_CHARS: &[u8; 66] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~";
/// RFC 7636 Appendix B.
const RFC7636_VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const RFC7636_CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
/// Redirect URIs a code can be bound to. The last differs from the first
/// only by a trailing slash: RFC 6749 §4.1.3 wants the identical string.
const REDIRECTS: [&str; 3] = [
    "https://app.example/cb",
    "com.example.app:/oauth2redirect",
    "https://app.example/cb/",
];
/// Code TTLs the policies pick from besides random ones (≤ 10 min).
const CODE_TTLS: [u64; 5] = [1_000, 5_000, 10_000, 60_000, 600_000];

fn ip_addr(ip: usize) -> IpAddr {
    IPS[ip].0.parse().expect("test IPs parse")
}

/// Whether two test addresses are the same IP (an IPv4-mapped IPv6
/// address is its IPv4 address, as the allow-list treats it).
fn same_ip(a: usize, b: usize) -> bool {
    ip_addr(a).to_canonical() == ip_addr(b).to_canonical()
}

fn ts(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms)
}

/// The knobs the model varies for one client (everything else is default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PolicySpec {
    rotate: bool,
    /// Grace period 10 s, else 0 s.
    grace: bool,
    grace_max_replays: u8,
    grace_same_ip: bool,
    on_reuse: OnReuse,
    /// Idle TTL 1 h, else none.
    idle: bool,
    /// Absolute TTL 1 d, else none.
    absolute: bool,
    /// [`ALLOWLIST`], else any address.
    restricted: bool,
    every_refresh: bool,
    pkce: Pkce,
    /// `code_ttl`, 1 ms ..= 10 min.
    code_ttl_ms: u64,
}

impl PolicySpec {
    fn grace_ms(&self) -> u64 {
        if self.grace { GRACE_MS } else { 0 }
    }

    fn idle_ms(&self) -> Option<u64> {
        self.idle.then_some(IDLE_MS)
    }

    fn absolute_ms(&self) -> Option<u64> {
        self.absolute.then_some(ABSOLUTE_MS)
    }

    fn allows(&self, ip: usize) -> bool {
        !self.restricted || IPS[ip].1
    }

    fn overrides(&self) -> PolicyOverrides {
        let allowlist: Vec<IpRange> = if self.restricted {
            ALLOWLIST
                .iter()
                .map(|e| e.parse().expect("entry"))
                .collect()
        } else {
            Vec::new()
        };
        PolicyOverrides::new()
            .rotation(if self.rotate {
                Rotation::Rotate
            } else {
                Rotation::Reuse
            })
            .grace_period(Duration::from_millis(self.grace_ms()))
            .grace_max_replays(self.grace_max_replays)
            .grace_same_ip(self.grace_same_ip)
            .on_reuse(self.on_reuse)
            .idle_ttl(self.idle_ms().map(Duration::from_millis))
            .absolute_ttl(self.absolute_ms().map(Duration::from_millis))
            .ip_allowlist(allowlist)
            .ip_check(if self.every_refresh {
                IpCheck::EveryRefresh
            } else {
                IpCheck::IssuanceOnly
            })
            .pkce(self.pkce)
            .code_ttl(Duration::from_millis(self.code_ttl_ms))
    }
}

/// A policy set: defaults plus an optional own policy per client.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SetSpec {
    defaults: PolicySpec,
    clients: [Option<PolicySpec>; 3],
}

impl SetSpec {
    fn policy(&self, client: usize) -> &PolicySpec {
        self.clients[client].as_ref().unwrap_or(&self.defaults)
    }

    fn build(&self) -> PolicySet {
        let mut b = PolicySet::builder().defaults(self.defaults.overrides());
        for (name, spec) in CLIENTS.iter().zip(&self.clients) {
            if let Some(spec) = spec {
                b = b.client(*name, spec.overrides());
            }
        }
        b.build().expect("test policy sets are valid")
    }
}

// ---------------------------------------------------------------------------
// Reference model (DESIGN §3 and §4, in plain data)
// ---------------------------------------------------------------------------

/// RFC 7636 §4.1: 43 to 128 characters of `[A-Za-z0-9-._~]`.
fn is_verifier(v: &str) -> bool {
    (43..=128).contains(&v.len()) && v.bytes().all(|b| VERIFIER_CHARS.contains(&b))
}

/// An S256 challenge is BASE64URL (no padding) of 32 bytes: 43 characters
/// of the alphabet, the last one carrying 4 bits and two zero bits (the
/// canonical encoding; anything else does not decode to 32 bytes).
fn is_s256_challenge(c: &str) -> bool {
    let b = c.as_bytes();
    b.len() == 43
        && b.iter().all(|x| BASE64URL.contains(x))
        && BASE64URL
            .iter()
            .position(|x| *x == b[42])
            .is_some_and(|i| i % 4 == 0)
}

/// BASE64URL(SHA-256(verifier)), RFC 7636 §4.2.
fn s256_of(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// The challenge a code was issued with, as text.
#[derive(Clone, Debug, PartialEq, Eq)]
enum MChallenge {
    S256(String),
    Plain(String),
}

/// What a code is checked against, at its exchange and at replays.
#[derive(Clone, Debug)]
struct MCode {
    challenge: Option<MChallenge>,
    redirect: usize,
    /// When it was issued: its lifetime counts from here.
    issued: u64,
}

/// The authorize-time PKCE rules: `s256` refuses a missing challenge and
/// `plain`; an absent method means `plain` (RFC 7636 §4.3); a method without
/// a challenge, or a challenge of the wrong shape, is malformed.
fn authorize_pkce(
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
fn exchange_pkce(
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
struct MFamily {
    client: usize,
    subject: usize,
    created: u64,
    last_used: u64,
    /// When the current generation was minted (issuance counts).
    rotated_at: u64,
    /// The IP of the last rotation (or of issuance).
    rotation_ip: usize,
    current: u32,
    /// Grace replays served since the last rotation.
    grace_used: u8,
    revoked: Option<(RevokeReason, u64)>,
    /// Removed by a sweep: its tokens name an unknown family.
    swept: bool,
    /// An authorization code not yet exchanged: the family is at generation
    /// 0 and has no refresh token.
    code: Option<MCode>,
    /// The code the family was born from, once exchanged: what a replay is
    /// judged against. The model keeps it for good; the engine drops it once
    /// no replay can pass, which changes no decision.
    spent: Option<MCode>,
}

impl MFamily {
    /// In the table and not revoked (possibly expired).
    fn live(&self) -> bool {
        !self.swept && self.revoked.is_none()
    }
}

/// What a redemption or issuance should return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
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
struct Model {
    now: u64,
    set: SetSpec,
    families: Vec<MFamily>,
}

impl Model {
    fn new(set: SetSpec) -> Model {
        Model {
            now: START_MS,
            set,
            families: Vec::new(),
        }
    }

    fn policy_of(&self, fam: usize) -> &PolicySpec {
        self.set.policy(self.families[fam].client)
    }

    /// Step 5's lifetimes under the policy in force now: the absolute one
    /// first, then idle. A lifetime that ends at `t` is over at `t`.
    fn expiry(&self, fam: usize) -> Option<DenyReason> {
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
    fn issue(&mut self, client: usize, subject: usize, ip: usize) -> Expect {
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
    fn authorize(
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
    fn code_expired(&self, code: &MCode, fam: usize) -> bool {
        self.now >= code.issued + self.policy_of(fam).code_ttl_ms
    }

    /// Exchange the genuine code of `fam`. Returns the outcome and whether
    /// it revoked the family (a replay of an exchanged code).
    fn exchange(
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
    fn redeem(
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

    fn revoke_all(&mut self, pick: impl Fn(&MFamily) -> bool, why: RevokeReason) -> Vec<usize> {
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
    fn revoke_token(&mut self, fam: usize, client: Option<&str>) -> bool {
        let f = &self.families[fam];
        if !f.live() || client.is_some_and(|c| c != CLIENTS[f.client]) {
            return false;
        }
        self.families[fam].revoked = Some((RevokeReason::Requested, self.now));
        true
    }

    fn revoke_family(&mut self, fam: usize) -> bool {
        self.revoke_token(fam, None)
    }

    fn revoke_subject(&mut self, subject: usize, client: Option<usize>) -> Vec<usize> {
        self.revoke_all(
            |f| f.subject == subject && client.is_none_or(|c| f.client == c),
            RevokeReason::SubjectRevoked,
        )
    }

    fn revoke_client(&mut self, client: usize) -> Vec<usize> {
        self.revoke_all(|f| f.client == client, RevokeReason::ClientRevoked)
    }

    /// Whether a sweep now may remove `fam`: active and expired under the
    /// policy in force (an unused code after `code_ttl`), or revoked longer
    /// than the retention ago.
    fn sweepable(&self, fam: usize) -> bool {
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

    fn in_table(&self) -> usize {
        self.families.iter().filter(|f| !f.swept).count()
    }
}

// ---------------------------------------------------------------------------
// Strategy
// ---------------------------------------------------------------------------

/// Which client presents a family's token.
#[derive(Clone, Debug)]
enum Who {
    Own,
    /// One of the two other clients, or [`INTRUDER`].
    Other(Index),
}

/// A generation to put into a reforged token.
#[derive(Clone, Debug)]
enum GenPick {
    /// The family's current generation + 1 (a "future" token).
    Next,
    /// The presented token's generation − 1.
    Prev,
    Fixed(u32),
}

/// A token that was never handed out.
#[derive(Clone, Debug)]
enum Forgery {
    /// One character of a real token changed (in the base64url alphabet
    /// after the prefix).
    Flip {
        fam: Index,
        generation: Index,
        pos: Index,
        to: Index,
    },
    Truncate {
        fam: Index,
        generation: Index,
        keep: Index,
    },
    Extend {
        fam: Index,
        generation: Index,
        ch: Index,
    },
    /// A real token's body under the other kind's prefix: a refresh
    /// token's as a code, or (forging from a code) a code's as a refresh
    /// token.
    CodePrefix {
        fam: Index,
        generation: Index,
    },
    /// A real token re-encoded with another generation and/or tag.
    Reforged {
        fam: Index,
        generation: Index,
        new_generation: GenPick,
        new_tag: Option<[u8; 16]>,
    },
    /// Well-formed, but of a random (unknown) family.
    UnknownFamily {
        real_key: bool,
        raw: Vec<u8>,
    },
    Garbage(String),
}

/// The `code_challenge` of an authorize request.
#[derive(Clone, Debug)]
enum ChallengeText {
    None,
    /// BASE64URL(SHA-256(verifier)); the client keeps the verifier.
    S256Of(String),
    /// The verifier itself; the client keeps it.
    Verbatim(String),
    /// Anything else; the client keeps no verifier.
    Raw(String),
}

/// The PKCE parameters of an authorize request.
#[derive(Clone, Debug)]
struct PkceSpec {
    challenge: ChallengeText,
    method: Option<&'static str>,
}

impl PkceSpec {
    /// The `code_challenge` sent, and the verifier the client holds.
    fn challenge_and_verifier(&self) -> (Option<String>, Option<String>) {
        match &self.challenge {
            ChallengeText::None => (None, None),
            ChallengeText::S256Of(v) => (Some(s256_of(v)), Some(v.clone())),
            ChallengeText::Verbatim(v) => (Some(v.clone()), Some(v.clone())),
            ChallengeText::Raw(c) => (Some(c.clone()), None),
        }
    }
}

/// The `code_verifier` of an exchange.
#[derive(Clone, Debug)]
enum VerifierPick {
    /// The one the client kept at authorize (none if it sent no challenge).
    Held,
    Missing,
    /// Another well-formed verifier.
    Other(String),
    /// Not 43–128 characters of `[A-Za-z0-9-._~]`.
    Malformed(String),
}

/// A genuine token presented as the other kind.
#[derive(Clone, Debug)]
enum Cross {
    /// A code redeemed (or revoked, RFC 7009) as a refresh token.
    CodeAsRefresh { fam: Index, via_revoke: bool },
    /// A refresh token exchanged as a code.
    RefreshAsCode { fam: Index, generation: Index },
}

#[derive(Clone, Debug)]
enum Op {
    Issue {
        client: usize,
        subject: usize,
        ip: usize,
    },
    Authorize {
        client: usize,
        subject: usize,
        pkce: PkceSpec,
        redirect: usize,
        ip: usize,
    },
    /// Exchange a code: one never exchanged successfully, or (`replay`) one
    /// that was.
    Exchange {
        fam: Index,
        replay: bool,
        who: Who,
        /// `None`: the redirect URI of the authorize request; else another.
        redirect: Option<Index>,
        verifier: VerifierPick,
        ip: usize,
    },
    Cross(Cross),
    /// Redeem the current token of a family.
    Redeem {
        fam: Index,
        who: Who,
        ip: usize,
    },
    /// Replay an older generation: the predecessor, or any older one.
    Replay {
        fam: Index,
        older: Option<Index>,
        who: Who,
        ip: usize,
    },
    /// A forged refresh token, or (`code`) a forged authorization code.
    Forge {
        forgery: Forgery,
        code: bool,
        client: usize,
        ip: usize,
        via_revoke: bool,
    },
    RevokeToken {
        fam: Index,
        generation: Index,
        client: Option<Who>,
    },
    RevokeFamily {
        fam: Index,
    },
    RevokeSubject {
        subject: usize,
        client: Option<usize>,
    },
    RevokeClient {
        client: usize,
    },
    Advance {
        ms: u64,
    },
    SwapPolicies(SetSpec),
    /// `None`: a budget covering the whole table.
    Sweep {
        budget: Option<usize>,
    },
    /// Copy a family's record, as a backup does (`Engine::family_record`).
    Backup {
        fam: Index,
    },
    /// Put a backup taken earlier back (`Engine::restore_family`): the
    /// family's whole state returns to it. With `rollback`, one of a family
    /// that rotated since, if there is one.
    Restore {
        backup: Index,
        rollback: bool,
    },
    /// Present a token minted before a rollback: newer than the family's
    /// current generation (`g > c`).
    Ahead {
        fam: Index,
        ahead: Index,
        who: Who,
        ip: usize,
    },
}

/// One generated case: the initial policy set, one to three families
/// started up front (from an address every policy admits: issued, or
/// (`true`) authorized with S256 and exchanged at once), then the ops.
#[derive(Clone, Debug)]
struct Case {
    initial: SetSpec,
    prelude: Vec<(usize, usize, bool)>,
    ops: Vec<Op>,
}

fn policy_spec() -> impl Strategy<Value = PolicySpec> {
    let on_reuse = prop::sample::select(vec![
        OnReuse::RevokeFamily,
        OnReuse::RevokeSubjectClient,
        OnReuse::RevokeSubject,
        OnReuse::ReportOnly,
    ]);
    (
        (
            prop::bool::weighted(0.8),
            prop::bool::weighted(0.6),
            prop::sample::select(vec![0u8, 1, 1, 2, 2]),
            prop::bool::weighted(0.3),
            on_reuse,
        ),
        (
            prop::bool::weighted(0.5),
            prop::bool::weighted(0.5),
            prop::bool::weighted(0.4),
            prop::bool::weighted(0.7),
        ),
        (
            prop::sample::select(vec![Pkce::S256, Pkce::S256OrPlain, Pkce::Optional]),
            prop_oneof![3 => prop::sample::select(CODE_TTLS.to_vec()), 1 => 1u64..=600_000],
        ),
    )
        .prop_map(
            |(
                (rotate, grace, grace_max_replays, grace_same_ip, on_reuse),
                (idle, absolute, restricted, every_refresh),
                (pkce, code_ttl_ms),
            )| PolicySpec {
                rotate,
                grace,
                grace_max_replays,
                grace_same_ip,
                on_reuse,
                idle,
                absolute,
                restricted,
                every_refresh,
                pkce,
                code_ttl_ms,
            },
        )
}

fn set_spec() -> impl Strategy<Value = SetSpec> {
    (
        policy_spec(),
        prop::array::uniform3(prop::option::weighted(0.5, policy_spec())),
    )
        .prop_map(|(defaults, clients)| SetSpec { defaults, clients })
}

/// Mostly allowed addresses (the first one most), sometimes refused ones,
/// sometimes the first one IPv4-mapped.
fn ip() -> impl Strategy<Value = usize> {
    prop_oneof![6 => Just(0usize), 3 => 1..5usize, 2 => 5..8usize, 1 => Just(8usize)]
}

fn who() -> impl Strategy<Value = Who> {
    prop_oneof![9 => Just(Who::Own), 1 => any::<Index>().prop_map(Who::Other)]
}

/// Mostly a few seconds (grace is 10 s), sometimes exactly on a boundary,
/// sometimes hours or days (idle 1 h, retention 2 h, absolute 1 d).
fn advance() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 1u64..=4_000,
        4 => (1u64..=15).prop_map(|s| s * 1000),
        2 => prop::sample::select(vec![
            GRACE_MS - 1,
            GRACE_MS,
            IDLE_MS - 1,
            IDLE_MS,
            RETENTION_MS,
            ABSOLUTE_MS,
        ]),
        1 => prop::sample::select(vec![59_999, 60_000, 599_999, 600_000]),
        2 => 1_800_000u64..=100_000_000,
    ]
}

/// A string of `len` characters drawn from `chars`.
fn string_of(
    chars: &'static [u8],
    len: impl Strategy<Value = usize> + 'static,
) -> BoxedStrategy<String> {
    len.prop_flat_map(move |n| prop::collection::vec(prop::sample::select(chars), n))
        .prop_map(|b| String::from_utf8(b).expect("ascii"))
        .boxed()
}

/// A well-formed verifier: the RFC 7636 example, or random, often at the
/// length bounds.
fn verifier() -> impl Strategy<Value = String> {
    let len = prop_oneof![Just(43usize), Just(128usize), 44..128usize];
    prop_oneof![1 => Just(RFC7636_VERIFIER.to_owned()), 5 => string_of(VERIFIER_CHARS, len)]
}

/// Not a verifier: one character too short or too long, a character
/// outside the set, or empty.
fn malformed_verifier() -> impl Strategy<Value = String> {
    prop_oneof![
        string_of(VERIFIER_CHARS, Just(42usize)),
        string_of(VERIFIER_CHARS, Just(129usize)),
        (
            verifier(),
            any::<Index>(),
            prop::sample::select(b"+/= %!".to_vec())
        )
            .prop_map(|(v, at, bad)| {
                let mut b = v.into_bytes();
                let i = at.index(b.len());
                b[i] = bad;
                String::from_utf8(b).expect("ascii")
            }),
        Just(String::new()),
    ]
}

/// Not an S256 challenge: a character short or over, padded, with a
/// character outside base64url, or with non-zero trailing bits.
fn malformed_challenge() -> impl Strategy<Value = String> {
    prop_oneof![
        verifier().prop_map(|v| s256_of(&v)[..42].to_owned()),
        verifier().prop_map(|v| format!("{}=", s256_of(&v))),
        verifier().prop_map(|v| format!("{}A", s256_of(&v))),
        (
            verifier(),
            any::<Index>(),
            prop::sample::select(b"+/.~=".to_vec())
        )
            .prop_map(|(v, at, bad)| {
                let mut b = s256_of(&v).into_bytes();
                let i = at.index(b.len());
                b[i] = bad;
                String::from_utf8(b).expect("ascii")
            }),
        (verifier(), 1..4usize).prop_map(|(v, bits)| {
            let mut b = s256_of(&v).into_bytes();
            let i = BASE64URL
                .iter()
                .position(|x| *x == b[42])
                .expect("base64url");
            b[42] = BASE64URL[(i & !3) | bits];
            String::from_utf8(b).expect("ascii")
        }),
    ]
}

fn pkce_spec() -> impl Strategy<Value = PkceSpec> {
    use ChallengeText as C;
    let spec = |challenge, method| PkceSpec { challenge, method };
    let bad_method = || prop::sample::select(vec![Some("s256"), Some("S512"), Some("")]);
    prop_oneof![
        6 => verifier().prop_map(move |v| spec(C::S256Of(v), Some("S256"))),
        2 => verifier().prop_map(move |v| spec(C::Verbatim(v), Some("plain"))),
        1 => verifier().prop_map(move |v| spec(C::Verbatim(v), None)),
        3 => Just(spec(C::None, None)),
        1 => prop::sample::select(vec![Some("S256"), Some("plain")])
            .prop_map(move |m| spec(C::None, m)),
        1 => malformed_challenge().prop_map(move |c| spec(C::Raw(c), Some("S256"))),
        1 => (malformed_verifier(), prop::sample::select(vec![Some("plain"), None]))
            .prop_map(move |(c, m)| spec(C::Raw(c), m)),
        1 => (verifier(), any::<bool>(), bad_method()).prop_map(move |(v, s, m)| {
            spec(if s { C::S256Of(v) } else { C::Verbatim(v) }, m)
        }),
        // A challenge sent under the other method.
        1 => verifier().prop_map(move |v| spec(C::S256Of(v), Some("plain"))),
        1 => string_of(BASE64URL, Just(43usize))
            .prop_map(move |v| spec(C::Verbatim(v), Some("S256"))),
    ]
}

fn verifier_pick() -> impl Strategy<Value = VerifierPick> {
    prop_oneof![
        10 => Just(VerifierPick::Held),
        1 => Just(VerifierPick::Missing),
        1 => verifier().prop_map(VerifierPick::Other),
        1 => malformed_verifier().prop_map(VerifierPick::Malformed),
    ]
}

fn exchange(replay: bool) -> impl Strategy<Value = Op> {
    (
        any::<Index>(),
        who(),
        prop::option::weighted(0.1, any::<Index>()),
        verifier_pick(),
        ip(),
    )
        .prop_map(move |(fam, who, redirect, verifier, ip)| Op::Exchange {
            fam,
            replay,
            who,
            redirect,
            verifier,
            ip,
        })
}

fn cross() -> impl Strategy<Value = Cross> {
    prop_oneof![
        (any::<Index>(), any::<bool>())
            .prop_map(|(fam, via_revoke)| Cross::CodeAsRefresh { fam, via_revoke }),
        (any::<Index>(), any::<Index>())
            .prop_map(|(fam, generation)| Cross::RefreshAsCode { fam, generation }),
    ]
}

fn gen_pick() -> impl Strategy<Value = GenPick> {
    prop_oneof![
        2 => Just(GenPick::Next),
        1 => Just(GenPick::Prev),
        1 => prop_oneof![0u32..=4, any::<u32>()].prop_map(GenPick::Fixed),
    ]
}

fn forgery() -> impl Strategy<Value = Forgery> {
    let i = any::<Index>;
    prop_oneof![
        4 => (i(), i(), i(), i()).prop_map(|(fam, generation, pos, to)| Forgery::Flip {
            fam,
            generation,
            pos,
            to
        }),
        1 => (i(), i(), i()).prop_map(|(fam, generation, keep)| Forgery::Truncate {
            fam,
            generation,
            keep
        }),
        1 => (i(), i(), i()).prop_map(|(fam, generation, ch)| Forgery::Extend {
            fam,
            generation,
            ch
        }),
        1 => (i(), i()).prop_map(|(fam, generation)| Forgery::CodePrefix { fam, generation }),
        3 => (i(), i(), gen_pick(), prop::option::weighted(0.5, any::<[u8; 16]>())).prop_map(
            |(fam, generation, new_generation, new_tag)| Forgery::Reforged {
                fam,
                generation,
                new_generation,
                new_tag,
            }
        ),
        1 => (any::<bool>(), prop::collection::vec(any::<u8>(), 37))
            .prop_map(|(real_key, raw)| Forgery::UnknownFamily { real_key, raw }),
        1 => prop_oneof!["[ -~]{0,70}", "rgt_[A-Za-z0-9_-]{50}", "rgt_[A-Za-z0-9_-]{0,60}"]
            .prop_map(Forgery::Garbage),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..3usize, ip())
            .prop_map(|(client, subject, ip)| Op::Issue { client, subject, ip }),
        4 => (0..3usize, 0..3usize, pkce_spec(), prop_oneof![3 => Just(0usize), 1 => 1..3usize], ip())
            .prop_map(|(client, subject, pkce, redirect, ip)| Op::Authorize {
                client,
                subject,
                pkce,
                redirect,
                ip
            }),
        5 => exchange(false),
        2 => exchange(true),
        1 => cross().prop_map(Op::Cross),
        9 => (any::<Index>(), who(), ip()).prop_map(|(fam, who, ip)| Op::Redeem { fam, who, ip }),
        5 => (any::<Index>(), prop::option::weighted(0.25, any::<Index>()), who(), ip())
            .prop_map(|(fam, older, who, ip)| Op::Replay { fam, older, who, ip }),
        4 => (forgery(), prop::bool::weighted(0.35), 0..3usize, ip(), prop::bool::weighted(0.2))
            .prop_map(|(forgery, code, client, ip, via_revoke)| Op::Forge {
                forgery,
                code,
                client,
                ip,
                via_revoke
            }),
        1 => (any::<Index>(), any::<Index>(), prop::option::of(who())).prop_map(
            |(fam, generation, client)| Op::RevokeToken { fam, generation, client }
        ),
        1 => any::<Index>().prop_map(|fam| Op::RevokeFamily { fam }),
        1 => (0..3usize, prop::option::of(0..3usize))
            .prop_map(|(subject, client)| Op::RevokeSubject { subject, client }),
        1 => (0..3usize).prop_map(|client| Op::RevokeClient { client }),
        6 => advance().prop_map(|ms| Op::Advance { ms }),
        2 => set_spec().prop_map(Op::SwapPolicies),
        2 => prop::option::weighted(0.5, 1..=8usize).prop_map(|budget| Op::Sweep { budget }),
        3 => any::<Index>().prop_map(|fam| Op::Backup { fam }),
        3 => (any::<Index>(), prop::bool::weighted(0.7))
            .prop_map(|(backup, rollback)| Op::Restore { backup, rollback }),
        4 => (any::<Index>(), any::<Index>(), who(), ip())
            .prop_map(|(fam, ahead, who, ip)| Op::Ahead { fam, ahead, who, ip }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        set_spec(),
        prop::collection::vec((0..3usize, 0..3usize, prop::bool::weighted(0.3)), 1..=3),
        prop::collection::vec(op(), 1..40),
    )
        .prop_map(|(initial, prelude, ops)| Case {
            initial,
            prelude,
            ops,
        })
}

// ---------------------------------------------------------------------------
// Check loop
// ---------------------------------------------------------------------------

/// Outcome counts over a whole run, to prove the strategy reaches every path.
type Coverage = BTreeMap<String, u64>;

/// What the test holds of one real family, parallel to the model's.
struct Real {
    id: FamilyId,
    /// Every refresh token handed out, by generation − 1 (none before the
    /// code is exchanged).
    tokens: Vec<String>,
    /// The highest generation ever accepted.
    max_generation: u32,
    /// The authorization code the family was born from, if any.
    code: Option<String>,
    /// What the client kept at authorize: the verifier and redirect URI.
    verifier: Option<String>,
    redirect: usize,
    /// Successful exchanges of the code.
    exchanges: u32,
}

/// What a forgery may not change: every family's current token as
/// introspected, every record's generation and status, the records held.
type Snapshot = (
    Vec<Option<Introspection>>,
    Vec<Option<(Generation, Status)>>,
    usize,
);

/// (label, family index) of one event; `family_revoked` labels carry the
/// reason.
type EventKey = (String, Option<usize>);

struct Run<'a> {
    engine: Engine,
    clock: Arc<ManualClock>,
    sink: Arc<MemorySink>,
    version: PolicyVersion,
    model: Model,
    fams: Vec<Real>,
    by_id: HashMap<FamilyId, usize>,
    /// Every token the engine ever handed out.
    seen: HashSet<String>,
    /// Every backup taken: the family, the model's copy of it then, and
    /// the engine's record.
    backups: Vec<(usize, MFamily, FamilyRecord)>,
    coverage: &'a RefCell<Coverage>,
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

fn revoked_label(reason: RevokeReason) -> String {
    format!("family_revoked:{reason}")
}

impl<'a> Run<'a> {
    fn new(case: &Case, coverage: &'a RefCell<Coverage>) -> Result<Run<'a>, TestCaseError> {
        let clock = Arc::new(ManualClock::new(ts(START_MS)));
        let sink = Arc::new(MemorySink::new());
        let set = case.initial.build();
        let version = set.version();
        let engine = Engine::builder()
            .policies(set)
            .clock(clock.clone())
            .events(sink.clone())
            .shards(SHARDS)
            .revoked_retention(Duration::from_millis(RETENTION_MS))
            .build()
            .map_err(fail)?;
        Ok(Run {
            engine,
            clock,
            sink,
            version,
            model: Model::new(case.initial.clone()),
            fams: Vec::new(),
            by_id: HashMap::new(),
            seen: HashSet::new(),
            backups: Vec::new(),
            coverage,
        })
    }

    fn count(&self, what: impl Into<String>) {
        *self.coverage.borrow_mut().entry(what.into()).or_default() += 1;
    }

    fn run(&mut self, case: &Case) -> TestCaseResult {
        for &(client, subject, via_code) in &case.prelude {
            if via_code {
                let pkce = PkceSpec {
                    challenge: ChallengeText::S256Of(RFC7636_VERIFIER.to_owned()),
                    method: Some("S256"),
                };
                self.authorize(client, subject, &pkce, 0, 0)?;
                let fam = self.fams.len() - 1;
                self.exchange(fam, &Who::Own, 0, Some(RFC7636_VERIFIER), 0)?;
                prop_assert_eq!(self.model.families[fam].current, 1);
            } else {
                self.issue(client, subject, 0)?;
            }
            self.check_table()?;
        }
        for op in &case.ops {
            self.step(op)?;
            self.check_table()?;
            self.check_introspection()?;
        }
        Ok(())
    }

    fn step(&mut self, op: &Op) -> TestCaseResult {
        match op {
            Op::Issue {
                client,
                subject,
                ip,
            } => self.issue(*client, *subject, *ip),
            Op::Authorize {
                client,
                subject,
                pkce,
                redirect,
                ip,
            } => self.authorize(*client, *subject, pkce, *redirect, *ip),
            Op::Exchange {
                fam,
                replay,
                who,
                redirect,
                verifier,
                ip,
            } => {
                let Some(fam) =
                    self.pick(fam, |r| r.code.is_some() && (r.exchanges > 0) == *replay)
                else {
                    return Ok(());
                };
                let own = self.fams[fam].redirect;
                let redirect = match redirect {
                    None => own,
                    Some(ix) => {
                        let others: Vec<usize> =
                            (0..REDIRECTS.len()).filter(|&r| r != own).collect();
                        *ix.get(&others)
                    }
                };
                let verifier = match verifier {
                    VerifierPick::Held => self.fams[fam].verifier.clone(),
                    VerifierPick::Missing => None,
                    VerifierPick::Other(v) | VerifierPick::Malformed(v) => Some(v.clone()),
                };
                self.exchange(fam, who, redirect, verifier.as_deref(), *ip)
            }
            Op::Cross(cross) => self.cross(cross),
            Op::Redeem { fam, who, ip } => {
                let Some(fam) = self.pick(fam, |r| !r.tokens.is_empty()) else {
                    return Ok(());
                };
                let generation = self.model.families[fam].current;
                self.redeem(fam, generation, who, *ip)
            }
            Op::Replay {
                fam,
                older,
                who,
                ip,
            } => {
                // By the model's generation: after a rollback the tokens
                // handed out run ahead of it.
                let rotated: Vec<usize> = (0..self.fams.len())
                    .filter(|&i| {
                        !self.fams[i].tokens.is_empty() && self.model.families[i].current >= 2
                    })
                    .collect();
                let Some(&fam) = (!rotated.is_empty()).then(|| fam.get(&rotated)) else {
                    return Ok(());
                };
                let c = self.model.families[fam].current;
                let generation = match older {
                    None => c - 1,
                    Some(ix) => 1 + ix.index(c as usize - 1) as u32,
                };
                self.redeem(fam, generation, who, *ip)
            }
            Op::Forge {
                forgery,
                code,
                client,
                ip,
                via_revoke,
            } => self.forge(forgery, *code, *client, *ip, *via_revoke),
            Op::RevokeToken {
                fam,
                generation,
                client,
            } => {
                let Some(fam) = self.pick(fam, |r| !r.tokens.is_empty()) else {
                    return Ok(());
                };
                let token = generation.get(&self.fams[fam].tokens).clone();
                let client = client.as_ref().map(|w| self.client_name(fam, w));
                let expected = self.model.revoke_token(fam, client);
                let got = self.engine.revoke_token(&token, client).map_err(fail)?;
                prop_assert_eq!(got, expected, "revoke_token of family {}", fam);
                self.count(format!("revoke_token:{got}"));
                let events = if got {
                    vec![(revoked_label(RevokeReason::Requested), Some(fam))]
                } else {
                    vec![]
                };
                self.check_events(events)
            }
            Op::RevokeFamily { fam } => {
                let fam = fam.index(self.fams.len());
                let expected = self.model.revoke_family(fam);
                let got = self.engine.revoke_family(self.fams[fam].id).map_err(fail)?;
                prop_assert_eq!(got, expected, "revoke_family of family {}", fam);
                if got {
                    self.count_pending_revoked(&[fam]);
                }
                let events = if got {
                    vec![(revoked_label(RevokeReason::Requested), Some(fam))]
                } else {
                    vec![]
                };
                self.check_events(events)
            }
            Op::RevokeSubject { subject, client } => {
                let expected = self.model.revoke_subject(*subject, *client);
                let got = self
                    .engine
                    .revoke_subject(SUBJECTS[*subject], client.map(|c| CLIENTS[c]))
                    .map_err(fail)?;
                prop_assert_eq!(got, expected.len(), "revoke_subject revoked {:?}", expected);
                self.count(format!("revoke_subject:{}", got.min(2)));
                self.count_pending_revoked(&expected);
                let reason = RevokeReason::SubjectRevoked;
                self.check_events(revoked_events(reason, &expected))
            }
            Op::RevokeClient { client } => {
                let expected = self.model.revoke_client(*client);
                let got = self.engine.revoke_client(CLIENTS[*client]).map_err(fail)?;
                prop_assert_eq!(got, expected.len(), "revoke_client revoked {:?}", expected);
                self.count(format!("revoke_client:{}", got.min(2)));
                self.count_pending_revoked(&expected);
                let reason = RevokeReason::ClientRevoked;
                self.check_events(revoked_events(reason, &expected))
            }
            Op::Advance { ms } => {
                self.clock.advance(Duration::from_millis(*ms));
                self.model.now += ms;
                prop_assert_eq!(self.engine.now(), ts(self.model.now));
                self.check_events(vec![])
            }
            Op::SwapPolicies(spec) => {
                let set = spec.build();
                self.version = set.version();
                self.engine.swap_policies(set);
                self.model.set = spec.clone();
                self.check_events(vec![("policy_swapped".to_owned(), None)])
            }
            Op::Sweep { budget } => self.sweep(*budget),
            Op::Backup { fam } => self.backup(fam),
            Op::Restore { backup, rollback } => self.restore(backup, *rollback),
            Op::Ahead {
                fam,
                ahead,
                who,
                ip,
            } => {
                let newer: Vec<usize> = (0..self.fams.len())
                    .filter(|&i| {
                        self.fams[i].tokens.len() > self.model.families[i].current as usize
                    })
                    .collect();
                let Some(&fam) = (!newer.is_empty()).then(|| fam.get(&newer)) else {
                    return Ok(());
                };
                let c = self.model.families[fam].current;
                let minted = self.fams[fam].tokens.len() - c as usize;
                let generation = c + 1 + ahead.index(minted) as u32;
                self.redeem(fam, generation, who, *ip)
            }
        }
    }

    /// Copy a family's record as a backup would, beside the model's copy
    /// of the family, so that a restore knows what comes back. A code not
    /// yet exchanged is left out: restoring it after its exchange would
    /// make it exchangeable again, outside what the code reference models.
    fn backup(&mut self, fam: &Index) -> TestCaseResult {
        let Some(fam) = self.pick(fam, |r| !r.tokens.is_empty()) else {
            return Ok(());
        };
        let m = &self.model.families[fam];
        let record = self.engine.family_record(self.fams[fam].id);
        prop_assert_eq!(record.is_some(), !m.swept, "record of family {}", fam);
        if let Some(record) = record {
            prop_assert_eq!(record.id(), self.fams[fam].id);
            prop_assert_eq!(
                (record.generation().get(), record.status()),
                (m.current, model_status(m)),
                "backup of family {}",
                fam
            );
            self.backups.push((fam, m.clone(), record));
            self.count("backup");
        }
        self.check_events(vec![])
    }

    /// Restore a backup: the family is as it was then, whatever happened
    /// since (rotations, revocation, a sweep). Tokens minted after the
    /// backup are then newer than the family (README "The order of
    /// checks": `g > c` is `state_rollback`).
    fn restore(&mut self, backup: &Index, rollback: bool) -> TestCaseResult {
        let behind: Vec<usize> = (0..self.backups.len())
            .filter(|&i| {
                let (fam, then, _) = &self.backups[i];
                rollback && then.current < self.model.families[*fam].current
            })
            .collect();
        let chosen = if behind.is_empty() {
            if self.backups.is_empty() {
                return Ok(());
            }
            backup.index(self.backups.len())
        } else {
            *backup.get(&behind)
        };
        let (fam, then, record) = self.backups[chosen].clone();
        let now = &self.model.families[fam];
        if now.swept {
            self.count("restore:swept");
        } else if now.revoked.is_some() && then.revoked.is_none() {
            self.count("restore:unrevoked");
        }
        if !now.swept && then.current < now.current {
            self.count("restore:rollback");
        }
        self.engine.restore_family(record).map_err(fail)?;
        self.fams[fam].max_generation = then.current;
        self.model.families[fam] = then;
        self.check_events(vec![])
    }

    fn issue(&mut self, client: usize, subject: usize, ip: usize) -> TestCaseResult {
        let expect = self.model.issue(client, subject, ip);
        let d = self
            .engine
            .issue(&IssueRequest {
                client: CLIENTS[client],
                subject: SUBJECTS[subject],
                scope: SCOPE,
                ip: Some(ip_addr(ip)),
            })
            .map_err(fail)?;
        self.count(format!("issue:{}", d.outcome()));
        prop_assert_eq!(d.policy_version(), self.version);
        match (expect, d) {
            (Expect::Accept { .. }, Decision::Accept(a)) => {
                prop_assert_eq!(a.kind, AcceptKind::Issued);
                prop_assert_eq!(a.generation.get(), 1);
                let token = a.token.as_str().to_owned();
                prop_assert!(token.starts_with("rgt_") && token.len() == TOKEN_LEN);
                prop_assert!(self.seen.insert(token.clone()), "issued token repeats");
                prop_assert!(
                    self.by_id.insert(a.family, self.fams.len()).is_none(),
                    "family id repeats"
                );
                self.fams.push(Real {
                    id: a.family,
                    tokens: vec![token],
                    max_generation: 1,
                    code: None,
                    verifier: None,
                    redirect: 0,
                    exchanges: 0,
                });
                self.check_events(vec![])
            }
            (Expect::Deny(reason), Decision::Deny(d)) => {
                prop_assert_eq!(d.reason, reason);
                prop_assert_eq!(d.family, None);
                self.check_events(vec![("ip_not_allowed".to_owned(), None)])
            }
            (expect, got) => Err(fail(format!(
                "issue for {} from {}: expected {expect:?}, engine said {got:?}",
                CLIENTS[client], IPS[ip].0
            ))),
        }
    }

    /// One of the families `keep` selects, by `ix`; `None` if there is none.
    fn pick(&self, ix: &Index, keep: impl Fn(&Real) -> bool) -> Option<usize> {
        let chosen: Vec<usize> = (0..self.fams.len())
            .filter(|&i| keep(&self.fams[i]))
            .collect();
        (!chosen.is_empty()).then(|| *ix.get(&chosen))
    }

    /// Coverage: a revocation reached a code not yet exchanged.
    fn count_pending_revoked(&self, revoked: &[usize]) {
        if revoked
            .iter()
            .any(|&i| self.model.families[i].code.is_some())
        {
            self.count("revoke:pending_code");
        }
    }

    fn authorize(
        &mut self,
        client: usize,
        subject: usize,
        pkce: &PkceSpec,
        redirect: usize,
        ip: usize,
    ) -> TestCaseResult {
        let (challenge, verifier) = pkce.challenge_and_verifier();
        let expect = self.model.authorize(
            client,
            subject,
            challenge.as_deref(),
            pkce.method,
            redirect,
            ip,
        );
        let d = self
            .engine
            .authorize(&AuthorizeRequest {
                client: CLIENTS[client],
                subject: SUBJECTS[subject],
                scope: SCOPE,
                redirect_uri: REDIRECTS[redirect],
                code_challenge: challenge.as_deref(),
                code_challenge_method: pkce.method,
                ip: Some(ip_addr(ip)),
            })
            .map_err(fail)?;
        self.count(format!("authorize:{}", d.outcome()));
        prop_assert_eq!(d.policy_version(), self.version);
        match (expect, d) {
            (Expect::Accept { .. }, Decision::Accept(a)) => {
                prop_assert_eq!(a.kind, AcceptKind::CodeIssued);
                prop_assert_eq!(a.generation, Generation::CODE);
                let code = a.token.as_str().to_owned();
                prop_assert!(code.starts_with("rgc_") && code.len() == TOKEN_LEN);
                prop_assert!(self.seen.insert(code.clone()), "issued code repeats");
                prop_assert!(
                    self.by_id.insert(a.family, self.fams.len()).is_none(),
                    "family id repeats"
                );
                self.fams.push(Real {
                    id: a.family,
                    tokens: Vec::new(),
                    max_generation: 0,
                    code: Some(code),
                    verifier,
                    redirect,
                    exchanges: 0,
                });
                self.check_events(vec![])
            }
            (Expect::Deny(reason), Decision::Deny(d)) => {
                prop_assert_eq!(d.reason, reason, "authorize {:?}", pkce);
                prop_assert_eq!(d.family, None);
                self.check_events(vec![])
            }
            (expect, got) => Err(fail(format!(
                "authorize for {} with {pkce:?} (challenge {challenge:?}) under {:?}: \
                 expected {expect:?}, engine said {got:?}",
                CLIENTS[client],
                self.model.set.policy(client)
            ))),
        }
    }

    /// Exchange the genuine code of `fam` (pending or already exchanged)
    /// and compare with the model; then check the code invariants: at most
    /// one successful exchange per code, and a replay by the code's client
    /// leaves the family revoked with every refresh token of it dead.
    fn exchange(
        &mut self,
        fam: usize,
        who: &Who,
        redirect: usize,
        verifier: Option<&str>,
        ip: usize,
    ) -> TestCaseResult {
        let client = self.client_name(fam, who);
        let code = self.fams[fam]
            .code
            .clone()
            .expect("a family born from a code");
        let before = self.model.families[fam].clone();
        let replay = self.fams[fam].exchanges > 0;
        let (expect, revoked) = self.model.exchange(fam, client, redirect, verifier, ip);
        let d = self
            .engine
            .exchange(&ExchangeRequest {
                code: &code,
                code_verifier: verifier,
                client,
                redirect_uri: REDIRECTS[redirect],
                ip: Some(ip_addr(ip)),
            })
            .map_err(fail)?;
        self.count(format!("exchange:{}", d.outcome()));
        let context = || {
            format!(
                "exchange of family {fam}'s code by {client} to {} with verifier {verifier:?} \
                 from {} (model before: {before:?}, policy {:?})",
                REDIRECTS[redirect],
                IPS[ip].0,
                self.model.policy_of(fam)
            )
        };
        prop_assert_eq!(d.policy_version(), self.version, "{}", context());
        let mut events: Vec<EventKey> = Vec::new();
        match (expect, d) {
            (Expect::Accept { .. }, Decision::Accept(a)) => {
                prop_assert_eq!(a.kind, AcceptKind::Exchanged, "{}", context());
                prop_assert_eq!(a.generation, Generation::FIRST, "{}", context());
                prop_assert_eq!(a.family, self.fams[fam].id);
                let token = a.token.as_str().to_owned();
                prop_assert!(token.starts_with("rgt_") && token.len() == TOKEN_LEN);
                prop_assert!(
                    self.seen.insert(token.clone()),
                    "exchange returned a token handed out before: {}",
                    context()
                );
                let method = match before.code.as_ref().and_then(|c| c.challenge.as_ref()) {
                    Some(MChallenge::S256(_)) => "S256",
                    Some(MChallenge::Plain(_)) => "plain",
                    None => "none",
                };
                self.count(format!("exchanged:{method}"));
                let real = &mut self.fams[fam];
                real.exchanges += 1;
                prop_assert_eq!(real.exchanges, 1, "a code exchanged twice: {}", context());
                prop_assert!(real.tokens.is_empty());
                real.tokens.push(token);
                real.max_generation = 1;
            }
            (Expect::Deny(reason), Decision::Deny(d)) => {
                prop_assert_eq!(d.reason, reason, "{}", context());
                let family = (reason != DenyReason::InvalidToken).then_some(self.fams[fam].id);
                prop_assert_eq!(d.family, family, "{}", context());
                match reason {
                    DenyReason::ClientMismatch => {
                        events.push(("client_mismatch".to_owned(), Some(fam)));
                    }
                    DenyReason::IpNotAllowed => {
                        events.push(("ip_not_allowed".to_owned(), Some(fam)));
                        let mode = if self.model.policy_of(fam).every_refresh {
                            "every_refresh"
                        } else {
                            "issuance_only"
                        };
                        self.count(format!("exchange:ip_not_allowed:{mode}"));
                    }
                    DenyReason::CodeReused => {
                        prop_assert!(revoked);
                        events.push(("code_replay:true".to_owned(), Some(fam)));
                        events.push((revoked_label(RevokeReason::CodeReplay), Some(fam)));
                    }
                    DenyReason::CodeSpent => {
                        prop_assert!(!revoked);
                        events.push(("code_replay:false".to_owned(), Some(fam)));
                        let spent = before.spent.as_ref().expect("exchanged");
                        let why = if spent.redirect != redirect {
                            "redirect_uri"
                        } else if self.model.code_expired(spent, fam) {
                            "expired"
                        } else {
                            "pkce"
                        };
                        self.count(format!("code_spent:{why}"));
                    }
                    _ => {}
                }
            }
            (expect, got) => {
                return Err(fail(format!(
                    "{}: expected {expect:?}, engine said {got:?}",
                    context()
                )));
            }
        }
        if revoked {
            // The replay event comes first, then the revocation it caused.
            let order: Vec<&'static str> =
                self.sink.events().iter().map(|e| e.kind.as_str()).collect();
            prop_assert_eq!(order, vec!["code_replay", "family_revoked"]);
        }
        self.check_events(events)?;
        if replay && !revoked {
            // A replay that revoked nothing left the family as it was: a
            // leaked code cannot log anyone out.
            let status = self
                .engine
                .family_record(self.fams[fam].id)
                .map(|r| r.status());
            let was = (!before.swept).then(|| model_status(&before));
            prop_assert_eq!(
                status,
                was,
                "replay changed family {} (model before: {:?})",
                fam,
                before
            );
        }
        if revoked {
            // Every refresh token of the family is dead, and the current
            // one is now refused as revoked.
            for t in &self.fams[fam].tokens {
                let got = self.engine.introspect(t);
                prop_assert!(
                    got.as_ref().is_some_and(|i| !i.active
                        && i.status
                            == Status::Revoked {
                                reason: RevokeReason::CodeReplay,
                                at: ts(self.model.now)
                            }),
                    "after a code replay: {:?}",
                    got
                );
            }
            let current = self.model.families[fam].current;
            self.redeem(fam, current, &Who::Own, 0)?;
        }
        Ok(())
    }

    /// A genuine token of one kind presented as the other: refused as
    /// invalid, changing nothing.
    fn cross(&mut self, cross: &Cross) -> TestCaseResult {
        let before = self.snapshot();
        match cross {
            Cross::CodeAsRefresh { fam, via_revoke } => {
                let Some(fam) = self.pick(fam, |r| r.code.is_some()) else {
                    return Ok(());
                };
                let code = self.fams[fam].code.clone().expect("picked");
                let client = CLIENTS[self.model.families[fam].client];
                if *via_revoke {
                    let revoked = self
                        .engine
                        .revoke_token(&code, Some(client))
                        .map_err(fail)?;
                    prop_assert!(!revoked, "a code revoked its family as a refresh token");
                } else {
                    let d = self
                        .engine
                        .redeem(&RedeemRequest::new(&code, client).ip(ip_addr(0)))
                        .map_err(fail)?;
                    prop_assert_eq!(d.deny_reason(), Some(DenyReason::InvalidToken));
                    if let Decision::Deny(d) = d {
                        prop_assert_eq!(d.family, None);
                    }
                }
                prop_assert!(self.engine.introspect(&code).is_none());
                self.count("cross:code_as_refresh");
            }
            Cross::RefreshAsCode { fam, generation } => {
                let Some(fam) = self.pick(fam, |r| !r.tokens.is_empty()) else {
                    return Ok(());
                };
                let real = &self.fams[fam];
                let token = generation.get(&real.tokens);
                let d = self
                    .engine
                    .exchange(&ExchangeRequest {
                        code: token,
                        code_verifier: real.verifier.as_deref(),
                        client: CLIENTS[self.model.families[fam].client],
                        redirect_uri: REDIRECTS[real.redirect],
                        ip: Some(ip_addr(0)),
                    })
                    .map_err(fail)?;
                prop_assert_eq!(d.deny_reason(), Some(DenyReason::InvalidToken));
                if let Decision::Deny(d) = d {
                    prop_assert_eq!(d.family, None);
                }
                self.count("cross:refresh_as_code");
            }
        }
        prop_assert_eq!(self.snapshot(), before, "{:?} changed state", cross);
        self.check_events(vec![])
    }

    fn client_name(&self, fam: usize, who: &Who) -> &'static str {
        let own = self.model.families[fam].client;
        match who {
            Who::Own => CLIENTS[own],
            Who::Other(ix) => {
                let others: Vec<&'static str> = (0..3)
                    .filter(|&c| c != own)
                    .map(|c| CLIENTS[c])
                    .chain([INTRUDER])
                    .collect();
                others[ix.index(others.len())]
            }
        }
    }

    /// Redeem the genuine token of `fam` at `generation` and compare with
    /// the model, then check the invariants that do not need the model.
    fn redeem(&mut self, fam: usize, generation: u32, who: &Who, ip: usize) -> TestCaseResult {
        let client = self.client_name(fam, who);
        let token = self.fams[fam].tokens[generation as usize - 1].clone();
        let before = self.model.families[fam].clone();
        let dead = before.swept || before.revoked.is_some() || self.model.expiry(fam).is_some();
        let on_reuse = self.model.policy_of(fam).on_reuse;
        let (expect, revoked) = self.model.redeem(fam, generation, client, ip);
        let d = self
            .engine
            .redeem(&RedeemRequest::new(&token, client).ip(ip_addr(ip)))
            .map_err(fail)?;
        self.count(format!("redeem:{}", d.outcome()));
        let context = || {
            format!(
                "redeem of family {fam} generation {generation} by {client} from {} \
                 (model before: {before:?}, policy {:?})",
                IPS[ip].0,
                self.model.policy_of(fam)
            )
        };
        prop_assert_eq!(d.policy_version(), self.version, "{}", context());
        let mut events: Vec<EventKey> = Vec::new();
        let mut reminted = false;
        match (expect, &d) {
            (
                Expect::Accept {
                    kind,
                    generation: g,
                },
                Decision::Accept(a),
            ) => {
                prop_assert_eq!(a.kind, kind, "{}", context());
                prop_assert_eq!(a.generation.get(), g, "{}", context());
                prop_assert_eq!(a.family, self.fams[fam].id);
                // Nothing is accepted after revocation or expiry.
                prop_assert!(!dead, "accepted a dead family: {}", context());
                // Generations only grow; a rotation is exactly current + 1.
                let real = &mut self.fams[fam];
                prop_assert!(a.generation.get() >= real.max_generation);
                real.max_generation = a.generation.get();
                let returned = a.token.as_str();
                if kind == AcceptKind::Rotated {
                    prop_assert_eq!(g, before.current + 1);
                    prop_assert!(returned.starts_with("rgt_") && returned.len() == TOKEN_LEN);
                    if let Some(earlier) = real.tokens.get(g as usize - 1) {
                        // Minted again after a rollback: tokens are derived
                        // from the key, family and generation (README
                        // "Tokens"), so it is the token handed out before.
                        prop_assert_eq!(returned, earlier.as_str(), "{}", context());
                        reminted = true;
                    } else {
                        prop_assert!(
                            self.seen.insert(returned.to_owned()),
                            "rotation returned a token handed out before: {}",
                            context()
                        );
                        real.tokens.push(returned.to_owned());
                    }
                } else {
                    // Grace replay: the identical successor; kept: the same
                    // token. Either way no new generation.
                    prop_assert_eq!(g, before.current);
                    prop_assert_eq!(
                        returned,
                        real.tokens[g as usize - 1].as_str(),
                        "{}",
                        context()
                    );
                }
            }
            (Expect::Deny(reason), Decision::Deny(d)) => {
                prop_assert_eq!(d.reason, reason, "{}", context());
                let family = (reason != DenyReason::InvalidToken).then_some(self.fams[fam].id);
                prop_assert_eq!(d.family, family, "{}", context());
                match reason {
                    DenyReason::ClientMismatch => {
                        events.push(("client_mismatch".to_owned(), Some(fam)));
                    }
                    DenyReason::IpNotAllowed => {
                        events.push(("ip_not_allowed".to_owned(), Some(fam)));
                    }
                    DenyReason::StateRollback => {
                        events.push(("state_rollback".to_owned(), Some(fam)));
                    }
                    DenyReason::ReuseDetected => {
                        events.push(("reuse_detected".to_owned(), Some(fam)));
                        for &r in &revoked {
                            let why = self.model.families[r].revoked.expect("just revoked").0;
                            events.push((revoked_label(why), Some(r)));
                        }
                        self.count(format!("reuse:{}:{}", on_reuse.as_str(), revoked.len()));
                    }
                    _ => {}
                }
            }
            (expect, got) => {
                return Err(fail(format!(
                    "{}: expected {expect:?}, engine said {got:?}",
                    context()
                )));
            }
        }
        if reminted {
            self.count("redeem:reminted");
        }
        if d.deny_reason() == Some(DenyReason::StateRollback) {
            self.check_rollback_event(fam, generation, before.current)?;
        }
        if d.deny_reason() == Some(DenyReason::ReuseDetected) {
            self.check_reuse_event(fam, generation, before.current, on_reuse)?;
            // on_reuse was applied: the subject's families are revoked (or
            // not) exactly as the model says.
            self.check_subject_status(before.subject)?;
        }
        self.check_events(events)
    }

    fn check_reuse_event(
        &self,
        fam: usize,
        presented: u32,
        current: u32,
        on_reuse: OnReuse,
    ) -> TestCaseResult {
        let events = self.sink.events();
        let reuse = events
            .iter()
            .find(|e| matches!(e.kind, EventKind::ReuseDetected { .. }));
        let Some(e) = reuse else {
            return Err(fail("reuse detected without a reuse_detected event"));
        };
        let EventKind::ReuseDetected {
            presented: p,
            current: c,
            response,
        } = &e.kind
        else {
            unreachable!("matched above");
        };
        prop_assert_eq!(p.get(), presented);
        prop_assert_eq!(c.get(), current);
        prop_assert_eq!(*response, on_reuse);
        prop_assert_eq!(e.family, Some(self.fams[fam].id));
        Ok(())
    }

    /// The `state_rollback` event names the presented and the current
    /// generation.
    fn check_rollback_event(&self, fam: usize, presented: u32, current: u32) -> TestCaseResult {
        let events = self.sink.events();
        let rollback = events.iter().find_map(|e| match e.kind {
            EventKind::StateRollback {
                presented: p,
                current: c,
            } => Some((e.family, p.get(), c.get())),
            _ => None,
        });
        prop_assert_eq!(
            rollback,
            Some((Some(self.fams[fam].id), presented, current)),
            "state_rollback event"
        );
        Ok(())
    }

    fn check_subject_status(&self, subject: usize) -> TestCaseResult {
        for (i, f) in self.model.families.iter().enumerate() {
            if f.subject != subject || f.swept {
                continue;
            }
            let got = self
                .engine
                .family_record(self.fams[i].id)
                .map(|r| r.status());
            prop_assert_eq!(got, Some(model_status(f)), "status of family {}", i);
        }
        Ok(())
    }

    /// The token a forgery describes, or `None` if it needs a real token
    /// and there is none. With `code`, the forgery starts from a real
    /// authorization code instead of a refresh token (and `CodePrefix` puts
    /// the code's body under the refresh-token prefix).
    fn forged_token(&self, forgery: &Forgery, code: bool) -> Option<String> {
        let real = |fam: &Index, generation: &Index| -> Option<(usize, &str)> {
            if code {
                let fam = self.pick(fam, |r| r.code.is_some())?;
                return Some((fam, self.fams[fam].code.as_deref().expect("picked")));
            }
            let fam = self.pick(fam, |r| !r.tokens.is_empty())?;
            Some((fam, generation.get(&self.fams[fam].tokens).as_str()))
        };
        let (prefix, other) = if code {
            ("rgc_", "rgt_")
        } else {
            ("rgt_", "rgc_")
        };
        Some(match forgery {
            Forgery::Flip {
                fam,
                generation,
                pos,
                to,
            } => {
                let mut b = real(fam, generation)?.1.as_bytes().to_vec();
                let p = pos.index(b.len());
                if p < 4 {
                    b[p] = if b[p].is_ascii_lowercase() {
                        b[p].to_ascii_uppercase()
                    } else {
                        b'x'
                    };
                } else {
                    let i = to.index(64);
                    b[p] = if BASE64URL[i] == b[p] {
                        BASE64URL[(i + 1) % 64]
                    } else {
                        BASE64URL[i]
                    };
                }
                String::from_utf8(b).expect("ascii")
            }
            Forgery::Truncate {
                fam,
                generation,
                keep,
            } => {
                let t = real(fam, generation)?.1;
                t[..keep.index(t.len())].to_owned()
            }
            Forgery::Extend {
                fam,
                generation,
                ch,
            } => {
                let t = real(fam, generation)?.1;
                format!("{t}{}", *ch.get(BASE64URL) as char)
            }
            Forgery::CodePrefix { fam, generation } => {
                format!("{other}{}", &real(fam, generation)?.1[4..])
            }
            Forgery::Reforged {
                fam,
                generation,
                new_generation,
                new_tag,
            } => {
                let (fam, t) = real(fam, generation)?;
                let mut raw = URL_SAFE_NO_PAD.decode(&t[4..]).expect("real tokens decode");
                let old = u32::from_be_bytes(raw[17..21].try_into().expect("4 bytes"));
                let g = match new_generation {
                    GenPick::Next => self.model.families[fam].current + 1,
                    GenPick::Prev => old.wrapping_sub(1),
                    GenPick::Fixed(g) => *g,
                };
                raw[17..21].copy_from_slice(&g.to_be_bytes());
                if let Some(tag) = new_tag {
                    raw[21..].copy_from_slice(tag);
                }
                format!("{prefix}{}", URL_SAFE_NO_PAD.encode(&raw))
            }
            Forgery::UnknownFamily { real_key, raw } => {
                let mut raw = raw.clone();
                let first = self.fams.iter().find_map(|r| match code {
                    true => r.code.as_deref(),
                    false => r.tokens.first().map(String::as_str),
                });
                if *real_key && let Some(t) = first {
                    let real = URL_SAFE_NO_PAD.decode(&t[4..]).expect("decodes");
                    raw[0] = real[0];
                }
                format!("{prefix}{}", URL_SAFE_NO_PAD.encode(&raw))
            }
            Forgery::Garbage(s) => match s.strip_prefix("rgt_") {
                Some(rest) if code => format!("rgc_{rest}"),
                _ => s.clone(),
            },
        })
    }

    fn snapshot(&self) -> Snapshot {
        let views = self
            .fams
            .iter()
            .map(|r| r.tokens.last().and_then(|t| self.engine.introspect(t)))
            .collect();
        let records = self
            .fams
            .iter()
            .map(|r| {
                self.engine
                    .family_record(r.id)
                    .map(|f| (f.generation(), f.status()))
            })
            .collect();
        (views, records, self.engine.stats().families)
    }

    /// Present a forged token (or code) to redeem or RFC 7009 revocation,
    /// and to the code exchange: refused as invalid everywhere, changing
    /// nothing.
    fn forge(
        &mut self,
        forgery: &Forgery,
        code: bool,
        client: usize,
        ip: usize,
        via_revoke: bool,
    ) -> TestCaseResult {
        let Some(token) = self.forged_token(forgery, code) else {
            return Ok(());
        };
        if self.seen.contains(&token) {
            // Not a forgery after all (a no-op edit); nothing to test.
            return Ok(());
        }
        let label = format!("{forgery:?}");
        let kind = label.split([' ', '(']).next().unwrap_or("?");
        self.count(format!(
            "{}:{kind}",
            if code { "forge_code" } else { "forge" }
        ));
        let before = self.snapshot();
        // What the source family's client would send along with its code.
        let source = self.fams.iter().find(|r| r.code.is_some());
        let (verifier, redirect) = source.map_or((None, 0), |r| (r.verifier.clone(), r.redirect));
        let d = self
            .engine
            .exchange(&ExchangeRequest {
                code: &token,
                code_verifier: verifier.as_deref(),
                client: CLIENTS[client],
                redirect_uri: REDIRECTS[redirect],
                ip: Some(ip_addr(ip)),
            })
            .map_err(fail)?;
        prop_assert_eq!(
            d.deny_reason(),
            Some(DenyReason::InvalidToken),
            "forged code {:?} from {:?}: {:?}",
            token,
            forgery,
            d
        );
        prop_assert_eq!(d.policy_version(), self.version);
        if let Decision::Deny(d) = d {
            prop_assert_eq!(d.family, None);
        }
        if via_revoke {
            let revoked = self
                .engine
                .revoke_token(&token, Some(CLIENTS[client]))
                .map_err(fail)?;
            prop_assert!(!revoked, "a forged token revoked a family: {:?}", token);
        } else {
            let d = self
                .engine
                .redeem(&RedeemRequest::new(&token, CLIENTS[client]).ip(ip_addr(ip)))
                .map_err(fail)?;
            prop_assert_eq!(
                d.deny_reason(),
                Some(DenyReason::InvalidToken),
                "forged token {:?} from {:?}: {:?}",
                token,
                forgery,
                d
            );
            prop_assert_eq!(d.policy_version(), self.version);
            if let Decision::Deny(d) = d {
                prop_assert_eq!(d.family, None);
            }
        }
        prop_assert!(self.engine.introspect(&token).is_none());
        prop_assert_eq!(
            self.snapshot(),
            before,
            "forged token {:?} changed state",
            token
        );
        self.check_events(vec![])
    }

    fn sweep(&mut self, budget: Option<usize>) -> TestCaseResult {
        let sweepable: Vec<usize> = (0..self.fams.len())
            .filter(|&i| self.model.sweepable(i))
            .collect();
        let report = self
            .engine
            .sweep(budget.unwrap_or(FULL_SWEEP))
            .map_err(fail)?;
        let removed: Vec<usize> = match budget {
            None => sweepable.clone(),
            Some(b) => {
                prop_assert!(report.examined <= b);
                // Which slots a small budget reaches depends on the cursor:
                // observe which families went, and check they were due.
                let removed: Vec<usize> = (0..self.fams.len())
                    .filter(|&i| {
                        !self.model.families[i].swept
                            && self.engine.family_record(self.fams[i].id).is_none()
                    })
                    .collect();
                for r in &removed {
                    prop_assert!(
                        sweepable.contains(r),
                        "sweep removed family {} that was not due: {:?}",
                        r,
                        self.model.families[*r]
                    );
                }
                removed
            }
        };
        prop_assert_eq!(
            report.removed,
            removed.len(),
            "due for sweeping: {:?}",
            sweepable
        );
        if !removed.is_empty() {
            let partial = if budget.is_some() { "partial" } else { "full" };
            self.count(format!("sweep:{partial}"));
        }
        for r in removed {
            let f = &self.model.families[r];
            if f.code.is_some() && f.revoked.is_none() {
                self.count("sweep:expired_code");
            }
            self.model.families[r].swept = true;
        }
        self.check_events(vec![])
    }

    /// The events since the last check, as (label, family index), sorted.
    fn check_events(&mut self, mut expected: Vec<EventKey>) -> TestCaseResult {
        let mut got: Vec<EventKey> = Vec::new();
        for e in self.sink.take() {
            let fam = match e.family {
                None => None,
                Some(id) => Some(
                    *self
                        .by_id
                        .get(&id)
                        .ok_or_else(|| fail(format!("event for an unknown family: {e:?}")))?,
                ),
            };
            prop_assert_eq!(e.at, ts(self.model.now), "event time: {:?}", e);
            prop_assert_eq!(e.policy_version, self.version, "event version: {:?}", e);
            let label = match &e.kind {
                EventKind::FamilyRevoked { reason } => revoked_label(*reason),
                EventKind::CodeReplay { revoked } => format!("code_replay:{revoked}"),
                k => k.as_str().to_owned(),
            };
            got.push((label, fam));
        }
        got.sort();
        expected.sort();
        prop_assert_eq!(got, expected, "events");
        Ok(())
    }

    fn check_table(&self) -> TestCaseResult {
        prop_assert_eq!(
            self.engine.stats().families,
            self.model.in_table(),
            "family records held"
        );
        Ok(())
    }

    /// Every record holds the generation and status the model says (a
    /// code not yet exchanged is generation 0), every token ever handed out
    /// introspects as the model says, at most one generation per family is
    /// active (redeemable), and no code introspects as a refresh token.
    fn check_introspection(&self) -> TestCaseResult {
        for (i, (m, r)) in self.model.families.iter().zip(&self.fams).enumerate() {
            let record = self
                .engine
                .family_record(r.id)
                .map(|f| (f.generation().get(), f.status()));
            let want = (!m.swept).then(|| (m.current, model_status(m)));
            prop_assert_eq!(record, want, "record of family {}: {:?}", i, m);
            if let Some(code) = &r.code {
                prop_assert!(
                    self.engine.introspect(code).is_none(),
                    "the code of family {} introspects as a refresh token",
                    i
                );
            }
            let p = self.model.set.policy(m.client);
            let mut active = 0;
            for (g0, t) in r.tokens.iter().enumerate() {
                let g = g0 as u32 + 1;
                let got = self.engine.introspect(t);
                if m.swept {
                    prop_assert!(got.is_none(), "swept family {} still known", i);
                    continue;
                }
                let Some(got) = got else {
                    return Err(fail(format!("family {i} generation {g} unknown: {m:?}")));
                };
                let want = Introspection {
                    active: g == m.current && m.revoked.is_none() && self.model.expiry(i).is_none(),
                    family: r.id,
                    client: Arc::from(CLIENTS[m.client]),
                    subject: Arc::from(SUBJECTS[m.subject]),
                    scope: Arc::from(SCOPE),
                    generation: refresh_guard::Generation::new(g),
                    current_generation: refresh_guard::Generation::new(m.current),
                    issued_at: ts(m.created),
                    last_used: ts(m.last_used),
                    idle_expires_at: p.idle_ms().map(|t| ts(m.last_used + t)),
                    absolute_expires_at: p.absolute_ms().map(|t| ts(m.created + t)),
                    status: model_status(m),
                };
                prop_assert_eq!(
                    &got,
                    &want,
                    "introspection of family {} generation {}",
                    i,
                    g
                );
                active += usize::from(got.active);
            }
            prop_assert!(
                active <= 1,
                "family {} has {} active generations",
                i,
                active
            );
        }
        Ok(())
    }
}

fn model_status(f: &MFamily) -> Status {
    match f.revoked {
        None => Status::Active,
        Some((reason, at)) => Status::Revoked { reason, at: ts(at) },
    }
}

fn revoked_events(reason: RevokeReason, fams: &[usize]) -> Vec<EventKey> {
    fams.iter()
        .map(|&f| (revoked_label(reason), Some(f)))
        .collect()
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Every path the strategy must reach in a default run, by coverage label.
const MUST_COVER: &[&str] = &[
    "issue:issued",
    "issue:ip_not_allowed",
    "redeem:rotated",
    "redeem:kept",
    "redeem:grace_replay",
    "redeem:invalid_token",
    "redeem:client_mismatch",
    "redeem:revoked",
    "redeem:expired_absolute",
    "redeem:expired_idle",
    "redeem:reuse_detected",
    "redeem:ip_not_allowed",
    "reuse:revoke_family:1",
    "reuse:report_only:0",
    "reuse:revoke_subject_client:2",
    "reuse:revoke_subject:2",
    "revoke_token:true",
    "revoke_subject:1",
    "revoke_client:1",
    "sweep:full",
    "sweep:partial",
    "forge:Flip",
    "forge:Truncate",
    "forge:Extend",
    "forge:CodePrefix",
    "forge:Reforged",
    "forge:UnknownFamily",
    "forge:Garbage",
    // Authorization codes (issue 4).
    "authorize:code_issued",
    "authorize:pkce_required",
    "authorize:pkce_method_not_allowed",
    "authorize:pkce_challenge_invalid",
    "exchange:exchanged",
    "exchanged:S256",
    "exchanged:plain",
    "exchanged:none",
    "exchange:invalid_token",
    "exchange:client_mismatch",
    "exchange:revoked",
    "exchange:code_reused",
    "exchange:code_spent",
    "code_spent:redirect_uri",
    "code_spent:expired",
    "code_spent:pkce",
    "exchange:redirect_uri_mismatch",
    "exchange:code_expired",
    "exchange:pkce_required",
    "exchange:pkce_method_not_allowed",
    "exchange:pkce_verifier_invalid",
    "exchange:pkce_verifier_unexpected",
    "exchange:pkce_mismatch",
    "exchange:ip_not_allowed",
    "exchange:ip_not_allowed:every_refresh",
    "exchange:ip_not_allowed:issuance_only",
    "revoke:pending_code",
    "sweep:expired_code",
    "cross:code_as_refresh",
    "cross:refresh_as_code",
    "forge_code:Flip",
    "forge_code:Truncate",
    "forge_code:Extend",
    "forge_code:CodePrefix",
    "forge_code:Reforged",
    "forge_code:UnknownFamily",
    "forge_code:Garbage",
    // Backups and restores: a rollback, then tokens newer than the family.
    "backup",
    "restore:rollback",
    "restore:unrevoked",
    "restore:swept",
    "redeem:state_rollback",
    "redeem:reminted",
];

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// The engine agrees with the reference model of DESIGN §3–§4 on every
/// decision, revocation, sweep, event and introspection over random
/// operation sequences, and the strategy reaches every interesting path.
#[test]
fn engine_matches_reference_model() {
    let n = cases();
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        source_file: Some(file!()),
        ..Config::default()
    });
    let coverage = RefCell::new(Coverage::new());
    let result = runner.run(&case(), |case| Run::new(&case, &coverage)?.run(&case));
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, case)) => panic!("{why}\nminimal failing case: {case:#?}"),
        Err(e) => panic!("{e}"),
    }
    let coverage = coverage.into_inner();
    if n >= 10_000 {
        let missing: Vec<&&str> = MUST_COVER
            .iter()
            .filter(|k| !coverage.contains_key(**k))
            .collect();
        assert!(
            missing.is_empty(),
            "never reached {missing:?}; got {coverage:#?}"
        );
    }
}

/// The model's own PKCE helpers agree with RFC 7636 Appendix B, so a
/// disagreement with the engine is never the model's S256 being wrong.
#[test]
fn model_pkce_helpers_match_rfc7636_appendix_b() {
    assert_eq!(s256_of(RFC7636_VERIFIER), RFC7636_CHALLENGE);
    assert!(is_verifier(RFC7636_VERIFIER));
    assert!(is_s256_challenge(RFC7636_CHALLENGE));
    let challenge = authorize_pkce(Pkce::S256, Some(RFC7636_CHALLENGE), Some("S256"));
    assert_eq!(
        challenge,
        Ok(Some(MChallenge::S256(RFC7636_CHALLENGE.to_owned())))
    );
    let c = challenge.expect("valid").expect("a challenge");
    assert_eq!(
        exchange_pkce(Some(&c), Some(RFC7636_VERIFIER), Pkce::S256),
        Ok(())
    );
}

/// `grace_same_ip`: a retry from the IPv4-mapped spelling (`::ffff:a.b.c.d`)
/// of the address the rotation came from is from the same IP, as the
/// allow-list already treats it: it gets the identical successor, and the
/// family is not revoked as a reuse.
#[test]
fn grace_same_ip_treats_ipv4_mapped_as_the_same_ip() {
    let clock = Arc::new(ManualClock::new(ts(START_MS)));
    let set = PolicySet::builder()
        .defaults(
            PolicyOverrides::new()
                .grace_period(Duration::from_secs(10))
                .grace_same_ip(true),
        )
        .build()
        .expect("valid set");
    let engine = Engine::builder()
        .policies(set)
        .clock(clock.clone())
        .build()
        .expect("engine");
    let v4: IpAddr = "10.0.0.1".parse().expect("ip");
    let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
    let issue = IssueRequest {
        client: CLIENTS[0],
        subject: SUBJECTS[0],
        scope: SCOPE,
        ip: Some(v4),
    };
    let t1 = engine
        .issue(&issue)
        .expect("issue")
        .accepted()
        .expect("issued")
        .token;
    let rotated = engine
        .redeem(&RedeemRequest::new(&t1, CLIENTS[0]).ip(v4))
        .expect("redeem");
    let t2 = rotated.accepted().expect("rotated").token;
    clock.advance(Duration::from_secs(1));
    let retry = engine
        .redeem(&RedeemRequest::new(&t1, CLIENTS[0]).ip(mapped))
        .expect("redeem");
    assert_eq!(
        retry
            .accepted()
            .map(|a| (a.kind, a.token.as_str().to_owned())),
        Some((AcceptKind::GraceReplay, t2.as_str().to_owned())),
        "retry from the mapped spelling of the rotation's IP: {retry:?}"
    );
    assert_eq!(
        engine.introspect(&t2).map(|i| i.status),
        Some(Status::Active)
    );
}
